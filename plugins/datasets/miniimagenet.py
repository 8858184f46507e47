"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split, in either common form.

Under the data root, ``miniimagenet/`` holds one of:

* ``images/<filename>.jpg`` (84x84 crops of ILSVRC-2012) and
  ``splits/ravi/{train,val,test}.csv`` (columns ``filename,label``), or
* ``mini-imagenet-cache-{train,val,test}.pkl``: pickled dicts with ``image_data``
  (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (label -> image indices).

There is no download: the images derive from ImageNet, whose terms forbid
redistribution. Each split is decoded once into a uint8 ``.npy`` cache that is
memory-mapped at run time (episodes read only the images they draw, and a second
run starts in seconds). Classes are ordered by label in both forms, so the
fixed episodes are the same whichever form was installed. Images are normalised
with the per-channel mean and standard deviation of the training classes.
"""

from __future__ import annotations

import csv
import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewbench.cache import load_array_cache, save_array_cache
from fewbench.data import SPLITS, ClassPool, Dataset, EpisodeSource, SplitSize
from fewbench.errors import DataError
from fewbench.hookspecs import hookimpl
from fewbench.params import Param
from fewbench_plugins.datasets.imaging import channel_statistics, decode_rgb

STANDARD = {"train": 64, "val": 16, "test": 20}  # classes; 600 images each
IMAGES_PER_CLASS = 600
HOW_TO_GET = (
    "mini-ImageNet cannot be downloaded (ImageNet's terms forbid redistribution). Build it from "
    "ILSVRC-2012 with the Ravi & Larochelle split (84x84 images as images/<filename>.jpg and "
    "splits/ravi/{train,val,test}.csv), or obtain the pickle files "
    "mini-imagenet-cache-{train,val,test}.pkl; then run: fewbench data import miniimagenet PATH"
)


def _pickle_path(folder: Path, split: str) -> Path:
    return folder / f"mini-imagenet-cache-{split}.pkl"


def _csv_path(folder: Path, split: str) -> Path:
    return folder / "splits" / "ravi" / f"{split}.csv"


def read_split(path: Path) -> dict[str, list[str]]:
    """label -> file names, from a Ravi split CSV."""
    classes: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if number == 1 and row[:2] == ["filename", "label"]:
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{number}: expected 'filename,label', got {row!r}")
            classes.setdefault(row[1], []).append(row[0])
    return classes


class MiniImageNet(Dataset):
    name = "miniimagenet"
    description = (
        "mini-ImageNet, Ravi & Larochelle split (64/16/20 classes); image folder or pickles"
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
            raise DataError(f"mini-ImageNet not found: {folder} does not exist; {HOW_TO_GET}")
        return folder

    @staticmethod
    def _form(folder: Path) -> str:
        if all(_pickle_path(folder, s).is_file() for s in SPLITS):
            return "pickle"
        if all(_csv_path(folder, s).is_file() for s in SPLITS) and (folder / "images").is_dir():
            return "images"
        raise DataError(
            f"{folder} holds neither images/ with splits/ravi/*.csv nor the three "
            f"mini-imagenet-cache-*.pkl files; {HOW_TO_GET}"
        )

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        try:
            form = cls._form(folder)
        except DataError as exc:
            return [str(exc).split(";")[0]]
        if form == "pickle":
            return []  # counted when loaded; reading 1.3 GB of pickles to check is too slow
        problems = []
        for split, expected in STANDARD.items():
            classes = read_split(_csv_path(folder, split))
            if len(classes) != expected:
                problems.append(f"{split}.csv lists {len(classes)} classes, expected {expected}")
            missing = next(
                (
                    n
                    for names in classes.values()
                    for n in names
                    if not (folder / "images" / n).is_file()
                ),
                None,
            )
            if missing:
                problems.append(
                    f"{folder / 'images' / missing} is listed in {split}.csv but missing"
                )
        return problems

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        folder = self._folder(root)
        if self._form(folder) == "pickle":
            return {s: SplitSize(STANDARD[s], IMAGES_PER_CLASS) for s in SPLITS}
        sizes = {}
        for split in SPLITS:
            classes = read_split(_csv_path(folder, split))
            sizes[split] = SplitSize(len(classes), min(len(v) for v in classes.values()))
        return sizes

    # -- decoding into the memory-mapped cache --------------------------------------------------
    def _source_key(self, folder: Path, form: str, split: str) -> str:
        source = _pickle_path(folder, split) if form == "pickle" else _csv_path(folder, split)
        stat = source.stat()
        return hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[
            :16
        ]

    def _decode_split(self, folder: Path, form: str, split: str) -> np.ndarray:
        size = self.config["image_size"]
        if form == "pickle":
            with open(_pickle_path(folder, split), "rb") as f:
                data = pickle.load(f)
            images, class_dict = np.asarray(data["image_data"]), data["class_dict"]
            labels = sorted(class_dict)
            per_class = min(len(class_dict[c]) for c in labels)
            picked = images[[i for c in labels for i in list(class_dict[c])[:per_class]]]
            picked = picked.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            if picked.shape[-1] != size:
                picked = np.stack([_resize(x, size) for x in picked])
            return picked.reshape(len(labels), per_class, 3, size, size)
        classes = read_split(_csv_path(folder, split))
        labels = sorted(classes)
        per_class = min(len(classes[c]) for c in labels)
        # Within a class, images in file-name order (the pickles keep the same order).
        paths = [str(folder / "images" / n) for c in labels for n in sorted(classes[c])[:per_class]]
        out = decode_rgb(paths, size)
        return out.reshape(len(labels), per_class, 3, size, size)

    def _split_array(
        self, folder: Path, cache_dir: Path, form: str, split: str
    ) -> tuple[np.ndarray, dict]:
        path = Path(cache_dir) / "miniimagenet" / f"{split}-{form}-{self.config['image_size']}.npy"
        key = self._source_key(folder, form, split)
        cached = load_array_cache(path, {"key": key})
        if cached is not None:
            return cached
        array = self._decode_split(folder, form, split)
        meta = {"key": key}
        if split == "train":  # per-channel statistics of the training classes, on [0, 1]
            meta["mean"], meta["std"] = channel_statistics(array)
        save_array_cache(path, array, meta)
        return load_array_cache(path, {"key": key})

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        folder = self._folder(root)
        form = self._form(folder)
        arrays = {s: self._split_array(folder, cache_dir, form, s) for s in SPLITS}
        mean = std = None
        if self.config["normalize"]:
            train_meta = arrays["train"][1]
            mean, std = torch.tensor(train_meta["mean"]), torch.tensor(train_meta["std"])
        return {
            split: ClassPool(torch.from_numpy(array), mean, std)
            for split, (array, _) in arrays.items()
        }


def _resize(image_chw: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(image_chw.transpose(1, 2, 0))
    return np.asarray(image.resize((size, size), resample=Image.BILINEAR)).transpose(2, 0, 1)


@hookimpl
def fewbench_register_datasets(register):
    register(MiniImageNet)
