"""Fine-tuning a backbone on one episode's support set before classifying its queries: P>M>F's
meta-test step (Hu, Li, Stühmer, Kim & Hospedales, "Pushing the Limits of Simple Pipelines for
Few-Shot Learning: External Data and Fine-Tuning Make a Difference", CVPR 2022; the authors'
code github.com/hushell/pmf_cvpr22, ``models/deploy.py`` ``ProtoNet_Finetune`` and the
augmentation of ``models/utils.py``).

* :func:`diff_augment`: the code's augmentation of normalised image tensors: with probability
  0.9 the batch is augmented, flipped horizontally as a whole with probability 1/2, then each
  image gets its own ``color`` change (brightness + U(-0.5, 0.5), saturation x U(0, 2),
  contrast x U(0.5, 1.5)) and ``translation`` (a shift of up to 1/8 of each side, zero-filled).
* :func:`cosine_logits`: the ProtoNet classifier of P>M>F, ``scale * (cos(f, c_k) + bias)``.
* :func:`finetune_on_support`: Adam on the whole backbone for a number of steps; each step
  recomputes the prototypes from the un-augmented support set and classifies the augmented
  support set (the pseudo-queries) with the cosine classifier, minimising the cross-entropy.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional

from fewbench.methods.feature_heads import class_means


def _uniform(count: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def color(images: Tensor, generator: torch.Generator) -> Tensor:
    """Brightness, saturation, contrast, each drawn per image (DiffAugment's ``color``)."""
    count = images.shape[0]
    shape = (count, 1, 1, 1)
    device = images.device
    out = images + _uniform(count, -0.5, 0.5, generator).to(device).view(shape)
    mean = out.mean(dim=1, keepdim=True)
    out = (out - mean) * _uniform(count, 0.0, 2.0, generator).to(device).view(shape) + mean
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * _uniform(count, 0.5, 1.5, generator).to(device).view(shape) + mean


def translation(images: Tensor, generator: torch.Generator, ratio: float = 0.125) -> Tensor:
    """Each image shifted by up to ``ratio`` of its height and width, zero-filled."""
    count, _, height, width = images.shape
    shift_y, shift_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-shift_y, shift_y + 1, (count,), generator=generator).to(images.device)
    dx = torch.randint(-shift_x, shift_x + 1, (count,), generator=generator).to(images.device)
    padded = functional.pad(images, (shift_x, shift_x, shift_y, shift_y))
    rows = (shift_y - dy)[:, None] + torch.arange(height, device=images.device)  # [B, H]
    cols = (shift_x - dx)[:, None] + torch.arange(width, device=images.device)  # [B, W]
    batch = torch.arange(count, device=images.device)[:, None, None]
    picked = padded.movedim(1, -1)[batch, rows[:, :, None], cols[:, None, :]]
    return picked.movedim(-1, 1).contiguous()


def diff_augment(
    images: Tensor, generator: torch.Generator, probability: float = 0.9, flip: bool = True
) -> Tensor:
    """P>M>F's augmentation of a batch of normalised images ``[B, C, H, W]`` (``color`` then
    ``translation``, the code's default types)."""
    if float(torch.rand((), generator=generator)) >= probability:
        return images
    if flip and float(torch.rand((), generator=generator)) < 0.5:
        images = images.flip(-1)
    return translation(color(images, generator), generator)


def cosine_logits(features: Tensor, prototypes: Tensor, scale: float, bias: float) -> Tensor:
    """``scale * (cos(f, c_k) + bias)`` for features ``[M, D]`` and prototypes ``[N, D]``."""
    cosine = functional.normalize(features, dim=-1) @ functional.normalize(prototypes, dim=-1).T
    return scale * (cosine + bias)


def finetune_on_support(
    features: nn.Module,
    support: Tensor,
    labels: Tensor,
    ways: int,
    *,
    steps: int,
    lr: float,
    scale: float,
    bias: float,
    generator: torch.Generator,
) -> nn.Module:
    """A copy of ``features`` fine-tuned on one episode's support set ``[S, C, H, W]``
    (``ProtoNet_Finetune``): Adam (betas 0.9, 0.999, no weight decay) on every parameter for
    ``steps`` steps, each the cross-entropy of the augmented support set classified against the
    prototypes of the un-augmented one. ``steps`` 0 or ``lr`` 0 returns ``features`` itself.
    The copy runs in the mode ``features`` is in (eval: batch norms keep their statistics)."""
    if steps == 0 or lr == 0:
        return features
    tuned = copy.deepcopy(features)
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            prototypes = class_means(tuned(support)[None], labels[None], ways)[0]
            queries = tuned(diff_augment(support, generator))
            loss = functional.cross_entropy(cosine_logits(queries, prototypes, scale, bias), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return tuned
