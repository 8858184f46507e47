"""Fixed episodes and the per-episode metric.

Episode ``i`` of a split is drawn from its own generator, seeded from
(dataset identity, split, ways, shots, query, eval seed, i). So every learner
and backbone of a suite, in any run and in any chunking, sees exactly the same
validation and test episodes, and their per-episode results can be paired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fewbench.errors import FewbenchError
from fewbench.plugin.dataset import EpisodeBatch, EpisodeSource, seeded_generator
from fewbench.plugin.learner import Learner
from fewbench.plugin.task_types import CLASSIFICATION, TaskType
from fewbench.suite.cell import Cell


def dataset_identity(
    dataset_config: dict[str, Any], identity_params: tuple[str, ...] | None
) -> tuple:
    """What fixes the episodes of a dataset: its name and the parameters that choose classes.

    Parameters such as the image size change how examples look, not which
    examples an episode holds, so a dataset may leave them out.
    """
    keys = sorted(k for k in dataset_config if k != "name")
    if identity_params is not None:
        keys = [k for k in keys if k in identity_params]
    return (dataset_config["name"], *((k, dataset_config[k]) for k in keys))


@dataclass(frozen=True)
class EpisodeSpec:
    """Which fixed sequence of episodes: dataset identity, split, N-way K-shot, query, seed."""

    identity: tuple
    split: str
    ways: int
    shots: int
    query: int
    seed: int

    @classmethod
    def of(cls, cell: Cell, identity: tuple, split: str) -> EpisodeSpec:
        """The validation or test episodes of a cell."""
        return cls(identity, split, cell.ways, cell.shots, cell.eval.query, cell.eval.seed)

    def generator(self, index: int) -> torch.Generator:
        return seeded_generator(
            "episode",
            self.identity,
            self.split,
            self.ways,
            self.shots,
            self.query,
            self.seed,
            index,
        )


def fixed_episodes(
    source: EpisodeSource, spec: EpisodeSpec, start: int, count: int
) -> EpisodeBatch:
    """Episodes ``start .. start+count-1`` of the fixed sequence ``spec``."""
    parts = [
        source.sample_episodes(1, spec.ways, spec.shots, spec.query, spec.generator(index))
        for index in range(start, start + count)
    ]
    return type(parts[0]).concat(parts)  # EpisodeBatch, or an environment's TaskBatch


def evaluate(
    learner: Learner,
    source: EpisodeSource,
    spec: EpisodeSpec,
    *,
    episodes: int,
    chunk: int,
    device: torch.device,
    task_type: TaskType = CLASSIFICATION,
) -> np.ndarray:
    """Adapt to each fixed episode and return the per-episode metric of ``task_type``."""
    return evaluate_with_extras(
        learner, source, spec, episodes=episodes, chunk=chunk, device=device, task_type=task_type
    )[0]


def evaluate_with_extras(
    learner: Learner,
    source: EpisodeSource,
    spec: EpisodeSpec,
    *,
    episodes: int,
    chunk: int,
    device: torch.device,
    task_type: TaskType = CLASSIFICATION,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """:func:`evaluate`, and the task type's further per-episode values by name
    (:attr:`fewbench.plugin.task_types.TaskType.episode_extras`; none for classification)."""
    values: list[torch.Tensor] = []
    extras: dict[str, list[torch.Tensor]] = {}
    for start in range(0, episodes, chunk):
        batch = fixed_episodes(source, spec, start, min(chunk, episodes - start)).to(device)
        outputs = learner.predict(batch)
        if isinstance(outputs, torch.Tensor) and not bool(torch.isfinite(outputs).all()):
            # Non-finite predictions score as a constant (chance): a failed cell, not a result.
            raise FewbenchError(
                f"the model's predictions on test episodes {start} to "
                f"{start + len(batch) - 1} are not finite (NaN or infinite); a setting is "
                "out of range (a learning rate, a weight decay) or the model diverged"
            )
        values.append(task_type.episode_metric(outputs, batch.query_y).detach().cpu())
        if task_type.episode_extras is not None:
            for name, value in task_type.episode_extras(outputs).items():
                extras.setdefault(name, []).append(value.detach().cpu())

    def as_array(parts: list[torch.Tensor]) -> np.ndarray:
        return torch.cat(parts).numpy().astype(np.float64)

    return as_array(values), {name: as_array(parts) for name, parts in extras.items()}
