"""The residual backbones (plugins/backbones/resnets.py): parameter counts against the
references, shapes for every input size, and MAML through torch.func on a ResNet-12."""

from __future__ import annotations

import pytest
import torch
from test_maml import make_learner, meta_gradient, random_episodes
from torch import nn

from fewbench.errors import FewbenchError
from fewbench.plugin.params import ParamSet
from fewbench_plugins.backbones import resnets
from fewbench_plugins.backbones.resnets import (
    DropBlock,
    ResNet10,
    ResNet12,
    ResNet18,
    WideResNet,
)
from fewbench_plugins.backbones.standard import Conv4
from fewbench_plugins.learners.maml import MAML

INPUTS = [(1, 28, 28), (3, 32, 32), (3, 84, 84)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(cls, **params):
    return cls(**{**ParamSet.of(cls).defaults(), **params})


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Convolutions + batch norms, no head, RGB input. Sources
# (/work/shared/docs/published-numbers.md, "Backbone parameter counts"):
# - ResNet-12 64-160-320-640 (12,424,320) and 64-128-256-512 (7,996,800): COMPUTED from the
#   reference architecture (MetaOptNet's models/ResNet12_embedding.py); no paper states them.
# - ResNet-10 (4,905,792): COMPUTED from the torchvision-style architecture of Chen et al.'s
#   backbone.py. ResNet-18 (11,176,512): STATED with its 1000-class head by torchvision's
#   documentation (pytorch.org/vision/stable/models/generated/torchvision.models.resnet18,
#   num_params 11,689,512), minus that head (512 x 1000 + 1000 = 513,000).
# - WRN-28-10: STATED by CIFAR WRN READMEs as 36,536,884 with a 100-class head (≈36.5M in
#   Zagoruyko & Komodakis's table); without the head (640 x 100 + 100 = 64,100) 36,472,784.
REFERENCE_COUNTS = [
    (ResNet12, {}, 12_424_320, 640),
    (ResNet12, {"widths": [64, 128, 256, 512]}, 7_996_800, 512),
    (ResNet10, {}, 4_905_792, 512),
    (ResNet18, {}, 11_176_512, 512),
    (WideResNet, {}, 36_536_884 - (640 * 100 + 100), 640),
]


@pytest.mark.parametrize(("cls", "params", "expected", "feature_width"), REFERENCE_COUNTS)
def test_parameter_counts_match_the_references(cls, params, expected, feature_width):
    features, width = make(cls, **params).build_features((3, 84, 84))
    assert parameters(features) == expected
    assert width == feature_width
    # The count does not depend on the input size (global pooling), only on its channels.
    assert parameters(make(cls, **params).build_feature_map((3, 32, 32))[0]) == expected


def test_the_counts_follow_the_input_channels():
    # One input channel: only the first convolution (and ResNet-12's first shortcut) shrink.
    # Narrow networks: the first layer keeps its published width (64, or 16 for the WRN).
    cases = [
        (ResNet12, {"widths": [64, 4, 4, 4]}, 2 * (9 * 64 + 64)),
        (ResNet10, {"widths": [4, 4, 4, 4]}, 2 * 49 * 64),
        (ResNet18, {"widths": [4, 4, 4, 4]}, 2 * 49 * 64),
        (WideResNet, {"widen": 1}, 2 * 9 * 16),
    ]
    for cls, params, diff in cases:
        grey, rgb = (
            parameters(make(cls, **params).build_feature_map(shape)[0])
            for shape in ((1, 28, 28), (3, 28, 28))
        )
        assert rgb - grey == diff, cls.name


# The last map of each default backbone (computed on the meta device at build time).
MAP_SHAPES = {
    "resnet12": {(1, 28, 28): (640, 1, 1), (3, 32, 32): (640, 2, 2), (3, 84, 84): (640, 5, 5)},
    "resnet10": {(1, 28, 28): (512, 1, 1), (3, 32, 32): (512, 1, 1), (3, 84, 84): (512, 3, 3)},
    "resnet18": {(1, 28, 28): (512, 1, 1), (3, 32, 32): (512, 1, 1), (3, 84, 84): (512, 3, 3)},
    "wrn28_10": {(1, 28, 28): (640, 7, 7), (3, 32, 32): (640, 8, 8), (3, 84, 84): (640, 21, 21)},
}
WIDTHS = {"resnet12": 640, "resnet10": 512, "resnet18": 512, "wrn28_10": 640}


@pytest.mark.parametrize("cls", [ResNet12, ResNet10, ResNet18, WideResNet])
def test_every_backbone_builds_for_every_input_shape(cls):
    for shape in INPUTS:
        if shape == (1, 28, 28):
            features, width = make(cls).build_features(shape)
            assert width == WIDTHS[cls.name]
            network = features[0]
            map_shape = resnets.map_shape(network, shape)
        else:
            network, map_shape = make(cls).build_feature_map(shape)
        assert map_shape == MAP_SHAPES[cls.name][shape]
        assert next(network.parameters()).shape[1] == shape[0]  # the stem takes the channels


# Narrow versions (same layout, same resolutions) to run real forward passes fast.
NARROW = [
    (ResNet12, {"widths": [4, 8, 8, 16]}, 16),
    (ResNet10, {"widths": [4, 4, 8, 8]}, 8),
    (ResNet18, {"widths": [4, 4, 8, 8]}, 8),
    (WideResNet, {"widen": 1}, 64),
]


@pytest.mark.parametrize(("cls", "params", "channels"), NARROW)
@pytest.mark.parametrize("shape", INPUTS + [(1, 14, 14), (3, 8, 8), (1, 3, 5)])
def test_forward_shapes_match_the_declared_ones(cls, params, channels, shape):
    torch.manual_seed(0)
    backbone = make(cls, **params)
    network, map_shape = backbone.build_feature_map(shape)
    x = torch.randn(2, *shape)
    out = network(x)
    assert tuple(out.shape) == (2, *map_shape)
    assert map_shape[0] == channels and min(map_shape[1:]) >= 1
    if shape in INPUTS:  # the published layouts: same resolutions as the wide networks
        assert map_shape[1:] == MAP_SHAPES[cls.name][shape][1:]
    features, width = backbone.build_features(shape)
    pooled = features(x)
    assert tuple(pooled.shape) == (2, width) and width == channels
    model = backbone.build(shape, 5)
    assert tuple(model(x).shape) == (2, 5)


def test_features_are_the_global_average_of_the_map():
    torch.manual_seed(0)
    backbone = make(ResNet12, widths=[4, 4, 4, 8])
    features, _ = backbone.build_features((3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(features(x), features[0](x).mean(dim=(-2, -1)))


def test_small_maps_skip_the_pooling_they_cannot_do():
    # 14x14 through four 2x2 max-pools: 7, 3, 1, then the last pool is left out.
    network, shape = make(ResNet12, widths=[4, 4, 4, 4]).build_feature_map((1, 14, 14))
    assert shape == (4, 1, 1)
    pools = [block.pool for block in network]
    assert [type(p).__name__ for p in pools] == ["MaxPool2d", "MaxPool2d", "MaxPool2d", "Identity"]
    # A 1-pixel-high map is pooled along its width only.
    assert resnets.downsample_pool(1, 6).kernel_size == (1, 2)


@pytest.mark.parametrize("cls", [ResNet12, ResNet10, ResNet18, WideResNet])
def test_batch_norm_keeps_running_statistics_only_when_asked(cls):
    small = {"widen": 1} if cls is WideResNet else {"widths": [4, 4, 4, 4]}
    default = make(cls, **small).build_feature_map((3, 32, 32))[0]
    norms = [m for m in default.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.running_mean is None for m in norms)  # vmap-safe, as conv4
    running = make(cls, batch_norm="running", **small).build_feature_map((3, 32, 32))[0]
    norms = [m for m in running.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.running_mean is not None for m in norms)
    # Eval mode then uses the running averages: a single image gives the same output
    # alone and in a batch.
    running.eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(running(x[:1]), running(x)[:1], rtol=1e-3, atol=1e-4)


def test_bad_configurations_are_one_line_errors():
    with pytest.raises(FewbenchError, match="4 blocks"):
        make(ResNet12, widths=[8, 8]).build_features((3, 32, 32))
    with pytest.raises(FewbenchError, match="6n \\+ 4"):
        make(WideResNet, depth=27).build_features((3, 32, 32))
    with pytest.raises(ValueError, match="channels, height, width"):
        make(ResNet18).build_features((784,))


def test_dropblock_follows_metaoptnet():
    torch.manual_seed(0)
    network, _ = make(ResNet12, widths=[4, 4, 4, 4], dropblock=True).build_feature_map((3, 84, 84))
    kinds = [type(block.regulariser).__name__ for block in network]
    assert kinds == ["Dropout", "Dropout", "DropBlock", "DropBlock"]
    assert network[2].regulariser.block_size == 5  # 84x84: MetaOptNet's mini-ImageNet size
    assert network[0].regulariser.p == 0.1
    small, _ = make(ResNet12, widths=[4, 4, 4, 4], dropblock=True).build_feature_map((3, 32, 32))
    assert small[3].regulariser.block_size == 2  # 32x32: MetaOptNet's CIFAR-FS/FC100 size

    block = DropBlock(rate=0.1, block_size=3, ramp=40000)
    x = torch.ones(64, 8, 10, 10)
    block.eval()
    assert torch.equal(block(x), x) and block.forwards == 0
    block.train()
    block(x[:1])
    assert block.forwards == 1 and block.drop_rate() == pytest.approx(0.1 / 40000)
    block.forwards = 40000  # ramped: about 10% of the positions dropped, whole 3x3 blocks
    out = block(x)
    dropped = (out == 0).float().mean().item()
    assert 0.06 < dropped < 0.14
    kept = out[out != 0]
    assert torch.allclose(kept, kept[0]) and kept[0] > 1  # rescaled to keep the mean
    # The counter is saved with the network (extra state: a checkpoint resumes the ramp).
    state = network.state_dict()
    fresh, _ = make(ResNet12, widths=[4, 4, 4, 4], dropblock=True).build_feature_map((3, 84, 84))
    network[2].regulariser.forwards = 123
    fresh.load_state_dict(network.state_dict())
    assert fresh[2].regulariser.forwards == 123 and "block3.regulariser._extra_state" in state


def test_maml_runs_a_resnet12_with_both_engines():
    """MAML through torch.func (vmap for batched, functional_call for loop) on a tiny
    ResNet-12: both engines give the same meta-gradient and can train and predict."""
    backbone = make(ResNet12, widths=[8, 8, 8, 8])
    shape = (3, 8, 8)
    batch = random_episodes(tasks=2, ways=2, shots=1, query=2, shape=shape)
    settings = {"meta_batch_size": 2, "inner_steps": 1, "eval_inner_steps": 1, "threads": 1}
    learners = {
        engine: make_learner(MAML, backbone, shape, 2, engine=engine, **settings)
        for engine in ("batched", "loop")
    }
    grads = {engine: meta_gradient(learner, batch) for engine, learner in learners.items()}
    for a, b in zip(grads["batched"], grads["loop"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for engine, learner in learners.items():
        before = [p.detach().clone() for p in learner.model.parameters()]
        losses = [learner.train_step(batch, iteration) for iteration in (1, 2)]
        assert all(torch.isfinite(torch.tensor(losses))), engine
        assert any(
            not torch.equal(p, q) for p, q in zip(before, learner.model.parameters(), strict=True)
        )
        assert learner.engines["train"].engine == engine
        outputs = learner.predict(batch)
        assert outputs.shape == (2, 4, 2) and torch.isfinite(outputs).all()


def test_maml_never_batches_a_resnet_with_running_statistics():
    backbone = make(ResNet12, widths=[4, 4, 4, 4], batch_norm="running")
    learner = make_learner(MAML, backbone, (3, 8, 8), 2, engine="batched")
    batch = random_episodes(tasks=2, ways=2, shots=1, query=1, shape=(3, 8, 8))
    with pytest.raises(ValueError, match="running statistics"):
        learner.engine_for("train", batch)


def test_the_plugin_registers_every_backbone():
    registered = []
    resnets.fewbench_register_backbones(registered.append)
    assert [cls.name for cls in registered] == ["resnet12", "resnet10", "resnet18", "wrn28_10"]
    for cls in registered:
        assert cls.description and cls.__doc__ and "batch_norm" in cls.params


def _stock_conv4(shape: tuple[int, int, int], hidden: int) -> nn.Sequential:
    """Finn et al.'s max-pooling Conv-4 block order with torch's own layers."""
    layers: list[nn.Module] = []
    channels = shape[0]
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = hidden
    return nn.Sequential(*layers)


def test_max_pool_conv4_equals_the_stock_block_order_to_the_bit():
    """conv4 pool: max pools before its ReLU: the outputs and the second-order MAML gradients
    of the stock conv, BN, ReLU, max-pool network, unchanged (ties and zeros included)."""
    torch.manual_seed(0)
    ours, _ = make(Conv4, hidden=6, pool="max").build_feature_map((3, 21, 23))
    stock = _stock_conv4((3, 21, 23), hidden=6)
    stock.load_state_dict(ours.state_dict())  # the parameters keep their names
    ours, stock = ours.double(), stock.double()
    x = torch.randn(5, 3, 21, 23, dtype=torch.float64)

    def second_order(network: nn.Module) -> list[torch.Tensor]:
        params = dict(network.named_parameters())
        inner = torch.func.functional_call(network, params, x).pow(2).mean()
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        fast = {n: p - 0.4 * g for (n, p), g in zip(params.items(), grads, strict=True)}
        outer = torch.func.functional_call(network, fast, x).sin().sum()
        return [outer.detach(), *torch.autograd.grad(outer, list(params.values()))]

    assert torch.equal(ours(x), stock(x))
    for a, b in zip(second_order(ours), second_order(stock), strict=True):
        assert torch.equal(a, b)


def test_the_channels_last_max_pool_is_torchs_to_the_bit_ties_and_nans_included():
    """MaxPool2x2 gathers the values at the maxima it finds in channels-last order: the output,
    the gradient and the gradient of the gradient are nn.MaxPool2d(2)'s, on odd map sizes, on
    ties (small integers) and on NaNs."""
    from fewbench_plugins.backbones.pooling import MaxPool2x2

    torch.manual_seed(0)
    ties = torch.randint(0, 3, (4, 5, 9, 7)).float()
    nans = torch.randn(4, 5, 9, 7, dtype=torch.float64)
    nans[0, 0, 0, 1] = nans[1, 2, 4, 4] = float("nan")
    for x in (ties, nans, torch.randn(3, 2, 8, 8)):
        ours, stock = MaxPool2x2(), nn.MaxPool2d(2)
        x = x.requires_grad_()
        out = ours(x)
        gathered = out.grad_fn.next_functions[0][0]  # the view of a gather: the CPU path ran
        assert type(gathered).__name__ == "GatherBackward0"
        assert _equal_nans_included(out, stock(x))
        weights = torch.randn_like(out).requires_grad_()

        def grad_of(
            pool: nn.Module, x: torch.Tensor = x, weights: torch.Tensor = weights
        ) -> tuple[torch.Tensor, ...]:
            (g,) = torch.autograd.grad((pool(x) * weights).sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad((g * x.detach().cos()).sum(), weights)
            return g, gg

        for a, b in zip(grad_of(ours), grad_of(stock), strict=True):
            assert _equal_nans_included(a, b)


def _equal_nans_included(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_the_channels_last_max_pool_falls_back_to_torchs_under_vmap():
    from fewbench_plugins.backbones.pooling import MaxPool2x2

    x = torch.randn(3, 2, 4, 6, 6)
    out = torch.func.vmap(MaxPool2x2())(x)
    assert torch.equal(out, torch.func.vmap(nn.MaxPool2d(2))(x))
    stock_grad = torch.func.vmap(torch.func.grad(lambda t: nn.MaxPool2d(2)(t).square().sum()))(x)
    ours_grad = torch.func.vmap(torch.func.grad(lambda t: MaxPool2x2()(t).square().sum()))(x)
    assert torch.equal(ours_grad, stock_grad)


def test_relation_network_embedding_pools_in_the_first_two_blocks_only():
    """Sung et al. 2018's embedding: four conv blocks, 2x2 max-pooling after the first two
    only, so a 28x28 Omniglot image leaves a 7x7 map for the relation module (pooling in all
    four leaves 1x1)."""
    sung, _ = make(Conv4, hidden=64, pool="max", pool_blocks=2).build_feature_map((1, 28, 28))
    every, _ = make(Conv4, hidden=64, pool="max").build_feature_map((1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    assert sung(x).shape == (3, 64, 7, 7)
    assert every(x).shape == (3, 64, 1, 1)
    pools = [type(m).__name__ for m in sung]
    assert pools.count("MaxPool2x2") == 2


def test_pool_blocks_without_max_pooling_is_refused_in_one_line():
    with pytest.raises(FewbenchError, match="pool_blocks 2 needs pool: max"):
        make(Conv4, pool="stride", pool_blocks=2).check()


def test_resnet12_without_global_pooling_is_metaoptnets_flattened_map(tmp_path):
    """MetaOptNet's embedding keeps the last 640 x 5 x 5 map of an 84x84 image: 16,000 values.
    A weights file of that network loads into a freshly built one."""
    built = ResNet12(**{**ParamSet.of(ResNet12).defaults(), "global_pool": False})
    features, width = built.build_features((3, 84, 84))
    assert width == 16_000
    assert features(torch.zeros(1, 3, 84, 84)).shape == (1, 16_000)
    pooled = ResNet12(**ParamSet.of(ResNet12).defaults()).build_features((3, 84, 84))[1]
    assert pooled == 640
    path = tmp_path / "resnet12.pt"
    torch.save(features.state_dict(), path)
    given = ResNet12(
        **{**ParamSet.of(ResNet12).defaults(), "global_pool": False, "weights": str(path)}
    )
    loaded, _ = given.build_features((3, 84, 84))
    for key, value in features.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
