"""FEAT: prototypes adapted to their episode by a set-to-set Transformer.

Ye, Hu, Zhan & Sha, "Few-Shot Learning via Embedding Adaptation with Set-to-Set Functions",
CVPR 2020 (arXiv:1812.03664); authors' code github.com/Sha-Lab/FEAT (``model/models/feat.py``,
``model/trainer/fsl_trainer.py``, ``model/trainer/helpers.py``).

Per episode (Sec. 3.2 and 4, as ``FEAT._forward`` runs it):

* the backbone embeds support and query; prototypes are the class means of the support
  embeddings;
* the prototypes, as one set, pass through a one-head Transformer layer (Eq. 3):
  ``LayerNorm(x + Dropout_0.5(fc(softmax(Q K^T / sqrt(d)) V)))`` with ``Q, K, V`` linear maps
  of the prototypes without bias (initialised normal with std ``sqrt(2 / (2d))``), ``fc`` with a
  bias (Xavier-normal weight), dropout 0.1 on the attention; the queries are not adapted;
* logits are ``-||q - p'_k||^2 / temperature`` (the Euclidean variant the paper reports).

Training adds the contrastive regulariser (Sec. 3.3, the code's ``aux`` task): the support and
query embeddings of each class, as a set of their own, pass through the same Transformer; each
class's centre is the mean of its adapted instances; every unadapted instance is classified by
``-||x - c_k||^2 / temperature2``; the loss is ``CE(logits) + balance * CE(regulariser)``.

Defaults are the README's ConvNet settings on mini-ImageNet (the current repository): Adam with
learning rate 1e-4 for the backbone and 10 times that for the Transformer (``lr_mul``), halved
every 20 epochs of 100 episodes (2,000 episodes); 1-shot: temperature 64, temperature2 16,
balance 1; 5-shot: temperature 32, temperature2 64, balance 0.1 (``temperature`` and the others
left unset take these by the cell's shots: 1 shot, the 1-shot values; more, the 5-shot ones).
The backbone starts from pretrained weights in the paper (the code's ``--init_weights``): give the
backbone ``weights`` (``fewbench export --backbone`` from a SimpleShot or other pretraining cell).

Deliberate deviations: one episode per step with the cell's training episodes (the code: one
episode per step, 15 queries, as a suite sets ``tasks.train_query``); the step decay counts
episodes, not epochs; no separate validation rule (the cell's validation episodes choose the kept
state, as the code's ``max_acc`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fewbench.methods.feature_heads import class_means, squared_distances
from fewbench.plugin import (
    EpisodeBatch,
    Learner,
    LearnerContext,
    Param,
    PredictionProtocol,
    hookimpl,
    supervised_step,
)
from fewbench_plugins.learners.protonet import embed_episodes, refuse_non_classification
from fewbench_plugins.learners.schedules import halved_every

# The README's ConvNet settings by shots: (temperature, temperature2, balance).
ONE_SHOT = (64.0, 16.0, 1.0)
FIVE_SHOT = (32.0, 64.0, 0.1)


class SetAttention(nn.Module):
    """FEAT's one-head Transformer layer on sets ``[B, n, d]`` (the code's
    ``MultiHeadAttention`` with ``n_head = 1``): post-norm residual, no feed-forward."""

    def __init__(self, dim: int, attention_dropout: float = 0.1, dropout: float = 0.5):
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        for layer in (self.query, self.key, self.value):
            nn.init.normal_(layer.weight, mean=0.0, std=math.sqrt(2.0 / (dim + dim)))
        self.out = nn.Linear(dim, dim)
        nn.init.xavier_normal_(self.out.weight)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.scale = math.sqrt(dim)

    def forward(self, x: Tensor) -> Tensor:
        weights = (self.query(x) @ self.key(x).transpose(1, 2) / self.scale).softmax(-1)
        attended = self.attention_dropout(weights) @ self.value(x)
        return self.norm(self.dropout(self.out(attended)) + x)


class FEAT(Learner):
    name = "feat"
    display_name = "FEAT"
    description = "Prototypes adapted by a set-to-set Transformer (Ye et al. 2020)"
    state_attributes = ("network", "optimizer")
    params = {
        "lr": Param(1e-4, minimum=0.0, help="Adam learning rate of the backbone (FEAT: 1e-4)"),
        "lr_mul": Param(10.0, minimum=0.0, help="the Transformer's rate, times lr (FEAT: 10)"),
        "step_episodes": Param(
            2000,
            minimum=0,
            help="multiply the rates by gamma every this many episodes (FEAT: 20 epochs of 100)",
        ),
        "gamma": Param(0.5, minimum=0.0, help="the rate's factor at each step (FEAT: 0.5)"),
        "temperature": Param(
            None,
            type=float,
            nullable=True,
            minimum=0.0,
            help="logit temperature (FEAT ConvNet: 64 at 1 shot, 32 at 5)",
        ),  # fmt: skip
        "temperature2": Param(
            None,
            type=float,
            nullable=True,
            minimum=0.0,
            help="regulariser temperature (FEAT ConvNet: 16 at 1 shot, 64 at 5)",
        ),  # fmt: skip
        "balance": Param(
            None,
            type=float,
            nullable=True,
            minimum=0.0,
            help="weight of the contrastive regulariser (FEAT ConvNet: 1 at 1 shot, 0.1 at 5)",
        ),  # fmt: skip
        "meta_batch_size": Param(1, minimum=1, help="episodes per step (FEAT: 1)"),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        refuse_non_classification(self.name, ctx)
        self.network = nn.Module()
        self.network.features, width = ctx.backbone.build_features(ctx.input_shape)
        self.network.attention = SetAttention(width)
        self.network.to(ctx.device)
        self.features = self.network.features
        rate = self.config["lr"]
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.network.features.parameters(), "lr": rate},
                {
                    "params": self.network.attention.parameters(),
                    "lr": rate * self.config["lr_mul"],
                },
            ]
        )
        defaults = ONE_SHOT if ctx.shots == 1 else FIVE_SHOT
        chosen = [self.config[k] for k in ("temperature", "temperature2", "balance")]
        self.temperature, self.temperature2, self.balance = (
            value if value is not None else default
            for value, default in zip(chosen, defaults, strict=True)
        )

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def learning_rate_factor(self, iteration: int) -> float:
        """StepLR over episodes: ``gamma`` per ``step_episodes`` trained before this step."""
        return halved_every(
            1.0, self.config["step_episodes"], iteration, self.batch_size(), self.config["gamma"]
        )

    def embed(self, episodes: EpisodeBatch) -> tuple[Tensor, Tensor]:
        return embed_episodes(self.network.features, episodes)

    def logits(self, support: Tensor, query: Tensor, labels: Tensor, ways: int) -> Tensor:
        """Eq. 3 and the Euclidean classifier: ``[T, NQ, ways]``."""
        adapted = self.network.attention(class_means(support, labels, ways))
        return -squared_distances(query, adapted) / self.temperature

    def regulariser(self, support: Tensor, query: Tensor, ways: int) -> Tensor:
        """The contrastive term's cross-entropy: each class's instances adapted as a set of
        their own, every unadapted instance classified by its distance to the centres."""
        tasks, dim = support.shape[0], support.shape[-1]
        per_class = torch.cat(
            [support.reshape(tasks, ways, -1, dim), query.reshape(tasks, ways, -1, dim)], dim=2
        )  # [T, N, K+Q, d], class-major as episodes are
        size = per_class.shape[2]
        centres = self.network.attention(per_class.reshape(tasks * ways, size, dim)).mean(1)
        instances = per_class.reshape(tasks, ways * size, dim)
        logits = -squared_distances(instances, centres.reshape(tasks, ways, dim))
        labels = torch.arange(ways, device=support.device).repeat_interleave(size)
        return nn.functional.cross_entropy(
            (logits / self.temperature2).reshape(-1, ways), labels.repeat(tasks)
        )

    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        self.network.train()
        factor = self.learning_rate_factor(iteration)
        self.optimizer.param_groups[0]["lr"] = self.config["lr"] * factor
        self.optimizer.param_groups[1]["lr"] = self.config["lr"] * self.config["lr_mul"] * factor

        def loss() -> Tensor:
            support, query = self.embed(batch)
            logits = self.logits(support, query, batch.support_y, batch.ways)
            main = self.ctx.loss(logits, batch.query_y)
            return main + self.balance * self.regulariser(support, query, batch.ways)

        return supervised_step(self.optimizer, loss)

    @torch.no_grad()
    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.network.eval()
        support, query = self.embed(episodes)
        return self.logits(support, query, episodes.support_y, episodes.ways)

    def prediction_protocol(self) -> PredictionProtocol:
        """The prototypes adapted from the support set alone (the queries are not adapted);
        support and query embedded in one pass (transductive with batch statistics only)."""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_QUERY,
            adaptation="prototypes adapted by a set-to-set Transformer over the support classes",
        )


@hookimpl
def fewbench_register_learners(register: Callable[[type], None]) -> None:
    register(FEAT)
