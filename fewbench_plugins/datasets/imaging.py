"""Decoding image files into uint8 arrays, in worker processes, for the image datasets.

:func:`decode_images` is the one process pool; each dataset brings only its per-image
decoding (:func:`rgb_square` for the natural-image datasets, a grayscale one for Omniglot).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
from PIL import Image


def rgb_square(path: str, size: int, crop_ratio: float | None = None) -> np.ndarray:
    """An image as uint8 ``[3, size, size]``: resized to the square, or (``crop_ratio``) its
    shorter side resized to ``crop_ratio * size`` and the centre ``size`` square kept."""
    with Image.open(path) as image:
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


def _decode_chunk(
    args: tuple[Callable[[str], np.ndarray], list[str], tuple[int, ...]],
) -> np.ndarray:
    decode_one, paths, shape = args
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = decode_one(path)
    return out


def decode_images(
    paths: list[str], decode_one: Callable[[str], np.ndarray], shape: tuple[int, ...]
) -> np.ndarray:
    """Every path as uint8 ``[N, *shape]``, in order, decoded by up to 4 processes.

    The one pool the image datasets share: ``decode_one`` turns a path into a uint8
    ``shape`` array and must pickle (a top-level function, or a ``functools.partial``
    of one). Each worker takes every ``workers``-th path, so neighbouring files (one
    class, often alike in size) are spread over all workers; the results are
    interleaved back into the order of ``paths``."""
    workers = max(1, min(4, os.cpu_count() or 1, len(paths)))
    chunks = [(decode_one, paths[i::workers], tuple(shape)) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        decoded = list(pool.map(_decode_chunk, chunks))
    out = np.empty((len(paths), *shape), dtype=np.uint8)
    for i in range(workers):
        out[i::workers] = decoded[i]
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
