"""Shareable episodes (issue 27, item 3): ``fewbench episodes export`` writes a setting's fixed
test episodes as a manifest, ``fewbench episodes score`` scores an outside method's
predictions on them into a run directory that ``report`` and ``compare`` pair with
fewbench's own cells, episode by episode.

On real Omniglot: a tiny run (one Prototypical Networks cell, one training step, 20 test
episodes) is exported; a nearest-neighbour rule on raw pixels, written here with numpy and
PIL alone, predicts from the manifest's file paths; its scores are checked against a direct
computation, and the manifest's episodes against the images evaluation used. The refusals
run on a small generated Omniglot, whose files can be changed.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fewbench.cli.parser import main
from fewbench.episodes.draw import canonical_json, sha256_text
from fewbench.running.evaluation import EpisodeSpec, dataset_identity, fixed_episodes
from fewbench.storage.store import ResultsStore
from fewbench_plugins.datasets.omniglot import Omniglot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SUITE = """\
name: episodes-manifest
seeds: [0]
datasets:
  - {name: omniglot, split: vinyals, image_size: 28}
tasks: {ways: 5, shots: 1, query: 5}
backbones:
  - {name: conv4}
learners:
  - {name: protonet}
train: {iterations: 1, validate_every: 1, val_episodes: 2}
eval: {episodes: 20, query: 15, seed: 0}
"""


def fewbench(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """``fewbench ARGS`` in this process: the exit code, its stdout and its stderr."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys: pytest.CaptureFixture, *args: object) -> str:
    """``fewbench ARGS`` must fail with one line (exit 2); returns the line."""
    code, _, err = fewbench(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fewbench: error: "), err
    return lines[0]


# -- an outside method: numpy and PIL only -----------------------------------------------------


def load_example(root: Path, identifier: str) -> np.ndarray:
    """The manifest's example: the file under the data root, turned as ``#rotDDD`` says."""
    path, _, turn = identifier.partition("#rot")
    with Image.open(root / path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    return np.rot90(pixels, int(turn or 0) // 90)


def nearest_neighbour(root: Path, manifest: dict, out: Path) -> np.ndarray:
    """Predict each query's label as its nearest support image's (raw pixels, squared
    distance); write the CSV fewbench reads and return the predictions."""
    predictions = []
    for episode in manifest["episodes"]:
        support = np.stack([load_example(root, i).ravel() for _, i in episode["support"]])
        labels = np.array([label for label, _ in episode["support"]])
        queries = np.stack([load_example(root, i).ravel() for _, i in episode["query"]])
        distances = ((queries[:, None, :] - support[None, :, :]) ** 2).sum(axis=2)
        predictions.append(labels[distances.argmin(axis=1)])
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["episode", "query", "label"])
        for e, row in enumerate(predictions):
            writer.writerows([e, q, int(label)] for q, label in enumerate(row))
    return np.stack(predictions)


def stored_values(run_dir: Path) -> dict[str, list[float]]:
    """Per cell label, its stored per-episode values."""
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        cells = db.execute("SELECT id, label FROM cells").fetchall()
        return {
            label: [
                v
                for (v,) in db.execute(
                    "SELECT value FROM episodes WHERE cell_id = ? ORDER BY episode", (cell,)
                )
            ]
            for cell, label in cells
        }
    finally:
        db.close()


# -- real Omniglot ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory, data_root: Path, cache_dir: Path):
    """(data root, cache, run directory, manifest) of a one-step run on real Omniglot."""
    import fewbench

    folder = tmp_path_factory.mktemp("episodes-real")
    suite = folder / "suite.yaml"
    suite.write_text(SUITE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWBENCH_CACHE", str(cache_dir))
        run_dir = fewbench.run(
            suite, out=folder / "run", data_root=data_root, device="cpu", quiet=True
        )
    manifest = folder / "omniglot-5w1s.json"
    code = main(
        ["episodes", "export", str(run_dir), "-o", str(manifest),
         "--data-root", str(data_root), "--cache-dir", str(cache_dir)]
    )  # fmt: skip
    assert code == 0
    return data_root, cache_dir, run_dir, manifest


def test_an_outside_nearest_neighbour_is_scored_and_paired_with_fewbench_cells(real, capsys):
    data_root, cache_dir, run_dir, manifest_path = real
    manifest = json.loads(manifest_path.read_text())
    assert manifest["format"] == "fewbench-episodes/1"
    assert manifest["setting"] == {"ways": 5, "shots": 1, "query": 15, "seed": 0, "episodes": 20}
    assert manifest["dataset"]["identifiers"] == "paths"
    assert manifest["cells"] == ["omniglot/5w1s/conv4/protonet/seed0"]
    first = manifest["episodes"][0]
    assert len(first["support"]) == 5 and len(first["query"]) == 75
    # Vinyals classes are turned characters: every identifier carries its turn.
    assert all("#rot" in i for _, i in first["support"] + first["query"])

    predictions = manifest_path.parent / "knn.csv"
    predicted = nearest_neighbour(data_root, manifest, predictions)
    out = manifest_path.parent / "scored"
    code, _, err = fewbench(
        capsys, "episodes", "score", manifest_path, predictions, "--out", out,
        "--name", "outside:knn", "--backbone", "conv4",
        "--data-root", data_root, "--cache-dir", cache_dir,
    )  # fmt: skip
    assert code == 0, err

    # Each episode's stored accuracy is the fraction of its queries predicted right.
    truth = np.array([[label for label, _ in e["query"]] for e in manifest["episodes"]])
    direct = (predicted == truth).mean(axis=1)
    assert stored_values(out) == {"omniglot/5w1s/conv4/outside:knn/seed0": direct.tolist()}
    assert 0.25 < direct.mean() < 0.9  # raw pixels beat chance (0.2) on Omniglot

    # report shows it beside the fewbench cell; compare pairs the two, episode by episode.
    code, table, err = fewbench(capsys, "report", run_dir, out, "--format", "csv", "--ids")
    assert code == 0, err
    assert "outside:knn" in table and "protonet" in table
    code, text, err = fewbench(
        capsys, "compare", run_dir, out, "--baseline", "protonet", "--format", "json"
    )
    assert code == 0, err
    (record,) = json.loads(text)
    assert (record["learner"], record["paired"], record["episodes"]) == ("outside:knn", True, 20)
    fewbench_values = stored_values(run_dir)["omniglot/5w1s/conv4/protonet/seed0"]
    paired = 100 * (direct - np.array(fewbench_values)).mean()
    assert record["difference"] == pytest.approx(paired)


def test_manifest_episodes_hold_the_images_evaluation_used(real, omniglot_sources):
    """Episode i of the manifest is, image for image, the episode i evaluation scored a cell
    of its setting on: each file, decoded and turned as its identifier says (numpy.rot90)."""
    data_root, _, run_dir, manifest_path = real
    manifest = json.loads(manifest_path.read_text())
    store = ResultsStore.open_run(run_dir, readonly=True)
    try:
        cell = store.cell(store.current_cells()[0])
    finally:
        store.close()
    dataset = Omniglot(split="vinyals", image_size=28)
    identity = dataset_identity(cell.dataset.config(), dataset.episode_identity)
    batch = fixed_episodes(
        omniglot_sources["test"], EpisodeSpec.of(cell, identity, "test"), 0, cell.eval.episodes
    )
    assert len(manifest["episodes"]) == len(batch) == 20
    for index, episode in enumerate(manifest["episodes"]):
        for part, images, labels in (
            ("support", batch.support_x[index], batch.support_y[index]),
            ("query", batch.query_x[index], batch.query_y[index]),
        ):
            names = [name for _, name in episode[part]]
            decoded = dataset.decode_examples([data_root / n.partition("#rot")[0] for n in names])
            turned = np.stack(
                [
                    np.rot90(x.numpy(), int(n.partition("#rot")[2]) // 90, axes=(-2, -1))
                    for x, n in zip(decoded, names, strict=True)
                ]
            )
            assert torch.equal(torch.from_numpy(turned).float() / 255, images), (index, part)
            assert [label for label, _ in episode[part]] == labels.tolist()


# -- a small generated Omniglot, whose files can be changed -------------------------------------

CHARACTERS = {("images_background", "Alpha"): 3, ("images_evaluation", "Beta"): 3}
SPLIT_FILES = {
    "train": ["Alpha/character01/rot000", "Alpha/character02/rot000"],
    "val": ["Alpha/character03/rot000"],
    "test": [f"Beta/character01/rot{r:03d}" for r in (0, 90, 180, 270)]
    + ["Beta/character02/rot000", "Beta/character03/rot090"],
}
SMALL_SUITE = """\
name: small
seeds: [0]
datasets:
  - {name: omniglot, split: vinyals, image_size: 28}
tasks: {ways: 5, shots: [1, 2], query: 3}
backbones:
  - {name: conv4}
learners:
  - {name: protonet}
  - {name: matchingnet}
eval: {episodes: 4, query: 3, seed: 0}
"""


def drawing(rng: np.random.Generator) -> Image.Image:
    """A 105x105 drawing of three random strokes, black on white, as the official PNGs."""
    image = Image.new("L", (105, 105), 255)
    draw = ImageDraw.Draw(image)
    for line in rng.uniform(15, 90, (3, 4, 2)):
        draw.line([tuple(p) for p in line], fill=0, width=3)
    return image.convert("1")


@pytest.fixture
def small(tmp_path: Path) -> dict[str, Path]:
    """A generated Omniglot (20 drawings of 6 characters; 6 test classes, turned ones among
    them), a suite of two episode settings on it, and a cache."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for (part, alphabet), count in CHARACTERS.items():
        for c in range(1, count + 1):
            folder = root / "omniglot" / part / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            for d in range(1, 21):
                drawing(rng).save(folder / f"{c:04d}_{d:02d}.png")
    splits = root / "omniglot" / "splits" / "vinyals"
    splits.mkdir(parents=True)
    for split, lines in SPLIT_FILES.items():
        (splits / f"{split}.txt").write_text("\n".join(lines) + "\n")
    suite = tmp_path / "small.yaml"
    suite.write_text(SMALL_SUITE)
    return {"root": root, "cache": tmp_path / "cache", "suite": suite, "tmp": tmp_path}


def export_small(capsys, small: dict[str, Path], *extra: object) -> Path:
    """The 5-way 1-shot manifest of the small suite, exported without training."""
    out = small["tmp"] / "small.json"
    code, _, err = fewbench(
        capsys, "episodes", "export", small["suite"], "omniglot/5w1s/conv4/protonet/seed0",
        "-o", out, "--data-root", small["root"], "--cache-dir", small["cache"], *extra,
    )  # fmt: skip
    assert code == 0, err
    assert "the test episodes of 2 cells" in err  # protonet and matchingnet share them
    return out


def score_args(small: dict[str, Path], manifest: Path, predictions: Path, out: Path) -> list:
    return [
        "episodes", "score", manifest, predictions, "--out", out,
        "--data-root", small["root"], "--cache-dir", small["cache"],
    ]  # fmt: skip


def write_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value))
    return path


def resealed(manifest: dict) -> dict:
    """``manifest`` with its hash made right again (as a careful forger would)."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return {**body, "sha256": sha256_text(canonical_json(body))}


def test_a_suite_exports_without_training_and_scores_json_predictions(small, capsys):
    manifest_path = export_small(capsys, small)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["cells"] == [
        "omniglot/5w1s/conv4/protonet/seed0",
        "omniglot/5w1s/conv4/matchingnet/seed0",
    ]
    names = {i for e in manifest["episodes"] for _, i in e["support"] + e["query"]}
    assert set(manifest["example_sha256"]) == names
    assert {n.rpartition("#")[2] for n in names} <= {"rot000", "rot090", "rot180", "rot270"}
    # Every episode says label 0 for every query: right on the 3 queries of class 0 of 15.
    predictions = write_json(small["tmp"] / "zeros.json", [[0] * 15] * 4)
    out = small["tmp"] / "scored"
    code, _, err = fewbench(capsys, *score_args(small, manifest_path, predictions, out))
    assert code == 0, err
    assert stored_values(out) == {"omniglot/5w1s/outside/outside/seed0": [0.2] * 4}


def test_export_refuses_several_settings_and_an_existing_file(small, capsys):
    common = ("--data-root", small["root"], "--cache-dir", small["cache"])
    line = refused(
        capsys, "episodes", "export", small["suite"], "-o", small["tmp"] / "m.json", *common
    )
    assert "2 episode settings" in line and "5-way 1-shot" in line and "5-way 2-shot" in line
    assert not (small["tmp"] / "m.json").exists()
    manifest = export_small(capsys, small)
    line = refused(
        capsys, "episodes", "export", small["suite"], "omniglot/5w2s/conv4/protonet/seed0",
        "-o", manifest, *common,
    )  # fmt: skip
    assert "exists; give --force" in line
    before = manifest.read_text()
    export_small(capsys, small, "--set", "eval.seed=1", "--force")
    assert manifest.read_text() != before  # other episodes, replaced with --force


def test_a_tampered_manifest_is_refused_in_one_line(small, capsys):
    manifest_path = export_small(capsys, small)
    manifest = json.loads(manifest_path.read_text())
    predictions = write_json(small["tmp"] / "zeros.json", [[0] * 15] * 4)
    out = small["tmp"] / "scored"

    changed = json.loads(json.dumps(manifest))
    changed["episodes"][0]["query"][0][0] = 4  # a label changed by hand
    line = refused(
        capsys, *score_args(small, write_json(small["tmp"] / "a.json", changed), predictions, out)
    )
    assert "its sha256 does not match its contents" in line

    # Resealed, it still names other episodes than the data gives: found, and named.
    swapped = json.loads(json.dumps(manifest))
    support = swapped["episodes"][2]["support"]
    support[0][1], support[1][1] = support[1][1], support[0][1]
    line = refused(
        capsys,
        *score_args(
            small, write_json(small["tmp"] / "b.json", resealed(swapped)), predictions, out
        ),
    )
    assert f"episode 2 support 0: the manifest holds [0, '{support[0][1]}']" in line
    assert not out.exists()


def test_a_data_root_whose_image_differs_is_refused_naming_the_file(small, capsys):
    manifest_path = export_small(capsys, small)
    manifest = json.loads(manifest_path.read_text())
    predictions = write_json(small["tmp"] / "zeros.json", [[0] * 15] * 4)
    name = manifest["episodes"][1]["query"][7][1]
    drawing(np.random.default_rng(99)).save(small["root"] / name.partition("#")[0])
    out = small["tmp"] / "scored"
    line = refused(capsys, *score_args(small, manifest_path, predictions, out))
    # The file is named (at the first of its turns the episodes use: each is a class).
    path = name.partition("#")[0]
    assert f"error: {path}#rot" in line
    assert f": its image in the omniglot data under {small['root']} differs" in line
    assert not out.exists()


def test_bad_predictions_are_refused_in_one_line_and_nothing_is_written(small, capsys):
    manifest_path = export_small(capsys, small)
    out = small["tmp"] / "scored"
    rows = [(e, q, 0) for e in range(4) for q in range(15)]

    def csv_file(lines: list[tuple], header: str = "episode,query,label") -> Path:
        path = small["tmp"] / f"p{len(list(small['tmp'].glob('p*.csv')))}.csv"
        path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in lines))
        return path

    cases = {
        "no prediction for episode 3 query 14": csv_file(rows[:-1]),
        "episode 0 query 1 is predicted a second time": csv_file(rows + [(0, 1, 2)]),
        "label 5 is out of range (0 to 4": csv_file([*rows[:-1], (3, 14, 5)]),
        "episode 4 is out of range": csv_file([*rows, (4, 0, 0)]),
        "needs a header naming episode, query, label": csv_file(rows, "e,q,l"),
        "line 3: label 'x' is not a whole number": csv_file([(0, 0, 0), (0, 1, "x")]),
        "expected a JSON list": write_json(small["tmp"] / "p.json", {"0": [0]}),
        "record 0 has no 'label'": write_json(
            small["tmp"] / "q.json", [{"episode": 0, "query": 0}]
        ),
    }
    for expected, predictions in cases.items():
        line = refused(capsys, *score_args(small, manifest_path, predictions, out))
        assert expected in line, line
        assert not out.exists()
    good = csv_file(rows)
    line = refused(capsys, *score_args(small, manifest_path, good, out), "--name", "protonet")
    assert "the name of a fewbench learner" in line
    (out / "x").parent.mkdir()
    (out / "x").write_text("")
    assert "is not an empty folder" in refused(capsys, *score_args(small, manifest_path, good, out))


def test_datasets_without_example_names_export_indices(small, capsys, monkeypatch):
    """A dataset plugin without example_ids: examples are class:example indices, and the
    manifest says so; read where the plugin names files, it is refused."""
    monkeypatch.setattr(Omniglot, "example_ids", lambda self, root, split: None)
    manifest_path = export_small(capsys, small)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["dataset"]["identifiers"] == "indices"
    assert manifest["dataset"]["class_list_sha256"] is None
    classes, (label, name) = (
        manifest["episodes"][0]["classes"],
        manifest["episodes"][0]["support"][0],
    )
    assert name.split(":")[0] == str(classes[label])
    predictions = write_json(small["tmp"] / "zeros.json", [[0] * 15] * 4)
    code, _, err = fewbench(
        capsys, *score_args(small, manifest_path, predictions, small["tmp"] / "ok")
    )
    assert code == 0, err
    monkeypatch.undo()
    line = refused(capsys, *score_args(small, manifest_path, predictions, small["tmp"] / "no"))
    assert "names examples by indices, the installed omniglot plugin by paths" in line


def test_omniglot_names_each_example_by_file_and_turn(small):
    root = small["root"]
    vinyals = Omniglot(split="vinyals", image_size=28).example_ids(root, "test")
    assert [len(row) for row in vinyals] == [20] * 6
    assert vinyals[1][0] == "omniglot/images_evaluation/Beta/character01/0001_01.png#rot090"
    assert vinyals[5][19] == "omniglot/images_evaluation/Beta/character03/0003_20.png#rot090"
    lake = Omniglot(split="lake", image_size=28).example_ids(root, "test")  # no turns
    assert lake[0][0] == "omniglot/images_evaluation/Beta/character01/0001_01.png"
    assert all("#" not in name for row in lake for name in row)


def test_a_dataset_that_generates_its_tasks_is_refused(tmp_path, capsys):
    suite = tmp_path / "sinusoid.yaml"
    suite.write_text(
        "name: s\nseeds: [0]\ndatasets: [{name: sinusoid}]\ntasks: {ways: 1, shots: 5}\n"
        "backbones: [{name: mlp}]\nlearners: [{name: maml}]\neval: {episodes: 2}\n"
    )
    line = refused(
        capsys, "episodes", "export", suite, "-o", tmp_path / "m.json", "--data-root", tmp_path
    )
    assert "sinusoid" in line and not (tmp_path / "m.json").exists()
