"""The command line: the parser and its dispatch (``parser``), the commands' bodies
(``commands``) and the cached plugin listing (``plugin_index``). ``fewbench.cli:main`` is the
``fewbench`` command."""

from typing import Any

from fewbench.cli.parser import main

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    # fewbench 0.1's module fewbench.cli is now fewbench.cli.parser.
    from fewbench._moved import forward

    return forward(__name__, "fewbench.cli", "fewbench.cli.parser", name)
