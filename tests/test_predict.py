"""A trained model on a user's own examples (issue 30, item 6): ``predict`` refuses what does not
match the model (shape, labels, non-finite values) in one line and warns about images not
prepared as the episodes were (the issue saw un-inverted Omniglot fall from 64 % to 44 %
silently); ``model.preprocess`` prepares files, PIL images and arrays with the dataset's own
decoding; ``evaluate`` finds its data as ``fewbench run`` does, and needs none for generated
tasks.

The Omniglot model trains two steps on drawings generated here in the official layout, so the
tests need no downloaded data; one compares against the real PNG files when they are present.
"""

from __future__ import annotations

import os
import pickle
import re
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import fewbench
from fewbench.api import InputWarning
from fewbench.errors import FewbenchError
from fewbench.plugin.dataset import EpisodeIndices

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SINUSOID = """\
name: predict
seeds: [0]
datasets: [{name: sinusoid}]
tasks: {ways: 1, shots: 5, query: 5}
backbones: [{name: mlp, hidden: [16]}]
learners: [{name: maml, inner_lr: 0.01, meta_batch_size: 2, inner_steps: 1}]
train: {iterations: 100, validate_every: 4, val_episodes: 3}
eval: {episodes: 3, query: 5, seed: 0}
"""

OMNIGLOT = """\
name: predict-omniglot
seeds: [0]
datasets: [{name: omniglot, split: vinyals, image_size: 28}]
tasks: {ways: 5, shots: 1, query: 1}
backbones: [{name: conv4, hidden: 8}]
learners:
  - {name: maml, meta_batch_size: 2, inner_lr: 0.1, eval_inner_steps: 1}
  - {name: protonet}
train: {iterations: 2, validate_every: 2, val_episodes: 2}
eval: {episodes: 3, query: 1, seed: 0}
"""
MAML, PROTONET = "omniglot/5w1s/conv4/maml/seed0", "omniglot/5w1s/conv4/protonet/seed0"

# The generated Omniglot: background/Alpha holds four characters, evaluation/Beta two; the
# Vinyals split files list them at quarter turns: 8 training, 5 validation, 5 test classes.
CHARACTERS = {
    ("images_background", "Alpha"): 4,
    ("images_evaluation", "Beta"): 2,
}
SPLIT_FILES = {
    "train": [f"Alpha/character0{c}/rot{r:03d}" for c in (1, 2) for r in (0, 90, 180, 270)],
    "val": [f"Alpha/character03/rot{r:03d}" for r in (0, 90, 180, 270)]
    + ["Alpha/character04/rot000"],
    "test": [f"Beta/character01/rot{r:03d}" for r in (0, 90, 180, 270)]
    + ["Beta/character02/rot000"],
}


def drawing(strokes: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One 105x105 drawing of a character's strokes, jittered, as the official PNGs are:
    one bit per pixel, black strokes (0) on white."""
    image = Image.new("L", (105, 105), 255)
    draw = ImageDraw.Draw(image)
    for line in strokes + rng.normal(0, 2.0, strokes.shape):
        draw.line([tuple(p) for p in line], fill=0, width=3)
    return image.convert("1")


def write_omniglot(root: Path, seed: int = 0) -> Path:
    """``root/omniglot`` in the official layout, 20 drawings per character; returns ``root``."""
    rng = np.random.default_rng(seed)
    base = root / "omniglot"
    for (part, alphabet), count in CHARACTERS.items():
        for c in range(1, count + 1):
            folder = base / part / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            strokes = rng.uniform(15, 90, (3, 4, 2))  # three strokes of four points
            for d in range(1, 21):
                drawing(strokes, rng).save(folder / f"{c:04d}_{d:02d}.png")
    splits = base / "splits" / "vinyals"
    splits.mkdir(parents=True)
    for split, lines in SPLIT_FILES.items():
        (splits / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def drawings_of(root: Path, character: str) -> list[Path]:
    """The 20 files of ``Alpha/character01`` (say), in the loader's order."""
    found = sorted((root / "omniglot").glob(f"images_*/{character}/*.png"))
    assert len(found) == 20
    return found


def stored_values(run_dir: Path, label: str) -> list[float]:
    db = sqlite3.connect(run_dir / "results.sqlite")
    try:
        (cell,) = db.execute("SELECT id FROM cells WHERE label = ?", (label,)).fetchone()
        rows = db.execute(
            "SELECT value FROM episodes WHERE cell_id = ? ORDER BY episode", (cell,)
        ).fetchall()
    finally:
        db.close()
    return [v for (v,) in rows]


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("predict-sinusoid")
    suite = folder / "sinusoid.yaml"
    suite.write_text(SINUSOID)
    return fewbench.run(suite, out=folder / "run", data_root=folder, device="cpu", max_iterations=4)


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data root, cache folder, run directory) of two Omniglot cells trained two steps."""
    folder = tmp_path_factory.mktemp("predict-omniglot")
    root = write_omniglot(folder / "data")
    cache = folder / "cache"
    suite = folder / "omniglot.yaml"
    suite.write_text(OMNIGLOT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWBENCH_CACHE", str(cache))
        run_dir = fewbench.run(suite, out=folder / "run", data_root=root, device="cpu")
    return root, cache, run_dir


def omniglot_model(omniglot, label: str = MAML):
    root, cache, run_dir = omniglot
    model = fewbench.load_learner(run_dir, label)
    model.data_root, model.cache_dir = root, cache
    return model


def episode_images(root: Path, cache: Path, split: str, cls: int, count: int) -> torch.Tensor:
    """What the loader's episodes hold for the first ``count`` drawings of a class."""
    from fewbench.registry import Registry

    omniglot = Registry().get("dataset", "omniglot").build(split="vinyals", image_size=28)
    pool = omniglot.load(root, cache)[split]
    indices = EpisodeIndices(torch.tensor([[cls]]), torch.arange(count)[None, None])
    return pool.gather(indices, shots=count).support_x[0]


# -- preprocess ---------------------------------------------------------------------------------
def test_preprocess_gives_exactly_what_the_loader_gives_for_the_same_files(omniglot):
    root, cache, _ = omniglot
    model = omniglot_model(omniglot)
    files = drawings_of(root, "Alpha/character01")  # the first training class (rot000)
    expected = episode_images(root, cache, "train", 0, 20)
    prepared = model.preprocess(files)
    assert prepared.shape == (20, 1, 28, 28) and prepared.dtype == torch.float32
    assert torch.equal(prepared, expected)
    # Strokes are 1 on 0, as the episodes hold them: the files' dark strokes were inverted.
    assert prepared.mean() < 0.3 and prepared.amax() == 1.0
    # The same drawings as PIL images, uint8 arrays (grey, RGB) and floats in [0, 1].
    pictures = []
    for f in files:
        with Image.open(f) as picture:
            picture.load()
            pictures.append(picture)
    grey = [np.asarray(p.convert("L")) for p in pictures]
    rgb = [np.asarray(p.convert("RGB")) for p in pictures]
    for given in (pictures, grey, rgb, [g / 255.0 for g in grey], [str(f) for f in files]):
        assert torch.equal(model.preprocess(given), expected)


def test_preprocess_of_the_real_omniglot_files_matches_the_loader(data_root, omniglot, tmp_path):
    """The real PNGs (when present) through model.preprocess and through the Omniglot loader
    (on a tree of links to six real characters, so the loader reads the very files)."""
    _, cache, _ = omniglot
    model = omniglot_model(omniglot)
    real = data_root / "omniglot"
    picked = {
        f"Alpha/character0{i + 1}": c
        for i, c in enumerate(sorted((real / "images_background").glob("*/*"))[:4])
    } | {
        f"Beta/character0{i + 1}": c
        for i, c in enumerate(sorted((real / "images_evaluation").glob("*/*"))[:2])
    }
    for name, source in picked.items():
        part = "images_background" if name.startswith("Alpha") else "images_evaluation"
        target = tmp_path / "omniglot" / part / name
        target.mkdir(parents=True)
        for png in sorted(source.glob("*.png")):
            os.symlink(png.resolve(), target / png.name)
    splits = tmp_path / "omniglot" / "splits" / "vinyals"
    splits.mkdir(parents=True)
    for split, lines in SPLIT_FILES.items():
        (splits / f"{split}.txt").write_text("\n".join(lines) + "\n")
    for split, cls, name in (("train", 0, "Alpha/character01"), ("test", 4, "Beta/character02")):
        files = sorted(picked[name].glob("*.png"))
        loaded = episode_images(tmp_path, cache / "real", split, cls, 20)
        assert torch.equal(model.preprocess(files), loaded), name


def test_preprocess_refuses_what_it_cannot_prepare_in_one_line(omniglot, sinusoid_run, tmp_path):
    model = omniglot_model(omniglot)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = {
        "is not a readable image": [text],
        "float values must be finite and in [0, 1]": [np.full((28, 28), 200.0)],
        "expected H x W (grey)": [np.zeros((2, 28, 28, 3), dtype=np.uint8)],
        "list(array) if it is a stack": np.zeros((5, 28, 28), dtype=np.uint8),
        "got an empty one": [],
    }
    for message, images in cases.items():
        with pytest.raises(FewbenchError, match=re.escape(message)) as info:
            model.preprocess(images)
        assert "\n" not in str(info.value)
    generated = fewbench.load_learner(sinusoid_run)
    with pytest.raises(FewbenchError, match="sinusoid dataset has no raw examples to prepare"):
        generated.preprocess([np.zeros((4, 4), dtype=np.uint8)])


def natural_images(folder: Path, names: list[str], size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=95)


def first_class(dataset, root: Path, cache: Path, count: int) -> torch.Tensor:
    pool = dataset.load(root, cache)["train"]
    indices = EpisodeIndices(torch.tensor([[0]]), torch.arange(count)[None, None])
    return pool.gather(indices, shots=count).support_x[0]


def test_cub_miniimagenet_and_cifar_prepare_images_as_their_loaders_do(tmp_path):
    """The natural-image datasets: their own decoding (CUB's centre crop, mini-ImageNet's
    resize, CIFAR's none), then the training classes' normalisation, read from the cache."""
    from fewbench.registry import Registry

    registry, cache = Registry(), tmp_path / "cache"
    images = tmp_path / "cub" / "CUB_200_2011" / "images"
    for c in range(4):  # Chen et al.'s split: classes 0 and 2 train, 1 validates, 3 tests
        natural_images(images / f"{c + 1:03d}.Bird", [f"b{i}.jpg" for i in range(3)], (20, 26), c)
    cub = registry.get("dataset", "cub").build(image_size=8)
    files = sorted((images / "001.Bird").glob("*.jpg"))
    assert torch.equal(cub.preprocess(files, tmp_path, cache), first_class(cub, tmp_path, cache, 3))

    mini = tmp_path / "miniimagenet"
    for split in ("train", "val", "test"):
        names = [f"n{split}{c}_{i}.jpg" for c in range(2) for i in range(2)]
        natural_images(mini / "images", names, (12, 12), len(split))
        (mini / "splits" / "ravi").mkdir(parents=True, exist_ok=True)
        rows = [f"{n},n{split}{n[len(split) + 1]}" for n in names]
        (mini / "splits" / "ravi" / f"{split}.csv").write_text("\n".join(["filename,label", *rows]))
    dataset = registry.get("dataset", "miniimagenet").build(image_size=10)  # resized from 12
    files = sorted((mini / "images").glob("ntrain0_*.jpg"))
    prepared = dataset.preprocess(files, tmp_path, cache)
    assert prepared.shape == (2, 3, 10, 10) and prepared.mean().abs() < 1  # normalised
    assert torch.equal(prepared, first_class(dataset, tmp_path, cache, 2))

    base = tmp_path / "cifar100" / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine = list(range(100))
    for name in ("train", "test"):
        data = rng.integers(0, 256, (100, 3072), dtype=np.uint8)
        content = {"data": data, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]}
        (base / name).write_bytes(pickle.dumps(content, protocol=2))
    names = {"fine_label_names": [f"f{i}" for i in fine], "coarse_label_names": []}
    (base / "meta").write_bytes(pickle.dumps(names, protocol=2))
    fc100 = registry.get("dataset", "fc100").build()
    first = pickle.loads((base / "train").read_bytes())["data"][5]  # fine class 5: FC100 train
    as_seen = first.reshape(3, 32, 32).transpose(1, 2, 0)  # H x W x C, as a PNG holds it
    expected = first_class(fc100, tmp_path, cache, 1)
    assert torch.equal(fc100.preprocess([as_seen], tmp_path, cache), expected)
    with pytest.raises(FewbenchError, match="image 0: an image of 28 x 28 pixels; CIFAR-100's"):
        fc100.preprocess([as_seen[:28, :28]], tmp_path, cache)


# -- predict: shapes, values, labels ------------------------------------------------------------
def test_images_of_another_shape_are_refused_naming_expected_and_got(omniglot):
    model = omniglot_model(omniglot)
    labels = torch.arange(5)
    good = torch.rand(5, 1, 28, 28) * 0.2
    for wrong, got in (
        (torch.rand(5, 1, 105, 105), "[5, 1, 105, 105]"),  # the official files' size
        (torch.rand(5, 28, 28), "[5, 28, 28]"),  # no channel axis
        (torch.rand(5, 3, 28, 28), "[5, 3, 28, 28]"),
    ):
        for support, query, name in ((wrong, good, "support_x"), (good, wrong, "query_x")):
            with pytest.raises(FewbenchError) as info:
                model.predict(support, labels, query)
            message = str(info.value)
            assert message.startswith(f"{name}: expected [examples, 1x28x28]"), message
            assert f"got {got}" in message and "model.preprocess(images)" in message
            assert "\n" not in message
    with pytest.raises(FewbenchError, match=r"support_x: uint8 values.*model\.preprocess"):
        model.predict((good * 255).to(torch.uint8), labels, good)


def test_non_finite_examples_and_targets_are_refused(omniglot, sinusoid_run):
    model = omniglot_model(omniglot)
    support, query = torch.rand(5, 1, 28, 28) * 0.2, torch.rand(3, 1, 28, 28) * 0.2
    broken = support.clone()
    broken[2, 0, 4, 4] = float("nan")
    broken[3, 0, 0, 0] = float("inf")
    with pytest.raises(FewbenchError, match=r"support_x: 2 non-finite values .* in 2 of its 5"):
        model.predict(broken, torch.arange(5), query)
    with pytest.raises(FewbenchError, match=r"query_x: 2 non-finite values"):
        model.predict(support, torch.arange(5), broken[1:4])
    regression = fewbench.load_learner(sinusoid_run)
    x = torch.linspace(-5, 5, 8)[:, None]
    y = torch.sin(x[:5])
    two = torch.tensor([[False], [True], [False], [True], [False]])
    for support_x, support_y, query_x, message in (
        (torch.where(two, float("nan"), x[:5]), y, x, "support_x: 2 non-finite"),
        (x[:5], y, torch.full_like(x, float("inf")), "query_x: 8 non-finite"),
        (x[:5], torch.where(two, float("-inf"), y), x, "support_y: 2 non-finite targets"),
    ):
        with pytest.raises(FewbenchError, match=message):
            regression.predict(support_x, support_y, query_x)


def test_regression_inputs_and_targets_must_have_the_recorded_shape(sinusoid_run):
    model = fewbench.load_learner(sinusoid_run)
    x = torch.linspace(-5, 5, 8)[:, None]
    y = torch.sin(x[:5])
    cases = (
        ((x[:5, 0], y, x), r"support_x: expected \[examples, 1\] .* got \[5\]"),
        ((x[:5], y, x.repeat(1, 2)), r"query_x: expected \[examples, 1\] .* got \[8, 2\]"),
        ((x[:5], y[:4], x), r"support_y: expected 5 targets of 1 output\(s\)"),
        ((x[:5], y.repeat(1, 3), x), r"got shape \[5, 3\]"),
        ((x[:0], y[:0], x), "support_x: no examples"),
    )
    for arguments, message in cases:
        with pytest.raises(FewbenchError, match=message):
            model.predict(*arguments)
    # One output: targets [examples] are [examples, 1] (they broadcast to [5, 5] and trained
    # the adaptation on the wrong loss before).
    assert torch.equal(model.predict(x[:5], y[:, 0], x), model.predict(x[:5], y, x))
    assert torch.equal(model.predict(x[:5].double(), y.double(), x), model.predict(x[:5], y, x))


def test_labels_must_be_integers_0_to_n_minus_1_with_every_class_present(omniglot):
    model = omniglot_model(omniglot)
    support, query = torch.rand(5, 1, 28, 28) * 0.2, torch.rand(2, 1, 28, 28) * 0.2
    cases = {
        r"class labels must be integers 0\.\.n-1, got float32": torch.arange(5.0),
        r"class labels must be integers 0\.\.n-1, got bool": torch.tensor([1, 0, 1, 0, 1]) > 0,
        r"labels must be 0\.\.n-1, got -1": torch.tensor([-1, 0, 1, 2, 3]),
        r"1 of 0\.\.2 is missing": torch.tensor([0, 0, 2, 2, 2]),
        r"1, 3 of 0\.\.4 are missing": torch.tensor([0, 0, 2, 2, 4]),
        r"expected 5 labels, one per support example": torch.arange(4),
    }
    for message, labels in cases.items():
        with pytest.raises(FewbenchError, match=message) as info:
            model.predict(support, labels, query)
        assert "\n" not in str(info.value)
    # Six classes for a MAML head of five outputs (an IndexError deep in the loss before).
    with pytest.raises(FewbenchError, match=r"a head of 5 outputs: labels must be 0\.\.4"):
        model.predict(torch.rand(6, 1, 28, 28) * 0.2, torch.arange(6), query)
    # Fewer classes than the head: logits for the support set's classes only.
    three = model.predict(support[:3], torch.arange(3), query)
    assert three.shape == (2, 3) and torch.isfinite(three).all()
    # Labels in any order, as numpy integers.
    shuffled = model.predict(support[[2, 0, 1]], np.array([2, 0, 1]), query)
    assert torch.allclose(shuffled, three, atol=1e-5)


def test_a_prototype_learner_takes_more_ways_than_it_trained_but_no_absent_class(omniglot):
    """Prototypes follow the episode's classes, so 7 ways on a 5-way model are fine; a class
    with no support example had a 0/0 prototype and NaN logits before, silently."""
    model = omniglot_model(omniglot, PROTONET)
    support, query = torch.rand(7, 1, 28, 28) * 0.2, torch.rand(3, 1, 28, 28) * 0.2
    state = torch.random.get_rng_state()
    logits = model.predict(support, torch.arange(7), query)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    assert torch.equal(torch.random.get_rng_state(), state)  # asking the learner drew nothing
    with pytest.raises(FewbenchError, match=r"support_y: .*; 3 of 0\.\.4 is missing"):
        model.predict(support[:5], torch.tensor([0, 1, 2, 4, 4]), query)


# -- predict: values not prepared as the episodes were ------------------------------------------
def test_uninverted_or_unscaled_images_warn_and_prepared_ones_do_not(omniglot):
    root, cache, _ = omniglot
    model = omniglot_model(omniglot)
    drawn = [episode_images(root, cache, "test", cls, 2) for cls in (0, 4)]  # as episodes are
    support, query = torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])
    labels = torch.arange(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        prepared = model.predict(support, labels, query)
    assert torch.isfinite(prepared).all()
    with pytest.warns(InputWarning, match=r"query_x: 2 of its 2 images .*not inverted\?") as seen:
        model.predict(support, labels, 1 - query)  # the files as they look: dark on white
    assert "model.preprocess(images)" in str(seen[0].message)
    with pytest.warns(InputWarning, match="support_x: 2 of its 2 images"):
        model.predict(support * 255, labels, query)  # values on 0..255
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        model.predict(support, labels, 1 - query, check_values=False)


def test_without_the_training_data_the_value_check_says_it_did_not_run(omniglot, tmp_path):
    model = omniglot_model(omniglot)
    model.data_root = tmp_path / "nothing-here"
    x = torch.rand(2, 1, 28, 28) * 0.2
    with pytest.warns(InputWarning, match="cannot check that the images are prepared") as seen:
        model.predict(x, torch.arange(2), x)
    assert len(seen) == 1
    with warnings.catch_warnings():  # once per data root
        warnings.simplefilter("error", InputWarning)
        model.predict(x, torch.arange(2), 1 - x)


# -- evaluate -----------------------------------------------------------------------------------
def test_evaluate_needs_no_data_root_for_generated_tasks(sinusoid_run, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBENCH_DATA", str(tmp_path / "no-data-here"))
    model = fewbench.load_learner(sinusoid_run)
    assert list(model.evaluate()) == stored_values(sinusoid_run, model.cell.label)


def test_evaluate_finds_the_data_as_fewbench_run_does(omniglot, monkeypatch):
    root, cache, run_dir = omniglot
    monkeypatch.setenv("FEWBENCH_DATA", str(root))
    monkeypatch.setenv("FEWBENCH_CACHE", str(cache))
    model = fewbench.load_learner(run_dir, PROTONET)
    assert list(model.evaluate()) == stored_values(run_dir, PROTONET)
    monkeypatch.setenv("FEWBENCH_DATA", str(root.parent / "elsewhere"))
    with pytest.raises(FewbenchError, match="Omniglot not found"):
        fewbench.load_learner(run_dir, PROTONET).evaluate()


def test_the_example_classifies_a_folder_of_drawings(omniglot, tmp_path, monkeypatch, capsys):
    """examples/classify_drawings.py, as the docs show it: one drawing per character in
    support/, drawings to classify in query/. A query that is one of the support drawings
    is nearest its own prototype, so each must come back as its own character."""
    import importlib.util
    import shutil

    root, cache, run_dir = omniglot
    monkeypatch.setenv("FEWBENCH_DATA", str(root))
    monkeypatch.setenv("FEWBENCH_CACHE", str(cache))
    spec = importlib.util.spec_from_file_location(
        "classify_drawings", Path(__file__).parent.parent / "examples" / "classify_drawings.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    folder = tmp_path / "my_drawings"
    (folder / "query").mkdir(parents=True)
    for c in range(1, 5):
        first = drawings_of(root, f"Alpha/character0{c}")[0]
        (folder / "support" / f"char{c}").mkdir(parents=True)
        shutil.copy(first, folder / "support" / f"char{c}" / "a.png")
        shutil.copy(first, folder / "query" / f"is_char{c}.png")
    assert example.main([str(run_dir), str(folder), "--cell", PROTONET]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"is_char{c}.png\tchar{c}" for c in range(1, 5)]
    assert example.main([str(run_dir), str(tmp_path / "nothing"), "--cell", PROTONET]) == 2
