"""The data root: what is installed, downloading, importing, all or nothing.

A dataset is installed by building it in a temporary folder beside its final
place (``<root>/.incoming-<name>-*``), verifying it there, and renaming it into
place in one step: an interrupted or failed download or import never leaves a
half dataset that later looks present. Downloaded archives are kept in
``<root>/.downloads/<name>/`` (checked by MD5), so a second attempt resumes
instead of starting over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fewbench.data import Dataset
from fewbench.download import DownloadError, Resource, check_file, fetch
from fewbench.errors import DataError


@dataclass(frozen=True)
class DataStatus:
    name: str
    state: str  # missing | present | verified | generated
    path: Path | None
    bytes: int
    problems: tuple[str, ...] = ()
    downloadable: bool = False


def folder_size(path: Path) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while we count
                total += os.lstat(os.path.join(base, name)).st_size
    return total


def status(dataset: type[Dataset], root: Path, *, verify: bool = True) -> DataStatus:
    if not dataset.needs_files:
        return DataStatus(dataset.name, "generated", None, 0)
    folder = Path(root) / dataset.folder_name()
    downloadable = bool(dataset.resources)
    if not folder.is_dir():
        return DataStatus(dataset.name, "missing", folder, 0, downloadable=downloadable)
    problems = tuple(dataset.verify(folder)) if verify else ()
    state = "present" if problems or not verify else "verified"
    return DataStatus(dataset.name, state, folder, folder_size(folder), problems, downloadable)


def _unpack(archive: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise DataError(f"{archive.name}: unsafe path {member!r} in the archive")
            z.extractall(into)
        return
    with tarfile.open(archive) as t:
        t.extractall(into, filter="data")


def _place(resource: Resource, file: Path, staging: Path) -> None:
    target = staging / resource.into
    if resource.is_archive:
        try:
            _unpack(file, target)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise DataError(f"{resource.filename}: cannot be unpacked ({exc})") from None
    else:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target / resource.filename)


def _refuse_existing(dataset: type[Dataset], root: Path) -> Path:
    """The dataset's final folder, which must not exist yet (checked before any work)."""
    final = Path(root) / dataset.folder_name()
    if final.exists():
        raise DataError(f"{final} already exists; remove it first to install {dataset.name} again")
    return final


def _build(dataset: type[Dataset], root: Path, fill: Callable[[Path], None]) -> Path:
    """``fill`` a temporary folder beside the final one, verify it, rename it into place."""
    final = _refuse_existing(dataset, root)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".incoming-{dataset.name}-", dir=final.parent))
    try:
        fill(staging)
        problems = dataset.verify(staging)
        if problems:
            raise DataError(f"{dataset.name}: the installed files are incomplete: {problems[0]}")
        _refuse_existing(dataset, root)  # another process may have installed it meanwhile
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def install(dataset: type[Dataset], root: Path, files: dict[str, Path]) -> Path:
    """Build the dataset folder from checked ``files`` (resource file name -> path)."""

    def place_all(staging: Path) -> None:
        for resource in dataset.resources:
            _place(resource, files[resource.filename], staging)

    return _build(dataset, root, place_all)


def download(dataset: type[Dataset], root: Path, *, progress: bool = True) -> Path:
    """Fetch, check and install every resource of ``dataset``."""
    if not dataset.resources:
        raise DataError(
            f"{dataset.name} cannot be downloaded: {dataset.how_to_get or 'no download is declared'}"
        )
    _refuse_existing(dataset, root)  # before fetching gigabytes for nothing
    cache = Path(root) / ".downloads" / dataset.name
    files = {r.filename: fetch(r, cache, progress=progress) for r in dataset.resources}
    final = install(dataset, root, files)
    shutil.rmtree(cache, ignore_errors=True)
    return final


def import_path(dataset: type[Dataset], root: Path, source: Path) -> Path:
    """Install from an unpacked folder, or from the official files (one file or a folder of them)."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source} does not exist")
    _refuse_existing(dataset, root)
    by_name = {r.filename: r for r in dataset.resources}
    if source.is_file() or (by_name and all((source / n).is_file() for n in by_name)):
        return _import_files(dataset, root, source, by_name)
    problems = dataset.verify(source)
    if problems:
        raise DataError(
            f"{source} is not a complete {dataset.name} folder: {problems[0]}"
            + (f"; {dataset.how_to_get}" if dataset.how_to_get else "")
        )
    return _build(
        dataset, root, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True)
    )


def _import_files(
    dataset: type[Dataset], root: Path, source: Path, by_name: dict[str, Resource]
) -> Path:
    candidates = [source] if source.is_file() else [source / n for n in by_name]
    files = {}
    for path in candidates:
        resource = by_name.get(path.name)
        if resource is None:
            raise DataError(
                f"{path.name} is not one of {dataset.name}'s files ({', '.join(by_name)})"
            )
        try:
            check_file(path, resource)
        except DownloadError as exc:
            raise DataError(f"{path}: {exc}") from None
        files[path.name] = path
    missing = [n for n in by_name if n not in files]
    if missing:
        raise DataError(
            f"{dataset.name} needs {', '.join(by_name)}; {source} lacks {', '.join(missing)} "
            f"(give a folder holding all of them)"
        )
    return install(dataset, root, files)
