"""The one import for plugin authors (``fewbench.plugin``), the shared plugin base, the
one-line error for a contract method left out, and the old module paths kept for a release."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import warnings

import pytest
from helpers import REPO

import fewbench.plugin as plugin
from fewbench._moved import MOVED_MODULES
from fewbench.errors import FewbenchError

CONTRACTS = ("Dataset", "Environment", "Backbone", "Learner", "Executor", "Logger")


def test_every_name_of_the_namespace_resolves():
    for name in plugin.__all__:
        assert getattr(plugin, name) is not None, name
    assert len(plugin.__all__) == len(set(plugin.__all__))
    # about the size of pytest's public namespace, not a dump of the core
    assert 20 <= len(plugin.__all__) <= 60


def test_all_six_contracts_share_the_plugin_base_and_fill_in_defaults():
    for contract in CONTRACTS:
        base = getattr(plugin, contract)
        assert issubclass(base, plugin.Plugin), contract

        class Mine(base):  # type: ignore[misc, valid-type]
            name = f"mine_{contract.lower()}"
            params = {"size": plugin.Param(3, minimum=1), "rate": 0.5}

        mine = Mine(size=5)
        assert mine.config == {"size": 5, "rate": 0.5}, contract  # the default filled in
        assert Mine().config == {"size": 3, "rate": 0.5}, contract
        assert mine.kind == contract.lower()
        mine.check()  # nothing to refuse by default


@pytest.mark.parametrize(
    ("contract", "method", "arguments"),
    [
        ("Dataset", "split_sizes", ("root",)),
        ("Dataset", "load", ("root", "cache")),
        ("Backbone", "build_features", ((1, 28, 28),)),
        ("Learner", "batch_size", ()),
        ("Learner", "train_step", (None, 1)),
        ("Learner", "predict", (None,)),
        ("Environment", "sample_tasks", (4, None)),
        ("Executor", "run", (None, None)),
    ],
)
def test_a_contract_method_left_out_is_one_line_naming_plugin_and_method(
    contract, method, arguments
):
    class Forgetful(getattr(plugin, contract)):  # type: ignore[misc, valid-type]
        name = "forgetful"

    with pytest.raises(plugin.NotImplementedByPlugin) as caught:
        getattr(Forgetful(), method)(*arguments)
    message = str(caught.value)
    assert "\n" not in message
    assert f"the {contract.lower()} plugin 'forgetful'" in message and f"{method}()" in message
    # a FewbenchError (the command line prints it as one line, exit 2), and still a
    # NotImplementedError for code that asks whether a capability exists
    assert isinstance(caught.value, FewbenchError)
    assert isinstance(caught.value, NotImplementedError)


def test_a_dataset_without_split_sizes_is_one_line_on_the_command_line(tmp_path):
    """The first-time plugin author's failure (issue 28): no traceback, the method named."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "half_done.py").write_text(
        textwrap.dedent(
            """
            from fewbench.plugin import Dataset, hookimpl

            class HalfDone(Dataset):
                name = "half_done"
                description = "a dataset that forgot split_sizes"
                needs_files = False

            @hookimpl
            def fewbench_register_datasets(register):
                register(HalfDone)
            """
        )
    )
    info = site / "half_done-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: half-done\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fewbench]\nhalf_done = half_done\n")
    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\ndatasets: [half_done]\ntasks: {ways: 2, shots: 1, query: 1}\n"
        "backbones: [{name: mlp, hidden: [4]}]\nlearners: [maml]\n"
        "train: {iterations: 1}\neval: {episodes: 1}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "fewbench", "run", str(suite), "--dry-run"],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(site),
             "FEWBENCH_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "'half_done'" in result.stderr and "split_sizes()" in result.stderr


# -- the old module paths ------------------------------------------------------------------
@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_is_the_new_module_with_a_warning(old):
    new = MOVED_MODULES[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # pickling and python -m still see its real place


def test_old_names_of_the_three_modules_that_became_packages():
    with pytest.warns(DeprecationWarning, match="fewbench.data.ClassPool moved"):
        from fewbench.data import ClassPool
    assert ClassPool is plugin.ClassPool
    with pytest.warns(DeprecationWarning, match="fewbench.suite.check_suite moved"):
        from fewbench.suite import check_suite
    from fewbench.suite.check import check_suite as new_check_suite

    assert check_suite is new_check_suite
    from fewbench.cli import main  # the console script's entry point, not deprecated
    from fewbench.cli.parser import main as new_main

    assert main is new_main
    with pytest.warns(DeprecationWarning, match="fewbench.cli.build_parser moved"):
        from fewbench.cli import build_parser  # noqa: F401
    with pytest.raises(ImportError):
        from fewbench.data import no_such_name  # noqa: F401


def test_importing_a_submodule_does_not_load_the_old_module_it_replaced():
    """``from fewbench.data import root`` probes the package's attributes first: the forwarder
    must leave submodule names to the import system, not import fewbench.plugin.dataset (and
    with it torch, which ``fewbench data list`` must not load)."""
    code = (
        "import sys, warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "from fewbench.data import root\n"
        "from fewbench.suite import grid\n"
        "from fewbench.cli import plugin_index\n"
        "print(root.__name__, grid.__name__, plugin_index.__name__,"
        " 'fewbench.plugin.dataset' in sys.modules, 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.split() == [
        "fewbench.data.root",
        "fewbench.suite.grid",
        "fewbench.cli.plugin_index",
        "False",
        "False",
    ]


def test_old_paths_warn_in_a_fresh_process_as_a_user_sees_them():
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "try:\n    from fewbench.learner import Learner\n"
        "except DeprecationWarning as w:\n    print('warned:', w)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert "warned: fewbench.learner moved to fewbench.plugin.learner" in result.stdout


def test_the_new_layout_imports_without_deprecation_warnings():
    """The core and the built-in plugins use the new paths only."""
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "import fewbench.api, fewbench.cli.parser, fewbench.running.runner, fewbench.reports.table\n"
        "from fewbench.registry import Registry; Registry()\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


def test_no_module_is_left_at_the_top_level_but_the_front_door():
    """A newcomer can tell from ``ls fewbench`` where a thing lives."""
    top = sorted(p.stem for p in (REPO / "fewbench").glob("*.py"))
    assert top == ["__init__", "__main__", "_moved", "api", "errors", "registry", "version"]
    packages = sorted(
        p.name for p in (REPO / "fewbench").iterdir() if (p / "__init__.py").is_file()
    )
    assert packages == [
        "cli", "data", "episodes", "methods", "models", "plugin", "reports", "running",
        "storage", "suite",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for package in packages:
            assert importlib.import_module(f"fewbench.{package}").__doc__, package
