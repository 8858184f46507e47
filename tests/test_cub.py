"""CUB from a generated archive in the official layout: Chen et al.'s split, ragged classes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from stored import checked_against, tar_gz

from fewbench.data import root as datastore
from fewbench_plugins.datasets.cub import CUB, chen_split

COUNTS = [3, 5, 4, 6, 3, 4, 5, 6]  # images per class, unequal as in CUB


def fake_cub(seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    members = {}
    for c, count in enumerate(COUNTS):
        for i in range(count):
            # Bright images (>= 100) of odd sizes: padding (zeros) would show.
            pixels = rng.integers(100, 256, (90 + 7 * i, 120, 3), dtype=np.uint8)
            raw = io.BytesIO()
            Image.fromarray(pixels).save(raw, format="JPEG", quality=95)
            members[f"CUB_200_2011/images/{c + 1:03d}.Bird_{c}/Bird_{c}_{i:04d}.jpg"] = (
                raw.getvalue()
            )
    return tar_gz(members)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("cub")
    archive = base / "CUB_200_2011.tgz"
    archive.write_bytes(fake_cub())

    def images_folder_exists(cls, folder):  # the real check wants all 11,788 images
        return [] if (folder / "CUB_200_2011" / "images").is_dir() else ["missing"]

    generated = checked_against(CUB, archive, verify=images_folder_exists)
    root = base / "root"
    datastore.import_path(generated, root, archive)
    return root


def test_chen_split_rule():
    assert [chen_split(i) for i in range(8)] == ["train", "val", "train", "test"] * 2
    assert [sum(chen_split(i) == s for i in range(200)) for s in ("train", "val", "test")] == [
        100,
        50,
        50,
    ]


def test_splits_counts_and_no_padding_drawn(root, tmp_path):
    sources = CUB(image_size=32, normalize=False).load(root, tmp_path)
    assert {s: p.num_classes for s, p in sources.items()} == {"train": 4, "val": 2, "test": 2}
    train = sources["train"]
    assert train.counts.tolist() == [COUNTS[0], COUNTS[2], COUNTS[4], COUNTS[6]]
    assert train.examples_per_class == 3 and train.images.shape[1] == 5
    sizes = CUB(image_size=32, normalize=False).split_sizes(root)
    assert (sizes["test"].classes, sizes["test"].examples_per_class) == (2, 6)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        episodes = train.sample_episodes(4, 2, 1, 2, g)
        assert episodes.support_x.min() > 0.2 and episodes.query_x.min() > 0.2  # no zero padding
        labelled = train.sample_labelled(16, g)
        assert labelled.x.amin(dim=(1, 2, 3)).min() > 0.2


def test_normalised_with_training_statistics(root, tmp_path):
    sources = CUB(image_size=32, normalize=True).load(root, tmp_path)
    train = sources["train"]
    real = torch.cat([train.images[c, :n] for c, n in enumerate(train.counts.tolist())])
    scaled = train._scale(real)
    torch.testing.assert_close(scaled.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3, rtol=0)
    assert torch.equal(sources["test"].mean, train.mean)


def test_example_ids_name_the_files_the_pool_holds(root, tmp_path):
    """Every real image of a class, none for the padding, in the order the pool holds them."""
    dataset = CUB(image_size=32, normalize=False)
    sources = dataset.load(root, tmp_path)
    for split in ("train", "val", "test"):
        ids, pool = dataset.example_ids(root, split), sources[split]
        assert [len(row) for row in ids] == pool.counts.tolist()
    ids, pool = dataset.example_ids(root, "train"), sources["train"]
    assert [len(row) for row in ids] == [COUNTS[0], COUNTS[2], COUNTS[4], COUNTS[6]]
    assert ids[1][0] == "cub/CUB_200_2011/images/003.Bird_2/Bird_2_0000.jpg"
    last = len(ids) - 1
    for c, e in [(0, 0), (0, COUNTS[0] - 1), (1, 2), (last, 0), (last, len(ids[last]) - 1)]:
        decoded = dataset.decode_examples([root / ids[c][e]])[0]
        assert torch.equal(decoded, pool.images[c, e]), (c, e)


def test_draw_episodes_names_examples_by_file(root, tmp_path, registry):
    from fewbench.episodes.draw import EpisodeSetting, draw_episodes

    config = {"name": "cub", "image_size": 16, "normalize": False}
    setting = EpisodeSetting(config, ways=2, shots=1, query=2, seed=0, episodes=2)
    drawn = draw_episodes(setting, root, tmp_path, registry)
    names = [name for _, name in drawn.episode(1)["support"] + drawn.episode(1)["query"]]
    assert len(names) == 6 and all(name.startswith("cub/CUB_200_2011/images/") for name in names)
    assert all((root / name).is_file() for name in names)
