"""mini-ImageNet from generated files in both layouts: image folder + CSVs, and pickles."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from fewbench.data import ClassPool
from fewbench.errors import DataError
from fewbench_plugins.datasets.imaging import channel_statistics
from fewbench_plugins.datasets.miniimagenet import MiniImageNet

CLASSES = {"train": 6, "val": 3, "test": 4}
PER_CLASS = 7
SIZE = 84


def make_images(root, seed=0):
    """Random 84x84 JPEGs in the real layout; returns the decoded pixels for the pickle form."""
    rng = np.random.default_rng(seed)
    folder = root / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    (folder / "splits" / "ravi").mkdir(parents=True)
    pixels = {}
    for split, count in CLASSES.items():
        rows = []
        for c in range(count):
            wnid = f"n{split[:2]}{c:06d}"
            for i in range(PER_CLASS):
                name = f"{wnid}{i:08d}.jpg"
                image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / "images" / name, quality=100)
                # Keep what the JPEG decodes to, so the pickle form holds the same pixels.
                pixels.setdefault(split, {}).setdefault(wnid, []).append(
                    np.asarray(Image.open(folder / "images" / name).convert("RGB"))
                )
                rows.append((name, wnid))
        rng.shuffle(rows)  # classes in any order in the CSV
        with open(folder / "splits" / "ravi" / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
    return folder, pixels


def make_pickles(root, pixels):
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    for split, classes in pixels.items():
        images, class_dict = [], {}
        for wnid in reversed(list(classes)):  # another order than the folder's
            class_dict[wnid] = list(range(len(images), len(images) + len(classes[wnid])))
            images += classes[wnid]
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, f)


def load(root, cache, **params):
    config = {"image_size": SIZE, "normalize": True, **params}
    return MiniImageNet(**config).load(root, cache)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    base = tmp_path_factory.mktemp("mini")
    _, pixels = make_images(base / "folder")
    make_pickles(base / "pickles", pixels)
    return base, pixels


def test_both_forms_give_the_same_classes_and_pixels(layouts, tmp_path):
    base, pixels = layouts
    from_folder = load(base / "folder", tmp_path / "cache-a")
    from_pickles = load(base / "pickles", tmp_path / "cache-b")
    for split, count in CLASSES.items():
        a, b = from_folder[split], from_pickles[split]
        assert isinstance(a, ClassPool) and a.images.shape == (count, PER_CLASS, 3, SIZE, SIZE)
        assert torch.equal(a.images, b.images)
        first = sorted(pixels[split])[0]  # classes ordered by label
        expected = np.stack(pixels[split][first]).transpose(0, 3, 1, 2)
        assert np.array_equal(a.images[0].numpy(), expected)
    sizes = MiniImageNet(image_size=SIZE, normalize=True).split_sizes(base / "folder")
    assert (sizes["train"].classes, sizes["train"].examples_per_class) == (6, PER_CLASS)


def test_cache_is_memory_mapped_and_reused(layouts, tmp_path):
    base, _ = layouts
    dataset = MiniImageNet(image_size=SIZE, normalize=True)
    folder = base / "folder" / "miniimagenet"
    array, meta = dataset._split_array(folder, tmp_path, "images", "train")
    assert isinstance(array, np.memmap) and str(array.filename).endswith("train-images-84.npy")
    cache = tmp_path / "miniimagenet" / "train-images-84.npy"
    stamp = cache.stat().st_mtime_ns
    again, _ = dataset._split_array(folder, tmp_path, "images", "train")  # read, not rebuilt
    assert cache.stat().st_mtime_ns == stamp
    assert np.array_equal(array, again) and len(meta["mean"]) == 3


def test_images_are_normalised_with_training_statistics(layouts, tmp_path):
    base, _ = layouts
    sources = load(base / "folder", tmp_path)
    train = sources["train"]
    mean, std = channel_statistics(train.images.numpy())
    torch.testing.assert_close(train.mean, torch.tensor(mean))
    episodes = train.sample_episodes(4, 5, 1, 2, torch.Generator().manual_seed(0))
    assert episodes.support_x.shape == (4, 5, 3, SIZE, SIZE)
    everything = train._scale(train.images.reshape(-1, 3, SIZE, SIZE))
    torch.testing.assert_close(everything.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(everything.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)
    assert torch.equal(sources["val"].mean, train.mean)  # validation uses the training statistics
    raw = load(base / "folder", tmp_path, normalize=False)["train"]
    assert raw.mean is None


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(
        DataError, match="cannot be downloaded .* fewbench data import miniimagenet"
    ):
        MiniImageNet(image_size=SIZE, normalize=True).split_sizes(tmp_path)
    listing = run_cli("data", "list", "--data-root", str(tmp_path)).stdout
    assert (
        "miniimagenet   missing" in listing and "fewbench data import miniimagenet PATH" in listing
    )
    assert (
        "miniimagenet cannot be downloaded"
        in run_cli("data", "download", "miniimagenet", "--data-root", str(tmp_path)).stderr
    )


def test_verify_counts_classes_and_files(layouts):
    base, _ = layouts
    problems = MiniImageNet.verify(base / "folder" / "miniimagenet")
    assert "train.csv lists 6 classes, expected 64" in problems
    assert MiniImageNet.verify(base / "pickles" / "miniimagenet") == []


def test_suite_validates(tmp_path):
    result = run_cli("run", "suites/miniimagenet.yaml", "--dry-run", "--data-root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("4 cells")
