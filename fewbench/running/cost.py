"""What a number cost: time, device, memory and size, recorded with every finished cell.

A few-shot table compares methods whose costs differ by orders of magnitude (a metric
learner's episode against MAML's second-order steps, a 4-block network against a
ResNet-12), and a reviewer asks for them. A cell's cost record holds:

* ``device`` (``cpu``, ``cuda:0``), ``device_model`` (the GPU's name, or the CPU model from
  ``/proc/cpuinfo``; ``platform.processor()`` is empty on most Linux machines) and
  ``devices`` (ranks that trained it: torchrun's ``WORLD_SIZE``);
* ``train_seconds`` and ``eval_seconds`` (wall time; training resumed from a checkpoint
  counts every stretch), ``test_episodes`` and ``inference_seconds_per_episode``
  (evaluation time over test episodes: adaptation included, which is the learner's
  inference);
* ``peak_memory_bytes`` with ``peak_memory_of``: on CUDA the most memory the caching
  allocator handed out (``torch.cuda.max_memory_allocated``, reset when the cell starts);
  on the CPU the peak resident set of the worker process (``VmHWM``), reset when the cell
  starts where Linux allows it (``/proc/self/clear_refs``; it then starts from what the
  process holds, Python and torch and heap earlier cells freed but kept, so it bounds the
  cell's own need from above), and marked ``process`` where it could not be reset (then it
  covers the cells the worker ran before);
* ``parameters``: the learner's trainable and adapted tensors, each counted once;
* ``gpu_hours``: (training + evaluation) x devices / 3600 on CUDA, 0 on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: cpu_model serves torch-free scripts
    import torch

PROC = Path("/proc/self")


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, ``sysctl`` on macOS), else the machine."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    if sys.platform == "darwin":
        import subprocess

        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            if out:
                return out
    return platform.processor() or platform.machine() or "unknown CPU"


def device_model(device: torch.device) -> str:
    """The GPU's name on CUDA, the CPU's model otherwise."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return cpu_model()


def _resident_peak() -> int | None:
    """The process's peak resident set in bytes (``VmHWM``), None where not on Linux."""
    with contextlib.suppress(OSError, ValueError):
        for line in (PROC / "status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _reset_resident_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0); False where it cannot."""
    try:
        with open(PROC / "clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """The peak memory of one cell: :meth:`start` when it starts, :meth:`read` when done."""

    device: torch.device
    scope: str = "cell"

    def start(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _reset_resident_peak():
            self.scope = "process"
        return self

    def read(self) -> tuple[int | None, str]:
        """(bytes, what they measure)."""
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda allocated"
        peak = _resident_peak()
        if peak is None:  # macOS and the BSDs: ru_maxrss, bytes there, kibibytes on Linux
            unit = 1 if sys.platform == "darwin" else 1024
            peak, self.scope = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit, "process"
        what = "resident set" if self.scope == "cell" else "resident set, worker process"
        return peak, what


def world_size() -> int:
    """Ranks that train a cell together (torchrun sets ``WORLD_SIZE``), 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cost_record(
    *,
    device: torch.device,
    peak: PeakMemory,
    train_seconds: float,
    eval_seconds: float,
    test_episodes: int,
    parameters: int | None,
) -> dict[str, Any]:
    """The cell's cost record (see the module's documentation)."""
    memory, memory_of = peak.read()
    devices = world_size()
    return {
        "device": str(device),
        "device_model": device_model(device),
        "devices": devices,
        "train_seconds": float(train_seconds),
        "eval_seconds": float(eval_seconds),
        "test_episodes": int(test_episodes),
        "inference_seconds_per_episode": float(eval_seconds) / max(1, test_episodes),
        "peak_memory_bytes": memory,
        "peak_memory_of": memory_of,
        "parameters": parameters,
        "gpu_hours": (
            (train_seconds + eval_seconds) * devices / 3600 if device.type == "cuda" else 0.0
        ),
    }
