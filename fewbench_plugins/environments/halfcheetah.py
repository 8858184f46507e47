"""Half-cheetah goal velocity and goal direction (Finn, Abbeel & Levine 2017, section 5.3).

"To study how well MAML can scale to more complex deep RL problems, we also study
adaptation on high-dimensional locomotion tasks with the MuJoCo simulator [...] In
the goal velocity experiments, the reward is the negative absolute value between the
current velocity of the agent and a goal, which is chosen uniformly at random between
0.0 and 2.0 for the cheetah [...] In the goal direction experiments, the reward is
the magnitude of the velocity in either the forward or backward direction, chosen at
random for each task [...] The horizon is H = 200" (Finn et al. 2017, section 5.3;
appendix A.2 gives the protocol: 20 trajectories per gradient step, a meta-batch of
40 tasks).

Two environments, both on gymnasium's ``HalfCheetah-v5`` and the official ``mujoco``
wheels from PyPI (``pip install 'fewbench[rl]'``; no mujoco-py, no system MuJoCo):

* ``halfcheetah_vel``: a goal velocity ``g ~ U[0, 2]`` per task; reward
  ``-|v - g| - 0.05 ||clip(a, -1, 1)||^2`` per step.
* ``halfcheetah_dir``: a direction ``d = +1`` (forward) or ``-1`` (backward), each with
  probability 1/2; reward ``d v - 0.05 ||clip(a, -1, 1)||^2``.

Both rewards and the task distributions are those of the authors' code
(``cbfinn/maml_rl``, ``half_cheetah_env_rand.py`` and ``half_cheetah_env_rand_direc.py``:
``run_cost = |comvel_x - goal|``, ``ctrl_cost = 0.5 * 0.1 * sum(clip(a)^2)``; the
direction drawn as ``U[0, 2] < 1``, i.e. +-1 with probability 1/2), with the horizon
of 200 steps and no termination. Each step is ``gymnasium.make("HalfCheetah-v5",
max_episode_steps=horizon, ctrl_cost_weight=0.05, frame_skip=frame_skip)`` given the
policy's action clipped to ``[-1, 1]`` (rllab's ``normalize`` clipped as well); the
reward is rebuilt from the step's ``info["x_velocity"]`` and ``info["reward_ctrl"]``
(``= -0.05 ||clip(a)||^2``). With ``observe_task`` (the oracle) the goal velocity or the
direction is appended to the observation, as the code's ``half_cheetah_env_oracle.py``.

**These are gymnasium-v5 dynamics, not rllab's.** The model is the same (gymnasium's
``half_cheetah.xml`` is rllab's, with a camera added: timestep 0.01, the same joints,
gears and masses), but four things differ from the environment that produced the
paper's figure 5, so returns are comparable with it only roughly:

* **Observation**: 17-d, ``qpos[1:]`` (8) and ``qvel`` (9). rllab's had 20 dimensions:
  the same 17 and the torso subtree's centre of mass (3, its x included).
* **Velocity** in the reward: gymnasium's ``x_velocity``, the finite difference of the
  root's x position over the step, ``(rootx_after - rootx_before) / dt``. rllab used the
  linear velocity of the whole body's centre of mass (``get_body_comvel("torso")``, the
  subtree COM velocity) after the step.
* **Reset noise**: gymnasium's ``qpos + U(-0.1, 0.1)``, ``qvel + 0.1 N(0, 1)``; rllab's
  ``qpos + N(0, 0.01^2)``, ``qvel + N(0, 0.1^2)``.
* **frame_skip**: the parameter ``frame_skip`` is the number of 0.01 s MuJoCo steps per
  action. The default ``1`` (dt = 0.01 s, 200 steps = 2 s of simulated time) is rllab's
  control rate (rllab's ``MujocoEnv`` reads a frame skip from the XML, and rll/rllab's
  ``half_cheetah.xml`` sets none; the copy vendored in ``cbfinn/maml_rl`` was not
  checked). ``5`` (dt = 0.05 s, 10 s per episode) is
  gymnasium's default and what the PyTorch ports (pytorch-maml-rl, learn2learn, ProMP)
  use; it costs five times the physics per step and changes the returns' scale.

Randomness: the policy's noise is drawn first from each task's own generator
(:meth:`fewbench.plugin.environment.Environment.noise`), then one reset seed per trajectory
from the same generator; each sub-environment is reset with its seed. A rollout is so
a function of the task, its seed and the stream alone, whatever other tasks share the
call and however the sub-environments are spread over processes.

Stepping: :meth:`HalfCheetah.rollout` steps ``T x N`` gymnasium environments in lock
step, calling the policy once per time step on all ``T x N`` observations (with one
torch thread: see :meth:`HalfCheetah._policy_threads`). They are split into
``workers`` contiguous chunks (default: the CPU cores this process may run on,
``os.sched_getaffinity``); each chunk is a ``gymnasium.vector.SyncVectorEnv``. Chunk 0
is stepped in this process and each other chunk in a worker process of its own, which
receives its chunk's actions and returns observations, velocities and control costs
through a pipe. The workers are forked (spawned where there is no fork), kept alive
across rollouts, closed by :meth:`HalfCheetah.close` or at exit, and end by themselves
when this process dies. ``workers: 1`` steps everything in-process. One process per
environment (``AsyncVectorEnv``) would start 800 processes for the paper's 40 x 20
trajectories, where a cheetah step costs about 20 microseconds: the messages and the
context switches would outweigh the physics. The environments of a chunk are made
once and reused (each rollout resets them with new seeds). Measured on 2 cores with
frame_skip 1 (40 x 20 trajectories of 200 steps): about 40,000 steps/s with 1 worker
and 75,000 to 80,000 with 2; with frame_skip 5, about 20,000 and 40,000.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import traceback
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fewbench.plugin import (
    Environment,
    FewbenchError,
    Param,
    Policy,
    TaskBatch,
    Trajectories,
    hookimpl,
)

GYM_ID = "HalfCheetah-v5"
CTRL_COST_WEIGHT = 0.05  # the code's 0.5 * 1e-1 (half_cheetah_env_rand.py)
OBSERVATION_DIM = 17  # qpos[1:] (8) and qvel (9)
ACTION_DIM = 6
MISSING = (
    "the halfcheetah environments need gymnasium and mujoco, an optional extra: "
    "pip install 'fewbench[rl]' (or pip install 'gymnasium[mujoco]')"
)


def import_gymnasium() -> tuple[Any, Any]:
    """``(gymnasium, mujoco)``, or the one-line error naming the extra."""
    try:
        import gymnasium
        import mujoco
    except ImportError:
        raise FewbenchError(MISSING) from None
    return gymnasium, mujoco


def workers_available() -> int:
    """The CPU cores this process may run on (its affinity; all cores where unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def quiet_settotalmass(mujoco: Any) -> Iterator[None]:
    """Drop MuJoCo's deprecation warning about ``settotalmass`` (gymnasium's
    ``half_cheetah.xml`` uses it), printed once per model compiled: 800 lines a meta-batch.
    Other warnings go where they went."""
    previous = mujoco.get_mju_user_warning()

    def warn(message: str) -> None:
        if "settotalmass" in message:
            return
        if previous is not None:
            previous(message)
        else:
            sys.stderr.write(f"MuJoCo warning: {message}\n")

    mujoco.set_mju_user_warning(warn)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def make_cheetah(horizon: int, frame_skip: int) -> Any:
    """One gymnasium ``HalfCheetah-v5`` as fewbench steps it (every setting spelt out)."""
    gymnasium, mujoco = import_gymnasium()
    with quiet_settotalmass(mujoco):
        return gymnasium.make(
            GYM_ID,
            max_episode_steps=horizon,
            frame_skip=frame_skip,
            ctrl_cost_weight=CTRL_COST_WEIGHT,
            forward_reward_weight=1.0,
            reset_noise_scale=0.1,
            exclude_current_positions_from_observation=True,
        )


class CheetahChunk:
    """Some sub-environments stepped in one process as a ``SyncVectorEnv``.

    The environments are made when first needed and kept; a rollout of ``n`` of them
    uses the first ``n`` (a vector over them is rebuilt only when ``n`` changes)."""

    def __init__(self, horizon: int, frame_skip: int):
        self.horizon = horizon
        self.frame_skip = frame_skip
        self.envs: list[Any] = []
        self.vector: Any = None

    def reset(self, seeds: list[int]) -> np.ndarray:
        """Reset the first ``len(seeds)`` environments, each with its seed: ``[n, 17]``."""
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        count = len(seeds)
        while len(self.envs) < count:
            self.envs.append(make_cheetah(self.horizon, self.frame_skip))
        if self.vector is None or self.vector.num_envs != count:
            # Not closed when replaced: it would close the environments it shares.
            self.vector = SyncVectorEnv(
                [lambda env=env: env for env in self.envs[:count]],
                copy=False,
                autoreset_mode=AutoresetMode.DISABLED,
            )
        observations, _ = self.vector.reset(seed=seeds)
        return np.array(observations, dtype=np.float64)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One step of every environment reset last: observations ``[n, 17]``, the forward
        velocities ``[n]`` and the control rewards ``[n]`` (``-0.05 ||a||^2``)."""
        observations, _, _, _, info = self.vector.step(actions)
        return (
            np.array(observations, dtype=np.float64),
            np.array(info["x_velocity"], dtype=np.float64),
            np.array(info["reward_ctrl"], dtype=np.float64),
        )


# The parent's ends of every worker's pipe in this process. A forked worker closes its
# copies first: else it would hold its siblings' pipes open, and a worker whose parent
# died would wait for a message for ever instead of reading the end of its pipe.
_PARENT_ENDS: set[Any] = set()


def _serve(connection: Any, horizon: int, frame_skip: int, inherited: tuple[Any, ...]) -> None:
    """A worker process: a :class:`CheetahChunk` answering its parent's commands."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for other in inherited:
        other.close()
    chunk = CheetahChunk(horizon, frame_skip)
    try:
        while True:
            try:
                command, payload = connection.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if command == "close":
                return
            try:
                reply = ("ok", getattr(chunk, command)(payload))
            except Exception:
                reply = ("error", traceback.format_exc())
            try:
                connection.send(reply)
            except (BrokenPipeError, OSError):
                return
    finally:
        connection.close()


def _shutdown(owner: int, connections: list[Any], processes: list[Any]) -> None:
    """Ask the workers to stop, then make sure they did (only in the process that made them)."""
    if os.getpid() != owner:
        return
    for connection in connections:
        _PARENT_ENDS.discard(connection)
        with suppress(BrokenPipeError, OSError):
            connection.send(("close", None))
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
    for connection in connections:
        connection.close()
    connections.clear()
    processes.clear()


class CheetahStepper:
    """``workers`` chunks of sub-environments stepped in lock step: chunk 0 here, the
    others in worker processes (see the module's docstring)."""

    def __init__(self, workers: int, horizon: int, frame_skip: int):
        self.workers = workers
        self.owner = os.getpid()
        self.local = CheetahChunk(horizon, frame_skip)
        self.connections: list[Any] = []
        self.processes: list[Any] = []
        self.bounds: list[int] = [0, 0]
        self.broken = False
        # Close whatever started if a later start fails, and at exit or collection.
        self._finalizer = weakref.finalize(
            self, _shutdown, self.owner, self.connections, self.processes
        )
        # fork where there is one: a worker needs nothing but numpy, gymnasium and mujoco
        # (imported here first), shares the parent's pages, and does not import the main
        # module again (spawn would, and fail in a script without a main guard).
        fork = "fork" in multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if fork else "spawn")
        if workers > 1:
            make_cheetah(horizon, frame_skip).close()  # imports all the child needs, first
        for _ in range(workers - 1):
            parent_end, child_end = context.Pipe()
            self.connections.append(parent_end)
            _PARENT_ENDS.add(parent_end)
            process = context.Process(
                target=_serve,
                args=(child_end, horizon, frame_skip, tuple(_PARENT_ENDS) if fork else ()),
                name="fewbench-halfcheetah",
                daemon=True,
            )
            with warnings.catch_warnings():
                # Python 3.12+ warns of fork() in a process with threads (torch's); the
                # child runs no torch, only numpy, gymnasium and mujoco.
                warnings.filterwarnings(
                    "ignore", message=".*multi-threaded.*fork", category=DeprecationWarning
                )
                process.start()
            child_end.close()
            self.processes.append(process)

    @property
    def alive(self) -> bool:
        return (
            os.getpid() == self.owner
            and not self.broken
            and all(p.is_alive() for p in self.processes)
        )

    def close(self) -> None:
        self._finalizer()

    def _call(self, command: str, parts: list[Any]) -> list[Any]:
        """Send ``parts[1:]`` to the workers, run ``parts[0]`` here, gather in order.

        Whatever goes wrong on the way (a worker's error, its death, an interrupt) leaves
        the stepper broken: the next rollout starts a new one."""
        self.broken = True
        remote = [
            (connection, part)
            for connection, part in zip(self.connections, parts[1:], strict=True)
            if len(part)
        ]
        for connection, part in remote:
            connection.send((command, part))
        results, failures = [], []
        if len(parts[0]):
            try:
                results.append(getattr(self.local, command)(parts[0]))
            except Exception:
                failures.append(traceback.format_exc())
        for connection, _ in remote:
            try:
                status, value = connection.recv()
            except (EOFError, OSError):
                status, value = "error", "a halfcheetah worker process died"
            if status == "ok":
                results.append(value)
            else:
                failures.append(value)
        if failures:
            raise RuntimeError(f"halfcheetah simulation failed: {failures[0].strip()}")
        self.broken = False
        return results

    def reset(self, seeds: list[int]) -> np.ndarray:
        """Reset ``len(seeds)`` sub-environments, environment ``k`` with ``seeds[k]``."""
        count = len(seeds)
        self.bounds = [count * i // self.workers for i in range(self.workers + 1)]
        parts = [seeds[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]
        return np.concatenate(self._call("reset", parts))

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [actions[a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]
        observations, velocities, controls = zip(*self._call("step", parts), strict=True)
        return np.concatenate(observations), np.concatenate(velocities), np.concatenate(controls)


class HalfCheetah(Environment):
    """The half-cheetah on gymnasium's ``HalfCheetah-v5``: what the two task
    distributions share (subclasses set the tasks and the reward)."""

    extra = "rl"
    task_dim = 1
    observation_dim = OBSERVATION_DIM
    action_dim = ACTION_DIM
    shared_params: ClassVar[dict[str, Param]] = {
        "frame_skip": Param(
            1,
            minimum=1,
            help="MuJoCo steps of 0.01 s per action: 1 is rllab's control rate (the paper's "
            "code), 5 gymnasium's default (pytorch-maml-rl, learn2learn)",
        ),
        "horizon": Param(200, minimum=1, help="steps per episode (the paper's H = 200)"),
        "workers": Param(
            None,
            type=int,
            nullable=True,
            minimum=1,
            help="processes stepping the simulations (default: the CPU cores this process "
            "may use); 1 steps them in this process. Does not change any result",
        ),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        for key in ("frame_skip", "horizon"):
            value = self.config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {key} must be a positive integer, got {value!r}")
        workers = self.config["workers"]
        if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
            raise ValueError(f"{self.name}: workers must be at least 1, got {workers!r}")
        self.horizon = int(self.config["horizon"])
        self.frame_skip = int(self.config["frame_skip"])
        self.workers = int(workers) if workers is not None else workers_available()
        self._stepper: CheetahStepper | None = None

    # -- the reward --------------------------------------------------------------------
    def reward(
        self, velocity: np.ndarray, reward_ctrl: np.ndarray, tasks: np.ndarray
    ) -> np.ndarray:
        """Per-step rewards from the forward velocities, the control rewards
        (``-0.05 ||clip(a)||^2``) and each environment's task value (float64 arrays)."""
        raise NotImplementedError

    # -- availability ------------------------------------------------------------------
    def check_available(self, root: Path) -> None:
        """The one-line error naming ``fewbench[rl]`` unless gymnasium's ``HalfCheetah-v5``
        can be made here (imports gymnasium and mujoco; builds one environment)."""
        gymnasium, _ = import_gymnasium()
        if GYM_ID not in gymnasium.registry:
            raise FewbenchError(
                f"{self.name} needs gymnasium 1.0 or later ({GYM_ID}), found gymnasium "
                f"{gymnasium.__version__}: pip install 'fewbench[rl]'"
            )
        try:
            make_cheetah(self.horizon, self.frame_skip).close()
        except Exception as exc:
            message = " ".join(str(exc).split())
            raise FewbenchError(
                f"{self.name}: gymnasium cannot make {GYM_ID} ({type(exc).__name__}: "
                f"{message}); pip install 'fewbench[rl]'"
            ) from None

    # -- rollouts ----------------------------------------------------------------------
    def _stepper_now(self) -> CheetahStepper:
        stepper = self._stepper
        if stepper is not None and not stepper.alive:
            if os.getpid() == stepper.owner:
                stepper.close()
            stepper = None  # made by the process this one was forked from: not ours
        if stepper is None:
            stepper = CheetahStepper(self.workers, self.horizon, self.frame_skip)
            self._stepper = stepper
        return stepper

    def close(self) -> None:
        """Stop the worker processes (a later rollout starts them again)."""
        stepper, self._stepper = self._stepper, None
        if stepper is not None and os.getpid() == stepper.owner:
            stepper.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stepper"] = None  # processes and pipes stay with their owner
        return state

    @staticmethod
    @contextmanager
    def _policy_threads() -> Iterator[None]:
        """One torch thread for the policy during a rollout, restored after: between two
        calls torch's idle OpenMP threads spin on the cores the simulations need. Measured
        on 2 cores, 40 x 20 trajectories, a 2 x 100 MLP policy: 52,000 steps/s with
        torch's 2 threads and 72,000 with 1 (workers 2); about 19,000 and 40,000 (workers
        1). The policy's batch (T x N rows, one step) is too small to gain from threads."""
        threads = torch.get_num_threads()
        if threads == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def reset_seeds(self, generators: list[torch.Generator], trajectories: int) -> list[int]:
        """One reset seed per trajectory, ``T * N`` of them task by task, each task's drawn
        from its own generator (after the policy's noise)."""
        return [
            seed
            for generator in generators
            for seed in torch.randint(0, 2**62, (trajectories,), generator=generator).tolist()
        ]

    def rollout(
        self,
        policy: Policy,
        batch: TaskBatch,
        trajectories: int,
        *,
        stream: Any = 0,
        observe_task: bool = False,
    ) -> Trajectories:
        """``trajectories`` episodes of ``horizon`` steps in each task of ``batch``, the
        ``T x N`` simulations stepped together (see the module's docstring)."""
        import_gymnasium()
        tasks, device = batch.tasks, batch.tasks.device
        count, per_task = len(batch), trajectories
        generators = batch.generators(stream)
        noise = self.noise(generators, per_task).to(device)  # first, as the base class
        seeds = self.reset_seeds(generators, per_task)
        task_values = np.repeat(tasks[:, 0].detach().to("cpu", torch.float64).numpy(), per_task)
        stepper = self._stepper_now()
        state = stepper.reset(seeds)
        observations, actions, rewards = [], [], []
        with self._policy_threads():
            for t in range(self.horizon):
                seen = torch.from_numpy(state).to(torch.float32).view(count, per_task, -1)
                seen = self.with_task(seen.to(device), tasks, observe_task)
                action = policy(seen, noise[:, :, t])
                chosen = action.detach().to("cpu", torch.float64).reshape(count * per_task, -1)
                if not torch.isfinite(chosen).all():
                    raise ValueError(f"{self.name}: the policy returned non-finite actions")
                state, velocity, reward_ctrl = stepper.step(np.clip(chosen.numpy(), -1.0, 1.0))
                reward = self.reward(velocity, reward_ctrl, task_values)
                observations.append(seen)
                actions.append(action)
                rewards.append(torch.from_numpy(reward).to(torch.float32).view(count, per_task))
        rewards_tensor = torch.stack(rewards, dim=2).to(device)
        return Trajectories(
            torch.stack(observations, dim=2),
            torch.stack(actions, dim=2),
            rewards_tensor,
            torch.ones_like(rewards_tensor),
        )


class HalfCheetahVel(HalfCheetah):
    name = "halfcheetah_vel"
    description = (
        "Half-cheetah goal velocity, U[0, 2] (Finn et al. 2017, section 5.3), on "
        "gymnasium's HalfCheetah-v5: pip install 'fewbench[rl]'"
    )
    params = {
        "velocity_min": Param(0.0, help="lowest goal velocity (the paper's 0.0)"),
        "velocity_max": Param(2.0, help="highest goal velocity (the paper's 2.0)"),
        **HalfCheetah.shared_params,
    }
    # What changes the tasks or their dynamics seeds the fixed validation and test tasks;
    # the horizon (as in navigation2d) and the workers do not.
    episode_identity: ClassVar[tuple[str, ...]] = ("velocity_min", "velocity_max", "frame_skip")

    def __init__(self, **params: Any):
        super().__init__(**params)
        low, high = float(self.config["velocity_min"]), float(self.config["velocity_max"])
        if low > high:
            raise ValueError(f"{self.name}: velocity_min {low} is above velocity_max {high}")
        self.velocity_min, self.velocity_max = low, high

    def sample_tasks(self, count: int, generator: torch.Generator) -> Tensor:
        """Goal velocities ``float32[count, 1]``, uniform in ``[velocity_min, velocity_max]``."""
        uniform = torch.rand((count, 1), generator=generator, dtype=torch.float32)
        return self.velocity_min + (self.velocity_max - self.velocity_min) * uniform

    def reward(
        self, velocity: np.ndarray, reward_ctrl: np.ndarray, tasks: np.ndarray
    ) -> np.ndarray:
        """``-|v - g| - 0.05 ||clip(a)||^2``."""
        return -np.abs(velocity - tasks) + reward_ctrl


class HalfCheetahDir(HalfCheetah):
    name = "halfcheetah_dir"
    description = (
        "Half-cheetah forward or backward (Finn et al. 2017, section 5.3), on "
        "gymnasium's HalfCheetah-v5: pip install 'fewbench[rl]'"
    )
    params = dict(HalfCheetah.shared_params)
    episode_identity: ClassVar[tuple[str, ...]] = ("frame_skip",)

    def sample_tasks(self, count: int, generator: torch.Generator) -> Tensor:
        """Directions ``float32[count, 1]``: +1 (forward) or -1, each with probability 1/2."""
        forward = torch.rand((count, 1), generator=generator) < 0.5
        return torch.where(forward, 1.0, -1.0).to(torch.float32)

    def reward(
        self, velocity: np.ndarray, reward_ctrl: np.ndarray, tasks: np.ndarray
    ) -> np.ndarray:
        """``d v - 0.05 ||clip(a)||^2``."""
        return tasks * velocity + reward_ctrl


@hookimpl
def fewbench_register_environments(register):
    register(HalfCheetahVel)
    register(HalfCheetahDir)
