"""Issue 29 (6): decoded-image caches are keyed by the files, and verify decodes a sample.

The caches were keyed by image names and size only: with a warm cache, a data root of
empty PNGs under the same names "trained" on the real images cached from another root,
and ``data import`` / ``data list`` called that tree verified (they counted files). Each
test builds small files in the official layout under ``tmp_path``; together they take a
few seconds.
"""

from __future__ import annotations

import csv
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fewbench_plugins.datasets.cub as cub_module
import fewbench_plugins.datasets.miniimagenet as mini_module
import fewbench_plugins.datasets.omniglot as omniglot_module
from fewbench.data import root as datastore
from fewbench.data.cache import source_key
from fewbench.errors import DataError
from fewbench_plugins.datasets.cifar import FC100
from fewbench_plugins.datasets.cub import CUB
from fewbench_plugins.datasets.miniimagenet import MiniImageNet
from fewbench_plugins.datasets.omniglot import BACKGROUND, EVALUATION, Omniglot

# -- generated data, in each dataset's official layout ---------------------------------------

OMNIGLOT_PARTS = {BACKGROUND: ("Alpha", "Beta"), EVALUATION: ("Gamma",)}
OMNIGLOT_CHARACTERS = 2  # per alphabet: 6 characters, 120 drawings
OMNIGLOT_SPLITS = {
    "train": [f"{a}/character{c:02d}" for a in ("Alpha", "Beta") for c in (1, 2)],
    "val": ["Gamma/character01"],
    "test": ["Gamma/character02"],
}


def omniglot_root(root: Path, seed: int, *, empty: bool = False) -> Path:
    """``root/omniglot`` with 8x8 random drawings (or empty ``.png`` files); returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = root / "omniglot"
    for part, alphabets in OMNIGLOT_PARTS.items():
        for alphabet in alphabets:
            for c in range(1, OMNIGLOT_CHARACTERS + 1):
                character = folder / part / alphabet / f"character{c:02d}"
                character.mkdir(parents=True)
                for d in range(omniglot_module.DRAWINGS_PER_CHARACTER):
                    png = character / f"{c:04d}_{d:02d}.png"
                    if empty:
                        png.write_bytes(b"")
                    else:
                        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(png)
    splits = folder / "splits" / "vinyals"
    splits.mkdir(parents=True)
    for split, names in OMNIGLOT_SPLITS.items():
        (splits / f"{split}.txt").write_text("".join(f"{n}/rot000\n" for n in names))
    return root


def omniglot(root: Path, cache: Path) -> torch.Tensor:
    """Every split's images, concatenated, as loaded through ``cache``."""
    sources = Omniglot(split="vinyals", image_size=8).load(root, cache)
    return torch.cat([sources[s].images for s in ("train", "val", "test")])


@pytest.fixture
def small_omniglot_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """verify's expected counts, for the generated folder (the real ones need 32,460 files)."""
    monkeypatch.setattr(omniglot_module, "EXPECTED", {BACKGROUND: (2, 4), EVALUATION: (1, 2)})
    monkeypatch.setattr(
        omniglot_module, "SPLIT_LINES", {s: len(n) for s, n in OMNIGLOT_SPLITS.items()}
    )


CUB_COUNTS = [3, 2, 3, 2, 2, 3, 2, 2]  # eight classes: Chen's split gives 4 / 2 / 2


def cub_root(root: Path, seed: int, *, empty: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    images = root / "cub" / "CUB_200_2011" / "images"
    for c, count in enumerate(CUB_COUNTS):
        folder = images / f"{c + 1:03d}.Bird_{c}"
        folder.mkdir(parents=True)
        for i in range(count):
            jpg = folder / f"Bird_{c}_{i:04d}.jpg"
            if empty:
                jpg.write_bytes(b"")
            else:
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(jpg, quality=95)
    return root


def cub(root: Path, cache: Path) -> torch.Tensor:
    sources = CUB(image_size=8, normalize=False).load(root, cache)
    return torch.cat([sources[s].images.flatten() for s in ("train", "val", "test")])


def cifar_root(root: Path, seed: int) -> Path:
    """``root/cifar100/cifar-100-python/{train,test,meta}``: one train, one test image per class."""
    rng = np.random.default_rng(seed)
    base = root / "cifar100" / "cifar-100-python"
    base.mkdir(parents=True)
    for name in ("train", "test"):
        fine = np.arange(100)
        content = {
            "data": rng.integers(0, 256, (100, 3072), dtype=np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
        }
        (base / name).write_bytes(pickle.dumps(content, protocol=2))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []}
    (base / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


MINI_CLASSES = {"train": 2, "val": 1, "test": 1}


def mini_root(root: Path, seed: int, *, empty: bool = False) -> Path:
    """mini-ImageNet's image folder and Ravi CSVs, two 12x12 JPEGs per class."""
    rng = np.random.default_rng(seed)
    folder = root / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    (folder / "splits" / "ravi").mkdir(parents=True)
    for split, count in MINI_CLASSES.items():
        rows = []
        for c in range(count):
            for i in range(2):
                name = f"n{split[:2]}{c:06d}{i:08d}.jpg"
                if empty:
                    (folder / "images" / name).write_bytes(b"")
                else:
                    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / "images" / name, quality=95)
                rows.append((name, f"n{split[:2]}{c:06d}"))
        with open(folder / "splits" / "ravi" / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "label"), *rows])
    return root


def mini(root: Path, cache: Path) -> torch.Tensor:
    sources = MiniImageNet(image_size=12, normalize=False).load(root, cache)
    return torch.cat([sources[s].images.flatten() for s in ("train", "val", "test")])


def same_times(source: Path, target: Path) -> None:
    """Give ``target`` the modification time of ``source`` (a copy that kept its times)."""
    stat = source.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# -- the key ----------------------------------------------------------------------------------


def test_source_key_covers_the_root_names_sizes_times_and_sampled_bytes(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    files = []
    for i in range(5):
        files.append(root / f"{i}.bin")
        files[-1].write_bytes(bytes([i]) * 100)
    key = source_key(root, files)
    assert key == source_key(root, [str(f) for f in files])  # stable, str or Path
    # Another root holding a copy with the same names, sizes and times.
    copy = tmp_path / "b"
    shutil.copytree(root, copy)
    assert source_key(copy, [copy / f.name for f in files]) != key
    # Different bytes, same size and time.
    stat = files[2].stat()
    files[2].write_bytes(b"x" * 100)
    os.utime(files[2], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = source_key(root, files)
    assert changed != key
    # Emptied, truncated, touched: each a different key.
    files[3].write_bytes(b"")
    assert source_key(root, files) != changed
    stamp = files[4].stat().st_mtime_ns
    os.utime(files[4], ns=(stamp + 10**9, stamp + 10**9))
    assert len({changed, source_key(root, files), source_key(root, files[:4])}) == 3
    with pytest.raises(DataError, match="5.bin cannot be read"):
        source_key(root, [*files, root / "5.bin"])


# -- Omniglot: the reproducer, at small scale -----------------------------------------


def test_a_warm_cache_is_not_served_for_a_root_of_empty_pngs(tmp_path):
    cache = tmp_path / "cache"
    real = omniglot(omniglot_root(tmp_path / "real", seed=0), cache)
    assert real.shape == (6, 20, 1, 8, 8)
    empty = omniglot_root(tmp_path / "empty", seed=0, empty=True)
    with pytest.raises(DataError, match=r"empty/omniglot/.*\.png is not a readable image"):
        omniglot(empty, cache)


def test_another_root_of_the_same_names_gives_its_own_images(tmp_path):
    cache = tmp_path / "cache"
    first = omniglot(omniglot_root(tmp_path / "first", seed=0), cache)
    second = omniglot(omniglot_root(tmp_path / "second", seed=1), cache)
    assert not torch.equal(first, second)
    assert torch.equal(second, omniglot(tmp_path / "second", tmp_path / "fresh"))


def test_a_changed_drawing_rebuilds_and_a_truncated_one_is_one_line(tmp_path):
    root, cache = omniglot_root(tmp_path / "root", seed=0), tmp_path / "cache"
    before = omniglot(root, cache)
    assert torch.equal(omniglot(root, cache), before)  # warm
    drawing = root / "omniglot" / BACKGROUND / "Beta" / "character02" / "0002_07.png"
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(drawing)  # new size and time
    after = omniglot(root, cache)
    assert not torch.equal(after, before)
    assert torch.equal(after, omniglot(root, tmp_path / "fresh"))
    drawing.write_bytes(drawing.read_bytes()[:40])
    with pytest.raises(DataError, match=r"0002_07\.png is not a readable image") as error:
        omniglot(root, cache)
    assert "\n" not in str(error.value)


def test_omniglot_verify_decodes_a_sample(tmp_path, small_omniglot_counts):
    real = omniglot_root(tmp_path / "real", seed=0)
    empty = omniglot_root(tmp_path / "empty", seed=0, empty=True)
    assert Omniglot.verify(real / "omniglot") == []
    (problem,) = Omniglot.verify(empty / "omniglot")
    assert problem.startswith(str(empty / "omniglot")) and "is not a readable image" in problem
    # data import refuses the tree; data list shows it present, not verified.
    with pytest.raises(DataError, match="not a complete omniglot folder: .* not a readable image"):
        datastore.import_path(Omniglot, tmp_path / "root", empty / "omniglot")
    assert datastore.status(Omniglot, real).state == "verified"
    status = datastore.status(Omniglot, empty)
    assert status.state == "present" and "not a readable image" in status.problems[0]


# -- CUB --------------------------------------------------------------------------------------


def test_cub_warm_cache_is_not_served_for_empty_jpgs_and_verify_decodes(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real = cub(cub_root(tmp_path / "real", seed=0), cache)
    other = cub(cub_root(tmp_path / "other", seed=1), cache)
    assert not torch.equal(real, other)
    empty = cub_root(tmp_path / "empty", seed=0, empty=True)
    with pytest.raises(DataError, match=r"empty/cub/.*\.jpg is not a readable image"):
        cub(empty, cache)
    monkeypatch.setattr(cub_module, "CLASSES", len(CUB_COUNTS))
    monkeypatch.setattr(cub_module, "IMAGES", sum(CUB_COUNTS))
    assert CUB.verify(tmp_path / "real" / "cub") == []
    (problem,) = CUB.verify(empty / "cub")
    assert "Bird_0_0000.jpg is not a readable image" in problem


# -- the pickle datasets ----------------------------------------------------------------------


def test_cifar_cache_follows_every_pickle_and_verify_sees_a_truncated_one(tmp_path):
    cache = tmp_path / "cache"
    first = cifar_root(tmp_path / "first", seed=0)
    before = FC100(normalize=False).load(first, cache)["train"].images
    # The same files but another test pickle (same size), times kept: the old key (the
    # train pickle's size and time) served the first root's images.
    second = tmp_path / "second" / "cifar100" / "cifar-100-python"
    shutil.copytree(first / "cifar100" / "cifar-100-python", second)
    other = cifar_root(tmp_path / "other", seed=1) / "cifar100" / "cifar-100-python"
    shutil.copyfile(other / "test", second / "test")
    same_times(first / "cifar100" / "cifar-100-python" / "test", second / "test")
    after = FC100(normalize=False).load(tmp_path / "second", cache)["train"].images
    assert not torch.equal(before, after)
    assert torch.equal(
        after, FC100(normalize=False).load(tmp_path / "second", tmp_path / "x")["train"].images
    )
    assert FC100.verify(tmp_path / "second" / "cifar100") == []
    train = second / "train"
    train.write_bytes(train.read_bytes()[:-100])
    (problem,) = FC100.verify(tmp_path / "second" / "cifar100")
    assert f"{train} is not a whole pickle" in problem
    with pytest.raises(DataError, match=r"cifar-100-python/train: not a CIFAR-100 pickle"):
        FC100(normalize=False).load(tmp_path / "second", cache)


def test_miniimagenet_cache_follows_the_images_and_verify_decodes(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    root = mini_root(tmp_path / "root", seed=0)
    before = mini(root, cache)
    # One image replaced (the CSVs untouched: the old key was the CSV's size and time).
    image = sorted((root / "miniimagenet" / "images").iterdir())[0]
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(image, quality=95)
    after = mini(root, cache)
    assert not torch.equal(before, after)
    assert torch.equal(after, mini(root, tmp_path / "fresh"))
    empty = mini_root(tmp_path / "empty", seed=0, empty=True)
    with pytest.raises(DataError, match=r"empty/miniimagenet/images/.*\.jpg is not a readable"):
        mini(empty, cache)
    monkeypatch.setattr(mini_module, "STANDARD", MINI_CLASSES)
    assert MiniImageNet.verify(root / "miniimagenet") == []
    (problem,) = MiniImageNet.verify(empty / "miniimagenet")
    assert problem.startswith(str(empty / "miniimagenet" / "images")) and "readable" in problem


def test_a_cifar_pickle_that_names_a_callable_runs_nothing(tmp_path):
    """CIFAR-100's pickles were read with pickle.load: a crafted folder given to `data import`
    could run code while its cache was built. They are read as mini-ImageNet's are."""
    import pickle

    from fewbench.errors import DataError
    from fewbench_plugins.datasets.cifar import _read

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "train").write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(DataError, match="refused to load the global .*could run code"):
        _read(tmp_path / "train")
    assert not marker.exists()
