"""Where fewbench keeps things by default: the data root, the decoded-data cache and the
results folder. Environment variables override the per-user folders."""

from __future__ import annotations

import os
import time
from pathlib import Path

import platformdirs


def default_data_root() -> Path:
    return Path(os.environ.get("FEWBENCH_DATA") or platformdirs.user_data_dir("fewbench"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWBENCH_CACHE") or platformdirs.user_cache_dir("fewbench"))


def default_run_dir(suite_name: str) -> Path:
    """``results/<suite name>/<timestamp>`` under the current directory."""
    return Path("results") / suite_name / time.strftime("%Y%m%d-%H%M%S")


def make_run_dir(path: Path) -> None:
    """Create a run directory (and its parents), or say in one line why it cannot be: a
    path under a file, a read-only file system, no permission."""
    from fewbench.errors import FewbenchError

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FewbenchError(f"--out {path}: cannot create the run directory ({reason})") from None


def check_writable_folder(path: Path, option: str, purpose: str, hint: str = "") -> None:
    """Make sure files can be written under ``path`` (created if missing), or say in one
    line why not (under a file, a read-only file system, no permission), before any work."""
    import tempfile

    from fewbench.errors import FewbenchError

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FewbenchError(
            f"{option} {path}: cannot write {purpose} there ({reason})"
            + (f"; {hint}" if hint else "")
        ) from None


def check_cache_dir(path: Path, option: str) -> None:
    """A read-only cache folder failed every cell, one by one: refuse it before the first."""
    check_writable_folder(
        path, option, "the decoded-data caches", "give a writable folder with --cache-dir or "
        "FEWBENCH_CACHE"
    )  # fmt: skip
