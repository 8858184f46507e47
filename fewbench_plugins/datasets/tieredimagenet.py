"""tiered-ImageNet (Ren et al. 2018, "Meta-Learning for Semi-Supervised Few-Shot
Classification", ICLR): 608 ILSVRC-2012 classes grouped by 34 high-level categories, split by
category: 351 / 97 / 160 classes (20 / 6 / 8 categories) for training, validation and test,
so no test class shares a category with a training class.

It is built from ILSVRC-2012's training images: ``fewbench data import tieredimagenet
SOURCE``, ``SOURCE`` being ``ILSVRC2012_img_train.tar`` (MD5-checked) or its unpacked forms
(:mod:`fewbench_plugins.datasets.ilsvrc`). The class lists ship with fewbench, byte-identical
to the authors' (github.com/renmengye/few-shot-ssl-public,
``fewshot/data/tiered_imagenet_split/{train,val,test}.csv``: ``class wnid, category wnid``),
their SHA-256 checked. As the authors' builder (``fewshot/data/tiered_imagenet.py``) does, every
training image of each listed class is taken (779,165 in all; 448,695 / 124,261 / 206,209 by
split, the figures learn2learn's loader states) and resized to 84 x 84 without cropping by
bicubic interpolation (``cv2.INTER_CUBIC``; here torch's bicubic, the same kernel without
antialiasing). The installed folder holds ``images/<wnid>/<ILSVRC name>.png`` (lossless, as the
authors' pickles hold PNG) and the three lists as ``splits/*.csv``.

Deliberate deviations: the authors' class and image order came from ``os.listdir`` and
Python 2 dictionary order, which cannot be reproduced; here classes are ordered by wnid and
images by their ILSVRC number, so the fixed episodes are the same on every machine. The
released pickles (``*_images_png.pkl``) cannot be imported (they are built the same way; build
from ILSVRC-2012 instead).

Each split is decoded once into a memory-mapped uint8 cache ``[classes, largest class, 3,
size, size]`` (padded; only a class's own images are drawn), keyed by the image files, and
normalised with the training classes' per-channel statistics.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from functools import partial
from itertools import groupby
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
    SplitSize,
    hookimpl,
    load_array_cache,
    save_array_cache,
)
from fewbench_plugins.datasets import ilsvrc
from fewbench_plugins.datasets.imaging import (
    channel_statistics,
    decode_examples,
    decode_rgb,
    rgb_square_image,
    split_pools,
    unreadable_image,
)

STANDARD = {"train": 351, "val": 97, "test": 160}  # classes (20 / 6 / 8 categories)
HOW_TO_GET = (
    "tiered-ImageNet is built from ILSVRC-2012's training images (ImageNet's terms forbid "
    "redistribution): fewbench data import tieredimagenet ILSVRC2012_img_train.tar (or the "
    "folder it unpacks to: class tars or class folders)"
)


def class_lists(text: str, where: str) -> dict[str, str]:
    """class wnid -> category wnid, from one of Ren et al.'s split files (no header)."""
    classes = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if len(row) != 2 or not all(ilsvrc.WNID.fullmatch(w) for w in row):
            raise DataError(f"{where}:{number}: expected 'class wnid,category wnid', got {row!r}")
        classes[row[0]] = row[1]
    return classes


def _split_path(folder: Path, split: str) -> Path:
    return folder / "splits" / f"{split}.csv"


def _class_files(folder: Path, wnids: list[str]) -> list[list[Path]]:
    """Each class's images, by ILSVRC number (the order :meth:`TieredImageNet.load` keeps)."""
    files = []
    for wnid in wnids:
        names = [n for n in os.listdir(folder / "images" / wnid) if n.endswith(".png")]
        files.append(
            [folder / "images" / wnid / n for n in sorted(names, key=ilsvrc.ilsvrc_number)]
        )
    return files


class TieredImageNet(Dataset):
    name = "tieredimagenet"
    description = (
        "tiered-ImageNet (Ren et al. 2018): 351/97/160 ILSVRC-2012 classes split by 34 "
        "categories; built from ILSVRC-2012"
    )
    params = {
        "image_size": Param(84, minimum=8, help="side of the square images, in pixels"),
        "normalize": Param(True, help="per-channel mean/std of the training classes"),
    }
    episode_identity = ()  # the split is fixed; image size and normalisation change no episode
    how_to_get = HOW_TO_GET

    def _folder(self, root: Path) -> Path:
        folder = Path(root) / self.folder_name()
        if not folder.is_dir():
            raise DataError(f"tiered-ImageNet not found: {folder} does not exist; {HOW_TO_GET}")
        return folder

    @staticmethod
    def _classes(folder: Path, split: str) -> list[str]:
        path = _split_path(folder, split)
        try:
            text = path.read_text()
        except OSError:
            raise DataError(f"{path} is missing; {HOW_TO_GET}") from None
        return sorted(class_lists(text, str(path)))

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        """Each split file's class count, every class folder present with its images, and
        16 evenly spaced images decoded."""
        problems: list[str] = []
        paths: list[str] = []
        for split, expected in STANDARD.items():
            try:
                wnids = cls._classes(folder, split)
            except DataError as exc:
                return [str(exc).split(";")[0]]
            if len(wnids) != expected:
                problems.append(f"{split}.csv lists {len(wnids)} classes, expected {expected}")
            for wnid in wnids:
                images = folder / "images" / wnid
                if not images.is_dir() or not any(n.endswith(".png") for n in os.listdir(images)):
                    problems.append(f"{images} is missing or holds no images")
                    break
            else:
                paths += [str(p) for files in _class_files(folder, wnids[:4]) for p in files]
        if not problems and (unreadable := unreadable_image(sorted(paths))):
            problems.append(unreadable)
        return problems

    @classmethod
    def builds_from(cls, source: Path) -> bool:
        return ilsvrc.is_source(source)

    @classmethod
    def build_from(cls, source: Path, folder: Path) -> None:
        """Every training image of the listed classes, resized to 84 x 84 (module docstring)."""
        texts = {split: ilsvrc.split_bytes(f"tiered/{split}.csv") for split in SPLITS}
        wanted = set()
        for split, text in texts.items():
            wanted |= set(class_lists(text.decode(), f"tiered/{split}.csv"))
        progress = ilsvrc.print_progress("tieredimagenet", len(wanted))
        for wnid, files in groupby(ilsvrc.class_images(source, wanted, progress), lambda i: i[0]):
            (folder / "images" / wnid).mkdir(parents=True)
            for _, name, data in files:
                ilsvrc.ilsvrc_number(name)  # a file that is not <wnid>_<number> is refused
                image = ilsvrc.resized(data, 84, "cubic", f"{source}: {wnid}/{name}")
                image.save(folder / "images" / wnid / (name.rsplit(".", 1)[0] + ".png"))
        (folder / "splits").mkdir()
        for split, text in texts.items():
            _split_path(folder, split).write_bytes(text)

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        folder = self._folder(root)
        sizes = {}
        for split in SPLITS:
            counts = [
                sum(n.endswith(".png") for n in os.listdir(folder / "images" / w))
                for w in self._classes(folder, split)
            ]
            sizes[split] = SplitSize(len(counts), min(counts, default=0))
        return sizes

    def _split_array(self, folder: Path, split: str, cache_dir: Path) -> tuple[np.ndarray, dict]:
        """One split as uint8 ``[classes, largest class, 3, size, size]``, decoded once into a
        file class by class (the training split is about 10 GB), keyed by its image files."""
        size = self.config["image_size"]
        files = _class_files(folder, self._classes(folder, split))
        counts = [len(f) for f in files]
        path = Path(cache_dir) / "tieredimagenet" / f"{split}-{size}.npy"
        sources = (folder, [p for f in files for p in f])
        cached = load_array_cache(path, {"counts": counts}, sources=sources)
        if cached is not None:
            return cached
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.stem}-{os.getpid()}.npy")
        shape = (len(files), max(counts), 3, size, size)
        array = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=shape)
        try:
            for c, class_files in enumerate(files):
                array[c, : counts[c]] = decode_rgb([str(p) for p in class_files], size)
            meta: dict[str, Any] = {"counts": counts}
            if split == "train":
                real = [array[c, :n] for c, n in enumerate(counts)]
                meta["mean"], meta["std"] = channel_statistics(real)
            save_array_cache(path, array, meta, sources=sources)
        finally:
            del array
            scratch.unlink(missing_ok=True)
        return load_array_cache(path, {"counts": counts})

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        folder = self._folder(root)
        arrays = {s: self._split_array(folder, s, cache_dir) for s in SPLITS}
        return split_pools(arrays, self.config["normalize"])

    def example_ids(self, root: Path, split: str) -> list[list[str]]:
        """Each image's file relative to ``root`` (``tieredimagenet/images/<wnid>/<name>.png``),
        in :meth:`load`'s order: classes by wnid, images by ILSVRC number; a class's row is as
        long as its count."""
        folder = self._folder(root)
        files = _class_files(folder, self._classes(folder, split))
        return [[p.relative_to(root).as_posix() for p in row] for row in files]

    def decode_examples(self, examples: Sequence[Any]) -> torch.Tensor:
        """A user's images as the loader stores tiered-ImageNet's: uint8 ``[N, 3, size, size]``,
        RGB, resized to the square (the function that decodes the installed files)."""
        size = self.config["image_size"]
        return torch.from_numpy(decode_examples(examples, partial(rgb_square_image, size=size)))


@hookimpl
def fewbench_register_datasets(register):
    register(TieredImageNet)
