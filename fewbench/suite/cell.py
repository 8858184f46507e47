"""A cell: one training run of a suite's grid, as a typed value.

This is the bottom layer that the suite expansion, the results store, the
workers and the reports share. A cell's configuration is written once, by the
driver that expands the suite, and read back by id wherever the cell runs; it is
never rebuilt from the suite file there.

The sections of a cell (``tasks``, ``train``, ``eval``) are dataclasses whose
fields carry the suite format's schema (:func:`schema`), so a setting is declared
once: its name, type, default and help.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fewbench.plugin.params import Param

AUGMENTATIONS = ("flip", "crop", "rotate90")  # implemented in fewbench.methods.augment


def _setting(default: Any, **param: Any) -> Any:
    """A section field whose metadata holds the suite's :class:`Param` for it."""
    spec = Param(default, **param)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"param": spec})
    return field(default=default, metadata={"param": spec})


def schema(section: type) -> dict[str, Param]:
    """The suite schema of a section dataclass: ``{key: Param}``, in field order."""
    return {f.name: f.metadata["param"] for f in fields(section)}


@dataclass(frozen=True)
class Tasks:
    """Which episodes a cell trains on. In a suite, ``ways`` and ``shots`` may be lists
    (grid axes); in a cell they are single values."""

    ways: int = _setting(5, type=(int, list), help="classes per episode (an integer or a list)")
    shots: int = _setting(
        1, type=(int, list), help="support examples per class (an integer or a list)"
    )
    query: int = _setting(1, minimum=1, help="query examples per class in training episodes")
    # Training episodes may differ from test episodes (Snell et al. train Omniglot 60-way and
    # test 5- and 20-way). Unset, they are the test episodes' ways and shots and ``query``.
    train_ways: int | None = _setting(
        None,
        type=int,
        nullable=True,
        minimum=1,
        help="classes per training episode (default: ways)",
    )
    train_shots: int | None = _setting(
        None,
        type=int,
        nullable=True,
        minimum=1,
        help="support examples per class in training episodes (default: shots)",
    )
    train_query: int | None = _setting(
        None,
        type=int,
        nullable=True,
        minimum=1,
        help="query examples per class in training episodes (default: query)",
    )

    @property
    def training(self) -> tuple[int, int, int]:
        """Ways, shots and query of the training episodes."""
        return (
            self.train_ways or self.ways,
            self.train_shots or self.shots,
            self.train_query or self.query,
        )


@dataclass(frozen=True)
class TrainSettings:
    iterations: int = _setting(1000, minimum=1, help="training steps (meta-iterations)")
    validate_every: int = _setting(500, minimum=1, help="validate every this many iterations")
    val_episodes: int = _setting(
        100, minimum=0, help="fixed validation episodes (0: keep the last state)"
    )
    log_every: int = _setting(
        50, minimum=1, help="record the training loss every this many iterations"
    )
    checkpoint_every: int = _setting(
        1000, minimum=1, help="write a checkpoint every this many iterations"
    )
    checkpoint_minutes: float = _setting(
        5.0, minimum=0.0, help="and at least this often, in minutes"
    )
    keep_checkpoints: str = _setting(
        "best",
        choices=("best", "none", "all"),
        help="what to keep of a finished cell: its best state, nothing, or everything",
    )
    augment: list[str] = _setting(
        [],
        item_type=str,
        choices=AUGMENTATIONS,
        help="augmentations of training images, batched on the device: flip, crop, rotate90",
    )
    # A cap for smoke runs (``fewbench run --max-iterations N``): applied after every override
    # and after a learner's own iteration count (``Learner.iterations``). Unset, it stays out
    # of the cell's configuration, so cells from before it existed keep their ids.
    max_iterations: int | None = _setting(
        None,
        type=int,
        nullable=True,
        minimum=1,
        help="at most this many training steps, whatever the learner's own count (smoke runs)",
    )


@dataclass(frozen=True)
class EvalSettings:
    episodes: int = _setting(600, minimum=1, help="fixed test episodes")
    query: int = _setting(
        15, minimum=1, help="query examples per class in validation and test episodes"
    )
    seed: int = _setting(0, help="seed of the fixed validation and test episodes")
    chunk: int = _setting(50, minimum=1, help="episodes adapted per call to the learner")
    # Cross-domain evaluation (Chen et al. 2019: train on mini-ImageNet, test on CUB): the test
    # episodes come from this dataset's test split, the training and validation episodes from
    # the cell's dataset. A checked suite holds its full configuration ({name, params}); unset,
    # it stays out of the cell's configuration, so ids from before it existed hold.
    dataset: dict | None = _setting(
        None,
        type=(dict, str),
        nullable=True,
        help="test on this dataset's test classes ({name: ..., its parameters}); "
        "default: the cell's own dataset",
    )


@dataclass(frozen=True)
class PluginChoice:
    """A dataset, backbone or learner of a cell: the plugin's name, every parameter
    (defaults filled in) and the label tables show."""

    name: str
    params: dict[str, Any]
    label: str

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}


# Settings that change how a cell is run but not its results: left out of its id, so
# changing them does not make finished cells run again.
NOT_IN_ID = {
    "train": ("checkpoint_every", "checkpoint_minutes", "keep_checkpoints"),
    "eval": ("chunk",),
}


def cell_id(config: dict[str, Any]) -> str:
    """A stable hash of everything in ``config`` that determines the cell's results."""
    relevant = {
        # Unset later additions (train.max_iterations, eval.dataset: None) are left out, so
        # ids from before they existed hold.
        section: {k: v for k, v in value.items() if k not in NOT_IN_ID[section] and v is not None}
        if section in NOT_IN_ID and isinstance(value, dict)
        else value
        for section, value in config.items()
    }
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Cell:
    """One training run: everything that determines its result, and its identity.

    ``id`` is a hash of :attr:`config` (less the settings in :data:`NOT_IN_ID`),
    stable across runs and machines, so an unchanged cell keeps its id.
    """

    id: str
    label: str
    seed: int
    dataset: PluginChoice
    backbone: PluginChoice
    learner: PluginChoice
    tasks: Tasks
    train: TrainSettings
    eval: EvalSettings

    @property
    def ways(self) -> int:
        return self.tasks.ways

    @property
    def shots(self) -> int:
        return self.tasks.shots

    @property
    def labels(self) -> dict[str, str]:
        """Dataset, backbone and learner as tables show them."""
        return {
            "dataset": self.dataset.label,
            "backbone": self.backbone.label,
            "learner": self.learner.label,
        }

    @property
    def config(self) -> dict[str, Any]:
        """The plain nested form, as stored in the run directory and hashed into the id."""
        return {
            "dataset": self.dataset.config(),
            "backbone": self.backbone.config(),
            "learner": self.learner.config(),
            # Unset training-episode settings stay out, so cells from before they existed
            # keep their ids.
            "tasks": {k: v for k, v in asdict(self.tasks).items() if v is not None},
            "train": {k: v for k, v in asdict(self.train).items() if v is not None},
            "eval": {k: v for k, v in asdict(self.eval).items() if v is not None},
            "seed": self.seed,
        }

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        label: str,
        labels: dict[str, str] | None = None,
        id: str | None = None,
    ) -> Cell:
        """A cell from its plain form; ``id`` defaults to the hash of ``config``."""
        labels = labels or {}

        def choice(section: str) -> PluginChoice:
            params = {k: v for k, v in config[section].items() if k != "name"}
            name = config[section]["name"]
            return PluginChoice(name, params, labels.get(section, name))

        return cls(
            id=id or cell_id(config),
            label=label,
            seed=config["seed"],
            dataset=choice("dataset"),
            backbone=choice("backbone"),
            learner=choice("learner"),
            tasks=Tasks(**config["tasks"]),
            train=TrainSettings(**config["train"]),
            eval=EvalSettings(**config["eval"]),
        )

    def capped(self, max_iterations: int | None = None, max_episodes: int | None = None) -> Cell:
        """This cell for a smoke run: at most ``max_iterations`` training steps and at most
        ``max_episodes`` validation and test episodes. A capped cell is another cell (its
        id differs), so its results never stand in for the full cell's."""
        if max_iterations is None and max_episodes is None:
            return self
        config = self.config
        train, evaluation = dict(config["train"]), dict(config["eval"])
        if max_iterations is not None:
            train["max_iterations"] = min(
                max_iterations, train.get("max_iterations") or max_iterations
            )
        if max_episodes is not None:
            train["val_episodes"] = min(train["val_episodes"], max_episodes)
            evaluation["episodes"] = min(evaluation["episodes"], max_episodes)
        return Cell.from_config(
            {**config, "train": train, "eval": evaluation}, self.label, self.labels
        )

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready record of the cell (for a worker that cannot read the store)."""
        return {"id": self.id, "label": self.label, "labels": self.labels, "config": self.config}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Cell:
        return cls.from_config(record["config"], record["label"], record["labels"], record["id"])
