"""The RL learners' Hessian-vector products (plugins/learners/rl.py, ``hvp``): one training
step with ``fisher`` (sum_i J_i F_i J_i, exact at the sampling parameters) equals the step
with ``exact`` (double backward through the inner step) from the same state and batch, for
``maml_trpo`` second and first order and for ``pretrain_rl`` and ``oracle``. The mathematics
is tested in test_policy_gradient.py; timings are benchmarks/maml_trpo_step.py's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fewbench.methods.policy_gradient as pg
from fewbench.plugin.learner import LearnerContext
from fewbench_plugins.backbones.standard import MLP
from fewbench_plugins.environments.navigation2d import Navigation2D
from fewbench_plugins.learners.rl import MAMLTRPO, Oracle, PretrainedPolicy

TASKS = 3


def make(cls, hvp, dtype=torch.float64, **config):
    """A learner on 2-D navigation (horizon 5), seeded, its biases moved off zero.

    With zero biases and every episode starting at the origin, the first layer's
    pre-activations at the first step are exactly 0, on the ReLU's kink, where the inner
    gradient jumps and the KL has no Hessian; 0.1 noise on the biases keeps the step away."""
    env = Navigation2D(horizon=5)
    learner = cls(meta_batch_size=TASKS, trajectories=2, hvp=hvp, **config)
    torch.manual_seed(0)
    learner.setup(
        LearnerContext(MLP(hidden=[8, 8]), (2,), 1, 1, 1, 0, torch.device("cpu"), environment=env)
    )
    learner.policy.to(dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in learner.policy.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    batch = env.load(None, None)["train"].sample_episodes(
        TASKS, 1, 1, 1, torch.Generator().manual_seed(2)
    )
    return learner, batch


def step(cls, hvp, dtype=torch.float64, **config):
    learner, batch = make(cls, hvp, dtype, **config)
    before = pg.params_to_vector(learner.policy.params()).detach().clone()
    loss = learner.train_step(batch, 1)
    after = pg.params_to_vector(learner.policy.params()).detach()
    return before, after, learner.last_step, loss


@pytest.mark.parametrize(
    ("cls", "config"),
    [
        (MAMLTRPO, {}),
        (MAMLTRPO, {"first_order": True}),
        (MAMLTRPO, {"inner_lr": 0.5}),
        (PretrainedPolicy, {}),
        (Oracle, {}),
    ],
    ids=["maml_second_order", "maml_first_order", "maml_alpha_0.5", "pretrain_rl", "oracle"],
)
def test_a_fisher_step_equals_an_exact_step(cls, config):
    start, exact, exact_record, exact_loss = step(cls, "exact", **config)
    start_again, fisher, fisher_record, fisher_loss = step(cls, "fisher", **config)
    assert torch.equal(start, start_again) and torch.equal(exact_loss, fisher_loss)
    assert exact_record.accepted and fisher_record.accepted
    assert fisher_record.step_fraction == exact_record.step_fraction
    assert fisher_record.step_scale == pytest.approx(exact_record.step_scale, rel=1e-7)
    assert fisher_record.kl_after == pytest.approx(exact_record.kl_after, rel=1e-7)
    update = (exact - start).abs().max()
    assert update > 1e-4
    assert (fisher - exact).abs().max() <= 1e-7 * update


def test_a_fisher_step_in_float32_matches_exact_and_finite_difference():
    """In the learner's own dtype, and against the finite difference (float64) away from the
    ReLU's kink. Ten conjugate-gradient iterations amplify float32's rounding of the products:
    fisher and exact agree to about 1e-2 of the update (float64: 1e-7, above). The finite
    difference is computed in float64 either way, yet its step lands 2.0e-2 of the update from
    the exact step even with the whole learner in float64; the float32 exact step's own
    rounding, which depends on the CPU's kernels, adds to that (1.6e-2 from the float64 exact
    step on an AMD EPYC): 3.6e-2 in all there, under 2e-2 on the Intel Xeon this test was
    written on. A wrong product is off by the order of the update itself."""
    start, exact, exact_record, _ = step(MAMLTRPO, "exact", torch.float32)
    _, fisher, fisher_record, _ = step(MAMLTRPO, "fisher", torch.float32)
    _, fd, fd_record, _ = step(MAMLTRPO, "finite_difference", torch.float32)
    update = (exact - start).abs().max()
    assert fisher_record.step_fraction == exact_record.step_fraction == fd_record.step_fraction
    assert (fisher - exact).abs().max() <= 2e-2 * update
    assert (fd - exact).abs().max() <= 6e-2 * update


def test_fisher_is_a_choice_of_every_trpo_learner_and_passes_a_product(monkeypatch):
    for cls in (MAMLTRPO, PretrainedPolicy, Oracle):
        assert cls.params["hvp"].choices == ("finite_difference", "exact", "fisher")
        assert cls.params["hvp"].default == "fisher"  # exact at theta_old, see rl.py
    seen = []
    trpo_step = pg.trpo_step

    def spy(*args, hvp, **kwargs):
        seen.append(hvp)
        return trpo_step(*args, hvp=hvp, **kwargs)

    monkeypatch.setattr("fewbench_plugins.learners.rl.trpo_step", spy)
    for hvp in ("fisher", "exact"):
        learner, batch = make(MAMLTRPO, hvp)
        learner.train_step(batch, 1)
    assert callable(seen[0]) and seen[1] == "exact"


def test_the_benchmark_prints_its_table():
    """benchmarks/maml_trpo_step.py runs (a smoke test, tiny; timings are not checked). In a
    process of its own: it wraps the product makers of the modules it imports."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "maml_trpo_step.py"
    args = [
        "--tasks",
        "2",
        "--trajectories",
        "2",
        "--horizon",
        "4",
        "--hidden",
        "4",
        "--repeat",
        "1",
    ]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=True
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == [
        "finite_difference",
        "exact",
        "fisher",
    ]
    assert all(row.count("|") == 10 for row in rows)
