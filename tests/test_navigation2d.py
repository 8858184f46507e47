"""The 2-D navigation environment (Finn et al. 2017, section 5.3): dynamics and reward by
hand, vectorised rollouts equal to one task at a time, seeds, the task distribution."""

from __future__ import annotations

import math

import pytest
import torch

from fewbench.plugin.environment import TaskBatch, TaskDistribution, Trajectories
from fewbench_plugins.environments.navigation2d import Navigation2D

# E||g|| for g ~ U([-0.5, 0.5]^2): the mean distance from a unit square's centre.
MEAN_DISTANCE = (math.sqrt(2) + math.log(1 + math.sqrt(2))) / 6  # 0.3826
MEAN_SQUARED_DISTANCE = 2 / 12  # two coordinates of variance 1/12


def goals(*points: tuple[float, float]) -> torch.Tensor:
    return torch.tensor(points, dtype=torch.float32)


def batch_of(env: Navigation2D, tasks: torch.Tensor, seed: int = 0) -> TaskBatch:
    return TaskBatch(tasks, torch.arange(len(tasks), dtype=torch.int64) + seed, env)


def sampled(env: Navigation2D, count: int, seed: int = 0) -> TaskBatch:
    return TaskDistribution(env).sample_episodes(
        count, 1, 1, 1, torch.Generator().manual_seed(seed)
    )


def noisy_policy(observations: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Elementwise (no matrix product), so batched and single rollouts agree bit for bit."""
    return torch.tanh(3.0 * (0.2 - observations[..., :2])) + 0.7 * noise


def constant(*action: float):
    value = torch.tensor(action)
    return lambda observations, noise: value.expand(*observations.shape[:2], -1)


def test_parameters_and_spaces():
    env = Navigation2D()
    assert env.config == {
        "reward": "squared",
        "horizon": 100,
        "action_scale": 0.1,
        "done_radius": 0.01,
    }
    assert all(p.help for p in Navigation2D.params.values())
    assert (env.task_dim, env.observation_dim, env.action_dim, env.horizon) == (2, 2, 2, 100)
    assert env.observation_size() == 2 and env.observation_size(True) == 4
    assert Navigation2D.episode_identity == ()
    assert Navigation2D(horizon=7).horizon == 7
    with pytest.raises(ValueError, match="reward"):
        Navigation2D(reward="euclid")


def test_step_clips_the_scaled_velocity_and_rewards_after_the_move():
    tasks = goals((0.5, 0.5))
    start = Navigation2D().reset(tasks, [], 1)
    assert torch.equal(start, torch.zeros(1, 1, 2))
    # 0.1 * (2.0, -0.5) = (0.2, -0.05): the first coordinate is clipped to 0.1.
    action = torch.tensor([[[2.0, -0.5]]])
    for reward, expected in (("squared", 0.4**2 + 0.55**2), ("distance", math.hypot(0.4, 0.55))):
        env = Navigation2D(reward=reward)
        state, r, done = env.step(start, action, tasks)
        torch.testing.assert_close(state, torch.tensor([[[0.1, -0.05]]]))
        torch.testing.assert_close(env.observe(state), state)
        torch.testing.assert_close(r, torch.tensor([[-expected]]))
        assert not done.item()
    # A second step: (0.05, 0.3) -> (0.005, 0.03), within the clip.
    env = Navigation2D(reward="distance")
    state, _, _ = env.step(start, action, tasks)
    state, r, _ = env.step(state, torch.tensor([[[0.05, 0.3]]]), tasks)
    torch.testing.assert_close(state, torch.tensor([[[0.105, -0.02]]]))
    torch.testing.assert_close(r, torch.tensor([[-math.hypot(0.395, 0.52)]]))
    # Negative clipping, and the scale parameter (1.0: the raw action is clipped).
    state, _, _ = env.step(start, torch.tensor([[[-5.0, -0.9]]]), tasks)
    torch.testing.assert_close(state, torch.tensor([[[-0.1, -0.09]]]))
    state, _, _ = Navigation2D(action_scale=1.0).step(start, torch.tensor([[[0.05, 3.0]]]), tasks)
    torch.testing.assert_close(state, torch.tensor([[[0.05, 0.1]]]))


def test_termination_is_a_disc_of_the_done_radius():
    env = Navigation2D()
    # goal 0.005 away: done after one step that does not move.
    # (0.008, 0.008) is in the code's box (|dx|, |dy| < 0.01) but 0.0113 away: not done.
    tasks = goals((0.005, 0.0), (0.008, 0.008), (0.0, -0.0099))
    _, reward, done = env.step(env.reset(tasks, [], 2), torch.zeros(3, 2, 2), tasks)
    assert done.tolist() == [[True, True], [False, False], [True, True]]
    torch.testing.assert_close(reward[:, 0], -(tasks**2).sum(-1))
    _, _, done = Navigation2D(done_radius=0.02).step(
        env.reset(tasks, [], 1), torch.zeros(3, 1, 2), tasks
    )
    assert done.all()


def test_the_mask_stops_at_the_terminating_step():
    # Straight at the goal (0.3, 0.4), 0.5 away, at speed 0.1 ((0.06, 0.08) per step, within
    # the clip): distances 0.4, 0.3, 0.2, 0.1, 0 after steps 1..5; done at step 5.
    tasks = goals((0.3, 0.4))
    for reward, expected in (("distance", -1.0), ("squared", -0.30)):
        env = Navigation2D(reward=reward)
        trajectories = env.rollout(constant(0.6, 0.8), batch_of(env, tasks), 3)
        assert isinstance(trajectories, Trajectories)
        assert trajectories.rewards.shape == trajectories.mask.shape == (1, 3, 100)
        assert trajectories.observations.shape == trajectories.actions.shape == (1, 3, 100, 2)
        assert trajectories.mask[0, :, :5].eq(1).all() and trajectories.mask[0, :, 5:].eq(0).all()
        assert trajectories.rewards[0, :, 5:].eq(0).all()
        torch.testing.assert_close(trajectories.returns, torch.full((1, 3), expected))
        torch.testing.assert_close(trajectories.average_return, torch.tensor([expected]))
        # what the policy saw: the position before each step, starting at the origin
        torch.testing.assert_close(
            trajectories.observations[0, 0, :6],
            torch.tensor([[0.06 * k, 0.08 * k] for k in range(6)]),
        )


def test_a_constant_policy_that_misses_earns_every_step():
    # One step to (0.1, 0) then clipped at 0.1 per step along x: x_k = 0.1 k, goal (0.25, 0.3).
    tasks = goals((0.25, 0.3))
    env = Navigation2D(reward="squared", horizon=4)
    trajectories = env.rollout(constant(1.0, 0.0), batch_of(env, tasks), 1)
    expected = -sum((0.1 * k - 0.25) ** 2 + 0.09 for k in range(1, 5))
    torch.testing.assert_close(trajectories.returns, torch.tensor([[expected]]))
    assert trajectories.mask.eq(1).all()


def test_vectorised_rollouts_equal_one_task_at_a_time_and_any_chunking():
    env = Navigation2D(reward="distance")
    batch = sampled(env, 6, seed=3)
    together = env.rollout(noisy_policy, batch, 5, stream=("adapt", 0))
    assert together.mask.lt(1).any()  # some episodes reach the goal: the mask matters
    for t in range(len(batch)):
        alone = env.rollout(
            noisy_policy,
            TaskBatch(batch.tasks[t : t + 1], batch.seeds[t : t + 1], env),
            5,
            stream=("adapt", 0),
        )
        for name in ("observations", "actions", "rewards", "mask"):
            assert torch.equal(getattr(together, name)[t : t + 1], getattr(alone, name)), name
    chunks = [TaskBatch(batch.tasks[a:b], batch.seeds[a:b], env) for a, b in ((0, 2), (2, 6))]
    parts = [env.rollout(noisy_policy, chunk, 5, stream=("adapt", 0)) for chunk in chunks]
    assert torch.equal(torch.cat([p.rewards for p in parts]), together.rewards)
    concatenated = env.rollout(noisy_policy, TaskBatch.concat(chunks), 5, stream=("adapt", 0))
    assert torch.equal(concatenated.actions, together.actions)


def test_same_seed_same_returns_other_seeds_or_streams_differ():
    env = Navigation2D()
    first = env.rollout(noisy_policy, sampled(env, 4, seed=1), 3).returns
    again = env.rollout(noisy_policy, sampled(env, 4, seed=1), 3).returns
    assert torch.equal(first, again)
    other_tasks = env.rollout(noisy_policy, sampled(env, 4, seed=2), 3).returns
    assert not torch.equal(first, other_tasks)
    batch = sampled(env, 4, seed=1)
    other_stream = env.rollout(noisy_policy, batch, 3, stream=1).returns
    assert not torch.equal(first, other_stream)
    # same goals, other rollout seeds: other noise, other returns
    reseeded = TaskBatch(batch.tasks, batch.seeds + 1, env)
    assert not torch.equal(first, env.rollout(noisy_policy, reseeded, 3).returns)


def test_goals_are_uniform_in_the_unit_square_and_seeded():
    env = Navigation2D()
    tasks = env.sample_tasks(20000, torch.Generator().manual_seed(0))
    assert tasks.shape == (20000, 2) and tasks.dtype == torch.float32
    assert tasks.min() >= -0.5 and tasks.max() <= 0.5
    torch.testing.assert_close(tasks.mean(0), torch.zeros(2), atol=0.01, rtol=0)
    torch.testing.assert_close(tasks.var(0), torch.full((2,), 1 / 12), atol=0.003, rtol=0)
    quadrants = torch.bincount((tasks[:, 0] > 0).long() * 2 + (tasks[:, 1] > 0).long())
    assert (quadrants.float() / 20000 - 0.25).abs().max() < 0.015
    same = env.sample_tasks(20000, torch.Generator().manual_seed(0))
    assert torch.equal(tasks, same)
    assert not torch.equal(tasks, env.sample_tasks(20000, torch.Generator().manual_seed(1)))
    # the reward variants draw the same goals (episode_identity is empty)
    assert torch.equal(
        sampled(Navigation2D(reward="distance"), 8).tasks, sampled(Navigation2D(), 8).tasks
    )


def test_observe_task_appends_the_goal():
    env = Navigation2D(horizon=10)
    batch = sampled(env, 3)
    seen = []

    def policy(observations, noise):
        seen.append(observations.shape)
        return noise

    trajectories = env.rollout(policy, batch, 2, observe_task=True)
    assert seen[0] == (3, 2, 4)
    assert trajectories.observations.shape == (3, 2, 10, 4)
    goal = batch.tasks[:, None, None, :].expand(3, 2, 10, 2)
    assert torch.equal(trajectories.observations[..., 2:], goal)
    plain = env.rollout(noise_only, batch, 2)
    assert torch.equal(plain.observations, trajectories.observations[..., :2])


def noise_only(observations, noise):
    return noise


@pytest.mark.parametrize(
    ("reward", "expected"),
    [("distance", -100 * MEAN_DISTANCE), ("squared", -100 * MEAN_SQUARED_DISTANCE)],
)
def test_staying_at_the_origin_earns_the_papers_scale(reward, expected):
    """-38.3 with the code's reward, close to Table 4's -40.41 before adaptation; -16.7
    with the paper's squared distance."""
    env = Navigation2D(reward=reward)
    returns = env.rollout(constant(0.0, 0.0), sampled(env, 4000), 1).returns
    assert returns.mean().item() == pytest.approx(expected, abs=0.8)


def test_the_rollout_stays_on_the_device_of_the_tasks_and_needs_no_graph():
    env = Navigation2D(horizon=5)
    weight = torch.ones(2, requires_grad=True)
    trajectories = env.rollout(lambda observations, noise: weight * noise, sampled(env, 2), 3)
    # actions keep the policy's graph (learners may use it); the state does not
    assert trajectories.actions.requires_grad
    assert not trajectories.observations.requires_grad and not trajectories.rewards.requires_grad
    if torch.cuda.is_available():
        batch = sampled(env, 2).to("cuda")
        moved = env.rollout(noise_only, batch, 3)
        assert moved.rewards.device.type == "cuda" and moved.mask.device.type == "cuda"
        cpu = env.rollout(noise_only, sampled(env, 2), 3)
        torch.testing.assert_close(moved.rewards.cpu(), cpu.rewards)
