"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run the installed ``fewbench`` command as a user would (a fresh process)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fewbench", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=900,
        check=False,
    )


def run_fewbench(
    *args: str, cache_dir: Path, crash: str | None = None
) -> subprocess.CompletedProcess:
    """``python -m fewbench ARGS`` in a fresh process with its own dataset cache, killed by
    SIGKILL at ``crash`` (``FEWBENCH_CRASH_AT``, e.g. ``checkpoint-write:2``) when given."""
    env = {**os.environ, "FEWBENCH_CACHE": str(cache_dir)}
    env.pop("FEWBENCH_CRASH_AT", None)
    if crash:
        env["FEWBENCH_CRASH_AT"] = crash
    return subprocess.run(
        [sys.executable, "-m", "fewbench", *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=900, check=False,
    )  # fmt: skip


def concurrently(*calls: Callable[[], T]) -> list[T]:
    """The results of independent ``calls``, made two at a time (one per core of a 2-core
    machine): for commands that are each a fresh process and mostly its start-up."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda call: call(), calls))


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


@contextlib.contextmanager
def registry_built_once() -> Iterator[None]:
    """In-process ``fewbench`` calls reuse one plugin registry (what ``Registry()`` builds
    from the installed entry points) instead of discovering the plugins again each time:
    discovery reads every installed package's metadata, most of a dry run's time. The
    registry is read-only once built; ``Registry(...)`` with arguments still builds anew."""
    from fewbench import registry as module

    real = module.Registry
    shared = real()

    def registry(*args, **kwargs):
        return shared if not args and not kwargs else real(*args, **kwargs)

    module.Registry = registry
    try:
        yield
    finally:
        module.Registry = real
