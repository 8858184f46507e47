"""Errors a user can act on.

Every problem caused by input (a suite, a plugin, the data) is raised as a
:class:`FewbenchError`; the CLI prints its message as one line and exits with
code 2 instead of showing a traceback.
"""

from __future__ import annotations


class FewbenchError(Exception):
    """An error whose message alone tells the user what is wrong and where."""


class SuiteError(FewbenchError):
    """A problem in a suite file, located by file, key path and (when known) line."""

    def __init__(
        self, message: str, *, file: str | None = None, path: str = "", line: int | None = None
    ):
        self.file = file
        self.path = path
        self.line = line
        self.reason = message
        where = file or "<suite>"
        if line is not None:
            where += f":{line}"
        if path:
            where += f": {path}"
        super().__init__(f"{where}: {message}")


class DataError(FewbenchError):
    """Missing, incomplete or corrupt data."""


class PluginError(FewbenchError):
    """A plugin conflict or an unknown plugin name."""


MAX_LINE = 1000  # characters of an error line: a 1 MB value in a suite is not echoed whole


def one_line(text: str) -> str:
    """Escape line breaks and other control characters (a suite may hold any unicode), and
    cut the middle out of a line longer than MAX_LINE, saying how much was cut."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(line) <= MAX_LINE:
        return line
    head, tail = line[: MAX_LINE * 2 // 3], line[-MAX_LINE // 4 :]
    return f"{head} [... {len(line) - len(head) - len(tail):,} characters cut ...] {tail}"


class DiskFull(FewbenchError):
    """No space left where fewbench had to write: the run stops (nothing written is lost)."""
