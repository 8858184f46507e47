"""The ``slurm`` executor: the cells go out as one SLURM job array, through submitit.

``fewbench run SUITE --executor slurm --partition gpu --time-min 240 ...``
submits one array task per cell (``sbatch --array=0-N%P``, with the partition,
time limit, GPUs, CPUs and memory per cell), records the job ids and, unless
``--wait``, exits: the jobs run on their own. ``fewbench status RUN_DIR`` shows
where every cell stands, ``fewbench collect RUN_DIR`` copies finished cells into
the results store, and ``fewbench run RUN_DIR --executor slurm`` again collects,
leaves alone the cells whose jobs are still queued or running, and submits the rest.

A job that is preempted or reaches its time limit gets SIGUSR2 from SLURM
(``signal_delay_s`` before the limit); submitit then requeues it with the same
arguments, and the cell resumes from its last checkpoint (written every
``train.checkpoint_every`` iterations and at least every ``train.checkpoint_minutes``).

``cluster: local`` runs the same submission through submitit's local executor,
as processes on this machine: for trying a suite before sending it, and for tests.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from fewbench.plugin import (
    ExecutorOption,
    FewbenchError,
    Param,
    RunDir,
    SchedulerExecutor,
    hookimpl,
    mark_task_interrupted,
    run_cell_task,
)

# sacct states in which a job may still run the cell; anything else ended it.
LIVE_STATES = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
    "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT",
}  # fmt: skip


def job_details() -> dict[str, str]:
    """Which job runs this task, as ``squeue`` names it (``4242_3`` for an array task)."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return {"slurm_job": f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"}
    if "SLURM_JOB_ID" in env:
        return {"slurm_job": env["SLURM_JOB_ID"]}
    if "SUBMITIT_LOCAL_JOB_ID" in env:
        return {"local_job": env["SUBMITIT_LOCAL_JOB_ID"]}
    return {}


class SlurmCellJob:
    """What each array task runs. submitit calls ``checkpoint`` on SIGUSR2 (preemption or
    time limit) and requeues the returned submission: the same cell, which resumes
    from its checkpoint."""

    def __call__(self, run_dir: str, cell_id: str, settings: dict) -> dict:
        details = job_details()
        job = details.get("slurm_job") or details.get("local_job")
        if job:
            details["note"] = f"slurm job {job}" if "slurm_job" in details else f"local job {job}"
        return run_cell_task(run_dir, cell_id, settings, details)

    def checkpoint(self, run_dir: str, cell_id: str, settings: dict):
        from submitit.helpers import DelayedSubmission

        mark_task_interrupted(run_dir, cell_id, "preempted or out of time; requeued")
        return DelayedSubmission(self, run_dir, cell_id, settings)


class SlurmExecutor(SchedulerExecutor):
    name = "slurm"
    description = "One SLURM array task per cell, through submitit; requeued on preemption"
    params = {
        "partition": Param("", type=str, help="SLURM partition (empty: the cluster's default)"),
        "account": Param("", type=str, help="SLURM account to charge (empty: your default)"),
        "time_min": Param(240, minimum=1, help="time limit of each cell's job, in minutes"),
        "gpus_per_cell": Param(1, minimum=0, help="GPUs of each cell's job"),
        "cpus_per_cell": Param(4, minimum=1, help="CPUs of each cell's job"),
        "mem_gb": Param(16.0, minimum=0.1, help="memory of each cell's job, in GB"),
        "array_parallelism": Param(
            32, minimum=1, help="array tasks running at once (the %P of --array)"
        ),
        "max_requeues": Param(3, minimum=0, help="requeues after reaching the time limit"),
        "signal_delay_s": Param(120, minimum=1, help="SIGUSR2 this long before the time limit"),
        "sbatch_args": Param(
            {}, type=dict, help="further sbatch options, e.g. {constraint: a100, qos: high}"
        ),
        "wait": Param(False, help="stay, show progress and collect until every cell ends"),
        "cluster": Param(
            "slurm",
            choices=("slurm", "local"),
            help="local: the same jobs as processes on this machine (submitit's local executor; waits)",
        ),
        "progress_every": Param(
            10.0, minimum=0.1, help="seconds between progress lines (with wait)"
        ),
    }

    def submitit_parameters(self, suite_name: str) -> dict:
        """What submitit turns into the #SBATCH lines of the array job."""
        config = self.config
        parameters = {
            "name": f"fewbench-{suite_name}",
            "timeout_min": config["time_min"],
            "nodes": 1,
            "tasks_per_node": 1,
            "cpus_per_task": config["cpus_per_cell"],
            "gpus_per_node": config["gpus_per_cell"],
            "mem_gb": config["mem_gb"],
            "slurm_array_parallelism": config["array_parallelism"],
            "slurm_signal_delay_s": config["signal_delay_s"],
        }
        if config["partition"]:
            parameters["slurm_partition"] = config["partition"]
        if config["account"]:
            parameters["slurm_account"] = config["account"]
        if config["sbatch_args"]:
            parameters["slurm_additional_parameters"] = dict(config["sbatch_args"])
        return parameters

    def check(self) -> None:
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise FewbenchError(
                "the slurm executor needs submitit: pip install 'fewbench[slurm]' "
                "(or pip install submitit)"
            ) from None
        if self.config["cluster"] == "local" and self.config["gpus_per_cell"] > 0:
            import torch

            if torch.cuda.device_count() < self.config["gpus_per_cell"]:
                raise FewbenchError(
                    f"--executor-set cluster=local runs the jobs on this machine, which has "
                    f"{torch.cuda.device_count()} GPUs, but each cell asks for "
                    f"{self.config['gpus_per_cell']:g}: add --gpus-per-cell 0"
                )
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if self.config["cluster"] == "slurm" and missing:
            raise FewbenchError(
                f"the slurm executor needs SLURM's commands on PATH ({', '.join(missing)} not "
                "found): run fewbench on the cluster's login node, or try the jobs here with "
                "--executor-set cluster=local"
            )

    def make_executor(self, run_dir: Path, suite_name: str):
        import submitit

        try:
            executor = submitit.AutoExecutor(
                folder=run_dir / "slurm" / "%j",
                cluster=self.config["cluster"],
                slurm_max_num_timeout=self.config["max_requeues"],
                local_max_num_timeout=self.config["max_requeues"],
            )
        except RuntimeError as exc:  # no srun on PATH
            raise FewbenchError(
                f"the slurm executor needs SLURM's commands on PATH ({exc}): run fewbench on the "
                "cluster's login node, or try the jobs here with --executor-set cluster=local"
            ) from None
        executor.update_parameters(**self.submitit_parameters(suite_name))
        return executor

    # --- the job ids of each cell, kept in the run directory for a later driver ---

    JOBS_FILE = "slurm/jobs.json"

    def live_cells(self, run: RunDir, known_jobs: dict[str, str], folder: Path, log) -> set[str]:
        """Cells queued by an earlier driver whose job SLURM still holds (asked of sacct,
        through submitit, in one call): they are left alone, not submitted again."""
        queued = [row.id for row in run.cells() if row.status == "queued"]
        if self.config["cluster"] != "slurm" or not queued:
            return set()
        import submitit

        jobs = {
            cell_id: submitit.SlurmJob(folder=folder, job_id=known_jobs[cell_id])
            for cell_id in queued
            if cell_id in known_jobs
        }
        if jobs:
            next(iter(jobs.values())).watcher.update()
        live = set()
        for cell_id, job in jobs.items():
            state = (job.state or "UNKNOWN").split()[0].upper()
            if state in LIVE_STATES:
                live.add(cell_id)
            elif state == "UNKNOWN":
                print(
                    f"fewbench: SLURM has no state for job {job.job_id}; submitting its cell again",
                    file=log,
                    flush=True,
                )
        return live

    def run(self, run: RunDir, log) -> int:
        run_dir = run.path
        executor = self.make_executor(run_dir, run.suite_name)
        known_jobs = run.load_json(self.JOBS_FILE) or {}
        live = self.live_cells(run, known_jobs, run_dir / "slurm" / "%j", log)
        todo = run.to_submit(in_flight=lambda row: row.id in live)
        jobs = []
        if todo:
            run.queue(todo, "slurm (submitting)")
            count = len(todo)
            try:
                jobs = executor.map_array(
                    SlurmCellJob(), [str(run_dir)] * count, todo,
                    [self.task_settings(run)] * count,
                )  # fmt: skip
            except Exception as exc:  # sbatch refused: say why, leave the cells pending
                run.unqueue(todo)
                message = str(exc).strip().splitlines()
                raise FewbenchError(
                    f"submitting to SLURM failed: {message[-1] if message else type(exc).__name__}"
                ) from None
            for cell_id, job in zip(todo, jobs, strict=True):
                run.note_job(cell_id, f"slurm job {job.job_id}")
                known_jobs[cell_id] = job.job_id
            run.save_json(self.JOBS_FILE, known_jobs)
        where = "as local processes" if self.config["cluster"] == "local" else "to SLURM"
        print(
            f"fewbench: {len(todo)} cell{'s' * (len(todo) != 1)} submitted {where}"
            + (f" (array job {jobs[0].job_id.split('_')[0]})" if jobs else "")
            + f"; logs in {run_dir / 'slurm'}; fewbench status {run_dir} shows every cell",
            file=log,
            flush=True,
        )
        if not (self.config["wait"] or self.config["cluster"] == "local"):
            print(
                f"fewbench: not waiting. Later: fewbench collect {run_dir} (results into the "
                f"store), or fewbench run {run_dir} (collect, and submit what was lost)",
                file=log,
                flush=True,
            )
            return 0
        return self.wait(run, dict(zip(todo, jobs, strict=True)), log)

    def wait(self, run: RunDir, jobs: dict, log) -> int:
        """Show progress and collect until every cell ended. Cells report through their
        folders; SLURM is asked (sacct, at most once a minute) only about cells that have not,
        and a job that ended without a result fails its cell with the job's reason."""
        waiting, last, asked = dict(jobs), "", 0.0
        every = 0.0 if self.config["cluster"] == "local" else 60.0
        try:
            while waiting:
                time.sleep(self.config["progress_every"])
                last = self.report_progress(run, log, last)
                for cell_id in [c for c in waiting if run.status(c) in ("done", "failed")]:
                    del waiting[cell_id]
                if not waiting or time.monotonic() - asked < every:
                    continue
                asked = time.monotonic()
                ended = {c: job for c, job in waiting.items() if job.done(force_check=True)}
                run.collect()  # a result written just before its job ended
                for cell_id, job in ended.items():
                    del waiting[cell_id]
                    if run.status(cell_id) not in ("done", "failed"):
                        run.fail(
                            cell_id,
                            f"SLURM job {job.job_id} ended ({job.state}) without a result; "
                            f"its log: {job.paths.stderr}",
                        )
        except KeyboardInterrupt:
            print(
                f"fewbench: stopped waiting; the jobs go on. fewbench status {run.path}",
                file=log,
                flush=True,
            )
            return 130
        self.report_progress(run, log, "")
        return run.exit_code()


@hookimpl
def fewbench_register_executors(register):
    register(SlurmExecutor)


@hookimpl
def fewbench_add_executor_options(add_option):
    for flag, param, text, convert in (
        ("--partition", "partition", "slurm: partition", None),
        ("--account", "account", "slurm: account", None),
        ("--time-min", "time_min", "slurm: time limit per cell, minutes", int),
        ("--mem-gb", "mem_gb", "slurm: memory per cell, GB", float),
        ("--array-parallelism", "array_parallelism", "slurm: array tasks at once", int),
        ("--gpus-per-cell", "gpus_per_cell", "ray, slurm: GPUs per cell (ray: may be 0.25)", float),
        ("--cpus-per-cell", "cpus_per_cell", "ray, slurm: CPUs per cell", float),
    ):
        add_option(ExecutorOption(flag, param, text, convert))
    add_option(
        ExecutorOption(
            "--wait",
            "wait",
            "slurm: stay until every cell ends (default: submit and exit)",
            flag_only=True,
        )
    )
