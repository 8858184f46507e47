"""A cached listing of the installed plugins: ``fewbench plugins`` and ``fewbench data list``
without importing them.

Plugin modules import torch at the top (their backbones are ``nn.Module`` classes), so
loading the :class:`~fewbench.registry.Registry` takes a second or more before anything is
printed. The index keeps what those two commands show, for every kind and name: the
description, the provider and its version, the module and class, the parameters as
``fewbench plugins`` prints them, and for datasets what ``data list`` reads from the class
(folder, whether it needs files, whether it can be downloaded, how to get it). It is a JSON
file in the user cache folder (``$FEWBENCH_CACHE/plugins/``, one per Python environment),
keyed by a fingerprint computed without importing any plugin:

* every ``fewbench`` entry point (name, module, distribution and its version);
* for each entry point's module, the size and modification time of every ``.py`` file of
  its top-level package, found where Python would import it from
  (:func:`importlib.util.find_spec` of the top-level name, which follows editable
  installs): editing a plugin's source makes a new index;
* the same for fewbench's own package (the base classes and parameter rendering);
* the names of every installed distribution (``*.dist-info``, ``*.egg-info`` on
  ``sys.path``; a name holds the version), so installing, removing or upgrading any
  package, an optional dependency included, makes a new index; and the Python version.

The document carries a digest of its own body (:func:`body_digest`); when that digest and
the fingerprint match and every class the index lists is defined where it says (a
``class Name`` in a module whose source the fingerprint covers), the index is the answer; otherwise the registry is loaded as
before, the answer comes from it, and the index is written again (atomically; a write that
fails is ignored, the command never fails for it). A plugin whose registration depends on
something else (a file outside its package, an environment variable) can be listed afresh
with ``--refresh``, and ``FEWBENCH_NO_PLUGIN_INDEX=1`` turns the index off.

``data list`` also runs each installed dataset's ``verify``, which is the plugin's code. Its
result is kept beside the index, keyed by the index's fingerprint and by the folder's
contents as one walk of it sees them (every path, type, size, modification time and mode;
the same walk gives the size that is printed): a folder that has not changed since it was
verified is not verified again. A folder holding a symbolic link (whose target the walk
does not follow) is verified every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fewbench.data.root import DataStatus
    from fewbench.registry import Registry

FORMAT = 2  # 2: the body carries its digest
GROUP = "fewbench"  # the entry-point group (fewbench.plugin.hookspecs.PROJECT_NAME)
DISABLE_ENV = "FEWBENCH_NO_PLUGIN_INDEX"
MAX_VERIFIED = 256  # verified folders remembered


@dataclass(frozen=True)
class ParamInfo:
    """One declared parameter, as ``fewbench plugins`` shows it."""

    name: str
    shown: str  # Param.describe(): the default, and the choices
    help: str


@dataclass(frozen=True)
class DatasetInfo:
    """What ``fewbench data list`` reads from a dataset class."""

    needs_files: bool
    folder: str  # folder_name(), under the data root
    downloadable: bool  # it declares resources
    how_to_get: str


@dataclass(frozen=True)
class PluginInfo:
    """One registered class, as the index keeps it."""

    kind: str
    name: str
    description: str
    provider: str
    provider_version: str | None
    module: str
    qualname: str
    params: tuple[ParamInfo, ...]
    dataset: DatasetInfo | None = None  # datasets only; None when the class could not say


@dataclass(frozen=True)
class PluginIndex:
    """What the registry holds, kind by kind (``kinds`` in the registry's order)."""

    fingerprint: str | None
    kinds: tuple[str, ...]
    plugins: dict[str, tuple[PluginInfo, ...]]  # kind -> its classes, sorted by name

    def items(self, kind: str) -> tuple[PluginInfo, ...]:
        return self.plugins.get(kind, ())


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


# -- the fingerprint ---------------------------------------------------------------------------


def _py_files(folder: str) -> list[str]:
    found = []
    for base, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        found.extend(os.path.join(base, name) for name in sorted(files) if name.endswith(".py"))
    return found


def _top_level(name: str) -> tuple[bool, list[str]] | None:
    """Where Python would import the top-level module ``name`` from, without importing it
    (:func:`importlib.util.find_spec` follows editable installs): ``(False, files)``, the
    ``.py`` files of a module or a package, or ``(True, folders)`` for a namespace package
    (spread over distributions); None when it is not in files."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders:  # a one-file module
        return (False, [spec.origin]) if spec.origin and os.path.isfile(spec.origin) else None
    if spec.origin in (None, "namespace"):
        return True, folders
    return False, [file for folder in folders for file in _py_files(folder)]


def _module_files(module: str, known: dict[str, tuple[bool, list[str]] | None]) -> list[str] | None:
    """The ``.py`` files of ``module``'s top-level package (of its portion of a namespace
    package), or None when they cannot be found; ``known`` keeps what was found, by name."""
    parts = module.split(".")
    if parts[0] not in known:
        known[parts[0]] = _top_level(parts[0])
    found = known[parts[0]]
    if found is None or not found[0]:
        return None if found is None else found[1]
    if len(parts) == 1:
        return None
    portion = ".".join(parts[:2])
    if portion not in known:
        files = []
        for folder in found[1]:
            below = os.path.join(folder, parts[1])
            if os.path.isdir(below):
                files.extend(_py_files(below))
            elif os.path.isfile(below + ".py"):
                files.append(below + ".py")
        known[portion] = (False, files) if files else None
    return None if known[portion] is None else known[portion][1]


def _entry_points() -> list[tuple[str, str, str]]:
    """(name, module, distribution) of every entry point of the group, found the way pluggy
    finds them (every distribution on ``sys.path``, in order). The distribution is its
    ``name-version.dist-info`` folder: reading its metadata would cost more than the rest."""
    from importlib.metadata import distributions

    found = []
    for dist in distributions():
        for entry in dist.entry_points:
            if entry.group == GROUP:
                where = getattr(dist, "_path", None)  # PathDistribution's folder
                if where is None:
                    meta = dist.metadata
                    where = f"{meta['Name']} {meta['Version']}"
                found.append((entry.name, entry.value, str(where)))
    return found


def _installed() -> list[str]:
    """The distribution folders on ``sys.path`` (``name-version.dist-info``)."""
    names = []
    for entry in sys.path:
        with contextlib.suppress(OSError), os.scandir(entry or ".") as listing:
            names.extend(
                sorted(
                    item.name for item in listing if item.name.endswith((".dist-info", ".egg-info"))
                )
            )
    return names


def source_files(entry_points: list | None = None) -> list[str] | None:
    """Every source file the fingerprint covers (fewbench's own and each entry point's
    package), or None when an entry point's module is not in files Python can find."""
    import fewbench

    files = _py_files(os.path.dirname(os.path.abspath(fewbench.__file__)))
    known: dict[str, tuple[bool, list[str]] | None] = {}
    for _, value, _ in _entry_points() if entry_points is None else entry_points:
        found = _module_files(value.split(":")[0].strip(), known)
        if found is None:
            return None
        files.extend(found)
    return sorted(set(files))


def fingerprint() -> str | None:
    """A digest of what decides the registry's contents (see the module's documentation),
    or None when some of it cannot be known without importing the plugins."""
    entry_points = _entry_points()
    files = source_files(entry_points)
    if files is None:
        return None
    digest = hashlib.sha256()
    header = {
        "format": FORMAT,
        "python": sys.version,
        "entry_points": entry_points,
        "installed": _installed(),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for path in files:
        try:
            info = os.stat(path)
        except OSError:
            digest.update(f"\n{path}\0missing".encode())
            continue
        digest.update(f"\n{path}\0{info.st_size}\0{info.st_mtime_ns}".encode())
    return digest.hexdigest()


# -- the files ---------------------------------------------------------------------------------


def index_folder() -> Path:
    from fewbench.storage.paths import default_cache_dir

    return default_cache_dir() / "plugins"


def _environment_key() -> str:
    """One index per Python environment (a virtual environment, a version)."""
    where = f"{sys.prefix}|{sys.version_info[0]}.{sys.version_info[1]}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def index_path() -> Path:
    return index_folder() / f"index-{_environment_key()}.json"


def verified_path() -> Path:
    return index_folder() / f"verified-{_environment_key()}.json"


MAX_INDEX_BYTES = 16 * 2**20  # an index of thousands of plugins is well under 1 MB


def _read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing, unreadable, not JSON, or not a regular
    file of a plausible size (a FIFO there would block forever, a link to /dev/zero fill
    memory, a 200,000-deep document exhaust the recursion limit): the index is then rebuilt."""
    try:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
        descriptor = os.open(path, flags)
    except OSError:
        return None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_INDEX_BYTES:
            return None
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(MAX_INDEX_BYTES + 1)
        if len(data) > MAX_INDEX_BYTES:
            return None
        return json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(descriptor)


def _write_json(path: Path, payload: Any) -> bool:
    """Write atomically; a failure (unwritable cache, full disk) is ignored: the index only
    saves time."""
    try:
        from fewbench.storage.atomic import write_json_atomically

        write_json_atomically(path, payload, indent=1, sort_keys=True)
    except Exception:  # noqa: BLE001 - never fail a command for its cache
        return False
    return True


# -- the index from the registry, and back -----------------------------------------------------


def _dataset_info(cls: type) -> DatasetInfo | None:
    try:
        return DatasetInfo(
            needs_files=bool(cls.needs_files),
            folder=str(cls.folder_name()) if cls.needs_files else "",
            downloadable=bool(cls.resources) if cls.needs_files else False,
            how_to_get=str(cls.how_to_get or ""),
        )
    except Exception:  # noqa: BLE001 - data list will ask the class itself, and say
        return None


def from_registry(registry: Registry, fingerprint: str | None = None) -> PluginIndex:
    """The index of what ``registry`` holds."""
    from fewbench.registry import KINDS

    versions = {
        dist.project_name: dist.version for _, dist in registry.manager.list_plugin_distinfo()
    }
    plugins = {}
    for kind in KINDS:
        plugins[kind] = tuple(
            PluginInfo(
                kind=kind,
                name=item.name,
                description=str(item.description),
                provider=str(item.provider),
                provider_version=versions.get(item.provider),
                module=getattr(item.cls, "__module__", ""),
                qualname=getattr(item.cls, "__qualname__", ""),
                params=tuple(
                    ParamInfo(name, param.describe(), str(param.help))
                    for name, param in item.params.params.items()
                ),
                dataset=_dataset_info(item.cls) if kind == "dataset" else None,
            )
            for item in registry.items(kind)
        )
    return PluginIndex(fingerprint, tuple(KINDS), plugins)


def to_json(index: PluginIndex) -> dict[str, Any]:
    def plugin(info: PluginInfo) -> dict[str, Any]:
        record = {
            "name": info.name,
            "description": info.description,
            "provider": info.provider,
            "provider_version": info.provider_version,
            "module": info.module,
            "qualname": info.qualname,
            "params": [[p.name, p.shown, p.help] for p in info.params],
        }
        if info.kind == "dataset":
            data = info.dataset
            record["data"] = None if data is None else asdict(data)
        return record

    body = {
        "format": FORMAT,
        "fingerprint": index.fingerprint,
        "kinds": list(index.kinds),
        "plugins": {kind: [plugin(i) for i in index.items(kind)] for kind in index.kinds},
    }
    return {**body, "digest": body_digest(body)}


def body_digest(payload: dict[str, Any]) -> str:
    """A digest of everything in the document but the digest itself. It binds the listing
    to the fingerprint it was made for: an index whose descriptions, parameters or names were
    edited (by hand, a bad disk, a tool gone wrong) no longer matches and is rebuilt. It is
    no defence against someone who can write the user's cache and recompute it, who could
    as well edit the plugins' sources."""
    body = {key: value for key, value in payload.items() if key != "digest"}
    text = json.dumps(body, sort_keys=True, ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def from_json(payload: Any) -> PluginIndex | None:
    """The index a JSON document holds, or None when it is not one (of this format)."""
    try:
        if payload.get("format") != FORMAT or payload.get("digest") != body_digest(payload):
            return None
        kinds = tuple(str(kind) for kind in payload["kinds"])
        plugins = {}
        for kind in kinds:
            infos = []
            for record in payload["plugins"][kind]:
                data = record.get("data")
                infos.append(
                    PluginInfo(
                        kind=kind,
                        name=_text(record["name"]),
                        description=_text(record["description"]),
                        provider=_text(record["provider"]),
                        provider_version=_text_or_none(record["provider_version"]),
                        module=_text(record["module"]),
                        qualname=_text(record["qualname"]),
                        params=tuple(
                            ParamInfo(_text(n), _text(s), _text(h)) for n, s, h in record["params"]
                        ),
                        dataset=None
                        if data is None
                        else DatasetInfo(
                            needs_files=bool(data["needs_files"]),
                            folder=_text(data["folder"]),
                            downloadable=bool(data["downloadable"]),
                            how_to_get=_text(data["how_to_get"]),
                        ),
                    )
                )
            plugins[kind] = tuple(infos)
        return PluginIndex(payload["fingerprint"], kinds, plugins)
    except (AttributeError, KeyError, TypeError, ValueError, RecursionError):
        return None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r:.40}")
    if any(not c.isprintable() and c not in "\n\t" for c in value):  # terminal escapes
        raise ValueError("control characters in an index entry")
    return value


def _text_or_none(value: Any) -> str | None:
    return None if value is None else _text(value)


def _module_source(module: str, files: list[str]) -> str | None:
    """The text of ``module``'s file among the fingerprinted ``files``, or None."""
    tail = module.replace(".", os.sep)
    for path in files:
        if path.endswith((f"{os.sep}{tail}.py", f"{os.sep}{tail}{os.sep}__init__.py")):
            try:
                with open(path, encoding="utf-8") as handle:
                    return handle.read(4 * MAX_INDEX_BYTES)
            except (OSError, ValueError):
                return None
    return None


def _defined_where_it_says(index: PluginIndex, files: list[str] | None) -> bool:
    """Whether every listed class is defined (``class Name``) in a module whose source the
    fingerprint covers, and the kinds are the registry's: a tampered index listing a learner
    that does not exist is rebuilt, not printed. A class made at run time fails the test and
    is listed afresh each time, which costs time, never a wrong listing."""
    from fewbench.registry import KINDS

    if files is None or index.kinds != tuple(KINDS) or set(index.plugins) - set(KINDS):
        return False
    sources: dict[str, str | None] = {}
    for infos in index.plugins.values():
        for info in infos:
            if info.module not in sources:
                sources[info.module] = _module_source(info.module, files)
            text = sources[info.module]
            name = info.qualname.rsplit(".", 1)[-1]
            if text is None or not re.search(rf"^\s*class {re.escape(name)}\b", text, re.M):
                return False
    return True


def cached(fingerprint: str | None) -> PluginIndex | None:
    """The stored index when it was made for ``fingerprint`` and lists only classes that are
    where it says; None otherwise."""
    if fingerprint is None:
        return None
    index = from_json(_read_json(index_path()))
    if index is None or index.fingerprint != fingerprint:
        return None
    return index if _defined_where_it_says(index, source_files()) else None


def save(index: PluginIndex) -> bool:
    """Store the index (nothing without a fingerprint); False when it could not be written."""
    if index.fingerprint is None:
        return False
    return _write_json(index_path(), to_json(index))


def _load_registry() -> tuple[Registry, str | None]:
    """The registry, loaded now, and the fingerprint taken just before (a file changed while
    loading makes the next fingerprint differ, never a stale index match)."""
    from fewbench.registry import Registry

    stamp = fingerprint() if enabled() else None
    return Registry(), stamp


def current(registry: Registry | None = None, *, refresh: bool = False) -> PluginIndex:
    """What the registry holds: from the stored index when its fingerprint is current (no
    plugin is imported), else from ``registry`` or a registry loaded now, stored for next time.
    ``refresh`` ignores the stored index."""
    if registry is not None:
        return from_registry(registry)
    if enabled() and not refresh:
        index = cached(fingerprint())
        if index is not None:
            return index
    registry, stamp = _load_registry()
    index = from_registry(registry, stamp)
    save(index)
    return index


# -- data list ---------------------------------------------------------------------------------


def scan_folder(folder: Path) -> tuple[int, str | None]:
    """The bytes of the files under ``folder`` (as :func:`fewbench.data.root.folder_size`
    counts them) and a digest of the tree (every path, type, size, modification time, mode),
    or None for the digest when the walk cannot see all that verifying may read (a symbolic
    link, a folder it could not list)."""
    lines: list[str] = []
    total = 0
    trusted = True
    pending = [(os.fspath(folder), "")]
    while pending:
        path, rel = pending.pop()
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            trusted = False
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:  # removed while we count
                trusted = False
                continue
            name = f"{rel}/{entry.name}"
            if stat.S_ISDIR(info.st_mode):
                lines.append(f"{name}\0{info.st_mode}\0{info.st_mtime_ns}")
                pending.append((entry.path, name))
                continue
            if stat.S_ISLNK(info.st_mode):
                trusted = False
                if entry.is_dir():  # os.walk lists it as a folder: not counted
                    continue
            total += info.st_size
            lines.append(f"{name}\0{info.st_mode}\0{info.st_size}\0{info.st_mtime_ns}")
    try:
        top = os.stat(folder)
        lines.append(f".\0{top.st_mode}\0{top.st_mtime_ns}")
    except OSError:
        trusted = False
    if not trusted:
        return total, None
    text = "\n".join(lines).encode("utf-8", "surrogateescape")  # names need not be UTF-8
    return total, hashlib.sha256(text).hexdigest()


def _folder_key(name: str, folder: Path) -> str:
    return json.dumps([name, str(folder), os.path.abspath(folder)])


def _verified(fingerprint: str | None) -> dict[str, Any]:
    """Verification results kept for this fingerprint: folder key -> {digest, problems}."""
    payload = _read_json(verified_path())
    if (
        fingerprint is None
        or not isinstance(payload, dict)
        or payload.get("format") != FORMAT
        or payload.get("fingerprint") != fingerprint
        or not isinstance(payload.get("folders"), dict)
    ):
        return {}
    return payload["folders"]


def _remember(fingerprint: str | None, results: dict[str, Any]) -> None:
    if fingerprint is None or not results:
        return
    folders = {**_verified(fingerprint), **results}
    kept = dict(list(folders.items())[-MAX_VERIFIED:])
    _write_json(verified_path(), {"format": FORMAT, "fingerprint": fingerprint, "folders": kept})


def _status_from_index(info: PluginInfo, root: Path, verified: dict[str, Any]) -> DataStatus | None:
    """The dataset's status without its class; None when only the class can say."""
    from fewbench.data.root import DataStatus

    data = info.dataset
    if data is None:
        return None
    if not data.needs_files:
        return DataStatus(info.name, "generated", None, 0)
    folder = Path(root) / data.folder
    if not folder.is_dir():
        return DataStatus(info.name, "missing", folder, 0, downloadable=data.downloadable)
    size, digest = scan_folder(folder)
    known = verified.get(_folder_key(info.name, folder))
    if digest is None or not isinstance(known, dict) or known.get("digest") != digest:
        return None
    problems = known.get("problems")
    if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
        return None
    state = "present" if problems else "verified"
    return DataStatus(info.name, state, folder, size, tuple(problems), data.downloadable)


def data_statuses(
    root: Path, registry: Registry | None = None, *, refresh: bool = False
) -> list[tuple[PluginInfo, DataStatus]]:
    """Every dataset and its status under ``root``, as :func:`fewbench.data.root.status`
    gives it (verified): from the index and the remembered verifications when both are
    current, else from the dataset classes (loading the registry, storing what it learnt)."""
    use_cache = registry is None and enabled()
    if use_cache and not refresh:
        stamp = fingerprint()
        index = cached(stamp)
        if index is not None:
            verified = _verified(stamp)
            rows = [(i, _status_from_index(i, root, verified)) for i in index.items("dataset")]
            if all(st is not None for _, st in rows):
                return rows  # type: ignore[return-value]
    from fewbench.data import root as datastore

    stamp = None
    if registry is None:
        registry, stamp = _load_registry()
    index = from_registry(registry, stamp)
    if use_cache:
        save(index)
    rows, results = [], {}
    for info, item in zip(index.items("dataset"), registry.items("dataset"), strict=True):
        folder = Path(root) / info.dataset.folder if info.dataset else None
        scanned = (
            scan_folder(folder)
            if info.dataset and info.dataset.needs_files and folder.is_dir()
            else None
        )  # before verifying: a change meanwhile makes the next walk differ
        st = datastore.status(item.cls, root)
        if scanned and scanned[1] and st.path is not None and st.state in ("present", "verified"):
            results[_folder_key(info.name, st.path)] = {
                "digest": scanned[1],
                "problems": list(st.problems),
            }
        rows.append((info, st))
    if use_cache:
        _remember(stamp, results)
    return rows
