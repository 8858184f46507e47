"""Batched on-device augmentations: each image transformed on its own, checked against a loop."""

from __future__ import annotations

import pytest
import torch

from fewbench.methods import augment
from fewbench.plugin.dataset import ClassPool, LabelledBatch
from fewbench.plugin.learner import Learner
from fewbench.running.training import train
from fewbench.suite.cell import Cell
from fewbench.suite.loading import TRAIN


def images(count=64, channels=3, size=12, seed=0) -> torch.Tensor:
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_flip_flips_the_images_it_draws_and_no_others():
    x = images()
    out = augment.flip(x, torch.Generator().manual_seed(1))
    drawn = torch.rand(len(x), generator=torch.Generator().manual_seed(1)) < 0.5
    for i in range(len(x)):
        assert torch.equal(out[i], x[i].flip(-1) if drawn[i] else x[i])
    assert 0 < drawn.sum() < len(x)


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = images(size=16)
    out = augment.crop(x, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    pad = 2
    top = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
    left = torch.randint(0, 2 * pad + 1, (len(x),), generator=g)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(len(x)):
        expected = padded[i, :, top[i] : top[i] + 16, left[i] : left[i] + 16]
        assert torch.equal(out[i], expected)
    assert len({(int(a), int(b)) for a, b in zip(top, left, strict=True)}) > 5


def test_rotate90_turns_each_image_by_its_own_quarter_turns():
    x = images()
    out = augment.rotate90(x, torch.Generator().manual_seed(3))
    turns = torch.randint(0, 4, (len(x),), generator=torch.Generator().manual_seed(3))
    for i in range(len(x)):
        assert torch.equal(out[i], torch.rot90(x[i], int(turns[i]), dims=(-2, -1)))
    assert set(turns.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="square"):
        augment.rotate90(torch.zeros(2, 1, 4, 5), torch.Generator())


def test_an_episode_batch_keeps_its_shapes_and_labels():
    pool = ClassPool(torch.randint(0, 256, (10, 6, 1, 8, 8), dtype=torch.uint8))
    batch = pool.sample_episodes(3, 4, 1, 2, torch.Generator().manual_seed(0))
    out = augment.augment_batch(batch, ["flip", "crop", "rotate90"], torch.Generator())
    assert out.support_x.shape == batch.support_x.shape
    assert out.query_x.shape == batch.query_x.shape
    assert torch.equal(out.support_y, batch.support_y) and torch.equal(out.query_y, batch.query_y)
    assert not torch.equal(out.query_x, batch.query_x)
    assert augment.augment_batch(batch, [], torch.Generator()) is batch


def test_suite_names_match_the_functions():
    assert set(TRAIN["augment"].choices) == set(augment.FUNCTIONS)


class RecordingLearner(Learner):
    """Keeps the training batches it is given; learns nothing."""

    name = "recording"
    batch_kind = "examples"

    def __init__(self):
        super().__init__()
        self.batches: list[LabelledBatch] = []

    def batch_size(self):
        return 8

    def train_step(self, batch, iteration):
        self.batches.append(batch)
        return 0.0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def train_batches(augmentations: list[str]) -> list[LabelledBatch]:
    fixed = torch.Generator().manual_seed(0)
    pool = ClassPool(torch.randint(0, 256, (10, 6, 1, 8, 8), dtype=torch.uint8, generator=fixed))
    config = {
        "dataset": {"name": "toy"},
        "backbone": {"name": "none"},
        "learner": {"name": "recording"},
        "seed": 0,
        "tasks": {"ways": 2, "shots": 1, "query": 1},
        "train": {
            "iterations": 3, "validate_every": 10, "val_episodes": 0, "log_every": 1,
            "checkpoint_every": 10, "checkpoint_minutes": 5.0, "augment": augmentations,
        },
        "eval": {"query": 1, "seed": 0, "chunk": 5},
    }  # fmt: skip
    learner = RecordingLearner()
    cell = Cell.from_config(config, "c")
    train(
        learner, {"train": pool}, cell, identity=("t",), device=torch.device("cpu"),
        checkpoint_dir=None, progress=False,
    )  # fmt: skip
    return learner.batches


def test_the_training_loop_augments_the_same_way_every_run():
    plain, first, second = (
        train_batches([]),
        train_batches(["flip", "crop"]),
        train_batches(["flip", "crop"]),
    )
    for a, b, c in zip(plain, first, second, strict=True):
        assert torch.equal(a.y, b.y)  # the same examples were drawn ...
        assert not torch.equal(a.x, b.x)  # ... and transformed
        assert torch.equal(b.x, c.x)  # identically in every run
