"""Cross-domain evaluation (``eval.dataset``): train on one dataset, test on another's test
classes, as Chen et al. (2019) test mini-ImageNet models on CUB. Checked on generated
datasets in the official layouts, and Omniglot's training classes against a generated
dataset whose images have another shape."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from helpers import run_cli
from stored import checked_against
from test_cub import fake_cub
from test_miniimagenet import make_images

import fewbench
from fewbench.data import root as datastore
from fewbench.data.check import expand_and_check as expand
from fewbench.plugin.task_types import CLASSIFICATION
from fewbench.registry import Registry
from fewbench.running.worker import DatasetCache, source_of_test_episodes
from fewbench.suite.loading import load_suite_file
from fewbench_plugins.datasets.cub import CUB

SUITE = """\
name: cross
datasets: [{{name: {train}, image_size: 28}}]
tasks: {{ways: 2, shots: 1, query: 1}}
backbones: [{{name: conv4, hidden: 4}}]
learners: [{{name: protonet, meta_batch_size: 2}}]
train: {{iterations: 2, validate_every: 2, val_episodes: 2}}
eval: {{episodes: 4, query: 1, dataset: {{name: {test}, image_size: 28}}}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory, data_root):
    """mini-ImageNet and CUB generated in their layouts, and the real Omniglot beside them."""
    base = tmp_path_factory.mktemp("cross")
    root = base / "root"
    make_images(root)
    archive = base / "CUB_200_2011.tgz"
    archive.write_bytes(fake_cub())

    def images_folder_exists(cls, folder):  # the real check wants all 11,788 images
        return [] if (folder / "CUB_200_2011" / "images").is_dir() else ["missing"]

    datastore.import_path(checked_against(CUB, archive, verify=images_folder_exists), root, archive)
    (root / "omniglot").symlink_to(
        (data_root / "omniglot").resolve()
    )  # FEWBENCH_DATA may be relative
    return root


def run(tmp_path, root, cache_dir, train: str, test: str, *extra: str):
    suite = tmp_path / "cross.yaml"
    suite.write_text(SUITE.format(train=train, test=test))
    out = tmp_path / "run"
    done = run_cli(
        "run", str(suite), "--data-root", str(root), "--out", str(out), "--no-progress",
        "--device", "cpu", *extra, env={"FEWBENCH_CACHE": str(cache_dir)},
    )  # fmt: skip
    return done, out


def test_a_model_trained_on_one_dataset_is_tested_on_anothers_test_classes(
    tmp_path, root, cache_dir
):
    done, out = run(tmp_path, root, cache_dir, "miniimagenet", "cub")
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(out / "results.sqlite")
    ((label, status),) = db.execute("SELECT label, status FROM cells").fetchall()
    assert (label, status) == ("miniimagenet->cub/2w1s/conv4/protonet/seed0", "done")
    stored = [v for (v,) in db.execute("SELECT value FROM episodes ORDER BY episode")]
    model = fewbench.load_learner(out)
    assert model.cell.eval.dataset == {"name": "cub", "image_size": 28, "normalize": True}
    assert list(model.evaluate(root)) == stored  # the same CUB episodes, recomputed


def test_the_test_episodes_come_from_the_other_datasets_test_split(root, tmp_path):
    registry = Registry()
    suite = load_suite_file(_suite(tmp_path, "miniimagenet", "cub"))
    (cell,) = expand(suite, registry, root).cells
    datasets = DatasetCache(registry, root, tmp_path / "cache", torch.device("cpu"))
    _, own = datasets.get(cell)
    source, identity = source_of_test_episodes(
        cell, datasets, own, ("miniimagenet",), CLASSIFICATION
    )
    cub_test = CUB(image_size=28, normalize=True).load(root, tmp_path / "cache")["test"]
    assert source.num_classes == cub_test.num_classes != own["test"].num_classes
    assert torch.equal(source.images, cub_test.images)
    assert identity[0] == "cub"


def test_images_of_another_shape_are_refused_with_both_shapes(tmp_path, root, cache_dir):
    done, out = run(tmp_path, root, cache_dir, "omniglot", "cub")
    assert done.returncode == 1
    (error,) = sqlite3.connect(out / "results.sqlite").execute("SELECT error FROM cells").fetchone()
    assert "eval.dataset cub: its examples are 3x28x28 (channels x height x width), " in error
    assert "omniglot's are 1x28x28" in error


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("dataset: {name: cbu}", "eval.dataset.name: unknown dataset 'cbu' (did you mean 'cub'?)"),
        ("dataset: {name: cub, size: 3}", "eval.dataset.size: dataset 'cub' has no parameter"),
        ("dataset: {name: cub, image_size: [28, 32]}", "one test dataset per suite"),
    ],
)
def test_a_wrong_test_dataset_is_one_line_before_anything_trains(tmp_path, root, change, message):
    suite = _suite(tmp_path, "miniimagenet", "cub")
    suite.write_text(suite.read_text().replace("dataset: {name: cub, image_size: 28}", change))
    done = run_cli("run", str(suite), "--dry-run", "--data-root", str(root))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_test_dataset_must_hold_the_test_episodes(tmp_path, root):
    suite = _suite(tmp_path, "miniimagenet", "cub")  # CUB's generated test split: 2 classes
    suite.write_text(suite.read_text().replace("ways: 2", "ways: 3"))
    done = run_cli("run", str(suite), "--dry-run", "--data-root", str(root))
    assert done.returncode == 2
    assert "3-way episodes need 3 classes, but the 'test' split of cub (eval.dataset) has 2" in (
        done.stderr
    )


def test_an_override_cannot_change_the_test_dataset(tmp_path, root):
    suite = _suite(tmp_path, "miniimagenet", "cub")
    suite.write_text(
        suite.read_text() + "overrides:\n  - when: {shots: 1}\n    set: {eval.dataset: cub}\n"
    )
    done = run_cli("run", str(suite), "--dry-run", "--data-root", str(root))
    assert done.returncode == 2 and "eval.dataset is set once for the whole suite" in done.stderr


def _suite(tmp_path, train: str, test: str):
    path = tmp_path / "cross.yaml"
    path.write_text(SUITE.format(train=train, test=test))
    return path
