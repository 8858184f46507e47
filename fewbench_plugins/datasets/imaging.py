"""Decoding image files into uint8 arrays, in worker processes, for the image datasets.

:func:`decode_images` is the one process pool; each dataset brings only its per-image
decoding (:func:`rgb_square` for the natural-image datasets, a grayscale one for Omniglot).
:func:`decode_examples` runs the same per-image decoding on a user's own images (paths, PIL
images, arrays) for ``Dataset.decode_examples``, so a model's inputs are prepared as its
episodes were.
A file that does not decode is one :class:`DataError` line naming it, never a traceback
from a worker. :func:`unreadable_image` is the check ``verify`` shares: counting files
called a folder of empty PNGs complete, so a sample of them is decoded too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from fewbench.plugin import ClassPool, DataError

VERIFY_SAMPLE = 16  # images verify decodes, evenly spaced over the sorted file list


def evenly_spaced(items: list[str], count: int) -> list[str]:
    """Up to ``count`` of ``items``, evenly spaced from the first: a deterministic sample."""
    count = min(count, len(items))
    return [items[i * len(items) // count] for i in range(count)]


def unreadable_image(paths: list[str], count: int = VERIFY_SAMPLE) -> str | None:
    """A problem line for the first of ``count`` evenly spaced ``paths`` that PIL cannot
    decode in full (empty, truncated, not an image), or ``None`` when all of them decode.

    A sample, not every file: ``data list`` verifies every installed dataset, and a
    sample of 16 takes milliseconds while it still tells a tree of empty or garbage files
    from a real one. Any other bad file is reported, by name, when the cache is built."""
    for path in evenly_spaced(paths, count):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ...
            return f"{path} is not a readable image ({failure_reason(exc)})"
    return None


def failure_reason(exc: Exception) -> str:
    """The first line of why a file did not decode, at most 200 characters."""
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]


def rgb_square(path: str, size: int, crop_ratio: float | None = None) -> np.ndarray:
    """An image file as uint8 ``[3, size, size]`` (see :func:`rgb_square_image`)."""
    with Image.open(path) as image:
        return rgb_square_image(image, size, crop_ratio)


def rgb_square_image(image: Image.Image, size: int, crop_ratio: float | None = None) -> np.ndarray:
    """An image as uint8 ``[3, size, size]``: resized to the square, or (``crop_ratio``) its
    shorter side resized to ``crop_ratio * size`` and the centre ``size`` square kept. The
    loaders decode files with it, and ``decode_examples`` a user's images."""
    image = image.convert("RGB")
    if crop_ratio is None:
        if image.size != (size, size):
            image = image.resize((size, size), resample=Image.BILINEAR)
    else:
        scale = round(size * crop_ratio) / min(image.size)
        width = max(size, round(image.width * scale))
        height = max(size, round(image.height * scale))
        image = image.resize((width, height), resample=Image.BILINEAR)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


# -- a user's own examples (Dataset.decode_examples) --------------------------------------------
def _as_image(example: Any, where: str) -> Image.Image:
    """An array ``H x W``, ``H x W x 1``, ``H x W x 3`` or ``H x W x 4`` (uint8 0..255, or
    floats 0..1, rounded to the nearest of the 256 levels a file holds) as a PIL image."""
    array = np.asarray(example)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise DataError(
            f"{where}: an array of shape {list(array.shape)}; expected H x W (grey) or "
            "H x W x 3 / 4 (RGB, RGBA), channels last, one image"
        )
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise DataError(
                f"{where}: float values must be finite and in [0, 1] (0 black, 1 white); "
                f"this one spans [{np.nanmin(array):.3g}, {np.nanmax(array):.3g}] (0..255 values: "
                "give them as uint8)"
            )
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        if array.dtype.kind not in "iub" or array.min() < 0 or array.max() > 255:
            raise DataError(
                f"{where}: a {array.dtype} array; expected uint8 (0..255) or floats in [0, 1]"
            )
        array = array.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def decode_examples(
    examples: Sequence[Any], decode_one: Callable[[Image.Image], np.ndarray]
) -> np.ndarray:
    """A user's examples through ``decode_one`` (the loader's own per-image transform), as
    uint8 ``[N, *shape]``. Each is a file path (opened as the loaders open their files, so
    a dataset's own file gives exactly what its episodes hold), a PIL image, or an array
    ``H x W (x C)``, uint8 or floats in [0, 1]. One that is none of these, or that does not
    decode, is one :class:`DataError` naming it."""
    if isinstance(examples, str | os.PathLike | Image.Image | np.ndarray) or not isinstance(
        examples, Sequence
    ):
        raise DataError(
            f"expected a list of images (file paths, PIL images or H x W (x C) arrays), got "
            f"{type(examples).__name__}"
            + ("; list(array) if it is a stack of images" if hasattr(examples, "shape") else "")
        )
    if not examples:
        raise DataError("expected a list of images, got an empty one")
    decoded = []
    for i, example in enumerate(examples):
        where = f"image {i}" + (f" ({example})" if isinstance(example, str | os.PathLike) else "")
        try:
            if isinstance(example, str | os.PathLike):
                with Image.open(example) as image:
                    decoded.append(decode_one(image))
            elif isinstance(example, Image.Image):
                decoded.append(decode_one(example))
            elif hasattr(example, "__array__"):
                decoded.append(decode_one(_as_image(example, where)))
            else:
                raise DataError(
                    f"{where}: a {type(example).__name__}; expected a file path, a PIL image "
                    "or an H x W (x C) array"
                )
        except DataError as exc:
            message = str(exc)
            raise DataError(
                message if message.startswith(where) else f"{where}: {message}"
            ) from None
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ...
            raise DataError(f"{where} is not a readable image ({failure_reason(exc)})") from None
    return np.stack(decoded)


def _decode_chunk(
    args: tuple[Callable[[str], np.ndarray], list[str], tuple[int, ...]],
) -> tuple[np.ndarray, tuple[int, str] | None]:
    """The chunk decoded, and its first bad file (its index in the chunk and a message:
    plain values, which always pickle back, unlike some exceptions), or ``None``."""
    decode_one, paths, shape = args
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            image = decode_one(path)
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, ...
            return out, (i, f"{path} is not a readable image ({failure_reason(exc)})")
        out[i] = image
    return out, None


def decode_images(
    paths: list[str], decode_one: Callable[[str], np.ndarray], shape: tuple[int, ...]
) -> np.ndarray:
    """Every path as uint8 ``[N, *shape]``, in order, decoded by up to 4 processes.

    The one pool the image datasets share: ``decode_one`` turns a path into a uint8
    ``shape`` array and must pickle (a top-level function, or a ``functools.partial``
    of one). Each worker takes every ``workers``-th path, so neighbouring files (one
    class, often alike in size) are spread over all workers; the results are
    interleaved back into the order of ``paths``. A file that does not decode raises
    one :class:`DataError` naming it (the first in ``paths`` among those found)."""
    workers = max(1, min(4, os.cpu_count() or 1, len(paths)))
    chunks = [(decode_one, paths[i::workers], tuple(shape)) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        decoded = list(pool.map(_decode_chunk, chunks))
    problems = [  # (position in paths, message)
        (error[0] * workers + worker, error[1])
        for worker, (_, error) in enumerate(decoded)
        if error is not None
    ]
    if problems:
        raise DataError(min(problems)[1])
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    for i in range(workers):
        out[i::workers] = decoded[i][0]
    return out


def decode_rgb(paths: list[str], size: int, crop_ratio: float | None = None) -> np.ndarray:
    """Every path as uint8 ``[N, 3, size, size]`` (see :func:`rgb_square`), in order."""
    return decode_images(
        paths, partial(rgb_square, size=size, crop_ratio=crop_ratio), (3, size, size)
    )


def channel_statistics(array: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 ``[C, E, 3, H, W]``, on [0, 1].

    Accumulated one class at a time in float64, so a large split needs no large copy."""
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for images in array:
        values = images.astype(np.float64) / 255.0
        total += values.sum(axis=(0, 2, 3))
        squares += (values**2).sum(axis=(0, 2, 3))
        count += values.shape[0] * values.shape[2] * values.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()


def split_pools(
    arrays: dict[str, tuple[np.ndarray, dict]], normalize: bool
) -> dict[str, ClassPool]:
    """One :class:`ClassPool` per split from its cached uint8 array and metadata: normalised,
    when ``normalize``, with the per-channel statistics recorded with the training split; a
    split whose metadata has ``counts`` holds classes of different sizes (padded)."""
    mean = std = None
    if normalize:
        train_meta = arrays["train"][1]
        mean, std = torch.tensor(train_meta["mean"]), torch.tensor(train_meta["std"])
    return {
        split: ClassPool(
            torch.from_numpy(array),
            mean,
            std,
            torch.tensor(meta["counts"]) if "counts" in meta else None,
        )
        for split, (array, meta) in arrays.items()
    }
