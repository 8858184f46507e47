"""Tensor cache files: written atomically, checked on read, rebuilt when unusable."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewbench.faults import crash_point

FORMAT = 1


def save_atomically(payload: Any, path: Path, *, fault_point: str | None = None) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place:
    a crash leaves the previous file intact (``fault_point`` is for crash tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(payload, tmp)
        if fault_point:
            crash_point(fault_point)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    with open(partial, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    info = path.with_suffix(".json")
    partial = info.with_name(info.name + ".tmp")
    partial.write_text(json.dumps({**meta, "shape": list(array.shape)}))
    os.replace(partial, info)


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
