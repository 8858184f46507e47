"""Meta-Baseline: a pretrained classifier, then meta-training with cosine prototypes.

Chen, Liu, Xu, Darrell & Wang, "Meta-Baseline: Exploring Simple Meta-Learning for
Few-Shot Learning", ICCV 2021 (arXiv:2003.04390); authors' code:
github.com/yinboc/few-shot-meta-baseline (``train_classifier.py``, ``train_meta.py``,
``models/meta_baseline.py``, ``configs/train_*_mini.yaml``).

One cell runs both stages of the paper's method:

1. **Classifier-Baseline** (``pretrain_iterations`` steps on labelled batches from all
   training classes): backbone + linear classifier, cross-entropy; SGD with momentum 0.9,
   learning rate 0.1, weight decay 5e-4, batches of 128, the rate multiplied by 0.1 after
   90% of the steps (the code's mini-ImageNet configuration: 100 epochs, milestone 90).
2. **Meta-Baseline** (``meta_iterations`` steps on meta-batches of episodes): the
   classifier is dropped; each class's centroid ``c_k`` is the mean of its support
   features, and a query ``q`` gets the logits ``τ · cos(f(q), c_k)`` (their softmax is
   the paper's ``p(y = k | q)``) with a learnt temperature ``τ`` starting at 10;
   cross-entropy on the query set; SGD with momentum 0.9, learning rate 0.001, weight
   decay 5e-4 (``τ`` included, as the code's optimizer takes all parameters), 4 episodes
   per batch, no decay.

At test time (after either stage) each episode is classified by the same cosine
nearest-centroid rule, which is how the paper evaluates the Classifier-Baseline:
``meta_iterations: 0`` gives that row.

The core draws labelled batches for the first ``pretrain_iterations`` iterations and
episodes afterwards, through :meth:`fewbench.plugin.learner.Learner.batch_kind_at`.

Deliberate deviations:

* Features are computed per episode over support and query together, because fewbench's
  backbones normalise with batch statistics (the code encodes the 4 episodes of a batch in
  one pass and evaluates with running averages).
* The schedules count iterations, not epochs: the stage-1 decay sits at a fraction of
  ``pretrain_iterations``.
* The best state is chosen on validation episodes over both stages, by the core; the code
  keeps the last stage-1 epoch and selects the meta stage on validation accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewbench.plugin import (
    EpisodeBatch,
    FewbenchError,
    LabelledBatch,
    Learner,
    LearnerContext,
    Param,
    PredictionProtocol,
    hookimpl,
    supervised_step,
)
from fewbench_plugins.learners.schedules import step_decay


def cosine_prototype_logits(
    support: Tensor, support_y: Tensor, query: Tensor, ways: int, temperature: Tensor | float
) -> Tensor:
    """``τ · cos(q, c_k)`` ``[T, NQ, ways]``, ``c_k`` the mean support feature of class ``k``."""
    one_hot = nn.functional.one_hot(support_y, ways).to(support.dtype)  # [T, NK, N]
    centroids = one_hot.transpose(1, 2) @ support / one_hot.sum(1)[:, :, None]
    cosine = nn.functional.normalize(query, dim=-1) @ nn.functional.normalize(
        centroids, dim=-1
    ).transpose(1, 2)
    return temperature * cosine


class MetaBaseline(Learner):
    name = "meta_baseline"
    display_name = (({"meta_iterations": 0}, "Classifier-Baseline"), ({}, "Meta-Baseline"))
    state_attributes = ("model", "pretrain_optimizer", "meta_optimizer")
    description = (
        "Classifier-Baseline pretraining, then meta-training of cosine prototypes "
        "(Chen et al. 2021)"
    )
    batch_kind = "examples"  # stage 1; batch_kind_at switches to episodes for stage 2
    out_of_memory_hint = "lower pretrain_batch_size or meta_batch_size"
    params = {
        "pretrain_iterations": Param(
            None,
            type=int,
            nullable=True,
            minimum=0,
            help="stage 1 (Classifier-Baseline) steps (default train.iterations)",
        ),
        "pretrain_batch_size": Param(128, minimum=1, help="stage 1 batch size"),
        "pretrain_lr": Param(0.1, minimum=0.0, help="stage 1 SGD learning rate (momentum 0.9)"),
        "pretrain_lr_decay_at": Param(
            [0.9],
            item_type=float,
            minimum=0.0,
            help="fractions of stage 1 after which its learning rate decays",
        ),
        "pretrain_lr_decay": Param(0.1, minimum=0.0, help="stage 1 learning rate factor"),
        "meta_iterations": Param(
            None,
            type=int,
            nullable=True,
            minimum=0,
            help="stage 2 (meta) steps (default train.iterations; 0: Classifier-Baseline)",
        ),
        "meta_batch_size": Param(4, minimum=1, help="episodes per stage 2 step"),
        "meta_lr": Param(0.001, minimum=0.0, help="stage 2 SGD learning rate (momentum 0.9)"),
        "weight_decay": Param(5e-4, minimum=0.0, help="SGD weight decay of both stages"),
        "temperature": Param(10.0, help="initial temperature τ of the cosine logits"),
        "learn_temperature": Param(True, help="meta-learn τ"),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        if not ctx.task_type.predicts_classes:
            raise FewbenchError(
                f"{self.name} classifies by cosine prototypes: it needs a classification "
                f"dataset, not {ctx.task_type.name}"
            )
        self.features, self.width = ctx.backbone.build_features(ctx.input_shape)
        self.classifier = nn.Linear(self.width, ctx.num_train_classes)
        temperature = torch.tensor(float(self.config["temperature"]))
        self.model = nn.Module()
        self.model.features = self.features
        self.model.classifier = self.classifier
        if self.config["learn_temperature"]:
            self.model.temperature = nn.Parameter(temperature)
        else:
            self.model.register_buffer("temperature", temperature)
        self.model.to(ctx.device)
        decay = self.config["weight_decay"]
        self.pretrain_optimizer = torch.optim.SGD(
            [*self.features.parameters(), *self.classifier.parameters()],
            lr=self.config["pretrain_lr"],
            momentum=0.9,
            weight_decay=decay,
        )
        meta_parameters = list(self.features.parameters())
        if self.config["learn_temperature"]:
            meta_parameters.append(self.model.temperature)
        self.meta_optimizer = torch.optim.SGD(
            meta_parameters, lr=self.config["meta_lr"], momentum=0.9, weight_decay=decay
        )
        self.pretrain_total: int | None = None  # known once the core asks for iterations()
        self.stage = "examples"

    # -- stages --------------------------------------------------------------------------
    def iterations(self, suite_iterations: int) -> int:
        pretrain, meta = self.config["pretrain_iterations"], self.config["meta_iterations"]
        self.pretrain_total = suite_iterations if pretrain is None else pretrain
        meta = suite_iterations if meta is None else meta
        if self.pretrain_total + meta == 0:
            raise FewbenchError(f"{self.name}: pretrain_iterations and meta_iterations are both 0")
        return self.pretrain_total + meta

    def batch_kind_at(self, iteration: int) -> str:
        if self.pretrain_total is None:
            raise RuntimeError("iterations() fixes the stages; call it before batch_kind_at()")
        self.stage = "examples" if iteration <= self.pretrain_total else "episodes"
        return self.stage

    def batch_size(self) -> int:
        """The size for the stage :meth:`batch_kind_at` last answered (the core asks it first)."""
        if self.stage == "examples":
            return self.config["pretrain_batch_size"]
        return self.config["meta_batch_size"]

    def describe_engine(self) -> str:
        return "cosine nearest centroid"

    def prediction_protocol(self) -> PredictionProtocol:
        """Cosine nearest centroid, no gradient step; support and query features in one pass
        per episode (transductive with batch statistics)."""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_QUERY,
            adaptation="class centroids of the support features, cosine similarity (no gradient "
            "step)",
        )

    # -- training ------------------------------------------------------------------------
    def train_step(self, batch: LabelledBatch | EpisodeBatch, iteration: int) -> float:
        self.model.train()
        if isinstance(batch, LabelledBatch):
            return self._pretrain_step(batch, iteration)
        return self._meta_step(batch)

    def _pretrain_step(self, batch: LabelledBatch, iteration: int) -> float:
        lr = step_decay(
            self.config["pretrain_lr"],
            self.config["pretrain_lr_decay_at"],
            self.config["pretrain_lr_decay"],
            iteration,
            self.pretrain_total,
        )
        for group in self.pretrain_optimizer.param_groups:
            group["lr"] = lr
        return supervised_step(
            self.pretrain_optimizer,
            lambda: self.ctx.loss(self.classifier(self.features(batch.x)), batch.y),
        )

    def _meta_step(self, batch: EpisodeBatch) -> float:
        return supervised_step(
            self.meta_optimizer, lambda: self.ctx.loss(self._logits(batch), batch.query_y)
        )

    def _logits(self, episodes: EpisodeBatch) -> Tensor:
        n_support = episodes.support_x.shape[1]
        support, query = [], []
        for t in range(len(episodes)):
            both = self.features(torch.cat([episodes.support_x[t], episodes.query_x[t]]))
            support.append(both[:n_support])
            query.append(both[n_support:])
        return cosine_prototype_logits(
            torch.stack(support),
            episodes.support_y,
            torch.stack(query),
            episodes.ways,
            self.model.temperature,
        )

    @torch.no_grad()
    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.model.eval()
        return self._logits(episodes)


@hookimpl
def fewbench_register_learners(register):
    register(MetaBaseline)
