"""Downloads against a local HTTP server on 127.0.0.1: every failure says what and keeps nothing."""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import run_cli

from fewbench.data import root as datastore
from fewbench.data.check import download_missing
from fewbench.data.download import DownloadError, Resource
from fewbench.errors import DataError
from fewbench.plugin.dataset import Dataset
from fewbench.plugin.hookspecs import hookimpl
from fewbench.registry import Registry


def toy_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for c in range(3):
            for i in range(4):
                z.writestr(f"toy/class{c}/{i}.txt", f"example {c} {i}\n" * 50)
    return buffer.getvalue()


def flip_a_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF
    return bytes(changed)


ARCHIVE = toy_zip()
LABELS = b"class0\nclass1\nclass2\n"
HTML = b"<!DOCTYPE html><html><body>Quota exceeded</body></html>"
ENDLESS = 50 << 20  # what the "endless" server sends at most


class Server:
    """Serves ``routes`` (path -> (mode, bytes)); records the Range headers it was sent."""

    def __init__(self):
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.ranges: list[str | None] = []
        self.sent = 0  # bytes of endless bodies written before the client hung up
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                mode, body = server.routes.get(self.path, ("missing", b""))
                server.ranges.append(self.headers.get("Range"))
                if mode == "missing":
                    self.send_error(404, "Not Found")
                    return
                if mode.startswith("endless"):
                    self.send_endless(declared=mode == "endless-declared")
                    return
                start = 0
                if self.headers.get("Range") and mode != "drop-once":
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                else:
                    self.send_response(200)
                content_type = "text/html; charset=utf-8" if mode == "html" else "application/zip"
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if mode == "drop-once":  # half the file, then hang up; serve normally after
                    server.routes[self.path] = ("ok", body)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body[start:])

            def send_endless(self, *, declared: bool) -> None:
                """Zeros until the client hangs up (at most ENDLESS bytes, to bound the test)."""
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if declared:
                    self.send_header("Content-Length", str(ENDLESS))
                self.end_headers()
                block = bytes(1 << 16)
                with contextlib.suppress(OSError):
                    while server.sent < ENDLESS:
                        self.wfile.write(block)
                        server.sent += len(block)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # A short poll interval: shutdown() waits for the loop's next poll (0.5 s by default).
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def toy_dataset(server: Server, *, md5: str | None = None, size: int | None = len(ARCHIVE)):
    class ToyZip(Dataset):
        name = "toyzip"
        how_to_get = "ask the toy maintainers"
        resources = (
            Resource(
                server.url("/toy.zip"), "toy.zip", md5 or hashlib.md5(ARCHIVE).hexdigest(), size
            ),
            Resource(
                server.url("/labels.txt"),
                "labels.txt",
                hashlib.md5(LABELS).hexdigest(),
                into="meta",
            ),
        )

        @classmethod
        def verify(cls, folder: Path) -> list[str]:
            files = list((folder / "toy").glob("class*/*.txt"))
            problems = (
                [] if len(files) == 12 else [f"{folder / 'toy'} holds {len(files)} of 12 files"]
            )
            if not (folder / "meta" / "labels.txt").is_file():
                problems.append("meta/labels.txt is missing")
            return problems

    server.routes["/labels.txt"] = ("ok", LABELS)
    return ToyZip


def leftovers(root: Path) -> list[str]:
    """Anything a failed attempt left that could pass for data."""
    found = [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.startswith(".incoming-") or p.suffix == ".part"
    ]
    return sorted(found + (["toyzip"] if (root / "toyzip").exists() else []))


def test_a_good_download_is_checked_and_installed(server, tmp_path):
    server.routes["/toy.zip"] = ("ok", ARCHIVE)
    dataset = toy_dataset(server)
    path = datastore.download(dataset, tmp_path, progress=False)
    assert path == tmp_path / "toyzip" and dataset.verify(path) == []
    assert datastore.status(dataset, tmp_path).state == "verified"
    assert not (tmp_path / ".downloads" / "toyzip").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".incoming-")]


def test_a_dropped_connection_keeps_the_part_and_the_next_attempt_resumes(server, tmp_path):
    server.routes["/toy.zip"] = ("drop-once", ARCHIVE)
    dataset = toy_dataset(server)
    with pytest.raises(DownloadError, match="closed after .* bytes; run the same command again"):
        datastore.download(dataset, tmp_path, progress=False)
    part = tmp_path / ".downloads" / "toyzip" / "toy.zip.part"
    assert part.stat().st_size == len(ARCHIVE) // 2
    assert not (tmp_path / "toyzip").exists()
    datastore.download(dataset, tmp_path, progress=False)
    assert f"bytes={len(ARCHIVE) // 2}-" in server.ranges  # resumed, not restarted
    assert datastore.status(dataset, tmp_path).state == "verified"


@pytest.mark.parametrize(
    ("served", "declared_md5", "message"),
    [
        (ARCHIVE[: len(ARCHIVE) // 3], None, "wrong size, .* bytes instead of"),
        (flip_a_byte(ARCHIVE), None, "MD5 .* does not match the published"),
        (HTML, None, "answered with an HTML page"),
        (ARCHIVE[:100] + b"\x00" * (len(ARCHIVE) - 100), "CORRUPT", "cannot be unpacked"),
    ],
    ids=["truncated", "wrong-checksum", "html-page", "corrupt-archive"],
)
def test_a_bad_file_is_refused_with_its_reason_and_nothing_stays(
    server, tmp_path, served, declared_md5, message
):
    server.routes["/toy.zip"] = ("html" if served is HTML else "ok", served)
    md5 = hashlib.md5(served).hexdigest() if declared_md5 == "CORRUPT" else None
    dataset = toy_dataset(server, md5=md5)
    with pytest.raises(DataError, match=message):
        datastore.download(dataset, tmp_path, progress=False)
    assert leftovers(tmp_path) == []
    assert datastore.status(dataset, tmp_path).state == "missing"


def test_an_html_page_served_as_a_binary_is_caught_by_its_content(server, tmp_path):
    server.routes["/toy.zip"] = ("ok", HTML)
    dataset = toy_dataset(server, size=None)
    with pytest.raises(DownloadError, match="got an HTML page instead of the file"):
        datastore.download(dataset, tmp_path, progress=False)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", ["endless", "endless-declared"])
def test_an_endless_response_is_cut_off_at_the_declared_size_and_not_kept(server, tmp_path, mode):
    server.routes["/toy.zip"] = (mode, b"")
    dataset = toy_dataset(server)
    with pytest.raises(DownloadError) as error:
        datastore.download(dataset, tmp_path, progress=False)
    message = str(error.value)
    assert f"sent more than the declared {len(ARCHIVE):,} bytes" in message and "\n" not in message
    assert leftovers(tmp_path) == []  # no .part: it cannot be the file
    assert server.sent < ENDLESS  # the client hung up; it did not read the whole stream


def test_a_part_longer_than_the_file_is_discarded(server, tmp_path):
    server.routes["/toy.zip"] = ("ok", ARCHIVE)
    part = tmp_path / ".downloads" / "toyzip" / "toy.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(bytes(len(ARCHIVE) + 1))
    dataset = toy_dataset(server)
    datastore.download(dataset, tmp_path, progress=False)
    assert server.ranges[0] is None  # started over instead of asking for a range past the end
    assert datastore.status(dataset, tmp_path).state == "verified" and not part.exists()


def test_a_dead_link_names_the_status(server, tmp_path):
    dataset = toy_dataset(server)  # /toy.zip is not served
    with pytest.raises(DownloadError, match="answered 404"):
        datastore.download(dataset, tmp_path, progress=False)
    assert leftovers(tmp_path) == []


def test_import_from_the_official_files_or_a_folder(server, tmp_path):
    dataset = toy_dataset(server)
    files = tmp_path / "offline"
    files.mkdir()
    (files / "toy.zip").write_bytes(ARCHIVE)
    (files / "labels.txt").write_bytes(LABELS)
    datastore.import_path(dataset, tmp_path / "a", files)
    assert datastore.status(dataset, tmp_path / "a").state == "verified"
    datastore.import_path(dataset, tmp_path / "b", tmp_path / "a" / "toyzip")  # an unpacked folder
    assert datastore.status(dataset, tmp_path / "b").state == "verified"
    (files / "toy.zip").write_bytes(ARCHIVE[:-10])
    with pytest.raises(DataError, match="toy.zip: .*wrong size"):
        datastore.import_path(dataset, tmp_path / "c", files)
    incomplete = tmp_path / "incomplete"
    (incomplete / "toy" / "class0").mkdir(parents=True)
    with pytest.raises(DataError, match="not a complete toyzip folder: .* holds 0 of 12 files"):
        datastore.import_path(dataset, tmp_path / "d", incomplete)
    assert not (tmp_path / "c" / "toyzip").exists() and not (tmp_path / "d" / "toyzip").exists()


def test_run_downloads_a_missing_dataset_before_training(server, tmp_path):
    server.routes["/toy.zip"] = ("ok", ARCHIVE)
    dataset = toy_dataset(server)

    class Plugin:
        @hookimpl
        def fewbench_register_datasets(self, register):
            register(dataset)

    registry = Registry([Plugin()], entry_points=False)
    download_missing({"toyzip"}, registry, tmp_path, progress=False, log=sys.stderr)
    assert datastore.status(dataset, tmp_path).state == "verified"


def test_omniglot_imports_from_the_shared_folder_and_is_listed(data_root, tmp_path):
    root = tmp_path / "root"
    result = run_cli(
        "data", "import", "omniglot", str(data_root / "omniglot"), "--data-root", str(root)
    )
    assert result.returncode == 0, result.stderr
    assert "installed and verified" in result.stdout
    listing = run_cli("data", "list", "--data-root", str(root)).stdout
    assert "omniglot       verified" in listing
    again = run_cli(
        "data", "import", "omniglot", str(data_root / "omniglot"), "--data-root", str(root)
    )
    assert again.returncode == 2 and "already exists" in again.stderr
    empty = run_cli("data", "list", "--data-root", str(tmp_path / "empty")).stdout
    assert "omniglot       missing" in empty and "fewbench data download omniglot" in empty


def test_an_endless_response_with_no_size_anywhere_stops_at_the_plausible_bound(
    server, tmp_path, monkeypatch
):
    """No declared size and no Content-Length: the stream was written without end."""
    import fewbench.data.download as download

    monkeypatch.setattr(download, "PLAUSIBLE_SIZE", 4096)
    server.routes["/toy.zip"] = ("endless", b"")
    dataset = toy_dataset(server, size=None)
    with pytest.raises(DownloadError, match="sent more than a plausible 4,096 bytes") as error:
        datastore.download(dataset, tmp_path, progress=False)
    assert "\n" not in str(error.value) and leftovers(tmp_path) == []
    assert server.sent < ENDLESS
