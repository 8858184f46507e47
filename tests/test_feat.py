"""FEAT: the set-to-set Transformer layer as the authors build it, the logits and the
contrastive regulariser against direct computations, the shot-dependent defaults, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from fewbench.plugin.dataset import EpisodeBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench_plugins.backbones.standard import MLP
from fewbench_plugins.learners.feat import FEAT, SetAttention

SHAPE = (6,)


def feat(shots: int = 1, **params) -> FEAT:
    torch.manual_seed(0)
    made = FEAT(**{**ParamSet.of(FEAT).defaults(), **params})
    made.setup(
        LearnerContext(
            backbone=MLP(hidden=[16]), input_shape=SHAPE, ways=3, shots=shots, query=2,
            num_train_classes=10, device=torch.device("cpu"),
        )
    )  # fmt: skip
    return made


def episodes(shots: int = 2, query: int = 2, tasks: int = 2) -> EpisodeBatch:
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(3)
    return EpisodeBatch(
        torch.randn(tasks, 3 * shots, *SHAPE, generator=g),
        labels.repeat_interleave(shots).expand(tasks, -1),
        torch.randn(tasks, 3 * query, *SHAPE, generator=g),
        labels.repeat_interleave(query).expand(tasks, -1),
        3,
    )


def test_the_attention_layer_is_the_authors_one_head_post_norm_residual():
    torch.manual_seed(1)
    layer = SetAttention(64).eval()
    assert layer.query.bias is None and layer.key.bias is None and layer.value.bias is None
    assert layer.out.bias is not None
    # Normal with std sqrt(2 / (d + d)) = 0.125 for d = 64 (three 64x64 maps: 12,288 draws).
    weights = torch.cat([m.weight.flatten() for m in (layer.query, layer.key, layer.value)])
    assert weights.std().item() == pytest.approx(0.125, rel=0.05)
    x = torch.randn(2, 5, 64)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(64), -1)
    expected = functional.layer_norm(layer.out(attention @ v) + x, (64,))
    expected = expected * layer.norm.weight + layer.norm.bias
    torch.testing.assert_close(layer(x), expected)


def test_the_defaults_follow_the_shots_as_the_readme_settings():
    one, five = feat(shots=1), feat(shots=5)
    assert (one.temperature, one.temperature2, one.balance) == (64.0, 16.0, 1.0)
    assert (five.temperature, five.temperature2, five.balance) == (32.0, 64.0, 0.1)
    assert feat(shots=1, temperature=8.0).temperature == 8.0


def test_logits_are_distances_to_adapted_prototypes_over_the_temperature():
    model = feat()
    model.network.eval()
    batch = episodes()
    with torch.no_grad():
        scores = model.predict(batch)
        for t in range(2):
            support = model.network.features(batch.support_x[t])
            query = model.network.features(batch.query_x[t])
            prototypes = torch.stack([support[batch.support_y[t] == c].mean(0) for c in range(3)])
            adapted = model.network.attention(prototypes[None])[0]
            torch.testing.assert_close(scores[t], -torch.cdist(query, adapted).pow(2) / 64.0)


def test_the_regulariser_adapts_each_class_as_its_own_set():
    model = feat()
    model.network.eval()  # no dropout: a deterministic comparison
    batch = episodes(tasks=1)
    with torch.no_grad():
        support, query = model.embed(batch)
        ours = model.regulariser(support, query, 3)
        centres, instances, labels = [], [], []
        for c in range(3):
            members = torch.cat(
                [support[0][batch.support_y[0] == c], query[0][batch.query_y[0] == c]]
            )
            centres.append(model.network.attention(members[None])[0].mean(0))
            instances.append(members)
            labels += [c] * len(members)
        logits = -torch.cdist(torch.cat(instances), torch.stack(centres)).pow(2) / 16.0
        torch.testing.assert_close(ours, functional.cross_entropy(logits, torch.tensor(labels)))


def test_a_training_step_moves_backbone_and_transformer_at_their_rates():
    model = feat()
    assert [g["lr"] for g in model.optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    loss = model.train_step(episodes(), 1)
    assert loss > 0
    moved = {
        k.split(".")[0]
        for k, v in model.network.state_dict().items()
        if not torch.equal(v, before[k])
    }
    assert moved == {"features", "attention"}
    assert model.learning_rate_factor(2001) == 0.5 and model.learning_rate_factor(2000) == 1.0
