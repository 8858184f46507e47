"""One ``maml_trpo`` iteration on 2-D navigation with each Hessian-vector product, side by side.

The learner's ``hvp`` parameter picks how TRPO multiplies by the Hessian of the KL through
the inner step (fewbench.methods.policy_gradient): ``finite_difference`` (the paper's: two
second-order gradients in float64 per product), ``exact`` (a double backward through the
inner step: a third derivative) and ``fisher`` (``sum_i J_i F_i J_i``, exact at the
sampling parameters: second derivatives only). Every method runs ``MAMLTRPO.train_step``
from the same policy on the same meta-batch (so the same trajectories), in this process,
round robin, ``--repeat`` times; the table gives the median seconds of the whole step, of its
TRPO part (sampling, advantages and the inner step are the rest) and of one Hessian-vector
product (TRPO takes 11: 10 conjugate-gradient iterations and the step's scale), the speed-ups
over the first method (its median over each one's), and how far each update lands from the
``exact`` one (max abs difference of the parameters, relative to the exact update's).

The policy is the learner's initialisation with ``--bias-noise`` (0.01) added to its biases.
At the initialisation itself the biases are zero and every episode starts at the origin, so
the first layer's pre-activations at the first step are exactly 0, on the ReLU's kink: the
inner gradient, hence theta'(theta) and the KL's gradient, jump there, the finite difference
across the jump is meaningless (it grows as 1/eps) and the KL has no Hessian. ``exact`` and
``fisher`` take ReLU's derivative at 0 as 0 there (and agree); the timings do not change.
``--at-initialisation`` measures that first iteration as it is.

    python benchmarks/maml_trpo_step.py          # the paper's size: 20 x 20 x 100, 2 x 100
    python benchmarks/maml_trpo_step.py --tasks 5 --trajectories 5 --horizon 20 --repeat 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fewbench.methods.policy_gradient as pg
import fewbench_plugins.learners.rl as rl
from fewbench.plugin.learner import LearnerContext
from fewbench.running.cost import cpu_model
from fewbench_plugins.backbones.standard import MLP
from fewbench_plugins.environments.navigation2d import Navigation2D

METHODS = ("finite_difference", "exact", "fisher")
PRODUCT_SECONDS: list[float] = []  # every Hessian-vector product's, as it is called


def timed_products(factory):
    """``factory`` (a maker of Hessian-vector products) whose products record their time."""

    def make(*args, **kwargs):
        product = factory(*args, **kwargs)

        def timed(x):
            t0 = time.perf_counter()
            out = product(x)
            PRODUCT_SECONDS.append(time.perf_counter() - t0)
            return out

        return timed

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20, help="meta-batch size (2-D: 20)")
    parser.add_argument("--trajectories", type=int, default=20, help="per task and phase")
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--hidden", default="100,100", help="hidden sizes of the policy")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bias-noise", type=float, default=0.01, help="std of the noise added to the biases"
    )
    parser.add_argument(
        "--at-initialisation", action="store_true", help="keep the zero biases (see above)"
    )
    args = parser.parse_args()
    methods = args.methods.split(",")
    hidden = [int(h) for h in args.hidden.split(",")]
    # trpo_step and the learner look these up when called: every product is timed
    pg.hessian_vector_product = timed_products(pg.hessian_vector_product)
    rl.fisher_vector_product = timed_products(rl.fisher_vector_product)

    env = Navigation2D(horizon=args.horizon)
    source = env.load(None, None)["train"]
    batch = source.sample_episodes(args.tasks, 1, 1, 1, torch.Generator().manual_seed(args.seed))
    warm_up = source.sample_episodes(2, 1, 1, 1, torch.Generator().manual_seed(args.seed + 1))
    ctx = LearnerContext(MLP(hidden=hidden), (2,), 1, 1, 1, 0, torch.device("cpu"), environment=env)
    learners = {}
    for method in methods:
        learner = rl.MAMLTRPO(
            meta_batch_size=args.tasks,
            trajectories=args.trajectories,
            hvp=method,
            first_order=args.first_order,
        )
        torch.manual_seed(args.seed)
        learner.setup(ctx)
        learners[method] = learner
    if not args.at_initialisation:
        noise = torch.Generator().manual_seed(args.seed + 2)
        with torch.no_grad():
            for name, p in learners[methods[0]].policy.named_parameters():
                if name.endswith("bias"):
                    p.add_(args.bias_noise * torch.randn(p.shape, generator=noise))
    start = {k: v.detach().clone() for k, v in learners[methods[0]].policy.state_dict().items()}

    trpo_seconds: dict[str, list[float]] = {m: [] for m in methods}
    for method, learner in learners.items():
        trpo = learner.trpo

        def timed_trpo(*a, trpo=trpo, method=method, **k):
            t0 = time.perf_counter()
            out = trpo(*a, **k)
            trpo_seconds[method].append(time.perf_counter() - t0)
            return out

        learner.trpo = timed_trpo

    for method in methods:  # first calls (allocations, dispatch caches) are not timed
        learners[method].policy.load_state_dict(start)
        learners[method].train_step(warm_up, 1)
        trpo_seconds[method].clear()
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    products: dict[str, list[float]] = {m: [] for m in methods}
    updated = {}
    for _ in range(args.repeat):
        for method in methods:  # round robin: the machine's load falls on every method
            learner = learners[method]
            learner.policy.load_state_dict(start)
            PRODUCT_SECONDS.clear()
            t0 = time.perf_counter()
            learner.train_step(batch, 1)
            seconds[method].append(time.perf_counter() - t0)
            products[method].extend(PRODUCT_SECONDS)
            updated[method] = torch.cat(
                [p.detach().reshape(-1) for p in learner.policy.parameters()]
            )
            if not learner.last_step.accepted:
                print(f"note: {method}'s TRPO step was rejected by its line search")

    theta = torch.cat([p.reshape(-1) for p in start.values()])
    reference = updated.get("exact")
    print(
        f"maml_trpo train_step, 2-D navigation: {args.tasks} tasks x {args.trajectories} "
        f"trajectories x horizon {args.horizon}, policy {hidden}, "
        f"{'first' if args.first_order else 'second'} order; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_model()}; "
        f"medians of {args.repeat} rounds"
    )
    print()
    first = methods[0]
    print(
        "| hvp | step s | TRPO s | product ms | products | step speed-up | TRPO speed-up "
        "| product speed-up | update vs exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    median = statistics.median
    base = (median(seconds[first]), median(trpo_seconds[first]), median(products[first]))
    for method in methods:
        step, trpo, product = (
            median(seconds[method]),
            median(trpo_seconds[method]),
            median(products[method]),
        )
        count = len(products[method]) // args.repeat
        if reference is None:
            diff = "-"
        else:
            size = (reference - theta).abs().max().item()
            diff = f"{(updated[method] - reference).abs().max().item() / max(size, 1e-30):.1e}"
        print(
            f"| {method} | {step:.2f} | {trpo:.2f} | {1e3 * product:.0f} | {count} "
            f"| {base[0] / step:.2f} | {base[1] / trpo:.2f} | {base[2] / product:.2f} | {diff} |"
        )


if __name__ == "__main__":
    main()
