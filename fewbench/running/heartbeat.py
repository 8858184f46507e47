"""Heartbeats: a worker's proof, renewed every few seconds, that it is still on its cell."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

DEFAULT_STALE_AFTER = 120.0  # seconds: fewbench run --stale-after's default
# The results store's meta key for the workers' --stale-after, so that fewbench status, which
# is not told it, calls a running cell stale when its workers would take it over.
STALE_AFTER_META = "stale_after"


def interval_for(stale_after: float) -> float:
    """Beat four times per staleness period, so one late beat never makes a cell look lost."""
    return max(0.5, stale_after / 4)


class Heartbeat:
    """Calls a beat every ``interval`` seconds from a background thread while the ``with``
    block runs.

    ``connect()`` is entered in that thread and yields the beat function, so that whatever
    the beat writes with (a SQLite connection must stay in the thread that opened it) is
    opened and closed there.
    """

    def __init__(
        self,
        connect: Callable[[], contextlib.AbstractContextManager[Callable[[], None]]],
        interval: float,
    ):
        self.connect, self.interval = connect, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fewbench-heartbeat", daemon=True)

    @classmethod
    def calling(cls, beat: Callable[[], None], interval: float) -> Heartbeat:
        """A heartbeat whose beat needs nothing opened (a file write)."""
        return cls(lambda: contextlib.nullcontext(beat), interval)

    def _run(self) -> None:
        with self.connect() as beat:
            while not self._stop.wait(self.interval):
                beat()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
