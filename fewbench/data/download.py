"""Fetching a dataset's files over HTTP(S), so that a bad download can never pass for data.

A file is written to ``<name>.part`` and renamed only after every check passed:
the server must not answer with an HTML page (the usual face of a dead link or a
quota page), the size must be the published one when it is known, and the MD5
must be the published one. A download cut short is resumed with an HTTP Range
request; a server that ignores ranges is read again from the start. A server that
sends more than the declared size is cut off and its ``.part`` deleted, so an
endless response cannot fill the disk.

A file's size is checked before it is hashed: one that is not its declared size, or,
when none is declared, one larger than :data:`PLAUSIBLE_SIZE`, is refused unhashed (a
sparse file of 20 GB costs nothing to make and minutes to hash).
"""

from __future__ import annotations

import hashlib
import http.client
import stat
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fewbench.errors import DataError

CHUNK = 1 << 16
PLAUSIBLE_SIZE = 16 << 30  # bytes: the largest file believed without a declared size (16 GiB)


@dataclass(frozen=True)
class Resource:
    """One published file of a dataset.

    ``into`` is where it goes inside the dataset's folder: an archive (``.zip``,
    ``.tar``, ``.tar.gz``, ``.tgz``) is unpacked there, any other file is copied there.
    ``unpacked_size`` bounds what an archive may unpack to (bytes); without it the
    bound is a multiple of the archive's size (see :mod:`fewbench.data.root`).
    ``size`` is the file's size in bytes; a file larger than :data:`PLAUSIBLE_SIZE`
    must declare it, or it is refused before it is hashed.
    """

    url: str
    filename: str
    md5: str
    size: int | None = None
    into: str = ""
    unpacked_size: int | None = None

    @property
    def is_archive(self) -> bool:
        return self.filename.endswith((".zip", ".tar", ".tar.gz", ".tgz"))


class DownloadError(DataError):
    """A file could not be fetched or failed a check; nothing was kept."""


def size_bound(resource: Resource) -> int:
    """The most bytes ``resource``'s file may hold: its declared size, else a plausible one."""
    return resource.size if resource.size is not None else PLAUSIBLE_SIZE


def md5_of(path: Path, limit: int | None = None) -> str:
    """The MD5 of ``path``; with ``limit``, reading stops (refused) past that many bytes, so
    a file that grows while it is hashed is not read without end."""
    digest = hashlib.md5(usedforsecurity=False)
    read = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            read += len(block)
            if limit is not None and read > limit:
                raise DownloadError(f"{path.name}: grew past {limit:,} bytes while it was hashed")
            digest.update(block)
    return digest.hexdigest()


def _check_size_first(path: Path, resource: Resource) -> int:
    """``path``'s size, refusing a file that is not a regular file (a FIFO would block the
    read) or, with no declared size, one too large to be plausible: both before any read."""
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise DownloadError(f"{resource.filename}: {path} is not a regular file")
    if resource.size is None and info.st_size > PLAUSIBLE_SIZE:
        raise DownloadError(
            f"{resource.filename}: {info.st_size:,} bytes, more than the {PLAUSIBLE_SIZE:,} "
            f"believed without a declared size; refused before hashing it (not the published "
            f"file, or its plugin must declare Resource.size)"
        )
    return info.st_size


def check_file(path: Path, resource: Resource) -> None:
    """Raise :class:`DownloadError` unless ``path`` is ``resource`` (size, HTML, MD5); the
    size is checked before anything is read, so a huge (or sparse) file is never hashed."""
    size = _check_size_first(path, resource)
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise DownloadError(
            f"{resource.filename}: got an HTML page instead of the file (a dead link or an "
            f"error page at {resource.url})"
        )
    if resource.size is not None and size != resource.size:
        raise DownloadError(
            f"{resource.filename}: wrong size, {size:,} bytes instead of {resource.size:,} "
            f"(truncated or not the published file)"
        )
    actual = md5_of(path, size_bound(resource))
    if actual != resource.md5:
        raise DownloadError(
            f"{resource.filename}: MD5 {actual} does not match the published {resource.md5} "
            f"(a corrupt or different file)"
        )


def fetch(
    resource: Resource, directory: Path, *, progress: bool = True, timeout: float = 60
) -> Path:
    """Download ``resource`` into ``directory`` (resuming a ``.part``); return the checked file."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / resource.filename
    if final.is_file():
        try:
            check_file(final, resource)
            return final
        except DownloadError:
            final.unlink()
    part = directory / f"{resource.filename}.part"
    have = part.stat().st_size if part.is_file() else 0
    if resource.size is not None and have > resource.size:  # cannot be the file: start over
        part.unlink()
        have = 0
    if resource.size is None or have < resource.size:  # a complete .part needs only the checks
        _download(resource, part, have, progress=progress, timeout=timeout)
    try:
        check_file(part, resource)
    except DownloadError:
        part.unlink(missing_ok=True)  # a wrong file is never resumed or kept
        raise
    part.rename(final)
    return final


def _download(resource: Resource, part: Path, have: int, *, progress: bool, timeout: float) -> None:
    """Fetch the rest of ``resource`` into ``part`` (``have`` bytes already there)."""
    request = urllib.request.Request(resource.url, headers={"User-Agent": "fewbench"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            content_type = response.headers.get("Content-Type", "")
            if "text/html" in content_type:
                part.unlink(missing_ok=True)
                raise DownloadError(
                    f"{resource.filename}: {resource.url} answered with an HTML page "
                    f"({content_type}), not the file: the link is dead or needs a login"
                )
            if have and response.status != 206:  # the server ignored the range: start over
                have = 0
            length = getattr(response, "length", None)  # None when absent or malformed
            total = have + length if length is not None else None
            known = [n for n in (resource.size, total) if n is not None]
            limit = min(known) if known else size_bound(resource)  # never without end
            _receive(response, part, have, limit, resource, progress, total is not None)
            if total is not None and part.stat().st_size < total:
                raise DownloadError(
                    f"{resource.filename}: the connection closed after {part.stat().st_size:,} of "
                    f"{total:,} bytes; run the same command again to resume"
                )
    except urllib.error.HTTPError as exc:
        raise DownloadError(
            f"{resource.filename}: {resource.url} answered {exc.code} {exc.reason}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        kept = part.stat().st_size if part.is_file() else 0
        raise DownloadError(
            f"{resource.filename}: download from {resource.url} failed ({reason}) after "
            f"{kept:,} bytes; run the same command again to resume"
        ) from None


def _receive(
    response: http.client.HTTPResponse,
    part: Path,
    have: int,
    limit: int | None,
    resource: Resource,
    progress: bool,
    total_known: bool = True,
) -> None:
    """Append the body to ``part``, never past ``limit`` bytes in all: a server that sends
    more than it declared (an endless stream) is cut off and its ``.part`` deleted, since
    it cannot be the file and would otherwise fill the disk."""
    from tqdm import tqdm  # here: every dataset plugin imports this module, few download

    written = have
    with (
        open(part, "ab" if have else "wb") as out,
        tqdm(
            total=limit, initial=have, unit="B", unit_scale=True, file=sys.stderr,
            desc=resource.filename, disable=not progress, leave=False,
        ) as bar,
    ):  # fmt: skip
        while block := response.read(CHUNK if limit is None else min(CHUNK, limit - written + 1)):
            written += len(block)
            if limit is not None and written > limit:
                break
            out.write(block)
            bar.update(len(block))
    if limit is not None and written > limit:
        part.unlink(missing_ok=True)
        declared = "the declared" if resource.size is not None or total_known else "a plausible"
        raise DownloadError(
            f"{resource.filename}: {resource.url} sent more than {declared} {limit:,} bytes "
            f"(not the published file); nothing was kept"
        )
