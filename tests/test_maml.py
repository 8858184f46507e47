"""The MAML meta-gradient: torch.func against higher, and against derivations by hand."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fewbench.plugin.dataset import EpisodeBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench_plugins.backbones.standard import MLP, Conv4
from fewbench_plugins.learners.maml import MAML, FirstOrderMAML
from fewbench_plugins.learners.maml_engines import EngineChoice, choose_engine


def make_learner(cls, backbone, input_shape, ways, dtype=torch.float32, **params):
    torch.manual_seed(0)
    learner = cls(**{**ParamSet.of(cls).defaults(), **params})
    learner.setup(
        LearnerContext(
            backbone=backbone,
            input_shape=input_shape,
            ways=ways,
            shots=1,
            query=2,
            num_train_classes=10,
            device=torch.device("cpu"),
        )
    )
    learner.model.to(dtype)
    return learner


def random_episodes(tasks, ways, shots, query, shape, dtype=torch.float32, seed=1) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return EpisodeBatch(
        torch.randn(tasks, ways * shots, *shape, generator=g, dtype=dtype),
        labels.repeat_interleave(shots).expand(tasks, -1),
        torch.randn(tasks, ways * query, *shape, generator=g, dtype=dtype),
        labels.repeat_interleave(query).expand(tasks, -1),
        ways,
    )


def meta_gradient(learner, batch) -> list[torch.Tensor]:
    learner.model.zero_grad(set_to_none=True)
    learner.meta_gradient_step(batch)
    return [p.grad.clone() for p in learner.model.parameters()]


ENGINE_VARIANTS = [
    {"engine": "higher"},
    {"engine": "loop", "threads": 1},
    {"engine": "loop", "threads": 2},
    {"engine": "batched", "threads": 1},
    {"engine": "batched", "threads": 2, "tasks_per_call": 1},
    {"engine": "batched", "threads": 1, "tasks_per_call": 2},
]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
def test_every_engine_gives_the_same_meta_gradient(first_order, steps):
    """higher (the reference), the per-task loop and the batched engine, chunked or not."""
    backbone = Conv4(hidden=8, pool="stride")
    batch = random_episodes(tasks=3, ways=3, shots=2, query=2, shape=(1, 14, 14))
    results = []
    for variant in ENGINE_VARIANTS:
        learner = make_learner(
            MAML,
            backbone,
            (1, 14, 14),
            3,
            first_order=first_order,
            inner_steps=steps,
            inner_lr=0.3,
            **variant,
        )
        results.append((variant, meta_gradient(learner, batch)))
    reference = results[0][1]
    for variant, grads in results[1:]:
        for a, b in zip(grads, reference, strict=True):
            torch.testing.assert_close(
                a, b, rtol=1e-4, atol=1e-6, msg=lambda m, v=variant: f"{v}: {m}"
            )


@pytest.mark.parametrize("steps", [0, 2])
def test_batched_and_loop_predictions_agree(steps):
    backbone = Conv4(hidden=8, pool="stride")
    batch = random_episodes(tasks=5, ways=3, shots=2, query=4, shape=(1, 14, 14))
    outputs = {}
    for variant in (
        {"engine": "loop"},
        {"engine": "batched"},
        {"engine": "batched", "tasks_per_call": 2},
    ):
        learner = make_learner(MAML, backbone, (1, 14, 14), 3, eval_inner_steps=steps, **variant)
        outputs[str(variant)] = learner.predict(batch)
    first, *rest = outputs.values()
    for other in rest:
        torch.testing.assert_close(other, first, rtol=1e-4, atol=1e-5)


def test_auto_engine_follows_the_documented_rule():
    small = random_episodes(tasks=2, ways=5, shots=1, query=1, shape=(1, 28, 28))
    large = random_episodes(tasks=2, ways=5, shots=1, query=15, shape=(1, 28, 28))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    threads = torch.get_num_threads()
    assert choose_engine("auto", 0, cpu, small) == EngineChoice(
        "batched", threads, "auto: CPU, 7840 input values per task <= 20000"
    )
    assert choose_engine("auto", 0, cpu, large) == EngineChoice(
        "loop", threads, "auto: CPU, 62720 input values per task > 20000"
    )
    assert choose_engine("auto", 0, cuda, large) == EngineChoice("batched", 1, "auto: CUDA device")
    assert choose_engine("batched", 3, cpu, large) == EngineChoice("batched", 3, "set in the suite")
    assert choose_engine("higher", 3, cpu, small).threads == 1
    assert choose_engine("auto", 0, cuda, small, vmap_safe=False).engine == "loop"
    assert choose_engine("auto", 0, cpu, small, vmap_safe=False).engine == "loop"
    with pytest.raises(ValueError, match="running statistics"):
        choose_engine("batched", 0, cpu, small, vmap_safe=False)


def test_auto_runs_mini_imagenet_sized_tasks_one_at_a_time_when_the_heap_keeps_large_blocks(
    monkeypatch,
):
    from fewbench.running import cpu_heap

    large = random_episodes(tasks=2, ways=5, shots=1, query=15, shape=(3, 84, 84))
    omniglot = random_episodes(tasks=2, ways=5, shots=1, query=15, shape=(1, 28, 28))
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    monkeypatch.setattr(cpu_heap, "_state", cpu_heap.HEAP)
    assert choose_engine("auto", 0, cpu, large) == EngineChoice(
        "loop",
        1,
        "auto: CPU, 1693440 input values per task > 20000; one task at a time, its large "
        "blocks on the main heap (fewbench.running.cpu_heap)",
    )
    assert choose_engine("auto", 0, cpu, omniglot).threads == threads
    assert choose_engine("auto", 2, cpu, large).threads == 2  # the suite's threads win
    assert choose_engine("loop", 0, cpu, large).threads == threads  # so does its engine
    monkeypatch.setattr(cpu_heap, "_state", "system (FEWBENCH_MALLOC=system)")
    assert choose_engine("auto", 0, cpu, large).threads == threads


def test_the_engine_is_described_for_the_results_store():
    learner = make_learner(MAML, Conv4(hidden=8, pool="stride"), (1, 28, 28), 5, threads=2)
    meta_gradient(learner, random_episodes(tasks=2, ways=5, shots=1, query=1, shape=(1, 28, 28)))
    learner.predict(random_episodes(tasks=2, ways=5, shots=1, query=15, shape=(1, 28, 28)))
    assert learner.describe_engine() == (
        "second-order; train: batched x 2 threads (auto: CPU, 7840 input values per task <= "
        "20000); predict: loop x 2 threads (auto: CPU, 62720 input values per task > 20000)"
    )


def test_a_batch_norm_with_running_statistics_is_never_batched():
    class RunningStats(Conv4):
        def build_features(self, input_shape):
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten()), 4 * 12 * 12

    learner = make_learner(MAML, RunningStats(hidden=4, pool="stride"), (1, 14, 14), 3)
    learner.ctx = dataclasses.replace(learner.ctx, device=torch.device("cuda"))
    batch = random_episodes(tasks=2, ways=3, shots=1, query=1, shape=(1, 14, 14))
    assert learner.engine_for("train", batch).engine == "loop"


def test_second_order_differs_from_first_order():
    backbone = Conv4(hidden=8, pool="stride")
    batch = random_episodes(tasks=2, ways=3, shots=2, query=2, shape=(1, 14, 14))
    second = meta_gradient(make_learner(MAML, backbone, (1, 14, 14), 3), batch)
    first = meta_gradient(make_learner(FirstOrderMAML, backbone, (1, 14, 14), 3), batch)
    assert max((a - b).abs().max().item() for a, b in zip(second, first, strict=True)) > 1e-4


def _meta_loss(model, params, batch, lr, steps):
    """Mean query loss after ``steps`` plain SGD steps, written out directly."""
    total = 0.0
    for t in range(len(batch)):
        adapted = dict(params)
        for _ in range(steps):
            loss = nn.functional.cross_entropy(
                functional_call(model, adapted, (batch.support_x[t],)), batch.support_y[t]
            )
            grads = torch.autograd.grad(loss, list(adapted.values()), create_graph=True)
            adapted = {k: v - lr * g for (k, v), g in zip(adapted.items(), grads, strict=True)}
        total = total + nn.functional.cross_entropy(
            functional_call(model, adapted, (batch.query_x[t],)), batch.query_y[t]
        )
    return total / len(batch)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_second_order_matches_finite_differences(engine):
    backbone = MLP(hidden=[6])
    learner = make_learner(
        MAML, backbone, (4,), 3, dtype=torch.float64, inner_lr=0.5, inner_steps=2, engine=engine
    )
    batch = random_episodes(tasks=2, ways=3, shots=2, query=3, shape=(4,), dtype=torch.float64)
    analytic = meta_gradient(learner, batch)
    names = [n for n, _ in learner.model.named_parameters()]
    base = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    eps = 1e-6
    checked = 0
    for name, grad in zip(names, analytic, strict=True):
        for index in [(0,) * base[name].dim(), tuple(s - 1 for s in base[name].shape)]:
            plus, minus = copy.deepcopy(base), copy.deepcopy(base)
            plus[name][index] += eps
            minus[name][index] -= eps
            plus = {k: v.requires_grad_() for k, v in plus.items()}
            minus = {k: v.requires_grad_() for k, v in minus.items()}
            numeric = (
                _meta_loss(learner.model, plus, batch, 0.5, 2)
                - _meta_loss(learner.model, minus, batch, 0.5, 2)
            ).item() / (2 * eps)
            assert grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
            checked += 1
    assert checked == 2 * len(names)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_first_order_applies_the_query_gradient_at_the_adapted_weights(engine):
    """By hand: one SGD step to theta', then the plain gradient of the query loss at theta'."""
    backbone = MLP(hidden=[5])
    learner = make_learner(
        FirstOrderMAML, backbone, (4,), 3, dtype=torch.float64, inner_lr=0.3, engine=engine
    )
    batch = random_episodes(tasks=2, ways=3, shots=1, query=2, shape=(4,), dtype=torch.float64)
    analytic = meta_gradient(learner, batch)
    expected = None
    for t in range(len(batch)):
        model = copy.deepcopy(learner.model)
        loss = nn.functional.cross_entropy(model(batch.support_x[t]), batch.support_y[t])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= 0.3 * g
        query_loss = nn.functional.cross_entropy(model(batch.query_x[t]), batch.query_y[t]) / len(
            batch
        )
        task_grads = torch.autograd.grad(query_loss, list(model.parameters()))
        expected = (
            list(task_grads)
            if expected is None
            else [e + g for e, g in zip(expected, task_grads, strict=True)]
        )
    for a, b in zip(analytic, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_predict_adapts_with_eval_steps_and_leaves_the_weights_alone():
    backbone = Conv4(hidden=8, pool="stride")
    learner = make_learner(MAML, backbone, (1, 14, 14), 3, eval_inner_steps=2)
    before = [p.detach().clone() for p in learner.model.parameters()]
    batch = random_episodes(tasks=2, ways=3, shots=2, query=4, shape=(1, 14, 14))
    outputs = learner.predict(batch)
    assert outputs.shape == (2, 12, 3)
    assert not outputs.requires_grad
    for a, b in zip(before, learner.model.parameters(), strict=True):
        assert torch.equal(a, b)
