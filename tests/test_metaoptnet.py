"""MetaOptNet-SVM: the projection onto the dual's constraints and the dual solution against
scipy's SLSQP, the gradient through the solver against finite differences, the query scores,
the authors' label smoothing, and the learner on tiny episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from fewbench.errors import FewbenchError
from fewbench.methods.svm import (
    dual_objective,
    project_rows,
    solve_crammer_singer_dual,
    svm_logits,
)
from fewbench.plugin.dataset import EpisodeBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench_plugins.backbones.standard import MLP
from fewbench_plugins.learners.metaoptnet import MetaOptNetSVM, smoothed_cross_entropy


def test_projection_matches_a_reference_solver():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    upper = torch.zeros(6, 4, dtype=torch.float64)
    upper[torch.arange(6), torch.tensor([0, 1, 2, 3, 0, 1])] = 0.3
    projected = project_rows(z, upper)
    for row in range(6):
        reference = minimize(
            lambda v, r=row: ((v - z[r].numpy()) ** 2).sum(),
            np.zeros(4),
            method="SLSQP",
            bounds=[(None, float(b)) for b in upper[row]],
            constraints=[{"type": "eq", "fun": lambda v: v.sum()}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        np.testing.assert_allclose(projected[row].numpy(), reference.x, atol=1e-7)
    assert torch.all(projected <= upper + 1e-12)
    torch.testing.assert_close(projected.sum(-1), torch.zeros(6, dtype=torch.float64))
    # A feasible point is its own projection.
    torch.testing.assert_close(project_rows(projected, upper), projected)


def reference_dual(kernel: torch.Tensor, labels: torch.Tensor, ways: int, C: float) -> np.ndarray:
    n = len(labels)
    one_hot = torch.nn.functional.one_hot(labels, ways).double()

    def objective(v):
        alpha = torch.tensor(v).reshape(1, n, ways)
        return float(dual_objective(alpha, kernel[None], one_hot[None]))

    solution = minimize(
        objective,
        np.zeros(n * ways),
        method="SLSQP",
        bounds=[(None, C if m == int(labels[i]) else 0.0) for i in range(n) for m in range(ways)],
        constraints=[
            {"type": "eq", "fun": lambda v, i=i: v.reshape(n, ways)[i].sum()} for i in range(n)
        ],
        options={"ftol": 1e-15, "maxiter": 2000},
    )
    return solution.x.reshape(n, ways)


def test_the_dual_solution_matches_a_reference_solver_episode_by_episode():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 0, 1, 2]])
    kernel = x @ x.transpose(1, 2)
    alpha = solve_crammer_singer_dual(kernel, labels, 3, C=0.1, iterations=500)
    for e in range(2):
        np.testing.assert_allclose(
            alpha[e].numpy(), reference_dual(kernel[e], labels[e], 3, 0.1), atol=1e-5
        )


def test_query_scores_are_w_dot_q():
    g = torch.Generator().manual_seed(2)
    support = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1]])
    query = torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
    alpha = solve_crammer_singer_dual(support @ support.transpose(1, 2), labels, 2, 0.1, 100)
    weights = alpha[0].T @ support[0]  # w_m = sum_i alpha_i^m x_i
    torch.testing.assert_close(svm_logits(support, labels, query, 2)[0], query[0] @ weights.T)


def test_the_gradient_through_the_solver_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    support = torch.randn(1, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 0, 1, 1]])
    query = torch.randn(1, 3, 3, generator=g, dtype=torch.float64)
    direction = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)

    def value(s):
        return svm_logits(s, labels, query, 2, C=0.1, iterations=300)[..., 0].sum()

    (gradient,) = torch.autograd.grad(value(support), support)
    step = 1e-6
    with torch.no_grad():
        difference = (value(support + step * direction) - value(support - step * direction)) / (
            2 * step
        )
    torch.testing.assert_close((gradient * direction).sum(), difference, atol=1e-5, rtol=1e-4)


def test_the_authors_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    log_p = torch.log_softmax(logits, -1)[0]
    expected = -(0.9 * log_p[0] + 0.05 * log_p[1] + 0.05 * log_p[2])
    torch.testing.assert_close(smoothed_cross_entropy(logits, torch.tensor([0]), 0.1), expected)


SHAPE = (5,)


def learner(**params) -> MetaOptNetSVM:
    torch.manual_seed(0)
    made = MetaOptNetSVM(**{**ParamSet.of(MetaOptNetSVM).defaults(), **params})
    made.setup(
        LearnerContext(
            backbone=MLP(hidden=[8]), input_shape=SHAPE, ways=3, shots=2, query=2,
            num_train_classes=10, device=torch.device("cpu"),
        )
    )  # fmt: skip
    return made


def episodes() -> EpisodeBatch:
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(3)
    return EpisodeBatch(
        torch.randn(2, 6, *SHAPE, generator=g),
        labels.repeat_interleave(2).expand(2, -1),
        torch.randn(2, 6, *SHAPE, generator=g),
        labels.repeat_interleave(2).expand(2, -1),
        3,
    )


def test_the_learner_trains_through_the_svm_and_follows_the_papers_schedule():
    svm = learner()
    before = {k: v.clone() for k, v in svm.network.state_dict().items()}
    assert svm.iterations(600) == 600
    assert [svm.learning_rate(i) for i in (1, 201, 401, 501)] == pytest.approx(
        [0.1, 0.006, 0.0012, 0.00024]
    )
    loss = svm.train_step(episodes(), 1)
    assert loss > 0
    changed = [k for k, v in svm.network.state_dict().items() if not torch.equal(v, before[k])]
    assert "scale" in changed and any(k.startswith("features") for k in changed)
    assert svm.predict(episodes()).shape == (2, 6, 3)
    with pytest.raises(FewbenchError, match="lr_steps and lr_factors"):
        MetaOptNetSVM(**{**ParamSet.of(MetaOptNetSVM).defaults(), "lr_factors": [0.1]}).check()
