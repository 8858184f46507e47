"""Several seeds of one MAML setting trained at once as one vmapped ensemble, against
one seed at a time: does it pay? (issue 14)

A paper's number is a mean over seeds. fewbench trains each seed as its own cell.
With ``torch.func.stack_module_state`` the seeds' weights become one stack, and one
call to ``vmap`` over seeds (of the batched engine's ``vmap`` over tasks) takes
every seed's meta-gradient at once; Adam is element-wise, so one Adam over the
stacked tensors is each seed's own Adam. Each seed draws its own episodes.

Rows, per configuration (the shapes of ``throughput.py``'s 1a and 2):

* ``1 seed``: MAML's batched meta-iteration, eager and as one CUDA graph
  (``fewbench.methods.cuda_graphs``, after its self-check): S seeds cost S times this;
* ``S seeds, ensemble``: one meta-iteration of all S seeds, eager and, on CUDA,
  captured as one CUDA graph the same way (static index buffers, gather, meta-gradient,
  capturable Adam).

The column ``x one seed at a time`` is seed-iterations per second relative to the
fastest one-seed row of the same configuration. ``--check`` first compares the
ensemble's gradients, seed by seed, with MAML's own meta-gradient at the same weights
and episodes (they must agree to float tolerance), so the timed code is the right one.

    python benchmarks/seed_ensemble.py --device cuda --seeds 4,8 --configs 1a,2 --check
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from throughput import CONFIGS, machine_description  # noqa: E402

from fewbench.methods.adaptation import InnerLoop, vmap_safe_batch_norm  # noqa: E402
from fewbench.methods.cuda_graphs import WARMUP_ITERATIONS, GraphedTraining, cuda_capture  # noqa: E402
from fewbench.plugin.dataset import ClassPool, EpisodeBatch, EpisodeIndices, seeded_generator  # noqa: E402
from fewbench.plugin.learner import LearnerContext  # noqa: E402
from fewbench.plugin.params import ParamSet  # noqa: E402
from fewbench.plugin.task_types import CLASSIFICATION  # noqa: E402
from fewbench_plugins.backbones.standard import Conv4  # noqa: E402
from fewbench_plugins.learners.maml import MAML  # noqa: E402


@dataclass
class Row:
    config: str
    name: str
    seeds: int
    ms_per_iteration: float = 0.0
    error: str = ""

    @property
    def seed_iterations_per_second(self) -> float:
        return 1000 * self.seeds / self.ms_per_iteration if self.ms_per_iteration else 0.0


def make_learner(config: str, device: torch.device, seed: int) -> MAML:
    _, ways, shots, query, tasks, steps, shape, hidden, pool, classes, _ = CONFIGS[config]
    torch.manual_seed(seed)
    learner = MAML(
        **{
            **ParamSet.of(MAML).defaults(),
            "engine": "batched",
            "meta_batch_size": tasks,
            "inner_steps": steps,
        }
    )
    learner.setup(
        LearnerContext(Conv4(hidden=hidden, pool=pool), shape, ways, shots, query, classes, device)
    )
    learner.iterations(1000)
    return learner


def source_for(config: str, device: torch.device) -> ClassPool:
    _, _, _, _, _, _, shape, _, _, classes, per_class = CONFIGS[config]
    torch.manual_seed(0)
    images = torch.randint(0, 256, (classes, per_class, *shape), dtype=torch.uint8)
    return ClassPool(images).to(device)


class Ensemble:
    """S MAML models of one setting, their weights stacked, trained by one vmapped step."""

    def __init__(self, learners: list[MAML], source: ClassPool, config: str):
        _, self.ways, self.shots, self.query, self.tasks, self.steps, *_ = CONFIGS[config]
        self.source = source
        models = [learner.model for learner in learners]
        params, buffers = stack_module_state(models)
        self.params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        self.buffers = buffers
        self.skeleton = models[0]
        first = learners[0]
        self.loop = InnerLoop(
            self.skeleton,
            {},
            CLASSIFICATION.loss,
            tuple(self.params),
            float(first.config["inner_lr"]),
        )
        capturable = source.images.device.type == "cuda"
        self.optimizer = torch.optim.Adam(
            self.params.values(), lr=first.config["meta_lr"], capturable=capturable
        )
        loop, steps = self.loop, self.steps

        def seed_objective(theta, buffers, sx, sy, qx, qy):
            def task(sx, sy, qx, qy):
                fast = loop.run(theta, sx, sy, steps, first_order=False, vmapped=True)[-1]
                logits = functional_call(loop.model, (fast, buffers), (qx,))
                return loop.loss(logits, qy)

            return vmap(task, randomness="different")(sx, sy, qx, qy).mean()

        self.per_seed = vmap(grad_and_value(seed_objective), randomness="different")

    def draw(self, iteration: int) -> EpisodeIndices:
        """Each seed's own episodes, drawn on the CPU (seed s's generator, this iteration)."""
        drawn = [
            self.source.draw(
                self.tasks, self.ways, self.shots, self.query, seeded_generator(s, iteration)
            )
            for s in range(self.seed_count)
        ]
        return EpisodeIndices(
            torch.cat([d.classes for d in drawn]), torch.cat([d.examples for d in drawn])
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def seed_count(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def gradients(self, indices: EpisodeIndices) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        batch = as_dtype(self.source.gather(indices, self.shots), self.dtype)
        s = self.seed_count

        def per_seed(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(s, self.tasks, *x.shape[1:])

        with vmap_safe_batch_norm(self.skeleton):
            return self.per_seed(
                self.params,
                self.buffers,
                per_seed(batch.support_x),
                per_seed(batch.support_y),
                per_seed(batch.query_x),
                per_seed(batch.query_y),
            )

    def step(self, indices: EpisodeIndices) -> torch.Tensor:
        grads, losses = self.gradients(indices)
        for name, p in self.params.items():
            p.grad = grads[name].detach()
        self.optimizer.step()
        return losses.detach()


def as_dtype(batch: EpisodeBatch, dtype: torch.dtype) -> EpisodeBatch:
    batch.support_x, batch.query_x = batch.support_x.to(dtype), batch.query_x.to(dtype)
    return batch


def check(config: str, device: torch.device, seeds: int) -> str:
    """The ensemble's per-seed gradient against MAML's own meta-gradient, same weights and
    episodes, in float64; returns the largest difference relative to the largest gradient.

    In float64 because second-order MAML through batch norm over 5 support images is badly
    conditioned: two correct float32 computations that sum in another order differ by
    up to 0.5% of the largest gradient on 1a, while float64 agrees to about 1e-16."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _check(config, device, seeds)
    finally:
        torch.set_default_dtype(saved)


def _check(config: str, device: torch.device, seeds: int) -> str:
    learners = [make_learner(config, device, seed) for seed in range(seeds)]
    source = source_for(config, device)
    ensemble = Ensemble(learners, source, config)
    indices = ensemble.draw(0)
    grads, losses = ensemble.gradients(indices.to(device))
    worst = 0.0
    for s, learner in enumerate(learners):
        mine = slice(s * ensemble.tasks, (s + 1) * ensemble.tasks)
        batch = source.gather(
            EpisodeIndices(indices.classes[mine], indices.examples[mine]).to(device),
            ensemble.shots,
        )
        batch = as_dtype(batch, torch.float64)
        learner.model.zero_grad()
        loss = learner.adapter.meta_gradient(batch, steps=ensemble.steps)
        loss, ensemble_loss = float(loss), float(losses[s].detach())
        worst = max(worst, abs(loss - ensemble_loss) / max(abs(loss), 1e-12))
        # On the scale of the seed's largest gradient: the biases ahead of batch norm have
        # gradients that are zero in exact arithmetic, so a per-tensor ratio would be noise.
        named = dict(learner.model.named_parameters())
        scale = max(float(p.grad.abs().max()) for p in named.values())
        for name, p in named.items():
            worst = max(worst, float((grads[name][s] - p.grad).abs().max()) / scale)
    return f"{worst:.1e}"


def timed(step, warm_up: int, seconds: float, device: torch.device) -> float:
    """Milliseconds per call of ``step(iteration)`` after ``warm_up`` calls."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warm_up):
        step(i)
    sync()
    start, count = time.perf_counter(), 0
    while count < 3 or time.perf_counter() - start < seconds:
        step(warm_up + count)
        count += 1
        if count % 50 == 0:
            sync()
    sync()
    return 1000 * (time.perf_counter() - start) / count


def one_seed(config: str, device: torch.device, seconds: float, graph: bool) -> Row:
    learner = make_learner(config, device, 0)
    source = source_for(config, device)
    _, ways, shots, query, tasks, *_ = CONFIGS[config]
    row = Row(config, "1 seed" + (", graph" if graph else ", eager"), 1)
    if graph:
        offered = learner.graph_step()
        if offered is None:
            row.error = "MAML offers no graph step here"
            return row
        graphed = GraphedTraining(learner, offered, source, shots, device)

        def step(i: int) -> None:
            graphed.step(source.draw(tasks, ways, shots, query, seeded_generator(0, i)))

        row.ms_per_iteration = timed(step, 2 + WARMUP_ITERATIONS + 1, seconds, device)
        row.name += f" ({graphed.status})"
        return row

    def eager(i: int) -> None:
        batch = source.gather(
            source.draw(tasks, ways, shots, query, seeded_generator(0, i)).to(device), shots
        )
        learner.train_step(batch, i)

    row.ms_per_iteration = timed(eager, 2, seconds, device)
    return row


def ensemble(config: str, device: torch.device, seconds: float, seeds: int, graph: bool) -> Row:
    row = Row(config, f"{seeds} seeds, ensemble" + (", graph" if graph else ", eager"), seeds)
    learners = [make_learner(config, device, seed) for seed in range(seeds)]
    model = Ensemble(learners, source_for(config, device), config)
    if not graph:
        row.ms_per_iteration = timed(
            lambda i: model.step(model.draw(i).to(device)), 2, seconds, device
        )
        return row
    first = model.draw(0)
    static = first.to(device)
    # Two pinned buffers used in turn, each overwritten only after its last copy ran (as
    # fewbench.methods.cuda_graphs does): the host draws the next episodes while the GPU works.
    pinned = [
        EpisodeIndices(first.classes.clone().pin_memory(), first.examples.clone().pin_memory())
        for _ in range(2)
    ]
    copied: list[torch.cuda.Event | None] = [None, None]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_ITERATIONS):
            model.step(static)
    torch.cuda.current_stream().wait_stream(stream)
    replay = cuda_capture(lambda: model.step(static))

    def step(i: int) -> None:
        drawn, slot = model.draw(i), i % 2
        if copied[slot] is not None:
            copied[slot].synchronize()
        pinned[slot].classes.copy_(drawn.classes)
        pinned[slot].examples.copy_(drawn.examples)
        static.classes.copy_(pinned[slot].classes, non_blocking=True)
        static.examples.copy_(pinned[slot].examples, non_blocking=True)
        copied[slot] = torch.cuda.Event()
        copied[slot].record()
        replay()

    row.ms_per_iteration = timed(step, 2, seconds, device)
    return row


def table(rows: list[Row], device: str) -> str:
    lines = [
        f"device: {device} ({machine_description(device)})",
        "",
        "| configuration | training | ms/iteration | seed-iterations/s | x one seed at a time |",
        "|---|---|---:|---:|---:|",
    ]
    for config in dict.fromkeys(r.config for r in rows):
        group = [r for r in rows if r.config == config]
        single = [r.seed_iterations_per_second for r in group if r.seeds == 1 and not r.error]
        best = max(single, default=0.0)
        for r in group:
            if r.error:
                lines.append(
                    f"| {config}: {CONFIGS[config][0]} | {r.name} | failed: {r.error} | | |"
                )
                continue
            ratio = f"{r.seed_iterations_per_second / best:.2f}" if best else "n/a"
            lines.append(
                f"| {config}: {CONFIGS[config][0]} | {r.name} | {r.ms_per_iteration:.1f} | "
                f"{r.seed_iterations_per_second:.1f} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default="1a", help="comma-separated, of 1a, 1b, 2")
    parser.add_argument("--seeds", default="4", help="ensemble sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row")
    parser.add_argument("--check", action="store_true", help="check gradients first")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    graphs = [False, True] if device.type == "cuda" else [False]
    rows = []
    for config in args.configs.split(","):
        if args.check:
            print(
                f"check {config}: largest relative difference {check(config, device, 2)}",
                flush=True,
            )
        for graph in graphs:
            print(f"measuring {config} 1 seed graph={graph} ...", file=sys.stderr, flush=True)
            try:
                rows.append(one_seed(config, device, args.seconds, graph))
            except Exception as exc:  # a variant that does not run is a result too
                rows.append(Row(config, "1 seed", 1, error=f"{type(exc).__name__}: {exc}"[:120]))
        for seeds in (int(s) for s in args.seeds.split(",")):
            for graph in graphs:
                print(
                    f"measuring {config} {seeds} seeds graph={graph} ...",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    rows.append(ensemble(config, device, args.seconds, seeds, graph))
                except Exception as exc:
                    name = f"{seeds} seeds, ensemble" + (", graph" if graph else "")
                    rows.append(
                        Row(config, name, seeds, error=f"{type(exc).__name__}: {exc}"[:120])
                    )
    print(table(rows, args.device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
