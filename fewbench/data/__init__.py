"""Data on disk: the data root and its installs (``root``), downloads with integrity checks
(``download``), decoded-data caches (``cache``) and the check that the data can supply every
cell (``check``). The dataset contract itself is :mod:`fewbench.plugin.dataset`."""

from typing import Any


def __getattr__(name: str) -> Any:
    # fewbench 0.1's module fewbench.data (the dataset contract) is now fewbench.plugin.dataset.
    from fewbench._moved import forward

    return forward(__name__, "fewbench.data", "fewbench.plugin.dataset", name)
