"""mini-ImageNet from generated files in both layouts: image folder + CSVs, and pickles."""

from __future__ import annotations

import csv
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image

from fewbench.data import root as datastore
from fewbench.errors import DataError
from fewbench.plugin.dataset import ClassPool
from fewbench_plugins.datasets.imaging import channel_statistics
from fewbench_plugins.datasets.miniimagenet import MiniImageNet, read_cache

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
    assert MiniImageNet.verify(base / "pickles" / "miniimagenet") == [
        f"mini-imagenet-cache-{split}.pkl holds {count} classes, expected {expected}"
        for (split, count), expected in zip(CLASSES.items(), (64, 16, 20), strict=True)
    ]


# -- received pickles: read without running anything, checked on import and on loading ---------
class Touch:
    """Unpickled by ``pickle.load``, this creates a file: what a hostile pickle could do."""

    def __init__(self, path: Path, how: str):
        self.path, self.how = path, how

    def __reduce__(self):
        if self.how == "open":
            return (open, (str(self.path), "w"))
        return (Path.touch, (self.path,))


def standard_pickles(folder: Path, image_data=None, class_dict=None, *, protocol=4) -> Path:
    """The three pickles with the standard 64/16/20 classes, one tiny-valued image each;
    ``image_data`` / ``class_dict`` replace the training split's."""
    folder.mkdir(parents=True)
    for split, count in {"train": 64, "val": 16, "test": 20}.items():
        data = {
            "image_data": np.full((count, SIZE, SIZE, 3), 7, dtype=np.uint8),
            "class_dict": {f"n{split}{c:04d}": [c] for c in range(count)},
        }
        if split == "train":
            data["image_data"] = data["image_data"] if image_data is None else image_data
            data["class_dict"] = data["class_dict"] if class_dict is None else class_dict
        blob = pickle.dumps(data, protocol=protocol)
        (folder / f"mini-imagenet-cache-{split}.pkl").write_bytes(blob)
    return folder


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("fewbench: error: ")
    return lines[0]


@pytest.mark.parametrize("how", ["open", "touch"])
def test_a_pickle_that_would_run_code_is_refused_at_import_and_at_load(tmp_path, how):
    marker = tmp_path / "pwned"
    hostile = {"image_data": Touch(marker, how), "class_dict": {"a": [0]}}
    pickle.loads(pickle.dumps(hostile))  # the plain unpickler does run it: a real threat
    assert marker.exists()
    marker.unlink()
    source = standard_pickles(tmp_path / "received", image_data=Touch(marker, how))
    root = tmp_path / "root"
    line = one_error_line(
        run_cli("data", "import", "miniimagenet", str(source), "--data-root", str(root))
    )
    assert "mini-imagenet-cache-train.pkl: refused to load the global" in line
    assert not marker.exists()
    assert not (root / "miniimagenet").exists() and not list(root.glob(".incoming-*"))
    shutil.copytree(source, root / "miniimagenet")  # put there by hand: loading refuses it too
    with pytest.raises(DataError, match="refused to load the global (io.open|pathlib.Path.touch)"):
        load(root, tmp_path / "cache")
    assert not marker.exists()


def test_a_valid_pickle_set_imports_and_loads(tmp_path):
    source = standard_pickles(tmp_path / "received", protocol=2)
    root = tmp_path / "root"
    result = run_cli("data", "import", "miniimagenet", str(source), "--data-root", str(root))
    assert result.returncode == 0 and "installed and verified" in result.stdout, result.stderr
    sources = load(root, tmp_path / "cache")
    assert sources["train"].images.shape == (64, 1, 3, SIZE, SIZE)
    assert sources["test"].images.shape == (20, 1, 3, SIZE, SIZE)


def test_pickles_written_with_numpy_1_load(tmp_path):
    """numpy 1 names ``numpy.core.multiarray``; numpy 2 ``numpy._core.multiarray``."""
    images = np.arange(2 * SIZE * SIZE * 3, dtype=np.uint64).astype(np.uint8)
    images = images.reshape(2, SIZE, SIZE, 3)
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    blob = pickle.dumps({"image_data": images, "class_dict": {"a": [1], "b": [0]}}, protocol=2)
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    loaded, classes = read_cache(path)
    assert np.array_equal(loaded, images) and classes == {"a": [1], "b": [0]}


@pytest.mark.parametrize(
    ("image_data", "class_dict", "message"),
    [
        (
            np.zeros((64, SIZE, SIZE, 3), np.float32),
            None,
            "must be a uint8 numpy array, not float32",
        ),
        (np.zeros((64, 32, 32, 3), np.uint8), None, r"has shape \(64, 32, 32, 3\), expected"),
        ([1, 2, 3], None, "must be a uint8 numpy array, not list"),
        (None, {"a": list(range(63)), "b": [64]}, "holds an index outside the 64 images"),
        (None, {"a": list(range(63))}, "image 63 \\(of 64\\) is in no class"),
        (None, {"a": ["0"]}, r"class_dict\['a'\] holds a str, not an image index"),
        (None, {"a": [True]}, "holds a bool, not an image index"),
    ],
    ids=[
        "float",
        "small-images",
        "not-an-array",
        "index-past-end",
        "uncovered",
        "str-index",
        "bool",
    ],
)
def test_a_malformed_pickle_is_refused_at_import_in_one_line(
    tmp_path, image_data, class_dict, message
):
    source = standard_pickles(tmp_path / "received", image_data, class_dict)
    with pytest.raises(DataError, match=message) as error:
        datastore.import_path(MiniImageNet, tmp_path / "root", source)
    assert "mini-imagenet-cache-train.pkl" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "root" / "miniimagenet").exists()


def test_a_truncated_or_foreign_pickle_is_one_line(tmp_path):
    folder = standard_pickles(tmp_path / "received")
    train = folder / "mini-imagenet-cache-train.pkl"
    train.write_bytes(train.read_bytes()[:5000])
    with pytest.raises(
        DataError, match="mini-imagenet-cache-train.pkl: not a mini-ImageNet pickle"
    ):
        read_cache(train)
    train.write_bytes(pickle.dumps(["not", "a", "dict"]))
    with pytest.raises(DataError, match="expected a dict with 'image_data' and 'class_dict'"):
        read_cache(train)


def test_suite_validates(tmp_path):
    result = run_cli("run", "suites/miniimagenet.yaml", "--dry-run", "--data-root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("4 cells")


# -- example_ids: what stands behind each example, in the pool's order -------------------------
UNEVEN = {"train": [3, 2], "val": [2, 3], "test": [4, 3, 5]}  # images per class, unequal


def make_uneven(root: Path, form: str, seed: int = 1) -> Path:
    """A small mini-ImageNet in ``form`` whose classes hold unequal counts (the pool cuts them
    to the smallest), listed out of order: shuffled CSV rows, or pickled class indices in
    neither label nor index order."""
    rng = np.random.default_rng(seed)
    folder = root / "miniimagenet"
    (folder / "images").mkdir(parents=True)
    (folder / "splits" / "ravi").mkdir(parents=True)
    for split, counts in UNEVEN.items():
        wnids = [f"n{split[:2]}{c:06d}" for c in range(len(counts))]
        if form == "images":
            rows = []
            for wnid, count in zip(wnids, counts, strict=True):
                for i in range(count):
                    name = f"{wnid}{i:08d}.jpg"
                    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / "images" / name, quality=95)
                    rows.append((name, wnid))
            rng.shuffle(rows)
            with open(folder / "splits" / "ravi" / f"{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows([("filename", "label"), *rows])
        else:
            images = rng.integers(0, 256, (sum(counts), SIZE, SIZE, 3), dtype=np.uint8)
            where = rng.permutation(len(images)).tolist()
            class_dict, start = {}, 0
            for wnid, count in reversed(list(zip(wnids, counts, strict=True))):
                class_dict[wnid] = where[start : start + count]
                start += count
            with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
                pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    return root


@pytest.mark.parametrize("form", ["images", "pickle"])
def test_example_ids_name_the_files_the_pool_holds(tmp_path, form):
    root = make_uneven(tmp_path / "root", form)
    dataset = MiniImageNet(image_size=8, normalize=False)
    sources = dataset.load(root, tmp_path / "cache")
    for split, counts in UNEVEN.items():
        ids, pool = dataset.example_ids(root, split), sources[split]
        assert [len(row) for row in ids] == [min(counts)] * len(counts)
        assert pool.images.shape[:2] == (len(ids), min(counts))
        assert len({name for row in ids for name in row}) == len(counts) * min(counts)
    ids, pool = dataset.example_ids(root, "test"), sources["test"]
    last_c, last_e = len(ids) - 1, len(ids[0]) - 1
    for c, e in [(0, 0), (0, last_e), (1, 1), (last_c, 0), (last_c, last_e)]:
        name = ids[c][e]
        if form == "images":
            assert name.startswith("miniimagenet/images/") and "#" not in name
            example = root / name
        else:
            path, _, index = name.partition("#")
            assert path == "miniimagenet/mini-imagenet-cache-test.pkl"
            example = read_cache(root / path)[0][int(index)]  # an 84 x 84 x 3 array
        assert torch.equal(dataset.decode_examples([example])[0], pool.images[c, e]), (c, e)


def test_draw_episodes_names_examples_by_file(tmp_path, registry):
    from fewbench.episodes.draw import EpisodeSetting, draw_episodes

    root = make_uneven(tmp_path / "root", "pickle")
    config = {"name": "miniimagenet", "image_size": 8, "normalize": False}
    setting = EpisodeSetting(config, ways=2, shots=1, query=2, seed=0, episodes=2)
    drawn = draw_episodes(setting, root, tmp_path / "cache", registry)
    support = drawn.episode(0)["support"]
    assert len(support) == 2
    assert all(name.startswith("miniimagenet/mini-imagenet-cache-test.pkl#") for _, name in support)
