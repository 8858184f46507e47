"""Tensor cache files: written atomically, checked on read, rebuilt when unusable.

A decoded cache must come from the very files it is read for. Keying it by image
names and size alone let a warm cache stand in for any folder of the same names: a
data root of empty PNGs "trained" on the real images cached from another root. So a
dataset passes ``sources`` (its data folder and every file it decodes) and the cache
also records :func:`source_key` of them; a different root, a file added, removed,
replaced, emptied or truncated, or different sampled bytes make the cache stale, and
the dataset rebuilds it from (and so reports errors in) the files actually there.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewbench.errors import DataError
from fewbench.storage.atomic import write_atomically, write_json_atomically

FORMAT = 1
SAMPLE_FILES = 64  # files whose first bytes enter the source key, evenly spaced
SAMPLE_BYTES = 4096

# A dataset's sources: its data folder and the files (under it) a cache is decoded from.
Sources = tuple[str | os.PathLike[str], Sequence[str | os.PathLike[str]]]


def source_key(root: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]]) -> str:
    """A sha256 (hex) identifying ``files`` under the data folder ``root`` by location and content.

    It covers ``root``'s resolved absolute path, every file's name relative to ``root``
    (in the given order, which is the cache's order), its size and its modification time
    in nanoseconds, and the first :data:`SAMPLE_BYTES` of up to :data:`SAMPLE_FILES`
    evenly spaced files. Sizes and times catch a replaced, emptied or truncated file (an
    ``os.stat`` each: about 0.1 s for Omniglot's 32,460 files on a local disk, warm; reading
    every byte would take far longer than a cached start should); the sampled bytes catch
    a copy whose times were preserved or reset but whose content differs; the root makes
    another data root a different source even when its files look alike. A file missing
    or unreadable is a :class:`DataError` naming it.
    """
    base = os.fspath(root)
    prefix = os.path.join(base, "")
    digest = hashlib.sha256()
    digest.update(os.path.realpath(base).encode("utf-8", "surrogateescape") + b"\0")
    names = [os.fspath(f) for f in files]
    for name in names:
        try:
            stat = os.stat(name)
        except OSError as exc:
            raise DataError(f"{name} cannot be read ({exc.strerror or exc})") from None
        relative = name[len(prefix) :] if name.startswith(prefix) else name
        digest.update(
            f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(errors="surrogateescape")
        )
    count = min(SAMPLE_FILES, len(names))
    for i in range(count):
        name = names[i * len(names) // count]
        try:
            with open(name, "rb") as f:
                head = f.read(SAMPLE_BYTES)
        except OSError as exc:
            raise DataError(f"{name} cannot be read ({exc.strerror or exc})") from None
        digest.update(len(head).to_bytes(4, "little") + head)
    return digest.hexdigest()


# Per cache file, the sources and key its last load computed, for the save that follows a
# miss: the key saved is then the one taken before decoding, so a file changed while it
# was decoded leaves a cache that is stale for the next run instead of one matching it.
_KEYS_AT_LOAD: dict[str, tuple[tuple[str, tuple[str, ...]], str]] = {}


def _identity(sources: Sources) -> tuple[str, tuple[str, ...]]:
    root, files = sources
    return os.fspath(root), tuple(os.fspath(f) for f in files)


def _key_at_load(path: Path, sources: Sources) -> str:
    key = source_key(*sources)
    _KEYS_AT_LOAD[os.fspath(path)] = (_identity(sources), key)
    return key


def _key_at_save(path: Path, sources: Sources) -> str:
    known = _KEYS_AT_LOAD.pop(os.fspath(path), None)
    if known is not None and known[0] == _identity(sources):
        return known[1]
    return source_key(*sources)


def save_atomically(payload: Any, path: Path, *, fault_point: str | None = None) -> None:
    """``torch.save`` atomically: a crash leaves the previous file intact."""
    write_atomically(path, lambda f: torch.save(payload, f), fault_point=fault_point)


def save_tensor_cache(
    path: Path, payload: dict[str, Any], *, sources: Sources | None = None
) -> None:
    """Write ``payload`` (plus, with ``sources``, their :func:`source_key` as ``source``:
    the key the preceding load of ``path`` computed for the same sources, before
    anything was decoded, else one computed now)."""
    if sources is not None:
        payload = {**payload, "source": _key_at_save(path, sources)}
    save_atomically({"format": FORMAT, **payload}, path)


def load_tensor_cache(
    path: Path, expect: dict[str, Any], *, sources: Sources | None = None
) -> dict[str, Any] | None:
    """The cached payload, or ``None`` when missing, unreadable, truncated or stale.

    Stale: a value of ``expect`` differs, or (with ``sources``) the cache was not built
    from those files as they are now (see :func:`source_key`)."""
    if sources is not None:  # first: a miss leaves the key for the save that follows
        expect = {**expect, "source": _key_at_load(path, sources)}
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception:
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return None
    if any(payload.get(key) != value for key, value in expect.items()):
        return None
    _KEYS_AT_LOAD.pop(os.fspath(path), None)  # a hit: no save follows
    return payload


def save_array_cache(
    path: Path, array: np.ndarray, meta: dict[str, Any], *, sources: Sources | None = None
) -> None:
    """Write ``array`` as ``.npy`` plus a ``.json`` of ``meta``, each atomically, JSON last.

    With ``sources``, ``meta`` also records their :func:`source_key` as ``source`` (as
    :func:`save_tensor_cache` does)."""
    if sources is not None:
        meta = {**meta, "source": _key_at_save(path, sources)}
    write_atomically(path, lambda f: np.save(f, array))
    write_json_atomically(path.with_suffix(".json"), {**meta, "shape": list(array.shape)})


def load_array_cache(
    path: Path, expect: dict[str, Any], *, sources: Sources | None = None
) -> tuple[np.ndarray, dict] | None:
    """A memory-mapped cached array (nothing read until used) and its meta, or None if stale.

    Stale as for :func:`load_tensor_cache`: ``expect`` or (with ``sources``) the files'
    :func:`source_key` differs from what the cache recorded."""
    if sources is not None:  # first: a miss leaves the key for the save that follows
        expect = {**expect, "source": _key_at_load(path, sources)}
    info = path.with_suffix(".json")
    if not path.is_file() or not info.is_file():
        return None
    try:
        meta = json.loads(info.read_text())
        array = np.load(path, mmap_mode="c")  # copy-on-write: writable view, file untouched
    except (OSError, ValueError):
        return None
    if list(array.shape) != meta.get("shape") or any(meta.get(k) != v for k, v in expect.items()):
        return None
    _KEYS_AT_LOAD.pop(os.fspath(path), None)  # a hit: no save follows
    return array, meta
