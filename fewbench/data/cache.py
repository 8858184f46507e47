"""Tensor cache files: written atomically, checked on read, rebuilt when unusable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewbench.storage.atomic import write_atomically, write_json_atomically

FORMAT = 1


def save_atomically(payload: Any, path: Path, *, fault_point: str | None = None) -> None:
    """``torch.save`` atomically: a crash leaves the previous file intact."""
    write_atomically(path, lambda f: torch.save(payload, f), fault_point=fault_point)


def save_tensor_cache(path: Path, payload: dict[str, Any]) -> None:
    save_atomically({"format": FORMAT, **payload}, path)


def load_tensor_cache(path: Path, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The cached payload, or ``None`` when missing, unreadable, truncated or stale."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception:
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return None
    if any(payload.get(key) != value for key, value in expect.items()):
        return None
    return payload


def save_array_cache(path: Path, array: np.ndarray, meta: dict[str, Any]) -> None:
    """Write ``array`` as ``.npy`` plus a ``.json`` of ``meta``, each atomically, JSON last."""
    write_atomically(path, lambda f: np.save(f, array))
    write_json_atomically(path.with_suffix(".json"), {**meta, "shape": list(array.shape)})


def load_array_cache(path: Path, expect: dict[str, Any]) -> tuple[np.ndarray, dict] | None:
    """A memory-mapped cached array (nothing read until used) and its meta, or None if stale."""
    info = path.with_suffix(".json")
    if not path.is_file() or not info.is_file():
        return None
    try:
        meta = json.loads(info.read_text())
        array = np.load(path, mmap_mode="c")  # copy-on-write: writable view, file untouched
    except (OSError, ValueError):
        return None
    if list(array.shape) != meta.get("shape") or any(meta.get(k) != v for k, v in expect.items()):
        return None
    return array, meta
