"""A setting's fixed test episodes drawn again from the data, exactly as evaluation draws
them, with the names and image hashes a manifest holds.

Evaluation draws episode ``i`` with ``source.sample_episodes(1, ways, shots, query,
spec.generator(i))`` (:func:`fewbench.running.evaluation.fixed_episodes`), which for an image
dataset is :meth:`~fewbench.plugin.dataset.ClassPool.draw` followed by ``gather``. Here the
same ``draw`` runs with the same generator, so the indices are the ones evaluation gathered,
and nothing else (no learner, no device) is involved. Labels follow ``gather``: the ``j``-th
class of an episode is label ``j``, support first, class by class, then the query examples
in the same order, so query index ``q`` is the ``q``-th query image evaluation scored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fewbench.errors import FewbenchError
from fewbench.plugin.dataset import ClassPool, EpisodeIndices
from fewbench.plugin.task_types import CLASSIFICATION, task_type_of
from fewbench.registry import Registry
from fewbench.running.evaluation import EpisodeSpec, dataset_identity

SPLIT = "test"  # the episodes a cell's result is measured on
EXAMPLE_HASH_LENGTH = 16  # hex digits of each example's image hash: enough to tell files apart


@dataclass(frozen=True)
class EpisodeSetting:
    """What fixes a sequence of test episodes: the test dataset's configuration (``{name,
    **params}``, as cells store it), N-way K-shot, query examples per class, the evaluation
    seed, and how many episodes."""

    dataset: dict[str, Any]
    ways: int
    shots: int
    query: int
    seed: int
    episodes: int

    def describe(self, label: str | None = None) -> str:
        """``omniglot 5-way 1-shot (15 query, seed 0, 600 episodes)``; ``label``: the
        dataset's label in reports, for its name."""
        return (
            f"{label or self.dataset['name']} {self.ways}-way {self.shots}-shot ({self.query} query, "
            f"seed {self.seed}, {self.episodes} episodes)"
        )


@dataclass(frozen=True)
class DrawnEpisodes:
    """The episodes of a setting as this data root gives them."""

    setting: EpisodeSetting
    identity: tuple
    pool: ClassPool
    indices: list[EpisodeIndices]  # per episode: classes [1, N], examples [1, N, K+Q]
    ids: list[list[str]] | None  # Dataset.example_ids of the split; None: indices only

    def identifier(self, c: int, e: int) -> str:
        """Example ``e`` of class ``c``: the dataset's name for it, else ``"c:e"``."""
        return self.ids[c][e] if self.ids is not None else f"{c}:{e}"

    def episode(self, index: int) -> dict[str, Any]:
        """Episode ``index`` as a manifest lists it: its classes and (label, identifier)
        pairs, support then query, in the order evaluation stacks them."""
        classes = self.indices[index].classes[0].tolist()
        examples = self.indices[index].examples[0].tolist()
        shots = self.setting.shots

        def pairs(part: slice) -> list[list[Any]]:
            return [
                [label, self.identifier(c, e)]
                for label, (c, row) in enumerate(zip(classes, examples, strict=True))
                for e in row[part]
            ]

        return {
            "classes": classes,
            "support": pairs(slice(0, shots)),
            "query": pairs(slice(shots, None)),
        }

    def used_classes(self) -> list[int]:
        return sorted({c for i in self.indices for c in i.classes[0].tolist()})

    def class_list_sha256(self) -> str | None:
        """A hash of the split's classes, each with its examples' names (None without names)."""
        return None if self.ids is None else sha256_text(canonical_json(self.ids))

    def images_sha256(self) -> str:
        """A hash of the decoded uint8 images of every class the episodes use (all their
        examples, classes in index order): what the episodes are made of, pixel for pixel."""
        images = self.pool.images
        digest = hashlib.sha256(repr((tuple(images.shape[1:]), str(images.dtype))).encode())
        for c in self.used_classes():
            digest.update(c.to_bytes(8, "little"))
            digest.update(images[c].contiguous().numpy().tobytes())
        return digest.hexdigest()

    def example_sha256(self) -> dict[str, str]:
        """Each example the episodes hold, by identifier: a short hash of its decoded image,
        so that a data root whose files differ is refused naming the file."""
        images, found = self.pool.images, {}
        for i in self.indices:
            for c, row in zip(i.classes[0].tolist(), i.examples[0].tolist(), strict=True):
                for e in row:
                    name = self.identifier(c, e)
                    if name not in found:
                        pixels = images[c, e].contiguous().numpy().tobytes()
                        found[name] = hashlib.sha256(pixels).hexdigest()[:EXAMPLE_HASH_LENGTH]
        return dict(sorted(found.items()))


def canonical_json(value: Any) -> str:
    """The one text of a JSON value that hashes are taken over: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def as_json(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), for comparing with a manifest."""
    return json.loads(json.dumps(value))


def build_dataset(config: dict[str, Any], registry: Registry) -> Any:
    """The dataset plugin a stored dataset configuration (``name`` and parameters) names."""
    params = {k: v for k, v in config.items() if k != "name"}
    return registry.get("dataset", config["name"]).build(**params)


def load_split(dataset: Any, data_root: Path, cache_dir: Path, split: str = SPLIT) -> Any:
    return dataset.load(Path(data_root), Path(cache_dir))[split]


def drawn_by_class_pool(source: Any, *, classes_first: bool = False) -> bool:
    """Whether ``source`` draws its episodes as :class:`ClassPool` does, so that they can be
    drawn again here: its ``sample_episodes`` is ClassPool's; with ``classes_first``, its
    ``draw`` too (then :meth:`ClassPool.draw_classes` gives an episode's classes alone)."""
    if not isinstance(source, ClassPool):
        return False
    kind = type(source)
    if kind.sample_episodes is not ClassPool.sample_episodes:
        return False
    return not classes_first or kind.draw is ClassPool.draw


def draw_episodes(
    setting: EpisodeSetting, data_root: Path, cache_dir: Path, registry: Registry | None = None
) -> DrawnEpisodes:
    """Load the setting's test split from ``data_root`` and draw its episodes as evaluation
    does. A dataset whose episodes are not drawn by :class:`ClassPool` (one that generates
    its tasks) has no examples to name, and is refused."""
    registry = registry or Registry()
    config = setting.dataset
    name = config["name"]
    dataset = build_dataset(config, registry)
    if task_type_of(dataset.task_type).name != CLASSIFICATION.name:
        raise FewbenchError(
            f"dataset {name}: its tasks are {task_type_of(dataset.task_type).name}, not "
            "classification; episode manifests name the examples of classification episodes"
        )
    source = dataset.load(Path(data_root), Path(cache_dir)).get(SPLIT)
    if not drawn_by_class_pool(source):
        raise FewbenchError(
            f"dataset {name}: its episodes are not drawn from a pool of stored examples "
            "(fewbench.plugin.ClassPool), so they have no examples a manifest could name"
        )
    identity = dataset_identity(config, getattr(dataset, "episode_identity", None))
    spec = EpisodeSpec(identity, SPLIT, setting.ways, setting.shots, setting.query, setting.seed)
    try:
        indices = [
            source.draw(1, setting.ways, setting.shots, setting.query, spec.generator(i))
            for i in range(setting.episodes)
        ]
    except ValueError as exc:  # more ways or examples than the split has
        raise FewbenchError(f"dataset {name}, {SPLIT} split: {exc}") from None
    ids = dataset.example_ids(Path(data_root), SPLIT)
    if ids is not None and [len(row) for row in ids] != _stored_counts(source):
        raise FewbenchError(
            f"dataset {name}: example_ids names {len(ids)} classes of "
            f"{sorted({len(row) for row in ids})} examples, but its {SPLIT} split holds "
            f"{source.num_classes} classes of {sorted(set(_stored_counts(source)))} "
            "(a bug in the plugin)"
        )
    return DrawnEpisodes(setting, identity, source, indices, ids)


def _stored_counts(pool: ClassPool) -> list[int]:
    """How many examples each class of ``pool`` really holds (padding left out)."""
    if pool.counts is None:
        return [pool.images.shape[1]] * pool.num_classes
    return [int(n) for n in pool.counts]
