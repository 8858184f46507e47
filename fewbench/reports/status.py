"""``fewbench status RUN_DIR``: where every cell of a run stands.

The results store says what the driver knows (done, failed, queued with the
scheduler); the cell folders of a cluster run (:mod:`fewbench.storage.journal`) say what
the workers are doing now. Whichever was written later describes the cell, and a
finished ``result.json`` always means done, collected or not. Reading only.

A cell is "running" only while its worker's heartbeat is fresh. A worker killed without a
word (SIGKILL, a lost node, an out-of-memory kill) leaves its cell "running" in the store;
once the heartbeat is older than the workers' ``--stale-after`` (the store keeps it; 120 s
when it does not), the cell is shown as "stale", with when its worker was last seen and how
long it had run until then, not an elapsed time that grows for ever. Another worker would
take such a cell over (it resumes from its checkpoint), and ``fewbench run`` does.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewbench.errors import one_line
from fewbench.plugin.task_types import by_metric
from fewbench.running.heartbeat import DEFAULT_STALE_AFTER, STALE_AFTER_META
from fewbench.storage.journal import journal_states
from fewbench.storage.store import ResultsStore, damage_reported

STATES = ("done", "running", "stale", "queued", "pending", "interrupted", "failed")
# Shown in the summary only when some cell is.
OPTIONAL_STATES = ("stale", "queued", "interrupted")

if TYPE_CHECKING:
    import pandas as pd

# ``fewbench status`` works on plain rows and formats its table itself: pandas takes
# longer to import than the whole command takes without it. cell_table and summary
# keep their DataFrame interface for the executors.


def cell_rows(run_dir: Path) -> list[dict[str, Any]]:
    """One row per stored cell, with what its cell folder says where that is newer."""
    store = ResultsStore.open_run(run_dir, must_exist=True, readonly=True)
    views = journal_states(run_dir)
    try:
        with damage_reported(store.path):
            stale_after = recorded_stale_after(store)
            return [
                _row(store, cell, views.get(cell["id"]), time.time(), stale_after)
                for cell in store.cells()
            ]
    finally:
        store.close()


def recorded_stale_after(store: ResultsStore) -> float:
    """The seconds of silence after which the run's workers take a running cell over: what
    the last worker recorded (its ``--stale-after``), else the default."""
    try:
        value = float(json.loads(store.meta(STALE_AFTER_META) or "null") or DEFAULT_STALE_AFTER)
    except (TypeError, ValueError):  # written by hand, or by something else
        return DEFAULT_STALE_AFTER
    return value if math.isfinite(value) and value > 0 else DEFAULT_STALE_AFTER


def last_seen(seen: float, now: float) -> str:
    """``last seen 14:03:07 (25 min ago)``: the time, with the date when not today."""
    moment = time.localtime(seen)
    shown = time.strftime(
        "%H:%M:%S" if moment[:3] == time.localtime(now)[:3] else "%Y-%m-%d %H:%M", moment
    )
    ago = max(0.0, now - seen)
    if ago < 60:
        words = f"{ago:.0f} s"
    elif ago < 120 * 60:
        words = f"{ago / 60:.0f} min"
    elif ago < 48 * 3600:
        words = f"{ago / 3600:.0f} h"
    else:
        words = f"{ago / 86400:.0f} days"
    return f"last seen {shown} ({words} ago)"


def cell_table(run_dir: Path) -> pd.DataFrame:
    """:func:`cell_rows` as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(cell_rows(run_dir))


def _row(
    store: ResultsStore,
    cell: sqlite3.Row,
    view: dict | None,
    now: float,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> dict:
    latest = store.db.execute(
        "SELECT iteration, val_metric FROM curve WHERE cell_id = ? AND val_metric IS NOT NULL"
        " ORDER BY iteration DESC LIMIT 1",
        (cell["id"],),
    ).fetchone()
    if cell["status"] == "done":
        elapsed = (cell["train_seconds"] or 0) + (cell["eval_seconds"] or 0)
    elif cell["status"] == "running" and cell["updated_at"]:
        elapsed = now - cell["updated_at"]
    else:
        elapsed = None
    row = {
        "id": cell["id"],
        "cell": cell["label"],
        "status": cell["status"],
        "worker": cell["worker"] or "",
        "elapsed_s": elapsed,
        "latest_val": None if latest is None else latest["val_metric"],
        "at_iteration": None if latest is None else latest["iteration"],
        "metric": cell["metric"],
        "mean": cell["mean"],
        "note": "",
        # How the number was measured (fewbench.running.protocol), once the cell is done.
        "protocol": store.protocol(cell["id"]) if cell["status"] == "done" else None,
    }
    if cell["status"] == "running":
        # Its worker's last sign of life: the heartbeat, or a change of state (claimed, started).
        seen = max(cell["heartbeat"] or 0.0, cell["updated_at"] or 0.0)
        if seen and now - seen > stale_after:
            row.update(
                status="stale",
                elapsed_s=max(0.0, seen - (cell["updated_at"] or seen)),
                note=last_seen(seen, now),
            )
    if cell["status"] != "done" and view is not None:
        _overlay(row, view, cell["updated_at"] or 0.0, now, stale_after)
    return row


def _overlay(
    row: dict,
    view: dict,
    store_updated: float,
    now: float,
    stale_after: float = DEFAULT_STALE_AFTER,
) -> None:
    """Update ``row`` with what a cluster worker wrote in the cell's folder, where newer;
    a file there that cannot be used is named in the note instead."""
    result, state, curve = view["result"], view["state"] or {}, view["curve"]
    notes = []
    if result is not None:
        row.update(
            status="done",
            worker=result["worker"] or "",
            elapsed_s=result["train_seconds"] + result["eval_seconds"],
            metric=result["metric"],
            mean=result["mean"],
            protocol=result.get("protocol"),
        )
        notes.append("not yet collected")
        curve = result["curve"]
    elif state and state["updated_at"] > store_updated:
        row.update(status=state["status"], worker=state.get("worker") or "")
        row["metric"] = row["metric"] or state.get("metric")
        notes += _state_notes(row, state, now, stale_after)
    notes += [f"unreadable {name}" for name in view["errors"]]
    if notes:
        row["note"] = ", ".join(notes)
    if curve:
        validated = [point for point in curve if point[2] is not None]
        if validated and (row["at_iteration"] is None or validated[-1][0] > row["at_iteration"]):
            row["at_iteration"], row["latest_val"] = validated[-1][0], validated[-1][2]


def _state_notes(
    row: dict, state: dict, now: float, stale_after: float = DEFAULT_STALE_AFTER
) -> list[str]:
    """What a running or stopped cell's state.json adds: attempts, resumption, heartbeat
    (a running cell whose task stopped beating is stale, as in the store)."""
    notes = []
    if state.get("attempts", 1) > 1:
        notes.append(f"attempt {state['attempts']}")
    if state.get("resumed_from"):
        notes.append(f"resumed at iteration {state['resumed_from']}")
    if state.get("note"):  # what the executor's task says of itself: its job, its node
        notes.append(str(state["note"]))
    if state["status"] == "running":
        started = state.get("started", state["updated_at"])
        seen = state.get("heartbeat", started)
        row["elapsed_s"] = now - started
        if now - seen > stale_after:
            row.update(status="stale", elapsed_s=max(0.0, seen - started))
            notes.append(last_seen(seen, now))
    return notes


def summary(table: pd.DataFrame | list[dict[str, Any]], workers: int | None = None) -> str:
    """One line: counts per state and, once something is done, an estimate of the time left.

    ``table`` is :func:`cell_table`'s DataFrame or :func:`cell_rows`' rows."""
    rows = table if isinstance(table, list) else table.to_dict("records")
    counts = Counter(row["status"] for row in rows)
    parts = [f"{counts[s]} {s}" for s in STATES if counts[s] or s not in OPTIONAL_STATES]
    done = [row for row in rows if row["status"] == "done"]
    left = len(rows) - len(done) - counts["failed"]
    if done and left:
        elapsed = [row["elapsed_s"] for row in done if not _missing(row["elapsed_s"])]
        per_cell = sum(elapsed) / len(elapsed) if elapsed else math.nan  # as pandas' mean
        parallel = workers or max(1, counts["running"])
        parts.append(f"about {per_cell * left / parallel / 60:.0f} min left")
    return ", ".join(parts)


def render_status(run_dir: Path, protocol: bool = False) -> str:
    """The table of cells and the summary line; a finished cell's setting (inductive or
    transductive, from its protocol card) in a column, and with ``protocol`` each card in full
    after the table."""
    from fewbench.reports import protocol as cards

    rows = cell_rows(run_dir)
    if not rows:
        return "no cells in this run\n"
    # Labels and worker names come from files: escape control characters (terminal escapes).
    shown = {
        "cell": [one_line(row["cell"]) for row in rows],
        "status": [row["status"] for row in rows],
        "worker": [one_line(row["worker"]) for row in rows],
        "note": [one_line(row["note"]) for row in rows],
        "elapsed": [_duration(row["elapsed_s"]) for row in rows],
        "latest validation": [
            ""
            if _missing(row["latest_val"])
            else f"{_value(row['latest_val'], row['metric'])} (it {int(row['at_iteration'])})"
            for row in rows
        ],
    }
    if not any(row["note"] for row in rows):
        del shown["note"]
    if any(row.get("protocol") for row in rows):
        shown["protocol"] = [
            cards.kind(row["protocol"]) if row["status"] == "done" else "" for row in rows
        ]
    text = text_table(shown) + "\n\n" + summary(rows) + "\n"
    uncollected = sum(row["note"].startswith("not yet collected") for row in rows)
    if uncollected:
        text += (
            f"{uncollected} finished cells are not yet in the results store (reports read it): "
            f"fewbench collect {run_dir}\n"
        )
    if protocol:
        text += "\nProtocol cards:\n"
        for row in rows:
            if row["status"] == "done":
                lines = cards.card_lines(row.get("protocol"))
                text += f"\n{one_line(row['cell'])}:\n" + "".join(f"  {x}\n" for x in lines)
    return text


def text_table(columns: dict[str, list[Any]]) -> str:
    """The columns as ``pandas.DataFrame(columns).to_string(index=False)`` prints text
    columns: each right-justified to its widest entry or header, one space between, tabs
    and line breaks written as escapes."""

    def shown(value: Any) -> str:
        return str(value).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")

    cells = [[shown(name), *map(shown, values)] for name, values in columns.items()]
    widths = [max(map(len, column)) for column in cells]
    return "\n".join(
        " ".join(text.rjust(width) for text, width in zip(line, widths, strict=True))
        for line in zip(*cells, strict=True)
    )


def _missing(value: Any) -> bool:
    """None, or the NaN a DataFrame makes of it."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _duration(seconds: float | None) -> str:
    if _missing(seconds):
        return ""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _value(value: float, metric: str | None) -> str:
    return by_metric(metric).format(value)
