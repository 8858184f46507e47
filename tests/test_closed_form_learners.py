"""R2-D2, RFS and Meta-Baseline: their heads against direct computations, Meta-Baseline's two
stages through the training loop, checkpoints, and refusing regression."""

from __future__ import annotations

import io
import math
import sys

import numpy as np
import pytest
import torch

from fewbench.errors import FewbenchError
from fewbench.plugin.dataset import ClassPool, EpisodeBatch, LabelledBatch
from fewbench.plugin.learner import Learner, LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench.plugin.task_types import CLASSIFICATION, REGRESSION
from fewbench.running.training import train
from fewbench.suite.cell import Cell
from fewbench_plugins.backbones.standard import MLP, Conv4
from fewbench_plugins.learners.finetune import FineTune
from fewbench_plugins.learners.meta_baseline import MetaBaseline, cosine_prototype_logits
from fewbench_plugins.learners.r2d2 import R2D2, RidgeHead, ridge_solve
from fewbench_plugins.learners.rfs import RFS

SHAPE = (1, 6, 6)


def context(task_type=CLASSIFICATION, backbone=None) -> LearnerContext:
    return LearnerContext(
        backbone=backbone or MLP(hidden=[8]),
        input_shape=SHAPE,
        ways=3,
        shots=2,
        query=2,
        num_train_classes=5,
        device=torch.device("cpu"),
        task_type=task_type,
    )


def make(cls: type[Learner], seed: int = 0, backbone=None, **params) -> Learner:
    torch.manual_seed(seed)
    learner = cls(**{**ParamSet.of(cls).defaults(), **params})
    learner.setup(context(backbone=backbone))
    return learner


def episodes(tasks: int = 2, ways: int = 3, shots: int = 2, query: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return EpisodeBatch(
        torch.rand(tasks, ways * shots, *SHAPE, generator=g),
        labels.repeat_interleave(shots).expand(tasks, -1),
        torch.rand(tasks, ways * query, *SHAPE, generator=g),
        labels.repeat_interleave(query).expand(tasks, -1),
        ways,
    )


def labelled(size: int = 10, seed: int = 2) -> LabelledBatch:
    g = torch.Generator().manual_seed(seed)
    return LabelledBatch(torch.rand(size, *SHAPE, generator=g), torch.arange(size) % 5)


# -- R2-D2 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n, d", [(4, 9), (12, 5)], ids=["woodbury", "primal"])
def test_ridge_solve_equals_the_primal_and_the_woodbury_forms(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, d, dtype=torch.float64, generator=g)
    y = torch.randn(3, n, 2, dtype=torch.float64, generator=g)
    lam = 0.7
    xt = x.transpose(1, 2)
    primal = torch.linalg.solve(xt @ x + lam * torch.eye(d, dtype=x.dtype), xt @ y)
    woodbury = xt @ torch.linalg.inv(x @ xt + lam * torch.eye(n, dtype=x.dtype)) @ y
    solved = ridge_solve(x, y, lam)
    torch.testing.assert_close(solved, primal)
    torch.testing.assert_close(solved, woodbury)
    # ... and it is the minimiser: the gradient of ||xW - y||^2 + lam ||W||^2 vanishes.
    torch.testing.assert_close(xt @ (x @ solved - y) + lam * solved, torch.zeros_like(solved))


@pytest.mark.parametrize("shots", [1, 5], ids=["woodbury", "primal"])
def test_ridge_head_is_scaled_ridge_with_a_bias_column(shots):
    torch.manual_seed(0)
    ways, width = 3, 6
    support = torch.randn(2, ways * shots, width, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(shots).expand(2, -1)
    query = torch.randn(2, 4, width, dtype=torch.float64)
    head = RidgeHead(init_lambda=2.0, learn_lambda=True, init_scale=3.0, init_bias=0.5).double()
    n = ways * shots
    for t in range(2):
        x = torch.cat([support[t], torch.ones(n, 1, dtype=torch.float64)], 1) / math.sqrt(n)
        y = torch.nn.functional.one_hot(labels[t], ways).double() / math.sqrt(n)
        w = torch.linalg.solve(x.T @ x + 2.0 * torch.eye(width + 1, dtype=x.dtype), x.T @ y)
        expected = 3.0 * (torch.cat([query[t], torch.ones(4, 1, dtype=x.dtype)], 1) @ w) + 0.5
        torch.testing.assert_close(head(support, labels, query, ways)[t], expected)


def test_r2d2_trains_the_backbone_and_the_head_through_the_solve():
    learner = make(R2D2)
    batch = episodes()
    loss = learner.ctx.loss(learner._logits(batch), batch.query_y)
    loss.backward()
    for name, parameter in learner.model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    before = [p.detach().clone() for p in learner.features.parameters()]
    learner.train_step(batch, 1)
    after = list(learner.features.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert learner.predict(batch).shape == (2, 9, 3)


def test_r2d2_learning_rate_halves_every_2000_iterations():
    learner = make(R2D2)
    batch = episodes(tasks=1)
    for iteration, lr in ((1, 0.005), (2000, 0.005), (2001, 0.0025), (4001, 0.00125)):
        learner.train_step(batch, iteration)
        assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_r2d2_can_keep_lambda_fixed():
    learner = make(R2D2, learn_lambda=False)
    assert "head.log_lambda" not in dict(learner.model.named_parameters())
    assert learner.head.lam.item() == pytest.approx(50.0)


# -- RFS -----------------------------------------------------------------------------------
@pytest.mark.parametrize("embedding", ["penultimate", "logits"])
def test_rfs_agrees_with_scikit_learn_on_the_normalised_features(embedding):
    from sklearn.linear_model import LogisticRegression

    learner = make(RFS, backbone=Conv4(hidden=8, pool="stride"), embedding=embedding)
    batch = episodes(tasks=2, shots=2, query=4)
    outputs = learner.predict(batch)
    assert outputs.shape == (2, 12, 3)
    network = learner.network if embedding == "logits" else learner.features
    learner.network.eval()
    for t in range(2):
        with torch.no_grad():
            both = network(torch.cat([batch.support_x[t], batch.query_x[t]])).double().numpy()
        both = both / np.maximum(np.linalg.norm(both, axis=1, keepdims=True), 1e-12)
        support, query = both[:6], both[6:]
        clf = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=0)
        clf.fit(support, batch.support_y[t].numpy())
        assert (outputs[t].argmax(-1).numpy() == clf.predict(query)).all()
        np.testing.assert_allclose(outputs[t].numpy(), clf.predict_log_proba(query), atol=1e-4)


def test_rfs_handles_two_way_episodes():
    learner = make(RFS)
    assert learner.predict(episodes(ways=2)).shape == (2, 6, 2)


def test_rfs_step_schedule_decays_at_60_and_80_percent():
    learner = make(RFS)
    assert learner.iterations(100) == 100
    rates = [learner.learning_rate(i) for i in (1, 60, 61, 80, 81, 100)]
    assert rates == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])
    losses = [learner.train_step(labelled(), i) for i in range(1, 16)]
    assert losses[-1] < losses[0]


def test_rfs_without_scikit_learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)  # import fails
    with pytest.raises(FewbenchError, match=r"pip install 'fewbench\[rfs\]'"):
        make(RFS)


# -- Meta-Baseline -------------------------------------------------------------------------
def test_cosine_prototype_logits_by_hand():
    support = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    labels = torch.tensor([[0, 0, 1, 1]])
    query = torch.tensor([[[1.0, 1.0], [0.0, -3.0]]])
    centroids = [(2.0, 0.0), (0.5, 1.5)]
    expected = [
        [10.0 * (q[0] * c[0] + q[1] * c[1]) / (math.hypot(*q) * math.hypot(*c)) for c in centroids]
        for q in [(1.0, 1.0), (0.0, -3.0)]
    ]
    logits = cosine_prototype_logits(support, labels, query, 2, torch.tensor(10.0))
    torch.testing.assert_close(logits, torch.tensor([expected]))


def test_meta_baseline_predicts_with_temperature_times_cosine():
    learner = make(MetaBaseline)
    batch = episodes(tasks=1)
    with torch.no_grad():
        learner.model.temperature.fill_(4.0)
        learner.features.eval()
        both = learner.features(torch.cat([batch.support_x[0], batch.query_x[0]]))
    support, query = both[:6], both[6:]
    centroids = torch.stack([support[2 * k : 2 * k + 2].mean(0) for k in range(3)])
    cosine = torch.nn.functional.cosine_similarity(query[:, None], centroids[None], dim=-1)
    torch.testing.assert_close(learner.predict(batch)[0], 4.0 * cosine)


def cell_config(learner: dict, iterations: int) -> dict:
    return {
        "dataset": {"name": "toy"},
        "backbone": {"name": "mlp"},
        "learner": learner,
        "seed": 0,
        "tasks": {"ways": 3, "shots": 1, "query": 2},
        "train": {
            "iterations": iterations, "validate_every": 2, "val_episodes": 2, "log_every": 1,
            "checkpoint_every": 100, "checkpoint_minutes": 5.0, "augment": [],
        },
        "eval": {"query": 2, "seed": 0, "chunk": 2},
    }  # fmt: skip


def test_meta_baseline_pretrains_on_examples_then_meta_trains_on_episodes(monkeypatch):
    images = torch.randint(
        0, 256, (5, 5, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    pool = ClassPool(images)
    learner = make(MetaBaseline, pretrain_iterations=3, pretrain_batch_size=10, meta_batch_size=2)
    seen, classifiers = [], []
    step = learner.train_step

    def recording(batch, iteration):
        size = len(batch.x) if isinstance(batch, LabelledBatch) else len(batch)
        seen.append((iteration, type(batch).__name__, size))
        classifiers.append(learner.classifier.weight.detach().clone())
        return step(batch, iteration)

    monkeypatch.setattr(learner, "train_step", recording)
    outcome = train(
        learner,
        {"train": pool, "val": pool},
        Cell.from_config(cell_config({"name": "meta_baseline"}, iterations=2), "c"),
        identity=("toy",),
        device=torch.device("cpu"),
        checkpoint_dir=None,
        progress=False,
    )
    assert outcome.iterations == 5  # 3 pretraining steps + the suite's 2 meta steps
    assert seen == [
        (1, "LabelledBatch", 10),
        (2, "LabelledBatch", 10),
        (3, "LabelledBatch", 10),
        (4, "EpisodeBatch", 2),
        (5, "EpisodeBatch", 2),
    ]
    assert not torch.equal(classifiers[0], classifiers[3])  # stage 1 trains the classifier
    assert torch.equal(classifiers[3], classifiers[4])  # stage 2 leaves it alone
    assert outcome.best_iteration in (2, 4, 5)  # validated with cosine centroids throughout


def test_meta_iterations_zero_is_the_classifier_baseline():
    learner = make(MetaBaseline, pretrain_iterations=4, meta_iterations=0)
    assert learner.iterations(100) == 4
    assert [learner.batch_kind_at(i) for i in (1, 4)] == ["examples", "examples"]
    assert learner.batch_size() == 128
    learner = make(MetaBaseline, pretrain_iterations=0)
    assert learner.iterations(7) == 7
    assert learner.batch_kind_at(1) == "episodes" and learner.batch_size() == 4
    with pytest.raises(FewbenchError, match="both 0"):
        make(MetaBaseline, pretrain_iterations=0, meta_iterations=0).iterations(5)


def test_other_learners_keep_their_single_batch_kind():
    finetune = FineTune(**ParamSet.of(FineTune).defaults())
    assert [finetune.batch_kind_at(i) for i in (1, 1000)] == ["examples", "examples"]


def test_meta_baseline_temperature_is_learnt_in_stage_two():
    learner = make(MetaBaseline)
    learner.train_step(episodes(), 1)
    assert learner.model.temperature.item() != 10.0


# -- all three -----------------------------------------------------------------------------
def trained(cls: type[Learner], seed: int) -> Learner:
    learner = make(cls, seed=seed)
    if cls is R2D2:
        learner.train_step(episodes(), 1)
    elif cls is RFS:
        learner.train_step(labelled(), 1)
    else:
        learner.train_step(labelled(), 1)
        learner.train_step(episodes(), 2)
    return learner


@pytest.mark.parametrize("cls", [R2D2, RFS, MetaBaseline])
def test_state_dict_round_trips_through_a_weights_only_checkpoint(cls):
    original = trained(cls, seed=0)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    copy = make(cls, seed=1)
    batch = episodes(seed=5)
    assert not torch.equal(copy.predict(batch), original.predict(batch))
    copy.load_state_dict(state)
    torch.testing.assert_close(copy.predict(batch), original.predict(batch))
    # The optimizer's state came along: one more identical step keeps them identical.
    more = episodes(seed=6) if cls is not RFS else labelled(seed=6)
    original.train_step(more, 3)
    copy.train_step(more, 3)
    torch.testing.assert_close(copy.predict(batch), original.predict(batch))


@pytest.mark.parametrize("cls", [R2D2, RFS, MetaBaseline])
def test_regression_is_refused(cls):
    learner = cls(**ParamSet.of(cls).defaults())
    with pytest.raises(FewbenchError, match="classification"):
        learner.setup(context(task_type=REGRESSION))
