"""Helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the installed ``fewbench`` command as a user would (a fresh process)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fewbench.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=900,
        check=False,
    )


def assert_same_trained_conv4(first: dict, second: dict) -> None:
    """Two Conv-4 state dicts trained the same way are equal to float tolerance.

    A convolution's bias just before a batch norm has no effect on the output, so its
    gradient is float noise that Adam turns into steps of +-meta_lr: those are left out.
    """
    import torch

    irrelevant = {f"0.{i}.bias" for i in (0, 3, 6, 9)}
    compared = [key for key in first if key not in irrelevant]
    assert len(compared) == 14 and set(first) == set(second)
    for key in compared:
        torch.testing.assert_close(first[key], second[key], rtol=1e-3, atol=1e-4)
