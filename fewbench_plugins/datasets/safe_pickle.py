"""Reading received pickles (mini-ImageNet's caches, CIFAR-100's archive) without running
what they name: ``pickle.load`` would call any global a crafted file names, so only the
globals numpy's own array pickling uses are allowed, each wrapped so the pickle cannot
modify it."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fewbench.plugin import DataError

try:  # numpy 2
    from numpy._core.multiarray import _reconstruct, scalar
    from numpy._core.numeric import _frombuffer
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct, scalar
    from numpy.core.numeric import _frombuffer


class _Global:
    """A callable a pickle may use, which the pickle cannot modify (no ``__dict__``; the
    BUILD opcode, which would set attributes on it, is refused)."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[..., Any]):
        self._function = function

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a pickle tried to modify an allowed numpy function")


def _latin1(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it, for latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


# Exactly the globals numpy's own pickling names (protocols 2 to 5, numpy 1 and 2).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _Global(_latin1),
    **{
        (f"numpy.{core}.{module}", name): _Global(function)
        for core in ("core", "_core")
        for module, name, function in (
            ("multiarray", "_reconstruct", _reconstruct),
            ("multiarray", "scalar", scalar),
            ("numeric", "_frombuffer", _frombuffer),
        )
    },
}


class _NumpyUnpickler(pickle.Unpickler):
    """Builds only what the official files hold: dicts, lists, ints, strings, numpy arrays."""

    def __init__(self, file: BinaryIO, path: Path, what: str):
        super().__init__(file, encoding="latin1")  # latin1: pickles written by Python 2
        self.path, self.what = path, what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: refused to load the global {module}.{name} ({self.what} holds "
                "only numpy arrays, lists and dicts; this one could run code)"
            ) from None


def load_numpy_pickle(path: Path, what: str) -> Any:
    """A received pickle of dicts, lists and numpy arrays (``what``: "a CIFAR-100 pickle"),
    read without running anything it names; any malformed file is one DataError line."""
    try:
        with open(path, "rb") as f:
            return _NumpyUnpickler(f, path, what).load()
    except DataError:
        raise
    except Exception as exc:  # anything else a malformed pickle raises; nothing can run
        reason = f"{type(exc).__name__}: {exc}"[:200]
        raise DataError(f"{path}: not {what} ({reason})") from None
