"""P>M>F's meta-test fine-tuning: the augmentation against direct computations, the
fine-tuning step against Adam's first step written out, and the learner."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

from fewbench.errors import FewbenchError
from fewbench.methods.finetuning import (
    color,
    cosine_logits,
    diff_augment,
    finetune_on_support,
    translation,
)
from fewbench.plugin.dataset import EpisodeBatch
from fewbench.plugin.learner import LearnerContext
from fewbench.plugin.params import ParamSet
from fewbench_plugins.backbones.standard import Conv4
from fewbench_plugins.learners.feature_heads import FineTunedPrototypes


def images(count=4, seed=0):
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_color_is_brightness_then_saturation_then_contrast_per_image():
    x = images()
    out = color(x, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    brightness = -0.5 + torch.rand(4, generator=g)
    saturation = 2.0 * torch.rand(4, generator=g)
    contrast = 0.5 + torch.rand(4, generator=g)
    for i in range(4):
        y = x[i] + brightness[i]
        y = (y - y.mean(0, keepdim=True)) * saturation[i] + y.mean(0, keepdim=True)
        y = (y - y.mean()) * contrast[i] + y.mean()
        torch.testing.assert_close(out[i], y)


def test_translation_shifts_each_image_and_fills_zeros():
    x = images(count=3)
    out = translation(x, torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    dy = torch.randint(-1, 2, (3,), generator=g)
    dx = torch.randint(-1, 2, (3,), generator=g)
    for i in range(3):
        expected = torch.zeros_like(x[i])
        for r in range(8):
            for c in range(8):
                rr, cc = r - int(dy[i]), c - int(dx[i])
                if 0 <= rr < 8 and 0 <= cc < 8:
                    expected[:, r, c] = x[i, :, rr, cc]
        torch.testing.assert_close(out[i], expected)


def test_diff_augment_leaves_a_batch_alone_one_time_in_ten():
    x = images()
    assert torch.equal(diff_augment(x, torch.Generator().manual_seed(0), probability=0.0), x)
    changed = sum(
        not torch.equal(diff_augment(x, torch.Generator().manual_seed(s)), x) for s in range(200)
    )
    assert 160 <= changed <= 200  # 90% expected: 180


def network() -> nn.Module:
    torch.manual_seed(3)
    conv = Conv4(**{**ParamSet.of(Conv4).defaults(), "hidden": 4, "batch_norm": "running"})
    return conv.build_features((3, 8, 8))[0].eval()


def test_fine_tuning_is_adam_on_the_cosine_prototype_loss_of_the_augmented_support():
    features = network()
    before = {k: v.clone() for k, v in features.state_dict().items()}
    support, labels = images(count=6), torch.tensor([0, 0, 1, 1, 2, 2])
    assert finetune_on_support(
        features, support, labels, 3, steps=0, lr=0.1, scale=10.0, bias=0.0,
        generator=torch.Generator(),
    ) is features  # fmt: skip
    lr = 1e-3
    tuned = finetune_on_support(
        features, support, labels, 3, steps=1, lr=lr, scale=10.0, bias=0.0,
        generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    for key, value in features.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[key])
    # Adam's first step moves each parameter by lr * sign(gradient) (up to its epsilon).
    g = torch.Generator().manual_seed(4)
    prototypes = torch.stack([features(support)[labels == c].mean(0) for c in range(3)])
    queries = features(diff_augment(support, g))
    loss = functional.cross_entropy(cosine_logits(queries, prototypes, 10.0, 0.0), labels)
    names = [n for n, _ in features.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in features.named_parameters()])
    tuned_params = dict(tuned.named_parameters())
    for name, grad, param in zip(names, grads, features.parameters(), strict=True):
        expected = param - lr * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(tuned_params[name], expected, atol=1e-6, rtol=1e-5)


def learner(weights, **params) -> FineTunedPrototypes:
    made = FineTunedPrototypes(**{**ParamSet.of(FineTunedPrototypes).defaults(), **params})
    backbone = Conv4(**{**ParamSet.of(Conv4).defaults(), "hidden": 4, "batch_norm": "running",
                        "weights": str(weights)})  # fmt: skip
    made.setup(
        LearnerContext(
            backbone=backbone, input_shape=(3, 8, 8), ways=3, shots=2, query=2,
            num_train_classes=5, device=torch.device("cpu"),
        )
    )  # fmt: skip
    return made


def test_the_learner_fine_tunes_per_episode_and_without_a_rate_is_cosine_protonet(tmp_path):
    weights = tmp_path / "conv4.pt"
    torch.save(network().state_dict(), weights)
    labels = torch.arange(3).repeat_interleave(2)
    batch = EpisodeBatch(
        images(12, seed=5).reshape(2, 6, 3, 8, 8), labels.expand(2, -1),
        images(12, seed=6).reshape(2, 6, 3, 8, 8), labels.expand(2, -1), 3,
    )  # fmt: skip
    plain = learner(weights, finetune_lr=0.0)
    assert plain.iterations(100) == 0
    scores = plain.predict(batch)
    with torch.no_grad():
        features = network()
        for t in range(2):
            prototypes = torch.stack(
                [features(batch.support_x[t])[labels == c].mean(0) for c in range(3)]
            )
            direct = cosine_logits(features(batch.query_x[t]), prototypes, 10.0, 0.0)
            torch.testing.assert_close(scores[t], direct, atol=1e-5, rtol=1e-5)
    tuned = learner(weights, steps=3).predict(batch)
    assert tuned.shape == (2, 6, 3) and not torch.allclose(tuned, scores)
    protocol = learner(weights).prediction_protocol()
    assert protocol.adaptation_steps == 50 and not protocol.transductive_because
    with pytest.raises(FewbenchError, match="transform CL2N does not apply"):
        FineTunedPrototypes(
            **{**ParamSet.of(FineTunedPrototypes).defaults(), "transform": "CL2N"}
        ).check()
