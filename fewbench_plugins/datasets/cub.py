"""CUB-200-2011 (Wah et al. 2011) with the split of Chen et al. (2019): 100 / 50 / 50 classes.

The official archive ``CUB_200_2011.tgz`` (published MD5
97eceeb196236b17998738112f37df78) unpacks to ``CUB_200_2011/images/<class>/*.jpg``
with 200 class folders and 11,788 images (41 to 60 per class). Chen et al. sort
the class folders by name and take every even-numbered class for training, class
``i`` with ``i % 4 == 1`` for validation and ``i % 4 == 3`` for testing.

Images are resized for the backbone as in Chen et al.'s evaluation transform
(shorter side to 1.15 x ``image_size``, then a centred ``image_size`` square),
decoded once into a memory-mapped uint8 cache (keyed by the image files: folder, names,
sizes, times and sampled bytes), and normalised with the training
classes' per-channel statistics. Classes keep all their images: the pool is
padded to the largest class and only real images are ever drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewbench.plugin import (
    SPLITS,
    DataError,
    Dataset,
    EpisodeSource,
    Param,
    Resource,
    SplitSize,
    hookimpl,
    load_array_cache,
    save_array_cache,
)
from fewbench_plugins.datasets.imaging import (
    channel_statistics,
    decode_examples,
    decode_rgb,
    rgb_square_image,
    split_pools,
    unreadable_image,
)

ARCHIVE = Resource(
    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
    "CUB_200_2011.tgz",
    "97eceeb196236b17998738112f37df78",
)
CLASSES, IMAGES = 200, 11788


def chen_split(index: int) -> str | None:
    if index % 2 == 0:
        return "train"
    return "val" if index % 4 == 1 else "test"


class CUB(Dataset):
    name = "cub"
    description = "CUB-200-2011 birds, Chen et al. 2019 split (100/50/50 classes)"
    folder = "cub"
    resources = (ARCHIVE,)
    how_to_get = (
        "run: fewbench data download cub; or, offline, get CUB_200_2011.tgz from "
        "www.vision.caltech.edu/datasets/cub_200_2011 and run: fewbench data import cub PATH"
    )
    params = {
        "image_size": Param(84, minimum=8, help="side of the square images, in pixels"),
        "normalize": Param(True, help="per-channel mean/std of the training classes"),
    }
    episode_identity = ()

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        """Counts classes and images, and decodes 16 evenly spaced images: counting alone
        called a tree of empty files complete."""
        images = folder / "CUB_200_2011" / "images"
        if not images.is_dir():
            return [f"{images} does not exist"]
        classes = [c for c in images.iterdir() if c.is_dir()]
        files = sorted(str(p) for c in classes for p in c.glob("*.jpg"))
        if (len(classes), len(files)) != (CLASSES, IMAGES):
            return [
                f"{images} holds {len(classes)} classes and {len(files)} images, expected {CLASSES} and {IMAGES}"
            ]
        unreadable = unreadable_image(files)
        return [unreadable] if unreadable else []

    def _classes(self, root: Path) -> dict[str, list[Path]]:
        images = Path(root) / self.folder_name() / "CUB_200_2011" / "images"
        if not images.is_dir():
            raise DataError(f"CUB not found: {images} does not exist; {self.how_to_get}")
        folders = sorted(c for c in images.iterdir() if c.is_dir())
        splits: dict[str, list[Path]] = {s: [] for s in SPLITS}
        for i, folder in enumerate(folders):
            splits[chen_split(i)].append(folder)
        return splits

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        return {
            split: SplitSize(
                len(folders), min((len(list(f.glob("*.jpg"))) for f in folders), default=0)
            )
            for split, folders in self._classes(root).items()
        }

    def _split_array(
        self, base: Path, split: str, folders: list[Path], cache_dir: Path
    ) -> tuple[np.ndarray, dict]:
        """One split as uint8 ``[classes, largest class, 3, size, size]``, decoded once.

        The cache is keyed by the split's image files under ``base`` (the data folder):
        their names, sizes, times and sampled bytes, so another data root or changed
        files are decoded afresh instead of served images cached from other files."""
        size = self.config["image_size"]
        files = _class_files(folders)
        counts = [len(f) for f in files]
        flat = [p for f in files for p in f]
        path = Path(cache_dir) / "cub" / f"{split}-{size}.npy"
        sources = (base, flat)
        cached = load_array_cache(path, {"counts": counts}, sources=sources)
        if cached is not None:
            return cached
        every = decode_rgb(flat, size, crop_ratio=1.15)  # Chen et al.'s test transform
        array = np.zeros((len(folders), max(counts), 3, size, size), dtype=np.uint8)
        start = 0
        for c, n in enumerate(counts):
            array[c, :n] = every[start : start + n]
            start += n
        meta = {"counts": counts}
        if split == "train":
            real = np.concatenate([array[c, :n] for c, n in enumerate(counts)])[None]
            meta["mean"], meta["std"] = channel_statistics(real)
        save_array_cache(path, array, meta, sources=sources)
        return load_array_cache(path, {"counts": counts})

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        base = Path(root) / self.folder_name()
        arrays = {
            s: self._split_array(base, s, f, cache_dir) for s, f in self._classes(root).items()
        }
        return split_pools(arrays, self.config["normalize"])

    def example_ids(self, root: Path, split: str) -> list[list[str]]:
        """Each image's file relative to ``root`` (``cub/CUB_200_2011/images/<class>/<name>.jpg``),
        in :meth:`load`'s order: classes as Chen et al.'s split takes them, and every file of
        a class (the pool's padding is no example) in the order the decoding takes them
        (:func:`_class_files`), so a ragged class's row is as long as its count."""
        files = _class_files(self._classes(root)[split])
        return [[Path(p).relative_to(root).as_posix() for p in row] for row in files]

    def decode_examples(self, examples: Sequence[Any]) -> torch.Tensor:
        """A user's images as the loader stores CUB's: uint8 ``[N, 3, size, size]`` by Chen et
        al.'s test transform (shorter side to 1.15 x size, centre square), the very function
        that decodes the dataset's files. :meth:`preprocess` then normalises them with the
        training classes' statistics, which it reads from the data root's cache."""
        size = self.config["image_size"]
        decoded = decode_examples(examples, partial(rgb_square_image, size=size, crop_ratio=1.15))
        return torch.from_numpy(decoded)


def _class_files(folders: list[Path]) -> list[list[str]]:
    """Each class folder's images, in name order: the order the pool stores them in."""
    return [sorted(str(p) for p in f.glob("*.jpg")) for f in folders]


@hookimpl
def fewbench_register_datasets(register):
    register(CUB)
