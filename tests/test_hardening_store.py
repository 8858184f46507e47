"""Damaged or hostile run directories: one clear line, exit 2, and nothing computed lost.

A damaged results store, a run directory nobody may write, bad report options and
outputs, and cell folders whose result.json a cluster task left unusable.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import run_cli
from stored import make_cell, store_run

from fewbench.errors import FewbenchError
from fewbench.reports.status import cell_table
from fewbench.storage.journal import CELLS_DIR, checked_result
from fewbench.storage.sink import CellResult
from fewbench.storage.store import DB_NAME, ResultsStore

REPO = Path(__file__).resolve().parent.parent
CELLS = [
    (make_cell("maml"), [0.8, 0.9, 1.0, 0.9, 0.9]),
    (make_cell("finetune"), [0.6, 0.7, 0.8, 0.7, 0.7]),
]
DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "random bytes": lambda data: os.urandom(len(data)),
    "bad header": lambda data: b"not an SQLite file" + data[18:],
    "empty": lambda data: b"",
}


def one_line_error(result, *fragments: str) -> None:
    """What the CLI promises for bad input: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewbench: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def damaged_run(tmp_path: Path, damage: str) -> Path:
    """A run directory (suite.yaml, results.sqlite) whose store is then damaged."""
    run_dir = store_run(tmp_path / "run", CELLS)
    shutil.copy(REPO / "suites" / "sinusoid.yaml", run_dir / "suite.yaml")
    store = run_dir / DB_NAME
    store.write_bytes(DAMAGE[damage](store.read_bytes()))
    return run_dir


# 1. A damaged results.sqlite


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_report_on_a_damaged_store_is_one_line(tmp_path, damage):
    run_dir = damaged_run(tmp_path, damage)
    before = (run_dir / DB_NAME).read_bytes()
    one_line_error(
        run_cli("report", str(run_dir)),
        f"{run_dir / DB_NAME} is damaged",
        f"{run_dir}/checkpoints",
        f"{run_dir}/cells/*/result.json",
    )
    assert (run_dir / DB_NAME).read_bytes() == before  # nothing overwritten


@pytest.mark.parametrize(
    "command",
    [("status",), ("collect",), ("compare", "--baseline", "maml"), ("plot", "--out", "figures")],
)
def test_every_reader_refuses_a_damaged_store(tmp_path, command):
    run_dir = damaged_run(tmp_path, "random bytes")
    before = (run_dir / DB_NAME).read_bytes()
    result = run_cli(command[0], str(run_dir), *command[1:], cwd=tmp_path)
    one_line_error(result, "is damaged (file is not a database)")
    assert (run_dir / DB_NAME).read_bytes() == before


def test_status_refuses_an_empty_store(tmp_path):
    one_line_error(run_cli("status", str(damaged_run(tmp_path, "empty"))), "the file is empty")


@pytest.mark.parametrize("damage", ["random bytes", "empty"])
def test_run_does_not_retrain_over_a_damaged_store(tmp_path, damage):
    """An empty store in a run directory is not a new one: run would train every cell again."""
    run_dir = damaged_run(tmp_path, damage)
    before = (run_dir / DB_NAME).read_bytes()
    result = run_cli("run", str(run_dir), "--no-progress", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fewbench: error: ")
    assert f"{run_dir / DB_NAME} is damaged" in result.stderr
    assert (run_dir / DB_NAME).read_bytes() == before
    assert not (run_dir / "checkpoints").exists()


def test_damage_past_the_first_pages_is_found_while_reading(tmp_path):
    episodes = [0.5 + 0.0001 * i for i in range(3000)]
    run_dir = store_run(tmp_path / "run", [(make_cell("maml", s), episodes) for s in range(4)])
    data = bytearray((run_dir / DB_NAME).read_bytes())
    middle = len(data) // 2 // 4096 * 4096  # one page of episodes, headers and schema intact
    data[middle : middle + 4096] = b"\xff" * 4096
    (run_dir / DB_NAME).write_bytes(bytes(data))
    one_line_error(run_cli("report", str(run_dir)), "is damaged (database disk image is malformed)")


def test_a_new_run_directory_still_gets_a_new_store(tmp_path):
    """``run SUITE --out NEW`` writes suite.yaml, then opens a store that is not there yet."""
    (tmp_path / "suite.yaml").write_text("name: toy\n")
    store = ResultsStore.open_run(tmp_path)
    try:
        store.add_cells([CELLS[0][0]])
        assert [row["id"] for row in store.cells()] == [CELLS[0][0].id]
    finally:
        store.close()


def test_a_readonly_store_must_exist(tmp_path):
    with pytest.raises(FewbenchError, match="no results.sqlite here"):
        ResultsStore.open_run(tmp_path, readonly=True)
    assert not (tmp_path / DB_NAME).exists()


# 2. Readers never write the store


def store_files(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.iterdir())}


def test_readers_leave_the_store_as_it_was(tmp_path):
    run_dir = store_run(tmp_path / "run", CELLS)
    before = store_files(run_dir)
    for command in (("report",), ("status",), ("compare", "--baseline", "maml")):
        result = run_cli(command[0], str(run_dir), *command[1:])
        assert result.returncode == 0, result.stderr
        assert store_files(run_dir) == before  # same bytes and times, no -wal or -shm left


def test_status_reads_a_store_that_a_worker_is_writing(tmp_path):
    run_dir = store_run(tmp_path / "run", [*CELLS, (make_cell("fomaml"), "pending")])
    writer = ResultsStore.open_run(run_dir, must_exist=True)
    try:
        writer.mark(make_cell("fomaml").id, "running")
        table = cell_table(run_dir)
        assert list(table["status"]) == ["done", "done", "running"]
    finally:
        writer.close()


@pytest.fixture
def readonly_run() -> Iterator[Path]:
    """A run directory that nobody but root may write, in a folder anyone may enter."""
    base = Path(tempfile.mkdtemp(prefix="fewbench-readonly-"))
    base.chmod(0o755)
    if any(not folder.stat().st_mode & stat.S_IXOTH for folder in base.parents):
        shutil.rmtree(base)
        pytest.skip(f"{base.parent}: other users cannot enter the temporary folder")
    run_dir = store_run(base / "run", CELLS)
    for path in run_dir.iterdir():
        path.chmod(0o444)
    run_dir.chmod(0o555)
    try:
        yield run_dir
    finally:
        run_dir.chmod(0o755)
        shutil.rmtree(base)


def run_unprivileged(*args: str) -> tuple[int, str, str]:
    """The CLI as a user who may not write a 0o555 folder. Root ignores permission bits,
    so as root a forked child drops to ``nobody`` and runs the CLI in-process (it cannot
    start the interpreter, which lives under /root)."""
    if os.geteuid() != 0:
        result = run_cli(*args)
        return result.returncode, result.stdout, result.stderr
    from fewbench.cli.parser import main

    main(list(args))  # first as root: imports what the command imports lazily
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            _main_as_nobody(list(args), out.fileno(), err.fileno())
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


def _main_as_nobody(args: list[str], out: int, err: int) -> None:
    """In a forked child: drop root, run the CLI writing to ``out`` and ``err``, exit."""
    from fewbench.cli.parser import main

    code = 99
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        os.setgid(65534)
        os.setuid(65534)
        code = main(args)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def test_report_and_status_of_a_readonly_run_directory(readonly_run):
    before = store_files(readonly_run)
    code, stdout, stderr = run_unprivileged("report", str(readonly_run))
    assert code == 0, stderr
    # Names, or the plugin ids when this user cannot read the plugins' source (a checkout
    # only its owner reads): either way the report of a run nobody may write is printed.
    assert ("MAML" in stdout or "maml" in stdout) and "Traceback" not in stderr
    code, stdout, stderr = run_unprivileged("status", str(readonly_run))
    assert code == 0, stderr
    assert "2 done" in stdout
    assert store_files(readonly_run) == before
    assert stat.S_IMODE(readonly_run.stat().st_mode) == 0o555


# 3. Report options and outputs


@pytest.mark.parametrize("decimals", ["-5", "11"])
def test_report_refuses_decimals_out_of_range(tmp_path, decimals):
    run_dir = store_run(tmp_path / "run", CELLS)
    one_line_error(
        run_cli("report", str(run_dir), "--decimals", decimals), f"--decimals {decimals}"
    )


def test_compare_refuses_negative_decimals(tmp_path):
    run_dir = store_run(tmp_path / "run", CELLS)
    result = run_cli("compare", str(run_dir), "--baseline", "maml", "--decimals", "-1")
    one_line_error(result, "--decimals -1")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_report_to_a_full_disk_is_one_line(tmp_path):
    run_dir = store_run(tmp_path / "run", CELLS)
    result = run_cli("report", str(run_dir), "--out", "/dev/full")
    one_line_error(result, "cannot write /dev/full: No space left on device")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
@pytest.mark.parametrize("command", ["report", "status"])
def test_standard_output_on_a_full_disk_is_one_line(tmp_path, command):
    run_dir = store_run(tmp_path / "run", CELLS)
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "fewbench", command, str(run_dir)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    one_line_error(result, "cannot write the standard output: No space left on device")


def test_plot_refuses_a_file_for_its_folder(tmp_path):
    run_dir = store_run(tmp_path / "run", CELLS)
    existing = tmp_path / "figures.png"
    existing.write_bytes(b"a figure the user keeps")
    result = run_cli("plot", str(run_dir), "--out", str(existing))
    one_line_error(result, f"--out {existing}: is a file; plot writes a folder of figures")
    assert existing.read_bytes() == b"a figure the user keeps"


def test_report_into_a_missing_folder(tmp_path):
    run_dir = store_run(tmp_path / "run", CELLS)
    out = tmp_path / "new" / "deeper" / "table.md"
    result = run_cli("report", str(run_dir), "--format", "markdown", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| MAML |" in out.read_text(encoding="utf-8")


def test_html_report_of_a_run_whose_name_is_not_utf8(tmp_path):
    run_dir = store_run(tmp_path / os.fsdecode(b"run-\xff\xfe"), CELLS)
    out = tmp_path / "report.html"
    result = run_cli("report", str(run_dir), "--format", "html", "--out", str(out))
    assert result.returncode == 0, result.stderr
    page = out.read_text(encoding="utf-8")
    assert "run-\\xff\\xfe" in page and "<td" in page


# 4. Unusable result.json in cell folders


def result_payload() -> dict:
    result = CellResult("accuracy", [0.9, 0.8], 0.85, 0.1, [(1, 1.0, 0.5)], 1, 1, 0.5, "e", 1, 1)
    return {**result.to_json(), "worker": "node1:42", "attempts": 1, "finished": 1.0}


MALFORMED = {
    "not JSON": "{'metric': 'accuracy',",
    "missing keys": json.dumps({k: v for k, v in result_payload().items() if k != "values"}),
    "wrong types": json.dumps({**result_payload(), "mean": "high", "values": ["a", "b"]}),
    "not an object": json.dumps([1, 2, 3]),
    "bad curve": json.dumps({**result_payload(), "curve": [[1, "x"]]}),
}


def cluster_run(tmp_path: Path, malformed: str) -> tuple[Path, Path]:
    """Two queued cells; one cell folder holds a good result.json, the other a bad one."""
    good, bad = make_cell("maml"), make_cell("finetune")
    run_dir = store_run(tmp_path / "run", [(good, "pending"), (bad, "pending")])
    for cell, text in ((good, json.dumps(result_payload())), (bad, MALFORMED[malformed])):
        folder = run_dir / CELLS_DIR / cell.id
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(text)
    return run_dir, run_dir / CELLS_DIR / bad.id / "result.json"


def statuses(run_dir: Path) -> dict[str, str]:
    store = ResultsStore.open_run(run_dir, readonly=True)
    try:
        return {row["learner"]: row["status"] for row in store.cells()}
    finally:
        store.close()


@pytest.mark.parametrize("malformed", list(MALFORMED))
def test_collect_skips_an_unusable_result_with_a_warning(tmp_path, malformed):
    run_dir, bad = cluster_run(tmp_path, malformed)
    result = run_cli("collect", str(run_dir))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"fewbench: warning: {bad}: ")
    assert "collected 1 finished" in result.stdout
    assert statuses(run_dir) == {"maml": "done", "finetune": "pending"}
    assert bad.read_text() == MALFORMED[malformed]  # left for the user to look at


@pytest.mark.parametrize("malformed", ["not JSON", "wrong types"])
def test_status_notes_an_unusable_result(tmp_path, malformed):
    run_dir, _ = cluster_run(tmp_path, malformed)
    result = run_cli("status", str(run_dir))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert any("finetune" in line and "unreadable result.json" in line for line in lines)
    assert any("maml" in line and "not yet collected" in line for line in lines)


def test_status_notes_an_unusable_state(tmp_path):
    run_dir, _ = cluster_run(tmp_path, "not JSON")
    folder = run_dir / CELLS_DIR / make_cell("finetune").id
    (folder / "result.json").unlink()
    (folder / "state.json").write_text(json.dumps({"status": "running", "updated_at": "soon"}))
    table = cell_table(run_dir)
    assert list(table["note"]) == ["not yet collected", "unreadable state.json"]


@pytest.mark.parametrize("malformed", [name for name in MALFORMED if name != "not JSON"])
def test_checked_result_refuses_a_malformed_result(malformed):
    with pytest.raises((KeyError, TypeError, ValueError)):
        checked_result(json.loads(MALFORMED[malformed]))


def test_checked_result_accepts_what_a_task_writes():
    assert checked_result(result_payload()).values == [0.9, 0.8]


def test_a_reader_cannot_write(tmp_path):
    """A reader's connection is query-only: a write through it fails."""
    run_dir = store_run(tmp_path / "run", CELLS)
    store = ResultsStore.open_run(run_dir, readonly=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.db.execute("DELETE FROM cells")
    finally:
        store.close()
    assert len(statuses(run_dir)) == 2


def test_a_full_disk_while_storing_is_one_line_naming_the_store(tmp_path):
    """SQLite's 'database or disk is full' becomes DiskFull naming the store; nothing stored
    before is lost (the limit on pages stands in for a full disk)."""
    from fewbench.errors import DiskFull
    from fewbench.storage.store import ResultsStore

    store = ResultsStore.open_run(tmp_path)
    store.set_meta("kept", "yes")
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(DiskFull, match=f"no space left for {tmp_path / 'results.sqlite'}"):
        store.set_meta("big", "x" * 100_000)
    assert store.meta("kept") == "yes" and store.meta("big") is None
    store.close()


# -- stores edited by hand: text where numbers belong, settings that are not JSON, a garbage
# tune record (22 tracebacks across report, plot, compare and the API)

EDITS = {
    "text episode value": "UPDATE episodes SET value = 'abc' WHERE episode = 2",
    "text curve point": "UPDATE curve SET loss = x'00ff'",
    "settings not JSON": "UPDATE cells SET config = '{broken' WHERE learner = 'finetune'",
    "settings not a mapping": "UPDATE cells SET config = '[1, 2]' WHERE learner = 'finetune'",
    "garbage tune record": "INSERT OR REPLACE INTO meta (key, value) VALUES ('tune', '{\"best\": 5}')",
    "tune record not JSON": "INSERT OR REPLACE INTO meta (key, value) VALUES ('tune', 'nope')",
}
READERS = [
    ["report"], ["report", "--format", "json"], ["report", "--format", "html"],
    ["compare", "--baseline", "maml"], ["status"], ["plot", "--out", "{tmp}/plots"],
]  # fmt: skip


def edited_run(tmp_path: Path, edit: str) -> Path:
    curves = {make_cell(name).id: [(1, 1.0, 0.5), (2, 0.5, 0.6)] for name in ("maml", "finetune")}
    run_dir = store_run(tmp_path / "run", CELLS, curves=curves)
    db = sqlite3.connect(run_dir / DB_NAME)
    with db:
        db.execute(EDITS[edit])
    db.close()
    return run_dir


@pytest.mark.parametrize("edit", list(EDITS))
def test_reports_read_an_edited_store_with_a_warning_not_a_traceback(tmp_path, edit, capsys):
    from fewbench.cli import main

    run_dir = edited_run(tmp_path, edit)
    for reader in READERS:
        args = [a.replace("{tmp}", str(tmp_path)) for a in reader]
        assert main([args[0], str(run_dir), *args[1:]]) == 0, (edit, reader)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if "tune" not in edit and reader[0] != "status":
            warnings = [line for line in err.splitlines() if "warning" in line]
            assert warnings, (edit, reader)
            for warning in warnings:
                assert warning.startswith(f"fewbench: warning: {run_dir / DB_NAME}: cell "), err
    report = main(["report", str(run_dir)]), capsys.readouterr().out
    if "tune" in edit:
        assert "the search record in" in report[1] and "is unreadable" in report[1]
    if edit == "text episode value":
        assert "unreadable" in report[1]  # the cell is shown, not as done
    if edit.startswith("settings"):
        assert "Baseline" not in report[1] and "MAML" in report[1]


def test_the_api_reads_a_store_whose_settings_are_not_json(tmp_path):
    import fewbench

    run_dir = edited_run(tmp_path, "settings not JSON")
    with pytest.warns(UserWarning, match="stored settings are not valid JSON"):
        results = fewbench.load_results(run_dir)
    configs = dict(zip(results.cells["learner"], results.cells["config"], strict=True))
    assert configs["finetune"] is None and configs["maml"]["learner"]["name"] == "maml"
