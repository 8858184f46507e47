"""The gradient-based family (anil, boil, metasgd, mamlpp, reptile, protomaml): each
learner's defining property on a tiny model, then all of them end to end through the
CLI on real Omniglot, killed once and resumed exactly."""

from __future__ import annotations

import math
import signal

import pytest
import torch
from grid_runs import results
from helpers import REPO, run_fewbench

from fewbench.errors import FewbenchError
from fewbench.plugin.dataset import EpisodeBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench.plugin.task_types import REGRESSION
from fewbench_plugins.backbones.standard import MLP
from fewbench_plugins.learners.head_body import ANIL, BOIL
from fewbench_plugins.learners.mamlpp import MAMLPlusPlus, msl_weights
from fewbench_plugins.learners.metasgd import MetaSGD
from fewbench_plugins.learners.protomaml import ProtoMAML, prototype_head
from fewbench_plugins.learners.reptile import Reptile

WAYS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(cls, ways=WAYS, task_type=None, features=4, hidden=(5,), **params):
    torch.manual_seed(0)
    learner = cls(**{**ParamSet.of(cls).defaults(), "threads": 1, **params})
    extra = {"task_type": task_type} if task_type else {}
    learner.setup(
        LearnerContext(
            backbone=MLP(hidden=list(hidden)),
            input_shape=(features,),
            ways=ways,
            shots=2,
            query=2,
            num_train_classes=10,
            device=torch.device("cpu"),
            **extra,
        )
    )
    return learner


def episodes(tasks=2, seed=1) -> EpisodeBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS)
    return EpisodeBatch(
        torch.randn(tasks, WAYS * 2, 4, generator=g),
        labels.repeat_interleave(2).expand(tasks, -1),
        torch.randn(tasks, WAYS * 2, 4, generator=g),
        labels.repeat_interleave(2).expand(tasks, -1),
        WAYS,
    )


def adapted_and_theta(learner):
    batch = episodes()
    adapted = learner.adapter.adapt(batch.support_x, batch.support_y, steps=2)
    theta = {n: p.detach() for n, p in learner.model.named_parameters()}
    return adapted, theta


# -- ANIL and BOIL --------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["loop", "batched"])
def test_anil_adapts_only_the_head_and_boil_only_the_body(engine):
    head = {"1.weight", "1.bias"}
    for cls, moving in ((ANIL, head), (BOIL, {"0.0.weight", "0.0.bias"})):
        adapted, theta = adapted_and_theta(make(cls, engine=engine))
        for name, value in theta.items():
            changed = not torch.equal(adapted[name][0], value)
            assert changed == (name in moving), f"{cls.name}: {name}"


# -- Meta-SGD ------------------------------------------------------------------------
def test_metasgd_learns_a_step_size_per_element():
    learner = make(MetaSGD, meta_batch_size=2)
    alphas = dict(learner.adapter.step_sizes.named_parameters())
    for name, p in learner.model.named_parameters():
        alpha = alphas[f"values.{name.replace('.', '__')}"]
        assert alpha.shape == p.shape and alpha.requires_grad
        assert alpha.min() >= 0.005 and alpha.max() <= 0.1
    before = {n: a.detach().clone() for n, a in alphas.items()}
    learner.train_step(episodes(), 1)
    for name, alpha in alphas.items():
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0, name
        assert not torch.equal(alpha.detach(), before[name]), name
    # Saved and restored with the weights: a checkpoint carries alpha.
    state = learner.state_dict()
    other = make(MetaSGD, meta_batch_size=2)
    other.load_state_dict(state)
    for a, b in zip(other.adapter.parameters(), learner.adapter.parameters(), strict=True):
        assert torch.equal(a, b)


# -- MAML++ --------------------------------------------------------------------------
def test_mamlpp_loss_weights_follow_the_papers_schedule():
    # Five steps, ten epochs of multi-step loss: non-final weights fall by 1/50 per epoch
    # to 0.006, the final one rises by what they lose (by hand from the authors' code).
    assert msl_weights(5, 10, 0) == pytest.approx([0.2] * 5)
    assert msl_weights(5, 10, 3) == pytest.approx([0.14] * 4 + [0.44])
    assert msl_weights(5, 10, 9) == pytest.approx([0.02] * 4 + [0.92])
    assert msl_weights(5, 10, 40) == pytest.approx([0.006] * 4 + [0.976])
    for epoch in range(12):
        assert sum(msl_weights(5, 10, epoch)) == pytest.approx(1.0)


def test_mamlpp_switches_order_weights_and_learning_rate_on_schedule(monkeypatch):
    learner = make(
        MAMLPlusPlus,
        inner_steps=2,
        eval_inner_steps=2,
        meta_batch_size=2,
        iterations_per_epoch=2,
        msl_epochs=2,
        first_order_epochs=1,
        meta_lr=0.01,
        min_meta_lr=0.0,
        per_step_bn=False,  # an MLP has no batch norm (tested on a Conv-4 below)
    )
    learner.iterations(8)  # four epochs of two iterations
    calls = []
    original = learner.adapter.meta_gradient

    def spy(batch, **kwargs):
        calls.append((kwargs, learner.optimizer.param_groups[0]["lr"]))
        return original(batch, **kwargs)

    monkeypatch.setattr(learner.adapter, "meta_gradient", spy)
    for iteration in range(1, 9):
        learner.train_step(episodes(seed=iteration), iteration)
    orders = [kwargs["first_order"] for kwargs, _ in calls]
    assert orders == [True, True] + [False] * 6  # second order from epoch 1
    weights = [kwargs["step_weights"] for kwargs, _ in calls]
    assert weights[0] == weights[1] == pytest.approx([0.5, 0.5])
    assert weights[2] == pytest.approx(msl_weights(2, 2, 1))
    assert weights[4:] == [None] * 4  # only the final step's loss after msl_epochs
    rates = [lr for _, lr in calls]
    assert rates[0] == pytest.approx(0.01)
    assert rates[2] == pytest.approx(0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert rates[6] == pytest.approx(0.01 * (1 + math.cos(3 * math.pi / 4)) / 2)
    # LSLR and per-step batch norm are meta-parameters, and can each be switched off.
    names = [n for n, _ in learner.adapter.meta_parameters()]
    assert any(n.startswith("step_sizes.") for n in names)
    with pytest.raises(FewbenchError, match="per_step_bn: false"):
        make(MAMLPlusPlus)  # per-step batch norm asked of a backbone without batch norm
    plain = make(MAMLPlusPlus, lslr=False, per_step_bn=False, inner_steps=2)
    assert [n for n, _ in plain.adapter.meta_parameters()] == [
        f"model.{n}" for n, _ in plain.model.named_parameters()
    ]


def test_mamlpp_per_step_batch_norm_on_a_conv4():
    from fewbench_plugins.backbones.standard import Conv4

    torch.manual_seed(0)
    learner = MAMLPlusPlus(**{**ParamSet.of(MAMLPlusPlus).defaults(), "inner_steps": 2})
    learner.setup(
        LearnerContext(
            backbone=Conv4(hidden=4, pool="stride"),
            input_shape=(1, 8, 8),
            ways=WAYS,
            shots=1,
            query=1,
            num_train_classes=10,
            device=torch.device("cpu"),
        )
    )
    per_step = learner.adapter.per_step_batch_norm
    assert per_step.values["0__1__weight"].shape == (5, 4)  # max(train, eval) steps, channels
    assert not any(".1." in n or n.startswith("0.1.") for n in learner.adapter.adapted)


# -- Reptile --------------------------------------------------------------------------------
def test_reptile_update_is_the_interpolation_on_a_quadratic():
    """Linear regression (a quadratic loss), inner SGD: k gradient steps in closed form, then
    phi + epsilon * (mean of the adapted weights - phi)."""
    learner = make(
        Reptile,
        ways=1,
        task_type=REGRESSION,
        features=3,
        hidden=(),
        inner_optimizer="sgd",
        inner_lr=0.1,
        inner_steps=3,
        inner_batch=0,
        outer_lr=0.5,
        outer_lr_final=0.5,
    )
    learner.adapter.double()  # the model is now one linear layer, x -> w.x + b
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(2, 4, 1, generator=g, dtype=torch.float64)
    batch = EpisodeBatch(x[:, :2], y[:, :2], x[:, 2:], y[:, 2:], 1)
    phi = torch.cat([learner.model[1].weight.detach().view(-1), learner.model[1].bias.detach()])
    finals = []
    for t in range(2):  # gradient descent on mean((X w - y)^2), all four examples
        design = torch.cat([x[t], torch.ones(4, 1, dtype=torch.float64)], 1)
        w = phi.clone()
        for _ in range(3):
            w = w - 0.1 * (2 / 4) * design.T @ (design @ w - y[t].view(-1))
        finals.append(w)
    expected = phi + 0.5 * (torch.stack(finals).mean(0) - phi)
    learner.train_step(batch, 1)
    got = torch.cat([learner.model[1].weight.detach().view(-1), learner.model[1].bias.detach()])
    torch.testing.assert_close(got, expected)


def test_reptile_anneals_the_outer_step_linearly():
    learner = make(Reptile, outer_lr=1.0, outer_lr_final=0.0)
    learner.iterations(100)
    assert learner.outer_lr_at(1) == 1.0
    assert learner.outer_lr_at(51) == pytest.approx(0.5)
    assert learner.outer_lr_at(101) == pytest.approx(0.0)


def test_reptile_transduction_changes_only_how_the_query_is_batched():
    batch = episodes()
    inductive = make(Reptile, transductive=False, eval_inner_steps=2).predict(batch)
    transductive = make(Reptile, transductive=True, eval_inner_steps=2).predict(batch)
    assert inductive.shape == transductive.shape == (2, WAYS * 2, WAYS)
    # An MLP has no batch norm: whether the query is seen at once cannot matter.
    torch.testing.assert_close(inductive, transductive)


# -- Proto-MAML -----------------------------------------------------------------------------
def test_protomaml_initial_head_is_twice_the_prototype_and_minus_its_squared_norm():
    learner = make(ProtoMAML)
    loop = learner.adapter._loops(1)[0]
    batch = episodes()
    theta = dict(learner.model.named_parameters())
    head = prototype_head(loop, theta, batch.support_x[0], batch.support_y[0])
    features = learner.model[0](batch.support_x[0])
    prototypes = torch.stack([features[batch.support_y[0] == k].mean(0) for k in range(WAYS)])
    torch.testing.assert_close(head["1.weight"], 2 * prototypes)
    torch.testing.assert_close(head["1.bias"], -(prototypes**2).sum(1))
    # With no inner step, the logits rank classes as a prototypical network's distances.
    logits = learner.adapter.predict(batch, steps=0)[0]
    query = learner.model[0](batch.query_x[0])
    distances = torch.cdist(query, prototypes) ** 2
    assert torch.equal(logits.argmax(1), distances.argmin(1))


# -- end to end ----------------------------------------------------------------------------
SUITE = """\
name: gradient-zoo
datasets: [{name: omniglot}]
tasks: {ways: 5, shots: 1, query: 2}
backbones: [{name: conv4, hidden: 8}]
learners:
  - {name: anil, meta_batch_size: 2, eval_inner_steps: 1}
  - {name: boil, meta_batch_size: 2, eval_inner_steps: 1}
  - {name: metasgd, meta_batch_size: 2}
  - {name: mamlpp, meta_batch_size: 2, inner_steps: 2, eval_inner_steps: 2, iterations_per_epoch: 2, msl_epochs: 2, first_order_epochs: 1}
  - {name: reptile, meta_batch_size: 2, inner_steps: 2, eval_inner_steps: 2}
  - {name: protomaml, meta_batch_size: 2, eval_inner_steps: 1}
train: {iterations: 6, validate_every: 3, val_episodes: 2, checkpoint_every: 3}
eval: {episodes: 4, query: 2}
"""


def test_every_gradient_learner_trains_and_resumes_exactly_on_omniglot(
    tmp_path, data_root, cache_dir
):
    suite = tmp_path / "gradient.yaml"
    suite.write_text(SUITE)
    common = ["--data-root", str(data_root), "--no-progress", "--threads", "1"]
    plain = tmp_path / "plain"
    first = run_fewbench("run", str(suite), "--out", str(plain), *common, cache_dir=cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    baseline = results(plain)
    assert len(baseline) == 6 and all(len(v) == 4 for v in baseline.values())

    # Each cell is killed once, at its second checkpoint write (iteration 6), after its first
    # (iteration 3) is on disk, and resumes from it, with its learnt step sizes, per-step batch
    # norm and schedules, in the next process. Counts are per process: in a later process the
    # resumed cell writes one checkpoint before the next cell writes its two.
    killed = tmp_path / "killed"
    kills = 0
    for _ in range(30):
        attempt = run_fewbench(
            "run", str(suite), "--out", str(killed), *common, cache_dir=cache_dir,
            crash=f"checkpoint-write:{2 if kills == 0 else 3}",
        )  # fmt: skip
        if attempt.returncode == 0:
            break
        assert attempt.returncode == -signal.SIGKILL, attempt.stderr[-3000:]
        kills += 1
    assert attempt.returncode == 0 and kills == 6
    assert results(killed) == baseline


# -- batch norm policies ---------------------------------------------------------------------
def test_running_statistics_give_an_inductive_test_mode():
    """conv4 ``batch_norm: running``: test episodes are adapted and predicted with the running
    averages (eval mode), so a query example's prediction does not depend on the others, and
    testing leaves the statistics as they were."""
    from fewbench_plugins.backbones.standard import Conv4
    from fewbench_plugins.learners.maml import MAML

    torch.manual_seed(0)
    learner = MAML(**{**ParamSet.of(MAML).defaults(), "engine": "loop", "threads": 1})
    learner.setup(
        LearnerContext(
            backbone=Conv4(hidden=4, pool="stride", batch_norm="running"),
            input_shape=(1, 8, 8),
            ways=WAYS,
            shots=1,
            query=2,
            num_train_classes=10,
            device=torch.device("cpu"),
        )
    )
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS)

    def batch(query: int) -> EpisodeBatch:
        return EpisodeBatch(
            torch.randn(2, WAYS, 1, 8, 8, generator=g),
            labels.expand(2, -1),
            torch.randn(2, WAYS * query, 1, 8, 8, generator=g),
            labels.repeat_interleave(query).expand(2, -1),
            WAYS,
        )

    learner.train_step(batch(2), 1)
    norm = learner.model[0][1]
    assert norm.running_mean is not None and norm.running_mean.abs().sum() > 0
    saved = norm.running_mean.clone()
    episodes_ = batch(2)
    together = learner.predict(episodes_)
    alone = learner.predict(
        EpisodeBatch(
            episodes_.support_x,
            episodes_.support_y,
            episodes_.query_x[:, :1],
            episodes_.query_y[:, :1],
            WAYS,
        )  # fmt: skip
    )
    torch.testing.assert_close(alone[:, 0], together[:, 0])
    assert torch.equal(norm.running_mean, saved) and learner.model.training


def test_a_parameter_added_later_keeps_old_cell_ids(registry, data_root):
    """conv4's ``batch_norm`` came after cells were stored: at its default it stays out of the
    cell's configuration (so ids are unchanged); set, it is in, and the id changes."""
    from fewbench.data.check import expand_and_check as expand
    from fewbench.suite.loading import parse_yaml
    from fewbench_plugins.backbones.standard import Conv4

    def cell(backbone: str):
        text = (
            "name: t\ndatasets: [{name: omniglot}]\ntasks: {ways: 5, shots: 1, query: 1}\n"
            f"backbones: [{backbone}]\nlearners: [{{name: maml}}]\n"
        )
        (only,) = expand(parse_yaml(text, "t.yaml"), registry, data_root, require_data=False).cells
        return only

    default = cell("{name: conv4}")
    explicit = cell("{name: conv4, batch_norm: batch}")
    running = cell("{name: conv4, batch_norm: running}")
    assert "batch_norm" not in default.backbone.config() and default.id == explicit.id
    assert running.backbone.params["batch_norm"] == "running" and running.id != default.id
    assert Conv4().config["batch_norm"] == "batch"  # the plugin still sees its default


def test_the_readmes_anil_plugin_equals_the_built_in_anil():
    """The README's 'Writing a plugin' ANIL, run as written: same meta-gradient and predictions
    as the built-in anil (so the example cannot rot)."""
    import types

    readme = (REPO / "README.md").read_text()
    code = readme.split("# my_anil.py\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 40
    module = types.ModuleType("my_anil")
    exec(compile(code, "README.md", "exec"), module.__dict__)  # noqa: S102
    mine = make(module.ANIL)
    builtin = make(ANIL, engine="auto")
    for iteration in (1, 2):
        batch = episodes(seed=iteration)
        assert mine.train_step(batch, iteration) == builtin.train_step(batch, iteration)
    torch.testing.assert_close(mine.predict(episodes()), builtin.predict(episodes()))
