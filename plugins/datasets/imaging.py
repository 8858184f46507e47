"""Decoding image files into uint8 arrays, in worker processes, for the image datasets."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

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


def _decode_chunk(args: tuple[list[str], int, float | None]) -> np.ndarray:
    paths, size, crop_ratio = args
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = rgb_square(path, size, crop_ratio)
    return out


def decode_rgb(paths: list[str], size: int, crop_ratio: float | None = None) -> np.ndarray:
    """Every path as uint8 ``[N, 3, size, size]``, in order, decoded by up to 4 processes."""
    workers = max(1, min(4, os.cpu_count() or 1, len(paths)))
    chunks = [(paths[i::workers], size, crop_ratio) for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        decoded = list(pool.map(_decode_chunk, chunks))
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i in range(workers):
        out[i::workers] = decoded[i]
    return out


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
