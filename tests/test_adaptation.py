"""The public adaptation API (fewbench.methods.adaptation): meta-gradients against finite
differences of an objective written out independently, in float64, for every kind of
inner loop the MAML family needs; batched equal to loop; first order by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fewbench.methods.adaptation import (
    Adapter,
    PerStepBatchNorm,
    StepSizes,
    head_names,
    parameter_names,
)
from fewbench.plugin.dataset import EpisodeBatch

WAYS, SHOTS, QUERY, FEATURES = 3, 2, 2, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model() -> nn.Sequential:
    """Body (linear, batch norm from batch statistics, ReLU), then a linear head."""
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Linear(FEATURES, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.ReLU()
    )
    return nn.Sequential(body, nn.Linear(5, WAYS)).double()


def episodes(tasks: int = 2, seed: int = 1) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)

    def x(n):
        return torch.randn(tasks, n, FEATURES, generator=g, dtype=torch.float64)

    return EpisodeBatch(
        x(WAYS * SHOTS),
        labels.repeat_interleave(SHOTS).expand(tasks, -1),
        x(WAYS * QUERY),
        labels.repeat_interleave(QUERY).expand(tasks, -1),
        WAYS,
    )


def prototype_init(loop, params, sx, sy):
    weight, bias = head_names(loop.model)
    features = loop.features(params, sx)
    one_hot = nn.functional.one_hot(sy, WAYS).to(features.dtype)
    prototypes = one_hot.T @ features / one_hot.sum(0).unsqueeze(1)
    return {**params, weight: 2 * prototypes, bias: -(prototypes**2).sum(1)}


# Each configuration: how the adapter is built and the meta-gradient called.
CONFIGS = {
    "head only, fixed scalar, 2 steps": dict(adapt="head", steps=2),
    "body only, fixed scalar": dict(adapt="body", steps=1),
    "learnt per tensor, 2 steps": dict(step=dict(per="tensor"), steps=2),
    "learnt per element, 2 steps": dict(step=dict(per="element"), steps=2),
    "learnt one scalar": dict(step=dict(per="scalar"), steps=2),
    "learnt per step and tensor, 3 steps": dict(step=dict(per="tensor", steps=3), steps=3),
    "multi-step loss": dict(steps=3, weights=[0.2, 0.3, 0.5]),
    "per-step batch norm": dict(per_step_bn=True, steps=2, adapt="no-bn"),
    "prototype head init": dict(task_init=True, steps=2),
}


def build(config: dict, engine: str, first_order: bool = False) -> Adapter:
    model = tiny_model()
    adapt = config.get("adapt", "all")
    if adapt == "no-bn":
        adapt = lambda name: not name.startswith("0.1.")  # noqa: E731
    names = parameter_names(model, adapt)
    step = 0.3
    if "step" in config:
        step = StepSizes(model, names, 0.3, **config["step"])
        torch.manual_seed(5)
        with torch.no_grad():  # distinct values so that a mixed-up index shows
            for value in step.values.values():
                value.add_(torch.rand_like(value) * 0.2)
    per_step = PerStepBatchNorm(model, config["steps"]) if config.get("per_step_bn") else None
    if per_step is not None:
        with torch.no_grad():
            for value in per_step.values.values():
                value.add_(torch.randn_like(value) * 0.1)
    return Adapter(
        model,
        nn.functional.cross_entropy,
        adapt=adapt,
        step_size=step,
        first_order=first_order,
        engine=engine,
        threads=1,
        per_step_batch_norm=per_step,
        task_init=prototype_init if config.get("task_init") else None,
    )


def reference_objective(adapter: Adapter, config: dict, batch: EpisodeBatch) -> torch.Tensor:
    """The mean query loss, written out directly with torch.autograd (second order)."""
    model = adapter.model
    names = adapter.adapted
    steps, weights = config["steps"], config.get("weights")
    theta = dict(model.named_parameters())

    def forward(params, x, step):
        if adapter.per_step_batch_norm is not None:
            params = {**params, **adapter.per_step_batch_norm.at(step)}
        return functional_call(model, params, (x,))

    total = 0.0
    for t in range(len(batch)):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        params = dict(theta)
        if config.get("task_init"):
            body = {n: p for n, p in params.items() if n.startswith("0.")}
            features = functional_call(model[0], {k[2:]: v for k, v in body.items()}, (sx,))
            counts = torch.stack([(sy == k).sum() for k in range(WAYS)]).unsqueeze(1)
            protos = torch.stack([features[sy == k].sum(0) for k in range(WAYS)]) / counts
            params["1.weight"], params["1.bias"] = 2 * protos, -(protos**2).sum(1)
            # Independent variables from here: the inner gradient is the partial one.
            params = {n: p.view_as(p) for n, p in params.items()}
        losses = []
        for step in range(steps):
            loss = nn.functional.cross_entropy(forward(params, sx, step), sy)
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
            if adapter.step_sizes is None:
                rates = dict.fromkeys(names, 0.3)
            else:
                rates = adapter.step_sizes.at(step)
            params = {**params}
            for n, g in zip(names, grads, strict=True):
                params[n] = params[n] - rates[n] * g
            losses.append(nn.functional.cross_entropy(forward(params, qx, step), qy))
        if weights is None:
            total = total + losses[-1]
        else:
            total = total + sum(w * loss for w, loss in zip(weights, losses, strict=True))
    return total / len(batch)


def analytic(adapter: Adapter, config: dict, batch: EpisodeBatch, **kwargs) -> list[torch.Tensor]:
    for _, p in adapter.meta_parameters():
        p.grad = None
    adapter.meta_gradient(
        batch, steps=config["steps"], step_weights=config.get("weights"), **kwargs
    )
    return [p.grad.clone() for _, p in adapter.meta_parameters()]


@pytest.mark.parametrize("engine", ["loop", "batched"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_meta_gradient_matches_finite_differences(name, engine):
    config = CONFIGS[name]
    adapter = build(config, engine)
    batch = episodes()
    grads = analytic(adapter, config, batch)
    eps = 1e-6
    checked = 0
    for (pname, p), g in zip(adapter.meta_parameters(), grads, strict=True):
        flat = p.detach().view(-1)
        for index in {0, flat.numel() - 1}:
            flat[index] += eps  # flat is a detached view: these edits are not recorded
            plus = reference_objective(adapter, config, batch).item()
            flat[index] -= 2 * eps
            minus = reference_objective(adapter, config, batch).item()
            flat[index] += eps
            numeric = (plus - minus) / (2 * eps)
            assert g.view(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8), pname
            checked += 1
    # Every learnt tensor was checked: the step sizes and per-step weights are included.
    assert checked >= len(grads)
    if "step" in config:
        assert any(n.startswith("step_sizes.") for n, _ in adapter.meta_parameters())


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_equals_loop(name, first_order):
    config = CONFIGS[name]
    batch = episodes(tasks=3)
    loop = analytic(build(config, "loop", first_order), config, batch)
    batched = analytic(build(config, "batched", first_order), config, batch)
    for a, b in zip(batched, loop, strict=True):
        torch.testing.assert_close(a, b)
    loop_out = build(config, "loop").predict(batch, steps=config["steps"])
    batched_out = build(config, "batched").predict(batch, steps=config["steps"])
    torch.testing.assert_close(batched_out, loop_out)


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_first_order_by_hand_with_a_learnt_step_size(engine):
    """One step: theta gets the query gradient q at theta'; alpha gets -sum(g * q)."""
    config = dict(step=dict(per="tensor"), steps=1)
    adapter = build(config, engine, first_order=True)
    batch = episodes(tasks=2)
    grads = dict(
        zip(
            [n for n, _ in adapter.meta_parameters()], analytic(adapter, config, batch), strict=True
        )
    )
    model = adapter.model
    theta = {n: p.detach() for n, p in model.named_parameters()}
    rates = {n: r.detach() for n, r in adapter.step_sizes.at(0).items()}
    expected_theta = {n: torch.zeros_like(p) for n, p in theta.items()}
    expected_rate = {n: torch.zeros(()).double() for n in theta}
    for t in range(2):
        params = {n: p.clone().requires_grad_() for n, p in theta.items()}
        loss = nn.functional.cross_entropy(
            functional_call(model, params, (batch.support_x[t],)), batch.support_y[t]
        )
        g = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        adapted = {n: (theta[n] - rates[n] * g[n]).requires_grad_() for n in theta}
        query = (
            nn.functional.cross_entropy(
                functional_call(model, adapted, (batch.query_x[t],)), batch.query_y[t]
            )
            / 2
        )
        q = dict(zip(adapted, torch.autograd.grad(query, list(adapted.values())), strict=True))
        for n in theta:
            expected_theta[n] += q[n]
            expected_rate[n] += -(g[n] * q[n]).sum()
    for n in theta:
        torch.testing.assert_close(grads[f"model.{n}"], expected_theta[n])
        torch.testing.assert_close(
            grads[f"step_sizes.values.{n.replace('.', '__')}"], expected_rate[n]
        )


@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_adam_inner_loop_equals_torch_adam_on_each_task(engine):
    """``adapt`` with Adam (Reptile's inner loop) against torch.optim.Adam, minibatches cycling."""
    model = tiny_model()
    adapter = Adapter(
        model, nn.functional.cross_entropy, step_size=0.01, optimizer="adam", engine=engine
    )
    batch = episodes(tasks=2)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    adapted = adapter.adapt(x, y, steps=4, batch_size=4)
    for t in range(2):
        copy_ = copy.deepcopy(model)
        optimizer = torch.optim.Adam(copy_.parameters(), lr=0.01, betas=(0.0, 0.999))
        for step in range(4):
            window = [(step * 4 + i) % x.shape[1] for i in range(4)]
            optimizer.zero_grad()
            nn.functional.cross_entropy(copy_(x[t][window]), y[t][window]).backward()
            optimizer.step()
        for n, p in copy_.named_parameters():
            torch.testing.assert_close(adapted[n][t], p.detach())


def test_parameter_selection():
    model = tiny_model()
    assert head_names(model) == ("1.weight", "1.bias")
    assert parameter_names(model, "head") == ("1.weight", "1.bias")
    assert parameter_names(model, "body") == ("0.0.weight", "0.0.bias", "0.1.weight", "0.1.bias")
    assert parameter_names(model, lambda n: n.endswith("bias")) == (
        "0.0.bias",
        "0.1.bias",
        "1.bias",
    )
    with pytest.raises(ValueError, match="does not have"):
        parameter_names(model, ["nope"])
    with pytest.raises(ValueError, match="selects no parameter"):
        parameter_names(model, lambda n: False)


def test_step_sizes_shapes_and_steps_past_the_last():
    model = tiny_model()
    names = parameter_names(model, "all")
    element = StepSizes(model, names, 0.5, per="element")
    assert element.at(0)["0.0.weight"].shape == model[0][0].weight.shape
    per_step = StepSizes(model, names, 0.5, per="tensor", steps=2)
    with torch.no_grad():
        per_step.values["1__bias"][1] = 0.9
    assert per_step.at(0)["1.bias"].item() == 0.5
    assert per_step.at(1)["1.bias"].item() == per_step.at(7)["1.bias"].item() == 0.9
    fixed = StepSizes(model, names, 0.5, per="scalar", learnable=False)
    assert not any(p.requires_grad for p in fixed.parameters())
    with pytest.raises(ValueError, match="cover exactly"):
        Adapter(model, nn.functional.cross_entropy, adapt="head", step_size=element)


def test_predict_leaves_the_meta_parameters_alone():
    adapter = build(CONFIGS["learnt per tensor, 2 steps"], "batched")
    before = [p.detach().clone() for p in adapter.parameters()]
    out = adapter.predict(episodes(), steps=2)
    assert out.shape == (2, WAYS * QUERY, WAYS) and not out.requires_grad
    for a, b in zip(before, adapter.parameters(), strict=True):
        assert torch.equal(a, b)
