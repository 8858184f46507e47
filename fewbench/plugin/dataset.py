"""The dataset contract: what a dataset plugin hands the core, and episode sampling.

A dataset plugin turns its files into one :class:`EpisodeSource` per split
(``train``, ``val``, ``test``). The core never looks inside: it asks a source for
meta-batches of episodes or for batches of labelled examples. Image datasets use
:class:`ClassPool`, which holds every example of a split in one uint8 tensor of
shape ``[classes, examples, *image]`` and draws episodes by index arithmetic, so
no per-image Python work happens while training. A task-generating dataset (for
example sinusoid regression) implements :class:`EpisodeSource` directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from fewbench.plugin.base import Plugin, not_implemented_error
from fewbench.plugin.task_types import CLASSIFICATION, TaskType

SPLITS = ("train", "val", "test")


@dataclass
class EpisodeBatch:
    """``T`` episodes stacked along the first dimension; labels are 0..ways-1 within each."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int
    # Where the episodes' examples are, when a ClassPool drew them: the pool and the indices
    # it gathered (a frozen backbone's features can then be looked up instead of computed:
    # fewbench.data.feature_cache). None for episodes built otherwise (a user's own).
    origin: Any = field(default=None, repr=False, compare=False)
    indices: EpisodeIndices | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> EpisodeBatch:
        return EpisodeBatch(
            self.support_x.to(device, non_blocking=True),
            self.support_y.to(device, non_blocking=True),
            self.query_x.to(device, non_blocking=True),
            self.query_y.to(device, non_blocking=True),
            self.ways,
            self.origin,
            self.indices,
        )

    @staticmethod
    def concat(parts: list[EpisodeBatch]) -> EpisodeBatch:
        origin = parts[0].origin
        traced = all(p.origin is origin and p.indices is not None for p in parts)
        indices = (
            EpisodeIndices(
                torch.cat([p.indices.classes.cpu() for p in parts]),
                torch.cat([p.indices.examples.cpu() for p in parts]),
            )
            if traced and origin is not None
            else None
        )
        return EpisodeBatch(
            torch.cat([p.support_x for p in parts]),
            torch.cat([p.support_y for p in parts]),
            torch.cat([p.query_x for p in parts]),
            torch.cat([p.query_y for p in parts]),
            parts[0].ways,
            origin if indices is not None else None,
            indices,
        )


@dataclass(frozen=True)
class EpisodeIndices:
    """Which examples ``T`` episodes hold: ``classes[T, N]`` of the split and, per class,
    ``examples[T, N, K+Q]`` (support first). Drawn on the CPU, gathered on the device."""

    classes: Tensor
    examples: Tensor

    def to(self, device: torch.device | str) -> EpisodeIndices:
        return EpisodeIndices(
            self.classes.to(device, non_blocking=True), self.examples.to(device, non_blocking=True)
        )


@dataclass
class LabelledBatch:
    """Ordinary supervised examples drawn from all classes of a split."""

    x: Tensor
    y: Tensor

    def to(self, device: torch.device | str) -> LabelledBatch:
        return LabelledBatch(
            self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True)
        )


@dataclass(frozen=True)
class SplitSize:
    """How many classes a split has and how many examples the smallest class has."""

    classes: int
    examples_per_class: int


class EpisodeSource:
    """One split of a dataset, as the core consumes it."""

    input_shape: tuple[int, ...]
    num_classes: int

    def sample_episodes(
        self, count: int, ways: int, shots: int, query: int, generator: torch.Generator
    ) -> EpisodeBatch:
        raise NotImplementedError

    def sample_labelled(self, batch_size: int, generator: torch.Generator) -> LabelledBatch:
        raise NotImplementedError(f"{type(self).__name__} cannot give labelled batches")

    def labelled_in_order(self, batch_size: int) -> Iterator[LabelledBatch]:
        """Every example of the split once, class by class, in batches of at most
        ``batch_size``: what a statistic over the whole training split needs (SimpleShot's
        base-class mean), where :meth:`sample_labelled` would draw with replacement."""
        raise NotImplementedError(f"{type(self).__name__} cannot give its examples in order")

    def to(self, device: torch.device | str) -> EpisodeSource:
        return self


def scale_examples(
    raw: Tensor, example_dims: int, mean: Tensor | None = None, std: Tensor | None = None
) -> Tensor:
    """uint8 examples ``[..., *shape]`` (``shape`` of ``example_dims`` axes, channels first) as
    episodes hold them: scaled to [0, 1], then, with ``mean`` and ``std`` (one value per
    channel, on the [0, 1] scale), normalised. The one scaling :class:`ClassPool` and
    :meth:`Dataset.preprocess` share, so a user's prepared images cannot drift from the
    episodes'."""
    scaled = raw.float().div_(255.0)
    if mean is None:
        return scaled
    shape = (-1,) + (1,) * (example_dims - 1)  # per channel
    return scaled.sub_(mean.to(scaled.device).view(shape)).div_(std.to(scaled.device).view(shape))


class ClassPool(EpisodeSource):
    """A split held as ``uint8[classes, examples, *shape]``, scaled to [0, 1] on sampling.

    ``mean`` and ``std`` (one value per channel, on the [0, 1] scale) normalise the
    images after scaling; natural-image datasets pass their training classes'
    statistics. ``images`` may be backed by a memory-mapped file: only the examples
    an episode draws are read.
    """

    def __init__(
        self,
        images: Tensor,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        counts: Tensor | None = None,
    ):
        if images.dtype != torch.uint8 or images.dim() < 3:
            raise ValueError("ClassPool expects uint8[classes, examples, *shape]")
        self.images = images
        self.num_classes = images.shape[0]
        # ``counts``: classes of different sizes, padded to the largest; only the first
        # ``counts[c]`` examples of class ``c`` are ever drawn.
        self.counts = counts
        self.examples_per_class = images.shape[1] if counts is None else int(counts.min())
        self.input_shape = tuple(images.shape[2:])
        self.mean, self.std = mean, std

    def to(self, device: torch.device | str) -> ClassPool:
        if self.images.device == torch.device(device):
            return self
        # The statistics go along, so scaling copies nothing from the host (graph capture).
        mean = None if self.mean is None else self.mean.to(device)
        std = None if self.std is None else self.std.to(device)
        return ClassPool(self.images.to(device), mean, std, self.counts)

    def _scale(self, raw: Tensor) -> Tensor:
        return scale_examples(raw, len(self.input_shape), self.mean, self.std)

    def sample_episodes(
        self, count: int, ways: int, shots: int, query: int, generator: torch.Generator
    ) -> EpisodeBatch:
        return self.gather(self.draw(count, ways, shots, query, generator), shots)

    def draw(
        self, count: int, ways: int, shots: int, query: int, generator: torch.Generator
    ) -> EpisodeIndices:
        """Which examples ``count`` episodes hold, drawn on the CPU (see :meth:`gather`)."""
        per_class = shots + query
        available, kind = self.episode_classes
        if ways > available or per_class > self.examples_per_class:
            raise ValueError(
                f"cannot draw {ways}-way episodes with {per_class} examples per class from "
                f"{available} {kind} of {self.examples_per_class} examples"
            )
        classes = self.draw_classes(count, ways, generator)
        stored = self.images.shape[1]
        examples = torch.rand(count, ways, stored, generator=generator)
        if self.counts is not None:  # padding sorts last, so it is never drawn
            padding = torch.arange(stored)[None, None, :] >= self.counts[classes][:, :, None]
            examples = examples.masked_fill(padding, 2.0)
        return EpisodeIndices(classes, examples.argsort(dim=2)[:, :, :per_class])

    @property
    def episode_classes(self) -> tuple[int, str]:
        """How many distinct classes an episode can hold, and what they are (for errors)."""
        return self.num_classes, "classes"

    def draw_classes(self, count: int, ways: int, generator: torch.Generator) -> Tensor:
        """``classes[count, ways]``: each episode's classes, without replacement. A pool whose
        episodes pick classes another way (Omniglot's split finn) overrides this alone."""
        # Random keys + argsort draw classes (and examples) without replacement, batched.
        return torch.rand(count, self.num_classes, generator=generator).argsort(dim=1)[:, :ways]

    def gather(self, indices: EpisodeIndices, shots: int) -> EpisodeBatch:
        """The episodes ``indices`` name, built where the images are.

        Nothing here reads a value back to the host, so a CUDA graph can capture it with
        the indices in a static device buffer (:mod:`fewbench.methods.cuda_graphs`)."""
        classes, examples = indices.classes, indices.examples
        count, ways, per_class = examples.shape
        query = per_class - shots
        device = self.images.device
        picked = self.images[
            classes.to(device)[:, :, None], examples.to(device)
        ]  # [T, N, K+Q, *shape]
        picked = self._scale(picked)
        support = picked[:, :, :shots].reshape(count, ways * shots, *self.input_shape)
        query_x = picked[:, :, shots:].reshape(count, ways * query, *self.input_shape)
        # Labels by arithmetic (0,0,..,1,1,..): no host-dependent output size.
        support_y = torch.arange(ways * shots, device=device) // shots
        query_y = torch.arange(ways * query, device=device) // max(query, 1)
        return EpisodeBatch(
            support,
            support_y.expand(count, -1).contiguous(),
            query_x,
            query_y.expand(count, -1).contiguous(),
            ways,
            self,
            indices,
        )

    def sample_labelled(self, batch_size: int, generator: torch.Generator) -> LabelledBatch:
        if self.counts is None:
            flat = torch.randint(
                self.num_classes * self.examples_per_class, (batch_size,), generator=generator
            )
            classes = flat // self.examples_per_class
            examples = flat % self.examples_per_class
        else:  # every stored example equally likely, whatever its class's size
            ends = self.counts.cumsum(0)
            flat = torch.randint(int(ends[-1]), (batch_size,), generator=generator)
            classes = torch.searchsorted(ends, flat, right=True)
            examples = flat - (ends[classes] - self.counts[classes])
        device = self.images.device
        x = self._scale(self.images[classes.to(device), examples.to(device)])
        return LabelledBatch(x, classes.to(device))

    def labelled_in_order(self, batch_size: int) -> Iterator[LabelledBatch]:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        stored = self.images.shape[1]
        counts = (
            torch.full((self.num_classes,), stored) if self.counts is None else self.counts.cpu()
        )
        classes = torch.repeat_interleave(torch.arange(self.num_classes), counts)
        starts = counts.cumsum(0) - counts
        examples = torch.arange(len(classes)) - starts[classes]
        device = self.images.device
        for begin in range(0, len(classes), batch_size):
            picked_classes = classes[begin : begin + batch_size].to(device)
            picked = examples[begin : begin + batch_size].to(device)
            yield LabelledBatch(self._scale(self.images[picked_classes, picked]), picked_classes)


class Dataset(Plugin):
    """Base class of dataset plugins.

    Subclasses set ``name``, ``description`` and ``params`` and implement
    :meth:`split_sizes` (cheap: used to validate a suite before anything trains)
    and :meth:`load`.

    Files: a dataset lives in ``<data root>/<folder>``. Declaring ``resources``
    (URL, file name, MD5, where it goes) is all a plugin needs for ``fewbench data
    download`` and ``import`` to fetch, check, unpack and install it atomically;
    :meth:`verify` says what is wrong with a folder (missing classes, wrong counts),
    and ``how_to_get`` tells a user what to do when nothing can be downloaded.
    A dataset that generates its tasks sets ``needs_files = False``.

    A user's own examples: an image dataset implements :meth:`decode_examples` with the
    function its loader decodes each file with, and :meth:`preprocess` (what
    ``TrainedModel.preprocess`` calls) adds the episodes' scaling and normalisation, so a
    trained model's inputs are prepared as its episodes were, by the same code.
    """

    kind: ClassVar[str] = "dataset"
    task_type: ClassVar[TaskType | str] = CLASSIFICATION  # fewbench.plugin.task_types
    folder: ClassVar[str] = ""  # under the data root; the name when empty
    resources: ClassVar[tuple[Any, ...]] = ()  # fewbench.data.download.Resource
    how_to_get: ClassVar[str] = ""
    needs_files: ClassVar[bool] = True
    # Only test classes (a cross-domain target: BSCD-FSL's); its load gives a "test" split
    # alone, and a suite that trains on it is refused before anything runs.
    test_only: ClassVar[bool] = False

    @classmethod
    def folder_name(cls) -> str:
        return cls.folder or cls.name

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        """Problems with an installed folder (empty when it looks complete)."""
        return [] if folder.is_dir() else [f"{folder} does not exist"]

    @classmethod
    def builds_from(cls, source: Path) -> bool:
        """Whether ``fewbench data import`` is given a source this dataset is *built* from
        rather than a copy of it (mini-ImageNet from ILSVRC-2012's training images); cheap."""
        return False

    @classmethod
    def build_from(cls, source: Path, folder: Path) -> None:
        """Build the dataset's files in the empty ``folder`` from ``source`` (one
        :meth:`builds_from` accepts); the core then verifies the folder and moves it into
        place, or removes it, so a failure leaves nothing installed."""
        raise not_implemented_error(cls, "build_from")

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        self.not_implemented("split_sizes")

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        self.not_implemented("load")

    # -- a user's own examples (``TrainedModel.preprocess``) -----------------------------------
    def decode_examples(self, examples: Sequence[Any]) -> Tensor:
        """A user's raw examples as :meth:`load` stores its own: uint8 ``[N, *shape]``.

        ``examples`` are file paths, PIL images or arrays ``H x W (x C)`` (uint8 0..255, or
        floats 0..1). An image dataset implements it with the very function its loader
        decodes each file with (resizing, colour conversion, inversion), so the two cannot
        drift; the scaling and normalisation that follow are :meth:`preprocess`'s. A
        dataset that generates its tasks has no raw form and leaves it out."""
        self.not_implemented(
            "decode_examples", "it has no raw examples to prepare; give predict tensors"
        )

    def normalization(self, root: Path, cache_dir: Path) -> tuple[Tensor, Tensor] | None:
        """The per-channel ``(mean, std)`` its episodes are normalised with, on [0, 1], or
        ``None`` when they are only scaled to [0, 1].

        By default, those of the training split that :meth:`load` builds (from ``root``
        and ``cache_dir``): the statistics of the episodes themselves. A dataset that never
        normalises returns ``None`` without reading its data, so that preparing images
        needs no installed copy."""
        train = self.load(root, cache_dir)["train"]
        mean, std = getattr(train, "mean", None), getattr(train, "std", None)
        return None if mean is None or std is None else (mean, std)

    def preprocess(self, examples: Sequence[Any], root: Path, cache_dir: Path) -> Tensor:
        """A user's raw examples as this dataset's test episodes hold them: float32
        ``[N, *shape]``, through :meth:`decode_examples` and the scaling and normalisation
        of :class:`ClassPool` (:func:`scale_examples`) with :meth:`normalization`'s
        statistics: the test-time transform, with nothing copied from it."""
        raw = self.decode_examples(examples)
        statistics = self.normalization(root, cache_dir)
        mean, std = statistics if statistics is not None else (None, None)
        return scale_examples(raw, raw.dim() - 1, mean, std)

    # -- naming examples (``fewbench episodes export``) ----------------------------------------
    def example_ids(self, root: Path, split: str) -> list[list[str]] | None:
        """What stands behind each example of ``split``, in :meth:`load`'s order: ``ids[c][e]``
        names example ``e`` of class ``c`` as text another program can find it by (an image
        file's path relative to ``root``, with what makes the class, such as a rotation).

        An episode manifest (:mod:`fewbench.episodes`) lists these, so that a method outside
        fewbench can run on fewbench's own test episodes. ``None`` (the default): not
        available; a manifest then names examples by class and example index only."""
        return None


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (same on every machine and run)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(*parts: Any) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*parts))
    return generator
