"""Fetching a dataset's files over HTTP(S), so that a bad download can never pass for data.

A file is written to ``<name>.part`` and renamed only after every check passed:
the server must not answer with an HTML page (the usual face of a dead link or a
quota page), the size must be the published one when it is known, and the MD5
must be the published one. A download cut short is resumed with an HTTP Range
request; a server that ignores ranges is read again from the start. A server that
sends more than the declared size is cut off and its ``.part`` deleted, so an
endless response cannot fill the disk.
"""

from __future__ import annotations

import hashlib
import http.client
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fewbench.errors import DataError

CHUNK = 1 << 16


@dataclass(frozen=True)
class Resource:
    """One published file of a dataset.

    ``into`` is where it goes inside the dataset's folder: an archive (``.zip``,
    ``.tar``, ``.tar.gz``, ``.tgz``) is unpacked there, any other file is copied there.
    ``unpacked_size`` bounds what an archive may unpack to (bytes); without it the
    bound is a multiple of the archive's size (see :mod:`fewbench.data.root`).
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


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, resource: Resource) -> None:
    """Raise :class:`DownloadError` unless ``path`` is ``resource`` (size, HTML, MD5)."""
    size = path.stat().st_size
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
    actual = md5_of(path)
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
            _receive(response, part, have, min(known) if known else None, resource, progress)
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
        raise DownloadError(
            f"{resource.filename}: {resource.url} sent more than the declared {limit:,} bytes "
            f"(not the published file); nothing was kept"
        )
