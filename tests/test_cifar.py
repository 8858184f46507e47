"""FC100 from a generated CIFAR-100 archive in the official layout."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from stored import checked_against, tar_gz

from fewbench.data import root as datastore
from fewbench_plugins.datasets.cifar import (
    CIFAR_FS_TEST,
    CIFAR_FS_VAL,
    FC100,
    FC100_SUPERCLASSES,
    CifarFS,
)


def fake_cifar100(train_per_class=5, test_per_class=1, seed=0) -> bytes:
    """cifar-100-python/{train,test,meta} pickles; fine class f belongs to superclass f // 5."""
    rng = np.random.default_rng(seed)
    files = {}
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        data[:, 0] = fine  # the first pixel names the class, to check grouping
        files[name] = {
            "data": data,
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
        }
    # The CIFAR-FS validation and test classes by name (classes 0-35), the others f<i>.
    names = [*CIFAR_FS_VAL, *CIFAR_FS_TEST] + [f"f{i}" for i in range(36, 100)]
    files["meta"] = {
        "fine_label_names": names,
        "coarse_label_names": [f"c{i}" for i in range(20)],
    }
    return tar_gz({f"cifar-100-python/{n}": pickle.dumps(c, protocol=2) for n, c in files.items()})


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("cifar")
    archive = base / "cifar-100-python.tar.gz"
    archive.write_bytes(fake_cifar100())

    generated = checked_against(FC100, archive)
    root = base / "root"
    datastore.import_path(generated, root, archive)
    assert datastore.status(generated, root).state == "verified"
    return root, base / "cache"


def test_fc100_splits_by_superclass(installed):
    root, cache = installed
    sources = FC100(normalize=False).load(root, cache)
    sizes = {s: sources[s].num_classes for s in sources}
    assert sizes == {"train": 60, "val": 20, "test": 20}
    assert FC100(normalize=False).split_sizes(root)["val"].classes == 20
    for split, superclasses in FC100_SUPERCLASSES.items():
        first_pixels = sources[split].images[:, :, 0, 0, 0]  # each image's fine class
        classes = first_pixels[:, 0].tolist()
        assert all((first_pixels[i] == c).all() for i, c in enumerate(classes))  # grouped by class
        assert {c // 5 for c in classes} == set(superclasses)
        assert sources[split].examples_per_class == 6  # train and test images of a class together
    episodes = sources["test"].sample_episodes(3, 5, 1, 5, torch.Generator().manual_seed(0))
    assert episodes.query_x.shape == (3, 25, 3, 32, 32)


def test_fc100_normalises_with_training_statistics(installed):
    root, cache = installed
    sources = FC100(normalize=True).load(root, cache)
    train = sources["train"]
    scaled = train._scale(train.images.reshape(-1, 3, 32, 32))
    torch.testing.assert_close(scaled.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3, rtol=0)
    assert torch.equal(sources["test"].mean, train.mean)


def test_a_missing_archive_says_what_to_run(tmp_path):
    with pytest.raises(Exception, match="fewbench data download fc100"):
        FC100(normalize=True).split_sizes(tmp_path)


def test_cifar_fs_takes_its_classes_by_name(installed):
    root, cache = installed
    sources = CifarFS(normalize=False).load(root, cache)
    assert {s: p.num_classes for s, p in sources.items()} == {"train": 64, "val": 16, "test": 20}
    # In the generated archive, class i is named: val names are 0-15, test names 16-35.
    val = sorted(sources["val"].images[:, 0, 0, 0, 0].tolist())
    test = sorted(sources["test"].images[:, 0, 0, 0, 0].tolist())
    assert val == list(range(16)) and test == list(range(16, 36))
    assert sorted(sources["train"].images[:, 0, 0, 0, 0].tolist()) == list(range(36, 100))
    assert CifarFS(normalize=False).split_sizes(root)["train"].classes == 64


@pytest.mark.parametrize("kind", [FC100, CifarFS])
def test_example_ids_name_the_pickled_images_the_pool_holds(installed, kind):
    """``<pickle>#<row>``: each class's train images, then its test image, as the pool."""
    root, cache = installed
    dataset = kind(normalize=False)
    sources = dataset.load(root, cache)
    rows = {}
    for name in ("train", "test"):
        path = root / "cifar100" / "cifar-100-python" / name
        rows[path.relative_to(root).as_posix()] = pickle.loads(path.read_bytes())["data"]
    for split, pool in sources.items():
        ids = dataset.example_ids(root, split)
        assert [len(row) for row in ids] == [6] * pool.num_classes
        assert ["test" in n.split("#")[0] for n in ids[0]] == [False] * 5 + [True]
        last = pool.num_classes - 1
        for c, e in [(0, 0), (0, 5), (1, 3), (last, 0), (last, 5)]:
            path, _, row = ids[c][e].partition("#")
            pixels = rows[path][int(row)].reshape(3, 32, 32).transpose(1, 2, 0)  # as a user's
            decoded = dataset.decode_examples([pixels])[0]
            assert torch.equal(decoded, pool.images[c, e]), (split, c, e)


def test_draw_episodes_names_examples_by_pickle_and_row(installed, registry):
    from fewbench.episodes.draw import EpisodeSetting, draw_episodes

    root, cache = installed
    setting = EpisodeSetting({"name": "fc100"}, ways=3, shots=1, query=2, seed=0, episodes=2)
    drawn = draw_episodes(setting, root, cache, registry)
    names = [name for _, name in drawn.episode(0)["support"] + drawn.episode(0)["query"]]
    assert len(names) == 9
    assert all(name.startswith("cifar100/cifar-100-python/") and "#" in name for name in names)
