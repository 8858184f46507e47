"""``fewbench tune`` (issue 17): search spaces checked with the suite, trials stored in
``RUN/tune.sqlite`` and continued, each judged on validation only, the missing extra, and
the report's note of the chosen configuration. Tiny generated sinusoid cells (a few
iterations, a handful of episodes), in this process."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pytest

import fewbench
from fewbench.cli.parser import main
from fewbench.errors import SuiteError
from fewbench.storage.sink import CellResult
from fewbench.storage.store import ResultsStore
from fewbench.suite.check import check_suite
from fewbench.suite.loading import parse_yaml

optuna = pytest.importorskip("optuna")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = """\
name: tiny-tune
seeds: [0]
datasets: [{name: sinusoid}]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [8]}]
learners:
  - {name: maml, inner_lr: 0.01, meta_batch_size: 2}
train: {iterations: 6, validate_every: 3, val_episodes: 4, log_every: 3}
eval: {episodes: 5, query: 10, seed: 0}
"""
SEARCH = """\
search:
  seed: 3
  learners.maml.inner_lr: {loguniform: [0.001, 0.5]}
  learners.maml.meta_lr: {loguniform: [0.0001, 0.01]}
"""


def options(data_root: Path) -> list[str]:
    return ["--device", "cpu", "--no-progress", "--data-root", str(data_root)]


# -- the search space, checked with the suite ---------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("learners.maml.inner_lr: {logunifrm: [0.01, 1.0]}", "did you mean 'loguniform'"),
        ("learners.maml.inner_lr: [0.01, 1.0]", "expected a distribution"),
        ("learners.maml.inner_lr: {loguniform: [0, 1.0]}", "both bounds must be above 0"),
        ("learners.maml.inner_lr: {uniform: [0.5, 0.1]}", "low must be below high"),
        ("learners.maml.inner_lr: {uniform: [0.1, 0.5], int: [1, 2]}", "expected one distribution"),
        ("learners.maml.inner_lr: {choice: []}", "a non-empty list"),
        ("learners.maml.inner_lr: {choice: [0.1, 0.1]}", "repeated values"),
        ("learners.maml.inner_steps: {int: [1, 4], step: 2}", "not a multiple of step 2"),
        ("learners.maml.inner_steps: {int: [1.5, 4]}", "expected two integers"),
        ("learners.maml.inner_steps: {uniform: [1, 3]}", "expected an integer"),
        ("learners.maml.inner_lr: {uniform: [0.1, 0.5], step: 0.1}", "'step' is for int"),
        ("learners.mam.inner_lr: {uniform: [0.1, 0.5]}", "no entry named 'mam'"),
        ("learners.maml.inner_stepz: {int: [1, 3]}", "has no parameter 'inner_stepz'"),
        ("train.iterations: {int: [0, 4]}", "must be at least 1"),
        ("inner_lr: {uniform: [0.1, 0.5]}", "expected a dotted parameter path"),
        ("execution.workers: {int: [1, 2]}", "not a parameter of the cells"),
        ("train.iterations: {choice: [[4, 8], 6]}", "expected an integer"),
        ("seed: -1", "expected a non-negative integer"),
    ],
)
def test_every_search_space_error_names_the_key_and_line(registry, entry, message):
    source = parse_yaml(f"{BASE}search:\n  {entry}\n", "tiny.yaml")
    with pytest.raises(SuiteError, match=message) as caught:
        check_suite(source, registry)
    assert caught.value.line == 11 and caught.value.path.startswith("search")
    assert "\n" not in str(caught.value)


def test_a_searched_key_that_an_override_sets_again_is_refused(registry):
    text = f"{BASE}{SEARCH}overrides:\n  - when: {{learner: maml}}\n    set: {{learner.inner_lr: 0.3}}\n"
    with pytest.raises(SuiteError, match="changes no cell's configuration") as caught:
        check_suite(parse_yaml(text, "tiny.yaml"), registry)
    assert caught.value.line == 12


def test_a_search_space_is_parsed_in_file_order(registry):
    text = f"{BASE}{SEARCH}  learners.maml.inner_steps: {{int: [1, 5], step: 2}}\n"
    text += "  backbones.mlp.hidden: {choice: [[8], [4, 4]]}\n"
    space = check_suite(parse_yaml(text, "tiny.yaml"), registry).search
    assert space.seed == 3
    assert [(d.path, d.kind) for d in space.dimensions] == [
        ("learners.maml.inner_lr", "loguniform"),
        ("learners.maml.meta_lr", "loguniform"),
        ("learners.maml.inner_steps", "int"),
        ("backbones.mlp.hidden", "choice"),
    ]
    assert space.dimensions[2].step == 2 and space.dimensions[3].choices == ([8], [4, 4])
    assert space.dimensions[3].assignment([4, 4]) == "backbones.mlp.hidden=[4, 4]"


def test_the_command_gives_one_line_and_exit_2_for_a_bad_space(tmp_path, capsys):
    suite = tmp_path / "bad.yaml"
    suite.write_text(f"{BASE}search:\n  learners.maml.inner_lr: {{uniform: [1, 0]}}\n")
    for command in ("tune", "run"):
        extra = ["--trials", "2"] if command == "tune" else []
        assert main([command, str(suite), *extra, *options(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        assert f"{suite}:11: search.learners.maml.inner_lr: uniform: low must be below" in err


def test_run_ignores_the_search_section_with_a_note(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(BASE + SEARCH)
    assert main(["run", str(suite), "--dry-run", *options(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "its search: section is for fewbench tune; fewbench run ignores it" in captured.err
    assert "sinusoid/1w5s/mlp/maml/seed0" in captured.out


def test_tune_needs_a_search_section_and_one_learner(tmp_path, capsys):
    plain = tmp_path / "plain.yaml"
    plain.write_text(BASE)
    assert main(["tune", str(plain), "--trials", "1", *options(tmp_path)]) == 2
    assert "no search: section" in capsys.readouterr().err
    two = tmp_path / "two.yaml"
    maml = "  - {name: maml, inner_lr: 0.01, meta_batch_size: 2}\n"
    two.write_text(BASE.replace(maml, maml + "  - {name: finetune, head: linear}\n") + SEARCH)
    assert main(["tune", str(two), "--trials", "1", *options(tmp_path)]) == 2
    assert "tunes one learner entry" in capsys.readouterr().err


def test_without_optuna_the_command_names_the_extra(tmp_path, capsys, monkeypatch):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(BASE + SEARCH)
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna fails
    assert main(["tune", str(suite), "--trials", "1", *options(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fewbench: error: fewbench tune needs Optuna, an optional extra: "
        "pip install 'fewbench[tune]'\n"
    )
    assert not (tmp_path / "results").exists()


# -- judged on validation only -----------------------------------------------------------------
def test_a_trial_is_judged_on_best_validation_never_on_test_results(tmp_path):
    """Two cells whose test results say the opposite of their validation: the trial value
    is the mean best validation value, whatever the test columns and episodes hold."""
    from fewbench.running.tuning import validation_of
    from fewbench.suite.cell import Cell

    store = ResultsStore.open_run(tmp_path)
    cells = []
    for i, (best_val, test) in enumerate([(0.9, 0.1), (0.5, 0.99)]):
        config = {
            "dataset": {"name": "toy"}, "backbone": {"name": "conv4"},
            "learner": {"name": "maml", "inner_lr": i}, "tasks": {"ways": 5, "shots": 1},
            "train": {}, "eval": {}, "seed": 0,
        }  # fmt: skip
        cell = Cell.from_config(config, f"toy/5w1s/conv4/maml[trial={i}]/seed0")
        store.add_cells([cell])
        store.complete(
            cell.id,
            CellResult("accuracy", [test] * 3, test, 0.0, [(1, 1.0, best_val)], 1, 1, best_val,
                       "test", 1.0, 1.0),
        )  # fmt: skip
        cells.append(cell)
    store.close()
    verdict = validation_of(tmp_path, [cells[0].id])
    assert verdict.value == 0.9 and not verdict.failed
    assert validation_of(tmp_path, [c.id for c in cells]).value == pytest.approx(0.7)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A search run with --trials 2, then the same command with --trials 3. The test results
    written are made to disagree with validation (each cell's test MSE is 10 minus its best
    validation MSE), so a choice made on test results would pick the worst trial."""
    folder = tmp_path_factory.mktemp("tune")
    suite = folder / "tiny.yaml"
    suite.write_text(BASE + SEARCH)
    run_dir = folder / "run"
    real_complete = ResultsStore.complete

    def upside_down(self, cell_id, result):
        flipped = [10.0 - result.best_val] * len(result.values)
        return real_complete(
            self, cell_id, CellResult(**{**result.__dict__, "values": flipped, "mean": flipped[0]})
        )

    command = ["tune", str(suite), "--out", str(run_dir), *options(folder)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ResultsStore, "complete", upside_down)
        assert main([*command, "--trials", "2"]) == 0
        first = cells_of(run_dir)
        assert main([*command, "--trials", "3"]) == 0
    return suite, run_dir, first


def cells_of(run_dir: Path) -> dict[str, dict]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return {row["label"]: dict(row) for row in db.execute("SELECT * FROM cells")}
    finally:
        db.close()


def study_of(run_dir: Path):
    (name,) = optuna.get_all_study_names(f"sqlite:///{run_dir / 'tune.sqlite'}")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'tune.sqlite'}")


def test_trials_are_stored_and_continued_without_running_finished_ones(tuned):
    _, run_dir, first = tuned
    study = study_of(run_dir)
    assert study.study_name.startswith("tiny-tune-")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    cells = cells_of(run_dir)
    labels = [f"sinusoid/1w5s/mlp/maml[trial={n}]/seed0" for n in range(3)]
    assert sorted(cells) == labels and sorted(first) == labels[:2]
    for label in labels[:2]:  # the first two trials' cells were not trained again
        assert cells[label]["updated_at"] == first[label]["updated_at"]
        assert cells[label]["attempts"] == 1 and cells[label]["status"] == "done"
    for trial in study.trials:  # each trial's values reached its cell's configuration
        (cell_id,) = trial.user_attrs["cells"]
        config = json.loads(next(c for c in cells.values() if c["id"] == cell_id)["config"])
        assert config["learner"]["inner_lr"] == trial.params["learners.maml.inner_lr"]
        assert config["learner"]["meta_lr"] == trial.params["learners.maml.meta_lr"]
        assert trial.value == next(c for c in cells.values() if c["id"] == cell_id)["best_val"]


def test_the_choice_is_the_best_validation_value_not_the_best_test_result(tuned):
    _, run_dir, _ = tuned
    cells = cells_of(run_dir).values()
    by_validation = min(cells, key=lambda c: c["best_val"])  # MSE: lowest wins
    by_test = min(cells, key=lambda c: c["mean"])
    assert by_validation["label"] != by_test["label"]  # the fixture made them disagree
    study = study_of(run_dir)
    assert study.direction.name == "MINIMIZE"
    assert study.best_trial.user_attrs["cells"] == [by_validation["id"]]
    store = ResultsStore.open_run(run_dir, readonly=True)
    record = json.loads(store.meta("tune"))
    store.close()
    assert record["best"]["number"] == study.best_trial.number
    assert record["best"]["value"] == by_validation["best_val"]


def test_the_report_shows_the_chosen_configuration_and_its_test_result(tuned, capsys):
    _, run_dir, _ = tuned
    best = study_of(run_dir).best_trial
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "each judged on the mean of its cells' best validation MSE" in out
    assert "the test episodes play no part in the choice" in out
    assert f"Chosen: trial {best.number} (learners.maml.inner_lr=" in out
    assert (
        f"its test result, read after the choice: sinusoid/1w5s/mlp/maml[trial={best.number}]/seed0:"
        in out
    )
    for n in range(3):  # every trial's cell is a row of its own
        assert f"MAML[trial={n}]" in out


def test_the_same_seed_gives_the_same_trials_and_the_api_mirrors_the_command(tuned, tmp_path):
    suite, run_dir, _ = tuned
    result = fewbench.tune(suite, trials=1, out=tmp_path / "again", data_root=tmp_path,
                           device="cpu")  # fmt: skip
    first = study_of(run_dir).trials[0]
    assert result.best_trial == 0 and result.metric == "mse"
    assert result.best_values == {
        "learners.maml.inner_lr": first.params["learners.maml.inner_lr"],
        "learners.maml.meta_lr": first.params["learners.maml.meta_lr"],
    }
    assert result.best_cells == ["sinusoid/1w5s/mlp/maml[trial=0]/seed0"]
    assert result.study == study_of(run_dir).study_name  # same suite, seed and caps


def test_a_trial_left_running_is_failed_as_interrupted_and_its_values_go_again(tuned, capsys):
    suite, run_dir, _ = tuned
    study = study_of(run_dir)
    orphan = study.ask()  # as a killed process leaves it: running, with its values drawn
    orphan.suggest_float("learners.maml.inner_lr", 0.001, 0.5, log=True)
    orphan.suggest_float("learners.maml.meta_lr", 0.0001, 0.01, log=True)
    # Continued from the run directory alone (its tune.yaml), with one more trial wanted.
    assert main(["tune", str(run_dir), "--trials", "4", *options(run_dir)]) == 0
    assert "interrupted trial(s) 3 go again" in capsys.readouterr().err
    trials = study_of(run_dir).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]
    assert trials[3].user_attrs["ended"] == "interrupted"
    assert trials[4].params == trials[3].params and trials[4].user_attrs["retry_of"] == 3
    assert "sinusoid/1w5s/mlp/maml[trial=3]/seed0" in cells_of(run_dir)
    # All done: the same command trains nothing more and prints the choice again.
    assert main(["tune", str(run_dir), "--trials", "4", *options(run_dir)]) == 0
    assert "Chosen: trial" in capsys.readouterr().out
    assert len(study_of(run_dir).trials) == 5


def test_another_search_in_the_same_run_directory_is_refused(tuned, capsys):
    suite, run_dir, _ = tuned
    command = ["tune", str(suite), "--out", str(run_dir), "--trials", "3", *options(run_dir)]
    assert main([*command, "--seed", "4"]) == 2
    assert "holds the search tiny-tune-" in capsys.readouterr().err


def test_help_and_reports_do_not_import_optuna(tuned):
    """The command line stays fast: Optuna is imported by a search only."""
    import subprocess

    from helpers import REPO

    _, run_dir, _ = tuned
    probe = (
        "import sys, contextlib, io\n"
        "from fewbench.cli.parser import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    assert main(['report', sys.argv[1]]) == 0\n"
        "print('optuna' in sys.modules, 'sqlalchemy' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_a_dry_run_shows_the_space_and_a_trial_s_cells(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(BASE + SEARCH)
    out = tmp_path / "run"
    assert main(["tune", str(suite), "--trials", "2", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "learners.maml.inner_lr: log-uniform in [0.001, 0.5]" in printed
    assert "sinusoid/1w5s/mlp/maml/seed0" in printed and "never on test episodes" in printed
    assert not out.exists()


def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path):
    """A tune.lock that is a folder gave an IsADirectoryError traceback."""
    from fewbench.errors import FewbenchError
    from fewbench.running.tuning import LOCK_FILE, locked

    (tmp_path / "run" / LOCK_FILE).mkdir(parents=True)
    with (
        pytest.raises(FewbenchError, match="cannot be opened as tune's lock file"),
        locked(tmp_path / "run"),
    ):
        pass
