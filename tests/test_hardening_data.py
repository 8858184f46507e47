"""Hostile archives and interrupted installs: one clear error line, nothing left behind."""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import run_cli
from stored import checked_against, tar_gz

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
