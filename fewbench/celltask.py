"""One cell as a scheduler's task: what a Ray task or a SLURM array job runs.

A cluster executor gives its scheduler one task per cell; the task reads the run
directory's ``suite.yaml`` (on the shared file system), trains and evaluates its
cell, and reports through the cell's own folder (:mod:`fewbench.journal`), never
the results store. A retried or requeued task resumes from the cell's last
checkpoint, because training always does. A cell that fails for a reason of its
own (a bad configuration, a plugin's bug, missing data on that node) is recorded
as failed and the task returns normally: retrying it would fail the same way.
Retries are for the worker dying, which the scheduler sees.
"""

from __future__ import annotations

import socket
import traceback
from pathlib import Path
from typing import Any

from fewbench.heartbeat import Heartbeat, interval_for
from fewbench.journal import CellJournal

# What the driver passes to every task (plain values: it is pickled to other machines).
SETTING_KEYS = ("data_root", "cache_dir", "device", "threads", "stale_after")


def run_cell_task(
    run_dir: str, cell_id: str, settings: dict[str, Any], details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run one cell of ``run_dir`` to completion; returns a small summary for the driver.

    ``details`` (for example the Ray node or the SLURM job id) are kept in the
    cell's state file, for ``fewbench status``.
    """
    import torch

    from fewbench.cli import default_cache_dir
    from fewbench.errors import FewbenchError
    from fewbench.grid import expand
    from fewbench.registry import Registry
    from fewbench.runner import (
        DatasetCache,
        default_worker_name,
        failure_reason,
        resolve_device,
        run_cell,
    )
    from fewbench.suite import load_suite_file

    folder = Path(run_dir)
    journal = CellJournal(folder, cell_id, default_worker_name())
    if journal.done:
        return {"cell": cell_id, "status": "done", "skipped": True}
    attempt = journal.start(host=socket.gethostname(), **(details or {}))
    try:
        if settings.get("threads"):
            torch.set_num_threads(int(settings["threads"]))
        registry = Registry()
        data_root = Path(settings["data_root"])
        suite = expand(load_suite_file(folder / "suite.yaml"), registry, data_root)
        cells = {cell.id: cell for cell in suite.cells}
        if cell_id not in cells:
            raise FewbenchError(f"{folder}/suite.yaml has no cell {cell_id}")
        device = resolve_device(settings.get("device") or "auto")
        cache_dir = (
            Path(settings["cache_dir"]) if settings.get("cache_dir") else default_cache_dir()
        )
        datasets = DatasetCache(registry, data_root, cache_dir, device)
        interval = interval_for(float(settings.get("stale_after", 120.0)))
        with Heartbeat.calling(journal.beat, interval):
            result = run_cell(cells[cell_id], journal, registry, datasets, folder, device, False)
    except Exception as exc:  # recorded for the driver; the task itself succeeds
        reason = failure_reason(exc)
        detail = "" if isinstance(exc, FewbenchError) else "\n" + traceback.format_exc()
        journal.mark(cell_id, "failed", error=reason + detail)
        return {"cell": cell_id, "status": "failed", "error": reason, "attempt": attempt}
    return {
        "cell": cell_id,
        "status": "done",
        "mean": result["mean"],
        "ci95": result["ci95"],
        "attempt": attempt,
    }
