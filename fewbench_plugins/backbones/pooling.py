"""A 2x2 max-pool that finds its maxima in channels-last order on a CPU.

torch's CPU max-pool over a contiguous (N, C, H, W) tensor walks each channel's plane
one value at a time; over a channels-last tensor it compares whole rows of channels at
once. On 75 x 32 x 84 x 84 values (a mini-ImageNet MAML task's query set after its first
convolution) the first took 44 ms and the second 3.5 ms on the 2-core machine, the copy
into channels-last order 7 ms (benchmarks/README.md, configuration 3). Only the search
for the maxima runs in channels-last order: the pooled values are then gathered from the
input at those positions, so everything around the pool stays in torch's usual layout
(batch norm's backward and double backward are far slower on channels-last tensors).

The values are the input's own and the positions are the ones torch's pool picks (both
kernels scan a window in row-major order and keep the first maximum; NaN wins), so the
output, the gradient (gather's backward puts each value back at its position, as the
pool's backward does) and MAML's second-order terms are torch's to the bit:
tests/test_backbones.py checks them against ``nn.MaxPool2d(2)``, ties and NaNs included.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` with the CPU search for the maxima in channels-last order.

    Falls back to torch's own pool on other devices, on inputs not shaped (N, C, H, W),
    and inside ``torch.func.vmap`` (which cannot hold a channels-last tensor).
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or min(x.shape[-2:]) < 2:
            return F.max_pool2d(x, 2)
        try:
            positions = _positions_of_maxima(x)
        except RuntimeError:  # under vmap: "NYI ... memory_format ... inside vmap"
            return F.max_pool2d(x, 2)
        n, c, h, w = x.shape
        return x.flatten(2).gather(2, positions.flatten(2)).view(n, c, h // 2, w // 2)


def _positions_of_maxima(x: torch.Tensor) -> torch.Tensor:
    """Each 2x2 window's maximum as a flat index into its (H, W) plane, in (N, C, H, W) order."""
    with torch.no_grad():
        channels_last = x.detach().contiguous(memory_format=torch.channels_last)
        _, positions = torch.ops.aten.max_pool2d_with_indices(channels_last, [2, 2], [2, 2])
        return positions.contiguous()
