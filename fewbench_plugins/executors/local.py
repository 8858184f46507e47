"""The ``local`` executor: worker processes on this machine, optionally one (or K) per GPU.

Each worker is ``python -m fewbench.running.worker RUN_DIR SETTINGS`` in its own process,
named ``host:pid`` in the results store, with its share of the CPU threads (torch,
OpenMP and MKL threads are set so that the workers together do not oversubscribe
the cores) and, with ``gpus``, only its own GPU visible. Workers take the cells
the driver stored, by id; none reads the suite. A worker that dies loses its
cell's progress since the last checkpoint: the others see its process is gone and
take the cell over. The driver prints the overall progress while they work.
With one worker and no GPUs listed, the driver runs the cells itself.

Ctrl-C reaches the workers from the terminal (they share the driver's process group); a
SIGTERM sent to the driver alone is passed on to them (:meth:`RunDir.passing_sigterm_on`):
each checkpoints its cell, marks it interrupted and exits 143, and so does the driver once
they have.
"""

from __future__ import annotations

import os
import subprocess
import time

from fewbench.plugin import Executor, ExecutorOption, FewbenchError, Param, RunDir, hookimpl

POLL_S = 0.5  # how often the driver checks whether its workers are still running


def gpu_indices(text: str) -> list[int]:
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ValueError("expected indices like 0,1,2,3") from None


class LocalExecutor(Executor):
    name = "local"
    description = "Worker processes on this machine; one (or cells_per_gpu) per listed GPU"
    params = {
        "workers": Param(1, minimum=1, help="worker processes (without gpus)"),
        "gpus": Param([], item_type=int, minimum=0, help="GPU indices: workers per GPU"),
        "cells_per_gpu": Param(1, minimum=1, help="workers sharing one GPU"),
        "progress_every": Param(10.0, minimum=0.1, help="seconds between progress lines"),
    }

    def in_process(self) -> bool:
        return self.config["workers"] <= 1 and not self.config["gpus"]

    def check(self) -> None:
        # Bounded by the machine: a suite file cannot start more processes than there are
        # cores to run them (workers: 100000 once started 266 before it was killed).
        cores = os.cpu_count() or 1
        asked = len(self.config["gpus"]) * self.config["cells_per_gpu"] or self.config["workers"]
        if asked > cores:
            what = (
                f"{len(self.config['gpus'])} GPUs x cells_per_gpu {self.config['cells_per_gpu']}"
                if self.config["gpus"]
                else f"workers {self.config['workers']}"
            )
            raise FewbenchError(
                f"local executor: {what} asks for {asked:,} worker processes; this machine has "
                f"{cores} cores, so at most {cores}"
            )
        if not self.config["gpus"]:
            return
        import torch

        visible = torch.cuda.device_count()
        wrong = [g for g in self.config["gpus"] if g >= visible]
        if wrong:
            raise FewbenchError(
                f"--gpus {','.join(map(str, self.config['gpus']))}: GPU {wrong[0]} does not exist "
                f"({visible} visible)"
            )

    def slots(self) -> list[dict[str, str]]:
        """The environment of each worker: which GPU it sees."""
        gpus = self.config["gpus"]
        if not gpus:
            return [{} for _ in range(self.config["workers"])]
        return [
            {"CUDA_VISIBLE_DEVICES": str(gpu)}
            for gpu in gpus
            for _ in range(self.config["cells_per_gpu"])
        ]

    def worker_env(
        self, slot: dict[str, str], workers: int, requested: int | None = None
    ) -> tuple[dict[str, str], int]:
        """A worker's environment and threads: ``--threads`` when given (so that a suite's
        numerics match a sequential run with the same count), else its share of the cores."""
        threads = requested or max(1, (os.cpu_count() or 1) // workers)
        env = {**os.environ, **slot}
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[variable] = str(threads)
        return env, threads

    def run(self, run: RunDir, log) -> int:
        slots = self.slots()
        waiting = len(run.to_submit())
        if len(slots) > max(1, waiting):  # a worker beyond the cells to run would only idle
            print(
                f"fewbench: {len(slots)} workers asked for {waiting} cells to run: starting "
                f"{max(1, waiting)}",
                file=log,
                flush=True,
            )
            slots = slots[: max(1, waiting)]
        logs = run.path / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        processes: list[tuple[subprocess.Popen, object]] = []
        workers: list[subprocess.Popen] = []  # read by the SIGTERM handler as they start
        with run.passing_sigterm_on(workers, log) as stopping:
            try:
                for index, slot in enumerate(slots):
                    env, threads = self.worker_env(slot, len(slots), run.settings.threads)
                    changes = {"threads": threads, "progress": False}
                    if slot:  # the worker sees only its own GPU
                        changes["device"] = "cuda"
                    argv = run.worker_command(**changes)
                    out = open(logs / f"worker-{index}.log", "ab")  # noqa: SIM115 - closed below
                    processes.append((subprocess.Popen(argv, env=env, stdout=out, stderr=out), out))
                    workers.append(processes[-1][0])
                where = f"GPUs {self.config['gpus']}" if self.config["gpus"] else "this machine"
                print(
                    f"fewbench: {len(processes)} workers on {where}; logs in {logs}; "
                    f"fewbench status {run.path} shows every cell",
                    file=log,
                    flush=True,
                )
                last, every = "", self.config["progress_every"]
                due = time.monotonic() + every
                # Poll every process each round (not any(), which stops at the first live one):
                # polling reaps a dead worker, and only then does its pid read as gone.
                while sum(p.poll() is None for p, _ in processes):
                    # In short naps, not one of progress_every: workers that a SIGTERM stopped
                    # are seen within a second, so that the driver exits right after them.
                    time.sleep(min(every, POLL_S))
                    if time.monotonic() < due:
                        continue
                    due = time.monotonic() + every
                    line = run.progress(workers=len(processes))
                    if line != last:
                        print(f"fewbench: {line}", file=log, flush=True)
                        last = line
            finally:
                for index, (process, out) in enumerate(processes):
                    code = process.wait()
                    out.close()
                    # A worker that a SIGTERM stopped exits as the driver does (143): expected.
                    if code not in (0, 1) and not (
                        stopping.requested and code == stopping.exit_code
                    ):
                        print(
                            f"fewbench: worker {index} exited with code {code}; see {logs}/worker-{index}.log",
                            file=log,
                            flush=True,
                        )
        print(f"fewbench: {run.progress()}", file=log, flush=True)
        code = run.exit_code()
        # Stopped by a SIGTERM before every cell was done: 143, as the workers exited.
        return stopping.exit_code if stopping.requested and code != 0 else code


@hookimpl
def fewbench_register_executors(register):
    register(LocalExecutor)


@hookimpl
def fewbench_add_executor_options(add_option):
    add_option(ExecutorOption("--workers", "workers", "local: worker processes (default 1)", int))
    add_option(
        ExecutorOption(
            "--gpus",
            "gpus",
            "local: comma-separated GPU indices, one worker per GPU (e.g. 0,1,2,3)",
            gpu_indices,
        )
    )
    add_option(
        ExecutorOption("--cells-per-gpu", "cells_per_gpu", "local: workers sharing each GPU", int)
    )
