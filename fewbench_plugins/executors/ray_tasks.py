"""The ``ray`` executor: each cell is a Ray task, placed, retried and limited by Ray.

``fewbench run SUITE --executor ray [--address ADDR]``. With no address,
``ray.init()`` starts a Ray instance on this machine; with one, the cells go to
that cluster, whose nodes must have fewbench installed and see the run directory
and the data root at the same paths (a shared file system).

Each task asks for ``cpus_per_cell`` CPUs and ``gpus_per_cell`` GPUs; a fraction
such as 0.25 packs four cells onto one GPU. A task whose worker process or node
dies is retried by Ray (``max_retries``) and resumes from the cell's last
checkpoint. The driver collects finished cells into the results store as they
come in; stopping the driver stops its tasks (Ray ends a job's tasks with its
driver), and ``fewbench run RUN_DIR --executor ray`` submits what is left.
"""

from __future__ import annotations

import socket

from fewbench.plugin import (
    ExecutorOption,
    FewbenchError,
    Param,
    RunDir,
    SchedulerExecutor,
    hookimpl,
    run_cell_task,
)


def ray_cell_task(run_dir: str, cell_id: str, settings: dict) -> dict:
    """The Ray task: one cell, with the node and GPUs Ray gave it kept for ``fewbench status``."""
    import ray

    context = ray.get_runtime_context()
    node = context.get_node_id()[:12]
    details = {
        "ray_node": node,
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "note": f"ray node {node}",
    }
    return run_cell_task(run_dir, cell_id, settings, details)


def check_reachable(address: str, seconds: float = 5.0) -> None:
    """Fail at once, in one line, on an address nothing answers at: Ray itself retries
    for minutes before giving up."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FewbenchError(f"--address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as exc:
        raise FewbenchError(f"--address {address}: no Ray cluster answers there ({exc})") from None


class RayExecutor(SchedulerExecutor):
    name = "ray"
    description = "One Ray task per cell, on a local Ray instance or the cluster at --address"
    params = {
        "address": Param(
            "",
            type=str,
            help="Ray cluster: HOST:PORT, ray://HOST:10001 or auto (the one on this machine); "
            "empty: start one here",
        ),
        "cpus_per_cell": Param(
            1.0, type=(int, float), minimum=0.01, help="CPUs each cell asks for"
        ),
        "gpus_per_cell": Param(
            0.0,
            minimum=0,
            help="GPUs each cell asks for; a fraction packs several cells onto one GPU",
        ),
        "max_retries": Param(
            3,
            minimum=0,
            help="retries of a cell whose worker or node died (resumes from its checkpoint)",
        ),
        "progress_every": Param(10.0, minimum=0.1, help="seconds between progress lines"),
    }

    def task_options(self, label: str) -> dict:
        """The resources and retry policy of each cell's task."""
        return {
            "num_cpus": self.config["cpus_per_cell"],
            "num_gpus": self.config["gpus_per_cell"],
            "max_retries": self.config["max_retries"],
            "retry_exceptions": False,  # a cell's own failure is recorded, not retried
            "name": f"fewbench {label}",
        }

    def check(self) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise FewbenchError(
                "the ray executor needs Ray: pip install 'fewbench[ray]' (or pip install ray)"
            ) from None
        if self.config["address"]:
            check_reachable(self.config["address"])

    def run(self, run: RunDir, log) -> int:
        import ray

        address = self.config["address"] or None
        try:
            ray.init(
                address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise FewbenchError(f"--address {address}: cannot connect to Ray: {exc}") from None
        try:
            labels = {row.id: row.label for row in run.cells()}
            remote = ray.remote(ray_cell_task)
            settings = self.task_settings(run)
            tasks = {}
            for cell_id in run.to_submit():
                run.queue([cell_id], "ray task")  # before the task can start and report
                ref = remote.options(**self.task_options(labels[cell_id])).remote(
                    str(run.path), cell_id, settings
                )
                tasks[ref] = cell_id
            resources = ray.cluster_resources()
            print(
                f"fewbench: {len(tasks)} cell{'s' * (len(tasks) != 1)} submitted to Ray "
                f"({address or 'a local instance'}: {resources.get('CPU', 0):g} CPUs, "
                f"{resources.get('GPU', 0):g} GPUs); fewbench status {run.path} shows every cell",
                file=log,
                flush=True,
            )
            last = ""
            while tasks:
                ready, _ = ray.wait(
                    list(tasks), num_returns=len(tasks), timeout=self.config["progress_every"]
                )
                for ref in ready:
                    cell_id = tasks.pop(ref)
                    try:
                        ray.get(ref)
                    except Exception as exc:  # retries spent: the worker or node kept dying
                        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        run.fail(cell_id, f"Ray: {type(exc).__name__}: {reason}")
                last = self.report_progress(run, log, last)
        except KeyboardInterrupt:
            print(
                f"fewbench: stopped; the cells' checkpoints hold. Resume with: "
                f"fewbench run {run.path}",
                file=log,
                flush=True,
            )
            return 130
        finally:
            ray.shutdown()
        return run.exit_code()


@hookimpl
def fewbench_register_executors(register):
    register(RayExecutor)


@hookimpl
def fewbench_add_executor_options(add_option):
    add_option(
        ExecutorOption("--address", "address", "ray: cluster address (default: start Ray here)")
    )
    add_option(
        ExecutorOption(
            "--gpus-per-cell",
            "gpus_per_cell",
            "ray, slurm: GPUs per cell (ray: may be 0.25)",
            float,
        )
    )
    add_option(
        ExecutorOption("--cpus-per-cell", "cpus_per_cell", "ray, slurm: CPUs per cell", float)
    )
    add_option(ExecutorOption("--max-retries", "max_retries", "ray: retries of a lost cell", int))
