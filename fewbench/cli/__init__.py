"""The command line: the parser and its dispatch (``parser``), the commands' bodies
(``commands``) and the cached plugin listing (``plugin_index``). ``fewbench.cli:main`` is the
``fewbench`` command."""

import importlib
from typing import Any

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    # Loaded on use: the package imports nothing, so that its modules never import it half-way.
    if name == "main":
        return importlib.import_module("fewbench.cli.parser").main
    # fewbench 0.1's module fewbench.cli is now fewbench.cli.parser.
    from fewbench._moved import forward

    return forward(__name__, "fewbench.cli", "fewbench.cli.parser", name)
