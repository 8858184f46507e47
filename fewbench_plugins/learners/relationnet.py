"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018).

The embedding module f is the backbone's last spatial feature map
(:meth:`fewbench.plugin.backbone.Backbone.build_feature_map`). A class's feature map is the
element-wise **sum** of its support examples' maps for K-shot (section 3, "K-shot"; the authors'
code, floodsung/LearningToCompare_FSL, ``torch.sum(sample_features, 1)``); for one shot
it is the example's own map. Each query's map is concatenated with every class's along
the channels, class first as in their code (``torch.cat((sample_features_ext,
batch_features_ext), 2)``), and the relation module g scores the pair in [0, 1]:
two blocks of 3x3 convolution (64 filters), batch norm, ReLU and 2x2 max-pool, then a
fully connected layer of 8 units with ReLU and one of 1 unit with a sigmoid (section
3, "Network architecture", Fig. 2). Training minimises the mean squared error between
the relation scores and the one-hot match of query and class (section 3, "Objective
function"; ``nn.MSELoss()`` in their code) with Adam, learning rate 10^-3 halved every
100,000 episodes (section 4; their code:
``StepLR(step_size=100000, gamma=0.5)``, one episode per step). ``predict`` returns the
relation scores ``[T, N*Q, ways]``; the highest is the predicted class.

Choices and deviations, each from the authors' code unless said:

* Padding of the relation module's convolutions (``relation_padding: auto``): their
  Omniglot code pads by 1 (a 64x5x5 map: 5 -> 2 -> 1, 64 inputs to the FC layer), their
  mini-ImageNet code by 0 (64x19x19: 17 -> 8 -> 6 -> 3, 64x3x3 inputs). ``auto`` pads a
  dimension by 1 when the map is under 10 pixels along it and by 0 otherwise: Chen et
  al.'s rule (2019, CloserLookFewShot ``methods/relationnet.py``), which gives both.
  A 2x2 max-pool pools only the dimensions at least 2 pixels long and is left out on a
  1x1 map, so the small maps of fewbench's backbones (``conv4`` with stride-2
  convolutions on 28x28 gives 2x2) still build; the FC layer's width is measured.
* Gradient clipping: their code clips the gradient norm of the embedding and of the
  relation module to 0.5 each (``clip_grad_norm``); the paper does not mention it.
  ``grad_clip: 0`` turns it off.
* Initialisation of the relation module as their ``weights_init``: convolutions
  ``N(0, 2 / (9 * out_channels))`` with zero bias, batch norm 1 and 0, linear layers
  ``N(0, 0.01)`` with biases of **1**. The backbone keeps its own initialisation.
* Batch norm: the relation module normalises with the statistics of the batch at hand
  (their code uses ``momentum=1`` and never switches to eval mode, which amounts to the
  same). Support and query maps come from separate forward passes, per episode, as in
  their code; with fewbench's transductive backbones each set is normalised with its own
  statistics, and the relation module's batch is one episode's query-class pairs.
  Backbones with ``batch_norm: running`` use their running statistics in ``predict``.
* ``class_feature: mean`` averages the shots instead (Chen et al.'s reimplementation).
* The learning-rate decay counts training episodes (steps x ``meta_batch_size``) and is
  computed from the iteration, so a resumed run continues it exactly.
* Classification only: a task type that does not predict classes is refused, and so is
  a backbone that gives no spatial feature map (``mlp``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fewbench.plugin import (
    EpisodeBatch,
    FewbenchError,
    Learner,
    LearnerContext,
    Param,
    PredictionProtocol,
    hookimpl,
    supervised_step,
)
from fewbench_plugins.learners.schedules import halved_every


def relation_padding(size: int, mode: str) -> int:
    """A relation convolution's padding along a dimension of ``size`` pixels."""
    if mode == "auto":
        return 1 if size < 10 else 0
    return 1 if mode == "same" else 0


def max_pool_2x2(height: int, width: int) -> tuple[nn.Module, int, int]:
    """A 2x2 max-pool over the dimensions at least 2 pixels long (none on a 1x1 map), and
    the map's size after it."""
    kernel = (2 if height >= 2 else 1, 2 if width >= 2 else 1)
    pool = nn.Identity() if kernel == (1, 1) else nn.MaxPool2d(kernel)
    return pool, height // kernel[0], width // kernel[1]


class RelationModule(nn.Module):
    """g: two conv blocks (3x3 conv, BN, ReLU, 2x2 max-pool), FC + ReLU, FC + sigmoid.

    Input: pairs ``[P, 2C, H, W]`` (class map, query map); output: scores ``[P]`` in [0, 1].
    """

    def __init__(
        self, map_shape: tuple[int, int, int], channels: int, hidden: int, padding: str
    ) -> None:
        super().__init__()
        in_channels, height, width = map_shape
        layers: list[nn.Module] = []
        cin = 2 * in_channels
        # Chosen once, from the feature map, for both blocks (as Chen et al.'s rule).
        pad = (relation_padding(height, padding), relation_padding(width, padding))
        for _ in range(2):
            height, width = height + 2 * pad[0] - 2, width + 2 * pad[1] - 2
            if height < 1 or width < 1:
                raise FewbenchError(
                    f"learner relationnet: a {map_shape[1]}x{map_shape[2]} feature map is too "
                    f"small for relation_padding: {padding}; use auto or same"
                )
            pool, height, width = max_pool_2x2(height, width)
            layers += [
                nn.Conv2d(cin, channels, 3, padding=pad),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
                pool,
            ]
            cin = channels
        self.blocks = nn.Sequential(*layers)
        self.fc1 = nn.Linear(channels * height * width, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' ``weights_init`` (LearningToCompare_FSL)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.ones_(m.bias)

    def forward(self, pairs: Tensor) -> Tensor:
        out = self.blocks(pairs).flatten(1)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(out)))).squeeze(-1)


def class_features(support: Tensor, labels: Tensor, ways: int, reduce: str = "sum") -> Tensor:
    """Each class's feature map ``[ways, C, H, W]``: the sum (or mean) of its support maps.

    ``support`` is ``[N*K, C, H, W]``, ``labels`` ``[N*K]`` in ``0..ways-1`` in any order."""
    one_hot = nn.functional.one_hot(labels, ways).to(support.dtype)  # [NK, N]
    summed = (one_hot.T @ support.flatten(1)).view(ways, *support.shape[1:])
    if reduce == "mean":
        return summed / one_hot.sum(0).view(ways, 1, 1, 1)
    return summed


def relation_pairs(classes: Tensor, query: Tensor) -> Tensor:
    """Every (class, query) pair concatenated along the channels, query-major:
    ``[NQ * ways, 2C, H, W]`` (pair ``q * ways + c``), as the authors' code orders them."""
    ways, count = classes.shape[0], query.shape[0]
    class_ext = classes.unsqueeze(0).expand(count, *classes.shape)
    query_ext = query.unsqueeze(1).expand(count, ways, *query.shape[1:])
    return torch.cat([class_ext, query_ext], dim=2).flatten(0, 1)


def one_hot_targets(query_y: Tensor, ways: int, dtype: torch.dtype) -> Tensor:
    """``1(y_query == c)`` for every query and class: ``[..., NQ, ways]``."""
    return nn.functional.one_hot(query_y, ways).to(dtype)


class RelationNet(Learner):
    name = "relationnet"
    display_name = "Relation Network"
    state_attributes = ("embedding", "relation", "optimizer")
    description = (
        "Relation networks: a learnt relation module scores query-class pairs (Sung et al. 2018)"
    )
    out_of_memory_hint = "lower meta_batch_size, or the ways and query of the training episodes"
    params = {
        "meta_batch_size": Param(1, minimum=1, help="episodes per Adam step (the paper: 1)"),
        "lr": Param(0.001, minimum=0.0, help="Adam learning rate (the paper: 10^-3)"),
        "lr_halve_every": Param(
            100000,
            minimum=0,
            help="halve the learning rate every this many training episodes (the paper: "
            "100,000; 0 = constant)",
        ),
        "grad_clip": Param(
            0.5,
            minimum=0.0,
            help="clip the gradient norm of the embedding and of the relation module, each "
            "(the authors' code: 0.5; 0 = off)",
        ),
        "relation_channels": Param(64, minimum=1, help="filters of the relation convolutions"),
        "relation_hidden": Param(8, minimum=1, help="units of the first relation FC layer"),
        "relation_padding": Param(
            "auto",
            choices=("auto", "same", "valid"),
            help="padding of the relation convolutions: same (1, their Omniglot code), valid "
            "(0, their mini-ImageNet code), auto (1 along a dimension under 10 pixels)",
        ),
        "class_feature": Param(
            "sum",
            choices=("sum", "mean"),
            help="K-shot class feature: sum of the support maps (the paper) or their mean",
        ),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        if not ctx.task_type.predicts_classes:
            raise FewbenchError(
                f"learner relationnet scores query-class pairs; it cannot learn "
                f"{ctx.task_type.name} tasks (use maml or finetune)"
            )
        try:
            embedding, shape = ctx.backbone.build_feature_map(ctx.input_shape)
        except NotImplementedError:
            raise FewbenchError(
                f"learner relationnet compares spatial feature maps, and backbone "
                f"{ctx.backbone.name} gives none; use a convolutional backbone (conv4, resnet12)"
            ) from None
        self.map_shape = tuple(shape)
        self.embedding = embedding.to(ctx.device)
        self.relation = RelationModule(
            self.map_shape,
            self.config["relation_channels"],
            self.config["relation_hidden"],
            self.config["relation_padding"],
        ).to(ctx.device)
        self.optimizer = torch.optim.Adam(
            [*self.embedding.parameters(), *self.relation.parameters()], lr=self.config["lr"]
        )

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def describe_engine(self) -> str:
        return (
            f"relation module on {'x'.join(map(str, self.map_shape))} maps; support and query "
            "in separate passes per episode"
        )

    def prediction_protocol(self) -> PredictionProtocol:
        """Support and query maps in separate passes, and a relation module that always
        normalises with the batch of the episode's query-class pairs: a query's scores depend
        on the other queries whatever the backbone's batch norm (transductive)."""
        return PredictionProtocol(
            PredictionProtocol.QUERY_SET,
            own_batch_norm="batch",
            adaptation="class feature maps from the support set, scored by the relation module",
        )

    def learning_rate(self, iteration: int) -> float:
        """The paper's step decay, from the number of episodes trained before this step."""
        return halved_every(
            self.config["lr"], self.config["lr_halve_every"], iteration, self.batch_size()
        )

    def relation_scores(self, episodes: EpisodeBatch) -> Tensor:
        """Relation scores ``[T, N*Q, ways]`` of every query with every class."""
        ways = episodes.ways
        scores = []
        for t in range(len(episodes)):
            support = self.embedding(episodes.support_x[t])
            query = self.embedding(episodes.query_x[t])
            classes = class_features(
                support, episodes.support_y[t], ways, self.config["class_feature"]
            )
            pairs = relation_pairs(classes, query)
            scores.append(self.relation(pairs).view(query.shape[0], ways))
        return torch.stack(scores)

    def loss(self, scores: Tensor, query_y: Tensor) -> Tensor:
        """The objective: mean squared error between the scores and the one-hot matches."""
        targets = one_hot_targets(query_y, scores.shape[-1], scores.dtype)
        return nn.functional.mse_loss(scores, targets)

    # -- the learner contract ------------------------------------------------------------
    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        self.embedding.train()
        self.relation.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(iteration)
        return supervised_step(
            self.optimizer,
            lambda: self.loss(self.relation_scores(batch), batch.query_y),
            before_step=self.clip_gradients,
        )

    def clip_gradients(self) -> None:
        if self.config["grad_clip"] > 0:
            nn.utils.clip_grad_norm_(self.embedding.parameters(), self.config["grad_clip"])
            nn.utils.clip_grad_norm_(self.relation.parameters(), self.config["grad_clip"])

    @torch.no_grad()
    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.embedding.eval()
        self.relation.eval()
        return self.relation_scores(episodes)


@hookimpl
def fewbench_register_learners(register: Callable[[type], None]) -> None:
    register(RelationNet)
