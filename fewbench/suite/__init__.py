"""A suite file and what it becomes: parsing with line numbers, ``--set`` and every
structural check (``loading``), the typed cell (``cell``), the pure expansion into cells
(``grid``) and ``fewbench tune``'s search space (``search``)."""

from typing import Any


def __getattr__(name: str) -> Any:
    # fewbench 0.1's module fewbench.suite is now fewbench.suite.loading.
    from fewbench._moved import forward

    if name == "check_suite":  # the whole check, now with the grid it needs
        return forward(__name__, "fewbench.suite", "fewbench.suite.check", name)
    return forward(__name__, "fewbench.suite", "fewbench.suite.loading", name)
