"""The plugin index (issue 17, "fast CLI"): ``fewbench plugins`` and ``fewbench data list``
print from a cached listing when it is current, importing no plugin (and so no torch), and
print exactly what the registry path prints; a changed plugin, a corrupt index or an
unwritable cache never shows a stale or failed listing."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

import fewbench.registry
from fewbench.cli import plugin_index
from fewbench.cli.commands import human_size
from fewbench.cli.parser import main
from fewbench.data import root as datastore
from fewbench.registry import KINDS, Registry

# -- the listings as the commands printed them before the index (straight from the registry)


def reference_plugins(registry: Registry) -> str:
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}s:")
        for item in registry.items(kind):
            lines.append(f"  {item.name:<12} {item.description}  [{item.provider}]")
            for name, param in item.params.params.items():
                lines.append(
                    f"      {name} = {param.describe()}"
                    + (f"  # {param.help}" if param.help else "")
                )
    return "\n".join(lines) + "\n"


def reference_data_list(registry: Registry, root: Path) -> str:
    lines = [f"data root: {root}"]
    for item in registry.items("dataset"):
        st = datastore.status(item.cls, root)
        where = "(generated from the seed, no files)" if st.path is None else str(st.path)
        size = human_size(st.bytes) if st.bytes else "-"
        lines.append(f"  {item.name:<14} {st.state:<9} {size:>9}  {where}")
        for problem in st.problems[:3]:
            lines.append(f"      problem: {problem}")
        if st.state == "missing" or st.problems:
            hint = (
                f"fewbench data download {item.name}"
                if st.downloadable
                else item.cls.how_to_get or "see the plugin's documentation"
            )
            lines.append(f"      get it: {hint}")
    for left in datastore.incoming(root):
        size = human_size(datastore.folder_size(left.path))
        state = "stale" if left.stale else ""
        lines.append(f"  {'(temporary)':<14} {state:<9} {size:>9}  {left.path}")
        lines.append(f"      {left.describe()}")
    return "\n".join(lines) + "\n"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FEWBENCH_CACHE", str(folder))
    monkeypatch.delenv(plugin_index.DISABLE_ENV, raising=False)
    return folder


class Loads:
    """How many times a command loaded the registry (imported the plugins)."""

    count = 0


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> type[Loads]:
    class Counting(Registry):
        def __init__(self, *args, **kwargs):
            Loads.count += 1
            super().__init__(*args, **kwargs)

    Loads.count = 0
    monkeypatch.setattr(fewbench.registry, "Registry", Counting)
    return Loads


def cli(capsys: pytest.CaptureFixture, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def data_root(tmp_path: Path) -> Path:
    """A data root with a missing dataset, two incomplete ones and a leftover install."""
    root = tmp_path / "data"
    (root / "cub").mkdir(parents=True)
    (root / "miniimagenet").mkdir()
    (root / "miniimagenet" / "notes.txt").write_text("not a dataset\n")
    (root / ".incoming-omniglot-1@elsewhere-x").mkdir()
    (root / ".incoming-omniglot-1@elsewhere-x" / "part").write_bytes(b"x" * 2000)
    return root


# -- the same output, without the plugins ------------------------------------------------------


def test_the_cached_listings_are_the_registry_listings(tmp_path, cache, loads, capsys, registry):
    expected = reference_plugins(registry)
    assert cli(capsys, "plugins") == expected and loads.count == 1  # no index: loaded
    assert plugin_index.index_path().is_file()
    assert cli(capsys, "plugins") == expected and loads.count == 1  # from the index
    root = data_root(tmp_path)
    expected = reference_data_list(registry, root)
    assert "problem:" in expected and "(temporary)" in expected and "missing" in expected
    assert cli(capsys, "data", "list", "--data-root", str(root)) == expected
    assert loads.count == 2  # the incomplete folders had never been verified
    assert cli(capsys, "data", "list", "--data-root", str(root)) == expected
    assert loads.count == 2  # verified before, unchanged since
    # the index holds what the issue asks: provider, version, module, parameters
    index = plugin_index.from_json(json.loads(plugin_index.index_path().read_text()))
    maml = next(i for i in index.items("learner") if i.name == "maml")
    assert maml.provider == "fewbench" and maml.provider_version == fewbench.__version__
    assert maml.module == registry.get("learner", "maml").cls.__module__
    assert maml.params and maml.dataset is None
    cub = next(i for i in index.items("dataset") if i.name == "cub")
    assert cub.dataset.needs_files and cub.dataset.downloadable and cub.dataset.folder == "cub"


def test_the_real_data_root_lists_the_same_from_the_index(cache, loads, capsys, registry):
    root = Path(os.environ.get("FEWBENCH_DATA") or REPO.parent / "shared" / "data")
    if not root.is_dir():
        pytest.skip(f"no data root at {root}")
    expected = reference_data_list(registry, root)
    assert cli(capsys, "data", "list", "--data-root", str(root)) == expected
    assert cli(capsys, "data", "list", "--data-root", str(root)) == expected
    assert loads.count == 1


# Runs the command line's main, then says whether torch was imported.
PROBE = """\
import sys
from fewbench.cli.parser import main
code = main(sys.argv[1:])
print("TORCH=" + str("torch" in sys.modules), file=sys.stderr)
sys.exit(code)
"""


def probe(cache: Path, *args: str) -> tuple[str, bool]:
    """stdout of ``fewbench ARGS`` in a fresh process, and whether it imported torch."""
    env = {**os.environ, "FEWBENCH_CACHE": str(cache)}
    env.pop(plugin_index.DISABLE_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("TORCH="), done.stderr
    return done.stdout, last == "TORCH=True"


def test_the_second_call_imports_no_torch(tmp_path):
    cache, root = tmp_path / "cache", data_root(tmp_path)
    first, torch_first = probe(cache, "plugins")
    second, torch_second = probe(cache, "plugins")
    assert torch_first and not torch_second
    assert second == first and "maml" in second
    first, torch_first = probe(cache, "data", "list", "--data-root", str(root))
    second, torch_second = probe(cache, "data", "list", "--data-root", str(root))
    assert torch_first and not torch_second
    assert second == first and "problem:" in second


# -- invalidation ------------------------------------------------------------------------------

PLUGIN = """\
from fewbench.plugin.hookspecs import hookimpl


class Thing:
    name = "index_demo"
    description = "DESCRIPTION"
    params = {"size": 3}


@hookimpl
def fewbench_register_learners(register):
    register(Thing)
"""


def install_package(site: Path, package: Path, name: str = "fbidx_demo") -> Path:
    """A throwaway plugin distribution: the package ``package/name`` (``things.py`` holds the
    hook, ``helpers.py`` nothing) and its ``*.dist-info`` in ``site`` with the entry point."""
    folder = package / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "things.py").write_text(PLUGIN.replace("DESCRIPTION", "first words"))
    (folder / "helpers.py").write_text("VALUE = 1\n")
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fewbench]\nindex_demo = {name}.things\n")
    return folder


@pytest.fixture
def forget_demo():
    yield
    for name in [m for m in sys.modules if m.startswith(("fbidx_demo", "fbidx_src"))]:
        del sys.modules[name]


def test_editing_a_plugin_file_makes_a_new_index(
    tmp_path, monkeypatch, cache, loads, capsys, forget_demo
):
    site = tmp_path / "site"
    folder = install_package(site, site)
    monkeypatch.syspath_prepend(str(site))
    assert "first words  [fbidx_demo]" in cli(capsys, "plugins")
    assert "first words" in cli(capsys, "plugins") and loads.count == 1
    stamp = plugin_index.fingerprint()
    assert stamp is not None and str(folder / "things.py") in plugin_index.source_files()

    (folder / "things.py").write_text(PLUGIN.replace("DESCRIPTION", "second, longer words"))
    del sys.modules["fbidx_demo.things"]  # a new process would import the file again
    importlib.invalidate_caches()
    out = cli(capsys, "plugins")
    assert "second, longer words" in out and "first words" not in out and loads.count == 2
    stamp = plugin_index.fingerprint()

    # Any source file of the package, not only the entry point's module; a touch is enough.
    helpers = folder / "helpers.py"
    os.utime(helpers, ns=(helpers.stat().st_atime_ns, helpers.stat().st_mtime_ns + 10**9))
    assert plugin_index.fingerprint() != stamp
    stamp = plugin_index.fingerprint()
    (folder / "more.py").write_text("")
    assert plugin_index.fingerprint() != stamp
    stamp = plugin_index.fingerprint()
    (folder / "notes.txt").write_text("")  # not Python: the same plugins
    assert plugin_index.fingerprint() == stamp
    # A new version of the distribution, or any other distribution installed
    os.rename(site / "fbidx_demo-0.1.dist-info", site / "fbidx_demo-0.2.dist-info")
    assert plugin_index.fingerprint() != stamp
    stamp = plugin_index.fingerprint()
    (site / "unrelated-1.0.dist-info").mkdir()
    assert plugin_index.fingerprint() != stamp


def test_an_editable_install_is_followed_to_its_source(tmp_path, monkeypatch, cache, forget_demo):
    # An editable install: the dist-info in site-packages, the source where the user edits
    # it (a .pth puts it on sys.path), not among the distribution's installed files.
    site, src = tmp_path / "site", tmp_path / "checkout" / "src"
    folder = install_package(site, src, "fbidx_src")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(src))
    stamp = plugin_index.fingerprint()
    assert str(folder / "things.py") in plugin_index.source_files()
    (folder / "things.py").write_text(PLUGIN.replace("DESCRIPTION", "edited in the checkout"))
    assert plugin_index.fingerprint() != stamp
    # fewbench's own plugins are installed editable here (setuptools' finder): their files
    spec = importlib.util.find_spec("fewbench_plugins")
    if spec is None or not spec.origin or not spec.origin.startswith(str(REPO)):
        pytest.skip("fewbench is not installed editable from this checkout")
    files = plugin_index.source_files()
    assert str(REPO / "fewbench_plugins" / "datasets" / "omniglot.py") in files
    assert (
        str(REPO / "fewbench" / "plugin" / "params.py") in files
    )  # the core renders the parameters


def test_a_missing_plugin_module_disables_the_index(tmp_path, monkeypatch, cache):
    site = tmp_path / "site"
    info = site / "gone-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gone\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fewbench]\ngone = fbidx_gone_module\n")
    monkeypatch.syspath_prepend(str(site))
    assert plugin_index.fingerprint() is None  # loading says which plugin is broken


def test_a_changed_dataset_folder_is_verified_again(tmp_path, cache, loads, capsys, registry):
    root = data_root(tmp_path)
    listing = ("data", "list", "--data-root", str(root))
    assert cli(capsys, *listing) == reference_data_list(registry, root)
    assert cli(capsys, *listing) == reference_data_list(registry, root) and loads.count == 1
    (root / "cub" / "CUB_200_2011" / "images").mkdir(parents=True)
    expected = reference_data_list(registry, root)
    assert "holds 0 classes" in expected
    assert cli(capsys, *listing) == expected and loads.count == 2
    assert cli(capsys, *listing) == expected and loads.count == 2
    (root / "miniimagenet" / "notes.txt").write_text("a longer note than before\n")
    assert cli(capsys, *listing) == reference_data_list(registry, root) and loads.count == 3
    # A symbolic link (the walk does not follow it): verified every time
    (root / "cub" / "link").symlink_to(tmp_path)
    assert cli(capsys, *listing) == reference_data_list(registry, root) and loads.count == 4
    assert cli(capsys, *listing) == reference_data_list(registry, root) and loads.count == 5


def test_the_walk_counts_what_folder_size_counts(tmp_path):
    folder = tmp_path / "set"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "one.bin").write_bytes(b"1" * 1000)
    (folder / "two.txt").write_text("22")
    size, digest = plugin_index.scan_folder(folder)
    assert size == datastore.folder_size(folder) == 1002 and digest
    (folder / "two.txt").write_text("223")
    assert plugin_index.scan_folder(folder)[1] != digest
    digest = plugin_index.scan_folder(folder)[1]
    (folder / "a" / "empty").mkdir()  # a folder counts (verify may look for folders)
    assert plugin_index.scan_folder(folder)[1] != digest
    (folder / "to-file").symlink_to(folder / "two.txt")
    (folder / "to-folder").symlink_to(folder / "a")
    size, digest = plugin_index.scan_folder(folder)
    assert size == datastore.folder_size(folder) and digest is None


# -- failures of the cache never fail the command ----------------------------------------------


def test_a_corrupt_index_is_ignored_and_written_again(cache, loads, capsys, registry):
    expected = reference_plugins(registry)
    assert cli(capsys, "plugins") == expected
    path = plugin_index.index_path()
    good = json.loads(path.read_text())
    wrong_shape = {**good, "plugins": {"dataset": [{"name": 3}]}}
    for damaged in ("{not json", "", json.dumps(wrong_shape), json.dumps([1, 2])):
        path.write_text(damaged)
        before = loads.count
        assert cli(capsys, "plugins") == expected and loads.count == before + 1
        assert plugin_index.from_json(json.loads(path.read_text())) is not None
    plugin_index.verified_path().write_text("\x00garbage")
    root = data_root(cache.parent)
    expected = reference_data_list(registry, root)
    assert cli(capsys, "data", "list", "--data-root", str(root)) == expected
    assert cli(capsys, "data", "list", "--data-root", str(root)) == expected
    assert json.loads(plugin_index.verified_path().read_text())["folders"]


def test_an_unwritable_cache_does_not_fail_the_command(
    tmp_path, monkeypatch, loads, capsys, registry
):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be made below a file")
    monkeypatch.setenv("FEWBENCH_CACHE", str(blocker / "cache"))
    monkeypatch.delenv(plugin_index.DISABLE_ENV, raising=False)
    root = data_root(tmp_path)
    for _ in range(2):
        assert cli(capsys, "plugins") == reference_plugins(registry)
        assert cli(capsys, "data", "list", "--data-root", str(root)) == reference_data_list(
            registry, root
        )
    assert loads.count == 4 and blocker.is_file()


def test_refresh_and_the_environment_variable_load_the_plugins(
    cache, loads, capsys, registry, monkeypatch, tmp_path
):
    expected = reference_plugins(registry)
    assert cli(capsys, "plugins") == expected and loads.count == 1
    assert cli(capsys, "plugins", "--refresh") == expected and loads.count == 2
    root = data_root(tmp_path)
    cli(capsys, "data", "list", "--data-root", str(root))
    cli(capsys, "data", "list", "--refresh", "--data-root", str(root))
    assert loads.count == 4
    monkeypatch.setenv(plugin_index.DISABLE_ENV, "1")
    plugin_index.index_path().unlink()
    assert cli(capsys, "plugins") == expected and loads.count == 5
    assert not plugin_index.index_path().exists()  # off: neither read nor written


# -- a hostile index file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    ["fifo", "dev-zero", "deep", "escapes", "edited", "ghost", "foreign-module", "extra-kind"],
)
def test_a_hostile_index_file_is_rebuilt_not_trusted(cache, kind, capsys):
    """A FIFO at the index path made `fewbench plugins` hang, a link to /dev/zero gave a
    MemoryError, a 200,000-deep document a RecursionError, a tampered entry printed terminal
    escapes, one listed a learner that does not exist, and one with edited descriptions was
    printed: each is a file the index does not trust, so the listing is built afresh. A
    document whose digest was made again still lists no class that is not in the sources."""
    assert main(["plugins"]) == 0
    expected = capsys.readouterr().out
    path = plugin_index.index_path()
    payload = json.loads(path.read_text())
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    else:
        learners = payload["plugins"]["learner"]
        if kind == "escapes":
            learners[0]["description"] = "\x1b[2J\x1b]0;owned\x07"
        elif kind == "edited":  # fingerprint intact, the body's digest now wrong
            learners[0]["description"] = "ghost: the best learner there is"
            learners[0]["params"] = []
        elif kind == "ghost":  # a learner that exists nowhere, fingerprint left intact
            learners.append({**learners[0], "name": "ghost", "qualname": "GhostLearner"})
        elif kind == "foreign-module":  # a class the fingerprint does not cover
            learners.append({**learners[0], "name": "ghost", "module": "json.decoder",
                             "qualname": "JSONDecoder"})  # fmt: skip
        else:
            payload["kinds"].append("ghosts")
            payload["plugins"]["ghosts"] = []
        if kind in ("ghost", "foreign-module", "extra-kind"):  # digest made again: the
            payload["digest"] = plugin_index.body_digest(payload)  # class check must catch it
        path.write_text(json.dumps(payload))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out == expected and "\x1b" not in out and "ghost" not in out


def test_data_list_of_a_folder_with_a_name_that_is_not_utf8(tmp_path, cache, capsys):
    """A file name that is not UTF-8 (its bytes kept as surrogates) made the folder's digest
    fail with a UnicodeEncodeError traceback, with the index on or off."""
    root = data_root(tmp_path)
    (root / "cub" / os.fsdecode(b"\xe9t\xe9.jpg")).write_bytes(b"")
    first = cli(capsys, "data", "list", "--data-root", str(root))
    assert "cub" in first and cli(capsys, "data", "list", "--data-root", str(root)) == first
