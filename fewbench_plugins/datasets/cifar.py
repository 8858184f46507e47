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
a uint8 ``.npy`` cache (keyed by the pickles: folder, sizes, times and first bytes),
memory-mapped at run time, and images are normalised with
the training classes' per-channel statistics.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

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
from fewbench_plugins.datasets.imaging import channel_statistics, decode_examples
from fewbench_plugins.datasets.safe_pickle import load_numpy_pickle

ARCHIVE = Resource(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
)
IMAGES_PER_CLASS = 600  # 500 train + 100 test images of each fine class
CLASSES = 100
PICKLES = ("train", "test", "meta")  # the files under cifar-100-python/
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
    """One of the archive's pickles, read without running what it names (a received file:
    ``pickle.load`` would call any global a crafted one names); one DataError line if not."""
    data = load_numpy_pickle(path, "a CIFAR-100 pickle")
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a CIFAR-100 pickle (holds a {type(data).__name__})")
    return data


class _NoGlobals(pickle.Unpickler):
    """Builds only plain values (the ``meta`` file holds two lists of strings): a pickle
    naming any callable is refused, so verifying a received folder cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused the global {module}.{name}")


def _pickle_problem(path: Path) -> str | None:
    """Whether ``path`` looks like a whole pickle of a dict, from its first and last bytes
    only: such a pickle starts with PROTO (0x80, protocol 2 and later), MARK (``(``) or
    EMPTY_DICT (``}``) and ends with STOP (``.``), so an empty, truncated or foreign file
    is caught without reading 150 MB of pixels."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(1)
        f.seek(max(size - 1, 0))
        last = f.read(1)
    if first not in (b"\x80", b"(", b"}") or last != b".":
        return f"{path} is not a whole pickle ({size:,} bytes; empty, truncated or another file)"
    return None


def _meta_problem(path: Path) -> str | None:
    """The small ``meta`` pickle must name the 100 fine classes (read without globals)."""
    try:
        with open(path, "rb") as f:
            meta = _NoGlobals(f, encoding="latin1").load()
    except Exception as exc:
        return f"{path} is not CIFAR-100's meta pickle ({type(exc).__name__}: {exc})"[:300]
    names = meta.get("fine_label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != CLASSES:
        return f"{path} does not name {CLASSES} fine classes"
    return None


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
        """The three pickles exist and each is whole (first and last byte), and ``meta``
        names 100 classes. ``train`` and ``test`` (150 and 30 MB) are not unpickled here:
        ``data list`` verifies every dataset each time, and the cache build reads them
        anyway, where one that does not unpickle is one DataError line (and a changed one
        rebuilds the cache, which is keyed by the files)."""
        base = folder / "cifar-100-python"
        missing = [n for n in PICKLES if not (base / n).is_file()]
        if missing:
            return [f"{base / missing[0]} does not exist"]
        problems = [p for n in PICKLES if (p := _pickle_problem(base / n))]
        if not problems and (meta := _meta_problem(base / "meta")):
            problems.append(meta)
        return problems

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
        # Keyed by the three pickles (folder, sizes, times, first bytes): another data
        # root or a changed file rebuilds, instead of serving classes cached from others.
        sources = (base, [base / n for n in PICKLES])
        cached = load_array_cache(path, {}, sources=sources)
        if cached is not None:
            return cached
        parts = [_read(base / "train"), _read(base / "test")]
        data = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)
        rows, meta = _class_rows(base, parts)
        save_array_cache(path, data[rows], meta, sources=sources)  # [100, 600, 3, 32, 32]
        return load_array_cache(path, {})

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        array, meta = self._all_classes(self._base(root), cache_dir)
        splits = self.split_classes(meta)
        mean = std = None
        if self.config["normalize"]:
            m, s = channel_statistics(array[splits["train"]])
            mean, std = torch.tensor(m), torch.tensor(s)
        images = torch.from_numpy(array)
        return {split: ClassPool(images[classes], mean, std) for split, classes in splits.items()}

    def example_ids(self, root: Path, split: str) -> list[list[str]]:
        """Each image of ``split`` as the pickle that holds it, relative to ``root``, and its
        row in that pickle's ``data`` (``cifar100/cifar-100-python/train#4321``; ``test#…``
        for CIFAR-100's test images), for the archive has no image files. In :meth:`load`'s
        order (:func:`_class_rows`: each class's train images, then its test images). Reads
        both pickles, as building the cache does."""
        base = self._base(root)
        parts = [_read(base / "train"), _read(base / "test")]
        rows, meta = _class_rows(base, parts)
        train_count = len(parts[0]["fine_labels"])
        train, test = ((base / n).relative_to(root).as_posix() for n in ("train", "test"))
        names = [f"{train}#{r}" for r in range(train_count)]
        names += [f"{test}#{r}" for r in range(len(parts[1]["fine_labels"]))]
        return [[names[r] for r in rows[c]] for c in self.split_classes(meta)[split]]

    def decode_examples(self, examples: Sequence[Any]) -> torch.Tensor:
        """A user's images as the loader stores CIFAR-100's: uint8 ``[N, 3, 32, 32]``, RGB.
        The dataset's images are 32 x 32 and its loader resizes nothing, so neither does
        this: another size is refused (resize it yourself, knowingly). :meth:`preprocess`
        then normalises them with the training classes' statistics."""
        return torch.from_numpy(decode_examples(examples, _cifar_image))


def _class_rows(base: Path, parts: list[dict]) -> tuple[np.ndarray, dict]:
    """Where each class's images are among the ``train`` then ``test`` pickles' images
    (``parts``, read): ``[100, per class]`` rows, fine classes in label order, each class's
    train images then its test images in file order; and each fine class's superclass
    (``coarse``) and name (``names``), read from ``meta``. The one place that order is set,
    for the cache and :meth:`CifarFewShot.example_ids`."""
    fine = np.concatenate([p["fine_labels"] for p in parts])
    coarse = np.concatenate([p["coarse_labels"] for p in parts])
    counts = np.bincount(fine, minlength=CLASSES)
    if counts.min() != counts.max():
        raise DataError(f"{base}: classes hold between {counts.min()} and {counts.max()} images")
    rows = np.argsort(fine, kind="stable").reshape(CLASSES, counts[0])
    coarse_of_fine = [int(coarse[fine == c][0]) for c in range(CLASSES)]
    names = list(_read(base / "meta")["fine_label_names"])
    return rows, {"coarse": coarse_of_fine, "names": names}


def _cifar_image(image: Image.Image) -> np.ndarray:
    """An RGB image of CIFAR's size as uint8 ``[3, 32, 32]``."""
    if image.size != (32, 32):
        raise DataError(
            f"an image of {image.width} x {image.height} pixels; CIFAR-100's are 32 x 32 and "
            "its loader resizes nothing"
        )
    return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


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
