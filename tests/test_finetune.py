"""Pretrain + fine-tune: batched heads equal heads fitted one episode at a time."""

from __future__ import annotations

import pytest
import torch

from fewbench.plugin.dataset import EpisodeBatch, LabelledBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench_plugins.backbones.standard import Conv4
from fewbench_plugins.learners.finetune import FineTune


def make(head: str) -> FineTune:
    torch.manual_seed(0)
    learner = FineTune(**{**ParamSet.of(FineTune).defaults(), "head": head, "finetune_steps": 20})
    learner.setup(
        LearnerContext(
            backbone=Conv4(hidden=8, pool="stride"),
            input_shape=(1, 14, 14),
            ways=3,
            shots=2,
            query=2,
            num_train_classes=7,
            device=torch.device("cpu"),
        )
    )
    return learner


def episodes(tasks: int) -> EpisodeBatch:
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(3)
    return EpisodeBatch(
        torch.rand(tasks, 6, 1, 14, 14, generator=g),
        labels.repeat_interleave(2).expand(tasks, -1),
        torch.rand(tasks, 9, 1, 14, 14, generator=g),
        labels.repeat_interleave(3).expand(tasks, -1),
        3,
    )


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_batched_heads_equal_one_at_a_time(head):
    learner = make(head)
    batch = episodes(4)
    together = learner.predict(batch)
    for t in range(4):
        alone = learner.predict(
            EpisodeBatch(
                batch.support_x[t : t + 1],
                batch.support_y[t : t + 1],
                batch.query_x[t : t + 1],
                batch.query_y[t : t + 1],
                3,
            )
        )
        torch.testing.assert_close(together[t : t + 1], alone, rtol=1e-4, atol=1e-5)


def test_fitting_the_head_separates_the_support_set():
    learner = make("linear")
    batch = episodes(2)
    support_as_query = EpisodeBatch(
        batch.support_x, batch.support_y, batch.support_x, batch.support_y, 3
    )
    learner.config["finetune_steps"] = 300
    learner.config["finetune_lr"] = 0.5
    outputs = learner.predict(support_as_query)
    assert (outputs.argmax(-1) == batch.support_y).float().mean() == 1.0


def test_pretraining_step_lowers_the_loss():
    learner = make("cosine")
    g = torch.Generator().manual_seed(0)
    batch = LabelledBatch(torch.rand(14, 1, 14, 14, generator=g), torch.arange(7).repeat(2))
    losses = [learner.train_step(batch, i) for i in range(30)]
    assert losses[-1] < losses[0]
