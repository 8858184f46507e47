"""End to end through the command line, on the real Omniglot data."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, concurrently, run_cli

TINY = [
    "--set",
    "tasks.ways=5",
    "--set",
    "tasks.shots=1",
    "--set",
    "learners.maml.meta_batch_size=2",
    "--set",
    "learners.fomaml.meta_batch_size=2",
    "--set",
    "learners.finetune.batch_size=16",
    "--set",
    "train={iterations: 4, validate_every: 2, val_episodes: 4, log_every: 1}",
    "--set",
    "eval.episodes=12",
    "--set",
    "eval.query=3",
]


def run_tiny(out: Path, data_root: Path, cache_dir: Path):
    return run_cli(
        "run",
        "suites/omniglot.yaml",
        *TINY,
        "--out",
        str(out),
        "--data-root",
        str(data_root),
        "--device",
        "cpu",
        env={"FEWBENCH_CACHE": str(cache_dir)},
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_root, cache_dir):
    out = tmp_path_factory.mktemp("run") / "omniglot-tiny"
    return out, run_tiny(out, data_root, cache_dir)


def test_run_stores_every_cell_and_prints_the_table(tiny_run):
    out, result = tiny_run
    assert result.returncode == 0, result.stderr
    assert "omniglot 5-way 1-shot" in result.stdout
    for learner in ("MAML", "FO-MAML", "Baseline"):  # the papers' names for the three
        assert learner in result.stdout
    db = sqlite3.connect(out / "results.sqlite")
    cells = db.execute("SELECT id, learner, status, engine, mean FROM cells").fetchall()
    assert sorted(c[1] for c in cells) == ["finetune", "fomaml", "maml"]
    assert all(c[2] == "done" and c[3] and 0 <= c[4] <= 1 for c in cells)
    for cell_id, *_ in cells:
        values = [
            v
            for (v,) in db.execute(
                "SELECT value FROM episodes WHERE cell_id = ? ORDER BY episode", (cell_id,)
            )
        ]
        assert len(values) == 12
        assert all(
            v in {i / 15 for i in range(16)} or abs(v * 15 - round(v * 15)) < 1e-6 for v in values
        )
        curve = db.execute(
            "SELECT iteration, loss, val_metric FROM curve WHERE cell_id = ?", (cell_id,)
        ).fetchall()
        assert [row[0] for row in curve] == [1, 2, 3, 4]
        assert [row[2] is not None for row in curve] == [False, True, False, True]
        assert (out / "checkpoints" / cell_id / "best.pt").is_file()
    env = json.loads((out / "environment.json").read_text())
    assert {"python", "torch", "fewbench", "device", "git_commit"} <= set(env)
    if sys.platform.startswith("linux"):  # fewbench run kept glibc's large blocks on its heap
        assert env["malloc"] == "heap (glibc: no mmap for large blocks, trim above 1 GiB)"
    assert "iterations: 4" in (out / "suite.yaml").read_text()


def test_csv_report_has_one_row_per_setting(tiny_run):
    out, _ = tiny_run
    result = run_cli("report", str(out), "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["learner"] for r in rows] == ["maml", "fomaml", "finetune"]
    db = sqlite3.connect(out / "results.sqlite")
    for row in rows:
        assert row["dataset"] == "omniglot" and row["ways"] == "5" and row["shots"] == "1"
        assert row["backbone"] == "conv4" and row["seeds"] == "1" and row["episodes"] == "12"
        values = [
            v
            for (v,) in db.execute(
                "SELECT e.value FROM episodes e JOIN cells c ON c.id = e.cell_id "
                "WHERE c.learner = ?",
                (row["learner"],),
            )
        ]
        assert row["metric"] == "accuracy"
        assert float(row["mean"]) == pytest.approx(100 * sum(values) / len(values), abs=1e-3)
        assert 0 < float(row["ci95"]) < 100


def test_markdown_and_json_reports(tiny_run):
    out, _ = tiny_run
    markdown, as_json = concurrently(
        lambda: run_cli("report", str(out), "--format", "markdown").stdout,
        lambda: run_cli("report", str(out), "--format", "json").stdout,
    )
    assert markdown.startswith("| learner | backbone | omniglot 5-way 1-shot |")
    records = json.loads(as_json)["entries"]
    assert {r["learner"] for r in records} == {"maml", "fomaml", "finetune"}
    engines = {r["learner"]: r["engine"] for r in records}
    assert engines["maml"].startswith("second-order; train: ")
    assert engines["fomaml"].startswith("first-order; train: ")


def test_rerun_into_the_same_directory_skips_finished_cells(tiny_run, data_root, cache_dir):
    out, _ = tiny_run
    before = (
        sqlite3.connect(out / "results.sqlite").execute("SELECT id, mean FROM cells").fetchall()
    )
    result = run_tiny(out, data_root, cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("done in an earlier run, skipped") == 3
    assert (
        sqlite3.connect(out / "results.sqlite").execute("SELECT id, mean FROM cells").fetchall()
        == before
    )


def test_dry_run_prints_the_grid_and_trains_nothing(data_root):
    result = run_cli("run", "suites/omniglot.yaml", "--dry-run", "--data-root", str(data_root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "12 cells"
    assert sum("omniglot/20w5s/conv4/" in line for line in lines) == 3


def test_the_cpu_suite_dry_runs_on_finns_split(data_root):
    """suites/omniglot-cpu.yaml: Finn et al.'s split and the budget the README measures."""
    result = run_cli("run", "suites/omniglot-cpu.yaml", "--dry-run", "--data-root", str(data_root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "6 cells"
    assert any(
        "omniglot/5w1s/conv4/maml/seed0: 6000 steps, 100 validation / 600 test" in line
        for line in lines
    )
    suite = yaml.safe_load((REPO / "suites" / "omniglot-cpu.yaml").read_text())
    assert suite["datasets"] == [{"name": "omniglot", "split": "finn", "image_size": 28}]


def test_data_root_from_the_environment(data_root, tmp_path):
    ok, missing = concurrently(
        lambda: run_cli(
            "run", "suites/omniglot.yaml", "--dry-run", env={"FEWBENCH_DATA": str(data_root)}
        ),
        lambda: run_cli(
            "run",
            "suites/omniglot.yaml",
            "--out",
            str(tmp_path / "x"),
            "--no-download",  # tests never reach the internet
            env={"FEWBENCH_DATA": str(tmp_path)},
        ),
    )
    assert ok.returncode == 0 and not ok.stderr
    assert missing.returncode == 2
    assert (
        str(tmp_path / "omniglot") in missing.stderr and "images_background.zip" in missing.stderr
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (
            "name: x\ndatasets: [{name: omniglot}]\ntasks: {ways: 5}\nbackbones: [conv4]\nlearners: [mamal]\n",
            "did you mean 'maml'",
        ),
        ("name: [unclosed\n", "invalid YAML"),
        (
            "name: x\ndatasets: [{name: omniglot}]\ntasks: {ways: 5, shots: 1}\nbackbones: [conv4]\n"
            "learners: [maml]\ntrain: {iterations: 1e400}\n",
            "train.iterations",
        ),
    ],
)
def test_bad_suites_give_one_line_exit_2_and_leave_no_run_directory(
    tmp_path, data_root, content, fragment
):
    suite = tmp_path / "bad.yaml"
    suite.write_text(content)
    out = tmp_path / "run"
    result = run_cli("run", str(suite), "--out", str(out), "--data-root", str(data_root))
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert str(suite) in result.stderr
    assert not out.exists()


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2 and "no results.sqlite" in result.stderr


def test_readme_test_commands_are_what_ci_runs():
    """The last two lines of .ci/run: the test command, then the pretrained-backbone tests'."""
    tests, pretrained = (REPO / ".ci" / "run").read_text().strip().splitlines()[-3::2]
    readme = (REPO / "README.md").read_text()
    assert tests in readme and pretrained in readme
    assert tests.endswith("python -m pytest")
    assert "FEWBENCH_REQUIRE_PRETRAINED=1" in pretrained and "-m pretrained" in pretrained


def test_readme_main_command_runs_the_cpu_suite():
    readme = (REPO / "README.md").read_text()
    assert "fewbench run suites/omniglot-cpu.yaml" in readme


def test_unknown_device_is_a_clear_error(data_root, tmp_path):
    result = run_cli(
        "run",
        "suites/omniglot.yaml",
        "--device",
        "tpu",
        "--out",
        str(tmp_path / "x"),
        "--data-root",
        str(data_root),
    )
    assert result.returncode == 2 and "--device 'tpu'" in result.stderr
    assert not (tmp_path / "x").exists()


def test_results_readme_is_tracked():
    assert (REPO / "results" / "README.md").is_file()
    assert Path(REPO / ".gitignore").read_text().count("results/") >= 1
