"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split, in either common form.

Under the data root, ``miniimagenet/`` holds one of:

* ``images/<filename>.jpg`` (84x84 crops of ILSVRC-2012) and
  ``splits/ravi/{train,val,test}.csv`` (columns ``filename,label``), or
* ``mini-imagenet-cache-{train,val,test}.pkl``: pickled dicts with ``image_data``
  (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (label -> image indices).

There is no download: the images derive from ImageNet, whose terms forbid
redistribution. ``fewbench data import miniimagenet SOURCE`` builds the image folder from
ILSVRC-2012's training images (``ILSVRC2012_img_train.tar``, MD5-checked, or its unpacked
forms: :mod:`fewbench_plugins.datasets.ilsvrc`) with the Ravi split CSVs shipped with fewbench,
the way the widely used tools do (github.com/yaoyao-liu/mini-imagenet-tools,
``mini_imagenet_generator.py``; CloserLookFewShot's file lists agree): a class's training files
sorted by the number after their last ``_``, the CSV name's last digits the 1-based position in
that order (``n0153282900000005.jpg`` is the fifth), resized to 84 x 84 by area averaging
(``cv2.INTER_AREA``; here PIL's box filter) and written as JPEG (quality 95, OpenCV's default).
Ravi & Larochelle published no such mapping; that it gives their exact images is the tools'
convention, not confirmed by the authors. Each split is decoded once into a uint8 ``.npy`` cache (keyed by the
split's files: folder, names, sizes, times and sampled bytes) that is
memory-mapped at run time (episodes read only the images they draw, and a second
run starts in seconds). The pickles are received files: they are read with an
unpickler that builds only dicts, lists and numpy arrays (a pickle naming any
other callable is refused, so it cannot run code), and checked (keys, dtype,
shape, class indices) on import and on loading. Classes are ordered by label in both forms, so the
fixed episodes are the same whichever form was installed. Images are normalised
with the per-channel mean and standard deviation of the training classes.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

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
from fewbench_plugins.datasets.safe_pickle import load_numpy_pickle

STANDARD = {"train": 64, "val": 16, "test": 20}  # classes; 600 images each
IMAGES_PER_CLASS = 600
HOW_TO_GET = (
    "mini-ImageNet cannot be downloaded (ImageNet's terms forbid redistribution). Build it from "
    "ILSVRC-2012's training images: fewbench data import miniimagenet "
    "ILSVRC2012_img_train.tar (or its unpacked folder); or import an image folder "
    "(images/<filename>.jpg with splits/ravi/{train,val,test}.csv) or the pickle files "
    "mini-imagenet-cache-{train,val,test}.pkl: fewbench data import miniimagenet PATH"
)


def _pickle_path(folder: Path, split: str) -> Path:
    return folder / f"mini-imagenet-cache-{split}.pkl"


def read_cache(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """The images and classes of one ``mini-imagenet-cache-*.pkl``, read safely and checked."""
    return _check_cache(path, load_numpy_pickle(path, "a mini-ImageNet pickle"))


def _check_cache(path: Path, data: Any) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Keys, dtype and shape of the images, and class indices covering every image."""
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        raise DataError(f"{path}: expected a dict with 'image_data' and 'class_dict'")
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        kind = getattr(images, "dtype", type(images).__name__)
        raise DataError(f"{path}: 'image_data' must be a uint8 numpy array, not {kind}")
    if images.ndim != 4 or images.shape[1:] != (84, 84, 3) or not len(images):
        raise DataError(f"{path}: 'image_data' has shape {images.shape}, expected [N, 84, 84, 3]")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"{path}: 'class_dict' must be a non-empty dict of label -> indices")
    return images, _check_classes(path, class_dict, len(images))


def _check_classes(path: Path, class_dict: dict, count: int) -> dict[str, list[int]]:
    """label -> indices, each an int naming one of the ``count`` images, every image in a class.
    Messages show types rather than values: a hostile value may be huge."""
    seen = np.zeros(count, dtype=bool)
    classes = {}
    for label, indices in class_dict.items():
        if not isinstance(label, str):
            raise DataError(f"{path}: class_dict has a {type(label).__name__} label, not a string")
        where = f"{path}: class_dict[{label[:60]!r}]"
        if isinstance(indices, np.ndarray) and indices.ndim == 1 and indices.dtype.kind in "iu":
            indices = indices.tolist()
        if not isinstance(indices, (list, tuple)) or not indices:
            raise DataError(f"{where} must be a non-empty list of image indices")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise DataError(f"{where} holds a {type(i).__name__}, not an image index")
            if not 0 <= i < count:
                raise DataError(f"{where} holds an index outside the {count} images")
        seen[indices] = True
        classes[label] = [int(i) for i in indices]
    if not seen.all():
        raise DataError(
            f"{path}: image {int(np.argmin(seen))} (of {count}) is in no class of class_dict"
        )
    return classes


def _csv_path(folder: Path, split: str) -> Path:
    return folder / "splits" / "ravi" / f"{split}.csv"


def read_split(path: Path) -> dict[str, list[str]]:
    """label -> file names, from a Ravi split CSV."""
    with open(path, newline="") as f:
        return read_split_text(f.read(), str(path))


def read_split_text(text: str, where: str) -> dict[str, list[str]]:
    """label -> file names, from a Ravi split CSV's text (``where`` names it in errors)."""
    classes: dict[str, list[str]] = {}
    for number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if number == 1 and row[:2] == ["filename", "label"]:
            continue
        if len(row) < 2:
            raise DataError(f"{where}:{number}: expected 'filename,label', got {row!r}")
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
        """The image folder: each split CSV's class count, every listed file present, and
        16 evenly spaced listed images decoded (counting files called a folder of empty
        files complete). The pickles: see :meth:`_verify_pickles`."""
        try:
            form = cls._form(folder)
        except DataError as exc:
            return [str(exc).split(";")[0]]
        if form == "pickle":
            return cls._verify_pickles(folder)
        problems = []
        listed: list[str] = []
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
            listed += [str(folder / "images" / n) for names in classes.values() for n in names]
        if not problems and (unreadable := unreadable_image(sorted(listed))):
            problems.append(unreadable)
        return problems

    @classmethod
    def builds_from(cls, source: Path) -> bool:
        return ilsvrc.is_source(source)

    @classmethod
    def build_from(cls, source: Path, folder: Path) -> None:
        """The image folder from ILSVRC-2012's training images (see the module's docstring)."""
        texts = {split: ilsvrc.split_bytes(f"ravi/{split}.csv") for split in SPLITS}
        wanted: dict[str, list[str]] = {}
        for split, text in texts.items():
            for label, names in read_split_text(text.decode(), f"ravi/{split}.csv").items():
                wanted.setdefault(label, []).extend(names)
        (folder / "images").mkdir(parents=True)
        (folder / "splits" / "ravi").mkdir(parents=True)
        progress = ilsvrc.print_progress("miniimagenet", len(wanted))
        images = ilsvrc.class_images(source, set(wanted), progress)
        for wnid, files in groupby(images, key=lambda image: image[0]):
            by_number = sorted(files, key=lambda image: ilsvrc.ilsvrc_number(image[1]))
            for name in wanted[wnid]:
                position = int(name[len(wnid) : -len(".jpg")])
                if not 1 <= position <= len(by_number):
                    raise DataError(
                        f"{source}: the Ravi split's {name} names training image {position} "
                        f"of {wnid}, which has {len(by_number)}"
                    )
                _, original, data = by_number[position - 1]
                image = ilsvrc.resized(data, 84, "area", f"{source}: {wnid}/{original}")
                image.save(folder / "images" / name, quality=95)
        for split, text in texts.items():
            _csv_path(folder, split).write_bytes(text)

    @staticmethod
    def _verify_pickles(folder: Path) -> list[str]:
        """Read every pickle (safely: it is received data) and count its classes.

        That already checks what decoding a sample checks for an image folder: the
        images are a uint8 array of the right shape, every one in a class (an empty or
        truncated pickle does not unpickle); no second reading is added."""
        problems = []
        for split, expected in STANDARD.items():
            try:
                _, classes = read_cache(_pickle_path(folder, split))
            except DataError as exc:
                problems.append(str(exc))
                continue
            if len(classes) != expected:
                problems.append(
                    f"{_pickle_path(folder, split).name} holds {len(classes)} classes, "
                    f"expected {expected}"
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
    def _image_paths(self, folder: Path, split: str) -> tuple[list[str], int, list[str]]:
        """The image folder's split: labels (sorted), images per class (the smallest
        class's count) and the paths decoded, class by class in file-name order (the
        pickles keep the same order)."""
        classes = read_split(_csv_path(folder, split))
        labels = sorted(classes)
        per_class = min(len(classes[c]) for c in labels)
        paths = [str(folder / "images" / n) for c in labels for n in sorted(classes[c])[:per_class]]
        return labels, per_class, paths

    def _sources(self, folder: Path, form: str, split: str) -> tuple[Path, list[Path | str]]:
        """The files a split's cache is decoded from, for its key: the pickle, or the split
        CSV and every image it decodes (so a replaced image rebuilds the cache too)."""
        if form == "pickle":
            return folder, [_pickle_path(folder, split)]
        return folder, [_csv_path(folder, split), *self._image_paths(folder, split)[2]]

    def _decode_split(self, folder: Path, form: str, split: str) -> np.ndarray:
        size = self.config["image_size"]
        if form == "pickle":
            images, class_dict = read_cache(_pickle_path(folder, split))
            rows = _pickle_rows(class_dict)
            picked = images[[i for row in rows for i in row]]
            picked = picked.transpose(0, 3, 1, 2)  # NHWC -> NCHW
            if picked.shape[-1] != size:
                picked = np.stack([_resize(x, size) for x in picked])
            return picked.reshape(len(rows), len(rows[0]), 3, size, size)
        labels, per_class, paths = self._image_paths(folder, split)
        out = decode_rgb(paths, size)
        return out.reshape(len(labels), per_class, 3, size, size)

    def _split_array(
        self, folder: Path, cache_dir: Path, form: str, split: str
    ) -> tuple[np.ndarray, dict]:
        """One split as uint8 ``[classes, images, 3, size, size]``, decoded once; the cache
        is keyed by the split's files (:meth:`_sources`: folder, names, sizes, times and
        sampled bytes), so another data root or changed files are decoded afresh."""
        path = Path(cache_dir) / "miniimagenet" / f"{split}-{form}-{self.config['image_size']}.npy"
        sources = self._sources(folder, form, split)
        cached = load_array_cache(path, {}, sources=sources)
        if cached is not None:
            return cached
        array = self._decode_split(folder, form, split)
        meta: dict[str, Any] = {}
        if split == "train":  # per-channel statistics of the training classes, on [0, 1]
            meta["mean"], meta["std"] = channel_statistics(array)
        save_array_cache(path, array, meta, sources=sources)
        return load_array_cache(path, {})

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        folder = self._folder(root)
        form = self._form(folder)
        arrays = {s: self._split_array(folder, cache_dir, form, s) for s in SPLITS}
        return split_pools(arrays, self.config["normalize"])

    def example_ids(self, root: Path, split: str) -> list[list[str]]:
        """Each image of ``split`` in :meth:`load`'s order (classes by label, each cut to the
        smallest class's count). The image folder: the file relative to ``root``
        (``miniimagenet/images/n0153282900000005.jpg``). The pickles: the pickle relative to
        ``root`` and the image's index in its ``image_data``
        (``miniimagenet/mini-imagenet-cache-test.pkl#1234``), for the pickle has no files.
        The order comes from the helpers the decoding uses, so the two cannot drift."""
        folder = self._folder(root)
        if self._form(folder) == "pickle":
            path = _pickle_path(folder, split)
            name = path.relative_to(root).as_posix()
            _, class_dict = read_cache(path)
            return [[f"{name}#{i}" for i in row] for row in _pickle_rows(class_dict)]
        labels, per_class, paths = self._image_paths(folder, split)
        names = [Path(p).relative_to(root).as_posix() for p in paths]
        return [names[c * per_class : (c + 1) * per_class] for c in range(len(labels))]

    def decode_examples(self, examples: Sequence[Any]) -> torch.Tensor:
        """A user's images as the loader stores mini-ImageNet's: uint8 ``[N, 3, size,
        size]``, RGB, resized (bilinear, not cropped) to the square unless already that size:
        the very function that decodes the image-folder form (the pickles' 84 x 84 arrays are
        resized the same way). :meth:`preprocess` then normalises them with the training
        classes' statistics, which it reads from the data root's cache."""
        size = self.config["image_size"]
        return torch.from_numpy(decode_examples(examples, partial(rgb_square_image, size=size)))


def _pickle_rows(class_dict: dict[str, list[int]]) -> list[list[int]]:
    """A pickle's image indices, class by class: labels sorted (as the image folder's), each
    class's indices in ``class_dict``'s order, cut to the smallest class's count so that the
    classes fill one array."""
    labels = sorted(class_dict)
    per_class = min(len(class_dict[c]) for c in labels)
    return [list(class_dict[c])[:per_class] for c in labels]


def _resize(image_chw: np.ndarray, size: int) -> np.ndarray:
    """A pickled 84 x 84 image at another size, as the image-folder form decodes its files."""
    return rgb_square_image(Image.fromarray(image_chw.transpose(1, 2, 0)), size)


@hookimpl
def fewbench_register_datasets(register):
    register(MiniImageNet)
