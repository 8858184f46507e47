"""Omniglot (Lake et al. 2015) from its official folder layout.

Expected under the data root::

    omniglot/images_background/<Alphabet>/characterNN/*.png   (30 alphabets, 964 characters)
    omniglot/images_evaluation/<Alphabet>/characterNN/*.png   (20 alphabets, 659 characters)
    omniglot/splits/vinyals/{train,val,test}.txt             (for split: vinyals)

Splits (``split``):

``vinyals``
    Vinyals et al. (2016): the published class lists, 4,112 / 688 / 1,692 classes, each
    a character at one of four quarter turns (1,028 / 172 / 423 characters, x4).
``lake``
    Lake et al. (2015): background alphabets train (the last five by name validate),
    evaluation alphabets test; no rotations.
``finn``
    Finn, Abbeel & Levine (2017, MAML) shuffled the 1,623 characters of both folders
    together and took 1,100 to meta-train, 100 to meta-validate and the remaining 423 to
    meta-test, ignoring alphabets (github.com/cbfinn/maml, data_generator.py). Their list
    came from unsorted ``os.listdir`` calls, so the order, and with it their exact
    characters, depends on their file system and cannot be recovered. Here the
    characters (``Alphabet/characterNN``) are sorted by name and shuffled with
    ``split_seed``: each character gets a key from ``random.Random(split_seed).random()``
    (in sorted order) and the characters are ordered by key. Python guarantees that
    sequence for an integer seed across versions, which it does not for
    ``random.shuffle`` or numpy's generators. The first 1,100 characters train, the next
    100 validate, the rest test; with fewer characters (a partial copy) the same
    proportions are used (``total * 1100 // 1623`` and ``total * 100 // 1623``).

    Episodes follow Finn's sampler: a task's N classes are N *distinct* characters,
    each turned by its own number of quarter turns (0-3, uniform), drawn afresh for
    every task, on every split (their code rotates at meta-test time too). The split
    holds each character at all four turns (4,400 / 400 / 1,692 rotated classes, which
    labelled batches draw from), but an episode never holds two turns of one character,
    so the most ways an episode can have, and what ``split_sizes`` reports, is the
    number of characters: 1,100 / 100 / 423. With the Vinyals representation (classes
    drawn from all rotated classes) two turns of one character can share a task.

    Not reproduced: their characters (see above), their task stream (Python's
    ``random`` for classes and drawings, TensorFlow for turns) and their 600 meta-test
    tasks; episodes here are fixed by the cell's evaluation seed, as for every split.

All 1,623 characters are decoded once, resized to ``image_size`` and cached as a
uint8 tensor file (ink = 255) keyed by the image size and by the drawings' files
(folder, names, sizes, times and a sample of their bytes), so later runs start in
about a second and another data root, or changed files, are decoded afresh.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fewbench.plugin import (
    ClassPool,
    DataError,
    Dataset,
    EpisodeSource,
    Param,
    ParamSet,
    Resource,
    SplitSize,
    hookimpl,
    load_tensor_cache,
    save_tensor_cache,
)
from fewbench_plugins.datasets.imaging import decode_examples, decode_images, unreadable_image

BACKGROUND, EVALUATION = "images_background", "images_evaluation"
DRAWINGS_PER_CHARACTER = 20
ROTATIONS = {"rot000": 0, "rot090": 1, "rot180": 2, "rot270": 3}
# Lake split: the last LAKE_VAL_ALPHABETS background alphabets (sorted by name) validate.
LAKE_VAL_ALPHABETS = 5
# Finn et al.'s split: of all 1,623 characters, 1,100 train, 100 validate, the rest test.
FINN_TOTAL, FINN_TRAIN, FINN_VAL = 1623, 1100, 100
HOW_TO_GET = (
    "run: fewbench data download omniglot; or, offline, get images_background.zip and "
    "images_evaluation.zip from github.com/brendenlake/omniglot (python/) and the Vinyals split "
    "files (train.txt, val.txt, test.txt), put them in one folder and run: "
    "fewbench data import omniglot FOLDER"
)


def _decode(path: str, size: int) -> np.ndarray:
    """One drawing file as uint8 ``[size, size]`` (see :func:`_decode_image`)."""
    with Image.open(path) as image:
        return _decode_image(image, size)


def _decode_image(image: Image.Image, size: int) -> np.ndarray:
    """One drawing as uint8 ``[size, size]``: grey, Lanczos-resized, inverted so that the
    strokes are bright (255) on 0. The loader and :meth:`Omniglot.decode_examples` share it."""
    image = image.convert("L").resize((size, size), resample=Image.LANCZOS)
    return 255 - np.asarray(image, dtype=np.uint8)


OFFICIAL = "https://github.com/brendenlake/omniglot/raw/master/python"
# The Vinyals split as published with the Prototypical Networks code (MIT).
SPLITS = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals"
EXPECTED = {BACKGROUND: (30, 964), EVALUATION: (20, 659)}  # alphabets, characters
SPLIT_LINES = {"train": 4112, "val": 688, "test": 1692}


def finn_split(names: list[str], seed: int) -> dict[str, list[str]]:
    """Finn et al.'s split of ``Alphabet/characterNN`` names: sorted, shuffled by ``seed``.

    Each name, in sorted order, gets the next ``random.Random(seed).random()`` as its key
    (that sequence is fixed across Python versions for an integer seed); names are
    ordered by key, and the first 1,100 of 1,623 train, the next 100 validate, the rest
    test (the same proportions for fewer names).
    """
    ordered = sorted(names)
    rng = random.Random(seed)
    keys = [rng.random() for _ in ordered]
    shuffled = [name for _, name in sorted(zip(keys, ordered, strict=True))]
    total = len(shuffled)
    train, val = total * FINN_TRAIN // FINN_TOTAL, total * FINN_VAL // FINN_TOTAL
    if min(train, val, total - train - val) < 1:
        raise DataError(
            f"Omniglot split finn needs characters for each of train, val and test; found "
            f"{total} characters; {HOW_TO_GET}"
        )
    return {
        "train": shuffled[:train],
        "val": shuffled[train : train + val],
        "test": shuffled[train + val :],
    }


class RotatedCharacters(ClassPool):
    """Rotated classes ``4c .. 4c+3`` (character ``c`` at 0-3 quarter turns), sampled as
    in Finn et al.'s code: an episode's classes are distinct characters, each at a turn
    drawn uniformly for that episode. Labelled batches draw from all rotated classes."""

    def __init__(self, images: torch.Tensor):
        super().__init__(images)
        if self.num_classes % 4:
            raise ValueError("RotatedCharacters expects four rotated classes per character")
        self.characters = self.num_classes // 4

    def to(self, device: torch.device | str) -> RotatedCharacters:
        if self.images.device == torch.device(device):
            return self
        return RotatedCharacters(self.images.to(device))

    @property
    def episode_classes(self) -> tuple[int, str]:
        return self.characters, "characters"

    def draw_classes(self, count: int, ways: int, generator: torch.Generator) -> torch.Tensor:
        """Distinct characters, each at a quarter turn drawn for this episode."""
        characters = torch.rand(count, self.characters, generator=generator).argsort(dim=1)
        turns = torch.randint(4, (count, ways), generator=generator)
        return characters[:, :ways] * 4 + turns


class WithinAlphabet(ClassPool):
    """Episodes whose classes all come from one alphabet, as in Lake et al.'s one-shot
    classification runs (Science 2015; their 20-way within-alphabet task): each episode
    draws an alphabet uniformly among those with at least ``ways`` characters, then its
    characters without replacement. Harder than episodes across alphabets, where
    characters of different scripts are told apart by style alone. Labelled batches draw
    from all classes, as ever."""

    def __init__(self, images: torch.Tensor, alphabet_of: torch.Tensor):
        super().__init__(images)
        if alphabet_of.shape != (self.num_classes,):
            raise ValueError("WithinAlphabet expects one alphabet index per class")
        self.alphabet_of = alphabet_of
        self.sizes = torch.bincount(alphabet_of)

    def to(self, device: torch.device | str) -> WithinAlphabet:
        if self.images.device == torch.device(device):
            return self
        return WithinAlphabet(self.images.to(device), self.alphabet_of.to(device))

    @property
    def episode_classes(self) -> tuple[int, str]:
        return int(self.sizes.max()), "characters of one alphabet"

    def draw_classes(self, count: int, ways: int, generator: torch.Generator) -> torch.Tensor:
        """An alphabet per episode, then ``ways`` of its characters (random keys, with every
        other alphabet's characters keyed last, then argsort: batched, without replacement)."""
        eligible = (self.sizes >= ways).nonzero().flatten()
        if len(eligible) == 0:  # episode_classes lets the caller refuse this first
            raise ValueError(f"no alphabet has {ways} characters")
        picks = torch.randint(len(eligible), (count,), generator=generator)
        alphabets = eligible[picks.to(eligible.device)]
        keys = torch.rand(count, self.num_classes, generator=generator).to(self.alphabet_of.device)
        keys = keys + (self.alphabet_of[None, :] != alphabets[:, None])  # others after 1
        return keys.argsort(dim=1)[:, :ways]


class Omniglot(Dataset):
    name = "omniglot"
    description = (
        "Omniglot handwritten characters; Vinyals split (with rotations), Lake split, or "
        "Finn et al.'s random character split (with rotations)"
    )
    resources = (
        Resource(f"{OFFICIAL}/images_background.zip", "images_background.zip",
                 "68d2efa1b9178cc56df9314c21c6e718"),
        Resource(f"{OFFICIAL}/images_evaluation.zip", "images_evaluation.zip",
                 "6b91aef0f799c5bb55b94e3f2daec811"),
        *(
            Resource(f"{SPLITS}/{split}.txt", f"{split}.txt", md5, into="splits/vinyals")
            for split, md5 in (
                ("train", "433d1fcc2b20dcee2983ceb524586f7f"),
                ("val", "78c535fa427b12b6596908376a0b3f34"),
                ("test", "43534e6d5f9e74acbb7de1b4874abad8"),
            )
        ),
    )  # fmt: skip
    how_to_get = HOW_TO_GET

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        """Counts alphabets, characters, drawings and split lines, and decodes 16 evenly
        spaced drawings: counting alone called a tree of empty PNGs complete."""
        problems = []
        drawings: list[str] = []
        for part, (alphabets, characters) in EXPECTED.items():
            base = folder / part
            if not base.is_dir():
                problems.append(f"{base} does not exist")
                continue
            found_alphabets = [a for a in base.iterdir() if a.is_dir()]
            found = [c for a in found_alphabets for c in a.iterdir() if c.is_dir()]
            if (len(found_alphabets), len(found)) != (alphabets, characters):
                problems.append(
                    f"{base} has {len(found_alphabets)} alphabets and {len(found)} characters, "
                    f"expected {alphabets} and {characters}"
                )
                continue
            per_character = {c: sorted(str(p) for p in c.glob("*.png")) for c in found}
            short = [c for c, pngs in per_character.items() if len(pngs) != DRAWINGS_PER_CHARACTER]
            if short:
                problems.append(f"{short[0]} does not hold {DRAWINGS_PER_CHARACTER} drawings")
            drawings += [p for pngs in per_character.values() for p in pngs]
        if not problems and (unreadable := unreadable_image(sorted(drawings))):
            problems.append(unreadable)
        for split, lines in SPLIT_LINES.items():
            path = folder / "splits" / "vinyals" / f"{split}.txt"
            if not path.is_file():
                problems.append(f"{path} does not exist")
            elif len(path.read_text().split()) != lines:
                problems.append(f"{path} does not list {lines} classes")
        return problems

    params = {
        "split": Param("vinyals", choices=("vinyals", "lake", "finn"), help="class split"),
        "image_size": Param(28, minimum=4, help="side of the square images, in pixels"),
        "split_seed": Param(
            1,
            minimum=0,
            help="split finn only: seed of the shuffle that assigns characters to splits "
            "(Finn et al. used 1, with another character order)",
            added_later=True,
        ),
        "episodes": Param(
            "any",
            choices=("any", "within_alphabet"),
            help="split lake only: within_alphabet draws each episode's characters from one "
            "alphabet (Lake et al.'s 20-way one-shot task); any ignores alphabets",
            added_later=True,
        ),
    }
    # split_seed picks classes only for split finn; an instance leaves it out otherwise,
    # so vinyals and lake cells keep their episodes whatever split_seed says.
    episode_identity: tuple[str, ...] = ("split", "split_seed")

    def __init__(self, **params):
        # Cells leave split_seed and episodes out at their defaults (Param.added_later):
        # fill defaults in.
        super().__init__(**{**ParamSet.of(type(self)).defaults(), **params})
        if self.config["split"] != "finn":
            self.episode_identity = ("split",)
        if self.config["episodes"] != "any":  # other classes per episode: other episodes
            self.episode_identity = (*self.episode_identity, "episodes")

    def check(self) -> None:
        if self.config["episodes"] == "within_alphabet" and self.config["split"] != "lake":
            raise DataError(
                "dataset omniglot: episodes within_alphabet needs split: lake (the other "
                "splits add rotated characters as classes, which no alphabet holds)"
            )

    def _folder(self, root: Path) -> Path:
        folder = Path(root) / "omniglot"
        missing = [sub for sub in (BACKGROUND, EVALUATION) if not (folder / sub).is_dir()]
        if missing:
            raise DataError(
                f"Omniglot not found: {folder}/{missing[0]} does not exist; {HOW_TO_GET}"
            )
        return folder

    def _characters(self, folder: Path) -> list[tuple[str, str]]:
        """(background|evaluation, Alphabet/characterNN) for every character, sorted."""
        found = []
        for part in (BACKGROUND, EVALUATION):
            for alphabet in sorted(os.listdir(folder / part)):
                alphabet_dir = folder / part / alphabet
                if alphabet_dir.is_dir():
                    found += [(part, f"{alphabet}/{c}") for c in sorted(os.listdir(alphabet_dir))]
        return found

    def _split_classes(self, folder: Path) -> dict[str, list[tuple[str, int]]]:
        """Per split, the classes as (Alphabet/characterNN, quarter turns)."""
        if self.config["split"] == "vinyals":
            split_dir = folder / "splits" / "vinyals"
            result = {}
            for split in ("train", "val", "test"):
                path = split_dir / f"{split}.txt"
                if not path.is_file():
                    raise DataError(
                        f"Omniglot Vinyals split file {path} does not exist; {HOW_TO_GET}"
                    )
                classes = []
                for number, line in enumerate(path.read_text().split("\n"), start=1):
                    if not line.strip():
                        continue
                    character, _, rotation = line.strip().rpartition("/")
                    if rotation not in ROTATIONS:
                        raise DataError(
                            f"{path}:{number}: expected <Alphabet>/characterNN/rotDDD, got {line!r}"
                        )
                    classes.append((character, ROTATIONS[rotation]))
                result[split] = classes
            return result
        characters = self._characters(folder)
        if self.config["split"] == "finn":
            return {
                split: [(name, turns) for name in names for turns in range(4)]
                for split, names in finn_split(
                    [name for _, name in characters], self.config["split_seed"]
                ).items()
            }
        background = sorted({c.split("/")[0] for part, c in characters if part == BACKGROUND})
        val_alphabets = set(background[-LAKE_VAL_ALPHABETS:])
        result = {"train": [], "val": [], "test": []}
        for part, character in characters:
            split = (
                "test"
                if part == EVALUATION
                else ("val" if character.split("/")[0] in val_alphabets else "train")
            )
            result[split].append((character, 0))
        return result

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        classes = self._split_classes(self._folder(root))
        # finn: an episode's classes are distinct characters, so at most a quarter as many
        # ways as the split holds rotated classes.
        per_way = 4 if self.config["split"] == "finn" else 1
        return {
            split: SplitSize(len(items) // per_way, DRAWINGS_PER_CHARACTER)
            for split, items in classes.items()
        }

    def _drawings(self, folder: Path) -> tuple[list[str], list[list[str]]]:
        """Every character's name (``Alphabet/characterNN``) and its 20 drawings' paths, sorted."""
        characters = self._characters(folder)
        paths = []
        for part, name in characters:  # os.listdir: a third of Path.glob's time, same files
            character = os.path.join(folder, part, name)
            try:
                entries = os.listdir(character)
            except OSError:  # a stray file beside the character folders: no drawings
                entries = []
            drawings = sorted(os.path.join(character, f) for f in entries if f.endswith(".png"))
            if len(drawings) != DRAWINGS_PER_CHARACTER:
                raise DataError(
                    f"Omniglot is incomplete: {character} has {len(drawings)} drawings, "
                    f"expected {DRAWINGS_PER_CHARACTER}; {HOW_TO_GET}"
                )
            paths.append(drawings)
        return [name for _, name in characters], paths

    def _all_images(self, folder: Path, cache_dir: Path) -> tuple[list[str], torch.Tensor]:
        """Every character's drawings as uint8 ``[characters, 20, size, size]``, decoded once.

        The cache is keyed by the character names and by the drawings themselves (their
        folder, names, sizes, times and sampled bytes: ``sources``), so another data
        root, or files replaced in this one, are decoded afresh, never served the images
        cached from other files."""
        size = self.config["image_size"]
        names, paths = self._drawings(folder)
        flat = [path for drawings in paths for path in drawings]
        cache_file = Path(cache_dir) / "omniglot" / f"images-{size}.pt"
        sources = (folder, flat)
        cached = load_tensor_cache(cache_file, expect={"names": names}, sources=sources)
        if cached is not None:
            return names, cached["images"]
        images = decode_images(flat, partial(_decode, size=size), (size, size))
        images = images.reshape(len(paths), DRAWINGS_PER_CHARACTER, size, size)
        tensor = torch.from_numpy(images)
        save_tensor_cache(cache_file, {"names": names, "images": tensor}, sources=sources)
        return names, tensor

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        folder = self._folder(root)
        split_classes = self._split_classes(folder)
        names, images = self._all_images(folder, cache_dir)
        index = {name: i for i, name in enumerate(names)}
        sources: dict[str, EpisodeSource] = {}
        for split, classes in split_classes.items():
            unknown = [c for c, _ in classes if c not in index]
            if unknown:
                raise DataError(
                    f"Omniglot split '{split}' names {unknown[0]}, which is not under {folder}"
                )
            picked = images[[index[c] for c, _ in classes]]  # [C, 20, H, W]
            turns = torch.tensor([t for _, t in classes])
            for quarter in range(1, 4):
                rows = (turns == quarter).nonzero().flatten()
                if len(rows):
                    picked[rows] = torch.rot90(picked[rows], quarter, dims=(-2, -1))
            images_of_split = picked.unsqueeze(2).contiguous()  # add a channel axis
            if self.config["split"] == "finn":
                sources[split] = RotatedCharacters(images_of_split)
            elif self.config["episodes"] == "within_alphabet":
                alphabets = sorted({c.split("/")[0] for c, _ in classes})
                number = {a: i for i, a in enumerate(alphabets)}
                alphabet_of = torch.tensor([number[c.split("/")[0]] for c, _ in classes])
                sources[split] = WithinAlphabet(images_of_split, alphabet_of)
            else:
                sources[split] = ClassPool(images_of_split)
        return sources

    def example_ids(self, root: Path, split: str) -> list[list[str]]:
        """Each drawing's file relative to ``root`` (``omniglot/images_background/Alphabet/
        characterNN/NNNN_NN.png``), in :meth:`load`'s order. Splits vinyals and finn add the
        class's turn, ``#rot000`` to ``#rot270`` (as the Vinyals split files name classes):
        the drawing turned counter-clockwise by that many degrees, as ``numpy.rot90(image,
        degrees // 90)`` and the loader turn it, for a turned character is another class."""
        folder = self._folder(root)
        names, paths = self._drawings(folder)
        files = dict(zip(names, paths, strict=True))
        turned = self.config["split"] != "lake"
        ids = []
        for character, turns in self._split_classes(folder)[split]:
            if character not in files:
                raise DataError(
                    f"Omniglot split '{split}' names {character}, which is not under {folder}"
                )
            suffix = f"#rot{90 * turns:03d}" if turned else ""
            ids.append([Path(p).relative_to(root).as_posix() + suffix for p in files[character]])
        return ids

    def decode_examples(self, examples: Sequence[Any]) -> torch.Tensor:
        """A user's drawings (dark strokes on white, as the official PNGs) as the loader
        stores them: uint8 ``[N, 1, size, size]``, grey, resized and inverted by the very
        function that decodes the dataset's files (no rotation: that defines classes)."""
        size = self.config["image_size"]
        decoded = decode_examples(examples, partial(_decode_image, size=size))
        return torch.from_numpy(decoded).unsqueeze(1)

    def normalization(self, root: Path, cache_dir: Path) -> None:
        """None: Omniglot's episodes are only scaled to [0, 1] (strokes 1), so preparing a
        user's drawings needs no installed copy of the dataset."""
        return None


@hookimpl
def fewbench_register_datasets(register):
    register(Omniglot)
