"""Omniglot's split: finn (Finn et al.'s random character split), on generated folders.

The folders follow the official layout (images_background / images_evaluation /
<Alphabet>/characterNN/*.png, splits/vinyals/*.txt). Small generated drawings keep
loading fast; the real-size counts come from a folder of empty character folders,
which is all ``split_sizes`` reads.
"""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewbench.data.check import expand_and_check as expand
from fewbench.plugin.dataset import ClassPool
from fewbench.running.evaluation import dataset_identity
from fewbench.suite.loading import parse_yaml
from fewbench_plugins.datasets.omniglot import (
    BACKGROUND,
    DRAWINGS_PER_CHARACTER,
    EVALUATION,
    Omniglot,
    RotatedCharacters,
    finn_split,
)

SIZE = 8  # pixels; the drawings are written at this size, so decoding does not resample
# Where a drawing's character and drawing number are written (off every symmetry axis,
# so a quarter turn moves them): stored ink value 10 + 5 * character, 10 + 10 * drawing.
CHARACTER_PIXEL, DRAWING_PIXEL = (1, 2), (5, 6)


def official_names(alphabets: int, characters: list[int], prefix: str) -> list[str]:
    return [
        f"{prefix}{a:02d}/character{c:02d}"
        for a in range(alphabets)
        for c in range(1, characters[a] + 1)
    ]


def make_folder(
    root: Path, background: list[str], evaluation: list[str], drawings: bool
) -> dict[str, int]:
    """An Omniglot folder under ``root/omniglot``; returns each character's number."""
    numbers = {}
    for part, names in ((BACKGROUND, background), (EVALUATION, evaluation)):
        for name in names:
            folder = root / "omniglot" / part / name
            folder.mkdir(parents=True)
            numbers[name] = len(numbers)
            if not drawings:
                continue
            for drawing in range(DRAWINGS_PER_CHARACTER):
                ink = np.zeros((SIZE, SIZE), dtype=np.uint8)
                ink[CHARACTER_PIXEL] = 10 + 5 * numbers[name]
                ink[DRAWING_PIXEL] = 10 + 10 * drawing
                # Omniglot draws dark strokes on white; the plugin inverts them.
                Image.fromarray(255 - ink).save(folder / f"{numbers[name]:04d}_{drawing:02d}.png")
    return numbers


def write_vinyals(root: Path, splits: dict[str, list[str]]) -> None:
    folder = root / "omniglot" / "splits" / "vinyals"
    folder.mkdir(parents=True)
    for split, names in splits.items():
        lines = [f"{name}/{rot}" for name in names for rot in ("rot000", "rot090", "rot180")]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


# 36 characters in 9 alphabets: finn takes 36*1100//1623 = 24, 36*100//1623 = 2, 10.
SMALL_BACKGROUND = official_names(7, [4] * 7, "Script_")
SMALL_EVALUATION = official_names(2, [4] * 2, "Other_")
SMALL_VINYALS = {
    "train": SMALL_BACKGROUND[:12],
    "val": SMALL_BACKGROUND[12:],
    "test": SMALL_EVALUATION,
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("omniglot-small")
    numbers = make_folder(root, SMALL_BACKGROUND, SMALL_EVALUATION, drawings=True)
    write_vinyals(root, SMALL_VINYALS)
    cache = tmp_path_factory.mktemp("omniglot-cache")
    finn = Omniglot(split="finn", image_size=SIZE)
    return root, numbers, finn.load(root, cache), cache


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,623 empty character folders: 964 in 30 background alphabets, 659 in 20."""
    root = tmp_path_factory.mktemp("omniglot-full")
    background = official_names(30, [32] * 26 + [33] * 4, "Background_")
    evaluation = official_names(20, [32] * 1 + [33] * 19, "Evaluation_")
    assert (len(background), len(evaluation)) == (964, 659)
    make_folder(root, background, evaluation, drawings=False)
    return root


def character_of(image: torch.Tensor) -> int:
    return (int(image[0][CHARACTER_PIXEL]) - 10) // 5


def test_finn_counts_on_a_full_size_folder(full_size):
    sizes = Omniglot(split="finn").split_sizes(full_size)
    assert {s: (z.classes, z.examples_per_class) for s, z in sizes.items()} == {
        "train": (1100, 20),
        "val": (100, 20),
        "test": (423, 20),
    }
    classes = Omniglot(split="finn")._split_classes(full_size / "omniglot")
    # Every character at four quarter turns: 4,400 / 400 / 1,692 rotated classes.
    assert {s: len(c) for s, c in classes.items()} == {"train": 4400, "val": 400, "test": 1692}
    assert classes["train"][:4] == [(classes["train"][0][0], turns) for turns in range(4)]


def test_finn_split_is_disjoint_covers_everything_and_ignores_alphabets():
    names = official_names(50, [32] * 27 + [33] * 23, "Alphabet_")
    split = finn_split(names, 1)
    assert [len(split[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    train, val, test = (set(split[s]) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(names)
    # Random characters, not whole alphabets: the test split draws from most alphabets.
    assert len({name.split("/")[0] for name in test}) > 40


def test_finn_split_is_fixed_by_its_seed_and_not_by_the_listing_order():
    names = official_names(50, [32] * 27 + [33] * 23, "Alphabet_")
    shuffled = random.Random(7).sample(names, len(names))
    assert finn_split(names, 1) == finn_split(shuffled, 1)
    assert finn_split(names, 1) == finn_split(list(names), 1)
    other = finn_split(names, 2)
    assert set(other["test"]) != set(finn_split(names, 1)["test"])
    # Pinned: the keys come from random.Random(seed).random(), fixed across Python
    # versions; a change here would change every finn cell's classes.
    assert finn_split(names, 1)["test"][:3] == [
        "Alphabet_46/character20",
        "Alphabet_24/character16",
        "Alphabet_16/character28",
    ]


def test_finn_split_needs_a_character_for_every_split():
    from fewbench.errors import DataError

    with pytest.raises(DataError, match="split finn needs characters"):
        finn_split(official_names(1, [10], "A"), 1)


def test_finn_pools_hold_four_turns_of_the_split_characters(small):
    root, numbers, sources, _ = small
    sizes = Omniglot(split="finn").split_sizes(root)
    assert {s: z.classes for s, z in sizes.items()} == {"train": 24, "val": 2, "test": 10}
    expected = finn_split(list(numbers), 1)
    for split, pool in sources.items():
        assert isinstance(pool, RotatedCharacters)
        assert pool.num_classes == 4 * sizes[split].classes == 4 * pool.characters
        assert pool.input_shape == (1, SIZE, SIZE)
        upright = pool.images[0::4]
        assert [character_of(image[0]) for image in upright] == [
            numbers[name] for name in expected[split]
        ]
        for turns in range(1, 4):
            turned = torch.rot90(upright, turns, dims=(-2, -1))
            assert torch.equal(pool.images[turns::4], turned)


def test_finn_episodes_hold_distinct_characters_at_random_turns(small):
    _, _, sources, _ = small
    pool = sources["train"]
    indices = pool.draw(400, 20, 1, 2, torch.Generator().manual_seed(0))
    characters, turns = indices.classes // 4, indices.classes % 4
    assert all(len(set(row.tolist())) == 20 for row in characters)
    assert set(turns.flatten().tolist()) == {0, 1, 2, 3}
    assert 0.2 < (turns == 0).float().mean().item() < 0.3
    # 24 ways from 24 characters is allowed; 25 is not, although the pool holds 96 classes.
    pool.draw(1, 24, 1, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="from 24 characters"):
        pool.draw(1, 25, 1, 1, torch.Generator().manual_seed(0))
    batch = pool.sample_episodes(3, 5, 2, 3, torch.Generator().manual_seed(1))
    assert batch.support_x.shape == (3, 10, 1, SIZE, SIZE)
    assert batch.query_y.tolist()[0] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    same = pool.sample_episodes(3, 5, 2, 3, torch.Generator().manual_seed(1))
    assert torch.equal(batch.query_x, same.query_x)
    assert isinstance(pool.to("cpu"), RotatedCharacters)
    labelled = pool.sample_labelled(64, torch.Generator().manual_seed(0))
    assert int(labelled.y.max()) < pool.num_classes


def test_split_seed_changes_the_finn_classes(small):
    root, numbers, sources, cache = small
    again = Omniglot(split="finn", image_size=SIZE, split_seed=1).load(root, cache)
    other = Omniglot(split="finn", image_size=SIZE, split_seed=5).load(root, cache)
    for split in ("train", "val", "test"):
        assert torch.equal(again[split].images, sources[split].images)
    test_characters = {character_of(image[0]) for image in other["test"].images[0::4]}
    assert test_characters != {character_of(image[0]) for image in sources["test"].images[0::4]}
    assert test_characters == {numbers[name] for name in finn_split(list(numbers), 5)["test"]}


def test_vinyals_is_unchanged(small):
    root, numbers, _, cache = small
    dataset = Omniglot(split="vinyals", image_size=SIZE)
    assert dataset.episode_identity == ("split",)
    sizes = dataset.split_sizes(root)
    assert {s: z.classes for s, z in sizes.items()} == {"train": 36, "val": 48, "test": 24}
    sources = dataset.load(root, cache)
    for split, pool in sources.items():
        assert type(pool) is ClassPool
        names = SMALL_VINYALS[split]
        assert [character_of(image[0]) for image in pool.images[0::3]] == [
            numbers[name] for name in names
        ]
        assert torch.equal(pool.images[1::3], torch.rot90(pool.images[0::3], 1, dims=(-2, -1)))


SUITE = """\
name: demo
seeds: [0]
datasets:
  - {name: omniglot, split: vinyals, image_size: 8}
  - {name: omniglot, split: lake, image_size: 8, split_seed: 3}
  - {name: omniglot, split: finn, image_size: 8}
  - {name: omniglot, split: finn, image_size: 8, split_seed: 2}
tasks: {ways: 2, shots: 1, query: 1}
backbones:
  - {name: conv4, hidden: 8}
learners:
  - {name: protonet}
train: {iterations: 10, validate_every: 5, val_episodes: 2}
eval: {episodes: 4, query: 1, seed: 0}
"""


def test_split_seed_stays_out_of_existing_cells_and_of_other_splits_episodes(small, registry):
    root = small[0]
    suite = expand(parse_yaml(textwrap.dedent(SUITE), "demo.yaml"), registry, root)
    identities = {}
    for cell in suite.cells:
        config = cell.config["dataset"]
        dataset = registry.get("dataset", "omniglot").build(**cell.dataset.params)
        identities[(config["split"], config.get("split_seed"))] = dataset_identity(
            config, dataset.episode_identity
        )
    # A vinyals cell's configuration (so its id) and episodes are what they were.
    vinyals = next(c for c in suite.cells if c.config["dataset"]["split"] == "vinyals")
    assert vinyals.config["dataset"] == {"name": "omniglot", "split": "vinyals", "image_size": 8}
    assert identities == {
        ("vinyals", None): ("omniglot", ("split", "vinyals")),
        # split_seed picks no lake classes: the same episodes as without it.
        ("lake", 3): ("omniglot", ("split", "lake")),
        ("finn", None): ("omniglot", ("split", "finn")),
        ("finn", 2): ("omniglot", ("split", "finn"), ("split_seed", 2)),
    }


def test_within_alphabet_episodes_hold_characters_of_one_alphabet():
    """Lake et al.'s 20-way task: each episode's characters come from one alphabet, drawn
    among those with enough characters; labelled batches still see every class."""
    import torch

    from fewbench_plugins.datasets.omniglot import WithinAlphabet

    alphabet_of = torch.tensor([0] * 3 + [1] * 6 + [2] * 5)  # 3, 6 and 5 characters
    pool = WithinAlphabet(torch.zeros(14, 4, 1, 2, 2, dtype=torch.uint8), alphabet_of)
    assert pool.episode_classes == (6, "characters of one alphabet")
    indices = pool.draw(400, 5, 1, 1, torch.Generator().manual_seed(0))
    alphabets = alphabet_of[indices.classes]
    assert (alphabets == alphabets[:, :1]).all()  # one alphabet per episode
    assert all(len(set(row.tolist())) == 5 for row in indices.classes)  # distinct characters
    assert set(alphabets[:, 0].tolist()) == {1, 2}  # alphabet 0 has too few for 5 ways
    with pytest.raises(Exception, match="6"):  # more ways than any alphabet holds
        pool.draw(1, 7, 1, 1, torch.Generator().manual_seed(0))


def test_within_alphabet_needs_the_lake_split_and_changes_the_episodes(registry):
    from fewbench.errors import FewbenchError

    omniglot = registry.get("dataset", "omniglot")
    with pytest.raises(FewbenchError, match="needs split: lake"):
        omniglot.build(split="vinyals", episodes="within_alphabet").check()
    assert omniglot.build(split="lake").episode_identity == ("split",)  # ids as before
    assert omniglot.build(split="lake", episodes="within_alphabet").episode_identity == (
        "split",
        "episodes",
    )
