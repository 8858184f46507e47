"""The data root: what is installed, downloading, importing, all or nothing.

A dataset is installed by building it in a temporary folder beside its final
place (``<root>/.incoming-<name>-*``), verifying it there, and renaming it into
place in one step: an interrupted or failed download or import never leaves a
half dataset that later looks present. Downloaded archives are kept in
``<root>/.downloads/<name>/`` (checked by MD5), so a second attempt resumes
instead of starting over.

Received files are input, not trusted: an archive is unpacked within a bound on
the bytes it may write (a zip or tar bomb is refused before it fills the disk),
without symbolic links or paths outside its folder, and any failure is one
:class:`DataError` line naming the archive and the member. The temporary folder
is named after the process that made it (``.incoming-<name>-<pid>@<host>-*``), so
one left by a killed import is recognised and removed by the next import or
download, and ``fewbench data list`` shows any that are there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fewbench.data.download import DownloadError, Resource, check_file, fetch
from fewbench.errors import DataError

if TYPE_CHECKING:  # annotations only: `data list` reads statuses without torch
    from fewbench.plugin.dataset import Dataset

UNPACK_RATIO = 50  # bound on unpacked bytes per archive byte, unless a Resource declares it
UNPACK_SLACK = 64 << 20  # plus this, so that small archives of very compressible data pass
CHUNK = 1 << 20


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


def unpack_limit(archive: Path, resource: Resource | None = None) -> int:
    """The most bytes ``archive`` may unpack to: declared by the resource, else a ratio
    of its size (generous for real data, far below what a bomb expands to)."""
    if resource is not None and resource.unpacked_size is not None:
        return resource.unpacked_size
    return UNPACK_RATIO * archive.stat().st_size + UNPACK_SLACK


def _too_big(archive: Path, limit: int, what: str, member: str | None = None) -> DataError:
    where = f" (reached at {member!r})" if member else ""
    return DataError(
        f"{archive.name}: {what} more than the allowed {limit:,} bytes unpacked{where}; refused "
        f"as a possible archive bomb, nothing was kept"
    )


def _unpack(archive: Path, into: Path, limit: int | None = None) -> None:
    """Unpack ``archive`` into ``into``, writing at most ``limit`` bytes (default: the ratio)."""
    into.mkdir(parents=True, exist_ok=True)
    limit = unpack_limit(archive) if limit is None else limit
    if archive.name.endswith(".zip"):
        _unzip(archive, into, limit)
    else:
        _untar(archive, into, limit)


def _check_zip_member(archive: Path, info: zipfile.ZipInfo) -> None:
    """Refuse paths outside the folder and symbolic links (a later member would be written
    through the link, and zipfile would write the link itself as a file)."""
    name = info.filename
    if name.startswith("/") or ".." in Path(name).parts:
        raise DataError(f"{archive.name}: unsafe path {name!r} in the archive")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"{archive.name}: {name!r} is a symbolic link; archives must hold files")


def _unzip(archive: Path, into: Path, limit: int) -> None:
    """Check every member and the declared total first, then count what is really written
    (a member's declared size can lie)."""
    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        for info in members:
            _check_zip_member(archive, info)
        declared = sum(info.file_size for info in members)
        if declared > limit:
            raise _too_big(archive, limit, f"declares {declared:,} bytes,")
        written = 0
        for info in members:
            written = _unzip_member(z, info, archive, into, limit, written)


def _unzip_member(
    z: zipfile.ZipFile, info: zipfile.ZipInfo, archive: Path, into: Path, limit: int, written: int
) -> int:
    """Write one member, stopping as soon as the archive's total passes ``limit``."""
    target = into / info.filename
    try:
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            return written
        target.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as source, open(target, "wb") as out:
            while block := source.read(CHUNK):
                written += len(block)
                if written > limit:
                    raise _too_big(archive, limit, "writes", info.filename)
                out.write(block)
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zlib.error,
            zipfile.BadZipFile) as exc:  # fmt: skip
        raise DataError(
            f"{archive.name}: cannot unpack {info.filename!r} ({_reason(exc)})"
        ) from None
    return written


def _reason(exc: Exception) -> str:
    """Why a member could not be written, without the temporary folder's path."""
    if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError)):
        return f"{exc.strerror}: the archive holds a file and a folder of the same name"
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _untar(archive: Path, into: Path, limit: int) -> None:
    """Sum the members' sizes (a tar member holds exactly its declared size) before writing,
    stopping at the first header past the bound; extract with the ``data`` filter (no
    links out of the folder, no devices); count copies made for hard links as well."""
    with tarfile.open(archive) as t:
        members, declared = [], 0
        for member in t:
            declared += member.size if member.isreg() else 0
            if declared > limit:
                raise _too_big(archive, limit, "declares", member.name)
            members.append(member)
        written = 0
        for member in members:
            try:
                t.extract(member, into, filter="data")
                written += _written_size(into, member)
            except OSError as exc:
                raise DataError(
                    f"{archive.name}: cannot unpack {member.name!r} ({_reason(exc)})"
                ) from None
            if written > limit:
                raise _too_big(archive, limit, "writes", member.name)


def _written_size(into: Path, member: tarfile.TarInfo) -> int:
    """Bytes a tar member put on disk: a regular file's, or a hard link's made as a copy."""
    if not (member.isreg() or member.islnk()):
        return 0
    with contextlib.suppress(OSError):  # renamed or refused by the filter: nothing written
        info = os.lstat(into / member.name.lstrip("/"))
        if stat.S_ISREG(info.st_mode) and (member.isreg() or info.st_nlink == 1):
            return info.st_size
    return 0


def _place(resource: Resource, file: Path, staging: Path) -> None:
    target = staging / resource.into
    if resource.is_archive:
        try:
            _unpack(file, target, unpack_limit(file, resource))
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
            raise DataError(f"{resource.filename}: cannot be unpacked ({exc})") from None
    else:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target / resource.filename)


# -- temporary folders, and those left by a killed process ------------------------------------
_INCOMING = re.compile(r"\.incoming-(?P<name>.+)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9.-]*)-\w+")


@dataclass(frozen=True)
class Incoming:
    """A temporary ``.incoming-*`` folder: an install in progress, or one left by a kill."""

    path: Path
    pid: int | None  # None: made by an older fewbench or another tool
    host: str | None
    stale: bool  # its process is gone (on this host): safe to remove

    def describe(self) -> str:
        if self.stale:
            return (
                f"left by process {self.pid}, which is gone; the next data import or download "
                f"removes it"
            )
        if self.pid is None:
            return "of unknown origin; remove it by hand if no install is running"
        if self.host != _host():
            return f"made on {self.host}; remove it by hand if no install is running there"
        return f"an install in progress (process {self.pid})"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:64]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's counts as alive)."""
    if os.name == "nt":
        return True  # os.kill(pid, 0) would send Ctrl-C there: never call a folder stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def incoming(root: Path) -> list[Incoming]:
    """The ``.incoming-*`` folders under ``root``; those of dead processes here are stale."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob(".incoming-*")):
        if not path.is_dir() or path.is_symlink():
            continue
        match = _INCOMING.fullmatch(path.name)
        if match is None:
            found.append(Incoming(path, None, None, False))
            continue
        pid, host = int(match["pid"]), match["host"]
        found.append(Incoming(path, pid, host, host == _host() and not _alive(pid)))
    return found


def remove_stale(root: Path) -> list[Path]:
    """Remove the temporary folders of installs killed on this host; return them."""
    removed = [item.path for item in incoming(root) if item.stale]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _umask() -> int:
    """The process umask; there is no getter, so set a strict one for the instant it is read."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


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
    prefix = f".incoming-{dataset.name}-{os.getpid()}@{_host()}-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        fill(staging)
        problems = dataset.verify(staging)
        if problems:
            raise DataError(f"{dataset.name}: the installed files are incomplete: {problems[0]}")
        _refuse_existing(dataset, root)  # another process may have installed it meanwhile
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the data from the group
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
    remove_stale(root)
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
    remove_stale(root)
    by_name = {r.filename: r for r in dataset.resources}
    if source.is_file() or (by_name and all((source / n).is_file() for n in by_name)):
        return _import_files(dataset, root, source, by_name)
    problems = dataset.verify(source)
    if problems:
        raise DataError(
            f"{source} is not a complete {dataset.name} folder: {problems[0]}"
            + (f"; {dataset.how_to_get}" if dataset.how_to_get else "")
        )
    return _build(dataset, root, lambda staging: _copy_folder(source, staging))


def _copy_folder(source: Path, staging: Path) -> None:
    """Copy an unpacked folder; a file that cannot be read is one line, not a traceback."""
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
    except shutil.Error as exc:
        first = exc.args[0][0] if exc.args and exc.args[0] else ("?", "?", str(exc))
        raise DataError(f"{source}: cannot copy {first[0]} ({first[2]})") from None
    except OSError as exc:
        raise DataError(f"{source}: cannot copy ({exc})") from None


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
