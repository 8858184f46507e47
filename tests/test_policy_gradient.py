"""fewbench.methods.policy_gradient: the policy, returns and advantages, the linear feature baseline,
the inner step and TRPO, against numpy, closed forms, finite differences and direct solves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

import fewbench.methods.policy_gradient as pg
from fewbench.methods.policy_gradient import (
    Distribution,
    GaussianMLPPolicy,
    LinearFeatureBaseline,
    compute_advantages,
    conjugate_gradient,
    discounted_returns,
    fisher_vector_product,
    gae,
    gaussian_kl,
    hessian_vector_product,
    importance_sampled_loss,
    inner_loss,
    inner_step,
    masked_mean,
    params_to_vector,
    policy_gradient_loss,
    standardize_advantages,
    task_mean,
    trpo_step,
    vector_to_params,
)
from fewbench.plugin.environment import Environment, TaskBatch, Trajectories

T, N, H, OBS, ACT = 2, 3, 4, 2, 2


def tiny_policy(dtype=torch.float64, seed=0, hidden=(5,), activation="tanh", obs=OBS, act=ACT):
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(obs, act, hidden, activation=activation).to(dtype)
    with torch.no_grad():  # non-zero biases and std, so that no derivative is trivially zero
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy


def prefix_mask(lengths: list[list[int]], horizon: int) -> torch.Tensor:
    steps = torch.arange(horizon)
    return (steps < torch.tensor(lengths)[..., None]).to(torch.float64)


def tiny_trajectories(policy, dtype=torch.float64, seed=1, params=None) -> Trajectories:
    """Observations, actions sampled from ``policy``, rewards, and a mask with padding."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(T, N, H, policy.observation_dim, generator=g, dtype=dtype)
    noise = torch.randn(T, N, H, policy.action_dim, generator=g, dtype=dtype)
    with torch.no_grad():
        actions = policy.sample(params or policy.params(), obs, noise)
    rewards = torch.randn(T, N, H, generator=g, dtype=dtype)
    mask = prefix_mask([[4, 2, 3], [1, 4, 4]], H).to(dtype)
    return Trajectories(obs, actions, rewards * mask, mask)


def detached(params):
    return {k: v.detach().clone() for k, v in params.items()}


# -- the policy ---------------------------------------------------------------------------------
def test_policy_initialisation_follows_the_authors_policy():
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(3, 2)
    names = sorted(policy.params())
    assert names == [
        "layers.0.bias",
        "layers.0.weight",
        "layers.1.bias",
        "layers.1.weight",
        "layers.2.bias",
        "layers.2.weight",
        "log_std",
    ]
    assert [tuple(policy.params()[f"layers.{i}.weight"].shape) for i in range(3)] == [
        (100, 3),
        (100, 100),
        (2, 100),
    ]
    for layer in policy.layers:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier uniform
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.8 * bound
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    assert torch.equal(policy.log_std, torch.zeros(2))  # std 1
    # the log-std is floored at log(1e-6)
    params = detached(policy.params())
    params["log_std"] = torch.tensor([-30.0, 0.5])
    dist = policy.distribution(params, torch.zeros(4, 3))
    assert torch.allclose(dist.log_std[0], torch.tensor([math.log(1e-6), 0.5]))


def test_log_prob_and_sample_match_torch_distributions_and_functional_call():
    policy = tiny_policy()
    params = policy.params()
    obs = torch.randn(3, 4, OBS, dtype=torch.float64)
    actions = torch.randn(3, 4, ACT, dtype=torch.float64)
    mean, log_std = functional_call(policy, params, (obs,))
    dist = policy.distribution(params, obs)
    assert torch.allclose(dist.mean, mean) and torch.allclose(dist.log_std, log_std)
    reference = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    assert torch.allclose(policy.log_prob(params, obs, actions), reference)
    noise = torch.randn(3, 4, ACT, dtype=torch.float64)
    assert torch.allclose(policy.sample(params, obs, noise), mean + log_std.exp() * noise)
    assert torch.equal(policy.mean_action(params, obs), mean)
    # float32 observations are cast to the parameters' dtype
    assert policy.log_prob(params, obs.float(), actions).dtype == torch.float64


def test_per_task_parameters_equal_one_task_at_a_time():
    policy = tiny_policy()
    per_task = {
        k: v.detach() + 0.1 * torch.randn(T, *v.shape, dtype=v.dtype)
        for k, v in policy.params().items()
    }
    assert policy.is_batched(per_task) and not policy.is_batched(policy.params())
    traj = tiny_trajectories(policy)
    batched = policy.log_prob(per_task, traj.observations, traj.actions)
    for i in range(T):
        one = {k: v[i] for k, v in per_task.items()}
        alone = policy.log_prob(one, traj.observations[i], traj.actions[i])
        assert torch.allclose(batched[i], alone, atol=1e-12)
    expanded = policy.expand_params(policy.params(), T)
    assert torch.allclose(
        policy.log_prob(expanded, traj.observations, traj.actions),
        policy.log_prob(policy.params(), traj.observations, traj.actions),
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="per-task parameters for 2 tasks"):
        policy.distribution(per_task, torch.zeros(3, 4, OBS))


class LinePoint(Environment):
    """A 1-D point robot (a test double): the goal is the task, the action a velocity."""

    name = "line_point"
    task_dim = observation_dim = action_dim = 1
    horizon = 5

    def sample_tasks(self, count, generator):
        return torch.rand(count, 1, generator=generator)

    def reset(self, tasks, generators, trajectories):
        return torch.zeros(len(tasks), trajectories, 1)

    def observe(self, state):
        return state

    def step(self, state, actions, tasks):
        state = state + 0.1 * actions.clamp(-1, 1)
        distance = (state - tasks[:, None, :]).abs().squeeze(-1)
        return state, -distance, distance < 0.01


def test_as_policy_is_the_environment_policy_with_per_task_parameters():
    env = LinePoint()
    batch = TaskBatch(torch.tensor([[0.2], [0.7], [0.5]]), torch.arange(3), env)
    policy = tiny_policy(dtype=torch.float32, obs=1, act=1)
    per_task = {k: v.detach() + 0.2 * torch.randn(3, *v.shape) for k, v in policy.params().items()}
    traj = env.rollout(policy.as_policy(per_task), batch, trajectories=4, stream=("adapt", 0))
    assert traj.actions.shape == (3, 4, 5, 1) and not traj.actions.requires_grad
    noise = env.noise(batch.generators(("adapt", 0)), 4)
    expected = policy.sample(per_task, traj.observations, noise)
    assert torch.allclose(traj.actions, expected, atol=1e-6)
    calm = env.rollout(policy.as_policy(per_task, deterministic=True), batch, 4)
    assert torch.allclose(calm.actions, policy.mean_action(per_task, calm.observations), atol=1e-6)
    shared = env.rollout(policy.as_policy(policy.params()), batch, 2)
    assert shared.actions.shape == (3, 2, 5, 1)


def test_kl_is_zero_for_identical_policies_and_matches_the_closed_form():
    policy = tiny_policy()
    obs = torch.randn(T, N, H, OBS, dtype=torch.float64)
    params = policy.params()
    assert torch.equal(policy.kl(params, params, obs), torch.zeros(T, N, H, dtype=torch.float64))
    other = {k: v.detach() + 0.2 * torch.randn_like(v) for k, v in params.items()}
    old, new = policy.distribution(params, obs), policy.distribution(other, obs)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(old.mean, old.log_std.exp()),
        torch.distributions.Normal(new.mean, new.log_std.exp()),
    ).sum(-1)
    assert torch.allclose(policy.kl(params, other, obs), reference, atol=1e-12)
    # by hand, one dimension: KL(N(0, 1) || N(1, 2^2)) = log 2 + (1 + 1) / 8 - 1/2
    by_hand = math.log(2) + 2 / 8 - 0.5
    kl = gaussian_kl(
        Distribution(torch.zeros(1, 1), torch.zeros(1, 1)),
        Distribution(torch.ones(1, 1), torch.full((1, 1), math.log(2))),
    )
    assert kl.item() == pytest.approx(by_hand, rel=1e-6)


# -- returns and advantages -----------------------------------------------------------------------
def test_returns_to_go_and_gae_by_hand_with_a_mask():
    gamma, lam = 0.5, 0.5
    rewards = torch.tensor([[[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    returns = discounted_returns(rewards, mask, gamma)
    expected = [[3 * 0.25 + 2 * 0.5 + 1, 3 * 0.5 + 2, 3, 0], [1.875, 1.75, 1.5, 1.0]]
    assert torch.allclose(returns, torch.tensor([expected], dtype=torch.float64))
    values = torch.tensor([[[0.5, 1.0, 2.0, 9.0], [1.0, 0.0, 2.0, 4.0]]], dtype=torch.float64)
    # deltas r_t + gamma V_{t+1} m_{t+1} - V_t, V = 0 after the last step
    d1 = [1 + 0.5 * 1.0 - 0.5, 2 + 0.5 * 2.0 - 1.0, 3 + 0 - 2.0]  # 1.0, 2.0, 1.0
    d2 = [1 + 0 - 1.0, 1 + 0.5 * 2 - 0, 1 + 0.5 * 4 - 2, 1 + 0 - 4]  # 0, 2, 1, -3
    gl = gamma * lam  # 0.25
    a1 = [d1[0] + gl * d1[1] + gl**2 * d1[2], d1[1] + gl * d1[2], d1[2], 0.0]
    a2 = [
        d2[0] + gl * d2[1] + gl**2 * d2[2] + gl**3 * d2[3],
        d2[1] + gl * d2[2] + gl**2 * d2[3],
        d2[2] + gl * d2[3],
        d2[3],
    ]
    advantages = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(advantages, torch.tensor([[a1, a2]], dtype=torch.float64))
    # lambda = 1: the return-to-go minus the baseline on valid steps
    assert torch.allclose(gae(rewards, values, mask, gamma, 1.0), (returns - values) * mask)


def test_advantages_are_standardised_per_task_over_valid_steps():
    g = torch.Generator().manual_seed(3)
    advantages = torch.randn(T, N, H, generator=g, dtype=torch.float64) * 5 + 2
    mask = prefix_mask([[4, 2, 3], [1, 4, 4]], H)
    out = standardize_advantages(advantages, mask)
    for i in range(T):
        valid = advantages[i][mask[i] > 0].numpy()
        expected = (valid - valid.mean()) / (valid.std() + 1e-8)  # numpy: population std
        assert np.allclose(out[i][mask[i] > 0].numpy(), expected)
    assert torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=torch.float64))
    assert torch.allclose(task_mean(out, mask), torch.zeros(T, dtype=torch.float64), atol=1e-12)


def rllab_features(obs: np.ndarray) -> np.ndarray:
    """rllab's LinearFeatureBaseline._features for one path (numpy, as rllab wrote it)."""
    o = np.clip(obs, -10, 10)
    length = len(obs)
    al = np.arange(length).reshape(-1, 1) / 100.0
    return np.concatenate([o, o**2, al, al**2, al**3, np.ones((length, 1))], axis=1)


def test_linear_feature_baseline_fit_equals_numpy_lstsq_per_task():
    g = torch.Generator().manual_seed(4)
    tasks, trajectories, horizon, obs_dim = 3, 4, 7, 2
    obs = torch.randn(tasks, trajectories, horizon, obs_dim, generator=g) * 6  # some beyond 10
    lengths = [[7, 3, 5, 7], [2, 7, 7, 6], [7, 7, 7, 7]]
    mask = prefix_mask(lengths, horizon).float()
    rewards = torch.randn(tasks, trajectories, horizon, generator=g) * mask
    returns = discounted_returns(rewards, mask, 0.99)
    baseline = LinearFeatureBaseline()
    values = baseline.fit_predict(obs, returns, mask)
    assert values.shape == (tasks, trajectories, horizon) and values.dtype == torch.float32
    for i in range(tasks):
        paths = range(trajectories)
        featmat = np.concatenate(
            [rllab_features(obs[i, j, : lengths[i][j]].double().numpy()) for j in paths]
        )
        targets = np.concatenate([returns[i, j, : lengths[i][j]].double().numpy() for j in paths])
        coeffs = np.linalg.lstsq(
            featmat.T @ featmat + 1e-5 * np.identity(featmat.shape[1]),
            featmat.T @ targets,
            rcond=None,
        )[0]
        assert np.allclose(baseline.coeffs[i].numpy(), coeffs, rtol=1e-7, atol=1e-9)
        for j in paths:
            n = lengths[i][j]
            predicted = rllab_features(obs[i, j, :n].double().numpy()) @ coeffs
            assert np.allclose(values[i, j, :n].numpy(), predicted, rtol=1e-5, atol=1e-5)


def test_linear_feature_baseline_retries_with_more_regularisation_and_is_detached(monkeypatch):
    g = torch.Generator().manual_seed(5)
    obs = torch.randn(2, 3, 5, 1, generator=g, requires_grad=True)
    returns = torch.randn(2, 3, 5, generator=g)
    mask = torch.ones(2, 3, 5)
    solve = pg._lstsq
    calls = []

    def first_task_fails_twice(a, b):
        calls.append(a.shape[0])
        solution = solve(a, b)
        if len(calls) <= 2:
            solution[0] = math.nan  # the first task of the first two calls
        return solution

    monkeypatch.setattr(pg, "_lstsq", first_task_fails_twice)
    baseline = LinearFeatureBaseline()
    values = baseline.fit_predict(obs, returns, mask)
    assert not values.requires_grad and torch.isfinite(values).all()
    assert calls == [2, 1, 1]  # both tasks, then task 0 with reg 1e-4, then with 1e-3
    # the coefficients of task 0 are those of reg 1e-3, of task 1 those of reg 1e-5
    x = LinearFeatureBaseline.features(obs.detach()).reshape(2, -1, 6)
    y = returns.double().reshape(2, -1, 1)
    for task, reg in ((0, 1e-3), (1, 1e-5)):
        a = x[task].T @ x[task] + reg * torch.eye(6, dtype=torch.float64)
        expected = torch.linalg.solve(a, x[task].T @ y[task]).squeeze(-1)
        assert torch.allclose(baseline.coeffs[task], expected, rtol=1e-8)

    monkeypatch.setattr(pg, "_lstsq", lambda a, b: solve(a, b) * math.inf)
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[0, 1\] after 5 tries"):
        LinearFeatureBaseline().fit(obs, returns, mask)


def test_compute_advantages_chains_returns_baseline_gae_and_standardisation():
    policy = tiny_policy()
    traj = tiny_trajectories(policy)
    out = compute_advantages(traj, gamma=0.9)
    returns = discounted_returns(traj.rewards, traj.mask, 0.9)
    values = LinearFeatureBaseline().fit_predict(traj.observations, returns, traj.mask)
    expected = standardize_advantages(gae(traj.rewards, values, traj.mask, 0.9, 1.0), traj.mask)
    assert torch.allclose(out.returns, returns) and torch.allclose(out.advantages, expected)
    plain = compute_advantages(traj, gamma=0.9, baseline=False, standardize=False)
    assert torch.allclose(plain.advantages, returns)


# -- the policy-gradient estimator and the inner step --------------------------------------------
def test_policy_gradient_equals_a_finite_difference_of_the_importance_weighted_return():
    """On fixed samples from pi_0, J(theta) = task mean of pi_theta / pi_0 * A has the gradient
    mean grad log pi_0 * A at theta_0: the score-function surrogate's gradient, exactly."""
    policy = tiny_policy()
    theta0 = detached(policy.params())
    traj = tiny_trajectories(policy)
    advantages = torch.randn(T, N, H, dtype=torch.float64) * traj.mask
    old = policy.log_prob(theta0, traj.observations, traj.actions)

    def objective(vector):
        params = vector_to_params(vector, theta0)
        ratio = torch.exp(policy.log_prob(params, traj.observations, traj.actions) - old)
        return task_mean(ratio * advantages, traj.mask).sum()

    loss = inner_loss(policy, policy.params(), traj, advantages).sum()
    surrogate_grad = pg.flat_grad(loss, policy.params())
    vector, eps = params_to_vector(theta0), 1e-6
    fd = torch.stack(
        [
            (objective(vector + eps * e) - objective(vector - eps * e)) / (2 * eps)
            for e in torch.eye(len(vector), dtype=torch.float64)
        ]
    )
    assert torch.allclose(-surrogate_grad, fd, rtol=1e-6, atol=1e-8)
    # the same through the importance-sampled surrogate, at theta_0
    is_loss = importance_sampled_loss(
        policy.log_prob(policy.params(), traj.observations, traj.actions),
        old,
        advantages,
        traj.mask,
    ).sum()
    assert torch.allclose(pg.flat_grad(is_loss, policy.params()), surrogate_grad, atol=1e-12)


def test_policy_gradient_on_a_gaussian_bandit_matches_the_closed_form():
    """A one-step bandit, reward -(a - c)^2, a ~ N(mu, sigma^2): E r = -((mu - c)^2 + sigma^2),
    d/dmu = -2 (mu - c), d/dlog sigma = -2 sigma^2. With zero observations and zero hidden
    biases the mean is the output bias."""
    policy = tiny_policy(hidden=(3,), obs=1, act=1, activation="relu")
    with torch.no_grad():
        for layer in policy.layers[:-1]:
            layer.bias.zero_()
        policy.layers[-1].bias.fill_(0.3)
        policy.log_std.fill_(math.log(0.7))
    mu, sigma, c, samples = 0.3, 0.7, 1.0, 200_000
    g = torch.Generator().manual_seed(6)
    obs = torch.zeros(1, samples, 1, 1, dtype=torch.float64)
    noise = torch.randn(1, samples, 1, 1, generator=g, dtype=torch.float64)
    actions = policy.sample(detached(policy.params()), obs, noise)
    reward = -((actions.squeeze(-1) - c) ** 2)
    advantages = reward - reward.mean()  # a constant baseline: unbiased, less variance
    mask = torch.ones_like(reward)
    log_prob = policy.log_prob(policy.params(), obs, actions)
    loss = policy_gradient_loss(log_prob, advantages, mask).sum()
    grad_mu, grad_log_std = torch.autograd.grad(loss, [policy.layers[-1].bias, policy.log_std])
    assert -grad_mu.item() == pytest.approx(-2 * (mu - c), rel=0.03)
    assert -grad_log_std.item() == pytest.approx(-2 * sigma**2, rel=0.03)


def test_inner_step_is_one_gradient_step_per_task():
    policy = tiny_policy()
    traj = tiny_trajectories(policy)
    advantages = compute_advantages(traj).advantages
    adapted = inner_step(policy, policy.params(), traj, advantages, 0.1)
    assert all(v.shape[0] == T and v.requires_grad for v in adapted.values())
    for i in range(T):
        params = {k: v.detach().clone().requires_grad_() for k, v in policy.params().items()}
        log_prob = policy.log_prob(params, traj.observations[i], traj.actions[i])
        loss = policy_gradient_loss(log_prob[None], advantages[i : i + 1], traj.mask[i : i + 1])
        grads = torch.autograd.grad(loss.sum(), list(params.values()))
        for (name, p), grad in zip(params.items(), grads, strict=True):
            assert torch.allclose(adapted[name][i], p - 0.1 * grad, atol=1e-12)
    # detached parameters (test time, or a line search under no_grad): the same values, detached
    with torch.no_grad():
        again = inner_step(policy, detached(policy.params()), traj, advantages, 0.1)
    assert all(not v.requires_grad for v in again.values())
    assert all(torch.allclose(again[k], adapted[k]) for k in adapted)
    # a second step from per-task parameters, and a step size per parameter
    sizes = {k: 0.05 for k in adapted} | {"log_std": 0.0}
    second = inner_step(policy, again, traj, advantages, sizes)
    assert torch.equal(second["log_std"], again["log_std"])
    assert not torch.allclose(second["layers.0.weight"], again["layers.0.weight"])


def post_update_loss(policy, theta, pre, pre_adv, post, post_adv, alpha, first_order=False):
    adapted = inner_step(policy, theta, pre, pre_adv, alpha, first_order=first_order)
    return inner_loss(policy, adapted, post, post_adv).mean()


def test_second_order_meta_gradient_equals_a_finite_difference():
    policy = tiny_policy()
    pre, post = tiny_trajectories(policy, seed=1), tiny_trajectories(policy, seed=2)
    pre_adv, post_adv = compute_advantages(pre).advantages, compute_advantages(post).advantages
    theta = policy.params()
    meta_grad = pg.flat_grad(
        post_update_loss(policy, theta, pre, pre_adv, post, post_adv, 0.5), theta
    )
    vector = params_to_vector(theta).detach()

    def value(v):
        params = {k: p.requires_grad_() for k, p in vector_to_params(v.clone(), theta).items()}
        return post_update_loss(policy, params, pre, pre_adv, post, post_adv, 0.5).item()

    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        direction = torch.randn(len(vector), generator=g, dtype=torch.float64)
        eps = 1e-5
        fd = (value(vector + eps * direction) - value(vector - eps * direction)) / (2 * eps)
        assert (meta_grad @ direction).item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # first order: the post-update gradient at theta', summed over tasks, as a constant
    first = pg.flat_grad(
        post_update_loss(policy, theta, pre, pre_adv, post, post_adv, 0.5, first_order=True), theta
    )
    adapted = {
        k: v.detach().requires_grad_()
        for k, v in inner_step(policy, detached(theta), pre, pre_adv, 0.5).items()
    }
    per_task = torch.autograd.grad(
        inner_loss(policy, adapted, post, post_adv).mean(), list(adapted.values())
    )
    expected = torch.cat([gr.sum(0).reshape(-1) for gr in per_task])
    assert torch.allclose(first, expected, atol=1e-12)
    assert not torch.allclose(first, meta_grad, atol=1e-6)


# -- TRPO -------------------------------------------------------------------------------------------
def kl_and_loss(policy, traj, advantages, theta_old, maml=None, alpha=0.5, first_order=False):
    """The outer step's loss and mean KL, optionally through an inner step (MAML)."""
    old_params = detached(theta_old)
    if maml is not None:
        pre, pre_adv = maml
        old_params = inner_step(policy, old_params, pre, pre_adv, alpha)
    old = policy.distribution(old_params, traj.observations)
    old = Distribution(old.mean.detach(), old.log_std.detach())
    old_log_prob = pg.gaussian_log_prob(old, traj.actions)

    def adapted(params):
        if maml is None:
            return params
        return inner_step(policy, params, *maml, alpha, first_order=first_order)

    def loss_fn(params):
        log_prob = policy.log_prob(adapted(params), traj.observations, traj.actions)
        return importance_sampled_loss(log_prob, old_log_prob, advantages, traj.mask).mean()

    def kl_fn(params):
        new = policy.distribution(adapted(params), traj.observations)
        return masked_mean(gaussian_kl(old, new), traj.mask)

    return loss_fn, kl_fn


def explicit_hessian(fn, params):
    vector = params_to_vector(params).detach().to(torch.float64)

    def flat(v):
        return fn(vector_to_params(v, params))

    return torch.autograd.functional.hessian(flat, vector)


def test_conjugate_gradient_solves_the_damped_fisher_system():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=6, residual_tol=0.0)
    # rllab's 1e-8 in the denominators bounds the accuracy near 1e-8
    assert torch.allclose(x, torch.linalg.solve(a, b), rtol=1e-6, atol=1e-8)

    policy = tiny_policy(hidden=(4,), act=1)
    traj = tiny_trajectories(policy)
    advantages = compute_advantages(traj).advantages
    loss_fn, kl_fn = kl_and_loss(policy, traj, advantages, policy.params())
    theta = policy.params()
    fisher = explicit_hessian(kl_fn, theta)  # 18 x 18, built with double backward
    damping = 1e-5
    fvp = hessian_vector_product(kl_fn, theta, method="exact", damping=damping)
    v = torch.randn(len(fisher), generator=g, dtype=torch.float64)
    assert torch.allclose(fvp(v), fisher @ v + damping * v, atol=1e-12)
    grad = pg.flat_grad(loss_fn(theta), theta)
    system = fisher + damping * torch.eye(len(fisher), dtype=torch.float64)
    direct = torch.linalg.solve(system, grad)
    # textbook CG (eps=0) converges to the direct solve within a few times n iterations
    solved = conjugate_gradient(fvp, grad, iters=3 * len(grad), residual_tol=1e-30, eps=0.0)
    assert torch.allclose(solved, direct, rtol=1e-7, atol=1e-9)
    # rllab's eps=1e-8 does too where r^T r stays far above 1e-8 (a scaled right-hand side)
    scaled = conjugate_gradient(fvp, 1e4 * grad, iters=3 * len(grad), residual_tol=1e-30) / 1e4
    assert (scaled - direct).norm() < 1e-3 * direct.norm()
    # the default 10 iterations give a descent direction that already shrinks the residual
    ten = conjugate_gradient(fvp, grad)
    assert ten @ grad > 0 and (system @ ten - grad).norm() < 0.5 * grad.norm()


@pytest.mark.parametrize("maml", [False, True])
def test_exact_and_finite_difference_hessian_vector_products_agree(maml):
    policy = tiny_policy()
    traj = tiny_trajectories(policy, seed=2)
    advantages = compute_advantages(traj).advantages
    pre = tiny_trajectories(policy, seed=1)
    inner = (pre, compute_advantages(pre).advantages) if maml else None
    _, kl_fn = kl_and_loss(policy, traj, advantages, policy.params(), maml=inner)
    theta = policy.params()
    exact = hessian_vector_product(kl_fn, theta, method="exact")
    fd = hessian_vector_product(kl_fn, theta, method="finite_difference")
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        v = torch.randn(len(params_to_vector(theta)), generator=g, dtype=torch.float64)
        assert torch.allclose(fd(v), exact(v), rtol=1e-5, atol=1e-8)


INNER_STEPS = {
    "none": {},
    "second_order": {"step_size": 0.5},
    "first_order": {"step_size": 0.5, "first_order": True},
    # J_i = I - diag(alpha) H_{L_i} is not symmetric then: the product needs J_i^T
    "per_parameter": {"step_size": {"layers.0.weight": 0.5, "log_std": 0.2}},
}


def fisher_problem(inner, policy=None, dtype=torch.float64):
    """A policy, post-update trajectories and the KL of the outer step (through an inner step
    unless ``inner`` is ``none``), with :func:`fisher_vector_product`'s keywords for it."""
    policy = policy or tiny_policy(dtype=dtype)
    traj = tiny_trajectories(policy, dtype=dtype, seed=2)
    pre = tiny_trajectories(policy, dtype=dtype, seed=1)
    keywords = dict(INNER_STEPS[inner])
    maml = None
    if inner != "none":
        maml = (pre, compute_advantages(pre).advantages)
        keywords["inner"] = maml
        if isinstance(keywords["step_size"], dict):  # the parameters left out do not step
            keywords["step_size"] = {k: 0.0 for k in policy.params()} | keywords["step_size"]
    alpha = keywords.get("step_size", 0.5)
    advantages = compute_advantages(traj).advantages
    loss_fn, kl_fn = kl_and_loss(
        policy,
        traj,
        advantages,
        policy.params(),
        maml=maml,
        alpha=alpha,
        first_order=keywords.get("first_order", False),
    )
    return policy, traj, loss_fn, kl_fn, keywords


@pytest.mark.parametrize("inner", list(INNER_STEPS))
def test_fisher_product_is_the_exact_hessian_of_the_kl_at_the_sampling_parameters(inner):
    """sum_i J_i F_i J_i, second derivatives only, equals the double-backward product through
    the inner step (a third derivative) and the explicit Hessian, at theta_old."""
    policy, traj, _, kl_fn, keywords = fisher_problem(inner)
    theta = policy.params()
    damping = 1e-5
    fisher = fisher_vector_product(
        policy, theta, traj.observations, traj.mask, damping=damping, **keywords
    )
    exact = hessian_vector_product(kl_fn, theta, method="exact", damping=damping)
    g = torch.Generator().manual_seed(8)
    size = len(params_to_vector(theta))
    for _ in range(3):
        v = torch.randn(size, generator=g, dtype=torch.float64)
        assert torch.allclose(fisher(v), exact(v), rtol=1e-9, atol=1e-12)
    # the whole matrix, column by column, against the Hessian built by double backward
    undamped = fisher_vector_product(policy, theta, traj.observations, traj.mask, **keywords)
    matrix = torch.stack([undamped(e) for e in torch.eye(size, dtype=torch.float64)], dim=1)
    hessian = explicit_hessian(kl_fn, theta)
    assert torch.allclose(matrix, hessian, rtol=1e-9, atol=1e-12)
    assert torch.allclose(matrix, matrix.T, atol=1e-12)
    assert torch.linalg.eigvalsh(matrix).min() > -1e-10  # positive semi-definite
    assert hessian.abs().max() > 1e-2  # not trivially zero
    if inner == "second_order":  # J_i matters: the first-order product differs
        first = fisher_vector_product(
            policy, theta, traj.observations, traj.mask, first_order=True, **keywords
        )
        v = torch.randn(size, generator=g, dtype=torch.float64)
        assert not torch.allclose(first(v), undamped(v), rtol=1e-3)


def test_fisher_product_in_float32_and_inside_trpo_step():
    policy32 = tiny_policy(dtype=torch.float32)
    policy, traj, _, kl_fn, keywords = fisher_problem("second_order", policy32, torch.float32)
    theta = policy.params()
    fisher = fisher_vector_product(policy, theta, traj.observations, traj.mask, **keywords)
    exact = hessian_vector_product(kl_fn, theta, method="exact", damping=0.0)
    v = torch.randn(len(params_to_vector(theta)), dtype=torch.float64)
    out = fisher(v)
    assert out.dtype == torch.float64  # the vector's dtype, computed in the parameters'
    assert torch.allclose(out, exact(v), rtol=1e-4, atol=1e-6)

    # trpo_step takes the ready-made product and adds its damping; the step equals exact's
    steps = {}
    for name in ("exact", "fisher"):
        policy, traj, loss_fn, kl_fn, keywords = fisher_problem("second_order")
        product = fisher_vector_product(
            policy, policy.params(), traj.observations, traj.mask, **keywords
        )
        calls = []

        def counted(x, product=product, calls=calls):
            calls.append(x)
            return product(x)

        hvp = counted if name == "fisher" else "exact"
        record = trpo_step(policy.params(), loss_fn, kl_fn, damping=1e-3, hvp=hvp)
        assert record.accepted
        steps[name] = (params_to_vector(policy.params()).detach(), record)
        if name == "fisher":
            assert calls and all(x.dtype == torch.float64 for x in calls)
    (exact_theta, exact_record), (fisher_theta, fisher_record) = steps["exact"], steps["fisher"]
    assert fisher_record.step_fraction == exact_record.step_fraction
    assert fisher_record.step_scale == pytest.approx(exact_record.step_scale, rel=1e-9)
    assert torch.allclose(fisher_theta, exact_theta, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="fisher_vector_product"):
        trpo_step(policy.params(), loss_fn, kl_fn, hvp="fisher")


def test_finite_difference_product_runs_in_float64_for_float32_parameters():
    policy = tiny_policy(dtype=torch.float32)
    traj = tiny_trajectories(policy, dtype=torch.float32)
    _, kl_fn = kl_and_loss(policy, traj, traj.rewards, policy.params())
    theta = policy.params()
    seen = []

    def spy(params):
        seen.append(next(iter(params.values())).dtype)
        return kl_fn(params)

    fd = hessian_vector_product(spy, theta, method="finite_difference")
    exact = hessian_vector_product(kl_fn, theta, method="exact")
    v = torch.randn(len(params_to_vector(theta)))
    assert torch.allclose(fd(v), exact(v), rtol=1e-3, atol=1e-5)
    assert set(seen) == {torch.float64}


@pytest.mark.parametrize(("hvp", "maml"), [("finite_difference", False), ("exact", True)])
def test_trpo_step_respects_the_kl_bound_and_reduces_the_loss(hvp, maml):
    policy = tiny_policy()
    traj = tiny_trajectories(policy, seed=2)
    pre = tiny_trajectories(policy, seed=1)
    advantages = compute_advantages(traj).advantages
    inner = (pre, compute_advantages(pre).advantages) if maml else None
    loss_fn, kl_fn = kl_and_loss(policy, traj, advantages, policy.params(), maml=inner)
    before = params_to_vector(policy.params()).detach().clone()
    record = trpo_step(policy.params(), loss_fn, kl_fn, max_kl=0.01, hvp=hvp)
    assert record.accepted and 0 < record.step_fraction <= 1
    assert record.step_fraction == pytest.approx(0.8**record.backtracks)
    assert record.kl_before == pytest.approx(0.0, abs=1e-12)
    after = policy.params()
    assert not torch.equal(params_to_vector(after).detach(), before)
    with torch.no_grad():
        kl, loss = kl_fn(detached(after)).item(), loss_fn(detached(after)).item()
    assert 0 < kl <= 0.01 and kl == pytest.approx(record.kl_after)
    assert loss < record.loss_before and loss == pytest.approx(record.loss_after)
    assert set(record.as_dict()) >= {"accepted", "step_fraction", "kl_after", "loss_before"}


def test_a_line_search_that_cannot_improve_restores_theta_exactly():
    policy = tiny_policy()
    traj = tiny_trajectories(policy, seed=2)
    advantages = compute_advantages(traj).advantages
    loss_fn, kl_fn = kl_and_loss(policy, traj, advantages, policy.params())
    before = {k: v.detach().clone() for k, v in policy.params().items()}

    def unchanged():
        return all(torch.equal(v, before[k]) for k, v in policy.params().items())

    # every candidate violates the KL bound (the KL shifted up: same Hessian)
    record = trpo_step(policy.params(), loss_fn, lambda p: kl_fn(p) + 1.0)
    assert not record.accepted and record.step_fraction == 0 and record.backtracks == 15
    assert record.loss_after == record.loss_before and unchanged()
    # the loss gets worse in every direction (a kink at theta: abs has a zero gradient at 0)
    theta0 = params_to_vector(policy.params()).detach().clone()

    def kinked(params):
        return (
            loss_fn(params)
            + 1e3 * (params_to_vector(params) - theta0.to(torch.float64)).abs().sum()
        )

    record = trpo_step(policy.params(), kinked, kl_fn)
    assert not record.accepted and record.candidate_loss > record.loss_before and unchanged()

    # a NaN loss is never accepted
    def nan_at_candidates(params):
        loss = loss_fn(params)
        return loss if next(iter(params.values())).requires_grad else loss * math.nan

    record = trpo_step(policy.params(), nan_at_candidates, kl_fn)
    assert not record.accepted and unchanged()
