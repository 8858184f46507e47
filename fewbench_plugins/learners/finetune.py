"""Pretrain + fine-tune (Chen et al. 2019): Baseline (linear head) and Baseline++ (cosine head).

Meta-training is ordinary supervised learning of backbone + head over all training
classes. On each evaluation episode the backbone is frozen, a new head is fitted on
the support features, and the query set is classified. Heads of all episodes in a
chunk are fitted at once as one batched problem (their losses are independent, so
this equals fitting them one by one). Features are computed per episode over support
and query together, because the backbone normalises with batch statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewbench.plugin import (
    EpisodeBatch,
    LabelledBatch,
    Learner,
    LearnerContext,
    Param,
    PredictionProtocol,
    hookimpl,
    supervised_step,
)


def cosine_scale(classes: int) -> float:
    """Chen et al.'s temperature for cosine logits: 2 for few classes, 10 for many."""
    return 2.0 if classes <= 200 else 10.0


class CosineHead(nn.Module):
    """Scaled cosine similarity between features and class weight vectors (Baseline++)."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, width) * 0.01)
        self.scale = cosine_scale(classes)

    def forward(self, x: Tensor) -> Tensor:
        return (
            self.scale
            * nn.functional.normalize(x, dim=-1)
            @ nn.functional.normalize(self.weight, dim=-1).T
        )


class FineTune(Learner):
    name = "finetune"
    display_name = (({"head": "cosine"}, "Baseline++"), ({}, "Baseline"))
    state_attributes = ("network", "optimizer")
    description = "Pretrain on all training classes, fit a new head per episode (Chen et al. 2019)"
    batch_kind = "examples"
    params = {
        "head": Param(
            "linear", choices=("linear", "cosine"), help="linear: Baseline; cosine: Baseline++"
        ),
        "batch_size": Param(64, minimum=1, help="pretraining batch size"),
        "iterations": Param(
            None,
            type=int,
            nullable=True,
            minimum=1,
            help="pretraining steps (default train.iterations)",
        ),
        "optimizer": Param("adam", choices=("adam", "sgd"), help="pretraining optimizer"),
        "lr": Param(0.001, minimum=0.0, help="pretraining learning rate"),
        "finetune_steps": Param(
            100, minimum=0, help="steps fitting the new head on each support set"
        ),
        "finetune_lr": Param(
            0.01, minimum=0.0, help="learning rate of the new head (SGD, momentum 0.9)"
        ),
        "finetune_weight_decay": Param(0.001, help="weight decay of the new head"),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        self.features, self.width = ctx.backbone.build_features(ctx.input_shape)
        self.head = self._new_head(ctx.num_train_classes)
        self.network = nn.Sequential(self.features, self.head).to(ctx.device)
        if self.config["optimizer"] == "adam":
            self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.config["lr"])
        else:
            self.optimizer = torch.optim.SGD(
                self.network.parameters(), lr=self.config["lr"], momentum=0.9
            )

    def _new_head(self, classes: int) -> nn.Module:
        if self.config["head"] == "cosine" and not self.ctx.task_type.predicts_classes:
            raise ValueError("head: cosine is a classifier; use head: linear for regression")
        if self.config["head"] == "cosine":
            return CosineHead(self.width, classes)
        return nn.Linear(self.width, classes)

    def batch_size(self) -> int:
        return self.config["batch_size"]

    def iterations(self, suite_iterations: int) -> int:
        return self.config["iterations"] or suite_iterations

    def describe_engine(self) -> str:
        return f"batched {self.config['head']} heads"

    def prediction_protocol(self) -> PredictionProtocol:
        """A new head fitted by ``finetune_steps`` SGD steps on the frozen support features;
        support and query features computed in one pass per episode (transductive with batch
        statistics)."""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_QUERY,
            adaptation=f"a new {self.config['head']} head on the frozen support features (SGD)",
            adaptation_steps=self.config["finetune_steps"],
        )

    def train_step(self, batch: LabelledBatch, iteration: int) -> float:
        self.network.train()
        return supervised_step(
            self.optimizer, lambda: self.ctx.loss(self.network(batch.x), batch.y)
        )

    @torch.no_grad()
    def _episode_features(self, episodes: EpisodeBatch) -> tuple[Tensor, Tensor]:
        support, query = [], []
        n_support = episodes.support_x.shape[1]
        for t in range(len(episodes)):
            both = self.features(torch.cat([episodes.support_x[t], episodes.query_x[t]]))
            support.append(both[:n_support])
            query.append(both[n_support:])
        return torch.stack(support), torch.stack(query)

    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.network.eval()
        support, query = self._episode_features(episodes)  # [T, NK, D], [T, NQ, D]
        tasks, ways = len(episodes), episodes.ways
        regression = not self.ctx.task_type.predicts_classes
        if regression:
            ways = episodes.support_y.shape[-1]  # outputs per point
        bias = torch.zeros(tasks, ways, device=support.device, requires_grad=True)
        if self.config["head"] == "cosine" and not regression:
            # Start from the class means of the support features: deterministic, and
            # a zero vector has no direction for the cosine to use.
            one_hot = nn.functional.one_hot(episodes.support_y, ways).float()  # [T, NK, N]
            means = one_hot.transpose(1, 2) @ support / one_hot.sum(1)[:, :, None]
            weight = means.clone().requires_grad_()
            parameters = [weight]
        else:
            weight = torch.zeros(tasks, ways, self.width, device=support.device, requires_grad=True)
            parameters = [weight, bias]
        optimizer = torch.optim.SGD(
            parameters,
            lr=self.config["finetune_lr"],
            momentum=0.9,
            weight_decay=self.config["finetune_weight_decay"],
        )
        targets = episodes.support_y
        with torch.enable_grad():
            for _ in range(self.config["finetune_steps"]):
                optimizer.zero_grad(set_to_none=True)
                logits = self._head_logits(support, weight, bias, ways)
                # Sum over episodes of each episode's mean loss: heads stay independent.
                if regression:
                    loss = ((logits - targets) ** 2).mean(dim=(1, 2)).sum()
                else:
                    loss = (
                        nn.functional.cross_entropy(
                            logits.reshape(-1, ways), targets.reshape(-1), reduction="sum"
                        )
                        / targets.shape[1]
                    )
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return self._head_logits(query, weight, bias, ways)

    def _head_logits(self, features: Tensor, weight: Tensor, bias: Tensor, ways: int) -> Tensor:
        if self.config["head"] == "cosine" and self.ctx.task_type.predicts_classes:
            normed = nn.functional.normalize(features, dim=-1)
            return (
                cosine_scale(ways)
                * normed
                @ nn.functional.normalize(weight, dim=-1).transpose(1, 2)
            )
        return features @ weight.transpose(1, 2) + bias[:, None, :]


@hookimpl
def fewbench_register_learners(register):
    register(FineTune)
