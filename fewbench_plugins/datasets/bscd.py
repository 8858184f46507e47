"""The four target datasets of BSCD-FSL (Guo et al., "A Broader Study of Cross-Domain Few-Shot
Learning", ECCV 2020; the benchmark's code github.com/IBM/cdfsl-benchmark, ``datasets/*_few_shot.py``):
CropDiseases, EuroSAT, ISIC 2018 and ChestX-ray14, read from the layouts that code reads.

They are **test-only**: every class is a test class, with no training or validation split, so a
suite tests on them through ``eval.dataset`` after training on another dataset (mini-ImageNet in
the benchmark); training on one is refused before anything runs. The benchmark's test transform
is kept: each image resized to a square of 1.15 x ``image_size`` (aspect not kept, as its
``Scale([257, 257])``), the centred ``image_size`` square cropped, normalised with ImageNet's
per-channel statistics (``normalize: imagenet``, as the benchmark; ``none`` leaves [0, 1]); the
benchmark's size is 224, the default here 84, so that a model trained on 84x84 mini-ImageNet can
be tested (a cross-domain cell needs the same image size on both sides). Images are decoded once
into a memory-mapped uint8 cache keyed by the files. Classes keep all their images (padded to
the largest class; padding is never drawn).

* ``cropdiseases``: ``cropdiseases/dataset/train/<class>/<image>``, the 38 classes of the Kaggle
  "plant-disease" set (PlantVillage names such as ``Apple___Apple_scab``), in name order.
* ``eurosat``: ``eurosat/2750/<class>/<image>.jpg``, EuroSAT's RGB release: 10 classes, 27,000
  64x64 images (``EuroSAT.zip``, MD5 c8fa014336c82ac7804f0398fcb19387 as torchvision and
  torchgeo record it; downloadable).
* ``isic``: ``isic/ISIC2018_Task3_Training_Input/<image>.jpg`` and
  ``isic/ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv`` (header
  ``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC``, one-hot rows): 7 classes in the columns' order, 10,015
  images.
* ``chestx``: ``chestx/Data_Entry_2017.csv`` and ``chestx/images/<Image Index>``; the rows with
  exactly one finding among Atelectasis, Cardiomegaly, Effusion, Infiltration, Mass, Nodule and
  Pneumothorax (the benchmark's seven classes, in its order; "No Finding", Pneumonia and every
  multi-label row are left out), each grey image resized to 256x256 and copied into three
  channels first, as the benchmark's loader does.

The benchmark tests 600 episodes of 5 ways with 5, 20 and 50 shots and 15 queries per class.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from fewbench.plugin import (
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
from fewbench_plugins.datasets.imaging import decode_examples, decode_images, unreadable_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def benchmark_square(image: Image.Image, size: int, pre_resize: int | None = None) -> np.ndarray:
    """The benchmark's test transform as uint8 ``[3, size, size]``: (ChestX: resized to
    ``pre_resize`` squared first) RGB, resized to ``round(1.15 * size)`` squared, the centred
    ``size`` square."""
    if pre_resize is not None:
        image = image.resize((pre_resize, pre_resize), resample=Image.BILINEAR)
    image = image.convert("RGB")
    scaled = round(size * 1.15)
    image = image.resize((scaled, scaled), resample=Image.BILINEAR)
    offset = (scaled - size) // 2
    image = image.crop((offset, offset, offset + size, offset + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def _decode_file(path: str, size: int, pre_resize: int | None) -> np.ndarray:
    with Image.open(path) as image:
        return benchmark_square(image, size, pre_resize)


class CrossDomainTarget(Dataset):
    """A BSCD-FSL target: every class a test class; files listed by :meth:`class_files`."""

    folder: ClassVar[str] = ""
    pre_resize: ClassVar[int | None] = None  # ChestX's 256x256 before the common transform
    params = {
        "image_size": Param(84, minimum=8, help="side of the square images (BSCD-FSL: 224)"),
        "normalize": Param(
            "imagenet",
            choices=("imagenet", "none"),
            help="imagenet: ImageNet's per-channel statistics (BSCD-FSL's); none: [0, 1]",
        ),
    }
    episode_identity = ()  # the image size changes how examples look, not which are drawn
    test_only = True

    CLASSES: ClassVar[int] = 0
    IMAGES: ClassVar[int | None] = None  # checked by verify when the count is known

    @classmethod
    def files_of(cls, base: Path) -> list[list[str]]:
        """Each class's image files under ``base``, in the benchmark's class order, files in
        name order; a :class:`DataError` for a layout that is not the benchmark's."""
        raise NotImplementedError

    def class_files(self, base: Path) -> list[list[str]]:
        return self.files_of(base)

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        """The benchmark's layout, every listed file present, the class (and image) count, and
        a sample of images decoded."""
        try:
            files = cls.files_of(folder)
        except DataError as exc:
            return [str(exc)]
        missing = [p for f in files for p in f if not Path(p).is_file()]
        if missing:
            return [f"{missing[0]} is listed but missing"]
        return cls._verify_files(files, cls.CLASSES, cls.IMAGES)

    def _base(self, root: Path) -> Path:
        base = Path(root) / self.folder_name()
        if not base.is_dir():
            raise DataError(f"{self.name} not found: {base} does not exist; {self.how_to_get}")
        return base

    def split_sizes(self, root: Path) -> dict[str, SplitSize]:
        files = self.class_files(self._base(root))
        return {"test": SplitSize(len(files), min((len(f) for f in files), default=0))}

    def load(self, root: Path, cache_dir: Path) -> dict[str, EpisodeSource]:
        base = self._base(root)
        files = self.class_files(base)
        counts = [len(f) for f in files]
        flat = [p for f in files for p in f]
        size = self.config["image_size"]
        path = Path(cache_dir) / self.name / f"test-{size}.npy"
        sources = (base, flat)
        cached = load_array_cache(path, {"counts": counts}, sources=sources)
        if cached is None:
            decode = partial(_decode_file, size=size, pre_resize=self.pre_resize)
            every = decode_images(flat, decode, (3, size, size))
            array = np.zeros((len(files), max(counts), 3, size, size), dtype=np.uint8)
            start = 0
            for c, n in enumerate(counts):
                array[c, :n] = every[start : start + n]
                start += n
            save_array_cache(path, array, {"counts": counts}, sources=sources)
            cached = load_array_cache(path, {"counts": counts})
        array, _ = cached
        mean = std = None
        if self.config["normalize"] == "imagenet":
            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        return {"test": ClassPool(torch.from_numpy(array), mean, std, torch.tensor(counts))}

    def example_ids(self, root: Path, split: str) -> list[list[str]]:
        """Each image's file relative to ``root``, in the pool's order."""
        files = self.class_files(self._base(root))
        return [[Path(p).relative_to(root).as_posix() for p in row] for row in files]

    def decode_examples(self, examples: Sequence[Any]) -> torch.Tensor:
        """A user's images by the benchmark's test transform, as the loader decodes files."""
        decode = partial(
            benchmark_square, size=self.config["image_size"], pre_resize=self.pre_resize
        )
        return torch.from_numpy(decode_examples(examples, decode))

    @classmethod
    def _verify_files(cls, files: list[list[str]], classes: int, images: int | None) -> list[str]:
        found = sum(len(f) for f in files)
        if len(files) != classes or (images is not None and found != images):
            expected = f"{classes} classes" + (f" and {images} images" if images else "")
            return [
                f"{cls.name}: found {len(files)} classes and {found} images, expected {expected}"
            ]
        if any(not f for f in files):
            return [f"{cls.name}: a class has no images"]
        unreadable = unreadable_image(sorted(p for f in files for p in f))
        return [unreadable] if unreadable else []


def _folder_classes(folder: Path) -> list[list[str]]:
    """Class folders in name order (torchvision's ImageFolder order), their images by name."""
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist")
    return [
        sorted(str(p) for p in c.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for c in sorted(c for c in folder.iterdir() if c.is_dir())
    ]


def _labelled_files(
    labels: list[tuple[str, int]], classes: int, folder: Path, suffix: str
) -> list[list[str]]:
    """Files of (image, class) rows, grouped by class, each class in name order."""
    files: list[list[str]] = [[] for _ in range(classes)]
    for image, label in labels:
        files[label].append(str(folder / f"{image}{suffix}"))
    return [sorted(f) for f in files]


class CropDiseases(CrossDomainTarget):
    name = "cropdiseases"
    description = "BSCD-FSL target: CropDiseases, 38 plant-disease classes (test only)"
    folder = "cropdiseases"
    how_to_get = (
        "download the Kaggle dataset saroz014/plant-disease (the BSCD-FSL README's source) and "
        "run: fewbench data import cropdiseases PATH (a folder holding dataset/train/<class>/)"
    )
    CLASSES = 38

    @classmethod
    def files_of(cls, base: Path) -> list[list[str]]:
        return _folder_classes(base / "dataset" / "train")


class EuroSAT(CrossDomainTarget):
    name = "eurosat"
    description = "BSCD-FSL target: EuroSAT RGB, 10 land-use classes, 27,000 images (test only)"
    folder = "eurosat"
    resources = (
        Resource(
            "http://madm.dfki.de/files/sentinel/EuroSAT.zip",
            "EuroSAT.zip",
            "c8fa014336c82ac7804f0398fcb19387",
        ),
    )
    how_to_get = (
        "run: fewbench data download eurosat; or, offline, get EuroSAT.zip (the RGB release) "
        "and run: fewbench data import eurosat PATH"
    )
    CLASSES, IMAGES = 10, 27000

    @classmethod
    def files_of(cls, base: Path) -> list[list[str]]:
        return _folder_classes(base / "2750")


ISIC_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


class ISIC(CrossDomainTarget):
    name = "isic"
    description = "BSCD-FSL target: ISIC 2018 skin lesions, 7 classes, 10,015 images (test only)"
    folder = "isic"
    how_to_get = (
        "get ISIC2018_Task3_Training_Input.zip and ISIC2018_Task3_Training_GroundTruth.zip from "
        "challenge.isic-archive.com/data (2018, task 3), unpack both into one folder and run: "
        "fewbench data import isic PATH"
    )
    CLASSES, IMAGES = len(ISIC_CLASSES), 10015
    GROUND_TRUTH = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
    INPUT = "ISIC2018_Task3_Training_Input"

    @classmethod
    def labels(cls, base: Path) -> list[tuple[str, int]]:
        """(image, class) per row of the ground truth: the one-hot column set, in
        :data:`ISIC_CLASSES` order (the benchmark's ``argmax`` of the row)."""
        path = base / cls.GROUND_TRUTH
        if not path.is_file():
            raise DataError(f"{path} does not exist; {cls.how_to_get}")
        with open(path, newline="") as file:
            rows = list(csv.reader(file))
        if not rows or tuple(h.strip() for h in rows[0][1:8]) != ISIC_CLASSES:
            raise DataError(f"{path}: expected the header image,{','.join(ISIC_CLASSES)}")
        labelled = []
        for number, row in enumerate(rows[1:], start=2):
            try:
                values = [float(v) for v in row[1:8]]
            except ValueError:
                raise DataError(f"{path}:{number}: not a one-hot row: {','.join(row)}") from None
            if len(values) != 7 or sorted(values) != [0.0] * 6 + [1.0]:
                raise DataError(f"{path}:{number}: not a one-hot row: {','.join(row)}")
            labelled.append((row[0].strip(), values.index(1.0)))
        return labelled

    @classmethod
    def files_of(cls, base: Path) -> list[list[str]]:
        return _labelled_files(cls.labels(base), len(ISIC_CLASSES), base / cls.INPUT, ".jpg")


CHESTX_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax",
)  # fmt: skip


class ChestX(CrossDomainTarget):
    name = "chestx"
    description = "BSCD-FSL target: ChestX-ray14, 7 single-finding classes (test only)"
    folder = "chestx"
    pre_resize = 256
    how_to_get = (
        "get the NIH ChestX-ray14 release (nihcc.app.box.com/v/ChestXray-NIHCC: images_001 to "
        "images_012.tar.gz, whose MD5s NIH lists in FAQ_CHESTXRAY.pdf, and Data_Entry_2017.csv), "
        "unpack every archive into one images/ folder beside the CSV and run: "
        "fewbench data import chestx PATH"
    )
    CLASSES = len(CHESTX_CLASSES)
    ENTRIES = "Data_Entry_2017.csv"

    @classmethod
    def labels(cls, base: Path) -> list[tuple[str, int]]:
        """(image, class) of the rows with exactly one finding among the seven classes."""
        path = base / cls.ENTRIES
        if not path.is_file():
            raise DataError(f"{path} does not exist; {cls.how_to_get}")
        with open(path, newline="") as file:
            rows = list(csv.reader(file))
        if not rows or [h.strip() for h in rows[0][:2]] != ["Image Index", "Finding Labels"]:
            raise DataError(f"{path}: expected the columns Image Index, Finding Labels first")
        index = {name: i for i, name in enumerate(CHESTX_CLASSES)}
        labelled = []
        for row in rows[1:]:
            findings = row[1].split("|") if len(row) > 1 else []
            if len(findings) == 1 and findings[0] in index:
                labelled.append((row[0].strip(), index[findings[0]]))
        return labelled

    @classmethod
    def files_of(cls, base: Path) -> list[list[str]]:
        return _labelled_files(cls.labels(base), len(CHESTX_CLASSES), base / "images", "")


DATASETS: tuple[type[Dataset], ...] = (CropDiseases, EuroSAT, ISIC, ChestX)


@hookimpl
def fewbench_register_datasets(register):
    for dataset in DATASETS:
        register(dataset)
