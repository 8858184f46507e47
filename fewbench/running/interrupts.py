"""Ctrl-C for a process that runs cells: once, finish the iteration, checkpoint and stop;
twice, stop at once (the last checkpoint holds)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def first_interrupt_stops(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C once: finish the iteration, checkpoint, stop. Twice: stop at once."""

    def second(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one KeyboardInterrupt, handled by the caller
        raise KeyboardInterrupt

    def handler(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, second)
        print(
            "\nfewbench: stopping after this iteration and writing a checkpoint "
            "(Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        # Once the user has pressed Ctrl-C, further presses while exiting are ignored, so that
        # they cannot break the shutdown with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN if stop.is_set() else previous)
