"""The quick commands stay quick (issue 17): what they import, not how long they take.

``fewbench --help`` and ``fewbench status`` import none of torch, scipy, pandas and
matplotlib; ``fewbench plugins`` and ``fewbench data list``, when the plugin index is not
current, load the plugins, whose modules define torch classes (``nn.Module`` backbones), so
torch is theirs, and nothing else heavy (with a current index they import no torch either:
tests/test_plugin_index.py). Each command runs in a fresh interpreter, as a user starts it.
The status table, printed without pandas, is the one pandas printed before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from stored import make_cell, store_run

from fewbench.reports import status
from fewbench.storage.journal import CELLS_DIR

HEAVY = ("torch", "scipy", "pandas", "matplotlib")

# Runs the command line's main in this interpreter, then names the heavy modules loaded.
PROBE = f"""\
import sys
from fewbench.cli.parser import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help leaves through argparse
    code = exc.code
print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def heavy_imports(*args: str) -> set[str]:
    """The heavy modules ``fewbench ARGS`` imports, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("HEAVY="), done.stderr
    return {name for name in line.removeprefix("HEAVY=").split(",") if name}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    cells = [
        (make_cell("maml"), [0.8, 0.9, 1.0, 0.9, 0.9]),
        (make_cell("finetune"), "failed"),
        (make_cell("protonet"), "pending"),
    ]
    return store_run(tmp_path / "run", cells)


@pytest.mark.parametrize("args", [["--help"], ["report", "--help"], ["status", "--help"]])
def test_help_imports_nothing_heavy(args):
    assert heavy_imports(*args) == set()


def test_status_imports_nothing_heavy(run_dir):
    assert heavy_imports("status", str(run_dir)) == set()


def test_plugins_and_data_list_import_only_what_the_plugins_do(tmp_path):
    # Plugin modules import torch at the top (their backbones are nn.Modules): only that
    # (or nothing, when the user's plugin index is current).
    assert heavy_imports("plugins") <= {"torch"}
    assert heavy_imports("data", "list", "--data-root", str(tmp_path)) <= {"torch"}
    # run's parser lists the executor plugins' options, so it loads the plugins too
    assert heavy_imports("run", "--help") <= {"torch"}


# The status table without pandas, against what pandas printed before (issue 17).


def pandas_render(rows: list[dict]) -> str:
    """``render_status`` as it was written with pandas, from the same rows."""
    pd = pytest.importorskip("pandas")
    table = pd.DataFrame(rows)
    shown = pd.DataFrame(
        {
            "cell": table["cell"],
            "status": table["status"],
            "worker": table["worker"],
            "note": table["note"],
            "elapsed": [status._duration(v) for v in table["elapsed_s"]],
            "latest validation": [
                "" if v is None or pd.isna(v) else f"{status._value(v, m)} (it {int(i)})"
                for v, i, m in zip(
                    table["latest_val"], table["at_iteration"], table["metric"], strict=True
                )
            ],
        }
    )
    if not table["note"].astype(bool).any():
        shown = shown.drop(columns="note")
    counts = table["status"].value_counts()
    parts = [
        f"{int(counts.get(s, 0))} {s}"
        for s in status.STATES
        if counts.get(s, 0) or s not in status.OPTIONAL_STATES
    ]
    done = table[table["status"] == "done"]
    left = len(table) - len(done) - int(counts.get("failed", 0))
    if len(done) and left:
        per_cell = done["elapsed_s"].mean()
        parallel = max(1, int(counts.get("running", 0)))
        parts.append(f"about {per_cell * left / parallel / 60:.0f} min left")
    text = shown.to_string(index=False) + "\n\n" + ", ".join(parts) + "\n"
    uncollected = int(table["note"].str.startswith("not yet collected").sum())
    if uncollected:
        text += (
            f"{uncollected} finished cells are not yet in the results store (reports read it): "
            f"fewbench collect RUN\n"
        )
    return text


def row(cell: str, state: str, **fields) -> dict:
    base = {
        "id": cell, "cell": cell, "status": state, "worker": "", "elapsed_s": None,
        "latest_val": None, "at_iteration": None, "metric": None, "mean": None, "note": "",
    }  # fmt: skip
    return {**base, **fields}


ROW_SETS = {
    "done and failed": [
        row(
            "toy/5w1s/conv4/maml/seed0",
            "done",
            worker="vm:1",
            elapsed_s=2.0,
            latest_val=0.6,
            at_iteration=2,
            metric="accuracy",
            mean=0.9,
        ),
        row("toy/5w1s/conv4/finetune/seed0", "failed", worker="vm:1"),
    ],
    "running, notes, estimate": [
        row(
            "a/very/long/label/" + "x" * 80,
            "done",
            worker="node1:42",
            elapsed_s=3725,
            latest_val=0.1325,
            at_iteration=1000,
            metric="mse",
            mean=0.1,
        ),
        row(
            "b",
            "running",
            worker="node\t2",
            elapsed_s=61.7,
            latest_val=0.5,
            at_iteration=10,
            metric="accuracy",
            note="attempt 2, no heartbeat for 7 min",
        ),
        row("c", "done", worker="w", elapsed_s=5.5, metric="accuracy", note="not yet collected"),
        row("d", "queued", note="job 17\nnode é"),
        row("e", "pending"),
        row("f", "interrupted", latest_val=0.25, at_iteration=4, metric="accuracy"),
    ],
    "nothing done": [row("only", "pending"), row("other", "running", worker="x:1")],
}


@pytest.mark.parametrize("name", list(ROW_SETS))
def test_status_table_is_the_one_pandas_printed(monkeypatch, name):
    rows = ROW_SETS[name]
    monkeypatch.setattr(status, "cell_rows", lambda run_dir: [dict(r) for r in rows])
    assert status.render_status(Path("RUN")) == pandas_render(rows)


def test_status_of_a_stored_run_is_the_one_pandas_printed(monkeypatch, run_dir):
    folder = run_dir / CELLS_DIR / make_cell("protonet").id
    folder.mkdir(parents=True)
    state = {"status": "running", "updated_at": 4e9, "worker": "n:3", "attempts": 2}
    (folder / "state.json").write_text(json.dumps(state))
    rows = status.cell_rows(run_dir)
    assert [r["status"] for r in rows] == ["done", "failed", "running"]
    monkeypatch.setattr(status, "cell_rows", lambda run_dir: [dict(r) for r in rows])
    assert status.render_status(Path("RUN")) == pandas_render(rows)
    # the executors' DataFrame path gives the same summary line
    table = status.cell_table(run_dir)
    assert status.summary(table) == status.summary(rows)


def test_summary_of_a_dataframe_skips_missing_times_as_pandas_did():
    pd = pytest.importorskip("pandas")
    rows = [row("a", "done", elapsed_s=60.0), row("b", "done"), row("c", "pending")]
    assert status.summary(pd.DataFrame(rows)) == status.summary(rows)
    assert status.summary(rows).endswith("about 1 min left")
    # NaN from a DataFrame counts as missing too
    assert status._missing(float("nan")) and status._missing(None)
