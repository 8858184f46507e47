"""glibc's malloc told to keep large blocks on its heap, in the processes that train cells.

By default glibc maps every block above 32 MB straight from the kernel and unmaps it
when freed. A MAML meta-iteration on mini-ImageNet shapes allocates and frees blocks of
34 to 68 MB dozens of times (one layer's activations over 75 query images), so each one
is faulted in again, zeroed page by page: on the 2-core machine a fresh 34 MB tensor took
9.5 to 15 ms to fill against 2.4 ms on reused pages. With no mapped blocks and a high
trim threshold, the main heap serves them and freed blocks are reused. Measured side by
side with ``benchmarks/throughput.py`` (``heap`` variant, benchmarks/README.md).

Only the main thread's heap can grow to any size: a thread's own arena is made of 64 MB
heaps and still maps larger blocks. Sharing the main arena among threads
(``M_ARENA_MAX`` 1) was measured and dropped: the locking made the 2-thread task loop on
Omniglot 1.1x to 1.2x slower. So :func:`fewbench.methods.adaptation.choose_engine` runs tasks of
mini-ImageNet size one at a time (on every core's intra-op threads) when the heap is on.

The price is resident memory: up to ``TRIM_THRESHOLD`` of freed memory at the top of the
heap stays with the process instead of going back to the kernel (a training process
reuses it at the next iteration). ``FEWBENCH_MALLOC=system`` keeps glibc's defaults. The
settings apply from the call on, so :func:`keep_large_blocks_on_heap` runs first in every
process that trains cells (``fewbench run``, local workers, cluster tasks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from fewbench.errors import FewbenchError

ENV = "FEWBENCH_MALLOC"
TRIM_THRESHOLD = 1 << 30  # 1 GiB of free memory at the heap's top goes back to the kernel
# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
HEAP = "heap (glibc: no mmap for large blocks, trim above 1 GiB)"

_state: str | None = None


def keep_large_blocks_on_heap() -> str:
    """Set glibc's malloc up for training, once per process; what was done, in words.

    Raises :class:`~fewbench.errors.FewbenchError` when ``FEWBENCH_MALLOC`` is neither
    ``heap`` nor ``system``."""
    global _state
    if _state is None:
        _state = _configure()
    return _state


def state() -> str:
    """What :func:`keep_large_blocks_on_heap` did in this process (for the cell's record)."""
    return _state or "system (not configured in this process)"


def is_on() -> bool:
    """Whether glibc keeps large blocks on the heap in this process."""
    return _state == HEAP


def requested() -> str:
    """``heap`` or ``system``, from ``FEWBENCH_MALLOC`` (default ``heap``)."""
    wanted = os.environ.get(ENV, "heap").strip().lower()
    if wanted not in ("heap", "system"):
        raise FewbenchError(
            f"environment variable {ENV} is {os.environ[ENV]!r}: use heap (the default: glibc "
            "keeps large blocks on its heap) or system (glibc's own defaults)"
        )
    return wanted


def _configure() -> str:
    if requested() == "system":
        return f"system ({ENV}=system)"
    if not sys.platform.startswith("linux"):
        return f"system (not glibc: {sys.platform})"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return "system (not glibc)"
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "system (glibc refused mallopt)"
    return HEAP


def _glibc_mallopt():  # noqa: ANN202 - a ctypes function
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
