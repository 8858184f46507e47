"""The mathematics every reinforcement-learning learner shares, public.

Finn, Abbeel & Levine 2017, "Model-Agnostic Meta-Learning" (arXiv:1703.03400v3), section 5.3 and
appendix A.2, meta-train a Gaussian MLP policy: a vanilla policy-gradient inner step with a linear
feature baseline (Duan et al. 2016), and a TRPO outer step (Schulman et al. 2015, appendix C) through
the inner step. This module is that mathematics, written once and batched over tasks; the learners
(``maml_trpo``, ``pretrain_rl``, ``random_init``, ``oracle``) compose it. References to the authors'
code name files of ``cbfinn/maml_rl`` (an rllab fork) and of ``rll/rllab``; docs/design/maml-rl.md
(sections 3 and 5) records what they do and which choices fewbench made.

* :class:`GaussianMLPPolicy`: the policy, evaluated functionally on a parameter dict, either one
  set of parameters (the meta-parameters theta) or one per task (a leading ``T`` dimension: the
  adapted theta'_i), and :meth:`GaussianMLPPolicy.as_policy`, the environment's policy callable
  (:data:`fewbench.plugin.environment.Policy`).
* :func:`discounted_returns`, :func:`gae`, :func:`standardize_advantages`,
  :class:`LinearFeatureBaseline` and :func:`compute_advantages`, which chains them as the code's
  ``process_samples`` does, per task.
* :func:`policy_gradient_loss` (the inner step's surrogate), :func:`importance_sampled_loss` (the
  outer step's), :func:`inner_loss` and :func:`inner_step`: ``theta'_i = theta - alpha grad L_i``,
  differentiable to second order or first order.
* :func:`conjugate_gradient`, :func:`hessian_vector_product` (exact or the paper's finite
  difference), :func:`fisher_vector_product` (exact at the sampling parameters without third
  derivatives: ``sum_i J_i^T F_i J_i`` through the inner step) and :func:`trpo_step` (the step
  scale and the backtracking line search).

Batching over tasks is explicit, not ``torch.func.vmap``: per-task parameters carry a leading
``T`` dimension and the MLP is a batched matrix product (``[T, M, in] @ [T, in, out]``). Three
reasons. (1) The outer step differentiates through the inner step: the exact Hessian-vector
product of the KL is a third derivative, and with explicit batching every derivative is plain
``torch.autograd`` on ordinary tensors, to any order, in float32 or float64, with no functorch
transform to nest. (2) The inner gradients of all tasks come from one ``torch.autograd.grad`` of
the sum of the per-task losses with respect to the ``[T, ...]`` copies of theta (task i's loss
depends only on copy i, so the gradient of the sum at copy i is task i's gradient). (3) It costs
what vmap would: the batched product is the kernel vmap would emit for a batched weight.

Shapes: ``T`` tasks, ``N`` trajectories per task, ``H`` steps (the horizon); trajectories are
:class:`fewbench.plugin.environment.Trajectories` (``observations [T, N, H, obs]``, ``actions [T, N, H,
act]``, ``rewards`` and ``mask [T, N, H]``). Means "over valid steps" weigh the steps with
``mask == 1`` and ignore the rest (the padding after an episode ended).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fewbench.plugin.environment import Policy, Trajectories

Params = dict[str, Tensor]
LossFn = Callable[[Params], Tensor]

MIN_STD = 1e-6  # the code's MAMLGaussianMLPPolicy(min_std=1e-6)
HVP_METHODS = ("finite_difference", "exact")


# -- masked reductions and parameter vectors ---------------------------------------------------
def masked_mean(values: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """The mean of ``values`` over the steps where ``mask`` is 1, over ``dim`` (all dimensions
    when None). Padded steps are ignored even when they hold inf or NaN; a slice without any
    valid step gives 0."""
    valid = mask > 0
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if dim is None:
        return total.sum() / valid.sum().clamp_min(1)
    return total.sum(dim=dim) / valid.sum(dim=dim).clamp_min(1)


def task_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Each task's mean over its valid steps (all dimensions but the first): ``[T]``."""
    return masked_mean(values, mask, dim=tuple(range(1, values.dim())))


def params_to_vector(params: Mapping[str, Tensor]) -> Tensor:
    """The parameters flattened and concatenated in the dict's order (the dict counterpart of
    ``torch.nn.utils.parameters_to_vector``; differentiable)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def vector_to_params(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """The inverse of :func:`params_to_vector`: views of ``vector`` shaped as ``like``'s tensors
    (differentiable; the dtype is the vector's)."""
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vector[start : start + p.numel()].view(p.shape)
        start += p.numel()
    if start != vector.numel():
        raise ValueError(f"a vector of {vector.numel()} values for {start} parameters")
    return out


def flat_grad(
    output: Tensor,
    params: Mapping[str, Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tensor:
    """``d output / d params`` as one flat vector (zeros for parameters ``output`` does not use)."""
    tensors = list(params.values())
    grads = torch.autograd.grad(
        output, tensors, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, tensors, strict=True)
        ]
    )


# -- the policy --------------------------------------------------------------------------------
class Distribution(NamedTuple):
    """A diagonal Gaussian per step: ``mean [..., act]`` and ``log_std`` of the same shape."""

    mean: Tensor
    log_std: Tensor


def gaussian_log_prob(distribution: Distribution, actions: Tensor) -> Tensor:
    """``log N(actions; mean, diag(std^2))`` summed over the action dimensions: ``[...]``.

    rllab ``sandbox/rocky/tf/distributions/diagonal_gaussian.py``, ``log_likelihood_sym``
    (the constant ``-act/2 log 2 pi`` included)."""
    mean, log_std = distribution
    z = (actions - mean) * torch.exp(-log_std)
    return -log_std.sum(-1) - 0.5 * z.pow(2).sum(-1) - 0.5 * mean.shape[-1] * math.log(2 * math.pi)


def gaussian_kl(old: Distribution, new: Distribution) -> Tensor:
    """KL(old || new) of diagonal Gaussians, summed over the action dimensions: ``[...]``.

    rllab ``diagonal_gaussian.py``, ``kl_sym(old, new)`` (the KL direction the authors' TRPO
    constrains): ``sum(((mu_o - mu_n)^2 + s_o^2 - s_n^2) / (2 s_n^2) + log s_n - log s_o)``.
    Deviation: rllab adds 1e-8 to the denominator ``2 s_n^2``; here it is the exact closed form
    (with the std floored at 1e-6, ``2 s_n^2`` can be 2e-12, which 1e-8 would swamp). Both are 0
    for identical distributions."""
    var_old = torch.exp(2 * old.log_std)
    var_new = torch.exp(2 * new.log_std)
    numerator = (old.mean - new.mean).pow(2) + var_old - var_new
    return (numerator / (2 * var_new) + new.log_std - old.log_std).sum(-1)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": torch.relu, "tanh": torch.tanh}


class GaussianMLPPolicy(nn.Module):
    """A diagonal Gaussian policy: an MLP mean and one learnt, state-independent log-std.

    The authors' ``MAMLGaussianMLPPolicy`` (maml_rl ``sandbox/rocky/tf/policies/
    maml_minimal_gauss_mlp_policy.py``) with the paper's sizes (section 5.3: two hidden layers of
    100 ReLU units): hidden layers with ``activation``, a linear output; Xavier-uniform weights
    and zero biases (its ``create_MLP`` defaults); ``log_std`` initialised to ``log(init_std)``
    (0: std 1) and floored at ``log(min_std)`` (1e-6) when used, as its ``dist_info_sym`` floors
    it with ``tf.maximum``. The inner step updates every parameter, the log-std included.

    Parameters are named ``layers.{i}.weight``, ``layers.{i}.bias`` and ``log_std``
    (:meth:`params`). Every method takes a parameter dict: either one set (shapes as the
    module's) applied to observations of any leading shape, or one set per task (a leading ``T``
    dimension, as :func:`inner_step` returns) applied to observations ``[T, ...]``, task ``i``'s
    parameters to task ``i``'s observations. The methods read the dict directly; they equal
    ``torch.func.functional_call(policy, params, (observations,))`` (tested) without swapping
    tensors into the module, so threads may share a policy. Observations are cast to the
    parameters' dtype (float64 parameters for the finite-difference Hessian-vector product).
    """

    def __init__(
        self,
        observation_dim: int,
        action_dim: int,
        hidden_sizes: Iterable[int] = (100, 100),
        *,
        activation: str = "relu",
        init_std: float = 1.0,
        min_std: float = MIN_STD,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        sizes = [observation_dim, *hidden_sizes, action_dim]
        self.observation_dim, self.action_dim = observation_dim, action_dim
        self.activation = activation
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(init_std)))
        self.min_log_std = math.log(min_std)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for layer in self.layers:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    # -- parameters --------------------------------------------------------------------------
    def params(self) -> Params:
        """The module's own parameters (theta) as a dict: the leaves an optimiser updates."""
        return dict(self.named_parameters())

    def is_batched(self, params: Mapping[str, Tensor]) -> bool:
        """Whether ``params`` holds one set per task (a leading ``T`` dimension)."""
        return params["log_std"].dim() == 2

    def expand_params(self, params: Mapping[str, Tensor], tasks: int) -> Params:
        """``T`` copies of one set of parameters (``expand`` views: differentiable, with the
        gradient of copy ``i`` flowing back into ``params``)."""
        if self.is_batched(params):
            if params["log_std"].shape[0] != tasks:
                raise ValueError(
                    f"{params['log_std'].shape[0]} sets of parameters for {tasks} tasks"
                )
            return dict(params)
        return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}

    # -- evaluation ----------------------------------------------------------------------------
    def forward(self, observations: Tensor) -> Distribution:
        """The distribution with the module's parameters (or those ``functional_call`` swaps in)."""
        weights = [(layer.weight, layer.bias) for layer in self.layers]
        return self._evaluate(weights, self.log_std, observations)

    def distribution(self, params: Mapping[str, Tensor], observations: Tensor) -> Distribution:
        """The action distribution at ``observations [..., obs]`` (``[T, ...]`` for per-task
        parameters): mean and log-std ``[..., act]``."""
        weights = [
            (params[f"layers.{i}.weight"], params[f"layers.{i}.bias"])
            for i in range(len(self.layers))
        ]
        return self._evaluate(weights, params["log_std"], observations)

    def _evaluate(
        self, weights: list[tuple[Tensor, Tensor]], log_std: Tensor, observations: Tensor
    ) -> Distribution:
        batched = log_std.dim() == 2
        x = observations.to(weights[0][0].dtype)
        lead = x.shape[:-1]
        if batched:
            if x.dim() < 2 or x.shape[0] != log_std.shape[0]:
                raise ValueError(
                    f"per-task parameters for {log_std.shape[0]} tasks and observations of shape "
                    f"{tuple(observations.shape)}"
                )
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # [T, M, obs]
        act = ACTIVATIONS[self.activation]
        for i, (w, b) in enumerate(weights):
            x = torch.matmul(x, w.transpose(-1, -2)) + (b.unsqueeze(-2) if batched else b)
            if i < len(weights) - 1:
                x = act(x)
        mean = x.reshape(*lead, x.shape[-1])
        log_std = log_std.clamp(min=self.min_log_std)
        if batched:
            log_std = log_std.reshape(log_std.shape[0], *([1] * (len(lead) - 1)), -1)
        return Distribution(mean, log_std.expand_as(mean))

    def log_prob(
        self, params: Mapping[str, Tensor], observations: Tensor, actions: Tensor
    ) -> Tensor:
        """``log pi(actions | observations)``, summed over action dimensions: ``[...]``."""
        return gaussian_log_prob(self.distribution(params, observations), actions)

    def sample(self, params: Mapping[str, Tensor], observations: Tensor, noise: Tensor) -> Tensor:
        """``mean + std * noise``: the action for the standard-normal ``noise`` the environment
        draws (the code's ``get_actions``: ``rnd * exp(log_std) + mean``)."""
        mean, log_std = self.distribution(params, observations)
        return mean + torch.exp(log_std) * noise.to(mean.dtype)

    def mean_action(self, params: Mapping[str, Tensor], observations: Tensor) -> Tensor:
        """The deterministic action (the mean), for an optional deterministic evaluation."""
        return self.distribution(params, observations).mean

    def kl(
        self,
        params_old: Mapping[str, Tensor],
        params_new: Mapping[str, Tensor],
        observations: Tensor,
    ) -> Tensor:
        """KL(pi_old || pi_new) at each step of ``observations``: ``[...]`` (:func:`gaussian_kl`).
        Nothing is detached: TRPO's caller passes ``params_old`` detached (the policy that
        sampled the data is a constant)."""
        return gaussian_kl(
            self.distribution(params_old, observations), self.distribution(params_new, observations)
        )

    def as_policy(self, params: Mapping[str, Tensor], *, deterministic: bool = False) -> Policy:
        """The environment's policy callable, ``policy(observations [T, N, obs], noise [T, N, act])
        -> actions [T, N, act]``, for one set of parameters (shared by all tasks) or one per task
        (``[T, ...]``: task ``i`` acts with its own, as the code's post-update sampling does).
        Actions are detached and in the observations' dtype; ``deterministic`` acts with the
        mean and ignores the noise."""
        frozen = {k: v.detach() for k, v in params.items()}

        def policy(observations: Tensor, noise: Tensor) -> Tensor:
            with torch.no_grad():
                if deterministic:
                    actions = self.mean_action(frozen, observations)
                else:
                    actions = self.sample(frozen, observations, noise)
            return actions.to(observations.dtype)

        return policy


# -- returns and advantages ----------------------------------------------------------------
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 0.99) -> Tensor:
    """Discounted returns-to-go ``R_t = r_t + gamma R_{t+1}`` within each trajectory, 0 on
    padded steps: ``[..., H]``.

    rllab ``rllab/sampler/base.py`` ``process_samples``: ``path["returns"] =
    special.discount_cumsum(path["rewards"], discount)``, per path. The return after the last
    step is 0 whether the episode ended or hit the horizon (rllab bootstraps neither)."""
    steps = rewards.shape[-1]
    running = torch.zeros_like(rewards[..., 0])
    out = [running] * steps
    for t in reversed(range(steps)):
        running = (rewards[..., t] + gamma * running) * mask[..., t]
        out[t] = running
    return torch.stack(out, dim=-1)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 0.99, lam: float = 1.0
) -> Tensor:
    """Generalised advantage estimates (Schulman et al. 2016), 0 on padded steps: ``[..., H]``.

    rllab ``process_samples``: ``deltas = r_t + gamma V_{t+1} - V_t`` with ``V = 0`` after a
    trajectory's last step (``np.append(baselines, 0)``), ``advantages =
    discount_cumsum(deltas, gamma * lam)``. With ``lam = 1`` (the code's ``gae_lambda``) the
    advantage is the discounted return-to-go minus the baseline: REINFORCE with a baseline."""
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    after = torch.where(mask[..., 1:] > 0, values[..., 1:], zero)
    next_values = torch.cat([after, torch.zeros_like(values[..., :1])], dim=-1)
    deltas = torch.where(mask > 0, rewards + gamma * next_values - values, zero)
    return discounted_returns(deltas, mask, gamma * lam)


def standardize_advantages(advantages: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(A - mean) / (std + eps)`` per task over its valid steps (population std), 0 on padded
    steps: ``[T, ...]``.

    rllab ``rllab/algos/util.py`` ``center_advantages`` (``center_adv=True``), applied by
    ``BatchMAMLPolopt`` to each task's samples separately, pre- and post-update."""
    dims = tuple(range(1, advantages.dim()))
    mean = masked_mean(advantages, mask, dims).reshape(-1, *([1] * len(dims)))
    var = masked_mean((advantages - mean).pow(2), mask, dims).reshape(-1, *([1] * len(dims)))
    return (advantages - mean) / (var.sqrt() + eps) * mask


class LinearFeatureBaseline:
    """The linear feature baseline of Duan et al. 2016 ("Benchmarking deep RL for continuous
    control"), fitted per task, all tasks at once.

    rllab ``rllab/baselines/linear_feature_baseline.py`` (maml_rl's copy, 73dd290): features per
    step ``[o, o^2, t/100, (t/100)^2, (t/100)^3, 1]`` with ``o = clip(obs, -10, 10)`` and ``t`` the
    step index (divided by 100 whatever the horizon); ``coeffs = lstsq(X^T X + reg I, X^T y)``
    on the discounted returns ``y``, ``reg = 1e-5``, solved up to ``max_tries`` (5) times with
    ``reg *= 10`` while the solution is not finite.

    As the paper says ("fitted separately at each iteration for each sampled task"), and as
    maml_rl's ``rllab/sampler/base.py`` fb26875 and pytorch-maml-rl do, each task's baseline is
    fitted on that task's batch and then predicts on the same batch (version 152ad21 predicted
    with the previous fit first; docs/design/maml-rl.md section 3.4). ``T`` regularised systems
    ``[F, F]`` are solved at once with ``torch.linalg.lstsq`` (the gelsd driver on the CPU, as
    ``numpy.linalg.lstsq``).

    Deliberate deviations: the fit runs in float64 (rllab's numpy arrays are float64; the
    normal equations square the features' condition number, with ``t^3`` next to 1); a
    non-finite solution counts as a failure, not only NaN (pytorch-maml-rl); and after
    ``max_tries`` failures the fit raises :class:`FloatingPointError` naming the tasks, as
    pytorch-maml-rl does, rather than keeping NaN coefficients. Nothing here is differentiable:
    inputs are detached and the advantages it yields are constants.
    """

    def __init__(self, reg_coeff: float = 1e-5, max_tries: int = 5):
        self.reg_coeff = reg_coeff
        self.max_tries = max_tries
        self.coeffs: Tensor | None = None  # float64 [T, F]

    @staticmethod
    def features(observations: Tensor) -> Tensor:
        """``float64 [T, N, H, 2 obs + 4]``: ``[o, o^2, t/100, (t/100)^2, (t/100)^3, 1]``."""
        o = observations.detach().to(torch.float64).clamp(-10, 10)
        steps = observations.shape[-2]
        t = torch.arange(steps, dtype=torch.float64, device=o.device) / 100.0
        t = t.reshape(-1, 1).expand(*o.shape[:-1], 1)
        return torch.cat([o, o * o, t, t**2, t**3, torch.ones_like(t)], dim=-1)

    def fit(self, observations: Tensor, returns: Tensor, mask: Tensor) -> LinearFeatureBaseline:
        """Fit one coefficient vector per task on its valid steps: ``observations [T, N, H,
        obs]``, ``returns`` and ``mask [T, N, H]``."""
        x = self.features(observations)
        tasks, size = x.shape[0], x.shape[-1]
        valid = (mask.detach() > 0).to(torch.float64).reshape(tasks, -1, 1)
        x = x.reshape(tasks, -1, size) * valid
        y = returns.detach().to(torch.float64).reshape(tasks, -1, 1) * valid
        gram, target = x.mT @ x, x.mT @ y
        eye = torch.eye(size, dtype=torch.float64, device=x.device)
        reg = torch.full((tasks,), float(self.reg_coeff), dtype=torch.float64, device=x.device)
        coeffs = torch.full((tasks, size), math.nan, dtype=torch.float64, device=x.device)
        todo = torch.ones(tasks, dtype=torch.bool, device=x.device)
        for _ in range(self.max_tries):
            index = todo.nonzero().squeeze(-1)
            system = gram[index] + reg[index, None, None] * eye
            solution = _lstsq(system, target[index]).squeeze(-1)
            coeffs[index] = solution
            todo[index] = ~torch.isfinite(solution).all(dim=-1)
            if not todo.any():
                break
            reg[todo] *= 10
        if todo.any():
            raise FloatingPointError(
                f"the linear feature baseline has no finite fit for task(s) "
                f"{todo.nonzero().squeeze(-1).tolist()} after {self.max_tries} tries "
                f"(regularisation up to {reg.max().item():.0e}): non-finite observations or returns?"
            )
        self.coeffs = coeffs
        return self

    def predict(self, observations: Tensor) -> Tensor:
        """The fitted values ``[T, N, H]`` (in the observations' dtype; zeros before any fit,
        as rllab's ``predict``)."""
        if self.coeffs is None:
            return observations.new_zeros(observations.shape[:-1])
        x = self.features(observations)
        values = (x.reshape(x.shape[0], -1, x.shape[-1]) @ self.coeffs.unsqueeze(-1)).squeeze(-1)
        return values.reshape(observations.shape[:-1]).to(observations.dtype)

    def fit_predict(self, observations: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
        """Fit on the batch, then predict on it (the design's choice, above)."""
        return self.fit(observations, returns, mask).predict(observations)


def _lstsq(a: Tensor, b: Tensor) -> Tensor:
    driver = "gelsd" if a.device.type == "cpu" else None  # CUDA has gels only (A is full rank)
    return torch.linalg.lstsq(a, b, driver=driver).solution


@dataclass
class Advantages:
    """What :func:`compute_advantages` yields, all ``[T, N, H]`` and detached: the discounted
    returns, the baseline's values and the (standardised) advantages."""

    returns: Tensor
    values: Tensor
    advantages: Tensor


def compute_advantages(
    trajectories: Trajectories,
    *,
    gamma: float = 0.99,
    lam: float = 1.0,
    baseline: bool = True,
    reg_coeff: float = 1e-5,
    standardize: bool = True,
) -> Advantages:
    """Returns, baseline and advantages of each task's trajectories, as the code's
    ``process_samples`` computes them per task (docs/design/maml-rl.md section 3.1, step 3):
    discounted returns with ``gamma`` (0.99), a :class:`LinearFeatureBaseline` fitted on the
    task's batch and predicting on it (``baseline=False``: values 0), GAE(``gamma``, ``lam``)
    with ``lam = 1``, then ``center_adv``: standardisation per task over valid steps."""
    with torch.no_grad():
        rewards, mask = trajectories.rewards, trajectories.mask
        returns = discounted_returns(rewards, mask, gamma)
        if baseline:
            fit = LinearFeatureBaseline(reg_coeff)
            values = fit.fit_predict(trajectories.observations, returns, mask).to(rewards.dtype)
        else:
            values = torch.zeros_like(rewards)
        advantages = gae(rewards, values, mask, gamma, lam)
        if standardize:
            advantages = standardize_advantages(advantages, mask)
    return Advantages(returns, values * mask, advantages)


# -- surrogate losses and the inner step -----------------------------------------------------
def policy_gradient_loss(log_prob: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """The vanilla policy-gradient surrogate per task, ``-mean over valid steps of log pi(a|s)
    A``: ``[T]``. Its gradient is the REINFORCE estimate (Williams 1992) of minus the gradient
    of the expected return.

    maml_rl ``sandbox/rocky/tf/algos/maml_npo.py``: ``surr_objs.append(- tf.reduce_mean(logli *
    adv_vars[i]))``, a mean over all the task's timesteps (its trajectories concatenated);
    padded steps are left out here, as the code's variable-length paths have none."""
    return -task_mean(log_prob * advantages, mask)


def importance_sampled_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor
) -> Tensor:
    """TRPO's surrogate per task, ``-mean over valid steps of pi(a|s) / pi_old(a|s) A``: ``[T]``
    (Schulman et al. 2015, eq. 14; maml_npo.py ``- tf.reduce_mean(lr * adv_vars[i])`` with
    ``lr = dist.likelihood_ratio_sym``). The outer loss is the mean over tasks (the code's
    ``tf.reduce_mean(tf.stack(surr_objs, 0))``). ``old_log_prob`` should be detached."""
    return -task_mean(torch.exp(log_prob - old_log_prob) * advantages, mask)


def inner_loss(
    policy: GaussianMLPPolicy,
    params: Mapping[str, Tensor],
    trajectories: Trajectories,
    advantages: Tensor,
) -> Tensor:
    """:func:`policy_gradient_loss` of ``params`` (one set, or one per task) on each task's
    trajectories: ``[T]``."""
    log_prob = policy.log_prob(params, trajectories.observations, trajectories.actions)
    return policy_gradient_loss(log_prob, advantages, trajectories.mask)


def inner_step(
    policy: GaussianMLPPolicy,
    params: Mapping[str, Tensor],
    trajectories: Trajectories,
    advantages: Tensor,
    step_size: float | Mapping[str, float | Tensor],
    *,
    first_order: bool = False,
) -> Params:
    """One inner step per task, ``theta'_i = theta_i - alpha grad L_i(theta_i)``, with ``L_i``
    the :func:`inner_loss` of task ``i``: per-task parameters ``[T, ...]``.

    Finn et al. 2017, Algorithm 3 (line 6) and section 5.3; maml_rl
    ``maml_minimal_gauss_mlp_policy.py`` ``updated_dist_info_sym``: every parameter steps, the
    log-std included. ``params`` is theta (copied per task with :meth:`GaussianMLPPolicy.
    expand_params`) or per-task parameters from an earlier step; ``step_size`` is alpha, one
    value or one per parameter name.

    Differentiability, when ``params`` require grad: second order by default (the inner
    gradient is computed with ``create_graph=True``, so the result is differentiable through
    the gradient: the meta-gradient has the Hessian term); ``first_order`` detaches the inner
    gradient (the code's ``stop_grad``, ``tf.stop_gradient``), so ``d theta' / d theta`` is the
    identity. When no parameter requires grad (test-time adaptation, or a line search under
    ``torch.no_grad``) the gradient is taken on detached copies and the result is detached.
    """
    tasks = trajectories.observations.shape[0]
    tracked = [p.requires_grad for p in params.values()]
    if any(tracked) and not all(tracked):
        raise ValueError("inner_step: either every parameter requires grad or none does")
    with torch.enable_grad():
        if all(tracked):
            batched = policy.expand_params(params, tasks)
            create_graph = not first_order
        else:
            batched = {
                k: v.detach().requires_grad_()
                for k, v in policy.expand_params(params, tasks).items()
            }
            create_graph = False
        losses = inner_loss(policy, batched, trajectories, advantages)
        grads = torch.autograd.grad(
            losses.sum(), list(batched.values()), create_graph=create_graph, allow_unused=True
        )
    out = {}
    for (name, p), g in zip(batched.items(), grads, strict=True):
        alpha = step_size[name] if isinstance(step_size, Mapping) else step_size
        out[name] = p if g is None else p - alpha * g
    return out if all(tracked) else {k: v.detach() for k, v in out.items()}


# -- TRPO: conjugate gradient, Hessian-vector products, the line search --------------------------
def conjugate_gradient(
    fvp: Callable[[Tensor], Tensor],
    b: Tensor,
    iters: int = 10,
    residual_tol: float = 1e-10,
    *,
    eps: float = 1e-8,
) -> Tensor:
    """An approximate solution of ``A x = b`` for a symmetric positive-definite ``A`` given as
    ``fvp(x) = A x``: conjugate gradient from ``x = 0``, ``iters`` iterations at most, stopping
    when ``r^T r < residual_tol``.

    rllab ``rllab/misc/krylov.py`` ``cg`` (Demmel p. 312), line by line, with its ``eps`` = 1e-8
    in both denominators (``v = r^T r / (p^T A p + eps)``, ``mu = r'^T r' / (r^T r + eps)``);
    TRPO (Schulman et al. 2015, appendix C) solves ``(H + damping I) s = g`` with it, 10
    iterations (the code's ``ConjugateGradientOptimizer(cg_iters=10)``). The 1e-8 is not
    scale-free: once ``r^T r`` nears 1e-8 it shortens the steps and spoils the conjugacy, so
    convergence slows there (tests/test_policy_gradient.py); ``eps=0`` is textbook CG."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rdotr = r @ r
    for _ in range(iters):
        z = fvp(p)
        v = rdotr / (p @ z + eps)
        x = x + v * p
        r = r - v * z
        new_rdotr = r @ r
        mu = new_rdotr / (rdotr + eps)
        p = r + mu * p
        rdotr = new_rdotr
        if rdotr < residual_tol:
            break
    return x


def hessian_vector_product(
    fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    method: str = "finite_difference",
    damping: float = 1e-5,
) -> Callable[[Tensor], Tensor]:
    """``x -> (H + damping I) x`` with ``H`` the Hessian of the scalar ``fn(params)`` (TRPO's
    mean KL, whose Hessian at the sampling policy is the Fisher information matrix) at
    ``params``, on flat vectors (:func:`params_to_vector` order). ``fn`` is evaluated on new
    tensors, never on ``params`` themselves.

    * ``finite_difference`` (the paper's and the code's): ``Hx = (grad fn(theta + eps x) -
      grad fn(theta - eps x)) / (2 eps)``, ``eps = 1e-8 / (||theta|| + 1e-8)``: maml_rl
      ``sandbox/rocky/tf/optimizers/conjugate_gradient_optimizer.py`` ``FiniteDifferenceHvp``
      (``base_eps=1e-8, symmetric=True``), the default of its ``ConjugateGradientOptimizer``.
      The paper (section 5.3): "we use finite differences to compute the Hessian-vector products
      for TRPO", to avoid third derivatives through the inner step. Deviation: computed in
      float64 (``fn`` receives float64 parameters; the policy casts observations to them). With
      ``||theta||`` about 10, eps is about 1e-9, below float32's resolution (about 6e-8 of a
      parameter's size): in float32, which the TF code used, ``theta + eps x`` rounds to
      ``theta`` or to a neighbouring float and the product is mostly rounding. In float64 the
      perturbation survives, and since the KL's gradient vanishes at the sampling policy the
      difference loses no leading digits. Returns float64.
    * ``exact``: the double-backward (Pearlmutter) product, ``grad (grad fn . x)``: the code's
      commented-out ``PerlmutterHvp``, pytorch-maml-rl's and learn2learn's; a third derivative
      through a second-order inner step. Returns the parameters' dtype.

    ``damping`` is added as ``+ damping x`` to every product (the code's ``reg_coeff=1e-5``)."""
    if method == "fisher":
        raise ValueError(
            "the fisher product needs the policy and the inner step, not only the KL: pass "
            "fisher_vector_product(...) as the product (trpo_step(..., hvp=product))"
        )
    if method not in HVP_METHODS:
        raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
    if method == "exact":
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            grad = flat_grad(fn(leaves), leaves, create_graph=True)

        def exact(x: Tensor) -> Tensor:
            with torch.enable_grad():
                hx = flat_grad(grad @ x.to(grad.dtype), leaves, retain_graph=True)
            return hx.to(x.dtype) + damping * x

        return exact

    theta = params_to_vector(params).detach().to(torch.float64)
    eps = 1e-8 / (theta.norm().item() + 1e-8)

    def grad_at(vector: Tensor) -> Tensor:
        leaves = {
            k: v.detach().requires_grad_() for k, v in vector_to_params(vector, params).items()
        }
        with torch.enable_grad():
            return flat_grad(fn(leaves), leaves)

    def finite_difference(x: Tensor) -> Tensor:
        x64 = x.to(torch.float64)
        hx = (grad_at(theta + eps * x64) - grad_at(theta - eps * x64)) / (2 * eps)
        return hx.to(x.dtype) + damping * x

    return finite_difference


def fisher_vector_product(
    policy: GaussianMLPPolicy,
    params: Mapping[str, Tensor],
    observations: Tensor,
    mask: Tensor,
    *,
    inner: tuple[Trajectories, Tensor] | None = None,
    step_size: float | Mapping[str, float | Tensor] = 0.0,
    first_order: bool = False,
    damping: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """``x -> (H + damping I) x`` with ``H`` the Hessian, at ``params`` (theta_old, the sampling
    parameters), of TRPO's mean KL to the sampling policies, through the inner step when there
    is one, without third derivatives. Flat vectors in :func:`params_to_vector` order; the
    product is computed in the parameters' dtype and returned in ``x``'s.

    The KL is the one the learners (plugins/learners/rl.py) constrain: ``KL(theta)`` = the mean over
    the valid steps (``mask``) of ``observations [T, ...]`` of ``KL(pi_old || pi_new)``, with
    ``pi_new`` the policy at ``theta'_i(theta) = theta - alpha grad L_i(theta)`` for task ``i``
    (:func:`inner_step` on ``inner = (trajectories, advantages)`` with ``step_size`` alpha) and
    ``pi_old`` at ``theta'_i(theta_old)``; without ``inner``, ``pi_new`` is the policy at
    ``theta`` itself for every task and ``pi_old`` the one at ``theta_old`` (pretrain_rl,
    oracle).

    At ``theta = theta_old`` the KL's gradient with respect to every ``theta'_i`` vanishes
    (each KL is at its minimum, 0), so the chain rule's second-derivative term drops out and
    ``H = sum_i J_i^T F_i J_i`` exactly, with ``J_i = d theta'_i / d theta = I - alpha H_{L_i}``
    (``H_{L_i}`` the Hessian of task ``i``'s inner loss, symmetric, so ``J_i^T = I - H_{L_i}
    alpha``: ``J_i`` itself for one step size, not for one per parameter) and ``F_i`` the
    Hessian of the KL with respect to ``theta'_i`` at the old adapted parameters:
    the Fisher information of task ``i``'s adapted policy over its post-update steps, weighted
    as the masked mean weighs them. Each product is

    1. ``J_i x = x - alpha H_{L_i} x`` for every task at once: one backward through the
       per-task inner gradients (built once with ``create_graph`` on ``[T, ...]`` copies of
       theta, as :func:`inner_step` batches them), a second derivative;
    2. ``F_i (J_i x)``: one backward through the KL's gradient with respect to detached
       per-task adapted parameters (no inner step in that graph), a second derivative;
    3. ``J_i^T`` of that, as in 1, summed over tasks; plus ``damping x``.

    ``first_order`` (``d theta'_i / d theta = I``, the code's ``stop_grad``) skips 1 and 3:
    ``H = sum_i F_i``. Without ``inner`` it is the plain Fisher-vector product, equal to
    :func:`hessian_vector_product`'s ``exact`` one at any ``params`` (tested).

    The ``exact`` product is a double backward through the outer KL, whose graph holds the
    inner gradient: a third derivative, which the paper's finite differences avoid ("to avoid
    computing third derivatives") at the price of two second-order gradients in float64. This
    one has only second derivatives, both graphs built once and reused by every product:
    ``benchmarks/maml_trpo_step.py`` (2-D navigation at the paper's size, 2 CPU cores) measured
    it 1.3 times cheaper than ``exact`` and 2.8 times cheaper than ``finite_difference`` per
    product, second order, and about as cheap as ``exact`` first order. Its exactness rests on
    the KL being measured from the policies at ``params`` themselves, as TRPO's is at
    theta_old, where :func:`trpo_step` evaluates every product (the conjugate gradient and the
    step scale); for a KL to other policies the dropped term would not vanish and this would
    be only the Gauss-Newton part of the Hessian."""
    theta = {k: v.detach().clone() for k, v in params.items()}  # a snapshot: trpo_step updates
    names = list(theta)

    def alpha(name: str) -> float | Tensor:
        return step_size[name] if isinstance(step_size, Mapping) else step_size

    with torch.enable_grad():
        inner_grads: list[Tensor | None] = []
        copies: dict[str, Tensor] = {}
        if inner is None:
            old = theta
        else:
            trajectories, advantages = inner
            tasks = trajectories.observations.shape[0]
            copies = {
                k: v.detach().requires_grad_()
                for k, v in policy.expand_params(theta, tasks).items()
            }
            losses = inner_loss(policy, copies, trajectories, advantages)
            inner_grads = list(
                torch.autograd.grad(
                    losses.sum(),
                    list(copies.values()),
                    create_graph=not first_order,
                    allow_unused=True,
                )
            )
            old = {
                k: (p if g is None else p - alpha(k) * g).detach()
                for (k, p), g in zip(copies.items(), inner_grads, strict=True)
            }
        adapted = {k: v.detach().clone().requires_grad_() for k, v in old.items()}
        kl = masked_mean(policy.kl(old, adapted, observations), mask)
        kl_grads = torch.autograd.grad(kl, list(adapted.values()), create_graph=True)
    second_order = inner is not None and not first_order
    curved = [g is not None and g.requires_grad for g in inner_grads]

    def jacobian_product(vectors: list[Tensor], *, transpose: bool) -> list[Tensor]:
        """Per task, ``vectors`` shaped ``[T, ...]``: ``J_i v_i = v_i - alpha H_{L_i} v_i``, or
        ``J_i^T v_i = v_i - H_{L_i} (alpha v_i)`` (the same for one step size)."""
        scaled = [alpha(k) * v for k, v in zip(names, vectors, strict=True)]
        pairs = [
            (g, w)
            for g, w, c in zip(inner_grads, scaled if transpose else vectors, curved, strict=True)
            if c
        ]
        if not pairs:  # an inner loss that is linear in theta
            return vectors
        with torch.enable_grad():
            dot = sum((g * w).sum() for g, w in pairs)
            hessian = torch.autograd.grad(
                dot, list(copies.values()), retain_graph=True, allow_unused=True
            )
        return [
            v if h is None else v - (h if transpose else alpha(k) * h)
            for k, v, h in zip(names, vectors, hessian, strict=True)
        ]

    def product(x: Tensor) -> Tensor:
        parts = list(vector_to_params(x.to(theta[names[0]].dtype), theta).values())
        if inner is not None:
            tasks = inner[0].observations.shape[0]
            parts = [p.unsqueeze(0).expand(tasks, *p.shape) for p in parts]
        if second_order:
            parts = jacobian_product(parts, transpose=False)
        with torch.enable_grad():
            dot = sum((g * v).sum() for g, v in zip(kl_grads, parts, strict=True))
            parts = list(
                torch.autograd.grad(
                    dot, list(adapted.values()), retain_graph=True, allow_unused=True
                )
            )
        parts = [
            torch.zeros_like(a) if p is None else p
            for p, a in zip(parts, adapted.values(), strict=True)
        ]
        if second_order:
            parts = jacobian_product(parts, transpose=True)
        if inner is not None:
            parts = [p.sum(0) for p in parts]
        hx = torch.cat([p.reshape(-1) for p in parts])
        return hx.to(x.dtype) + damping * x

    return product


@dataclass(frozen=True)
class TRPOStep:
    """What one :func:`trpo_step` did, for logging: whether a candidate was accepted, the
    fraction of the full step taken (``0.8^k``; 0 when rejected), the candidates rejected before
    it (all of them when none passed), the loss and mean KL before and after (after = before
    when rejected), the last candidate's loss and KL, the full step's scale
    ``sqrt(2 delta / s^T H s)`` and the norm of the loss's gradient."""

    accepted: bool
    step_fraction: float
    backtracks: int
    loss_before: float
    loss_after: float
    kl_before: float
    kl_after: float
    candidate_loss: float
    candidate_kl: float
    step_scale: float
    grad_norm: float

    def as_dict(self) -> dict[str, float | bool | int]:
        return asdict(self)


def trpo_step(
    params: Mapping[str, Tensor],
    loss_fn: LossFn,
    kl_fn: LossFn,
    *,
    max_kl: float = 0.01,
    damping: float = 1e-5,
    cg_iters: int = 10,
    residual_tol: float = 1e-10,
    hvp: str | Callable[[Tensor], Tensor] = "finite_difference",
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
) -> TRPOStep:
    """One TRPO step (Schulman et al. 2015, section 6 and appendix C) on ``params``, in place.

    maml_rl ``conjugate_gradient_optimizer.py`` ``ConjugateGradientOptimizer.optimize`` with the
    defaults MAMLTRPO uses (docs/design/maml-rl.md section 3.2):

    1. ``g = grad loss_fn(theta)``; ``s = CG((H + damping I), g)``, ``cg_iters`` (10)
       iterations, ``H`` the Hessian of ``kl_fn`` at theta (:func:`hessian_vector_product`,
       ``hvp``: ``finite_difference`` as the code, or ``exact``; or a ready-made product
       ``x -> H x`` on flat vectors, such as :func:`fisher_vector_product`'s, to which
       ``damping x`` is added here), ``damping`` 1e-5;
    2. the full step ``sqrt(2 max_kl / (s^T (H + damping I) s + 1e-8)) s`` (1 s if that is NaN);
    3. backtracking: candidates ``theta - 0.8^k step`` for ``k = 0 .. max_backtracks - 1``
       (15), the first with ``loss_fn < loss_before`` and ``kl_fn <= max_kl`` (0.01) accepted
       and written into ``params``; when none is (NaN fails both tests), ``params`` stay exactly
       as they were (``accept_violation=False``: the step is rejected).

    ``params`` are the leaves to update (``policy.params()``; written with ``copy_`` under
    ``torch.no_grad``). ``loss_fn(p)`` and ``kl_fn(p)`` map a parameter dict shaped as
    ``params`` to a scalar: the surrogate loss (the mean over tasks of
    :func:`importance_sampled_loss`) and the mean KL to the sampling policies (the mean over
    all valid steps of all tasks, the code's ``tf.reduce_mean(tf.concat(kls, 0))``). MAML
    recomputes its inner step inside them (:func:`inner_step` on ``p``); they are called with
    parameters that require grad (for ``g`` and ``H``), with float64 ones
    (``finite_difference``), and with detached candidates under ``torch.no_grad`` (the line
    search: :func:`inner_step` still differentiates the inner loss there).

    Deviation: rllab's final check rejects a candidate whose KL equals ``max_kl`` exactly
    (``constraint_val >= max``) although its loop accepted it; here ``KL <= max_kl`` is the one
    rule."""
    theta = params_to_vector(params).detach()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        loss = loss_fn(leaves)
        g = flat_grad(loss, leaves).to(torch.float64)
    loss_before = float(loss.detach())
    with torch.no_grad():
        kl_before = float(kl_fn({k: v.detach() for k, v in params.items()}))
    if callable(hvp):
        product = hvp

        def fvp(x: Tensor) -> Tensor:
            return product(x) + damping * x

    else:
        fvp = hessian_vector_product(kl_fn, params, method=hvp, damping=damping)
    direction = conjugate_gradient(fvp, g, cg_iters, residual_tol)
    shs = float(direction @ fvp(direction))
    scale = math.sqrt(2.0 * max_kl / (shs + 1e-8)) if shs + 1e-8 > 0 else math.nan
    if math.isnan(scale):
        scale = 1.0
    full_step = scale * direction
    accepted, fraction, tried = False, 0.0, 0
    candidate_loss = candidate_kl = math.nan
    candidate = theta
    with torch.no_grad():
        for k in range(max_backtracks):
            ratio = backtrack_ratio**k
            candidate = (theta.to(torch.float64) - ratio * full_step).to(theta.dtype)
            point = vector_to_params(candidate, params)
            candidate_loss, candidate_kl = float(loss_fn(point)), float(kl_fn(point))
            tried = k + 1
            if candidate_loss < loss_before and candidate_kl <= max_kl:
                accepted, fraction = True, ratio
                break
        if accepted:
            for p, new in zip(
                params.values(), vector_to_params(candidate, params).values(), strict=True
            ):
                p.copy_(new)
    return TRPOStep(
        accepted=accepted,
        step_fraction=fraction,
        backtracks=tried - 1 if accepted else tried,
        loss_before=loss_before,
        loss_after=candidate_loss if accepted else loss_before,
        kl_before=kl_before,
        kl_after=candidate_kl if accepted else kl_before,
        candidate_loss=candidate_loss,
        candidate_kl=candidate_kl,
        step_scale=scale,
        grad_norm=float(g.norm()),
    )
