"""Relation networks (plugins/learners/relationnet.py): the relation module, the K-shot
class feature, the MSE loss against one-hot targets, training, state and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fewbench.errors import FewbenchError
from fewbench.plugin.dataset import EpisodeBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench.plugin.task_types import REGRESSION
from fewbench_plugins.backbones.resnets import ResNet12
from fewbench_plugins.backbones.standard import MLP, Conv4
from fewbench_plugins.learners import relationnet
from fewbench_plugins.learners.relationnet import (
    RelationModule,
    RelationNet,
    class_features,
    relation_pairs,
)

SHAPE = (1, 12, 12)  # conv4 with stride-2 convolutions: a 8x1x1 map


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_learner(backbone=None, shape=SHAPE, ways=3, seed=0, task_type=None, **params):
    torch.manual_seed(seed)
    learner = RelationNet(**{**ParamSet.of(RelationNet).defaults(), **params})
    extra = {} if task_type is None else {"task_type": task_type}
    learner.setup(
        LearnerContext(
            backbone=backbone or Conv4(hidden=8, pool="stride"),
            input_shape=shape,
            ways=ways,
            shots=2,
            query=2,
            num_train_classes=10,
            device=torch.device("cpu"),
            **extra,
        )
    )
    return learner


def toy_episodes(tasks=2, ways=3, shots=2, query=2, seed=0, noise=0.3) -> EpisodeBatch:
    """Each class a fixed random image; examples are that image plus noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(tasks, ways, *SHAPE, generator=g)
    labels = torch.arange(ways)

    def draw(count: int) -> torch.Tensor:
        images = prototypes.repeat_interleave(count, dim=1)
        return images + noise * torch.randn(images.shape, generator=g)

    return EpisodeBatch(
        draw(shots),
        labels.repeat_interleave(shots).expand(tasks, -1),
        draw(query),
        labels.repeat_interleave(query).expand(tasks, -1),
        ways,
    )


# -- the relation module -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("map_shape", "padding", "fc_inputs"),
    [
        ((64, 5, 5), "auto", 64),  # the authors' Omniglot: pad 1, 5 -> 2 -> 1
        ((64, 19, 19), "auto", 64 * 3 * 3),  # their mini-ImageNet: pad 0, 17 -> 8 -> 6 -> 3
        ((64, 19, 19), "same", 64 * 4 * 4),  # 19 -> 9 -> 4
        ((64, 5, 5), "same", 64),
        ((640, 5, 5), "auto", 64),  # ResNet-12 on 84x84
        ((8, 2, 2), "auto", 64),  # conv4 stride-2 on 28x28: the last pool is left out
        ((8, 1, 1), "auto", 64),
        # Pads only the short dimension: 20 -> 18 -> 9 -> 7 -> 3 and 4 -> 4 -> 2 -> 2 -> 1.
        ((16, 20, 4), "auto", 64 * 3 * 1),
    ],
)
def test_relation_module_shapes(map_shape, padding, fc_inputs):
    torch.manual_seed(0)
    module = RelationModule(map_shape, channels=64, hidden=8, padding=padding)
    assert module.fc1.in_features == fc_inputs
    assert (module.fc1.out_features, module.fc2.in_features, module.fc2.out_features) == (8, 8, 1)
    assert module.blocks[0].in_channels == 2 * map_shape[0]
    pairs = torch.randn(6, 2 * map_shape[0], *map_shape[1:])
    scores = module(pairs)
    assert scores.shape == (6,)
    assert ((scores > 0) & (scores < 1)).all()  # a sigmoid


def test_relation_module_layout_and_initialisation():
    torch.manual_seed(0)
    module = RelationModule((64, 19, 19), channels=64, hidden=8, padding="auto")
    kinds = [type(m).__name__ for m in module.blocks]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2
    conv = module.blocks[0]
    assert conv.kernel_size == (3, 3) and conv.out_channels == 64 and conv.padding == (0, 0)
    assert module.blocks[1].running_mean is None  # statistics of the batch at hand
    # The authors' weights_init: linear biases 1, weights N(0, 0.01); conv biases 0.
    assert torch.equal(module.fc1.bias, torch.ones(8)) and torch.equal(
        module.fc2.bias, torch.ones(1)
    )
    assert module.fc1.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(conv.bias, torch.zeros(64))
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.05)


def test_a_map_too_small_for_valid_padding_is_refused():
    with pytest.raises(FewbenchError, match="too small for relation_padding: valid"):
        RelationModule((64, 5, 5), channels=64, hidden=8, padding="valid")


# -- class features and pairs ----------------------------------------------------------------
def test_the_class_feature_is_the_sum_of_its_support_maps():
    torch.manual_seed(0)
    support = torch.randn(6, 2, 3, 3)
    labels = torch.tensor([2, 0, 1, 0, 2, 1])  # any order
    summed = class_features(support, labels, 3)
    assert summed.shape == (3, 2, 3, 3)
    torch.testing.assert_close(summed[0], support[1] + support[3])
    torch.testing.assert_close(summed[1], support[2] + support[5])
    torch.testing.assert_close(summed[2], support[0] + support[4])
    torch.testing.assert_close(class_features(support, labels, 3, "mean"), summed / 2)
    one_shot = support[:3]
    torch.testing.assert_close(
        class_features(one_shot, torch.tensor([1, 2, 0]), 3), one_shot[[2, 0, 1]]
    )


def test_pairs_put_the_class_map_first_query_major():
    classes = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 1, 1)
    query = 10 + torch.arange(4.0).view(4, 1, 1, 1).expand(4, 2, 1, 1)
    pairs = relation_pairs(classes, query)
    assert pairs.shape == (12, 4, 1, 1)
    for q in range(4):
        for c in range(3):
            assert pairs[q * 3 + c, :, 0, 0].tolist() == [c, c, 10 + q, 10 + q]


def test_k_shot_scores_use_the_summed_class_maps():
    """The learner's scores equal the relation module applied to (sum of shots, query)."""
    learner = make_learner()
    batch = toy_episodes(tasks=1, shots=3)
    with torch.no_grad():
        learner.embedding.eval()
        learner.relation.eval()
        scores = learner.relation_scores(batch)[0]
        support = learner.embedding(batch.support_x[0])
        query = learner.embedding(batch.query_x[0])
        classes = torch.stack([support[3 * c : 3 * c + 3].sum(0) for c in range(3)])
        # Every (class, query) pair in one batch, query-major (the module's batch norm
        # normalises over the batch of pairs).
        pairs = torch.cat(
            [torch.cat([classes[c], q]).unsqueeze(0) for q in query for c in range(3)]
        )
        by_hand = learner.relation(pairs).view(len(query), 3)
    torch.testing.assert_close(scores, by_hand)


# -- the loss ----------------------------------------------------------------------------
def test_the_loss_is_the_mse_against_one_hot_targets():
    learner = make_learner()
    scores = torch.tensor([[[0.9, 0.2, 0.1], [0.3, 0.6, 0.0]]])  # [T=1, NQ=2, ways=3]
    labels = torch.tensor([[0, 2]])
    # (0.9-1)^2 + 0.2^2 + 0.1^2 + 0.3^2 + 0.6^2 + (0-1)^2 = 0.01+0.04+0.01+0.09+0.36+1 = 1.51
    assert learner.loss(scores, labels).item() == pytest.approx(1.51 / 6)


def test_a_train_step_returns_the_mse_of_the_scores():
    learner = make_learner(grad_clip=0.0)
    batch = toy_episodes()
    state = copy.deepcopy(learner.state_dict())
    learner.embedding.train()
    learner.relation.train()
    with torch.no_grad():
        scores = learner.relation_scores(batch)
    targets = nn.functional.one_hot(batch.query_y, 3).float()
    expected = ((scores - targets) ** 2).mean().item()
    learner.load_state_dict(state)
    assert learner.train_step(batch, 1) == pytest.approx(expected, rel=1e-5)


# -- training ------------------------------------------------------------------------------
def test_training_reduces_the_loss_on_a_toy_problem():
    learner = make_learner(lr=0.01)
    fixed = toy_episodes(tasks=2, seed=0)
    before = learner.loss(learner.predict(fixed), fixed.query_y).item()
    losses = [learner.train_step(toy_episodes(tasks=2, seed=i), i) for i in range(1, 41)]
    after = learner.loss(learner.predict(fixed), fixed.query_y).item()
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert after < 0.6 * before
    predictions = learner.predict(toy_episodes(tasks=4, seed=1000))
    accuracy = (predictions.argmax(-1) == toy_episodes(tasks=4, seed=1000).query_y).float().mean()
    assert accuracy > 0.6  # chance is 1/3


def test_the_learning_rate_halves_every_100000_episodes():
    learner = make_learner()
    assert learner.learning_rate(1) == 0.001
    assert learner.learning_rate(100_000) == 0.001
    assert learner.learning_rate(100_001) == 0.0005
    assert learner.learning_rate(200_001) == 0.00025
    batched = make_learner(meta_batch_size=4)
    assert batched.learning_rate(25_000) == 0.001 and batched.learning_rate(25_001) == 0.0005
    assert make_learner(lr_halve_every=0).learning_rate(10**6) == 0.001
    learner.train_step(toy_episodes(), 100_001)
    assert learner.optimizer.param_groups[0]["lr"] == 0.0005


def test_gradients_are_clipped_per_network():
    learner = make_learner(grad_clip=1e-3)
    learner.train_step(toy_episodes(), 1)
    for network in (learner.embedding, learner.relation):
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in network.parameters()])
        )
        assert norm.item() <= 1e-3 * 1.001


def test_predict_returns_relation_scores_per_query_and_class():
    learner = make_learner(ways=4)
    batch = toy_episodes(tasks=3, ways=4, shots=1, query=5)
    scores = learner.predict(batch)
    assert scores.shape == (3, 20, 4)
    assert ((scores >= 0) & (scores <= 1)).all() and not scores.requires_grad


def test_state_dict_round_trip():
    learner = make_learner(lr=0.01)
    for i in range(1, 3):
        learner.train_step(toy_episodes(seed=i), i)
    state = copy.deepcopy(learner.state_dict())
    other = make_learner(lr=0.01, seed=99)
    batch = toy_episodes(seed=50)
    assert not torch.allclose(other.predict(batch), learner.predict(batch))
    other.load_state_dict(state)
    torch.testing.assert_close(other.predict(batch), learner.predict(batch))
    # The optimizer state came along: the next steps are the same.
    torch.manual_seed(1)
    a = learner.train_step(toy_episodes(seed=3), 3)
    torch.manual_seed(1)
    b = other.train_step(toy_episodes(seed=3), 3)
    assert a == pytest.approx(b, rel=1e-6)
    torch.testing.assert_close(other.predict(batch), learner.predict(batch))


def test_a_resnet_feature_map_works_too():
    backbone = ResNet12(**{**ParamSet.of(ResNet12).defaults(), "widths": [4, 4, 4, 8]})
    learner = make_learner(backbone=backbone, shape=(3, 16, 16), ways=2)
    assert learner.map_shape == (8, 1, 1)
    g = torch.Generator().manual_seed(0)
    batch = EpisodeBatch(
        torch.randn(1, 4, 3, 16, 16, generator=g),
        torch.tensor([[0, 0, 1, 1]]),
        torch.randn(1, 4, 3, 16, 16, generator=g),
        torch.tensor([[0, 0, 1, 1]]),
        2,
    )
    assert torch.isfinite(torch.tensor(learner.train_step(batch, 1)))
    assert learner.predict(batch).shape == (1, 4, 2)


# -- refusals ------------------------------------------------------------------------------
def test_a_task_that_does_not_predict_classes_is_refused():
    with pytest.raises(FewbenchError, match="cannot learn regression tasks"):
        make_learner(task_type=REGRESSION)


def test_a_backbone_without_a_feature_map_is_refused_by_name():
    with pytest.raises(FewbenchError, match="backbone mlp gives none"):
        make_learner(backbone=MLP(hidden=[8]), shape=(144,))


def test_the_plugin_registers_the_learner():
    registered = []
    relationnet.fewbench_register_learners(registered.append)
    assert registered == [RelationNet]
    assert RelationNet.batch_kind == "episodes" and RelationNet.description
