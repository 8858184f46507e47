"""The GPU fast path's logic, checked on a CPU: episodes drawn on the host and gathered on
the device, the training loop that reads losses back only every few iterations, and the
CUDA-graph runner's self-check with a stand-in for the capture (the real capture needs a
GPU: benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from fewbench.errors import FewbenchError
from fewbench.methods.cuda_graphs import GraphStep, disagreement
from fewbench.plugin.dataset import ClassPool, seeded_generator
from fewbench.plugin.learner import LearnerContext
from fewbench.running.training import TrainingFailed, train
from fewbench.suite.cell import Cell
from fewbench_plugins.backbones.standard import Conv4
from fewbench_plugins.learners.maml import MAML

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


def toy_pool(seed: int = 0, classes: int = 12) -> ClassPool:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (classes, 6, 1, 8, 8), dtype=torch.uint8, generator=generator)
    return ClassPool(images)


def cell(iterations: int = 12, log_every: int = 4) -> Cell:
    config = {
        "dataset": {"name": "toy"}, "backbone": {"name": "conv4"}, "learner": {"name": "maml"},
        "seed": 3, "tasks": {"ways": 3, "shots": 1, "query": 2},
        "train": {"iterations": iterations, "validate_every": 6, "val_episodes": 4,
                  "log_every": log_every},
        "eval": {"query": 2},
    }  # fmt: skip
    return Cell.from_config(config, "c")


def maml(**params) -> MAML:
    torch.manual_seed(0)
    learner = MAML(**{"meta_batch_size": 4, "inner_lr": 0.3, **params})
    learner.setup(LearnerContext(Conv4(hidden=4, pool="stride"), (1, 8, 8), 3, 1, 2, 12, CPU))
    return learner


def run(learner: MAML, **options):
    sources = {"train": toy_pool(0), "val": toy_pool(1)}
    options = {"progress": False, **options}
    outcome = train(learner, sources, cell(), identity=("toy",), device=CPU,
                    checkpoint_dir=None, **options)  # fmt: skip
    return outcome, [p.detach().clone() for p in learner.model.parameters()]


def offer_graph(learner: MAML, required: bool = False) -> MAML:
    """MAML offers its step for capture only on CUDA; on a CPU the tests offer it by hand."""
    parameters = list(learner.model.parameters())
    learner.graph_step = lambda: GraphStep(lambda b: learner.train_step(b, 0), required, parameters)
    return learner


def faithful(work):
    return work  # a "graph" that replays by running the step again


def perturbing(learner: MAML):
    """A "graph" whose replay lands 0.01 away from the eager step on one parameter."""

    def capture(work):
        def replay():
            loss = work()
            with torch.no_grad():
                next(iter(learner.model.parameters())).add_(1e-2)
            return loss

        return replay

    return capture


def failing(work):
    raise RuntimeError("operation not permitted when stream is capturing")


# -- drawing on the host, gathering on the device ---------------------------------------------
def test_draw_then_gather_is_sample_episodes_and_uses_the_generator_alike():
    images = torch.randint(0, 256, (9, 7, 3, 4, 4), dtype=torch.uint8)
    counts = torch.tensor([7, 5, 6, 7, 4, 7, 7, 6, 5])
    pool = ClassPool(images, mean=torch.tensor([0.5, 0.4, 0.3]), std=torch.tensor([0.2, 0.3, 0.25]),
                     counts=counts)  # fmt: skip
    a, b = seeded_generator("t", 1), seeded_generator("t", 1)
    sampled = pool.sample_episodes(5, 4, 2, 2, a)
    gathered = pool.gather(pool.draw(5, 4, 2, 2, b), shots=2)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(sampled, name), getattr(gathered, name)), name
    assert torch.equal(a.get_state(), b.get_state())  # the next iteration draws alike too
    assert gathered.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# -- the loop that reads losses back only now and then ---------------------------------------
def test_reading_losses_every_log_every_gives_the_same_curve_and_parameters():
    every, every_param = run(maml(), read_every=1)
    deferred, deferred_param = run(maml(), read_every=4)
    assert deferred.curve == every.curve and len(every.curve) >= 3
    assert all(torch.equal(a, b) for a, b in zip(every_param, deferred_param, strict=True))


def test_a_diverged_loss_read_late_names_its_own_iteration():
    learner = maml()
    steps = iter(range(1, 100))
    real = learner.train_step

    def step(batch, iteration):
        loss = real(batch, iteration)
        return loss * float("nan") if next(steps) == 6 else loss

    learner.train_step = step
    with pytest.raises(TrainingFailed, match="loss became nan at iteration 6") as failed:
        run(learner, read_every=4)
    assert failed.value.iteration == 6 and failed.value.curve[-1] == (6, None, None)


def test_maml_returns_its_loss_on_the_device_without_reading_it():
    learner = maml()
    batch = toy_pool().sample_episodes(4, 3, 1, 2, seeded_generator("x"))
    loss = learner.train_step(batch, 1)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad


# -- the graph runner's self-check ------------------------------------------------------------
def test_a_faithful_graph_passes_the_self_check_and_changes_nothing():
    plain, plain_param = run(maml())
    graphed, graphed_param = run(offer_graph(maml()), capture=faithful)
    assert plain.graph is None and graphed.graph == "graph: on (self-check passed)"
    assert graphed.curve == plain.curve
    assert all(torch.equal(a, b) for a, b in zip(plain_param, graphed_param, strict=True))


@pytest.mark.parametrize("disagrees", [True, False], ids=["disagrees", "cannot-capture"])
def test_the_self_check_falls_back_to_eager_steps_from_the_eager_result(disagrees):
    plain, plain_param = run(maml())
    learner = offer_graph(maml())
    fallen, fallen_param = run(learner, capture=perturbing(learner) if disagrees else failing)
    assert fallen.graph.startswith("graph: off (self-check: ")
    reason = "differs by" if disagrees else "capture failed: RuntimeError"
    assert reason in fallen.graph
    # Restored to the eager step's result, then eager: exactly the plain run.
    assert fallen.curve == plain.curve
    assert all(torch.equal(a, b) for a, b in zip(plain_param, fallen_param, strict=True))


def test_graph_on_refuses_to_fall_back():
    learner = offer_graph(maml(), required=True)
    with pytest.raises(
        TrainingFailed, match=r"graph: on, but the self-check: model/\S+ differs by 0.01"
    ) as failed:
        run(learner, capture=perturbing(learner))
    assert isinstance(failed.value.cause, FewbenchError)


def test_maml_offers_a_graph_only_where_one_can_run():
    assert maml().graph_step() is None  # a CPU
    learner = maml()
    object.__setattr__(learner.ctx, "device", torch.device("cuda"))  # asked, not run
    assert learner.graph_step() is not None
    learner.config["graph"] = "off"
    assert learner.graph_step() is None
    learner.config.update(graph="on", engine="higher")
    assert learner.graph_step() is None


def test_the_comparison_allows_noise_within_a_step_and_names_what_differs():
    names, before = ["w", "b"], [torch.zeros(3), torch.zeros(2)]
    eager = [torch.full((3,), 1e-3), torch.tensor([1e-3, -1e-3])]
    # b's eager step was 1e-3; noise that flips its sign is allowed (a zero-in-theory gradient).
    noisy = [eager[0].clone(), torch.tensor([-1e-3, 1e-3])]
    assert disagreement(names, before, eager, noisy) is None
    far = [eager[0].clone(), torch.tensor([1e-3, 5e-3])]
    assert disagreement(names, before, eager, far) == (
        "b differs by 0.006 (the eager step changed it by 0.001)"
    )
    assert disagreement(names, before, eager, before) == "w was not updated by the replay"
    assert disagreement(["w"], [torch.ones(1)], [torch.ones(1)], [torch.ones(2)]) == (
        "w has shape (2,), not (1,)"
    )
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([1e-9])]  # the second: noise around zero
    assert disagreement([], [], [], [], grads, [grads[0], torch.tensor([-3e-9])]) is None
    assert disagreement([], [], [], [], grads, [torch.tensor([1.0, -1.0]), grads[1]]) == (
        "gradient 0 (2,) differs by 1 (largest 2)"
    )
