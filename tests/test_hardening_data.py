"""Hostile archives and interrupted installs: one clear error line, nothing left behind."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import registry_built_once, run_cli
from stored import checked_against, tar_gz

from fewbench.data import download
from fewbench.data import root as datastore
from fewbench.errors import DataError
from fewbench.plugin.dataset import Dataset

ZEROS = 10 << 20  # what the bombs below expand to: far past the test's bound, fast to make


class Toy(Dataset):
    name = "toyhard"

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        return [] if any(p.is_file() for p in folder.rglob("*")) else [f"{folder} holds no file"]


def zip_bytes(members: dict[str, bytes], modes: dict[str, int] | None = None) -> bytes:
    """A deflated zip of ``members``; ``modes`` sets a member's Unix mode (file type too)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if modes and name in modes:
                info.create_system = 3  # Unix
                info.external_attr = modes[name] << 16
            z.writestr(info, content)
    return buffer.getvalue()


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def import_archive(tmp_path: Path, name: str, content: bytes, **resource_fields) -> Path:
    """Import ``content`` as Toy's one archive into ``tmp_path/root``; return the root."""
    archive = write(tmp_path / "received" / name, content)
    dataset = checked_against(Toy, archive)
    if resource_fields:
        resource = dataclasses.replace(dataset.resources[0], **resource_fields)
        dataset = type("Declared", (dataset,), {"resources": (resource,)})
    root = tmp_path / "root"
    datastore.import_path(dataset, root, archive)
    return root


def assert_nothing_left(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert not root.exists() or list(root.rglob("*")) == []


def assert_one_line(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


# -- 2: zip and tar bombs -----------------------------------------------------------------------
@pytest.fixture
def small_bound(monkeypatch):
    """Bound = 50 x the archive + 1 MiB: a 10 MB expansion of a few KB trips it."""
    monkeypatch.setattr(datastore, "UNPACK_SLACK", 1 << 20)


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path, small_bound):
    bomb = zip_bytes({"toy/zeros.bin": bytes(ZEROS)})
    assert len(bomb) < 100_000  # really a bomb: over a hundred times smaller than its content
    with pytest.raises(DataError) as error:
        import_archive(tmp_path, "bomb.zip", bomb)
    assert_one_line(error, "bomb.zip", f"declares {ZEROS:,} bytes,", "archive bomb")
    assert_nothing_left(tmp_path)


def test_a_zip_that_understates_its_sizes_writes_no_more_than_it_declared(tmp_path):
    data = zip_bytes({"toy/zeros.bin": bytes(ZEROS)})
    central = data.rindex(b"PK\x01\x02")  # the member's central directory record
    size_at = central + 24  # uncompressed size, 4 bytes little-endian
    lying = data[:size_at] + (1000).to_bytes(4, "little") + data[size_at + 4 :]
    with pytest.raises(DataError) as error:
        import_archive(tmp_path, "lying.zip", lying)
    assert_one_line(error, "lying.zip", "toy/zeros.bin")
    assert_nothing_left(tmp_path)


def test_a_tar_bomb_is_refused(tmp_path, small_bound):
    bomb = tar_gz({"toy/zeros.bin": bytes(ZEROS)})
    with pytest.raises(DataError) as error:
        import_archive(tmp_path, "bomb.tar.gz", bomb)
    assert_one_line(error, "bomb.tar.gz", "toy/zeros.bin", "archive bomb")
    assert_nothing_left(tmp_path)


def test_a_declared_unpacked_size_is_the_bound(tmp_path):
    archive = zip_bytes({f"toy/{i}.txt": b"x" * 1000 for i in range(5)})
    with pytest.raises(
        DataError, match="declares 5,000 bytes, more than the allowed 4,999 bytes unpacked"
    ):
        import_archive(tmp_path / "a", "toy.zip", archive, unpacked_size=4999)
    assert_nothing_left(tmp_path / "a")
    root = import_archive(tmp_path / "b", "toy.zip", archive, unpacked_size=5000)
    assert len(list((root / "toyhard" / "toy").iterdir())) == 5


def test_the_default_bound_passes_ordinary_archives(tmp_path):
    archive = zip_bytes({f"toy/{i}.txt": os.urandom(2000) for i in range(5)})
    root = import_archive(tmp_path, "toy.zip", archive)
    assert Toy.verify(root / "toyhard") == []


# -- 5: links and members that cannot be written ------------------------------------------------
def test_a_symlink_in_a_zip_is_refused(tmp_path):
    archive = zip_bytes(
        {"toy/link": b"/etc", "toy/link/passwd": b"written through the link"},
        modes={"toy/link": stat.S_IFLNK | 0o777},
    )
    with pytest.raises(DataError) as error:
        import_archive(tmp_path, "links.zip", archive)
    assert_one_line(error, "links.zip", "'toy/link' is a symbolic link")
    assert_nothing_left(tmp_path)


def test_a_member_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    archive = zip_bytes({"toy/a": b"a file", "toy/a/b": b"under a file"})
    with pytest.raises(DataError) as error:
        import_archive(tmp_path, "clash.zip", archive)
    assert_one_line(error, "clash.zip", "cannot unpack 'toy/a/b'", "a file and a folder")
    assert_nothing_left(tmp_path)


def test_a_tar_link_out_of_the_folder_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("toy/link")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "outside")
        tar.addfile(link)
    with pytest.raises(DataError) as error:
        import_archive(tmp_path, "links.tar.gz", buffer.getvalue())
    assert_one_line(error, "links.tar.gz", "cannot be unpacked", "toy/link")
    assert_nothing_left(tmp_path)
    assert not (tmp_path / "outside").exists()


# -- 4: temporary folders left by a killed import -----------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_stale_incoming_folder_is_listed_then_removed_by_the_next_import(tmp_path):
    root = tmp_path / "root"
    host = datastore._host()
    stale = write(root / f".incoming-omniglot-{dead_pid()}@{host}-abc12345" / "half", b"x").parent
    live = write(root / f".incoming-omniglot-{os.getpid()}@{host}-def67890" / "half", b"x").parent
    other_host = write(root / f".incoming-omniglot-{dead_pid()}@elsewhere-x1" / "f", b"x").parent
    unknown = write(root / ".incoming-omniglot-oldstyle" / "half", b"x").parent
    listing = run_cli("data", "list", "--data-root", str(root)).stdout
    line = next(line for line in listing.splitlines() if str(stale) in line)
    assert "stale" in line
    assert "is gone; the next data import or download removes it" in listing
    assert all(str(p) in listing for p in (live, other_host, unknown))
    source = write(tmp_path / "toyfolder" / "a.txt", b"toy").parent
    datastore.import_path(Toy, root, source)
    assert not stale.exists()
    assert live.exists() and other_host.exists() and unknown.exists()  # maybe still running


def test_an_install_in_progress_is_named_after_its_process(tmp_path):
    seen = []

    def fill(staging: Path) -> None:
        seen.extend(datastore.incoming(tmp_path))
        write(staging / "a.txt", b"toy")

    datastore._build(Toy, tmp_path, fill)
    assert [(i.pid, i.stale) for i in seen] == [(os.getpid(), False)]
    assert datastore.incoming(tmp_path) == []


# -- 6: the installed folder's permissions ------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_the_installed_folder_gets_the_mode_mkdir_would_give(tmp_path, umask):
    previous = os.umask(umask)
    try:
        root = import_archive(tmp_path, "toy.zip", zip_bytes({"toy/a.txt": b"toy"}))
        (root / "probe").mkdir()
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((root / "toyhard").stat().st_mode)
    assert mode == stat.S_IMODE((root / "probe").stat().st_mode) == 0o777 & ~umask


# -- 29.3: importing a folder follows no link out of it, opens no special file, is bounded -----
@pytest.fixture(scope="module")
def cli():
    """``fewbench`` in this process (exit code, stdout, stderr), plugins discovered once."""
    from fewbench.cli.parser import main

    def call(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    with registry_built_once():
        yield call


def cifar_folder(source: Path) -> Path:
    """An unpacked folder that ``cifar_fs``'s verify accepts: three whole pickles of dicts,
    ``meta`` naming 100 classes (the cheapest real dataset to satisfy)."""
    meta = {"fine_label_names": [f"class{i}" for i in range(100)]}
    for name, content in (("train", {}), ("test", {}), ("meta", meta)):
        write(source / "cifar-100-python" / name, pickle.dumps(content, protocol=2))
    return source


def installed_elsewhere(root: Path) -> Path:
    """Another dataset already in the data root: a refused import must not touch it."""
    return write(root / "omniglot" / "kept.txt", b"installed before")


def assert_refused_by_cli(result: tuple[int, str, str], root: Path, *words: str) -> str:
    """Exit 2, one line on stderr holding ``words``; nothing installed, nothing left over."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "installed" not in out, (code, out, err)
    assert lines[0].startswith("fewbench: error: ") and all(w in lines[0] for w in words), err
    assert not (root / "cifar100").exists() and not list(root.glob(".incoming-*"))
    assert (root / "omniglot" / "kept.txt").read_bytes() == b"installed before"
    return lines[0]


@pytest.mark.parametrize("target", [".", "..", "../cifar-100-python"])
def test_a_link_to_a_folder_is_refused_not_followed(tmp_path, capsys, cli, target):
    """The issue's ``loop -> .`` (copytree followed it until the path was too long)."""
    source = cifar_folder(tmp_path / "received")
    (source / "cifar-100-python" / "loop").symlink_to(target)
    root = tmp_path / "root"
    installed_elsewhere(root)
    result = cli(capsys, "data", "import", "cifar_fs", str(source), "--data-root", str(root))
    line = assert_refused_by_cli(
        result, root, "'cifar-100-python/loop' is a symbolic link to", repr(target), "a folder"
    )
    assert "not followed" in line


def outside_target(tmp_path: Path, how: str) -> str:
    """A link target outside the received folder: relative, absolute, or a system file."""
    if how == "/etc/passwd":
        if not Path("/etc/passwd").is_file():
            pytest.skip("no /etc/passwd here")
        return "/etc/passwd"
    secret = write(tmp_path / "secret.txt", b"not part of the data")
    return str(secret) if how == "absolute" else "../../secret.txt"


@pytest.mark.parametrize("how", ["relative", "absolute", "/etc/passwd"])
def test_a_link_to_a_file_outside_the_folder_is_refused(tmp_path, capsys, cli, how):
    """The issue's ``.png -> /etc/shadow`` was copied into the data root and 'verified'."""
    source = cifar_folder(tmp_path / "received")
    target = outside_target(tmp_path, how)
    (source / "cifar-100-python" / "extra.png").symlink_to(target)
    root = tmp_path / "root"
    installed_elsewhere(root)
    result = cli(capsys, "data", "import", "cifar_fs", str(source), "--data-root", str(root))
    assert_refused_by_cli(
        result, root, "'cifar-100-python/extra.png' is a symbolic link to", repr(target), "outside"
    )


def test_a_link_to_a_file_inside_the_folder_is_copied_as_that_file(tmp_path, capsys, cli):
    source = cifar_folder(tmp_path / "received")
    (source / "cifar-100-python" / "extra.png").symlink_to("meta")
    root = tmp_path / "root"
    code, out, err = cli(
        capsys, "data", "import", "cifar_fs", str(source), "--data-root", str(root)
    )
    assert code == 0 and "installed and verified" in out, err
    extra = root / "cifar100" / "cifar-100-python" / "extra.png"
    assert not extra.is_symlink()
    assert extra.read_bytes() == (source / "cifar-100-python" / "meta").read_bytes()


class Watched(Toy):
    """Toy, recording each folder its verify is given (it could read every file there)."""

    calls: ClassVar[list[Path]] = []

    @classmethod
    def verify(cls, folder: Path) -> list[str]:
        cls.calls.append(folder)
        return Toy.verify(folder)


@pytest.fixture
def watched() -> type[Watched]:
    Watched.calls = []
    return Watched


def received(tmp_path: Path) -> Path:
    source = tmp_path / "received"
    for name in ("a.txt", "sub/b.txt"):
        write(source / name, b"toy " * 100)
    return source


def special(source: Path, kind: str) -> str:
    """Put a FIFO, a link to one, a link out of the folder or a loop into ``source``."""
    if kind == "fifo":
        os.mkfifo(source / "sub" / "pipe")
        return "'sub/pipe' is a named pipe"
    if kind == "link to a fifo":
        os.mkfifo(source / "sub" / "pipe")
        (source / "alias").symlink_to("sub/pipe")  # met before the pipe itself
        return "'alias' is a symbolic link to 'sub/pipe', which is a named pipe"
    if kind == "dangling link":
        (source / "sub" / "gone").symlink_to("nothing-here")
        return "'sub/gone' is a symbolic link to 'nothing-here', which does not exist"
    target = "." if kind == "loop" else str(source.parent / "outside.txt")
    (source / "sub" / "link").symlink_to(target)
    return f"'sub/link' is a symbolic link to {target!r}"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("kind", ["fifo", "link to a fifo", "dangling link", "loop", "outside"])
def test_a_refused_entry_is_refused_before_the_datasets_verify_sees_it(tmp_path, watched, kind):
    """verify is dataset code: it may open a pipe (and wait forever) or read through a link."""
    source = received(tmp_path)
    words = special(source, kind)
    write(source.parent / "outside.txt", b"not part of the data")
    root = tmp_path / "root"
    with pytest.raises(DataError) as error:
        datastore.import_path(watched, root, source)
    assert_one_line(error, str(source), words)
    assert watched.calls == []
    assert_nothing_left(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_given_as_the_source_is_refused_without_opening_it(tmp_path):
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(DataError) as error:
        datastore.import_path(Toy, tmp_path / "root", pipe)
    assert_one_line(error, str(pipe), "neither a regular file nor a folder")


def bound(monkeypatch: pytest.MonkeyPatch, name: str, value: int) -> None:
    """Lower a bound of folder imports (set even where it does not exist, so that code
    without the bound fails these tests by copying everything, as it did)."""
    monkeypatch.setattr(datastore, name, value, raising=False)


def test_a_folder_past_the_bound_on_files_is_refused(tmp_path, monkeypatch, watched):
    bound(monkeypatch, "IMPORT_MAX_FILES", 2)  # a.txt, sub, sub/b.txt: 3
    with pytest.raises(DataError) as error:
        datastore.import_path(watched, tmp_path / "root", received(tmp_path))
    assert_one_line(error, "more than 2 files and folders", "refused, nothing was kept")
    assert watched.calls == []
    assert_nothing_left(tmp_path)


def test_a_folder_past_the_bound_on_bytes_is_refused(tmp_path, monkeypatch, watched):
    bound(monkeypatch, "IMPORT_MAX_BYTES", 799)  # two files of 400 bytes
    with pytest.raises(DataError) as error:
        datastore.import_path(watched, tmp_path / "root", received(tmp_path))
    assert_one_line(error, "more than 799 bytes (fewbench's bound", "nothing was kept")
    assert watched.calls == []
    assert_nothing_left(tmp_path)
    bound(monkeypatch, "IMPORT_MAX_BYTES", 800)
    assert datastore.import_path(watched, tmp_path / "root", received(tmp_path)).is_dir()


def test_a_dataset_that_declares_its_size_bounds_a_folder_import(tmp_path, monkeypatch):
    monkeypatch.setattr(datastore, "UNPACK_SLACK", 0)
    declared = datastore.Resource("http://127.0.0.1:9/unused", "toy.zip", "0" * 32, size=10)
    dataset = type("Sized", (Toy,), {"resources": (declared,)})  # 50 x 10 bytes unpacked
    with pytest.raises(DataError) as error:
        datastore.import_path(dataset, tmp_path / "root", received(tmp_path))
    assert_one_line(error, "more than 500 bytes (what toyhard declares", "'sub/b.txt'")
    assert_nothing_left(tmp_path)


def test_a_folder_larger_than_the_free_space_is_refused_before_copying(tmp_path, monkeypatch):
    real = datastore.shutil.disk_usage
    monkeypatch.setattr(datastore.shutil, "disk_usage", lambda p: real(p)._replace(free=500))
    with pytest.raises(DataError) as error:
        datastore.import_path(Toy, tmp_path / "root", received(tmp_path))
    assert_one_line(error, "more than 500 bytes (the free space under", "nothing was kept")
    assert_nothing_left(tmp_path)


def grow(folder: Path) -> None:
    with open(folder / "a.txt", "ab") as f:
        f.write(bytes(1000))


def swap_for_a_link(folder: Path) -> None:
    (folder / "sub" / "b.txt").unlink()
    (folder / "sub" / "b.txt").symlink_to(folder.parent / "outside.txt")


@pytest.mark.parametrize(
    ("change", "words"),
    [(grow, "more than 1,000 bytes"), (swap_for_a_link, "'sub/b.txt' is a symbolic link")],
)
def test_a_folder_changed_after_the_checks_fails_the_copy_and_leaves_nothing(
    tmp_path, monkeypatch, change, words
):
    """Checked again while copied: a failure in the middle removes the temporary folder."""
    bound(monkeypatch, "IMPORT_MAX_BYTES", 1000)
    write(tmp_path / "outside.txt", b"not part of the data")

    class Changing(Toy):
        @classmethod
        def verify(cls, folder: Path) -> list[str]:
            if folder.name == "received":  # between the survey and the copy
                change(folder)
            return Toy.verify(folder)

    root = tmp_path / "root"
    installed_elsewhere(root)
    with pytest.raises(DataError) as error:
        datastore.import_path(Changing, root, received(tmp_path))
    assert_one_line(error, str(tmp_path / "received"), words)
    assert sorted(p.name for p in root.iterdir()) == ["omniglot"]  # no .incoming-*, no toyhard


def test_a_data_root_inside_the_folder_is_refused(tmp_path):
    source = received(tmp_path)
    with pytest.raises(DataError) as error:
        datastore.import_path(Toy, source / "root", source)
    assert_one_line(error, "holds the data root")
    assert not (source / "root").exists()


@pytest.mark.skipif(os.name == "nt", reason="no set-user-ID bit")
def test_an_imported_file_keeps_its_content_and_time_but_not_a_set_user_id_bit(tmp_path):
    source = received(tmp_path)
    (source / "a.txt").chmod(0o4755)
    os.utime(source / "a.txt", ns=(1_000_000_000, 1_000_000_000))
    copied = datastore.import_path(Toy, tmp_path / "root", source) / "a.txt"
    assert copied.read_bytes() == b"toy " * 100 and copied.stat().st_mtime_ns == 1_000_000_000
    assert not copied.stat().st_mode & (stat.S_ISUID | stat.S_IXUSR)


# -- 29.11: a file's size is checked before it is hashed ----------------------------------------
def forbid_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing fails the test: a 20 GiB file would take minutes (or, sparse, fill nothing)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the file was hashed")

    monkeypatch.setattr(download, "md5_of", refuse)
    monkeypatch.setattr(hashlib, "md5", refuse)


def test_a_sparse_20_gib_archive_is_refused_before_it_is_hashed(tmp_path, monkeypatch):
    archive = write(tmp_path / "received" / "toy.zip", zip_bytes({"toy/a.txt": b"toy"}))
    dataset = checked_against(Toy, archive)  # declares no size, like cifar_fs's archive
    with open(archive, "r+b") as f:
        f.truncate(20 * 2**30)  # sparse: no disk used
    forbid_hashing(monkeypatch)
    started = time.monotonic()
    with pytest.raises(DataError) as error:
        datastore.import_path(dataset, tmp_path / "root", archive)
    assert time.monotonic() - started < 1
    assert_one_line(error, "toy.zip", f"{20 * 2**30:,} bytes", "refused before hashing it")
    assert_nothing_left(tmp_path)


def test_a_file_that_grows_while_hashed_is_not_read_past_its_bound(tmp_path):
    path = write(tmp_path / "toy.zip", bytes(3 << 20))
    with pytest.raises(download.DownloadError, match="grew past 1,048,576 bytes"):
        download.md5_of(path, limit=1 << 20)
    assert download.md5_of(path, limit=3 << 20) == hashlib.md5(bytes(3 << 20)).hexdigest()


@pytest.mark.parametrize("action", ["import", "download"])
@pytest.mark.parametrize("where", ["under a file", "read-only file system"])
def test_a_data_root_that_cannot_be_written_is_one_line(tmp_path, capsys, cli, action, where):
    """`data import` / `data download` with --data-root under a file gave a
    NotADirectoryError traceback (import from a read-only one: a misleading free-space line)."""
    (tmp_path / "file").write_text("x")
    root = tmp_path / "file" / "data" if where == "under a file" else Path("/proc/fewbench-data")
    source = [str(cifar_folder(tmp_path / "received"))] if action == "import" else []
    code, out, err = cli(capsys, "data", action, "cifar_fs", *source, "--data-root", str(root))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"fewbench: error: --data-root {root}: cannot write cifar_fs")
