"""What ``fewbench report`` adds for a run directory of ``fewbench tune``: the search, the
trial chosen on validation and, read after the choice, its test result. ``fewbench tune``
(:mod:`fewbench.running.tuning`) writes the record this reads."""

from __future__ import annotations

import json
from pathlib import Path

from fewbench.plugin.task_types import by_metric
from fewbench.storage.store import ResultsStore

META_KEY = "tune"  # the search's record in results.sqlite's meta table
MAX_CELLS = 1000  # of the chosen trial, read back (a trial has one per seed)


def tuning_section(run_dir: Path) -> str:
    """What ``fewbench report`` adds for a tuned run directory (empty for any other): the
    search, the trial chosen on validation and, read after the choice, its test result. A
    record that cannot be read (damaged, edited) is said in one line: the report stands."""
    store = ResultsStore.open_run(Path(run_dir), must_exist=True, readonly=True)
    try:
        text = store.meta(META_KEY)
        if not text:
            return ""
        try:
            return _section(run_dir, store, json.loads(text))
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:80]}"
            return (
                f"\nTuning: the search record in {store.path} is unreadable ({reason}); "
                "the cells above are reported without it.\n"
            )
    finally:
        store.close()


def _section(run_dir: Path, store: ResultsStore, record: dict) -> str:
    best = record.get("best")
    rows = []
    if best:
        cells = [str(cell) for cell in best["cells"]][:MAX_CELLS]
        marks = ",".join("?" * len(cells))
        rows = store.db.execute(
            f"SELECT label, status, metric, mean, ci95, config FROM cells WHERE id IN ({marks})",
            cells,
        ).fetchall()
    task = by_metric(record["metric"])
    lines = [
        f"Tuning ({run_dir}/{record['storage']}, study {record['study']}): {record['counted']} "
        f"of {record['wanted']} trials, each judged on the mean of its cells' best validation "
        f"{task.noun} ({task.direction} wins); the test episodes play no part in the choice."
    ]
    if not best:
        lines.append("Chosen: none yet (no trial has completed).")
        return "\n" + "\n".join(lines) + "\n"
    values = best.get("shown") or ", ".join(best["set"])
    lines.append(
        f"Chosen: trial {best['number']} ({values}), validation {task.noun} "
        f"{task.format(best['value'])}."
    )
    for row in rows:
        if row["status"] != "done":
            lines.append(f"  its test result: {row['label']}: {row['status']}")
            continue
        episodes = json.loads(row["config"])["eval"]["episodes"]
        lines.append(
            f"  its test result, read after the choice: {row['label']}: "
            f"{by_metric(row['metric']).describe(row['mean'], row['ci95'])} on {episodes} "
            "fixed test episodes"
        )
    return "\n" + "\n".join(lines) + "\n"


def tuning_sections(run_dirs: list[Path]) -> str:
    return "".join(tuning_section(Path(run_dir)) for run_dir in run_dirs)
