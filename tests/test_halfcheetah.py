"""The half-cheetah environments (plugins/environments/halfcheetah.py) on gymnasium's
HalfCheetah-v5: the vectorised rollout against plain gymnasium environments stepped one
at a time, the rewards by hand, seeding, the task distributions, the worker processes,
and the one-line error when the ``rl`` extra is missing.

Small and fast: a few tasks and trajectories and a horizon of a few steps. The tests
that need gymnasium skip, with the reason shown, where it is not installed; the test
extra installs it (``pip install '.[test]'``), so CI runs them."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fewbench.errors import FewbenchError
from fewbench.plugin.environment import TaskBatch, TaskDistribution
from fewbench_plugins.environments import halfcheetah
from fewbench_plugins.environments.halfcheetah import HalfCheetahDir, HalfCheetahVel

HORIZON = 12
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gymnasium():
    return pytest.importorskip(
        "gymnasium", reason="the cheetah tests need the rl extra: pip install 'fewbench[rl]'"
    )


def policy(observations: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Depends on the observation and the noise; often outside [-1, 1] (the clipping is
    exercised). Only elementwise products and sums: the same bits for one row or many."""
    return observations[..., :6] * 0.3 + noise * 1.2


def batch_of(environment, count: int, seed: int = 0) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    return TaskDistribution(environment).sample_episodes(count, 0, 0, 0, generator)


def plain_cheetah(gymnasium, horizon: int, frame_skip: int = 1):
    return gymnasium.make(
        "HalfCheetah-v5", max_episode_steps=horizon, ctrl_cost_weight=0.05, frame_skip=frame_skip
    )


def by_hand(environment, batch: TaskBatch, trajectories: int, stream, gymnasium, frame_skip=1):
    """Each trajectory alone in its own ``gymnasium.make`` environment: the policy's noise
    first, then one reset seed per trajectory, from each task's generator (the contract)."""
    generators = batch.generators(stream)
    noise = environment.noise(generators, trajectories)
    seeds = [torch.randint(0, 2**62, (trajectories,), generator=g).tolist() for g in generators]
    count = len(batch)
    observations = torch.zeros(count, trajectories, environment.horizon, 17)
    actions = torch.zeros(count, trajectories, environment.horizon, 6)
    rewards = torch.zeros(count, trajectories, environment.horizon)
    for i in range(count):
        task = float(batch.tasks[i, 0])
        for n in range(trajectories):
            env = plain_cheetah(gymnasium, environment.horizon, frame_skip)
            observation, info = env.reset(seed=seeds[i][n])
            x_before = info["x_position"]
            for t in range(environment.horizon):
                seen = torch.from_numpy(observation).float()
                action = policy(seen[None, None], noise[i, n, t][None, None])[0, 0]
                clipped = np.clip(action.double().numpy(), -1.0, 1.0)
                observation, _, terminated, truncated, info = env.step(clipped)
                assert not terminated
                assert truncated == (t == environment.horizon - 1)
                # The two quantities the reward is rebuilt from, checked by hand.
                assert info["reward_ctrl"] == -0.05 * np.sum(np.square(clipped))
                dt = 0.01 * frame_skip
                assert info["x_velocity"] == pytest.approx((info["x_position"] - x_before) / dt)
                x_before = info["x_position"]
                if isinstance(environment, HalfCheetahVel):
                    reward = -abs(info["x_velocity"] - task) + info["reward_ctrl"]
                else:
                    reward = task * info["x_velocity"] + info["reward_ctrl"]
                observations[i, n, t] = seen
                actions[i, n, t] = action
                rewards[i, n, t] = reward
            env.close()
    return observations, actions, rewards


@pytest.mark.parametrize("cls", [HalfCheetahVel, HalfCheetahDir])
def test_vectorised_rollout_equals_stepping_each_env_alone(gymnasium, cls):
    environment = cls(horizon=HORIZON, workers=2)
    try:
        batch = batch_of(environment, 3, seed=4)
        rolled = environment.rollout(policy, batch, 2, stream=("adapt", 0))
    finally:
        environment.close()
    observations, actions, rewards = by_hand(environment, batch, 2, ("adapt", 0), gymnasium)
    assert rolled.observations.shape == (3, 2, HORIZON, 17)
    assert rolled.observations.dtype == torch.float32
    assert torch.equal(rolled.observations, observations)
    assert torch.equal(rolled.actions, actions)
    assert torch.equal(rolled.rewards, rewards)
    assert torch.equal(rolled.mask, torch.ones(3, 2, HORIZON))
    assert (rolled.actions.abs() > 1).any()  # the clipping was exercised


def test_frame_skip_five_equals_stepping_each_env_alone(gymnasium):
    environment = HalfCheetahVel(horizon=4, workers=1, frame_skip=5)
    batch = batch_of(environment, 2, seed=1)
    rolled = environment.rollout(policy, batch, 1, stream=3)
    observations, _, rewards = by_hand(environment, batch, 1, 3, gymnasium, frame_skip=5)
    assert torch.equal(rolled.observations, observations)
    assert torch.equal(rolled.rewards, rewards)


def test_workers_do_not_change_results(gymnasium):
    results = []
    for workers in (1, 2, 3):
        environment = HalfCheetahDir(horizon=HORIZON, workers=workers)
        try:
            batch = batch_of(environment, 4, seed=2)
            results.append(environment.rollout(policy, batch, 2, stream=7, observe_task=True))
        finally:
            environment.close()
    for other in results[1:]:
        assert torch.equal(other.observations, results[0].observations)
        assert torch.equal(other.actions, results[0].actions)
        assert torch.equal(other.rewards, results[0].rewards)


def test_a_task_rolls_out_the_same_whatever_tasks_share_the_call(gymnasium):
    environment = HalfCheetahVel(horizon=HORIZON, workers=2)
    try:
        batch = batch_of(environment, 3, seed=5)
        together = environment.rollout(policy, batch, 2, stream=1)
        first = TaskBatch(batch.tasks[:1], batch.seeds[:1], environment)
        rest = TaskBatch(batch.tasks[1:], batch.seeds[1:], environment)
        apart = [environment.rollout(policy, part, 2, stream=1) for part in (first, rest)]
    finally:
        environment.close()
    assert torch.equal(torch.cat([a.rewards for a in apart]), together.rewards)
    assert torch.equal(torch.cat([a.observations for a in apart]), together.observations)


def test_same_seed_same_returns_and_streams_differ(gymnasium):
    environment = HalfCheetahVel(horizon=HORIZON, workers=1)
    batch = batch_of(environment, 2, seed=9)
    first = environment.rollout(policy, batch, 3, stream=0)
    again = environment.rollout(policy, batch_of(environment, 2, seed=9), 3, stream=0)
    other = environment.rollout(policy, batch, 3, stream=1)
    assert torch.equal(first.returns, again.returns)
    assert not torch.equal(first.returns, other.returns)
    # A fresh environment (new simulations, new processes) gives the same numbers.
    fresh = HalfCheetahVel(horizon=HORIZON, workers=2)
    try:
        assert torch.equal(fresh.rollout(policy, batch, 3, stream=0).returns, first.returns)
    finally:
        fresh.close()


def test_rewards_by_hand_against_info(gymnasium):
    env = plain_cheetah(gymnasium, 5)
    env.reset(seed=0)
    action = np.array([1.7, -0.2, 0.5, -3.0, 0.0, 0.9])
    clipped = np.clip(action, -1, 1)
    _, _, _, _, info = env.step(clipped)
    velocity, control = np.array([info["x_velocity"]]), np.array([info["reward_ctrl"]])
    expected_control = -0.05 * (1.0 + 0.04 + 0.25 + 1.0 + 0.0 + 0.81)
    assert control[0] == pytest.approx(expected_control)
    vel = HalfCheetahVel(horizon=5)
    goal = np.array([1.25])
    assert vel.reward(velocity, control, goal)[0] == pytest.approx(
        -abs(info["x_velocity"] - 1.25) + expected_control
    )
    direction = HalfCheetahDir(horizon=5)
    for d in (1.0, -1.0):
        assert direction.reward(velocity, control, np.array([d]))[0] == pytest.approx(
            d * info["x_velocity"] + expected_control
        )


def test_the_model_is_rllabs(gymnasium):
    """Timestep 0.01 s times frame_skip, and the total mass the XML asks for (14): MuJoCo
    deprecates ``settotalmass``; a release that drops it would change the dynamics."""
    for frame_skip in (1, 5):
        env = plain_cheetah(gymnasium, 5, frame_skip).unwrapped
        assert env.dt == pytest.approx(0.01 * frame_skip)
        assert env.model.opt.timestep == pytest.approx(0.01)
        assert env.model.body_mass.sum() == pytest.approx(14.0)
        assert env.observation_space.shape == (17,)
        assert env.action_space.shape == (6,)


def test_observe_task_appends_the_task(gymnasium):
    environment = HalfCheetahDir(horizon=3, workers=1)
    assert environment.observation_size(True) == 18
    batch = batch_of(environment, 4, seed=3)
    rolled = environment.rollout(policy, batch, 2, observe_task=True)
    assert rolled.observations.shape == (4, 2, 3, 18)
    expected = batch.tasks[:, None, None, :].expand(4, 2, 3, 1)
    assert torch.equal(rolled.observations[..., 17:], expected)
    plain = environment.rollout(policy, batch, 2)
    assert torch.equal(plain.observations, rolled.observations[..., :17])


def test_non_finite_actions_are_an_error(gymnasium):
    environment = HalfCheetahVel(horizon=3, workers=1)
    with pytest.raises(ValueError, match="non-finite"):
        environment.rollout(lambda o, n: n * float("nan"), batch_of(environment, 1), 1)


def test_velocity_tasks():
    environment = HalfCheetahVel()
    tasks = environment.sample_tasks(4000, torch.Generator().manual_seed(0))
    assert tasks.shape == (4000, 1) and tasks.dtype == torch.float32
    assert tasks.min() >= 0.0 and tasks.max() <= 2.0
    assert tasks.mean().item() == pytest.approx(1.0, abs=0.05)
    assert (tasks < 1.0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    again = environment.sample_tasks(4000, torch.Generator().manual_seed(0))
    assert torch.equal(tasks, again)
    narrow = HalfCheetahVel(velocity_min=0.5, velocity_max=0.5)
    assert torch.equal(narrow.sample_tasks(3, torch.Generator()), torch.full((3, 1), 0.5))
    with pytest.raises(ValueError, match="velocity_min"):
        HalfCheetahVel(velocity_min=2.0, velocity_max=1.0)


def test_direction_tasks():
    environment = HalfCheetahDir()
    tasks = environment.sample_tasks(4000, torch.Generator().manual_seed(1))
    assert tasks.shape == (4000, 1) and tasks.dtype == torch.float32
    assert set(tasks.flatten().tolist()) == {-1.0, 1.0}
    assert (tasks > 0).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(tasks, environment.sample_tasks(4000, torch.Generator().manual_seed(1)))
    # The core's draw: the same generator gives the same tasks and seeds.
    first = batch_of(environment, 5, seed=11)
    second = batch_of(environment, 5, seed=11)
    assert torch.equal(first.tasks, second.tasks) and torch.equal(first.seeds, second.seeds)


def test_parameters_and_identity():
    vel, direction = HalfCheetahVel(), HalfCheetahDir()
    assert (vel.horizon, vel.frame_skip, vel.task_dim, vel.observation_dim, vel.action_dim) == (
        200,
        1,
        1,
        17,
        6,
    )
    assert vel.workers == halfcheetah.workers_available() >= 1
    assert HalfCheetahVel(workers=3).workers == 3
    for environment in (vel, direction):
        assert "workers" not in environment.episode_identity
        assert "frame_skip" in environment.episode_identity
        assert environment.extra == "rl"
        assert environment.task_type == "reinforcement"
    assert {"velocity_min", "velocity_max"} <= set(vel.episode_identity)
    with pytest.raises(ValueError, match="frame_skip"):
        HalfCheetahVel(frame_skip=0)


def test_registered_by_the_hook():
    registered = []
    halfcheetah.fewbench_register_environments(registered.append)
    assert [cls.name for cls in registered] == ["halfcheetah_vel", "halfcheetah_dir"]


def test_missing_extra_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium raises ImportError
    environment = HalfCheetahVel(horizon=3, workers=1)  # no import when made
    for call in (
        lambda: environment.check_available(tmp_path),
        lambda: environment.load(tmp_path, tmp_path),
        lambda: environment.rollout(policy, batch_of(environment, 1), 1),
    ):
        with pytest.raises(FewbenchError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message
        assert "pip install 'fewbench[rl]'" in message
        assert "gymnasium" in message


def test_missing_mujoco_is_the_same_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(FewbenchError, match=r"fewbench\[rl\]"):
        HalfCheetahDir().check_available(tmp_path)


def test_check_available_passes(gymnasium, tmp_path):
    HalfCheetahVel(frame_skip=5).check_available(tmp_path)
    sources = HalfCheetahDir().load(tmp_path, tmp_path)
    assert set(sources) == {"train", "val", "test"}


def test_close_ends_the_workers_and_a_later_rollout_restarts_them(gymnasium):
    environment = HalfCheetahVel(horizon=3, workers=3)
    batch = batch_of(environment, 2)
    first = environment.rollout(policy, batch, 2)
    processes = list(environment._stepper.processes)
    assert len(processes) == 2 and all(p.is_alive() for p in processes)
    # The pool stays alive across rollouts.
    environment.rollout(policy, batch, 2)
    assert environment._stepper.processes == processes
    copy = pickle.loads(pickle.dumps(environment))  # pipes and processes stay here
    assert copy._stepper is None
    environment.close()
    assert not any(p.is_alive() for p in processes)
    assert torch.equal(environment.rollout(policy, batch, 2).rewards, first.rewards)
    assert environment._stepper.processes[0].pid not in {p.pid for p in processes}
    environment.close()


def _ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_end_when_their_parent_is_killed(gymnasium):
    # No main guard in this script: the workers are forked, the script is not run again.
    script = (
        "import os, torch\n"
        "from fewbench.plugin.environment import TaskBatch\n"
        "from fewbench_plugins.environments.halfcheetah import HalfCheetahVel\n"
        "env = HalfCheetahVel(workers=3, horizon=3)\n"
        "env.rollout(lambda o, n: n, TaskBatch(torch.ones(2, 1), torch.arange(2), env), 2)\n"
        "print(*[p.pid for p in env._stepper.processes], flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == -9, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    while not all(_ended(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_ended(pid) for pid in pids), f"worker processes {pids} outlived their parent"
    assert "settotalmass" not in done.stderr  # MuJoCo's deprecation notice is filtered


def test_environment_variables_are_not_needed(gymnasium):
    """Headless: nothing renders, so no display and no MUJOCO_GL are needed."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MUJOCO_GL")}
    script = (
        "import torch\n"
        "from fewbench.plugin.environment import TaskBatch\n"
        "from fewbench_plugins.environments.halfcheetah import HalfCheetahDir\n"
        "env = HalfCheetahDir(workers=1, horizon=2)\n"
        "t = env.rollout(lambda o, n: n, TaskBatch(torch.ones(1, 1), torch.arange(1), env), 1)\n"
        "print(t.rewards.shape)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 1, 2])" in done.stdout
