"""A trained cell's learner, used outside its run: predictions on a user's own episodes
(inputs checked against what the model was trained on), the dataset's own preprocessing for
a user's images, and evaluation on the cell's fixed test episodes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fewbench.errors import FewbenchError

VALUE_SAMPLE = 1024  # training images whose means make the reference of the value check
VALUE_QUANTILES = (0.001, 0.999)  # the range of those means that counts as seen
VALUE_MARGIN = 2.0  # the range is widened by this many times its width on either side


class InputWarning(UserWarning):
    """Examples given to :meth:`TrainedModel.predict` that look unlike the training data's."""


@dataclass
class TrainedModel:
    """A trained learner, set up as its cell was, ready to adapt to new episodes.

    ``data_root`` and ``cache_dir``: where :meth:`preprocess`, :meth:`predict`'s value check
    and :meth:`evaluate` find the cell's dataset when not told; ``None`` (the default)
    resolves them as ``fewbench run`` does (``$FEWBENCH_DATA`` / ``$FEWBENCH_CACHE``, else
    the user's data and cache folders)."""

    learner: Any  # fewbench.plugin.learner.Learner
    cell: Any  # fewbench.suite.cell.Cell
    context: Any  # fewbench.plugin.learner.LearnerContext
    record: dict[str, Any]
    data_root: Path | None = None
    cache_dir: Path | None = None
    _loaded: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)
    _references: dict[Any, Any] = field(default_factory=dict, init=False, repr=False)
    _follows_episode_ways: bool | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> Any:
        return self.context.device

    # -- where the data is -----------------------------------------------------------------
    def _roots(self, data_root: str | Path | None) -> tuple[Path, Path]:
        """The data root and cache folder, resolved as ``fewbench run`` resolves them."""
        from fewbench.storage.paths import default_cache_dir, default_data_root

        root = data_root if data_root is not None else self.data_root
        cache = self.cache_dir
        return (
            Path(root) if root else default_data_root(),
            Path(cache) if cache else default_cache_dir(),
        )

    def _datasets(self, root: Path, cache: Path, device: Any) -> Any:
        """A :class:`DatasetCache` per place and device, so the data loads once per model."""
        from fewbench.running.worker import DatasetCache

        key = (root, cache, str(device))
        if key not in self._loaded:
            self._loaded[key] = DatasetCache(self._registry(), root, cache, device)
        return self._loaded[key]

    def _registry(self) -> Any:
        from fewbench.registry import Registry

        if "registry" not in self._loaded:
            self._loaded["registry"] = Registry()
        return self._loaded["registry"]

    def _dataset_name(self) -> str:
        return str(self.cell.dataset.name)

    # -- a user's own examples -------------------------------------------------------------
    def preprocess(self, images: Sequence[Any], *, data_root: str | Path | None = None) -> Any:
        """A user's images as the model's episodes held theirs: float32 ``[N, *input_shape]``
        (CPU), ready for :meth:`predict`.

        ``images``: a list of file paths, PIL images or arrays ``H x W (x C)`` (uint8
        0..255, or floats 0..1), as one would look at them (Omniglot: dark strokes on white).
        They go through the cell's dataset's own test-time transform, the function its loader
        decodes its files with (Omniglot: grey, Lanczos-resized to ``image_size``, inverted
        so that strokes are 1; CUB: the centre crop; mini-ImageNet: the resize), then the
        same scaling to [0, 1] and, for the datasets that normalise, the training classes'
        per-channel statistics, read from the data root's cache (``data_root``, else
        :attr:`data_root`, else as ``fewbench run``): nothing is copied, so it cannot drift.
        A dataset's own file comes out exactly as its episodes hold it. A dataset that
        generates its tasks (sinusoid) has nothing to prepare: a one-line error says so."""
        name = self._dataset_name()
        params = {k: v for k, v in self.cell.dataset.config().items() if k != "name"}
        dataset = self._registry().get("dataset", name).build(**params)
        root, cache = self._roots(data_root)
        try:
            prepared = dataset.preprocess(images, root, cache)
        except NotImplementedError:
            raise FewbenchError(
                f"model.preprocess: the {name} dataset has no raw examples to prepare (it "
                "generates its tasks, or its plugin does not implement decode_examples); give "
                f"predict tensors [examples, {_dims(self.context.input_shape)}]"
            ) from None
        except FewbenchError as exc:
            raise FewbenchError(f"model.preprocess ({name}): {exc}") from None
        expected = tuple(self.context.input_shape)
        if tuple(prepared.shape[1:]) != expected:
            raise FewbenchError(
                f"model.preprocess: {name} prepared examples of shape "
                f"{_dims(prepared.shape[1:])}, but the model takes {_dims(expected)} (a dataset "
                "plugin other than the one it was trained with?)"
            )
        return prepared

    def predict(
        self, support_x: Any, support_y: Any, query_x: Any, *, check_values: bool = True
    ) -> Any:
        """Adapt to one support set and return the query outputs (classification: logits
        ``[queries, n]`` for the ``n`` classes of the support set; regression: predictions
        ``[queries, outputs]``).

        ``support_x`` and ``query_x`` are float tensors (or arrays) ``[examples,
        *input_shape]``, prepared as the dataset's episodes are (:meth:`preprocess` does that
        for image files and arrays). ``support_y``: integer labels 0..n-1, every class in the
        support set (prototypes and classifiers are built per class); ``n`` may exceed the
        trained ``ways`` only for a learner that takes any number of ways (MAML and Reptile
        adapt a head of ``context.ways`` outputs). Regression: targets ``[examples,
        outputs]`` (``[examples]`` for one output).

        Refused with one :class:`~fewbench.errors.FewbenchError` line, before the learner
        sees them: a shape other than ``[examples, *input_shape]`` (expected and got, e.g.
        105x105 Omniglot images for a 28x28 model), integer or boolean images, labels that
        are not integers 0..n-1 with each class present, more classes than the learner
        admits, a label or target count other than the support set's, non-finite values.

        With ``check_values`` (image models), each image's mean value per channel is set
        against the training images': the range from the 0.1 to the 99.9 percentile of the
        means of up to 1,024 evenly spaced training images, widened by twice its width on
        either side. When at least half of the support or query images fall outside it, an
        :class:`InputWarning` says so. It catches un-inverted Omniglot drawings (means
        about 0.8 to 1; the training images' lie between about 0.01 and 0.19) and values on
        0..255 for any dataset; it cannot catch what stays within the training images'
        spread (natural images left unnormalised, say): :meth:`preprocess` is the remedy.
        A warning, not an error: legitimate new images may differ from the training data.
        It reads the training split once (``data_root``, as for
        :meth:`evaluate`); without it one warning says the check did not run."""
        import torch

        from fewbench.plugin.dataset import EpisodeBatch

        task = self.context.task_type.name
        if task not in ("classification", "regression"):
            raise FewbenchError(
                f"predict: a {task} model adapts to tasks of its environment, not to given "
                "examples; use model.evaluate()"
            )
        sx = self._examples("support_x", support_x)
        qx = self._examples("query_x", query_x)
        if task == "classification":
            sy, ways = self._labels(support_y, len(sx))
        else:
            sy, ways = self._targets(support_y, len(sx)), self.context.ways
        if check_values:
            self._check_values("support_x", sx)
            self._check_values("query_x", qx)
        query_y = sy.new_zeros((len(qx), *sy.shape[1:]))
        episode = EpisodeBatch(sx[None], sy[None], qx[None], query_y[None], ways)
        with torch.no_grad():
            outputs = self.learner.predict(episode)[0]
        if task == "classification" and outputs.shape[-1] > ways:
            outputs = outputs[..., :ways]  # a fixed head's outputs for absent classes
        return outputs

    def _examples(self, name: str, value: Any) -> Any:
        """``value`` as float32 ``[examples, *input_shape]`` on the device, or one line why not."""
        import torch

        shape = tuple(self.context.input_shape)
        images = len(shape) == 3
        hint = (
            "; model.preprocess(images) prepares image files, PIL images and arrays as "
            f"{self._dataset_name()}'s loader does"
            if images
            else ""
        )
        tensor = _as_tensor(name, value)
        if (
            tensor.dtype == torch.bool
            or tensor.is_complex()
            or (images and not tensor.is_floating_point())
        ):
            raise FewbenchError(
                f"{name}: {str(tensor.dtype).removeprefix('torch.')} values; the model takes "
                "real numbers as its episodes hold them"
                + (" (images as floats, scaled to [0, 1] or normalised)" if images else "")
                + hint
            )
        if tensor.dim() != len(shape) + 1 or tuple(tensor.shape[1:]) != shape:
            raise FewbenchError(
                f"{name}: expected [examples, {_dims(shape)}] (the model's input shape "
                f"{_dims(shape)}, as {self._dataset_name()}'s episodes hold them), got "
                f"{list(tensor.shape)}{hint}"
            )
        if len(tensor) == 0:
            raise FewbenchError(f"{name}: no examples; give at least one")
        bad = ~torch.isfinite(tensor.float())
        if bad.any():
            examples = int(bad.flatten(1).any(dim=1).sum())
            raise FewbenchError(
                f"{name}: {int(bad.sum())} non-finite values (NaN or infinite) in {examples} of "
                f"its {len(tensor)} examples"
            )
        return tensor.to(self.device, torch.float32)

    def _labels(self, value: Any, count: int) -> tuple[Any, int]:
        """Integer labels 0..n-1 for ``count`` support examples, each class present, and n."""
        import torch

        labels = _as_tensor("support_y", value)
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise FewbenchError(
                f"support_y: class labels must be integers 0..n-1, got "
                f"{str(labels.dtype).removeprefix('torch.')} values"
            )
        if tuple(labels.shape) != (count,):
            raise FewbenchError(
                f"support_y: expected {count} labels, one per support example (shape "
                f"[{count}]), got shape {list(labels.shape)}"
            )
        labels = labels.long()
        present = sorted(set(labels.tolist()))
        ways = present[-1] + 1
        if present[0] < 0:
            raise FewbenchError(f"support_y: labels must be 0..n-1, got {present[0]}")
        if len(present) != ways:
            missing = sorted(set(range(ways)) - set(present))
            raise FewbenchError(
                f"support_y: labels must be 0..n-1 with every class in the support set; "
                f"{_listed(missing)} of 0..{ways - 1} {'is' if len(missing) == 1 else 'are'} "
                "missing (each class needs a support example)"
            )
        if ways > self.context.ways and not self._takes_any_ways():
            raise FewbenchError(
                f"support_y: {ways} classes, but this {self.cell.learner.name} model adapts "
                f"a head of {self.context.ways} outputs: labels must be 0..{self.context.ways - 1}"
            )
        return labels.to(self.device), ways

    def _targets(self, value: Any, count: int) -> Any:
        """Regression targets ``[count, outputs]`` (``[count]`` for one output), finite."""
        import torch

        targets = _as_tensor("support_y", value)
        if targets.dtype == torch.bool or targets.is_complex():
            raise FewbenchError(f"support_y: {targets.dtype} targets; expected real numbers")
        outputs = self.context.ways
        if targets.dim() == 1 and outputs == 1:
            targets = targets[:, None]
        if tuple(targets.shape) != (count, outputs):
            raise FewbenchError(
                f"support_y: expected {count} targets of {outputs} output(s), one per support "
                f"example (shape [{count}, {outputs}]), got shape {list(targets.shape)}"
            )
        targets = targets.to(torch.float32)
        if not torch.isfinite(targets).all():
            raise FewbenchError(
                f"support_y: {int((~torch.isfinite(targets)).sum())} non-finite targets "
                "(NaN or infinite)"
            )
        return targets.to(self.device)

    def _takes_any_ways(self) -> bool:
        """Whether the learner's outputs follow the episode's ways (prototypes, a head built
        per episode) rather than a head of ``context.ways`` outputs (MAML, Reptile): asked of
        the learner itself, once, by a tiny episode of fewer ways than it was trained with
        (in range for either kind, on zeros, with torch's random state put back). A model
        trained 1-way, or one the probe fails on, is taken to have a fixed head."""
        import torch

        from fewbench.plugin.dataset import EpisodeBatch

        if self._follows_episode_ways is None:
            trained = self.context.ways
            follows = False
            if trained >= 2:
                ways = 2 if trained >= 3 else 1
                shape = tuple(self.context.input_shape)
                zeros = torch.zeros((ways, *shape), device=self.device)
                labels = torch.arange(ways, device=self.device)
                episode = EpisodeBatch(
                    zeros[None], labels[None], zeros[None, :1], labels[None, :1], ways
                )
                devices = [self.device] if torch.device(self.device).type == "cuda" else []
                try:
                    with torch.random.fork_rng(devices=devices), torch.no_grad():
                        follows = self.learner.predict(episode).shape[-1] == ways
                except Exception:  # noqa: BLE001 - a learner that cannot: a fixed head
                    follows = False
            self._follows_episode_ways = follows
        return self._follows_episode_ways

    # -- is it prepared as the training data was? --------------------------------------------
    def _check_values(self, name: str, images: Any) -> None:
        """Warn when most ``images`` have mean values no training image comes near (see
        :meth:`predict`)."""

        if len(self.context.input_shape) != 3:
            return
        reference = self._value_reference()
        if reference is None:
            return
        low, high = reference
        means = images.float().mean(dim=(2, 3)).cpu()  # [examples, channels]
        width = (high - low).clamp(min=0.025)
        outside = (means < low - VALUE_MARGIN * width) | (means > high + VALUE_MARGIN * width)
        off = int(outside.any(dim=1).sum())
        if 2 * off < len(images):
            return
        given = ", ".join(
            f"{lo:.2f} to {hi:.2f}"
            for lo, hi in zip(
                means.min(dim=0).values.tolist(), means.max(dim=0).values.tolist(), strict=True
            )
        )
        seen = ", ".join(
            f"{lo:.2f} to {hi:.2f}" for lo, hi in zip(low.tolist(), high.tolist(), strict=True)
        )
        warnings.warn(
            f"{name}: {off} of its {len(images)} images have mean values ({given} per channel) "
            f"far from {self._dataset_name()}'s training images' ({seen}): not prepared as "
            "its episodes are (not inverted? values on 0..255? not normalised?); "
            "model.preprocess(images) prepares files, PIL images and arrays as its loader "
            "does (check_values=False: no check)",
            InputWarning,
            stacklevel=3,
        )

    def _value_reference(self) -> tuple[Any, Any] | None:
        """Per channel, the 0.1 and 99.9 percentiles of the mean values of up to
        :data:`VALUE_SAMPLE` evenly spaced training images, scaled and normalised as the
        episodes are; computed once per data root, from the training split on the CPU (loaded
        as :meth:`evaluate` loads it: from the cache ``fewbench run`` built, else building
        it). ``None`` for a dataset not held as a :class:`ClassPool` (generated tasks), or,
        with one warning, when its data is not available."""

        import torch

        from fewbench.plugin.dataset import ClassPool, scale_examples

        root, cache = self._roots(None)
        if (root, cache) in self._references:
            return self._references[root, cache]
        self._references[root, cache] = None
        try:
            _, sources = self._datasets(root, cache, torch.device("cpu")).get(self.cell)
        except (FewbenchError, OSError) as exc:
            warnings.warn(
                f"model.predict cannot check that the images are prepared as "
                f"{self._dataset_name()}'s episodes are: its training images are not available "
                f"({str(exc).splitlines()[0][:200]}); set model.data_root (or $FEWBENCH_DATA), or "
                "give check_values=False",
                InputWarning,
                stacklevel=4,
            )
            return None
        train = sources["train"]
        if not isinstance(train, ClassPool):
            return None
        per_class = train.images.shape[1]
        counts = (
            torch.full((train.num_classes,), per_class) if train.counts is None else train.counts
        )
        ends = counts.cumsum(0)
        total = int(ends[-1])
        picks = min(VALUE_SAMPLE, total)
        flat = torch.arange(picks) * total // picks
        classes = torch.searchsorted(ends, flat, right=True)
        examples = flat - (ends[classes] - counts[classes])
        raw = train.images[classes, examples]
        scaled = scale_examples(raw, len(train.input_shape), train.mean, train.std)
        means = scaled.mean(dim=(2, 3))
        quantiles = torch.tensor(VALUE_QUANTILES)
        low, high = torch.quantile(means, quantiles, dim=0)
        self._references[root, cache] = (low, high)
        return low, high

    # -- the cell's own episodes -------------------------------------------------------------
    def evaluate(
        self,
        data_root: str | Path | None = None,
        *,
        split: str = "test",
        episodes: int | None = None,
    ) -> Any:
        """The per-episode metric on the cell's fixed ``split`` episodes, as the run computed
        it (the same episodes, so the stored values come back exactly). ``data_root``: where
        the dataset is; by default :attr:`data_root`, else as ``fewbench run`` finds it
        (``$FEWBENCH_DATA``, else the user's data folder). A dataset that generates its tasks
        (sinusoid) needs none."""
        import torch

        from fewbench.running.evaluation import EpisodeSpec, dataset_identity, evaluate
        from fewbench.running.worker import source_of_test_episodes

        device = torch.device(self.device)
        datasets = self._datasets(*self._roots(data_root), device)
        dataset, sources = datasets.get(self.cell)
        identity = dataset_identity(
            self.cell.dataset.config(), getattr(dataset, "episode_identity", None)
        )
        source = sources[split]
        if split == "test":  # a cross-domain cell's come from eval.dataset, by the run's rule
            source, identity = source_of_test_episodes(
                self.cell, datasets, sources, identity, self.context.task_type
            )
        count = episodes or (
            self.cell.eval.episodes if split == "test" else self.cell.train.val_episodes
        )
        return evaluate(
            self.learner,
            source,
            EpisodeSpec.of(self.cell, identity, split),
            episodes=count,
            chunk=self.cell.eval.chunk,
            device=device,
            task_type=self.context.task_type,
        )


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def _listed(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:8])
    return shown + (f" and {len(numbers) - 8} more" if len(numbers) > 8 else "")


def _as_tensor(name: str, value: Any) -> Any:
    """``value`` (a tensor, an array, nested lists) as a tensor, or one line why not."""
    import torch

    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FewbenchError(
            f"{name}: not a tensor or array ({type(value).__name__}: {str(exc)[:120]})"
        ) from None
