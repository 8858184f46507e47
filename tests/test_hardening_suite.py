"""Hostile suites, flags and run directories: one line, exit 2, bounded work, nothing
left behind, no code run."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import signal
import sqlite3
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers import REPO, registry_built_once, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fewbench.cli.parser import main

SINUSOID = (REPO / "suites" / "sinusoid.yaml").read_text()
TINY = """\
name: tiny
datasets: [sinusoid]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [8]}]
learners: [{name: finetune, batch_size: 20}]
train: {iterations: 4, validate_every: 2, val_episodes: 2, checkpoint_every: 2}
eval: {episodes: 3, query: 5}
"""


@pytest.fixture(scope="module", autouse=True)
def one_registry():
    with registry_built_once():
        yield


class TooSlow(Exception):
    pass


def bounded_main(argv: list[str], seconds: float = 20, megabytes: float = 300) -> tuple[int, str]:
    """``fewbench ARGV`` in this process, failing the test past ``seconds`` of wall time or
    ``megabytes`` of Python allocations; returns the exit code and standard error."""

    def alarm(signum, frame):
        raise TooSlow(f"fewbench {' '.join(argv)[:200]} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    err, out = io.StringIO(), io.StringIO()
    tracemalloc.start()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert peak < megabytes * 2**20, f"{peak / 2**20:.0f} MB for fewbench {argv}"
    return code, err.getvalue()


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fewbench: error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def dry_run(tmp_path: Path, text: str, *extra: str) -> tuple[int, str]:
    suite = tmp_path / "suite.yaml"
    suite.write_text(text, encoding="utf-8")
    return bounded_main(["run", str(suite), "--dry-run", "--data-root", str(tmp_path), *extra])


@pytest.mark.parametrize(
    "sets",
    [
        ["iterations=20"],
        ["trian.iterations=20"],
        ["...=1"],
        [".=1"],
        ["train.iterations=" + "9" * 5000],
    ],
)
def test_a_mistyped_set_ends_at_once_in_one_line(tmp_path, sets):
    code, stderr = dry_run(tmp_path, SINUSOID, *[f"--set={s}" for s in sets])
    assert_one_line_error(code, stderr)


@pytest.mark.parametrize(
    ("key", "kind"), [("on", "bool"), ("yes", "bool"), ("null", "null"), ("0x10", "int")]
)
def test_keys_yaml_reads_as_booleans_nulls_or_numbers_are_refused(tmp_path, key, kind):
    code, stderr = dry_run(tmp_path, f"{key}: 1\n" + SINUSOID)
    assert_one_line_error(code, stderr, f"key '{key}'", f"({kind})", "quote it", ":1")


def billion_laughs(levels: int) -> str:
    text = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels + 1):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text + SINUSOID


@pytest.mark.parametrize("levels", [8, 9])
def test_nested_aliases_are_refused_with_bounded_work(tmp_path, levels):
    text = billion_laughs(levels)
    assert len(text.replace(SINUSOID, "").encode()) < 1000  # a few hundred bytes of aliases
    code, stderr = dry_run(tmp_path, text)
    assert_one_line_error(code, stderr, "expands to more than 100,000 values")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("loop: &a [1, *a]\n" + SINUSOID, "recursive alias"),
        ("deep: " + "[" * 2000 + "]" * 2000 + "\n" + SINUSOID, "nested more than 50"),
        ("deep: " + "[" * 60 + "]" * 60 + "\n" + SINUSOID, "nested more than 50"),
        (SINUSOID.replace("name: sinusoid", "name: sin\x07usoid"), "unacceptable character"),
        (SINUSOID.replace("seeds: [0]", "seeds: [" + "9" * 5000 + "]"), "digits"),
        (SINUSOID.replace("seeds: [0]", "seeds: [100000000000000000000]"), "at most"),
        (SINUSOID + "name: again\n", "appears twice"),
        (SINUSOID.replace("name: sinusoid", "name: ' ..'"), "folder-safe"),
        (SINUSOID.replace("name: sinusoid", 'name: "a\\0b"'), "folder-safe"),
        (SINUSOID.replace("name: sinusoid", "name: " + "n" * 300), "folder-safe"),
        (SINUSOID.replace("name: sinusoid", 'name: "\\e[31mred"'), "folder-safe"),
        (
            SINUSOID + "overrides:\n  - when: {shots: 10}\n    set: {tasks.ways: [5]}\n",
            "one positive integer",
        ),
    ],
)
def test_hostile_suites_give_one_line(tmp_path, text, fragment):
    code, stderr = dry_run(tmp_path, text)
    assert_one_line_error(code, stderr, fragment)


def test_an_override_that_matches_no_cell_is_a_warning(tmp_path):
    text = SINUSOID + "overrides:\n  - when: {shots: 7}\n    set: {train.iterations: 5}\n"
    code, stderr = dry_run(tmp_path, text)
    assert code == 0, stderr
    assert "overrides[0]: its 'when' matches no cell" in stderr and ":21:" in stderr


def test_the_name_never_escapes_the_results_folder(tmp_path):
    code, stderr = bounded_main(
        ["run", str(REPO / "suites" / "sinusoid.yaml"), "--set", "name= ..", "--dry-run"]
    )
    assert_one_line_error(code, stderr, "folder-safe")


@pytest.mark.parametrize("kind", ["file", "devnull", "dangling", "loop"])
def test_out_must_be_a_directory_or_nothing(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("x")
    elif kind == "devnull":
        out = Path("/dev/null")
    elif kind == "dangling":
        out.symlink_to(tmp_path / "nowhere")
    else:
        out.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(out)
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY)
    code, stderr = bounded_main(["run", str(suite), "--out", str(out), "--no-progress"])
    assert_one_line_error(code, stderr, f"--out {out}")
    expected = {
        "s.yaml",
        *([] if kind == "devnull" else ["out"]),
        *(["other"] if kind == "loop" else []),
    }
    assert {p.name for p in tmp_path.iterdir()} == expected  # nothing written


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--threads", "-1"], "--threads -1: must be at least 1"),
        (["--stale-after", "0"], "--stale-after 0.0: must be at least 1"),
        (["--device", "meta"], "--device 'meta'"),
        (["--device", "mps"], "MPS"),
        (["--workers", "x"], "--workers 'x'"),
    ],
)
def test_impossible_flags_are_refused_before_anything_is_written(tmp_path, flags, fragment):
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY)
    code, stderr = bounded_main(["run", str(suite), "--out", str(tmp_path / "run"), *flags])
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "run").exists()


def test_slurm_here_without_a_gpu_is_refused_when_cells_ask_for_one(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    pytest.importorskip("submitit")
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY)
    code, stderr = bounded_main(
        ["run", str(suite), "--out", str(tmp_path / "run"), "--executor", "slurm",
         "--executor-set", "cluster=local"]
    )  # fmt: skip
    assert_one_line_error(code, stderr, "add --gpus-per-cell 0")
    assert not (tmp_path / "run").exists()


class CreatesFile:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_crafted_checkpoint_runs_no_code_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBENCH_CACHE", str(tmp_path / "cache"))
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY)
    out = tmp_path / "run"
    code, stderr = bounded_main(["run", str(suite), "--out", str(out), "--no-progress"], 120)
    assert code == 0, stderr
    db = sqlite3.connect(out / "results.sqlite")
    (cell_id,) = db.execute("SELECT id FROM cells").fetchone()
    db.execute("UPDATE cells SET status = 'pending'")
    db.commit()
    db.close()
    marker = tmp_path / "pwned"
    with open(out / "checkpoints" / cell_id / "last.pt", "wb") as f:
        pickle.dump({"learner": CreatesFile(marker)}, f)
    code, stderr = bounded_main(["run", str(out), "--no-progress"], 120)
    assert code == 0, stderr
    assert not marker.exists()  # refused by weights_only; training started over


def test_a_cut_suite_yaml_falls_back_to_the_stored_suite(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBENCH_CACHE", str(tmp_path / "cache"))
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY)
    out = tmp_path / "run"
    assert bounded_main(["run", str(suite), "--out", str(out), "--no-progress"], 120)[0] == 0
    (out / "suite.yaml").write_text("name: tiny\ndatasets: [sinu")  # a write cut short
    code, stderr = bounded_main(["run", str(out), "--no-progress"], 120)
    assert code == 0, stderr
    assert "using the suite kept in" in stderr and "done in an earlier run, skipped" in stderr
    assert (out / "suite.yaml").read_text().startswith("name: tiny\n")


def test_a_full_disk_is_named_with_its_folder(tmp_path, monkeypatch):
    """torch.save on a full disk says '[enforce fail at inline_container.cc] unexpected pos';
    fewbench says the disk is full, and where."""
    from fewbench.data.cache import save_atomically
    from fewbench.errors import DiskFull
    from fewbench.storage import atomic

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(DiskFull, match=f"no space left on the device holding {tmp_path}"):
        save_atomically({"x": 1}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_a_plugin_that_fails_is_named(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_plugin.py").write_text("raise ImportError('missing dependency zzz')\n")
    (site / "hooky_plugin.py").write_text(
        "from fewbench.plugin.hookspecs import hookimpl\n"
        "class Listy:\n    name = 'listy'\n    params = ['a']\n"
        "@hookimpl\ndef fewbench_register_learners(register):\n    register(Listy)\n"
    )
    for name in ("broken", "hooky"):
        info = site / f"{name}_plugin-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[fewbench]\n{name} = {name}_plugin\n")
    result = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert_one_line_error(result.returncode, result.stderr, "plugin 'broken'", "zzz")
    os.remove(site / "broken_plugin.py")
    (site / "broken_plugin-0.1.dist-info" / "entry_points.txt").write_text("[fewbench]\n")
    result = run_cli("plugins", env={"PYTHONPATH": str(site)})
    assert_one_line_error(result.returncode, result.stderr, "learner 'listy' declares params")


# --- fuzzing: every case ends in one line with exit 2, or in a valid suite -----------------

SCALARS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.just("9" * 5000),
    st.sampled_from(["on", "yes", "null", "~", "0x10", "1e400", ".inf", "[", "]", "{", "&a", "*a",
                     "*b", "!!python/object:os.system", "\x07", "\x00", "'", '"', ": ", "- "]),
    st.text(max_size=8),
)  # fmt: skip


def yaml_fragment(depth: int = 3) -> st.SearchStrategy[str]:
    scalar = SCALARS.map(str)
    if depth == 0:
        return scalar
    inner = yaml_fragment(depth - 1)
    return st.one_of(
        scalar,
        st.lists(inner, max_size=4).map(lambda items: "[" + ", ".join(items) + "]"),
        st.lists(st.tuples(scalar, inner), max_size=4).map(
            lambda pairs: "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
        ),
        inner.map(lambda v: f"&a {v}"),
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    sections=st.lists(st.tuples(SCALARS.map(str), yaml_fragment()), min_size=0, max_size=4),
    keep_valid=st.booleans(),
)
def test_fuzzed_yaml_ends_in_one_line_or_a_valid_suite(sections, keep_valid):
    import tempfile

    extra = "".join(f"{key}: {value}\n" for key, value in sections)
    text = (SINUSOID + extra) if keep_valid else extra
    with tempfile.TemporaryDirectory() as folder:
        code, stderr = dry_run(Path(folder), text)
    if code != 0:
        assert_one_line_error(code, stderr)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.text(max_size=30), value=st.one_of(yaml_fragment(), st.text(max_size=30)))
def test_fuzzed_set_ends_in_one_line_or_a_valid_suite(key, value):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        code, stderr = dry_run(Path(folder), SINUSOID, f"--set={key}={value}")
    if code != 0:
        assert_one_line_error(code, stderr)


@pytest.mark.parametrize("kind", ["under a file", "read-only file system"])
def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path, kind):
    """A read-only --cache-dir failed every cell, one by one; now the run stops before any."""
    suite = tmp_path / "s.yaml"
    suite.write_text(TINY)
    (tmp_path / "file").write_text("x")
    cache = tmp_path / "file" / "cache" if kind == "under a file" else Path("/proc/fewbench-cache")
    out = tmp_path / "run"
    code, stderr = bounded_main(["run", str(suite), "--out", str(out), "--cache-dir", str(cache)])
    assert_one_line_error(code, stderr, f"--cache-dir {cache}: cannot write")
    assert not out.exists()


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["backbones=[{name: conv4, pool: stride, pool_blocks: 2}]"], "backbones: backbone conv4"),
        (["datasets=[{name: omniglot, split: vinyals, episodes: within_alphabet}]"], "datasets:"),
        (
            ["eval.dataset={name: omniglot, split: finn, episodes: within_alphabet}"],
            "eval.dataset:",
        ),
    ],
)
def test_a_plugin_setting_its_plugin_refuses_stops_the_suite_in_one_line(tmp_path, sets, fragment):
    """A plugin's check() (settings its parameters' bounds cannot refuse alone) was never
    asked for cells: conv4's pool_blocks without max-pooling trained a backbone it refuses."""
    text = TINY.replace("datasets: [sinusoid]", "datasets: [{name: omniglot}]").replace(
        "tasks: {ways: 1, shots: 5, query: 5}", "tasks: {ways: 5, shots: 1, query: 1}"
    )
    code, stderr = dry_run(tmp_path, text, *[f"--set={s}" for s in sets])
    assert_one_line_error(code, stderr, fragment, "needs")
