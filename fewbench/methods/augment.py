"""Training-time image augmentations, batched on the device.

Every image of a batch gets its own random transformation, but nothing loops over
images: the random choices (drawn from the iteration's seeded CPU generator, so a
run on a GPU draws exactly what a run on a CPU draws) become index tensors and
masks, and the images are transformed where they lie, in a few whole-batch calls.

* ``flip``: horizontal flip with probability 1/2.
* ``crop``: zero-pad by ``max(1, size // 8)`` pixels on each side, then crop back
  to the original size at a random offset (4 pixels for 32x32 CIFAR, 10 for 84x84).
* ``rotate90``: a random multiple of 90 degrees (square images only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewbench.plugin.dataset import EpisodeBatch, LabelledBatch
from fewbench.suite.cell import AUGMENTATIONS  # noqa: F401  (declared with the suite schema)


def flip(images: Tensor, generator: torch.Generator) -> Tensor:
    chosen = torch.rand(images.shape[0], generator=generator) < 0.5
    mask = chosen.to(images.device).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(mask, images.flip(-1), images)


def crop(images: Tensor, generator: torch.Generator) -> Tensor:
    count, height, width = images.shape[0], images.shape[-2], images.shape[-1]
    pad = max(1, min(height, width) // 8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    top = torch.randint(0, 2 * pad + 1, (count,), generator=generator).to(images.device)
    left = torch.randint(0, 2 * pad + 1, (count,), generator=generator).to(images.device)
    rows = (top[:, None] + torch.arange(height, device=images.device))[:, :, None]  # [B, H, 1]
    cols = (left[:, None] + torch.arange(width, device=images.device))[:, None, :]  # [B, 1, W]
    batch = torch.arange(count, device=images.device)[:, None, None]
    # Advanced indexing gathers [B, H, W, C]; move channels back in front.
    return padded.movedim(1, -1)[batch, rows, cols].movedim(-1, 1).contiguous()


def rotate90(images: Tensor, generator: torch.Generator) -> Tensor:
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotate90 needs square images, got {tuple(images.shape[-2:])}")
    turns = torch.randint(0, 4, (images.shape[0],), generator=generator).to(images.device)
    out = images
    for quarter in range(1, 4):
        mask = (turns == quarter).view(-1, *([1] * (images.dim() - 1)))
        out = torch.where(mask, torch.rot90(images, quarter, dims=(-2, -1)), out)
    return out


FUNCTIONS = {"flip": flip, "crop": crop, "rotate90": rotate90}


def augment_images(images: Tensor, names: list[str], generator: torch.Generator) -> Tensor:
    """Apply ``names`` in order to ``[..., C, H, W]`` images, each image drawn independently."""
    if not names:
        return images
    shape = images.shape
    flat = images.reshape(-1, *shape[-3:])
    for name in names:
        flat = FUNCTIONS[name](flat, generator)
    return flat.reshape(shape)


def augment_batch(
    batch: EpisodeBatch | LabelledBatch, names: list[str], generator: torch.Generator
) -> EpisodeBatch | LabelledBatch:
    """A training batch with its images augmented (support and query alike); labels unchanged."""
    if not names:
        return batch
    if isinstance(batch, LabelledBatch):
        return LabelledBatch(augment_images(batch.x, names, generator), batch.y)
    return EpisodeBatch(
        augment_images(batch.support_x, names, generator),
        batch.support_y,
        augment_images(batch.query_x, names, generator),
        batch.query_y,
        batch.ways,
    )
