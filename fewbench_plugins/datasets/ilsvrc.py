"""Reading ILSVRC-2012's training images, the source mini-ImageNet and tiered-ImageNet are
built from (``fewbench data import miniimagenet|tieredimagenet SOURCE``).

``SOURCE`` is one of the forms ImageNet's training set comes in:

* ``ILSVRC2012_img_train.tar`` itself (138 GB: one tar per class inside), read in one pass
  while its MD5 is computed; the build is refused at the end unless the MD5 is the official
  one (:data:`TRAIN_TAR_MD5`, as torchvision's ``ImageNet`` records it), so a damaged or
  other archive never becomes a dataset;
* a folder of those per-class tars (``n01532829.tar``, ...), the outer tar unpacked;
* a folder of class folders (``n01532829/n01532829_28.JPEG``, ...), the usual unpacked form.

A folder has no published checksum; its files are decoded one by one, and one that does not
decode is named in one line. Only the classes a split lists are read.

The split lists ship with fewbench (``splits/``): Ravi & Larochelle's CSVs for mini-ImageNet
(byte-identical to github.com/twitter-research/meta-learning-lstm ``data/miniImagenet``, their
SHA-256 checked on reading) and Ren et al.'s class lists for tiered-ImageNet
(github.com/renmengye/few-shot-ssl-public ``fewshot/data/tiered_imagenet_split``). No
third-party archive is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image as PILImage

from fewbench.plugin import DataError
from fewbench_plugins.datasets.imaging import failure_reason

# torchvision/datasets/imagenet.py, ARCHIVE_META["train"].
TRAIN_TAR_MD5 = "1d675b47d978889d74fa0da5fadfb00e"
SPLITS_FOLDER = Path(__file__).parent / "splits"
WNID = re.compile(r"n\d{8}")
CLASS_TAR = re.compile(r"(n\d{8})\.tar")
CHUNK = 1 << 20

# The class and image a source yields: (wnid, ILSVRC file name, the file's bytes).
Image = tuple[str, str, bytes]


def ilsvrc_number(name: str) -> int:
    """The number of an ILSVRC training file, after its last ``_``: ``n01532829_28.JPEG`` -> 28."""
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise DataError(
            f"{name}: not an ILSVRC-2012 training file name (<wnid>_<number>.JPEG)"
        ) from None


def is_source(source: Path) -> bool:
    """Whether ``source`` is one of ILSVRC-2012's training forms (not an installed dataset)."""
    source = Path(source)
    if source.is_file():
        return source.name.endswith(".tar") and _first_member_is_class_tar(source)
    if not source.is_dir():
        return False
    for entry in source.iterdir():
        if CLASS_TAR.fullmatch(entry.name) and entry.is_file():
            return True
        if WNID.fullmatch(entry.name) and entry.is_dir():
            return True
    return False


def _first_member_is_class_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r|") as archive:
            member = archive.next()
    except (OSError, tarfile.TarError):
        return False
    return member is not None and CLASS_TAR.fullmatch(member.name) is not None


def class_images(
    source: Path, wanted: set[str], progress: Callable[[str], None]
) -> Iterator[Image]:
    """Every training image of the ``wanted`` classes in ``source``, class by class.

    The outer tar's MD5 is checked after its last byte is read; a mismatch raises then,
    before the caller installs anything."""
    source = Path(source)
    if source.is_file():
        yield from _from_outer_tar(source, wanted, progress)
        return
    present = {w for w in wanted if (source / w).is_dir() or (source / f"{w}.tar").is_file()}
    _check_all_found(source, wanted, present)  # before reading any: a folder is cheap to list
    for wnid in sorted(wanted):
        folder, tar = source / wnid, source / f"{wnid}.tar"
        if folder.is_dir():
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                yield wnid, path.name, path.read_bytes()
        else:
            with open(tar, "rb") as file:
                yield from _from_class_tar(wnid, file, tar.name)
        progress(wnid)


def _from_outer_tar(
    path: Path, wanted: set[str], progress: Callable[[str], None]
) -> Iterator[Image]:
    digest = hashlib.md5(usedforsecurity=False)
    found = set()
    with open(path, "rb") as raw:
        reader = _Hashing(raw, digest)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as outer:
                for member in outer:
                    match = CLASS_TAR.fullmatch(member.name)
                    if not member.isfile() or not match or match.group(1) not in wanted:
                        continue
                    inner = outer.extractfile(member)
                    yield from _from_class_tar(match.group(1), inner, f"{path.name}:{member.name}")
                    found.add(match.group(1))
                    progress(match.group(1))
        except tarfile.TarError as exc:
            raise DataError(f"{path}: not a readable tar ({exc})") from None
        while reader.read(CHUNK):  # the rest of the file, for its MD5
            pass
    if digest.hexdigest() != TRAIN_TAR_MD5:
        raise DataError(
            f"{path}: MD5 {digest.hexdigest()}, not ILSVRC2012_img_train.tar's {TRAIN_TAR_MD5} "
            "(a damaged or different archive; unpack it and give the folder to build anyway)"
        )
    _check_all_found(path, wanted, found)


def _from_class_tar(wnid: str, file: IO[bytes], where: str) -> Iterator[Image]:
    """The images of one class's tar, in the tar's order (the caller sorts them)."""
    try:
        with tarfile.open(fileobj=file, mode="r|") as archive:
            for member in archive:
                if member.isfile():
                    name = member.name.rsplit("/", 1)[-1]
                    yield wnid, name, archive.extractfile(member).read()
    except tarfile.TarError as exc:
        raise DataError(f"{where}: not a readable tar ({exc})") from None


def _check_all_found(source: Path, wanted: set[str], found: set[str]) -> None:
    missing = sorted(wanted - found)
    if missing:
        raise DataError(
            f"{source} lacks {len(missing)} of the {len(wanted)} classes needed, "
            f"{missing[0]} first (neither {missing[0]}/ nor {missing[0]}.tar)"
        )


class _Hashing(io.RawIOBase):
    """A file read through, every byte also fed to ``digest``."""

    def __init__(self, raw: IO[bytes], digest: hashlib._Hash):
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        data = self.raw.read(len(buffer))
        self.digest.update(data)
        buffer[: len(data)] = data
        return len(data)


# SHA-256 of each shipped split file's text: Ravi's CSVs as meta-learning-lstm publishes them,
# Ren et al.'s class lists as few-shot-ssl-public does (git blobs a05616d6, df9d7114, c443d62d).
SPLIT_SHA256 = {
    "ravi/train.csv": "498519cd8e49ce97ed26a4a3638966698ae41ab35e9c68538319fc9b46ba7d2f",
    "ravi/val.csv": "5658a59921ca027ee76af92949869c5d6f41d77592ff3b18db325a9d10c893b9",
    "ravi/test.csv": "2b7cfa78342995761a572a8158e539bc4e0a80f9bbd7d00c1e17a460fbbb93fa",
    "tiered/train.csv": "6b87c8440f610d406bce85ac70db018485cc1b036a9106d512e75e4988eb3e15",
    "tiered/val.csv": "e63540c17e82c2de98df9244b03cdb7e214ea513ae543d6dbc29998f9597cfc5",
    "tiered/test.csv": "a478b4481aae4003b6b3c7a09f9ddc56b36f54652e01b83d07a8e6ee1b789d56",
}


def split_bytes(name: str) -> bytes:
    """A shipped split file's bytes (``ravi/train.csv``, gzipped on disk; ``tiered/test.csv``),
    checked against :data:`SPLIT_SHA256`, so an edited list never builds a dataset."""
    path = SPLITS_FOLDER / name
    packed = path.with_name(path.name + ".gz")
    data = gzip.decompress(packed.read_bytes()) if packed.is_file() else path.read_bytes()
    if hashlib.sha256(data).hexdigest() != SPLIT_SHA256[name]:
        raise DataError(f"{path}: not the published split file (its SHA-256 differs)")
    return data


def resized(data: bytes, size: int, kernel: str, where: str) -> PILImage.Image:
    """An image file's bytes as an RGB ``size`` x ``size`` image, resized (not cropped) the way
    the dataset's builder did with OpenCV: ``area`` (``cv2.INTER_AREA``, mini-ImageNet's tools)
    by PIL's box filter, the same fractional-area average; ``cubic`` (``cv2.INTER_CUBIC``,
    tiered-ImageNet's builder) by torch's bicubic, the same kernel (a = -0.75) without
    antialiasing. Either may differ from OpenCV's integer arithmetic by a level or so."""
    try:
        with PILImage.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ...
        raise DataError(f"{where} is not a readable image ({failure_reason(exc)})") from None
    if kernel == "area":
        return image.resize((size, size), resample=PILImage.BOX)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float()
    out = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
    array = out[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return PILImage.fromarray(np.ascontiguousarray(array))


def print_progress(dataset: str, total: int) -> Callable[[str], None]:
    """A callback printing ``dataset: class i/total (wnid)`` to stderr, one line per class."""
    done = 0

    def report(wnid: str) -> None:
        nonlocal done
        done += 1
        print(f"{dataset}: class {done}/{total} ({wnid}) read", file=sys.stderr, flush=True)

    return report
