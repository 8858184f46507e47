"""Fault injection for crash tests: make this process die at a named point.

``FEWBENCH_CRASH_AT=point[:n]`` kills the process with SIGKILL the ``n``-th time
(default the first) execution reaches ``crash_point(point)``. Points:
``checkpoint-write`` (a checkpoint's temporary file is written, not yet renamed),
``results-commit`` (a cell's results are inserted, the transaction not committed),
``evaluation`` (test evaluation under way). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(point: str) -> None:
    wanted = os.environ.get("FEWBENCH_CRASH_AT")
    if not wanted:
        return
    name, _, nth = wanted.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
