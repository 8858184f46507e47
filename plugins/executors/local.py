"""The ``local`` executor: worker processes on this machine, optionally one (or K) per GPU.

Each worker is ``fewbench run RUN_DIR`` in its own process, named ``host:pid`` in
the results store, with its share of the CPU threads (torch, OpenMP and MKL
threads are set so that the workers together do not oversubscribe the cores) and,
with ``gpus``, only its own GPU visible. A worker that dies loses its cell's
progress since the last checkpoint: the others see its process is gone and take
the cell over. The driver prints the overall progress while they work.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from fewbench.executor import Executor, WorkerCommand
from fewbench.hookspecs import hookimpl
from fewbench.params import Param
from fewbench.status import cell_table, summary


class LocalExecutor(Executor):
    name = "local"
    description = "Worker processes on this machine; one (or cells_per_gpu) per listed GPU"
    params = {
        "workers": Param(1, minimum=1, help="worker processes (without gpus)"),
        "gpus": Param([], item_type=int, minimum=0, help="GPU indices: workers per GPU"),
        "cells_per_gpu": Param(1, minimum=1, help="workers sharing one GPU"),
        "progress_every": Param(10.0, minimum=0.1, help="seconds between progress lines"),
    }

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

    def worker_env(self, slot: dict[str, str], workers: int) -> tuple[dict[str, str], int]:
        threads = max(1, (os.cpu_count() or 1) // workers)
        env = {**os.environ, **slot}
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[variable] = str(threads)
        return env, threads

    def run(self, command: WorkerCommand, log) -> int:
        slots = self.slots()
        logs = command.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        processes = []
        for index, slot in enumerate(slots):
            env, threads = self.worker_env(slot, len(slots))
            argv = [
                sys.executable, "-m", "fewbench", "run", str(command.run_dir),
                "--no-progress", "--threads", str(threads), *command.options,
            ]  # fmt: skip
            if slot:
                argv += ["--device", "cuda"]
            out = open(logs / f"worker-{index}.log", "ab")  # noqa: SIM115 - closed below
            processes.append((subprocess.Popen(argv, env=env, stdout=out, stderr=out), out))
        where = f"GPUs {self.config['gpus']}" if self.config["gpus"] else "this machine"
        print(
            f"fewbench: {len(processes)} workers on {where}; logs in {logs}; "
            f"fewbench status {command.run_dir} shows every cell",
            file=log,
            flush=True,
        )
        try:
            last = ""
            # Poll every process each round (not any(), which stops at the first live one):
            # polling reaps a dead worker, and only then does its pid read as gone.
            while sum(p.poll() is None for p, _ in processes):
                time.sleep(self.config["progress_every"])
                line = summary(cell_table(command.run_dir), workers=len(processes))
                if line != last:
                    print(f"fewbench: {line}", file=log, flush=True)
                    last = line
        finally:
            for index, (process, out) in enumerate(processes):
                code = process.wait()
                out.close()
                if code not in (0, 1):
                    print(
                        f"fewbench: worker {index} exited with code {code}; see {logs}/worker-{index}.log",
                        file=log,
                        flush=True,
                    )
        print(f"fewbench: {summary(cell_table(command.run_dir))}", file=log, flush=True)
        return self.exit_code(command.run_dir)


@hookimpl
def fewbench_register_executors(register):
    register(LocalExecutor)
