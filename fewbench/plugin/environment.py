"""The environment contract: distributions of reinforcement-learning tasks as plugins.

An environment plugin (hook ``fewbench_register_environments``) is the reinforcement-
learning counterpart of a dataset: a distribution of tasks (a goal position, a goal
velocity, a direction) and the dynamics to roll policies out in them. In a suite it
stands in a cell's ``datasets`` list, and the core treats its splits as it treats a
dataset's: a training task batch per iteration from a generator seeded by the cell
seed and the iteration, and fixed validation and test tasks, task ``i`` drawn from its
own seeded generator, so every learner meets the same test tasks and results pair.

What flows:

* :class:`TaskBatch`: ``T`` tasks, ``tasks float32[T, task_dim]``, one seed per task,
  and the environment itself (learners roll out through it).
* A **policy** is a callable ``policy(observations[T, N, obs], noise[T, N, act]) ->
  actions[T, N, act]``: ``N`` trajectories of each of ``T`` tasks at once, one
  time step. The environment draws the noise (standard normal) from each task's own
  generator, so a rollout is a function of the task, its seed and ``stream``, not of
  which other tasks share the call (evaluation results do not depend on chunking).
* :class:`Trajectories`: what a rollout returns, padded to the horizon, with a mask
  of the steps taken (navigation episodes end at the goal).

A torch environment implements :meth:`Environment.reset` and :meth:`Environment.step`
on batched state and inherits the rollout loop; an environment stepped elsewhere (the
gymnasium cheetah) overrides :meth:`Environment.rollout`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from fewbench.plugin.dataset import SPLITS, Dataset, EpisodeSource, SplitSize, seeded_generator

Policy = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TaskBatch:
    """``T`` tasks of one environment: parameters ``float32[T, task_dim]`` and one seed
    per task (``int64[T]``), from which every random draw of a rollout in that task comes."""

    tasks: Tensor
    seeds: Tensor
    environment: Environment

    def __len__(self) -> int:
        return self.tasks.shape[0]

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(self.tasks.to(device), self.seeds, self.environment)

    @staticmethod
    def concat(parts: list[TaskBatch]) -> TaskBatch:
        return TaskBatch(
            torch.cat([p.tasks for p in parts]),
            torch.cat([p.seeds for p in parts]),
            parts[0].environment,
        )

    @property
    def query_y(self) -> Tensor:
        """The tasks: what a reinforcement-learning metric is computed "against" (the core's
        evaluation passes ``query_y``; the return needs nothing from it)."""
        return self.tasks

    def generators(self, stream: Any) -> list[torch.Generator]:
        """One generator per task for the rollouts of ``stream`` (a phase such as
        ``("adapt", 0)``): the same task, seed and stream give the same draws."""
        return [seeded_generator("rollout", int(seed), stream) for seed in self.seeds]


@dataclass
class Trajectories:
    """``N`` trajectories of each of ``T`` tasks, ``H`` steps (the horizon), padded.

    ``observations float32[T, N, H, obs]`` (what the policy saw), ``actions
    float32[T, N, H, act]`` (what it chose, before the environment's clipping),
    ``rewards float32[T, N, H]`` and ``mask float32[T, N, H]`` (1 for steps taken,
    0 after an episode ended)."""

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor

    @property
    def returns(self) -> Tensor:
        """Undiscounted return of each trajectory, ``[T, N]``."""
        return (self.rewards * self.mask).sum(dim=-1)

    @property
    def average_return(self) -> Tensor:
        """Each task's mean undiscounted return over its trajectories, ``[T]``."""
        return self.returns.mean(dim=-1)


class Environment(Dataset):
    """Base class of environment plugins: a task distribution and its dynamics.

    Class attributes as for every plugin (``name``, ``description``, ``params``), and
    ``task_dim``, ``observation_dim``, ``action_dim``, ``horizon`` (those may depend on
    parameters: set them in ``__init__`` after calling ``super().__init__``)."""

    kind: ClassVar[str] = "environment"
    task_type: ClassVar[str] = "reinforcement"
    needs_files: ClassVar[bool] = False
    # Parameters that change the tasks drawn (the rest, such as worker counts, do not):
    # they, with the name, seed the fixed validation and test tasks. None: all of them.
    episode_identity: ClassVar[tuple[str, ...] | None] = None
    # An extra the environment needs (``pip install 'fewbench[rl]'``), named in its errors.
    extra: ClassVar[str] = ""

    task_dim: int = 1
    observation_dim: int = 1
    action_dim: int = 1
    horizon: int = 100

    # -- the task distribution ---------------------------------------------------------------
    def sample_tasks(self, count: int, generator: torch.Generator) -> Tensor:
        """``float32[count, task_dim]`` tasks drawn with ``generator`` (on the CPU)."""
        self.not_implemented("sample_tasks")

    def task_features(self, tasks: Tensor) -> Tensor:
        """What an oracle policy sees of each task, ``[T, task_dim]``: the task itself."""
        return tasks

    # -- dynamics: batched torch environments implement these two --------------------------
    def reset(self, tasks: Tensor, generators: list[torch.Generator], trajectories: int) -> Any:
        """The start state of ``trajectories`` episodes in each task (any structure)."""
        self.not_implemented("reset")

    def observe(self, state: Any) -> Tensor:
        """``float32[T, N, obs]``: what the policy sees of the state."""
        self.not_implemented("observe")

    def step(self, state: Any, actions: Tensor, tasks: Tensor) -> tuple[Any, Tensor, Tensor]:
        """One step of every episode: (next state, reward ``[T, N]``, done ``bool[T, N]``)."""
        self.not_implemented("step")

    # -- rollouts -------------------------------------------------------------------------
    def rollout(
        self,
        policy: Policy,
        batch: TaskBatch,
        trajectories: int,
        *,
        stream: Any = 0,
        observe_task: bool = False,
    ) -> Trajectories:
        """Roll ``policy`` out for ``trajectories`` episodes of each task of ``batch``.

        ``observe_task`` appends :meth:`task_features` to every observation (the oracle).
        The policy's noise and the environment's own randomness come from
        ``batch.generators(stream)``; the tensors are on ``batch.tasks.device``."""
        tasks, device = batch.tasks, batch.tasks.device
        generators = batch.generators(stream)
        noise = self.noise(generators, trajectories).to(device)
        state = self.reset(tasks, generators, trajectories)
        alive = torch.ones(len(batch), trajectories, device=device)
        observations, actions, rewards, masks = [], [], [], []
        for t in range(self.horizon):
            seen = self.with_task(self.observe(state), tasks, observe_task)
            action = policy(seen, noise[:, :, t])
            state, reward, done = self.step(state, action, tasks)
            observations.append(seen)
            actions.append(action)
            rewards.append(reward * alive)
            masks.append(alive)
            alive = alive * (~done).float()
        return Trajectories(
            torch.stack(observations, dim=2),
            torch.stack(actions, dim=2),
            torch.stack(rewards, dim=2),
            torch.stack(masks, dim=2),
        )

    def noise(self, generators: list[torch.Generator], trajectories: int) -> Tensor:
        """The policy's standard-normal noise, ``[T, N, H, act]``, each task's from its own
        generator (drawn first, before the environment's own draws)."""
        shape = (trajectories, self.horizon, self.action_dim)
        return torch.stack([torch.randn(shape, generator=g) for g in generators])

    def with_task(self, observations: Tensor, tasks: Tensor, observe_task: bool) -> Tensor:
        if not observe_task:
            return observations
        features = self.task_features(tasks)[:, None, :].expand(*observations.shape[:2], -1)
        return torch.cat([observations, features.to(observations)], dim=-1)

    def observation_size(self, observe_task: bool = False) -> int:
        return self.observation_dim + (self.task_dim if observe_task else 0)

    # -- as a dataset in a suite's grid ----------------------------------------------------
    def check_available(self, root: Path) -> None:
        """Raise fewbench's one-line error when what the environment needs is missing."""

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        """Nothing to count (task distributions are not finite, so no split limits what a
        suite asks for); but what the environment needs is checked here, before training."""
        self.check_available(root)
        return {}

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        """The same distribution for every split; fixed validation and test tasks come from
        the core's per-task seeded generators, as test episodes do."""
        self.check_available(root)
        return {split: TaskDistribution(self) for split in SPLITS}


class TaskDistribution(EpisodeSource):
    """An environment's tasks as the core's training loop and evaluation draw them."""

    def __init__(self, environment: Environment):
        self.environment = environment
        self.input_shape = (environment.observation_dim,)
        self.num_classes = 0
        self.device = torch.device("cpu")

    def sample_episodes(
        self, count: int, ways: int, shots: int, query: int, generator: torch.Generator
    ) -> TaskBatch:
        """``count`` tasks (``ways``, ``shots`` and ``query`` mean nothing here)."""
        tasks = self.environment.sample_tasks(count, generator)
        seeds = torch.randint(0, 2**62, (count,), generator=generator)
        return TaskBatch(tasks.to(self.device), seeds, self.environment)

    def to(self, device: torch.device | str) -> TaskDistribution:
        moved = TaskDistribution(self.environment)
        moved.device = torch.device(device)
        return moved
