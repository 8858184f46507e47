"""Prototypical and matching networks: their equations checked by hand on tiny inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fewbench.errors import FewbenchError
from fewbench.plugin.backbone import Backbone
from fewbench.plugin.dataset import EpisodeBatch
from fewbench.plugin.learner import Learner, LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench.plugin.task_types import REGRESSION
from fewbench_plugins.backbones.standard import MLP, Conv4
from fewbench_plugins.learners.matchingnet import MatchingNet
from fewbench_plugins.learners.protonet import ProtoNet


class Identity(Backbone):
    """A linear map set to the identity: distances can be worked out by hand."""

    name = "identity"

    def build_features(self, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        width = input_shape[0]
        linear = nn.Linear(width, width)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(width))
            linear.bias.zero_()
        return linear, width


def make(cls: type[Learner], backbone: Backbone, input_shape=(2,), ways=2, **params) -> Learner:
    torch.manual_seed(0)
    learner = cls(**{**ParamSet.of(cls).defaults(), **params})
    learner.setup(
        LearnerContext(
            backbone=backbone,
            input_shape=input_shape,
            ways=ways,
            shots=2,
            query=2,
            num_train_classes=6,
            device=torch.device("cpu"),
        )
    )
    return learner


def batch_of(support: list, support_y: list, query: list, ways: int = 2) -> EpisodeBatch:
    """One episode from lists of points (query labels are unused by the hand checks)."""
    q = torch.tensor([query], dtype=torch.float32)
    return EpisodeBatch(
        torch.tensor([support], dtype=torch.float32),
        torch.tensor([support_y]),
        q,
        torch.zeros(q.shape[:2], dtype=torch.long),
        ways,
    )


def toy_episodes(tasks: int, seed: int, ways: int = 3, shots: int = 2, query: int = 3):
    """Episodes of 6 Gaussian classes in 8 dimensions (overlapping: an untrained network
    gets about 80% right)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, 8, generator=torch.Generator().manual_seed(99))
    classes = torch.stack([torch.randperm(6, generator=g)[:ways] for _ in range(tasks)])

    def draw(per_class: int) -> torch.Tensor:
        means = centres[classes].repeat_interleave(per_class, dim=1)  # [T, N*per, 8]
        return means + torch.randn(means.shape, generator=g)

    labels = torch.arange(ways)
    return EpisodeBatch(
        draw(shots),
        labels.repeat_interleave(shots).expand(tasks, -1),
        draw(query),
        labels.repeat_interleave(query).expand(tasks, -1),
        ways,
    )


# Two classes of two 2-D points: prototypes (1, 0) and (0, 3).
SUPPORT = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]]
SUPPORT_Y = [0, 0, 1, 1]


def test_protonet_logits_are_negative_squared_distances_to_class_means():
    learner = make(ProtoNet, Identity())
    outputs = learner.predict(batch_of(SUPPORT, SUPPORT_Y, [[1.0, 1.0], [3.0, 3.0]]))
    # (1, 1): 0 + 1 = 1 from (1, 0), 1 + 4 = 5 from (0, 3); (3, 3): 4 + 9 and 9 + 0.
    torch.testing.assert_close(outputs, torch.tensor([[[-1.0, -5.0], [-13.0, -9.0]]]))


def test_protonet_cosine_logits_are_scaled_cosines_to_class_means():
    learner = make(ProtoNet, Identity(), distance="cosine", cosine_scale=3.0)
    outputs = learner.predict(batch_of(SUPPORT, SUPPORT_Y, [[2.0, 1.0]]))
    # (2, 1) against (1, 0): 2 / sqrt(5); against (0, 3): 3 / (3 sqrt(5)).
    expected = 3.0 * torch.tensor([[[2 / math.sqrt(5), 1 / math.sqrt(5)]]])
    torch.testing.assert_close(outputs, expected)
    assert learner.network.scale.requires_grad  # the scale is learnt


def test_protonet_takes_the_ways_of_the_batch_and_keeps_episodes_apart():
    learner = make(ProtoNet, MLP(hidden=[4]), input_shape=(8,), ways=2)
    batch = toy_episodes(3, seed=1, ways=3)  # 3-way batches although the test ways are 2
    together = learner.predict(batch)
    assert together.shape == (3, 9, 3)
    for t in range(3):
        alone = EpisodeBatch(
            batch.support_x[t : t + 1],
            batch.support_y[t : t + 1],
            batch.query_x[t : t + 1],
            batch.query_y[t : t + 1],
            3,
        )
        torch.testing.assert_close(together[t : t + 1], learner.predict(alone))


def test_protonet_halves_the_learning_rate_every_lr_halve_every_episodes():
    learner = make(ProtoNet, MLP(hidden=[4]), input_shape=(8,), lr_halve_every=4)
    assert [learner.learning_rate(i) for i in (1, 4, 5, 8, 9)] == [
        0.001,
        0.001,
        0.0005,
        0.0005,
        0.00025,
    ]
    learner.config["meta_batch_size"] = 2  # episodes, not steps, are counted
    assert [learner.learning_rate(i) for i in (2, 3, 5)] == [0.001, 0.0005, 0.00025]
    learner.config["lr_halve_every"] = 0
    assert learner.learning_rate(10_000) == 0.001
    learner.config["lr_halve_every"] = 4
    learner.train_step(toy_episodes(2, seed=0), 5)
    assert learner.optimizer.param_groups[0]["lr"] == 0.0005 / 2  # 8 episodes before


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_protonet_training_lowers_the_loss(distance):
    learner = make(ProtoNet, MLP(hidden=[16]), input_shape=(8,), distance=distance, lr=0.01)
    batch = toy_episodes(4, seed=0)
    losses = [learner.train_step(batch, i) for i in range(1, 21)]
    assert losses[-1] < 0.5 * losses[0]


def test_matchingnet_attention_is_the_softmax_of_cosine_similarities():
    support = [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 1.0]]
    learner = make(MatchingNet, Identity())
    batch = batch_of(support, SUPPORT_Y, [[2.0, 1.0]])
    # cos((2, 1), x_i) for the four support points
    r5, r10 = math.sqrt(5), math.sqrt(10)
    cosines = [2 / r5, 3 / r10, 1 / r5, -1 / r10]
    weights = [math.exp(c) / sum(math.exp(d) for d in cosines) for c in cosines]
    attention = learner.attention(batch)
    torch.testing.assert_close(attention, torch.tensor([[weights]]))
    # The prediction is the attention-weighted sum of the one-hot labels (Eq. 1).
    probabilities = learner.predict(batch).exp()
    expected = torch.tensor([[[weights[0] + weights[1], weights[2] + weights[3]]]])
    torch.testing.assert_close(probabilities, expected)


def test_matchingnet_scaled_attention_stays_finite_where_a_class_underflows():
    support = [[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, 0.1]]
    learner = make(MatchingNet, Identity(), cosine_scale=200.0)
    log_p = learner.predict(batch_of(support, SUPPORT_Y, [[1.0, 0.0]]))
    assert torch.isfinite(log_p).all()
    # log sum over class 1 of a_i: cosines -1 and about -0.995 against 1 and about 0.995.
    cos = 1 / math.sqrt(1.01)
    expected = math.log(math.exp(-200) + math.exp(-200 * cos)) - math.log(
        math.exp(200) + math.exp(200 * cos)
    )
    assert log_p[0, 0, 1].item() == pytest.approx(expected, rel=1e-4)


def test_matchingnet_with_full_context_embeddings_has_the_right_shapes_and_trains():
    learner = make(
        MatchingNet, Conv4(hidden=4, pool="stride"), input_shape=(1, 14, 14), ways=3, fce=True
    )
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(3)
    batch = EpisodeBatch(
        torch.rand(2, 6, 1, 14, 14, generator=g),
        labels.repeat_interleave(2).expand(2, -1),
        torch.rand(2, 9, 1, 14, 14, generator=g),
        labels.repeat_interleave(3).expand(2, -1),
        3,
    )
    assert learner.attention(batch).shape == (2, 9, 6)
    log_p = learner.predict(batch)
    assert log_p.shape == (2, 9, 3)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 9))
    before = {k: v.clone() for k, v in learner.network.fce.state_dict().items()}
    assert math.isfinite(learner.train_step(batch, 1))
    after = learner.network.fce.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # both LSTMs learn
    learner.config["fce_steps"] = 2
    assert learner.predict(batch).shape == (2, 9, 3)


@pytest.mark.parametrize("fce, scale", [(False, 1.0), (False, 10.0), (True, 10.0)])
def test_matchingnet_training_lowers_the_loss(fce, scale):
    learner = make(
        MatchingNet, MLP(hidden=[16]), input_shape=(8,), fce=fce, cosine_scale=scale, lr=0.01
    )
    batch = toy_episodes(4, seed=0)
    losses = [learner.train_step(batch, i) for i in range(1, 21)]
    # Unscaled cosine attention stays soft: its loss cannot fall far (0.91 -> 0.69 here).
    assert losses[-1] < (0.8 if scale == 1.0 else 0.5) * losses[0]


@pytest.mark.parametrize(
    "cls, params",
    [
        (ProtoNet, {"distance": "euclidean"}),
        (ProtoNet, {"distance": "cosine"}),
        (MatchingNet, {"fce": False}),
        (MatchingNet, {"fce": True}),
    ],
)
def test_state_dict_round_trip_gives_identical_predictions(cls, params):
    backbone = Conv4(hidden=4, pool="stride")
    trained = make(cls, backbone, input_shape=(1, 14, 14), **params)
    g = torch.Generator().manual_seed(5)
    labels = torch.arange(2)
    batch = EpisodeBatch(
        torch.rand(2, 4, 1, 14, 14, generator=g),
        labels.repeat_interleave(2).expand(2, -1),
        torch.rand(2, 4, 1, 14, 14, generator=g),
        labels.repeat_interleave(2).expand(2, -1),
        2,
    )
    for i in range(1, 4):
        trained.train_step(batch, i)
    state = copy.deepcopy(trained.state_dict())  # as a checkpoint would hold it
    torch.manual_seed(1)
    restored = cls(**{**ParamSet.of(cls).defaults(), **params})
    restored.setup(trained.ctx)
    assert not torch.equal(restored.predict(batch), trained.predict(batch))
    restored.load_state_dict(state)
    assert torch.equal(restored.predict(batch), trained.predict(batch))
    # The optimizer's state came along: the next step is the same step.
    assert restored.train_step(batch, 4) == trained.train_step(batch, 4)
    assert torch.equal(restored.predict(batch), trained.predict(batch))


@pytest.mark.parametrize("cls", [ProtoNet, MatchingNet])
def test_regression_tasks_are_refused(cls):
    learner = cls(**ParamSet.of(cls).defaults())
    ctx = LearnerContext(
        backbone=MLP(hidden=[4]),
        input_shape=(1,),
        ways=1,
        shots=5,
        query=5,
        num_train_classes=1,
        device=torch.device("cpu"),
        task_type=REGRESSION,
    )
    with pytest.raises(FewbenchError, match="cannot learn regression tasks"):
        learner.setup(ctx)
