"""What a result was produced with: versions, device, git commit, plugin providers."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from fewbench.registry import KINDS, Registry
from fewbench.running import cpu_heap
from fewbench.version import __version__


def _git_commit(path: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    ).stdout.strip()
    return result.stdout.strip() + ("+dirty" if dirty else "")


def plugin_version(distribution: str) -> str | None:
    """The installed version of a distribution (a plugin's provider), or None."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (``platform.processor()`` is empty on Linux)."""
    from fewbench.running.cost import device_model

    return device_model(device)


def collect(device: torch.device, registry: Registry) -> dict[str, Any]:
    providers = sorted({item.provider for kind in KINDS for item in registry.items(kind)})
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "fewbench": __version__,
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "malloc": cpu_heap.state(),
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(Path(__file__).resolve().parent),
        "plugin_providers": {name: plugin_version(name) for name in providers},
        "command": sys.argv,
    }
