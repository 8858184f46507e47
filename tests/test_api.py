"""The Python API: run a suite, read its results as DataFrames, and reuse a trained model,
from its run directory or from a self-describing model file copied elsewhere."""

from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image

import fewbench
from fewbench.errors import FewbenchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SINUSOID = """\
name: api
seeds: [0]
datasets: [{name: sinusoid}]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [16]}]
learners:
  - {name: maml, inner_lr: 0.01, meta_batch_size: 4}
  - {name: finetune, head: linear, batch_size: 20}
train: {iterations: 1000, validate_every: 4, val_episodes: 5}
eval: {episodes: 600, query: 10, seed: 0}
"""


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    suite = folder / "api.yaml"
    suite.write_text(SINUSOID)
    out = fewbench.run(
        suite, out=folder / "run", data_root=folder, device="cpu", max_iterations=8,
        max_episodes=7, set={"learners.maml.inner_steps": 2},
    )  # fmt: skip
    return out


def stored_values(run_dir, label: str) -> list[float]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    (cell,) = db.execute("SELECT id FROM cells WHERE label = ?", (label,)).fetchone()
    return [v for (v,) in db.execute(
        "SELECT value FROM episodes WHERE cell_id = ? ORDER BY episode", (cell,)
    )]  # fmt: skip


def test_run_and_load_results_give_the_reports_data(sinusoid_run):
    results = fewbench.load_results(sinusoid_run)
    assert sorted(results.cells["label"]) == [
        "sinusoid/1w5s/mlp/finetune/seed0", "sinusoid/1w5s/mlp/maml/seed0",
    ]  # fmt: skip
    assert set(results.cells["status"]) == {"done"}
    assert list(results.cells["iterations"]) == [8, 8]
    assert results.cells.iloc[0]["config"]["train"]["max_iterations"] == 8
    maml = results.episodes[results.episodes["label"] == "sinusoid/1w5s/mlp/maml/seed0"]
    assert list(maml["value"]) == stored_values(sinusoid_run, "sinusoid/1w5s/mlp/maml/seed0")
    assert len(maml) == 7
    curve = results.curves[results.curves["label"] == "sinusoid/1w5s/mlp/maml/seed0"]
    assert list(curve["iteration"]) == [4, 8] and curve["val_metric"].notna().all()


def test_a_reloaded_learner_reproduces_the_stored_results_exactly(sinusoid_run, tmp_path):
    label = "sinusoid/1w5s/mlp/maml/seed0"
    model = fewbench.load_learner(sinusoid_run, label)
    assert model.cell.label == label and model.context.input_shape == (1,)
    assert model.record["plugins"]["learner:maml"].startswith("fewbench ")
    assert list(model.evaluate(tmp_path)) == stored_values(sinusoid_run, label)
    # Exported, and loaded without its run directory.
    exported = fewbench.export_model(sinusoid_run, label, tmp_path / "maml.pt")
    again = fewbench.load_learner(exported)
    assert list(again.evaluate(tmp_path)) == stored_values(sinusoid_run, label)


def test_a_model_predicts_a_support_and_query_set_given_by_hand(sinusoid_run):
    model = fewbench.load_learner(sinusoid_run, "sinusoid/1w5s/mlp/maml/seed0")
    x = torch.linspace(-5, 5, 8).unsqueeze(1)
    first = model.predict(x[:5], torch.sin(x[:5]), x)
    assert first.shape == (8, 1) and torch.isfinite(first).all()
    assert torch.equal(first, model.predict(x[:5], torch.sin(x[:5]), x))  # no state kept


def test_clear_errors_for_what_is_not_a_model(sinusoid_run, tmp_path):
    with pytest.raises(FewbenchError, match="holds 2 cells; name one: "):
        fewbench.load_learner(sinusoid_run)
    with pytest.raises(FewbenchError, match="has no cell 'nope'; its cells: sinusoid/"):
        fewbench.load_learner(sinusoid_run, "nope")
    bare = tmp_path / "bare.pt"
    torch.save({"model": {}}, bare)
    with pytest.raises(FewbenchError, match="not a fewbench model file"):
        fewbench.load_learner(bare)
    with pytest.raises(FewbenchError, match="no such model file or run directory"):
        fewbench.load_learner(tmp_path / "missing")


def test_a_20_way_episode_built_from_image_files_is_classified(data_root, tmp_path, cache_dir):
    suite = tmp_path / "omni.yaml"
    suite.write_text(
        "name: omni\ndatasets: [{name: omniglot}]\ntasks: {ways: 20, shots: 1, query: 1}\n"
        "backbones: [{name: conv4, hidden: 8}]\n"
        "learners: [{name: maml, meta_batch_size: 2, inner_lr: 0.1}]\n"
        "train: {iterations: 2, val_episodes: 2}\neval: {episodes: 2, query: 1}\n"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWBENCH_CACHE", str(cache_dir))
        out = fewbench.run(suite, out=tmp_path / "run", data_root=data_root, device="cpu")
    model = fewbench.load_learner(out)
    characters = sorted((data_root / "omniglot" / "images_evaluation").glob("*/*"))[:20]

    def image(path) -> np.ndarray:  # as the dataset prepares them: 28x28, ink bright
        with Image.open(path) as picture:
            small = picture.convert("L").resize((28, 28), resample=Image.LANCZOS)
        return (255 - np.asarray(small, dtype=np.float32)) / 255

    drawings = [sorted(c.glob("*.png")) for c in characters]
    support = torch.tensor(np.stack([image(d[0]) for d in drawings]))[:, None]
    query = torch.tensor(np.stack([image(d[1]) for d in drawings]))[:, None]
    logits = model.predict(support, torch.arange(20), query)
    assert logits.shape == (20, 20) and torch.isfinite(logits).all()


def test_the_export_and_plot_commands_need_no_extra_paths(sinusoid_run, tmp_path):
    from helpers import run_cli

    target = tmp_path / "maml.pt"
    done = run_cli("export", str(sinusoid_run), "sinusoid/1w5s/mlp/maml/seed0", "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert fewbench.load_learner(target).cell.label == "sinusoid/1w5s/mlp/maml/seed0"
    missing = run_cli("export", str(sinusoid_run), "-o", str(target))  # two cells: name one
    assert missing.returncode == 2 and "holds 2 cells; name one" in missing.stderr
    plotted = run_cli("plot", str(sinusoid_run))  # figures into the run directory
    assert plotted.returncode == 0, plotted.stderr
    assert any((sinusoid_run / "plots").glob("*.png"))


def test_export_never_overwrites_a_run_or_a_file_without_force(sinusoid_run, tmp_path):
    """fewbench export RUN CELL -o RUN/results.sqlite once exited 0 and destroyed the store."""
    import os
    import stat

    from helpers import run_cli

    cell = "sinusoid/1w5s/mlp/maml/seed0"
    store = sinusoid_run / "results.sqlite"
    before = store.read_bytes()
    from fewbench.api import _model_file

    model = _model_file(sinusoid_run, cell)
    existing = tmp_path / "kept.pt"
    existing.write_bytes(b"a file worth keeping")
    (tmp_path / "locked").mkdir(mode=0o500)
    cases = [
        (store, "inside the run directory"),
        (sinusoid_run / "new-model.pt", "inside the run directory"),
        (model, "is the model file itself"),
        (tmp_path, "is a folder"),
        (tmp_path / "missing" / "m.pt", "does not exist"),
        (existing, "exists; give --force to replace it"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((tmp_path / "locked" / "m.pt", "permission denied"))
    for target, message in cases:
        result = run_cli("export", str(sinusoid_run), cell, "-o", str(target))
        assert result.returncode == 2, (target, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert store.read_bytes() == before
    assert existing.read_bytes() == b"a file worth keeping"
    assert not (sinusoid_run / "new-model.pt").exists()
    replaced = run_cli("export", str(sinusoid_run), cell, "-o", str(existing), "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert fewbench.load_learner(existing).cell.label == cell
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600  # private, as the run's own files


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"suite": {"name": "x"}}, "suite: expected the path of a suite file"),
        ({"max_iterations": 0}, "max_iterations: must be at least 1 (None: no cap), got 0"),
        ({"max_episodes": 2.5}, "max_episodes: expected a positive integer or None"),
        ({"log": [5]}, "log: expected logger names"),
    ],
)
def test_the_api_refuses_bad_arguments_as_the_command_line_does(tmp_path, arguments, message):
    suite = arguments.pop("suite", tmp_path / "suite.yaml")
    with pytest.raises(FewbenchError, match=re.escape(message)):
        fewbench.run(suite, out=tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_model_files_are_one_fewbench_error(sinusoid_run, tmp_path):
    """Truncated, garbage, wrong-typed and inconsistent model files raised EOFError,
    UnpicklingError, KeyError or TypeError; a parameter the plugin does not know was dropped
    silently; a file from a newer fewbench loaded without a word."""
    from fewbench.api import _model_file

    good = _model_file(sinusoid_run, "sinusoid/1w5s/mlp/maml/seed0")
    record = torch.load(good, weights_only=True)
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x80\x04not a model",
        "empty": b"",
    }
    for name, content in cases.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    broken = {
        "no-cell": {k: v for k, v in record.items() if k != "cell"},
        "cell-is-a-list": {**record, "cell": [1, 2]},
        "context-missing-shape": {**record, "context": {"task_type": "regression"}},
        "wrong-state": {**record, "state": {"network": {"nonsense": torch.zeros(3)}}},
    }
    for name, payload in broken.items():
        torch.save(payload, tmp_path / f"{name}.pt")
    for name in [*cases, *broken]:
        with pytest.raises(FewbenchError) as info:
            fewbench.load_learner(tmp_path / f"{name}.pt")
        assert "\n" not in str(info.value), name
    unknown = {**record, "cell": {**record["cell"]}}
    unknown["cell"]["config"] = json.loads(json.dumps(record["cell"]["config"]))
    unknown["cell"]["config"]["learner"]["from_the_future"] = 1
    torch.save(unknown, tmp_path / "unknown.pt")
    with pytest.raises(FewbenchError, match="parameters the installed plugin does not know"):
        fewbench.load_learner(tmp_path / "unknown.pt")
    torch.save({**record, "fewbench_version": "99.0"}, tmp_path / "newer.pt")
    with pytest.warns(UserWarning, match="written by fewbench 99.0, newer than this"):
        fewbench.load_learner(tmp_path / "newer.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("where", ["hidden", "input_shape"])
def test_a_model_file_asking_for_terabytes_is_refused_before_allocating(
    sinusoid_run, tmp_path, where
):
    """`hidden: 1000000` or a huge `input_shape` in a received model file made load_learner
    try to allocate terabytes; the model is now sized on the meta device against the file's
    own tensors first."""
    from fewbench.api import _model_file

    record = torch.load(
        _model_file(sinusoid_run, "sinusoid/1w5s/mlp/maml/seed0"), weights_only=True
    )
    crafted = json.loads(json.dumps({"cell": record["cell"], "context": record["context"]}))
    if where == "hidden":
        crafted["cell"]["config"]["backbone"]["hidden"] = [3_000_000, 3_000_000]
    else:
        crafted["context"]["input_shape"] = [1_000_000, 1_000_000]
    torch.save({**record, **crafted}, tmp_path / "huge.pt")
    with pytest.raises(FewbenchError, match="nothing was allocated") as info:
        fewbench.load_learner(tmp_path / "huge.pt")
    values = int(re.search(r"a model of ([\d,]+) values", str(info.value))[1].replace(",", ""))
    assert values > 10**12 and "\n" not in str(info.value)


def test_run_can_be_quiet(tmp_path, capsys):
    """fewbench.run printed the command's table to stdout; quiet=True prints nothing."""
    suite = tmp_path / "api.yaml"
    suite.write_text(SINUSOID)
    out = fewbench.run(
        suite, out=tmp_path / "run", data_root=tmp_path, device="cpu", max_iterations=2,
        max_episodes=3, quiet=True,
    )  # fmt: skip
    assert capsys.readouterr() == ("", "")
    assert set(fewbench.load_results(out).cells["status"]) == {"done"}
    fewbench.run(suite, out=tmp_path / "loud", data_root=tmp_path, device="cpu",
                 max_iterations=2, max_episodes=3)  # fmt: skip
    assert "± " in capsys.readouterr().out  # the table, as the command prints it
