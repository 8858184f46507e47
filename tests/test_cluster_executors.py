"""The cluster executors on a small real grid: Ray (a real local Ray instance) and SLURM
(through submitit: its local executor for running, and a stand-in sbatch/sacct for what
would be submitted to a real cluster)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

from grid_runs import (
    assert_every_cell_ran_once,
    cells,
    results,
    sequential,
    start_driver,
    wait_for_running_maml_cell,
    write_suite,
)
from helpers import run_cli

# 1 CPU per cell: two cells at a time on a 2-core machine, like two local workers.
SLURM_LOCAL = ["--executor", "slurm", "--executor-set", "cluster=local", "--gpus-per-cell", "0",
               "--cpus-per-cell", "1", "--executor-set", "progress_every=1"]  # fmt: skip
RAY = ["--executor", "ray", "--executor-set", "progress_every=1"]
RAY_CLI = str(Path(sys.executable).parent / "ray")  # installed beside this Python


def run_grid(tmp_path, data_root, cache_dir, iterations, executor_args):
    out = tmp_path / "run"
    result = run_cli(
        "run", str(write_suite(tmp_path, iterations)), "--out", str(out),
        "--data-root", str(data_root), *executor_args,
        env={"FEWBENCH_CACHE": str(cache_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, result


def resumed_from(run_dir: Path, cell_id: str) -> int:
    return json.loads((run_dir / "cells" / cell_id / "state.json").read_text())["resumed_from"]


def test_ray_runs_every_cell_once_with_the_sequential_results(tmp_path, data_root, cache_dir):
    """On a Ray cluster the test starts (``ray start --head``) with one logical GPU: cells asking
    for half a GPU each share it, and run on the CPU (``--device cpu``)."""
    port = free_port()
    started = subprocess.run(
        [RAY_CLI, "start", "--head", "--num-cpus", "2", "--num-gpus", "1", "--port", str(port),
         "--include-dashboard=false", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        out, result = run_grid(
            tmp_path, data_root, cache_dir, 8,
            [*RAY, "--address", "auto", "--gpus-per-cell", "0.5", "--device", "cpu"],
        )  # fmt: skip
    finally:
        subprocess.run([RAY_CLI, "stop", "--force"], capture_output=True, timeout=120, check=False)
    assert "4 cells submitted to Ray (auto: 2 CPUs, 1 GPUs)" in result.stderr
    rows = assert_every_cell_ran_once(out)
    assert all(r["worker"].count(":") == 1 for r in rows)  # host:pid of the Ray worker process
    assert results(out) == sequential(8, tmp_path, data_root, cache_dir)
    states = [json.loads(p.read_text()) for p in (out / "cells").glob("*/state.json")]
    assert len(states) == 4 and all(s["status"] == "done" and s["ray_node"] for s in states)
    assert all(s["gpu_ids"] == ["0"] for s in states)  # half of GPU 0 each
    status = run_cli("status", str(out))
    assert "4 done, 0 running, 0 pending, 0 failed" in status.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def disrupt_a_maml_cell(tmp_path, data_root, cache_dir, executor_args, disrupt):
    """Run the 60-iteration grid from a driver; once a MAML cell is at iteration 8 or later,
    call ``disrupt(state)`` with that cell's state and let the run finish. Returns the run
    directory, the cell's id, its state when disrupted, and the driver's exit code and stderr."""
    out = tmp_path / "disrupted"
    driver = start_driver(
        [str(write_suite(tmp_path, 60)), "--out", str(out), "--data-root", str(data_root),
         *executor_args],
        cache_dir,
    )  # fmt: skip
    victim, state = wait_for_running_maml_cell(out, driver)
    disrupt(state)
    _, stderr = driver.communicate(timeout=600)
    return out, victim, state, driver.returncode, stderr


def signal_worker(signum: int):
    """A disruption: send ``signum`` to the process running the cell."""
    return lambda state: os.kill(int(state["worker"].rsplit(":", 1)[1]), signum)


def test_ray_retries_a_killed_worker_s_cell_from_its_checkpoint(tmp_path, data_root, cache_dir):
    out, victim, state, code, stderr = disrupt_a_maml_cell(
        tmp_path, data_root, cache_dir, RAY, signal_worker(signal.SIGKILL)
    )
    assert code == 0, stderr
    rows = {r["id"]: r for r in assert_every_cell_ran_once(out, attempts=2)}
    assert rows[victim]["attempts"] == 2 and rows[victim]["worker"] != state["worker"]
    # The retry resumed from the checkpoint the killed attempt had written (every 2 iterations;
    # it was past iteration 8), and ended exactly where an uninterrupted run does.
    assert resumed_from(out, victim) >= 4
    assert results(out) == sequential(60, tmp_path, data_root, cache_dir)


def test_ray_retries_the_cell_of_a_node_that_died_on_another_node(tmp_path, data_root, cache_dir):
    """A Ray cluster of a head (no CPUs) and two 1-CPU worker nodes; the node running a MAML cell
    is removed mid-cell (its raylet and workers killed): Ray retries the cell on the other node,
    which resumes it from the checkpoint on the shared run directory."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()

        def remove_its_node(state: dict) -> None:
            (node,) = [n for n in nodes if n.node_id.startswith(state["ray_node"])]
            cluster.remove_node(node, allow_graceful=False)

        out, victim, state, code, stderr = disrupt_a_maml_cell(
            tmp_path, data_root, cache_dir, [*RAY, "--address", cluster.address], remove_its_node
        )
    finally:
        cluster.shutdown()
    assert code == 0, stderr
    rows = {r["id"]: r for r in assert_every_cell_ran_once(out, attempts=2)}
    assert rows[victim]["attempts"] == 2 and resumed_from(out, victim) >= 4
    final = json.loads((out / "cells" / victim / "state.json").read_text())
    assert final["ray_node"] != state["ray_node"]  # finished on the surviving node
    assert results(out) == sequential(60, tmp_path, data_root, cache_dir)


def test_slurm_jobs_run_locally_through_submitit(tmp_path, data_root, cache_dir):
    out, result = run_grid(tmp_path, data_root, cache_dir, 8, SLURM_LOCAL)
    assert "4 cells submitted as local processes" in result.stderr
    assert_every_cell_ran_once(out)
    assert results(out) == sequential(8, tmp_path, data_root, cache_dir)
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert sorted(jobs) == sorted(r["id"] for r in cells(out))
    for job_id in jobs.values():  # each cell ran as its own submitit job, with its own log
        assert (out / "slurm" / job_id / f"{job_id}_0_log.out").is_file()
    again = run_cli("run", str(out), *SLURM_LOCAL, "--data-root", str(data_root))
    assert again.returncode == 0 and "0 cells submitted" in again.stderr  # nothing left to do


def test_a_preempted_slurm_job_is_requeued_and_resumes(tmp_path, data_root, cache_dir):
    # What SLURM sends before preempting a job or at its time limit (--signal=USR2@...).
    out, victim, _, code, stderr = disrupt_a_maml_cell(
        tmp_path, data_root, cache_dir, SLURM_LOCAL, signal_worker(signal.SIGUSR2)
    )
    assert code == 0, stderr
    rows = {r["id"]: r for r in assert_every_cell_ran_once(out, attempts=2)}
    assert rows[victim]["attempts"] == 2 and resumed_from(out, victim) >= 4
    job_id = json.loads((out / "slurm" / "jobs.json").read_text())[victim]
    log = (out / "slurm" / job_id / f"{job_id}_0_log.out").read_text()
    assert "Requeued job" in log  # submitit's own requeue, as on a cluster
    assert results(out) == sequential(60, tmp_path, data_root, cache_dir)


def test_a_slurm_job_that_dies_fails_its_cell_and_retry_failed_resumes_it(
    tmp_path, data_root, cache_dir
):
    """A job killed outright (no SIGUSR2, no requeue) ends without a result: the driver fails its
    cell with the job's reason. ``fewbench run RUN_DIR --retry-failed`` alone (the executor comes
    from execution.json) submits it again, and it resumes from its checkpoint."""
    out, victim, _, code, stderr = disrupt_a_maml_cell(
        tmp_path, data_root, cache_dir, SLURM_LOCAL, signal_worker(signal.SIGKILL)
    )
    assert code == 1, stderr
    rows = {r["id"]: r for r in cells(out)}
    assert rows[victim]["status"] == "failed"
    assert "ended (FINISHED) without a result; its log: " in rows[victim]["error"]
    assert sum(r["status"] == "done" for r in rows.values()) == 3
    again = run_cli(
        "run", str(out), "--retry-failed", "--data-root", str(data_root),
        env={"FEWBENCH_CACHE": str(cache_dir)},
    )  # fmt: skip
    assert again.returncode == 0 and "1 cell submitted as local processes" in again.stderr
    assert_every_cell_ran_once(out, attempts=2)
    assert resumed_from(out, victim) >= 4
    assert results(out) == sequential(60, tmp_path, data_root, cache_dir)


def fake_slurm(tmp_path: Path, sacct_states: dict[str, str]) -> dict[str, str]:
    """``sbatch``, ``sacct`` and ``srun`` stand-ins on PATH: sbatch keeps each submitted file
    and answers job 4242, 4243, ...; sacct reports the given states."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "sbatch": f"""#!/bin/sh
n=$(ls {tmp_path}/submitted-* 2>/dev/null | wc -l)
cp "$1" {tmp_path}/submitted-$n.sh
echo "Submitted batch job $((4242 + n))"
""",
        "sacct": "#!/bin/sh\necho 'JobID|State|NodeList'\n"
        + "".join(f"echo '{job}|{state}|node1'\n" for job, state in sacct_states.items()),
        "srun": "#!/bin/sh\nexit 1\n",  # submitit checks that it exists; never run here
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_the_slurm_job_array_submitted_and_a_later_driver_picking_up(tmp_path, data_root):
    suite = write_suite(
        tmp_path,
        8,
        "execution: {executor: slurm, partition: gpu, time_min: 90, gpus_per_cell: 2,"
        " cpus_per_cell: 8, mem_gb: 32, array_parallelism: 3}\n",
    )
    out = tmp_path / "cluster"
    env = fake_slurm(tmp_path, {})
    first = run_cli(
        "run", str(suite), "--out", str(out), "--data-root", str(data_root),
        "--account", "lab", "--executor-set", "sbatch_args={constraint: a100}", env=env,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "4 cells submitted to SLURM (array job 4242)" in first.stderr
    assert "not waiting" in first.stderr
    sbatch = (tmp_path / "submitted-0.sh").read_text()
    for line in (
        "#SBATCH --array=0-3%3",
        "#SBATCH --partition=gpu",  # from the suite's execution: section
        "#SBATCH --account=lab",  # from the command line
        "#SBATCH --time=90",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --constraint=a100",
        "#SBATCH --job-name=fewbench-workers",
    ):
        assert line in sbatch, f"{line} not in:\n{sbatch}"
    rows = cells(out)
    assert all(r["status"] == "queued" for r in rows)
    assert sorted(r["worker"] for r in rows) == [f"slurm job 4242_{i}" for i in range(4)]
    status = run_cli("status", str(out))
    assert "0 done, 0 running, 4 queued, 0 pending, 0 failed" in status.stdout

    # Later: SLURM still holds three of the jobs; one was cancelled. Run again on the directory.
    env = fake_slurm(
        tmp_path,
        {"4242_0": "PENDING", "4242_1": "RUNNING", "4242_2": "REQUEUED", "4242_3": "CANCELLED"},
    )
    again = run_cli("run", str(out), "--data-root", str(data_root), env=env)
    assert again.returncode == 0, again.stderr
    assert "1 cell submitted to SLURM" in again.stderr
    resubmitted = (tmp_path / "submitted-1.sh").read_text()
    # The same job parameters, the command-line ones included (kept in execution.json).
    assert "#SBATCH --account=lab" in resubmitted and "#SBATCH --constraint=a100" in resubmitted
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert sorted(jobs.values()) == ["4242_0", "4242_1", "4242_2", "4243"]
    assert jobs[[r["id"] for r in rows if r["worker"] == "slurm job 4242_3"][0]] == "4243"


def test_collect_copies_finished_cells_into_the_store_once(tmp_path, data_root, cache_dir):
    """A worker's result.json reaches the store through fewbench collect, exactly once."""
    from fewbench.plugin.executor import run_cell_task

    suite = write_suite(tmp_path, 8)
    out = tmp_path / "run"
    env = fake_slurm(tmp_path, {})
    submitted = run_cli(
        "run", str(suite), "--out", str(out), "--data-root", str(data_root),
        "--executor", "slurm", env=env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    settings = {"data_root": str(data_root), "cache_dir": str(cache_dir), "device": "cpu",
                "threads": 1, "stale_after": 120}  # fmt: skip
    for row in cells(out):  # what each array task would run on its node
        assert run_cell_task(str(out), row["id"], settings)["status"] == "done"
    status = run_cli("status", str(out))
    assert "4 done" in status.stdout and "not yet in the results store" in status.stdout
    assert results(out) == {}
    collected = run_cli("collect", str(out))
    assert "collected 4 finished and 0 failed cells" in collected.stdout
    assert_every_cell_ran_once(out)
    assert results(out) == sequential(8, tmp_path, data_root, cache_dir)
    assert "collected 0 finished" in run_cli("collect", str(out)).stdout
    assert "not yet" not in run_cli("status", str(out)).stdout


def test_a_failing_cell_is_recorded_once_and_the_others_finish(tmp_path, data_root, cache_dir):
    """A diverging cell fails in its task, is not retried (it would fail the same way), and
    reaches the results store with its reason; the suite still finishes its other cell."""
    suite = tmp_path / "diverging.yaml"
    suite.write_text(
        write_suite(tmp_path, 4)
        .read_text()
        .replace("seeds: [0, 1]", "seeds: [0]")
        .replace(
            "{name: maml, meta_batch_size: 2, threads: 1}",
            "{name: maml, meta_batch_size: 2, threads: 1, inner_lr: 1.0e+30}",
        )  # fmt: skip
    )
    out = tmp_path / "run"
    result = run_cli(
        "run", str(suite), "--out", str(out), "--data-root", str(data_root), *RAY,
        env={"FEWBENCH_CACHE": str(cache_dir)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    rows = {r["learner"]: r for r in cells(out)}
    assert rows["finetune"]["status"] == "done"
    assert rows["maml"]["status"] == "failed" and rows["maml"]["attempts"] == 1
    assert (
        rows["maml"]["error"]
        == "training loss became nan at iteration 1; try a lower learning rate"
    )
    assert "1 done, 0 running, 0 pending, 1 failed" in run_cli("status", str(out)).stdout


def test_a_slurm_task_names_its_job_as_squeue_does(monkeypatch):
    from fewbench_plugins.executors.slurm_jobs import job_details

    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4250")
    assert job_details() == {"slurm_job": "4250"}
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert job_details() == {"slurm_job": "4242_3"}  # the array task, not its own job id


def test_a_refused_submission_is_one_line_and_leaves_the_cells_pending(tmp_path, data_root):
    env = fake_slurm(tmp_path, {})
    (tmp_path / "bin" / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n"
    )
    out = tmp_path / "run"
    result = run_cli(
        "run", str(write_suite(tmp_path, 8)), "--out", str(out), "--data-root", str(data_root),
        "--executor", "slurm", "--partition", "nope", env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fewbench: error: submitting to SLURM failed: sbatch: error: invalid partition specified: nope"
    )
    assert {r["status"] for r in cells(out)} == {"pending"}
