"""Few-shot datasets built from the official CIFAR-100 python archive.

``cifar_fs`` (Bertinetto, Henriques, Torr & Vedaldi 2019, "CIFAR-FS"): 64 / 16 / 20
fine classes chosen at random by the authors; the validation and test classes are
listed below by name, training takes the other 64.

``fc100`` (Oreshkin, Rodríguez & Lacoste 2018, "FC100"): the 100 fine classes
split by their 20 superclasses, 12 / 4 / 4, so that training and test classes
come from different superclasses (60 / 20 / 20 fine classes, 600 images each:
CIFAR-100's train and test images of a class together).

The archive (``cifar-100-python.tar.gz``, published MD5
eb9058c3a382ffc7106e4002c42a8d85) is downloaded and unpacked by ``fewbench data
download fc100`` into ``<root>/cifar100/``; the pickled arrays are read once into
a uint8 ``.npy`` cache, memory-mapped at run time, and images are normalised with
the training classes' per-channel statistics.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from fewbench.plugin import (
    SPLITS,
    ClassPool,
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
from fewbench_plugins.datasets.imaging import channel_statistics

ARCHIVE = Resource(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
)
IMAGES_PER_CLASS = 600  # 500 train + 100 test images of each fine class
# FC100's superclass split (indices into CIFAR-100's coarse labels, alphabetical order).
CIFAR_FS_VAL = (
    "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea",
    "camel", "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
)  # fmt: skip
CIFAR_FS_TEST = (
    "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard",
    "plain", "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle",
    "pickup_truck", "rocket",
)  # fmt: skip
FC100_SUPERCLASSES = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}


def _read(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


class CifarFewShot(Dataset):
    """CIFAR-100 regrouped into few-shot splits; subclasses say which fine classes go where."""

    folder = "cifar100"
    resources = (ARCHIVE,)
    how_to_get = (
        "download cifar-100-python.tar.gz from www.cs.toronto.edu/~kriz/cifar.html, then run "
        "fewbench data import NAME PATH-TO-THE-ARCHIVE"
    )
    params = {
        "normalize": Param(True, help="per-channel mean/std of the training classes"),
    }
    episode_identity = ()

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        base = folder / "cifar-100-python"
        missing = [n for n in ("train", "test", "meta") if not (base / n).is_file()]
        return [f"{base / missing[0]} does not exist"] if missing else []

    def split_classes(self, meta: dict | None) -> dict[str, list[int]]:
        """Fine class indices per split; with ``meta`` None, only their counts matter."""
        raise NotImplementedError

    def _base(self, root: Path) -> Path:
        base = Path(root) / self.folder_name() / "cifar-100-python"
        if not base.is_dir():
            raise DataError(
                f"CIFAR-100 not found: {base} does not exist; run: fewbench data download {self.name}"
            )
        return base

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        self._base(root)
        counts = {s: len(v) for s, v in self.split_classes(None).items()}
        return {s: SplitSize(counts[s], IMAGES_PER_CLASS) for s in SPLITS}

    def _all_classes(self, base: Path, cache_dir: Path) -> tuple[np.ndarray, dict]:
        """uint8 [100, 600, 3, 32, 32] (fine classes in label order), and each class's
        superclass (``coarse``) and name (``names``)."""
        path = Path(cache_dir) / "cifar100" / "all-classes.npy"
        stat = (base / "train").stat()
        key = f"{stat.st_size}-{stat.st_mtime_ns}"
        cached = load_array_cache(path, {"key": key})
        if cached is not None:
            return cached
        parts = [_read(base / "train"), _read(base / "test")]
        data = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)
        fine = np.concatenate([p["fine_labels"] for p in parts])
        coarse = np.concatenate([p["coarse_labels"] for p in parts])
        order = np.argsort(
            fine, kind="stable"
        )  # each class: its train images, then its test images
        counts = np.bincount(fine, minlength=100)
        if counts.min() != counts.max():
            raise DataError(
                f"{base}: classes hold between {counts.min()} and {counts.max()} images"
            )
        array = data[order].reshape(100, counts[0], 3, 32, 32)
        coarse_of_fine = [int(coarse[fine == c][0]) for c in range(100)]
        names = list(_read(base / "meta")["fine_label_names"])
        save_array_cache(path, array, {"key": key, "coarse": coarse_of_fine, "names": names})
        return load_array_cache(path, {"key": key})

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        array, meta = self._all_classes(self._base(root), cache_dir)
        splits = self.split_classes(meta)
        mean = std = None
        if self.config["normalize"]:
            m, s = channel_statistics(array[splits["train"]])
            mean, std = torch.tensor(m), torch.tensor(s)
        images = torch.from_numpy(array)
        return {split: ClassPool(images[classes], mean, std) for split, classes in splits.items()}


class FC100(CifarFewShot):
    name = "fc100"
    description = (
        "FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 12/4/4 (60/20/20 classes)"
    )

    def split_classes(self, meta: dict | None) -> dict[str, list[int]]:
        if meta is None:  # only the counts are wanted: 5 fine classes per superclass
            return {s: list(range(5 * len(c))) for s, c in FC100_SUPERCLASSES.items()}
        return {
            split: [f for f in range(100) if meta["coarse"][f] in superclasses]
            for split, superclasses in FC100_SUPERCLASSES.items()
        }


class CifarFS(CifarFewShot):
    name = "cifar_fs"
    description = "CIFAR-FS (Bertinetto et al. 2019): 64/16/20 CIFAR-100 classes"

    def split_classes(self, meta: dict | None) -> dict[str, list[int]]:
        if meta is None:
            return {"train": [0] * 64, "val": [0] * 16, "test": [0] * 20}
        index = {name: i for i, name in enumerate(meta["names"])}
        missing = [n for n in (*CIFAR_FS_VAL, *CIFAR_FS_TEST) if n not in index]
        if missing:
            raise DataError(
                f"CIFAR-100's class list lacks '{missing[0]}': not the official archive?"
            )
        val = [index[n] for n in CIFAR_FS_VAL]
        test = [index[n] for n in CIFAR_FS_TEST]
        train = [i for i in range(100) if i not in set(val) | set(test)]
        return {"train": train, "val": sorted(val), "test": sorted(test)}


@hookimpl
def fewbench_register_datasets(register):
    register(FC100)
    register(CifarFS)
