"""Residual backbones of the few-shot literature: ResNet-12, ResNet-10/18 and WRN-28-10.

* ``resnet12``: the ResNet-12 of TADAM (Oreshkin et al., NeurIPS 2018) and MetaOptNet
  (Lee et al., CVPR 2019; their code, kjunelee/MetaOptNet, ``models/ResNet12_embedding.py``).
* ``resnet10`` / ``resnet18``: the ResNets of Chen et al., "A Closer Look at Few-shot
  Classification" (ICLR 2019; their code, wyharveychen/CloserLookFewShot, ``backbone.py``),
  torchvision-style basic-block ResNets (He et al., CVPR 2016).
* ``wrn28_10``: Wide ResNet 28-10 (Zagoruyko & Komodakis, BMVC 2016), as LEO (Rusu et al.,
  ICLR 2019, whose features come from it) and S2M2 (Mangla et al., WACV 2020; their code,
  nupurkmr9/S2M2_fewshot, ``wrn_mixup_model.py``) use it.

What every backbone here shares:

* ``build_feature_map`` returns the network up to its last spatial map and that map's
  shape; ``build_features`` adds global average pooling (the core appends the linear head).
* **Batch norm** (``batch_norm``): ``batch`` (the default) normalises with the statistics
  of the batch at hand and keeps no running averages, like ``conv4``. MAML's engines run
  the backbone through ``torch.func`` (``functional_call``, ``vmap``), under which the
  in-place updates of running statistics cannot be batched; with ``batch`` every engine
  works. The papers above use running statistics in eval mode; ``batch_norm: running``
  restores that for learners that train the backbone as an ordinary network (finetune,
  protonet, relationnet); MAML then refuses ``engine: batched`` and ``auto`` picks ``loop``.
* **Any input size.** Strided convolutions never shrink a map below 1x1; a 2x2 max-pool
  (ResNet-12) pools only the dimensions that are at least 2 pixels long and is left out
  when the map is already 1x1, so a 14x14 or an 8x8 input builds too (the published
  networks meet this only below their usual inputs: 28x28, 32x32 and 84x84 need no
  adaptation). Channels follow the input (1 for Omniglot, 3 for RGB).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from itertools import chain

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fewbench.plugin import Backbone, FewbenchError, Param, hookimpl

Shape = tuple[int, int, int]

BATCH_NORM = Param(
    "batch",
    choices=("batch", "running"),
    help="batch: statistics of the batch at hand, no running averages (works with every MAML "
    "engine); running: running averages used in eval mode, as the papers (not with "
    "maml's batched engine)",
)


# -- shared pieces ------------------------------------------------------------------------
def batch_norm(channels: int, mode: str) -> nn.BatchNorm2d:
    """A batch norm that keeps running statistics only when ``mode`` is ``running``."""
    return nn.BatchNorm2d(channels, track_running_stats=mode == "running")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def downsample_pool(height: int, width: int) -> nn.Module:
    """A 2x2 max-pool over the dimensions at least 2 pixels long; nothing for a 1x1 map."""
    kernel = (2 if height >= 2 else 1, 2 if width >= 2 else 1)
    return nn.Identity() if kernel == (1, 1) else nn.MaxPool2d(kernel)


def pooled(size: int, kernel: int) -> int:
    return size // kernel if size >= kernel else size


def image_shape(name: str, input_shape: tuple[int, ...]) -> Shape:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs images shaped (channels, height, width), got {input_shape}")
    channels, height, width = input_shape
    return channels, height, width


def map_shape(module: nn.Module, input_shape: tuple[int, ...]) -> Shape:
    """The output shape of ``module`` for one input, computed on the meta device (no
    arithmetic, whatever the network's size), in eval mode (no dropout, no counters)."""
    meta = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in chain(module.named_parameters(), module.named_buffers())
    }
    was_training = module.training
    module.eval()
    try:
        out = functional_call(module, meta, (torch.empty(2, *input_shape, device="meta"),))
    finally:
        module.train(was_training)
    channels, height, width = out.shape[1:]
    return int(channels), int(height), int(width)


def init_convolutions(module: nn.Module, nonlinearity: str = "relu") -> None:
    """He initialisation with fan-out, ``N(0, 2 / (k * k * out_channels))``, as all three
    reference codes do; batch norms keep torch's weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)


class GlobalAveragePool(nn.Module):
    """Average every channel over all spatial positions: ``[B, C, H, W] -> [B, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class SpatialBackbone(Backbone):
    """A backbone defined by its feature map; the features are its global average, or the
    whole map flattened where a backbone declares ``global_pool`` and it is false. A
    ``weights`` file (every subclass takes one) is loaded into the features."""

    def build_feature_map(self, input_shape: tuple[int, ...]) -> tuple[nn.Module, Shape]:
        network = self.build_network(image_shape(self.name, input_shape))
        return network, map_shape(network, input_shape)

    def build_features(self, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
        network, (channels, height, width) = self.build_feature_map(input_shape)
        if self.config.get("global_pool", True):
            features, size = nn.Sequential(network, GlobalAveragePool()), channels
        else:
            features, size = nn.Sequential(network, nn.Flatten()), channels * height * width
        return self.load_weights(features), size

    def build_network(self, shape: Shape) -> nn.Module:
        raise NotImplementedError


# -- ResNet-12 ----------------------------------------------------------------------------
class DropBlock(nn.Module):
    """DropBlock (Ghiasi, Lin & Le, NeurIPS 2018) as MetaOptNet's ``dropblock.py`` applies it.

    In training mode, block corners are drawn with probability ``gamma`` on the positions
    where a whole ``block_size`` square fits, every square that holds one is zeroed, and the
    rest is rescaled by (elements / kept elements) of the batch. The drop rate rises
    linearly from 0 to ``rate`` over the first ``ramp`` training forward passes
    (MetaOptNet: ``keep_rate = max(1 - rate / (20 * 2000) * n, 1 - rate)``);
    ``gamma = drop / block_size^2 * HW / ((H - block_size + 1) (W - block_size + 1))``.
    The block never exceeds the map. Whole blocks are dropped, as the DropBlock paper
    describes; MetaOptNet's mask code pairs corners with offsets by ``repeat`` where
    ``repeat_interleave`` was meant, so it drops only part of some blocks.

    The pass counter is a Python number, not a tensor buffer: ``torch.func`` transforms
    (MAML's engines) refuse in-place updates of captured tensors. It travels in the
    state dict as the module's extra state, so checkpoints keep it. Under ``torch.func``
    one call counts once however many tasks it batches, and each of MAML's thread
    replicas counts its own calls (only the model's own count is saved).
    """

    def __init__(self, rate: float, block_size: int, ramp: int):
        super().__init__()
        self.rate, self.block_size, self.ramp = rate, block_size, ramp
        self.forwards = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"forwards": self.forwards}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.forwards = int(state["forwards"])

    def drop_rate(self) -> float:
        """The rate after ``forwards`` training passes."""
        if self.ramp <= 0:
            return self.rate
        return min(self.rate * self.forwards / self.ramp, self.rate)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate <= 0:
            return x
        self.forwards += 1
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        fits = (height - size + 1) * (width - size + 1)
        gamma = self.drop_rate() / size**2 * (height * width) / fits
        corners = torch.rand(
            *x.shape[:-2], height - size + 1, width - size + 1, device=x.device, dtype=x.dtype
        )
        padded = nn.functional.pad((corners < gamma).to(x.dtype), (size - 1,) * 4)
        # A position is dropped when a block's corner lies in the size x size window that
        # ends at it: the window's max.
        keep = 1.0 - nn.functional.max_pool2d(padded, size, stride=1)
        return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResNet12Block(nn.Module):
    """Three 3x3 conv + BN + leaky ReLU(0.1) (no activation before the sum), a 1x1 conv + BN
    shortcut, leaky ReLU after the sum, 2x2 max-pool, then the block's regulariser."""

    def __init__(
        self, cin: int, cout: int, mode: str, pool: nn.Module, regulariser: nn.Module
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout), batch_norm(cout, mode)
        self.conv2, self.bn2 = conv3x3(cout, cout), batch_norm(cout, mode)
        self.conv3, self.bn3 = conv3x3(cout, cout), batch_norm(cout, mode)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), batch_norm(cout, mode))
        self.act = nn.LeakyReLU(0.1)
        self.pool = pool
        self.regulariser = regulariser

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.regulariser(self.pool(out))


class ResNet12(SpatialBackbone):
    """ResNet-12 as in TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019).

    Four residual blocks of ``widths`` channels (MetaOptNet: 64-160-320-640; TADAM and
    Meta-Baseline use 64-128-256-512), each three 3x3 convolutions (no bias) with batch
    norm and leaky ReLU (slope 0.1), a 1x1 convolution + batch norm shortcut and a 2x2
    max-pool: 84x84 inputs give a 5x5 map, 32x32 a 2x2 one. Convolutions are initialised
    as MetaOptNet's code (He, fan-out). Features: the global average of the last map
    (MetaOptNet flattens the 640x5x5 map instead; RFS, Tian et al. 2020, averages).

    ``dropblock: true`` is MetaOptNet's ``resnet12(drop_rate=0.1)``: dropout of
    ``drop_rate`` after blocks 1 and 2, DropBlock after blocks 3 and 4 with a block of
    ``dropblock_size`` (0: MetaOptNet's choice by dataset, 5 for mini-/tiered-ImageNet's
    84x84 inputs and 2 for CIFAR-FS/FC100's 32x32: here 5 when the input's shorter side
    is at least 64 pixels, else 2), its rate rising over ``dropblock_ramp`` training
    passes. Off by default. Batch norm: see the module docstring (the papers use running
    statistics in eval mode; ``batch_norm: running`` restores that for non-MAML learners).
    """

    name = "resnet12"
    description = "ResNet-12 of TADAM / MetaOptNet: 4 residual blocks of 3 convs, leaky ReLU"
    params = {
        "widths": Param(
            [64, 160, 320, 640],
            item_type=int,
            minimum=1,
            help="channels of the four blocks (MetaOptNet: 64-160-320-640)",
        ),
        "batch_norm": BATCH_NORM,
        "weights": Backbone.WEIGHTS_PARAM,
        "dropblock": Param(
            False, help="MetaOptNet's regularisation: dropout in blocks 1-2, DropBlock in 3-4"
        ),
        "drop_rate": Param(0.1, minimum=0.0, help="dropblock: the drop rate (MetaOptNet: 0.1)"),
        "global_pool": Param(
            True,
            help="average the last map (the features of RFS, Meta-Baseline, ...); false: flatten "
            "it, as MetaOptNet's embedding (640 x 5 x 5 = 16,000 at 84x84)",
            added_later=True,
        ),
        "dropblock_size": Param(
            0,
            minimum=0,
            help="dropblock: block size (0 = MetaOptNet's: 5 for inputs of 64 px or more, else 2)",
        ),
        "dropblock_ramp": Param(
            40000,
            minimum=0,
            help="dropblock: training passes over which the DropBlock rate rises from 0 "
            "(MetaOptNet: 20 x 2000)",
        ),
    }

    def build_network(self, shape: Shape) -> nn.Module:
        widths = self.config["widths"]
        if len(widths) != 4:
            raise FewbenchError(
                f"backbone resnet12: widths must list the channels of 4 blocks, got {widths}"
            )
        mode = self.config["batch_norm"]
        channels, height, width = shape
        block_size = self.config["dropblock_size"] or (5 if min(height, width) >= 64 else 2)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for index, cout in enumerate(widths):
            pool = downsample_pool(height, width)
            height, width = pooled(height, 2), pooled(width, 2)
            regulariser: nn.Module = nn.Identity()
            if self.config["dropblock"] and self.config["drop_rate"] > 0:
                rate = self.config["drop_rate"]
                regulariser = (
                    nn.Dropout(rate)
                    if index < 2
                    else DropBlock(rate, block_size, self.config["dropblock_ramp"])
                )
            blocks[f"block{index + 1}"] = ResNet12Block(channels, cout, mode, pool, regulariser)
            channels = cout
        network = nn.Sequential(blocks)
        init_convolutions(network, "leaky_relu")
        return network


# -- ResNet-10 / ResNet-18 ------------------------------------------------------------------
class BasicBlock(nn.Module):
    """He et al.'s basic block: 3x3 conv + BN + ReLU, 3x3 conv + BN, plus the input (or its
    1x1 conv + BN projection when the width or the resolution changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, mode: str) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), batch_norm(cout, mode)
        self.conv2, self.bn2 = conv3x3(cout, cout), batch_norm(cout, mode)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), batch_norm(cout, mode)
            )
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ChenResNet(SpatialBackbone):
    """A torchvision-style ResNet as in Chen et al. (2019): a 7x7 stride-2 convolution
    (64 channels, no bias) + BN + ReLU and a 3x3 stride-2 max-pool, four stages of basic
    blocks (``widths``, default 64-128-256-512), each stage after the first halving the
    resolution with a stride-2 first block; features are the global average.

    Chen et al. fed these networks 224x224 images (a 7x7 final map, their ``train.py``:
    ``image_size = 224`` for every non-Conv backbone); at 84x84 the final map is 3x3, at
    32x32 1x1. Batch norm: see the module docstring (the paper uses running statistics in
    eval mode; ``batch_norm: running`` restores that for non-MAML learners).
    """

    blocks_per_stage: tuple[int, int, int, int] = (1, 1, 1, 1)
    params = {
        "widths": Param(
            [64, 128, 256, 512],
            item_type=int,
            minimum=1,
            help="channels of the four stages (Chen et al.: 64-128-256-512; the stem has 64)",
        ),
        "batch_norm": BATCH_NORM,
        "weights": Backbone.WEIGHTS_PARAM,
    }

    def build_network(self, shape: Shape) -> nn.Module:
        widths = self.config["widths"]
        if len(widths) != 4:
            raise FewbenchError(
                f"backbone {self.name}: widths must list the channels of 4 stages, got {widths}"
            )
        mode = self.config["batch_norm"]
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            stem=nn.Conv2d(shape[0], 64, 7, stride=2, padding=3, bias=False),
            stem_bn=batch_norm(64, mode),
            stem_relu=nn.ReLU(),
            stem_pool=nn.MaxPool2d(3, stride=2, padding=1),
        )
        channels = 64
        for stage, (cout, count) in enumerate(zip(widths, self.blocks_per_stage, strict=True)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers[f"stage{stage + 1}_{index + 1}"] = BasicBlock(channels, cout, stride, mode)
                channels = cout
        network = nn.Sequential(layers)
        init_convolutions(network)
        return network


class ResNet10(ChenResNet):
    """ResNet-10 of Chen et al. (2019): one basic block per stage (see :class:`ChenResNet`)."""

    name = "resnet10"
    description = "ResNet-10 of Chen et al. 2019: torchvision-style, [1, 1, 1, 1] basic blocks"
    blocks_per_stage = (1, 1, 1, 1)


class ResNet18(ChenResNet):
    """ResNet-18 (He et al. 2016) as in Chen et al. (2019): two basic blocks per stage (see
    :class:`ChenResNet`)."""

    name = "resnet18"
    description = "ResNet-18 (He et al. 2016) as in Chen et al. 2019: [2, 2, 2, 2] basic blocks"
    blocks_per_stage = (2, 2, 2, 2)


# -- Wide ResNet ----------------------------------------------------------------------------
class WideBlock(nn.Module):
    """Zagoruyko & Komodakis's pre-activation block: BN + ReLU, 3x3 conv, BN + ReLU,
    dropout, 3x3 conv, plus the input (or a 1x1 conv of the activated input when the
    width changes)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float, mode: str) -> None:
        super().__init__()
        self.bn1, self.conv1 = batch_norm(cin, mode), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = batch_norm(cout, mode), conv3x3(cout, cout)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.projection = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if cin != cout or stride != 1
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        # As the authors' code: a projection takes the activated input, identity the input.
        return out + (x if self.projection is None else self.projection(activated))


class WideResNet(SpatialBackbone):
    """Wide ResNet WRN-``depth``-``widen`` (Zagoruyko & Komodakis 2016), default WRN-28-10.

    A 3x3 convolution to 16 channels, three groups of ``(depth - 4) / 6`` pre-activation
    blocks of 16k, 32k and 64k channels (k = ``widen``; 160-320-640 for WRN-28-10), the
    second and third group starting with stride 2, then batch norm + ReLU; features are
    the global average (640 for WRN-28-10). As in S2M2's code the first group keeps the
    input resolution: 84x84 inputs give a 21x21 map (S2M2's and LEO's 80x80, 20x20),
    32x32 an 8x8 one, 28x28 a 7x7 one. ``dropout`` acts between the two convolutions of
    each block: the WRN paper uses 0.3 on CIFAR in its dropout variants and S2M2's
    ``wrn28_10`` function defaults to 0.5; here 0, the plain architecture. Batch norm: see the module docstring (the papers use
    running statistics in eval mode; ``batch_norm: running`` restores that for non-MAML
    learners).
    """

    name = "wrn28_10"
    description = "Wide ResNet 28-10 (Zagoruyko & Komodakis 2016), as used by LEO and S2M2"
    params = {
        "depth": Param(28, minimum=10, help="layers: 6n + 4 (28: four blocks per group)"),
        "widen": Param(10, minimum=1, help="width multiplier k (groups of 16k, 32k, 64k)"),
        "dropout": Param(
            0.0, minimum=0.0, help="dropout between a block's convolutions (WRN paper: 0.3)"
        ),
        "batch_norm": BATCH_NORM,
        "weights": Backbone.WEIGHTS_PARAM,
    }

    def build_network(self, shape: Shape) -> nn.Module:
        depth, widen = self.config["depth"], self.config["widen"]
        if (depth - 4) % 6:
            raise FewbenchError(f"backbone {self.name}: depth must be 6n + 4 (28, 40), got {depth}")
        mode, dropout = self.config["batch_norm"], self.config["dropout"]
        per_group = (depth - 4) // 6
        layers: OrderedDict[str, nn.Module] = OrderedDict(stem=conv3x3(shape[0], 16))
        channels = 16
        for group, (cout, stride) in enumerate(
            zip((16 * widen, 32 * widen, 64 * widen), (1, 2, 2), strict=True)
        ):
            for index in range(per_group):
                layers[f"group{group + 1}_{index + 1}"] = WideBlock(
                    channels, cout, stride if index == 0 else 1, dropout, mode
                )
                channels = cout
        layers["bn"] = batch_norm(channels, mode)
        layers["relu"] = nn.ReLU()
        network = nn.Sequential(layers)
        init_convolutions(network)
        return network


BACKBONES: tuple[type[Backbone], ...] = (ResNet12, ResNet10, ResNet18, WideResNet)


@hookimpl
def fewbench_register_backbones(register: Callable[[type], None]) -> None:
    for backbone in BACKBONES:
        register(backbone)
