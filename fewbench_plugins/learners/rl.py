"""Reinforcement-learning learners of Finn, Abbeel & Levine 2017 (ICML), section 5.3.

* ``maml_trpo``: MAML for RL (Algorithm 3): a vanilla policy-gradient inner step per
  task, TRPO as the meta-optimiser, second order through the inner step.
* ``pretrain_rl``: "pretraining one policy on all of the tasks and then fine-tuning";
* ``random_init``: "training a policy from randomly initialized weights" at test time;
* ``oracle``: "an oracle policy which receives the parameters of the task as input".

Every learner has a Gaussian MLP policy (:class:`fewbench.methods.policy_gradient.GaussianMLPPolicy`:
the suite's ``mlp`` backbone gives its hidden sizes, the paper's two layers of 100 ReLU
units; a learnt state-independent log-std) and is evaluated the same way
(:meth:`PolicyLearner.predict`): in each fixed test task, the average return of
``eval_trajectories`` trajectories before adaptation and after each of ``eval_steps``
policy-gradient steps, with step size ``eval_lr`` for the first step and half of it for the
later ones (appendix A.2: "alpha = 0.1 for the first step, and alpha = 0.05 for all future
steps"). The cell's metric is the return after one step (fewbench.plugin.task_types.REINFORCEMENT);
every step's return is stored (figure 5).

The curve's "loss" of an RL learner is minus the average return of the trajectories its
training step sampled last (MAML: after adaptation), so it falls as training succeeds.
Protocol details, sources and where paper and code disagree: docs/design/maml-rl.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from fewbench.methods.policy_gradient import (
    GaussianMLPPolicy,
    Params,
    TRPOStep,
    compute_advantages,
    fisher_vector_product,
    importance_sampled_loss,
    inner_step,
    masked_mean,
    trpo_step,
)
from fewbench.plugin import (
    Learner,
    LearnerContext,
    Param,
    PluginError,
    PredictionProtocol,
    TaskBatch,
    Trajectories,
    hookimpl,
)

TRPO_PARAMS = {
    "max_kl": Param(0.01, minimum=0.0, help="TRPO's KL bound delta (the code's meta_step_size)"),
    "damping": Param(1e-5, minimum=0.0, help="added to every Fisher-vector product (reg_coeff)"),
    "cg_iters": Param(10, minimum=1, help="conjugate-gradient iterations"),
    # Deviation: the paper and its code take finite differences of the KL's gradient ("to
    # avoid computing third derivatives"). fisher computes the same product exactly, with
    # second derivatives only, 2.4x faster on a CPU (benchmarks/maml_trpo_step.py); and at
    # initialisation, where zero biases put every first-layer unit on the ReLU's kink, the
    # finite difference is off by orders of magnitude (tests/test_maml_trpo.py).
    "hvp": Param(
        "fisher",
        choices=("finite_difference", "exact", "fisher"),
        help="Hessian-vector products of the KL: fisher (sum_i J_i^T F_i J_i with J_i = I - "
        "alpha H_{L_i}, exact at the sampling parameters where TRPO evaluates it, second "
        "derivatives only), finite_difference (the paper and its code) or exact (double "
        "backward, a third derivative through the inner step); all three agree, tested",
    ),
}
COMMON_PARAMS = {
    "meta_batch_size": Param(20, minimum=1, help="tasks per iteration (2-D: 20; cheetah: 40)"),
    "trajectories": Param(20, minimum=1, help="trajectories per task and sampling phase"),
    "gamma": Param(0.99, minimum=0.0, help="discount of the returns the advantages use"),
    "gae_lambda": Param(1.0, minimum=0.0, help="GAE lambda (1: return minus baseline)"),
    "eval_lr": Param(
        0.1, minimum=0.0, help="test-time step size of the first step; later steps take half"
    ),
    "eval_steps": Param(3, minimum=0, help="test-time policy-gradient steps (figure 5: 0-3)"),
    "eval_trajectories": Param(
        20, minimum=1, help="trajectories per test task and step (2-D: 40; cheetah: 20)"
    ),
}


class PolicyLearner(Learner):
    """What every RL learner shares: its policy, its evaluation and its state."""

    batch_kind = "episodes"
    task_types = ("reinforcement",)
    backbones = ("mlp",)  # the policy's hidden sizes (Finn et al.: [100, 100])
    state_attributes = ("policy",)
    observe_task: ClassVar[bool] = False  # the oracle sees the task in every observation
    adapts: ClassVar[bool] = True  # whether evaluation takes policy-gradient steps

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        environment = ctx.environment
        if environment is None:
            raise PluginError(
                f"learner '{self.name}' needs an environment (a reinforcement-learning "
                "dataset such as navigation2d); this cell's dataset is not one"
            )
        self.environment = environment
        self.policy = GaussianMLPPolicy(
            environment.observation_size(self.observe_task),
            environment.action_dim,
            ctx.backbone.config["hidden"],
        ).to(ctx.device)

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def describe_engine(self) -> str:
        return f"policy gradient; {self.config.get('hvp', 'no')} Hessian-vector products"

    def prediction_protocol(self) -> PredictionProtocol:
        """``eval_steps`` policy-gradient steps in each test task, on that task's own
        trajectories: no task's return depends on another's (the policy has no batch norm)."""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_ONE_QUERY,
            adaptation="the policy, by policy-gradient steps on each test task's trajectories",
            adaptation_steps=self.config["eval_steps"],
        )

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, params: Params, batch: TaskBatch, count: int, stream: Any) -> Trajectories:
        return self.environment.rollout(
            self.policy.as_policy(params),
            batch,
            count,
            stream=stream,
            observe_task=self.observe_task,
        )

    def advantages(self, trajectories: Trajectories) -> Tensor:
        return compute_advantages(
            trajectories, gamma=self.config["gamma"], lam=self.config["gae_lambda"]
        ).advantages

    # -- evaluation (figure 5) ---------------------------------------------------------------
    def predict(self, episodes: TaskBatch) -> Tensor:
        """Average return ``[T, eval_steps + 1]`` in each task: before adaptation and after
        each test-time step (``eval_lr``, then ``eval_lr / 2``), ``eval_trajectories`` each."""
        params = {name: p.detach() for name, p in self.policy.params().items()}
        count, steps = self.config["eval_trajectories"], self.config["eval_steps"]
        returns = []
        for step in range(steps + 1):
            if step > 0 and not self.adapts:  # the same policy: the same expected return
                returns.append(returns[0])
                continue
            trajectories = self.sample(params, episodes, count, ("test", step))
            returns.append(trajectories.average_return)
            if step < steps and self.adapts:
                rate = self.config["eval_lr"] * (1.0 if step == 0 else 0.5)
                params = inner_step(
                    self.policy, params, trajectories, self.advantages(trajectories), rate
                )
        return torch.stack(returns, dim=1)

    # -- TRPO on a batch of trajectories without adaptation (pretrain_rl, oracle) --------------
    def trpo_on(self, trajectories: Trajectories) -> TRPOStep:
        """One TRPO step of the shared policy on all tasks' trajectories jointly."""
        advantages = self.advantages(trajectories)
        theta = self.policy.params()
        old = {name: p.detach().clone() for name, p in theta.items()}
        observations, actions, mask = (
            trajectories.observations,
            trajectories.actions,
            trajectories.mask,
        )
        old_log_prob = self.policy.log_prob(old, observations, actions).detach()

        def loss(p: Params) -> Tensor:
            log_prob = self.policy.log_prob(p, observations, actions)
            return importance_sampled_loss(log_prob, old_log_prob, advantages, mask).mean()

        def kl(p: Params) -> Tensor:
            return masked_mean(self.policy.kl(old, p, observations), mask)

        return self.trpo(theta, loss, kl, self.hvp(old, observations, mask))

    def hvp(
        self, theta: Params, observations: Tensor, mask: Tensor, **inner: Any
    ) -> str | Callable[[Tensor], Tensor]:
        """What :func:`trpo_step` takes as ``hvp``: the configured method's name, or for
        ``fisher`` the product :func:`fisher_vector_product` builds at ``theta`` (the sampling
        parameters, where TRPO evaluates every product and where it is exact) for the KL over
        ``observations`` and ``mask``; ``inner`` (MAML: ``inner``, ``step_size``,
        ``first_order``) routes it through the inner step. It needs only second derivatives,
        where ``exact`` differentiates the KL's gradient through the inner gradient, a third
        derivative (the paper used finite differences "to avoid computing third derivatives",
        at the price of two second-order gradients in float64 per product)."""
        method = self.config["hvp"]
        if method != "fisher":
            return method
        return fisher_vector_product(self.policy, theta, observations, mask, **inner)

    def trpo(
        self, theta: Params, loss, kl, hvp: str | Callable[[Tensor], Tensor] | None = None
    ) -> TRPOStep:
        return trpo_step(
            theta,
            loss,
            kl,
            max_kl=self.config["max_kl"],
            damping=self.config["damping"],
            cg_iters=self.config["cg_iters"],
            hvp=self.config["hvp"] if hvp is None else hvp,
        )


class MAMLTRPO(PolicyLearner):
    """MAML for reinforcement learning (Finn, Abbeel & Levine 2017, Algorithm 3, section 5.3).

    One iteration (the authors' ``MAMLNPO`` / ``BatchMAMLPolopt``, docs/design/maml-rl.md 3.1):
    sample ``trajectories`` per task with the policy theta (line 5); fit a linear feature
    baseline per task, advantages by GAE(gamma 0.99, lambda 1), standardised per task; one
    vanilla policy-gradient step per task, ``theta'_i = theta - alpha grad L_i(theta)``
    (line 6, alpha = ``inner_lr``; every parameter, the log-std included); sample
    ``trajectories`` per task with ``theta'_i`` (line 7); then TRPO on the mean over tasks of
    the importance-sampled surrogate at ``theta'_i(theta)`` (line 8), subject to the mean
    KL(pi_theta'_old || pi_theta'_i(theta)) over the post-update steps <= ``max_kl``. The
    inner step is recomputed from theta inside the surrogate and the KL, so the meta-gradient
    and the Fisher-vector products go through it (second order; ``first_order`` drops that,
    the code's ``stop_grad``). The line search keeps the step only if the surrogate improves
    and the KL bound holds.

    Hyperparameters (appendix A.2; the code where the paper is silent): alpha 0.1 ("in all
    reinforcement learning experiments"; the code's 2-D script used 0.5), meta-batch 20 (2-D)
    or 40 (locomotion), 20 trajectories, delta 0.01, 10 CG iterations, damping 1e-5,
    backtracking 0.8^k for k < 15.

    Deviation: the paper computes the KL's Hessian-vector products by finite differences
    ("to avoid computing third derivatives"). The default ``hvp: fisher`` computes the same
    product exactly and without third derivatives, ``sum_i J_i^T F_i J_i`` with ``J_i = I -
    alpha H_{L_i}`` and ``F_i`` the Fisher of task i's adapted policy (exact at the sampling
    parameters, where TRPO evaluates every product, because the KL's gradient vanishes there:
    fewbench.methods.policy_gradient.fisher_vector_product). ``hvp: finite_difference`` is the paper's;
    ``hvp: exact`` the double-backward third derivative.
    """

    name = "maml_trpo"
    display_name = "MAML"
    description = "MAML for RL: policy-gradient inner step, TRPO outer step (Finn et al. 2017)"
    params = {
        "inner_lr": Param(0.1, minimum=0.0, help="inner step size alpha (appendix A.2: 0.1)"),
        "first_order": Param(False, help="drop the second derivatives through the inner step"),
        **COMMON_PARAMS,
        **TRPO_PARAMS,
    }

    def train_step(self, batch: TaskBatch, iteration: int) -> Tensor:
        theta = self.policy.params()
        alpha = self.config["inner_lr"]
        constant = {name: p.detach() for name, p in theta.items()}
        before = self.sample(constant, batch, self.config["trajectories"], "before")
        before_advantages = self.advantages(before)

        def adapted(p: Params) -> Params:
            return inner_step(
                self.policy,
                p,
                before,
                before_advantages,
                alpha,
                first_order=self.config["first_order"],
            )

        sampled_with = adapted(constant)  # detached: theta' of each task, as sampled
        after = self.sample(sampled_with, batch, self.config["trajectories"], "after")
        after_advantages = self.advantages(after)
        observations, actions, mask = after.observations, after.actions, after.mask
        old_log_prob = self.policy.log_prob(sampled_with, observations, actions).detach()

        def loss(p: Params) -> Tensor:
            log_prob = self.policy.log_prob(adapted(p), observations, actions)
            return importance_sampled_loss(log_prob, old_log_prob, after_advantages, mask).mean()

        def kl(p: Params) -> Tensor:
            return masked_mean(self.policy.kl(sampled_with, adapted(p), observations), mask)

        hvp = self.hvp(
            constant,
            observations,
            mask,
            inner=(before, before_advantages),
            step_size=alpha,
            first_order=self.config["first_order"],
        )
        self.last_step = self.trpo(theta, loss, kl, hvp)
        return -after.average_return.mean().detach()


class PretrainedPolicy(PolicyLearner):
    """The paper's pretrained baseline: one policy trained on all tasks jointly, then
    fine-tuned with the policy-gradient step at test time (Finn et al. 2017, section 5.3:
    "pretraining one policy on all of the tasks and then fine-tuning").

    Each iteration samples ``trajectories`` per task of the meta-batch with the one policy
    and takes one TRPO step on all of them (delta 0.01), the same outer optimiser as
    ``maml_trpo`` without the inner step. The paper tuned its test-time step size by hand
    ("manually tuned"; the code used 0.5 for 2-D and 0.02 for the cheetah): ``eval_lr``.
    Deviation: the code's 2-D pretraining took one Adam step per iteration through MAML's
    own class (``use_maml=False``); TRPO here keeps the outer optimiser the same for every
    method (docs/design/maml-rl.md 5)."""

    name = "pretrain_rl"
    display_name = "pretrained"
    description = "One policy trained on all tasks (TRPO), fine-tuned at test time"
    params = {**COMMON_PARAMS, **TRPO_PARAMS}

    def train_step(self, batch: TaskBatch, iteration: int) -> Tensor:
        constant = {name: p.detach() for name, p in self.policy.params().items()}
        trajectories = self.sample(constant, batch, self.config["trajectories"], "joint")
        self.last_step = self.trpo_on(trajectories)
        return -trajectories.average_return.mean().detach()


class RandomInitialisation(PolicyLearner):
    """The paper's random baseline: "training a policy from randomly initialized weights"
    with the test-time policy-gradient steps alone (Finn et al. 2017, section 5.3). No
    training iterations; the policy is the seeded random initialisation."""

    name = "random_init"
    display_name = "random"
    description = "A randomly initialised policy, adapted at test time only"
    params = dict(COMMON_PARAMS)

    def iterations(self, suite_iterations: int) -> int:
        return 0


class Oracle(PretrainedPolicy):
    """The paper's oracle: "an oracle policy which receives the parameters of the task as
    input" (Finn et al. 2017, section 5.3). Every observation carries the task (the 2-D goal,
    the goal velocity or direction: ``Environment.task_features``); trained like
    ``pretrain_rl`` (TRPO on all tasks; the code's ``trpo_point.py``: delta 0.01), and
    evaluated without adaptation (the code's oracle takes no step: a flat line in figure 5)."""

    name = "oracle"
    display_name = "oracle"
    description = "A policy that observes the task (TRPO on all tasks), not adapted"
    observe_task = True
    adapts = False
    params = {**COMMON_PARAMS, **TRPO_PARAMS}


@hookimpl
def fewbench_register_learners(register):
    for cls in (MAMLTRPO, PretrainedPolicy, RandomInitialisation, Oracle):
        register(cls)
