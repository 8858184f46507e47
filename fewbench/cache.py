"""Tensor cache files: written atomically, checked on read, rebuilt when unusable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1


def save_tensor_cache(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
