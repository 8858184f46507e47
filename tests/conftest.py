"""Shared fixtures: the real data root, a per-session dataset cache, the registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fewbench.registry import Registry

REPO = Path(__file__).resolve().parent.parent

# The time estimate before a run times its cells first (seconds per suite, and lines on
# stderr): tests of everything else run without it, tests/test_estimate.py turns it on.
os.environ.setdefault("FEWBENCH_NO_ESTIMATE", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The read-only data root: $FEWBENCH_DATA, else ../shared/data beside the checkout."""
    root = Path(os.environ.get("FEWBENCH_DATA") or REPO.parent / "shared" / "data")
    if not (root / "omniglot" / "images_background").is_dir():
        pytest.skip(f"real Omniglot not found under {root} (set FEWBENCH_DATA)")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(os.environ.get("FEWBENCH_TEST_CACHE") or tmp_path_factory.mktemp("fewbench-cache"))


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry()


@pytest.fixture(scope="session")
def omniglot_sources(data_root: Path, cache_dir: Path):
    dataset = Registry().get("dataset", "omniglot").build(split="vinyals", image_size=28)
    return dataset.load(data_root, cache_dir)


@pytest.fixture
def one_torch_thread():
    """Tiny networks: one intra-op thread is faster than several, and on a shared, busy
    machine much faster (a module opts in with ``pytestmark``)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
