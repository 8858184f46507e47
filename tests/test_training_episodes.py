"""Training episodes that differ from test episodes (tasks.train_ways / train_shots /
train_query): checked, part of a cell's identity only when set, and what training draws."""

from __future__ import annotations

import pytest
import torch

from fewbench.data.check import expand_and_check as expand
from fewbench.errors import SuiteError
from fewbench.plugin.dataset import ClassPool
from fewbench.suite.cell import Cell
from fewbench.suite.loading import parse_yaml

BASE = """\
name: t
datasets: [{name: omniglot}]
tasks: {ways: 5, shots: 1, query: 2}
backbones: [{name: conv4, hidden: 8}]
learners: [protonet]
"""


def cells(text: str, registry, data_root):
    return expand(parse_yaml(text, "t.yaml"), registry, data_root).cells


def test_training_episodes_default_to_the_test_episodes_and_keep_cell_ids(registry, data_root):
    (plain,) = cells(BASE, registry, data_root)
    assert plain.tasks.training == (5, 1, 2)
    assert "train_ways" not in plain.config["tasks"]  # unset: ids as before the setting existed
    (wide,) = cells(
        BASE.replace("query: 2}", "query: 2, train_ways: 60, train_query: 5}"), registry, data_root
    )
    assert wide.tasks.training == (60, 1, 5) and wide.id != plain.id
    assert wide.config["tasks"] == {
        "ways": 5,
        "shots": 1,
        "query": 2,
        "train_ways": 60,
        "train_query": 5,
    }


def test_training_episodes_are_checked_against_the_training_split(registry, data_root):
    with pytest.raises(
        SuiteError,
        match=r"tasks.train_ways: .*5000-way episodes need 5000 classes, but the 'train' split of omniglot has 4112",
    ):
        cells(BASE.replace("query: 2}", "query: 2, train_ways: 5000}"), registry, data_root)
    with pytest.raises(SuiteError, match=r"tasks.train_query: .* 1 shots \+ 20 query"):
        cells(BASE.replace("query: 2}", "query: 2, train_query: 20}"), registry, data_root)
    with pytest.raises(SuiteError, match="tasks.train_ways: must be at least 1"):
        cells(BASE.replace("query: 2}", "query: 2, train_ways: 0}"), registry, data_root)


def test_maml_refuses_training_episodes_of_other_ways(registry, data_root):
    from fewbench.errors import FewbenchError
    from fewbench.plugin.learner import LearnerContext
    from fewbench_plugins.backbones.standard import Conv4
    from fewbench_plugins.learners.maml import MAML

    context = LearnerContext(
        Conv4(hidden=4, pool="stride"), (1, 28, 28), 5, 1, 1, 10, torch.device("cpu"), train_ways=20
    )
    with pytest.raises(FewbenchError, match="training episodes must be 5-way too"):
        MAML(**registry.get("learner", "maml").params.defaults()).setup(context)


def test_the_training_loop_draws_the_training_episodes():
    from fewbench.plugin.learner import Learner
    from fewbench.running.training import train

    class Recording(Learner):
        name = "recording"
        seen: list = []

        def batch_size(self):
            return 2

        def train_step(self, batch, iteration):
            self.seen.append((batch.ways, batch.support_x.shape[1], batch.query_x.shape[1]))
            return 0.0

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    pool = ClassPool(torch.randint(0, 256, (12, 8, 1, 4, 4), dtype=torch.uint8))
    config = {
        "dataset": {"name": "toy"}, "backbone": {"name": "none"}, "learner": {"name": "recording"},
        "seed": 0, "tasks": {"ways": 2, "shots": 1, "query": 1, "train_ways": 6, "train_shots": 2, "train_query": 3},
        "train": {"iterations": 2, "validate_every": 10, "val_episodes": 0},
        "eval": {"query": 1},
    }  # fmt: skip
    learner = Recording()
    train(learner, {"train": pool}, Cell.from_config(config, "c"), identity=("t",),
          device=torch.device("cpu"), checkpoint_dir=None, progress=False)  # fmt: skip
    assert learner.seen == [(6, 12, 18), (6, 12, 18)]  # 6-way, 2 shots and 3 queries per class
