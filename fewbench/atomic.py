"""Atomic file writes: every file fewbench writes that a crash must not leave half-written.

The content goes to a temporary file beside the target, is flushed to disk, and
is renamed over the target (atomic on POSIX file systems, NFS included): a crash
leaves the previous file, or none, never a cut one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fewbench.faults import crash_point


def write_atomically(
    path: Path, write: Callable[[IO[bytes]], None], *, fault_point: str | None = None
) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place
    (``fault_point`` names a crash point for the reliability tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fault_point:
            crash_point(fault_point)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomically(path: Path, payload: Any, **dumps: Any) -> None:
    write_text_atomically(path, json.dumps(payload, **dumps))
