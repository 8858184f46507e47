"""Ctrl-C and SIGTERM for a process that runs cells: once, finish the iteration, checkpoint
and stop; twice, stop at once (the last checkpoint holds).

SIGTERM is what ``timeout``, ``kill`` and a cluster's scheduler send before they kill a job
(SLURM gives it a grace period, then SIGKILL): treated as the first Ctrl-C, it leaves a
checkpoint and a cell marked interrupted instead of a lost iteration count and a cell that
stays "running" in the store. The process then exits with 128 + the signal's number (130
for Ctrl-C, 143 for SIGTERM), as a shell reports a process killed by that signal.

One SIGTERM often arrives twice: ``timeout`` sends it to its command and then to the
command's process group, a scheduler to every process of the job, and the ``local``
executor's driver passes it on to its workers (:func:`terminate_passes_on`), which got it
from the group already. A SIGTERM within :data:`DUPLICATE_WINDOW_S` of the first is that
same request and is ignored, so that it does not count as the second one that stops at
once before the checkpoint is written. Ctrl-C is not debounced: pressing it twice, however
quickly, still stops at once.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_WINDOW_S = 2.0  # a SIGTERM this soon after the first is a copy of it (see above)


def exit_code_for(signum: int) -> int:
    """The exit code of a process stopped by ``signum``, as a shell writes it (128 + N)."""
    return 128 + int(signum)


def signal_words(signum: int) -> str:
    """How a stop signal is named to the user."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


@dataclass
class Stopping:
    """The signal that first asked this process to stop: its exit code and its words."""

    signum: int | None = None
    at: float = 0.0  # time.monotonic() when it arrived

    def record(self, signum: int) -> None:
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """128 + the first stop signal; 130 (Ctrl-C) when none came (a stop set otherwise)."""
        return exit_code_for(self.signum if self.signum is not None else signal.SIGINT)

    @property
    def by(self) -> str:
        """``Ctrl-C`` or ``SIGTERM``."""
        return signal_words(self.signum if self.signum is not None else signal.SIGINT)

    def duplicate(self, signum: int) -> bool:
        """Whether ``signum`` is the first SIGTERM delivered a second time (see the module)."""
        return (
            signum == signal.SIGTERM == self.signum
            and time.monotonic() - self.at < DUPLICATE_WINDOW_S
        )


@contextlib.contextmanager
def first_interrupt_stops(stop: threading.Event) -> Iterator[Stopping]:
    """Ctrl-C or SIGTERM once: finish the iteration, checkpoint, stop (``stop`` is set).
    Either again: stop at once (KeyboardInterrupt in the main thread).

    Yields the :class:`Stopping` that says which signal stopped the run, for its exit code.
    Outside the main thread (where Python cannot take signals) it installs nothing.
    """
    stopping = Stopping()

    def second(signum: int, frame: object) -> None:
        if stopping.duplicate(signum):
            return
        for each in STOP_SIGNALS:  # one KeyboardInterrupt, handled by the caller
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt

    def handler(signum: int, frame: object) -> None:
        stopping.record(signum)
        stop.set()
        for each in STOP_SIGNALS:
            signal.signal(each, second)
        again = "Ctrl-C again" if signum == signal.SIGINT else "SIGTERM or Ctrl-C again"
        print(
            f"\nfewbench: {'' if signum == signal.SIGINT else signal_words(signum) + ': '}"
            f"stopping after this iteration and writing a checkpoint ({again} to quit at once)",
            file=sys.stderr,
            flush=True,
        )

    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return
    previous = {each: signal.signal(each, handler) for each in STOP_SIGNALS}
    try:
        yield stopping
    finally:
        # Once a stop was asked for, further signals while exiting are ignored, so that
        # they cannot break the shutdown with a traceback.
        for each, before in previous.items():
            signal.signal(each, signal.SIG_IGN if stop.is_set() else before)


@contextlib.contextmanager
def terminate_passes_on(processes: Sequence[subprocess.Popen], log: TextIO) -> Iterator[Stopping]:
    """SIGTERM to the ``local`` executor's driver reaches its worker processes.

    ``kill DRIVER`` (or a container runtime stopping its first process) reaches the driver
    alone, which would otherwise die and leave its workers training with nobody waiting for
    them; passed on, each worker checkpoints its cell, marks it interrupted and exits, and the
    driver, still waiting for them, returns once they have. Ctrl-C is left as it was: the
    terminal sends it to the whole process group, workers included.

    Each SIGTERM is passed on once (a copy within :data:`DUPLICATE_WINDOW_S` is ignored): a
    later one is the second, which the workers take as "stop at once".
    """
    stopping = Stopping()

    def handler(signum: int, frame: object) -> None:
        if stopping.duplicate(signum):
            return
        first = not stopping.requested
        stopping.record(signum)
        live = [process for process in processes if process.poll() is None]
        for process in live:
            with contextlib.suppress(OSError):  # it ended meanwhile
                process.send_signal(signum)
        what = (
            "each checkpoints its cell and stops (SIGTERM or Ctrl-C again to quit at once)"
            if first
            else "they stop at once"
        )
        workers = f"{len(live)} worker{'' if len(live) == 1 else 's'}"
        print(
            f"fewbench: {signal_words(signum)}: passed on to {workers}; {what}",
            file=log,
            flush=True,
        )

    if threading.current_thread() is not threading.main_thread():
        yield stopping
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield stopping
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if stopping.requested else previous)
