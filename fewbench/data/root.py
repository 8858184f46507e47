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

A folder given to ``data import`` is received data too. It is walked (never with
:func:`shutil.copytree`, which follows every link) and checked before the dataset's
``verify`` reads anything in it, then walked and checked again as it is copied:

- a symbolic link to a regular file inside the folder is copied as that file; a link
  that resolves outside the folder, to a folder (even inside it: following one could
  loop, ``loop -> .``), to nothing, or to a special file is refused, naming the link
  and its target;
- a named pipe, socket or device is refused, and never opened (opening a pipe waits);
- the copy is bounded: at most :data:`IMPORT_MAX_FILES` files and folders, and
  :func:`import_limit` bytes, never more than the data root has free.

Any refusal is one :class:`DataError` line; the temporary folder is removed and
nothing already installed is touched.
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
from collections.abc import Callable, Iterator
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
IMPORT_MAX_FILES = 10_000_000  # files and folders in a folder given to `data import`
IMPORT_MAX_BYTES = 1 << 40  # 1 TiB: its bytes, when the dataset's resources declare no sizes


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
    """Install from an unpacked folder, from the official files (one file or a folder of them),
    or by building it from a source it is made from (:meth:`Dataset.builds_from`)."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source} does not exist")
    _refuse_existing(dataset, root)
    remove_stale(root)
    if dataset.builds_from(source):  # a source it is made from (ILSVRC-2012's training set)
        if source.is_dir():
            _refuse_root_inside(source, root)
        return _build(dataset, root, lambda staging: dataset.build_from(source, staging))
    by_name = {r.filename: r for r in dataset.resources}
    if source.is_file() or (by_name and all((source / n).is_file() for n in by_name)):
        return _import_files(dataset, root, source, by_name)
    if not source.is_dir():
        raise DataError(f"{source} is neither a regular file nor a folder")
    _refuse_root_inside(source, root)
    limit = _byte_limit(dataset, root)
    _survey(source, limit)  # links and special files, before the dataset's verify reads them
    problems = dataset.verify(source)
    if problems:
        raise DataError(
            f"{source} is not a complete {dataset.name} folder: {problems[0]}"
            + (f"; {dataset.how_to_get}" if dataset.how_to_get else "")
        )
    return _build(dataset, root, lambda staging: _copy_folder(source, staging, limit))


# -- importing a folder: a walk that follows no folder link and opens no special file ---------
def _refuse_root_inside(source: Path, root: Path) -> None:
    """A data root inside the folder would be copied into itself (the temporary folder too)."""
    top, place = Path(os.path.realpath(source)), Path(os.path.realpath(root))
    if place == top or top in place.parents:
        raise DataError(f"{source} holds the data root {root}; give the dataset's own folder")


def import_limit(dataset: type[Dataset]) -> int:
    """The most bytes a folder imported for ``dataset`` may hold: when every resource
    declares a size, what they unpack to (declared, or the archive ratio) plus the slack,
    as for an archive; otherwise :data:`IMPORT_MAX_BYTES`."""
    sizes = [_unpacked_bound(r) for r in dataset.resources]
    if not sizes or None in sizes:
        return IMPORT_MAX_BYTES
    return sum(s for s in sizes if s is not None) + UNPACK_SLACK


def _unpacked_bound(resource: Resource) -> int | None:
    """What ``resource`` puts in the dataset's folder at most, when its plugin says."""
    if resource.unpacked_size is not None:
        return resource.unpacked_size
    if resource.size is None:
        return None
    return UNPACK_RATIO * resource.size if resource.is_archive else resource.size


def _free_bytes(root: Path) -> int | None:
    """Free bytes where ``root`` is (or will be made); None when that cannot be read."""
    place = Path(root).absolute()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        return shutil.disk_usage(place).free
    except OSError:
        return None


@dataclass(frozen=True)
class _Limit:
    """The bytes a folder import may copy, and where that bound comes from (for the error)."""

    bytes: int
    why: str


def _byte_limit(dataset: type[Dataset], root: Path) -> _Limit:
    """:func:`import_limit`, or the data root's free space when that is less: a copy that
    cannot fit is refused before it starts, not when the disk is full."""
    declared = import_limit(dataset)
    why = "fewbench's bound" if declared == IMPORT_MAX_BYTES else f"what {dataset.name} declares"
    free = _free_bytes(root)
    if free is not None and free < declared:
        return _Limit(free, f"the free space under {root}")
    return _Limit(declared, why)


class _Tally:
    """Entries and bytes seen in a walk, refused past the bounds with one line."""

    def __init__(self, source: Path, limit: _Limit) -> None:
        self.source, self.limit = source, limit
        self.entries = self.bytes = 0

    def entry(self, relative: str) -> None:
        self.entries += 1
        if self.entries > IMPORT_MAX_FILES:
            raise DataError(
                f"{self.source}: more than {IMPORT_MAX_FILES:,} files and folders (reached at "
                f"{relative!r}); refused, nothing was kept"
            )

    def add(self, size: int, relative: str) -> None:
        self.bytes += size
        if self.bytes > self.limit.bytes:
            raise DataError(
                f"{self.source}: more than {self.limit.bytes:,} bytes ({self.limit.why}; reached "
                f"at {relative!r}); refused, nothing was kept"
            )


@dataclass(frozen=True)
class _Entry:
    """One thing to copy: a folder, or a file and the path to read it from (for a link to a
    file inside the folder, the file it resolves to). Strings, not Paths: a dataset can
    hold millions of files, and each is walked twice."""

    relative: str  # "/"-separated, inside the folder
    path: str
    is_folder: bool
    size: int


def _walk(source: Path) -> Iterator[_Entry]:
    """Every folder and file under ``source`` (itself followed if a link: the user named it),
    folders before what they hold; a folder link is never followed, so the walk ends."""
    top = os.path.realpath(source)
    pending = [(top, "")]
    while pending:
        folder, prefix = pending.pop()
        for item in _listing(source, folder):
            entry = _entry(source, top, prefix + item.name, item)
            if entry.is_folder:
                pending.append((entry.path, entry.relative + "/"))
            yield entry


def _listing(source: Path, folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as items:
            return sorted(items, key=lambda item: item.name)
    except OSError as exc:
        raise DataError(f"{source}: cannot read {folder} ({_reason(exc)})") from None


def _entry(source: Path, top: str, relative: str, item: os.DirEntry) -> _Entry:
    """``item`` as an entry to copy, or a :class:`DataError` saying why it is refused."""
    try:
        info = item.stat(follow_symlinks=False)  # lstat: a pipe is looked at, never opened
    except OSError as exc:
        raise DataError(f"{source}: cannot read {relative!r} ({_reason(exc)})") from None
    if stat.S_ISDIR(info.st_mode):
        return _Entry(relative, item.path, True, 0)
    if stat.S_ISREG(info.st_mode):
        return _Entry(relative, item.path, False, info.st_size)
    if stat.S_ISLNK(info.st_mode):
        return _linked_file(source, top, relative, item.path)
    raise DataError(
        f"{source}: {relative!r} is {_kind(info.st_mode)}; only files and folders are imported"
    )


def _linked_file(source: Path, top: str, relative: str, link: str) -> _Entry:
    """The regular file inside the folder that ``link`` resolves to; any other link (out of
    the folder, to a folder, to nothing, to a special file) is refused, naming its target."""
    try:
        target = os.readlink(link)
    except OSError as exc:  # removed or replaced since it was listed
        raise DataError(f"{source}: cannot read {relative!r} ({_reason(exc)})") from None
    resolved = os.path.realpath(link)
    said = f"{source}: {relative!r} is a symbolic link to {target!r}"
    if not _inside(top, resolved):
        raise DataError(f"{said}, outside the folder; refused (copy the file into the folder)")
    try:
        info = os.lstat(resolved)
    except OSError:
        raise DataError(f"{said}, which does not exist") from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(
            f"{said}, a folder; links to folders are not followed (one can loop), copy the "
            f"folder instead"
        )
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{said}, which is {_kind(info.st_mode)}; refused")
    return _Entry(relative, resolved, False, info.st_size)


def _inside(top: str, path: str) -> bool:
    """Whether ``path`` is ``top`` or under it (both resolved; another drive is outside)."""
    try:
        return os.path.commonpath([top, path]) == top
    except ValueError:
        return False


def _kind(mode: int) -> str:
    kinds = {
        stat.S_IFIFO: "a named pipe",
        stat.S_IFSOCK: "a socket",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFLNK: "a symbolic link that does not resolve (a loop of links)",
    }
    return kinds.get(stat.S_IFMT(mode), "a special file")


def _survey(source: Path, limit: _Limit) -> None:
    """Walk ``source`` once, opening no file: refuse what cannot be imported, and a folder
    past the bounds, before anything (the dataset's verify included) reads a file."""
    tally = _Tally(source, limit)
    for entry in _walk(source):
        tally.entry(entry.relative)
        tally.add(entry.size, entry.relative)


def _copy_folder(source: Path, staging: Path, limit: _Limit) -> None:
    """Copy an unpacked folder, walking and checking it again (it may have changed since
    the survey) and counting the bytes really read against the same bounds."""
    tally = _Tally(source, limit)
    for entry in _walk(source):
        tally.entry(entry.relative)
        target = os.path.join(staging, entry.relative)
        if entry.is_folder:
            os.mkdir(target)
        else:
            _copy_file(source, entry, target, tally)


def _copy_file(source: Path, entry: _Entry, target: str, tally: _Tally) -> None:
    """Copy one regular file, keeping its modification time but no mode bits (no set-user-ID
    file lands in the data root). Opened without following a link or waiting on a pipe, and
    checked to be a regular file: what was surveyed may have been swapped since."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        with open(os.open(entry.path, flags | getattr(os, "O_BINARY", 0)), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DataError(f"{source}: {entry.relative!r} is no longer a regular file")
            with open(target, "xb") as out:
                while block := f.read(CHUNK):
                    tally.add(len(block), entry.relative)
                    out.write(block)
            os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    except OSError as exc:
        raise DataError(f"{source}: cannot copy {entry.relative!r} ({_reason(exc)})") from None


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
