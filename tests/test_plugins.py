"""Plugin discovery: built-ins through entry points, a third-party distribution, conflicts."""

from __future__ import annotations

import shutil
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import run_cli

from fewbench.errors import PluginError
from fewbench.plugin.hookspecs import hookimpl
from fewbench.registry import Registry

HERE = Path(__file__).resolve().parent


def install_demo_plugin(site: Path) -> Path:
    """Lay out the demo plugin as an installed distribution: module + *.dist-info."""
    shutil.copy(HERE / "thirdparty" / "fewbench_demo_plugin.py", site)
    info = site / "fewbench_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fewbench-demo-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text("[fewbench]\ndemo = fewbench_demo_plugin\n")
    return site


def test_builtins_come_through_the_entry_point_group(registry):
    assert registry.names("dataset") == [
        "chestx",
        "cifar_fs",
        "cropdiseases",
        "cub",
        "eurosat",
        "fc100",
        "halfcheetah_dir",
        "halfcheetah_vel",
        "isic",
        "miniimagenet",
        "navigation2d",
        "omniglot",
        "sinusoid",
        "tieredimagenet",
    ]  # fmt: skip  (environments register as datasets of the grid)
    assert registry.names("backbone") == [
        "conv4", "mlp", "open_clip", "resnet10", "resnet12", "resnet18", "timm", "wrn28_10",
    ]  # fmt: skip
    assert set(registry.names("learner")) >= {
        "maml", "fomaml", "finetune", "protonet", "matchingnet", "relationnet", "r2d2", "rfs",
        "meta_baseline", "simpleshot", "logistic_probe", "knn", "tim", "pt_map", "laplacianshot",
        "bd_cspn", "feat", "metaoptnet_svm", "finetune_pmf",
    }  # fmt: skip
    for kind in ("dataset", "backbone", "learner"):
        for item in registry.items(kind):
            assert item.provider == "fewbench"
            assert item.description


def test_core_never_imports_the_builtin_plugins():
    for path in (HERE.parent / "fewbench").rglob("*.py"):
        assert "fewbench_plugins" not in path.read_text(), path


def test_third_party_distribution_is_discovered(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_demo_plugin(tmp_path)))
    registry = Registry()
    item = registry.get("learner", "protonet_demo")
    assert item.provider == "fewbench-demo-plugin"
    assert "meta_batch_size" in item.params.params
    sys.modules.pop("fewbench_demo_plugin", None)


def test_plugins_command_lists_the_third_party_learner_beside_builtins(tmp_path):
    result = run_cli("plugins", env={"PYTHONPATH": str(install_demo_plugin(tmp_path))})
    assert result.returncode == 0, result.stderr
    assert "protonet_demo" in result.stdout and "[fewbench-demo-plugin]" in result.stdout
    assert "maml" in result.stdout and "[fewbench]" in result.stdout


def test_third_party_learner_runs_in_a_suite_and_a_diverging_cell_is_contained(
    tmp_path, data_root, cache_dir
):
    (tmp_path / "site").mkdir()
    site = install_demo_plugin(tmp_path / "site")
    suite = tmp_path / "demo.yaml"
    suite.write_text(
        textwrap.dedent("""\
        name: demo
        datasets: [{name: omniglot}]
        tasks: {ways: 5, shots: 1, query: 1}
        backbones: [{name: conv4, hidden: 16}]
        learners: [{name: diverging_demo}, {name: crashing_demo, error: [bug, oom]}, {name: protonet_demo}]
        train: {iterations: 6, validate_every: 3, val_episodes: 5, log_every: 1}
        eval: {episodes: 10, query: 5}
    """)
    )
    out = tmp_path / "run"
    result = run_cli(
        "run",
        str(suite),
        "--out",
        str(out),
        "--data-root",
        str(data_root),
        "--no-progress",
        env={"PYTHONPATH": str(site), "FEWBENCH_CACHE": str(cache_dir)},
    )
    assert result.returncode == 1, result.stderr  # some cells failed, the suite went on
    assert "diverging_demo" in result.stderr and "nan" in result.stderr.lower()
    db = sqlite3.connect(out / "results.sqlite")
    status = dict(db.execute("SELECT learner, status FROM cells"))
    assert status == {
        "diverging_demo": "failed",
        "crashing_demo[error=bug]": "failed",
        "crashing_demo[error=oom]": "failed",
        "protonet_demo": "done",
    }
    errors = dict(db.execute("SELECT learner, error FROM cells"))
    assert errors["crashing_demo[error=bug]"].startswith(
        "RuntimeError: demo plugin bug (at iteration 3)"
    )
    # The hint comes from the learner (its own parameters), not from the core.
    assert "(lower meta_batch_size)" in errors["crashing_demo[error=oom]"]
    curve = db.execute(
        "SELECT MAX(c.iteration) FROM curve c JOIN cells x ON x.id = c.cell_id "
        "WHERE x.learner = 'crashing_demo[error=bug]'"
    ).fetchone()[0]
    assert curve == 2  # the partial curve up to the last good iteration is kept
    assert "crashing_demo" in result.stderr and "--retry-failed" in result.stderr
    assert (
        db.execute(
            "SELECT COUNT(*) FROM episodes e JOIN cells c ON c.id = e.cell_id "
            "WHERE c.learner = 'protonet_demo'"
        ).fetchone()[0]
        == 10
    )
    # The failed cell keeps its reason and its partial curve.
    error = db.execute("SELECT error FROM cells WHERE learner = 'diverging_demo'").fetchone()[0]
    assert "iteration 2" in error
    assert (
        db.execute(
            "SELECT COUNT(*) FROM curve c JOIN cells x ON x.id = c.cell_id "
            "WHERE x.learner = 'diverging_demo'"
        ).fetchone()[0]
        >= 1
    )


class _Clash:
    """A plugin object registering a learner under a taken name."""

    @hookimpl
    def fewbench_register_learners(self, register):
        class Impostor:
            name = "maml"
            description = "not the real one"
            params = {}

        register(Impostor)


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    with pytest.raises(PluginError) as info:
        Registry(extra_plugins=[_Clash()])
    message = str(info.value)
    assert "learner 'maml' is registered twice" in message
    assert "fewbench (fewbench_plugins.learners.maml.MAML)" in message and "Impostor" in message


def test_unknown_name_lists_known_names_and_suggests(registry):
    with pytest.raises(PluginError) as info:
        registry.get("learner", "fomamll")
    assert "did you mean 'fomaml'" in str(info.value)
    assert "finetune, finetune_pmf, fomaml" in str(info.value)
