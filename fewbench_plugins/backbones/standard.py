"""Built-in backbones: Finn et al.'s Conv-4 and a plain multilayer perceptron."""

from __future__ import annotations

import math

import torch
from torch import nn

from fewbench.plugin import Backbone, FewbenchError, Param, hookimpl
from fewbench_plugins.backbones.pooling import MaxPool2x2


class GlobalAverage(nn.Module):
    """Average over every spatial position (Finn et al.'s Omniglot network)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class Conv4(Backbone):
    name = "conv4"
    description = "Four 3x3 conv blocks with batch norm and ReLU (Finn et al. 2017)"
    params = {
        "hidden": Param(64, minimum=1, help="filters per convolution"),
        "pool": Param(
            "stride", choices=("stride", "max"), help="stride-2 convs (Omniglot) or 2x2 max-pool"
        ),
        "batch_norm": Param(
            "batch",
            choices=("batch", "running"),
            help="batch: statistics of the batch at hand, no running averages (Finn et al.'s "
            "transductive mode; every MAML engine); running: running averages, used in eval "
            "mode at test time (the inductive mode; MAML's loop engine)",
            added_later=True,
        ),
        "pool_blocks": Param(
            4,
            choices=(0, 1, 2, 3, 4),
            help="pool: max: max-pool in the first this many blocks only (Sung et al. 2018's "
            "relation-network embedding: 2, so the relation module still has a map to read)",
            added_later=True,
        ),
        "weights": Backbone.WEIGHTS_PARAM,
    }

    def check(self) -> None:
        if self.config["pool"] != "max" and self.config["pool_blocks"] != 4:
            raise FewbenchError(
                f"backbone conv4: pool_blocks {self.config['pool_blocks']} needs pool: max "
                "(pool: stride downsamples in every block)"
            )
        super().check()

    def build_features(self, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        blocks, _ = self.build_feature_map(input_shape)
        pooled = GlobalAverage() if self.config["pool"] == "stride" else nn.Flatten()
        features = nn.Sequential(*blocks, pooled)
        with torch.no_grad():
            width = features(torch.zeros(2, *input_shape)).shape[-1]
        return self.load_weights(features), width

    def build_feature_map(
        self, input_shape: tuple[int, ...]
    ) -> tuple[nn.Module, tuple[int, int, int]]:
        if len(input_shape) != 3:
            raise ValueError(
                f"conv4 needs images shaped (channels, height, width), got {input_shape}"
            )
        hidden, pool = self.config["hidden"], self.config["pool"]
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for block in range(4):
            stride = 2 if pool == "stride" else 1
            layers += [
                nn.Conv2d(channels, hidden, 3, stride=stride, padding=1),
                # batch: statistics of the batch at hand, as the original MAML (transductive).
                nn.BatchNorm2d(hidden, track_running_stats=self.config["batch_norm"] == "running"),
            ]
            if pool == "max" and block < self.config["pool_blocks"]:
                # Finn et al.'s block is conv, batch norm, ReLU, 2x2 max-pool. Pooling before
                # the ReLU gives the same values and gradients to the bit (the two commute, ties
                # included: tests/test_backbones.py) with the ReLU's forward, backward and
                # second-order terms on a quarter of the values: 1.08x and 1.19x for a
                # mini-ImageNet MAML meta-iteration through higher on a CPU, in two runs
                # (benchmarks/README.md, configuration 3). MaxPool2x2 is nn.MaxPool2d(2) with
                # the CPU search for the maxima in channels-last order (pooling.py).
                layers.append(MaxPool2x2())
            layers.append(nn.ReLU())
            channels = hidden
        blocks = nn.Sequential(*layers)
        with torch.no_grad():
            shape = tuple(blocks(torch.zeros(2, *input_shape)).shape[1:])
        return blocks, shape


class MLP(Backbone):
    name = "mlp"
    description = "Fully connected ReLU network with configurable hidden sizes"
    params = {
        "hidden": Param([40, 40], item_type=int, minimum=1, help="sizes of the hidden layers")
    }

    def batch_norm_mode(self) -> str:
        """No batch norm: its layers are linear and ReLU."""
        return "none"

    def build_features(self, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        width = math.prod(input_shape)
        layers: list[nn.Module] = [nn.Flatten()] if len(input_shape) > 1 else []
        for size in self.config["hidden"]:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        return nn.Sequential(*layers), width


@hookimpl
def fewbench_register_backbones(register):
    register(Conv4)
    register(MLP)
