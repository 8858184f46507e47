"""The example plugin package ``examples/fewbench-protonet``, installed and run as a user would.

pip builds and installs it (offline, into a folder of its own: the test environment is left
as it is); fresh ``python -m fewbench`` processes then find it through its installed
``*.dist-info`` entry point, with that folder on ``PYTHONPATH``, exactly as after a
``pip install``.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from test_architecture import PLUGIN_NAMESPACE, SHARED_MATHEMATICS, imported_modules

EXAMPLE = REPO / "examples" / "fewbench-protonet"
PROVIDER = "fewbench-protonet"
ITERATIONS, EPISODES = 20, 20
CHANCE = 1 / 5  # the suite's episodes are 5-way


def fewbench(*args: str, site: Path, home: Path) -> subprocess.CompletedProcess:
    """``python -m fewbench ARGS`` in a fresh process that sees the installed example."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "FEWBENCH_CACHE": str(home / "cache"),
        "FEWBENCH_DATA": str(home / "data"),
    }
    return subprocess.run(
        [sys.executable, "-m", "fewbench", *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("example-package")


@pytest.fixture(scope="module")
def site(home: Path) -> Path:
    """The example installed by pip into its own folder, built from a copy of its sources
    (a build writes build/ and *.egg-info beside them; the checkout stays untouched)."""
    source = home / "source"
    shutil.copytree(
        EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    target = home / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    entry_points = next(target.glob("fewbench_protonet-0.1.0.dist-info")) / "entry_points.txt"
    assert "[fewbench]" in entry_points.read_text()
    return target


def test_the_example_imports_only_the_public_core_modules():
    files = sorted((EXAMPLE / "src").rglob("*.py"))
    assert files
    for path in files:
        names = imported_modules(path)
        core = {name for name in names if name.split(".")[0] == "fewbench"}
        allowed = {PLUGIN_NAMESPACE} | SHARED_MATHEMATICS
        assert core <= allowed, f"{path}: imports {sorted(core - allowed)}"
        assert not any(name.startswith("fewbench_plugins") for name in names), path


def test_plugins_lists_both_example_plugins_with_their_provider(site, home):
    result = fewbench("plugins", site=site, home=home)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ")}
    for name in ("shapes_example", "protonet_example"):
        assert lines[name].endswith(f"[{PROVIDER}]"), lines.get(name)
    assert lines["protonet"].endswith("[fewbench]")  # the built-in keeps its name


def test_the_example_suite_runs_and_stores_its_cells(site, home):
    out = home / "run"
    result = fewbench(
        "run", str(EXAMPLE / "suite.yaml"), "--max-iterations", str(ITERATIONS),
        "--max-episodes", str(EPISODES), "--out", str(out), "--no-progress", "--threads", "1",
        site=site, home=home,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    db = sqlite3.connect(out / "results.sqlite")
    cells = db.execute(
        "SELECT id, dataset, learner, shots, status, metric, mean, iterations FROM cells"
    ).fetchall()
    assert sorted((row[2], row[3]) for row in cells) == [
        ("protonet", 1), ("protonet", 5), ("protonet_example", 1), ("protonet_example", 5),
    ]  # fmt: skip
    means = {}
    for cell, dataset, learner, shots, status, metric, mean, iterations in cells:
        assert (dataset, status, metric, iterations) == ("shapes_example", "done", "accuracy", 20)
        # Far above chance even after 20 steps: 1-shot cells measured 0.70 to 0.76 (seeds 0-3).
        assert CHANCE + 0.2 < mean <= 1.0, (learner, shots, mean)
        episodes = db.execute("SELECT value FROM episodes WHERE cell_id = ?", (cell,)).fetchall()
        assert len(episodes) == EPISODES
        assert all(0.0 <= value <= 1.0 for (value,) in episodes)
        means[learner, shots] = mean
    # The example implements the built-in learner's equations with the same seed and the
    # same (still undecayed) learning rate: only float rounding tells them apart.
    for shots in (1, 5):
        assert means["protonet_example", shots] == pytest.approx(means["protonet", shots], abs=0.05)
