"""Meta-training throughput of the MAML engines and the gradient family, side by side, as a table.

Each row is one configuration and one engine; each measurement runs in its own
process, so peak memory belongs to that engine alone. A timed iteration is what
fewbench's training loop does: seed a generator, draw a meta-batch of episodes
from a dataset held on the device, move it there, and take one meta-update
(second order unless said otherwise). Images are random, with the real shapes and
class counts; timing does not depend on pixel values.

    python benchmarks/throughput.py                 # CPU, and CUDA when present
    python benchmarks/throughput.py --device cpu --seconds 20 --configs 1a,1b
    python benchmarks/throughput.py --variants      # also bf16, channels-last, compile
    python benchmarks/throughput.py --device cuda --engines higher,auto+sync,auto,auto+graph
    python benchmarks/throughput.py --learners maml,anil,metasgd,mamlpp,reptile,protomaml

Ratios are tasks per second relative to the reference: the per-task loop through
``higher``, which is what higher's own MAML example does, on the network as MAML codebases
write it (``higher+stock`` where the network max-pools: conv, batch norm, ReLU, then max-pool;
fewbench's Conv-4 pools before its ReLU, the same numbers to the bit with the ReLU on a quarter
of the values, and the plain ``higher`` row shows what that alone gives the reference loop).
Engine variants, after a ``+``: ``stock`` as just said, ``heap`` (CPU: the measuring process
first calls ``fewbench.running.cpu_heap.keep_large_blocks_on_heap()``, as every process that trains
cells does: glibc's malloc keeps large blocks on its heap; without ``heap`` the process keeps
glibc's defaults, as a researcher's own script does), ``sync`` reads each iteration's loss back to the host (what the training loop did
before it kept losses on the device), ``graph`` replays each iteration as one captured
CUDA graph (fewbench.methods.cuda_graphs, after its self-check), ``tf32`` allows TF32 in matrix
products and convolutions, ``fp32`` forbids it in both (torch's default allows it in
convolutions only), ``bf16``, ``channels_last`` and ``compile`` as named. A row of another learner
of the gradient family (``--learners``) is that learner's meta-iteration with the
same network, tasks and inner steps, beside MAML's reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

CONFIGS = {
    # name: (description, ways, shots, query, meta_batch, inner_steps, shape, hidden, pool,
    #        classes, examples per class)
    "1a": ("Omniglot 5-way 1-shot, 1 query", 5, 1, 1, 32, 1, (1, 28, 28), 64, "stride", 4112, 20),
    "1b": ("Omniglot 5-way 1-shot, 15 query", 5, 1, 15, 32, 1, (1, 28, 28), 64, "stride", 4112, 20),
    "2": ("Omniglot 20-way 1-shot, 5 steps", 20, 1, 1, 16, 5, (1, 28, 28), 64, "stride", 4112, 20),
    "3": ("mini-ImageNet 5-way 1-shot", 5, 1, 15, 4, 5, (3, 84, 84), 32, "max", 64, 600),
}
# engine[:threads][/tasks per vmap call]; no thread count means fewbench's own choice (one
# per core on a CPU), no tasks per call means the whole meta-batch in one call.
# On a CPU: the reference as a researcher's script runs it and given fewbench's heap (higher+heap
# where the network has no stock form), and fewbench's engines; auto+heap is what fewbench run
# does (fewbench.running.cpu_heap).
ENGINES = (
    "higher+stock",
    "higher+stock+heap",
    "higher",
    "higher+heap",
    "loop:1",
    "batched:1",
    "batched",
    "auto",
    "auto+heap",
)
VARIANTS = ("batched/8", "auto+bf16", "auto+channels_last", "auto+compile")
KNOWN_VARIANTS = {
    "bf16", "channels_last", "compile", "sync", "graph", "tf32", "fp32", "stock", "heap",
}  # fmt: skip
# On a GPU: the reference, today's eager loop (a sync per iteration), without the sync,
# as a CUDA graph, and the graph with TF32 matrix products.
GPU_ENGINES = (
    "higher+stock",
    "higher",
    "batched+sync",
    "batched",
    "batched+graph",
    "batched+graph+tf32",
)
LEARNERS = {
    "maml": "fewbench_plugins.learners.maml:MAML",
    "fomaml": "fewbench_plugins.learners.maml:FirstOrderMAML",
    "anil": "fewbench_plugins.learners.head_body:ANIL",
    "boil": "fewbench_plugins.learners.head_body:BOIL",
    "metasgd": "fewbench_plugins.learners.metasgd:MetaSGD",
    "mamlpp": "fewbench_plugins.learners.mamlpp:MAMLPlusPlus",
    "reptile": "fewbench_plugins.learners.reptile:Reptile",
    "protomaml": "fewbench_plugins.learners.protomaml:ProtoMAML",
}


@dataclass
class Measurement:
    config: str
    engine: str
    device: str
    chosen: str = ""
    iterations: int = 0
    tasks_per_second: float = 0.0
    ms_per_iteration: float = 0.0
    peak_mb: float = 0.0
    error: str = ""
    machine: str = ""
    learner: str = "maml"
    phase: str = "train"


def stock_pooling(model) -> int:
    """Turn fewbench's max-pooling blocks (..., batch norm, max-pool, ReLU) back into the order
    MAML codebases use (..., batch norm, ReLU, max-pool) with torch's own ``nn.MaxPool2d``
    (fewbench's ``MaxPool2x2`` searches for the maxima in channels-last order), in place;
    the number of blocks changed. Neither layer holds parameters, so nothing else changes."""
    from torch import nn

    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            pool, relu = module[i], module[i + 1]
            if isinstance(pool, nn.MaxPool2d) and isinstance(relu, nn.ReLU):
                stock = nn.MaxPool2d(
                    pool.kernel_size,
                    pool.stride,
                    pool.padding,
                    pool.dilation,
                    ceil_mode=pool.ceil_mode,
                )
                module[i], module[i + 1] = relu, stock
                changed += 1
    return changed


def variants_of(engine: str) -> list[str]:
    """The variants after an engine's ``+`` signs: ``auto+heap+bf16`` -> ``["heap", "bf16"]``."""
    return engine.split("+")[1:]


def has_stock_form(config: str) -> bool:
    """Whether ``stock`` changes this configuration's network (only max-pooling ones)."""
    return CONFIGS[config][8] == "max"


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def learner_class(name: str) -> type:
    import importlib

    module, _, cls = LEARNERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def measure(
    config: str,
    engine: str,
    device_name: str,
    seconds: float,
    learner_name: str = "maml",
    phase: str = "train",
) -> Measurement:
    """One configuration, engine and learner, in this process.

    ``phase`` ``predict`` times what evaluation does instead of a meta-update: adapt to a
    batch of episodes (``eval_inner_steps``, first order, no meta-gradient) and return the
    query outputs, for the configuration's number of tasks per call."""
    import torch

    from fewbench.methods.cuda_graphs import WARMUP_ITERATIONS, GraphedTraining
    from fewbench.plugin.dataset import ClassPool, seeded_generator
    from fewbench.plugin.learner import LearnerContext
    from fewbench.plugin.params import ParamSet
    from fewbench.running import cpu_heap
    from fewbench_plugins.backbones.standard import Conv4
    from fewbench_plugins.learners import maml_engines

    _, ways, shots, query, tasks, steps, shape, hidden, pool, classes, per_class = CONFIGS[config]
    device = torch.device(device_name)
    spec, variants = engine.split("+")[0], variants_of(engine)
    spec, _, per_call = spec.partition("/")
    base, _, threads = spec.partition(":")
    if "bf16" in variants:
        threads = "1"  # autocast is thread-local: it must run in the thread that computes
    result = Measurement(
        config,
        engine,
        device_name,
        machine=machine_description(device_name),
        learner=learner_name,
        phase=phase,
    )
    if base not in maml_engines.ENGINES or not set(variants) <= KNOWN_VARIANTS:
        result.error = f"unknown engine {engine!r}"
        return result
    if "heap" in variants and not cpu_heap.is_on():
        result.error = "the heap variant is a setting of the whole process (see measure_isolated)"
        return result
    if device.type == "cuda":
        tf32 = "tf32" in variants
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32 or "fp32" not in variants  # torch's default
    cls = learner_class(learner_name)
    if base not in cls.params["engine"].choices:
        result.error = f"{learner_name} has no engine {base!r}"
        return result
    torch.manual_seed(0)
    images = torch.randint(0, 256, (classes, per_class, *shape), dtype=torch.uint8)
    source = ClassPool(images).to(device)
    learner = cls(
        **{
            **ParamSet.of(cls).defaults(),
            "engine": base,
            "threads": int(threads or 0),
            "tasks_per_call": int(per_call or 0),
            "meta_batch_size": tasks,
            "inner_steps": steps,
        }
    )
    backbone = Conv4(hidden=hidden, pool=pool)
    learner.setup(LearnerContext(backbone, shape, ways, shots, query, classes, device))
    learner.iterations(1000)  # the learners with schedules (mamlpp, reptile) need a length
    if "stock" in variants:
        stock_pooling(learner.model)
    if "channels_last" in variants:
        learner.model.to(memory_format=torch.channels_last)
    if "compile" in variants:
        learner.model.compile()
    graphed = None
    if "graph" in variants and phase == "predict":
        result.error = "the graph variant is a training step; evaluation has none"
        return result
    if "graph" in variants:
        offered = learner.graph_step()
        if offered is None:
            result.error = f"{learner_name} offers no graph step on {device_name}"
            return result
        graphed = GraphedTraining(learner, offered, source, shots, device)

    def step(iteration: int) -> None:
        generator = seeded_generator("bench", iteration)
        if graphed is not None:
            graphed.step(source.draw(tasks, ways, shots, query, generator))
            return
        batch = source.sample_episodes(tasks, ways, shots, query, generator).to(device)
        if phase == "predict":
            learner.predict(batch)
            return
        if "channels_last" in variants:  # each task's [N, C, H, W] slice in channels-last order
            batch.support_x = (
                batch.support_x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
            )
            batch.query_x = batch.query_x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        if "bf16" in variants:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = learner.train_step(batch, iteration)
        else:
            loss = learner.train_step(batch, iteration)
        if "sync" in variants:
            float(loss)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm_up = 2 + (WARMUP_ITERATIONS + 1 if graphed is not None else 0)  # + graph self-check
    try:
        for warm in range(warm_up):
            step(warm)
        sync()
        baseline = current_rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        count = 0
        while count < 3 or time.perf_counter() - start < seconds:
            step(count + warm_up)
            count += 1
            if count % 50 == 0:  # bounds the queue; the loop itself never waits
                sync()
        sync()
        elapsed = time.perf_counter() - start
    except Exception as exc:  # a variant that does not run is a result too
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return result
    engines = learner.adapter.engines
    choice = engines.get("train") or engines.get("predict") or engines["adapt"]
    result.chosen = choice.engine + (f" x {choice.threads} threads" if choice.threads > 1 else "")
    if graphed is not None:
        result.chosen += f", {graphed.status}"
    result.iterations = count
    result.tasks_per_second = count * tasks / elapsed
    result.ms_per_iteration = 1000 * elapsed / count
    if device.type == "cuda":
        result.peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # peak resident memory above what the process held before the timed loop
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.peak_mb = max(0.0, peak - baseline)
    return result


def measure_isolated(
    config: str,
    engine: str,
    device: str,
    seconds: float,
    learner: str = "maml",
    phase: str = "train",
) -> Measurement:
    """On CUDA, in this process (peak memory is reset per measurement); on a CPU, in a
    fresh process, since a process's peak resident memory cannot be reset."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        return measure(config, engine, device, seconds, learner, phase)
    command = [
        sys.executable,
        __file__,
        "--one",
        config,
        engine,
        device,
        str(seconds),
        learner,
        phase,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600 + 20 * seconds)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Measurement(config, engine, device, error=last[:160], learner=learner, phase=phase)
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def machine_description(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    from fewbench.running.cost import cpu_model

    cpu = cpu_model()
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"


def table(rows: list[Measurement], device: str) -> str:
    memory = "CUDA max allocated MB" if device.startswith("cuda") else "peak RSS MB above start"
    machine = next((r.machine for r in rows if r.machine), "") or machine_description(device)
    lines = [
        f"device: {device} ({machine})",
        "",
        f"| configuration | engine | tasks/s | ms/iteration | x reference | x batched+sync | {memory} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for config in dict.fromkeys(r.config for r in rows):
        group = [r for r in rows if r.config == config]
        reference = next(
            (
                r
                for name in ("higher+stock", "higher")
                for r in group
                if r.engine == name and r.learner == "maml" and not r.error
            ),
            None,
        )
        for r in group:
            base = r.engine.split("+")[0].split("/")[0].split(":")[0]
            # today's eager loop: the batched engine, reading every loss (evaluation: batched)
            eager = "batched+sync" if r.phase == "train" else "batched"
            today = next((x for x in group if x.engine == eager and x.learner == r.learner), None)
            name = f"{r.engine} -> {r.chosen}" if r.chosen and r.chosen != base else r.engine
            if r.learner != "maml":
                name = f"{r.learner}: {name}"
            if r.phase != "train":
                name = f"{r.phase}: {name}"
            if r.error:
                lines.append(
                    f"| {config}: {CONFIGS[config][0]} | {name} | failed: {r.error} | | | | |"
                )
                continue
            ratio = f"{r.tasks_per_second / reference.tasks_per_second:.2f}" if reference else "n/a"
            versus_today = (
                f"{r.tasks_per_second / today.tasks_per_second:.2f}"
                if today and not today.error
                else "n/a"
            )
            lines.append(
                f"| {config}: {CONFIGS[config][0]} | {name} | {r.tasks_per_second:.1f} | "
                f"{r.ms_per_iteration:.1f} | {ratio} | {versus_today} | {r.peak_mb:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", action="append", help="cpu, cuda (default: cpu, and cuda if any)"
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS)
    )
    parser.add_argument(
        "--engines",
        help=f"comma-separated (default: {','.join(ENGINES)} on a CPU, "
        f"{','.join(GPU_ENGINES)} on CUDA)",
    )
    parser.add_argument(
        "--variants", action="store_true", help="also measure " + ", ".join(VARIANTS)
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--from-json", help="print the tables of an earlier --json file and exit")
    parser.add_argument(
        "--learners",
        default="maml",
        help="comma-separated, of " + ", ".join(LEARNERS) + " (maml's higher is the reference)",
    )
    parser.add_argument(
        "--phase",
        choices=("train", "predict"),
        default="train",
        help="time meta-updates (train) or evaluation's adaptation to episodes (predict)",
    )
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            rows = [Measurement(**r) for r in json.load(f)]
        for device in dict.fromkeys(r.device for r in rows):
            print(table([r for r in rows if r.device == device], device), "\n")
        return 0
    if args.one:
        config, engine, device, seconds, learner, phase = args.one
        if "heap" in variants_of(engine) and device == "cpu":  # first, before any thread allocates
            from fewbench.running import cpu_heap

            cpu_heap.keep_large_blocks_on_heap()
        print(json.dumps(asdict(measure(config, engine, device, float(seconds), learner, phase))))
        return 0
    import torch

    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    learners = args.learners.split(",")
    unknown = [name for name in learners if name not in LEARNERS]
    if unknown:
        parser.error(f"unknown learner {unknown[0]!r}; choose from {', '.join(LEARNERS)}")
    everything = []
    for device in devices:
        default = GPU_ENGINES if device.startswith("cuda") else ENGINES
        engines = args.engines.split(",") if args.engines else list(default)
        engines += list(VARIANTS) if args.variants else []
        rows = []
        for config in configs:
            for learner in learners:
                for engine in engines:
                    if learner != "maml" and engine.startswith("higher"):
                        continue  # the reference is maml's
                    if "stock" in variants_of(engine) and not has_stock_form(config):
                        continue  # no max-pooling: the stock network is fewbench's
                    print(
                        f"measuring {device} {config} {learner} {engine} ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    rows.append(
                        measure_isolated(config, engine, device, args.seconds, learner, args.phase)
                    )
        print(table(rows, device), "\n", flush=True)
        everything += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in everything], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
