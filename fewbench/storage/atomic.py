"""Atomic file writes: every file fewbench writes that a crash must not leave half-written.

The content goes to a temporary file beside the target, is flushed to disk, and
is renamed over the target (atomic on POSIX file systems, NFS included): a crash
leaves the previous file, or none, never a cut one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from fewbench.errors import DiskFull
from fewbench.storage.faults import crash_point


def write_atomically(
    path: Path, write: Callable[[IO[bytes]], None], *, fault_point: str | None = None
) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place
    (``fault_point`` names a crash point for the reliability tests)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if fault_point:
            crash_point(fault_point)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save says "unexpected pos" on a full disk
        if disk_is_full(exc, path.parent):
            raise DiskFull(
                f"no space left on the device holding {path.parent} (while writing {path.name}); "
                "free some space and run the same command again: nothing written before is lost"
            ) from exc
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def disk_is_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` came from a full disk (or quota) under ``folder``."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomically(path: Path, payload: Any, **dumps: Any) -> None:
    write_text_atomically(path, json.dumps(payload, **dumps))
