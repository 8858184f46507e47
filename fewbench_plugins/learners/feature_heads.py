"""Classifiers on frozen features: SimpleShot, a logistic-regression probe and kNN, P>M>F's
fine-tuning on each support set, and the base class the transductive methods
(``transductive.py``) share with them.

Every method here classifies an episode from features of a backbone that does not change
at test time. The backbone comes from one of two places:

* **Trained by the cell** (the backbone has no ``weights``): SimpleShot's recipe (Wang, Chao,
  Weinberger & van der Maaten, "SimpleShot: Revisiting Nearest-Neighbor Classification for
  Few-Shot Learning", arXiv:1911.04623; the authors' code github.com/mileyan/simple_shot,
  ``src/train.py``): the backbone and a linear classifier over all training classes trained
  with the cross-entropy on labelled batches; SGD with momentum 0.9 (no Nesterov), weight
  decay 1e-4, batches of 256, learning rate 0.1 multiplied by 0.1 after 50% and 75% of
  training (epochs 45 and 67 of 90). TIM's and LaplacianShot's backbones were trained the
  same way with label smoothing 0.1 (``label_smoothing``).
* **Given** (the backbone's ``weights``: a file of a backbone trained elsewhere, for example
  by another cell, ``fewbench export --backbone``; or a pretrained library backbone, ``timm``
  or ``open_clip`` with hub weights): nothing trains, and the cell evaluates
  the frozen features. Several methods then share one trained backbone, so their numbers
  differ by the method alone.

At test time the backbone runs in eval mode (a ``batch_norm: running`` backbone then treats
each example alone; with ``batch_norm: batch`` the support and query of an episode are
normalised together, which the protocol card counts as transductive). Features are
transformed as SimpleShot's Sec. 3 defines (``transform``): ``UN``, ``L2N`` or ``CL2N``,
the last centred by the **base-class mean**, the mean feature of every training example
(the authors' ``extract_feature``: the train split, no augmentation, the model in eval
mode). That mean is computed from the cell's training split whenever the backbone has
changed since it was last computed (before each validation and before the test) and is
kept in the learner's state, so a model file carries it.

Deliberate deviations from SimpleShot's code:

* Model selection: the authors validate every 4 epochs on 500 1-shot episodes with the
  cosine rule on uncentred features; here the cell's validation episodes are classified by
  the cell's own method (``train.validate_every``).
* Augmentation is the suite's ``train.augment`` (fewbench's flips and crops; the authors use
  RandomResizedCrop and flips); the Omniglot suite uses none (rotations are classes there).
* The schedule's steps are placed at fractions of the iterations, not at epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fewbench.methods.feature_heads import (
    TRANSFORMS,
    class_means,
    logistic_regression,
    nearest_centroid,
    nearest_neighbours,
    transform_features,
)
from fewbench.methods.finetuning import cosine_logits, finetune_on_support
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
from fewbench_plugins.learners.protonet import embed_episodes, refuse_non_classification
from fewbench_plugins.learners.schedules import step_decay

BASE_MEAN_BATCH = 512  # training examples per forward pass when the base-class mean is computed

# The pretraining parameters every frozen-feature learner shares (SimpleShot's recipe).
PRETRAINING_PARAMS: dict[str, Param] = {
    "batch_size": Param(256, minimum=1, help="pretraining batch size (SimpleShot: 256)"),
    "iterations": Param(
        None,
        type=int,
        nullable=True,
        minimum=1,
        help="pretraining steps (default train.iterations; none when the backbone has weights)",
    ),
    "lr": Param(0.1, minimum=0.0, help="SGD learning rate, momentum 0.9 (SimpleShot: 0.1)"),
    "weight_decay": Param(1e-4, minimum=0.0, help="SGD weight decay (SimpleShot: 1e-4)"),
    "lr_decay_at": Param(
        [0.5, 0.75],
        item_type=float,
        minimum=0.0,
        help="fractions of the pretraining after which the rate decays (SimpleShot: epochs "
        "45 and 67 of 90)",
    ),
    "lr_decay": Param(0.1, minimum=0.0, help="learning rate factor at each decay"),
    "label_smoothing": Param(
        0.0,
        minimum=0.0,
        help="label smoothing of the pretraining cross-entropy (SimpleShot: 0; TIM's and "
        "LaplacianShot's backbones: 0.1)",
    ),
}


def transform_param(default: str, why: str) -> Param:
    return Param(
        default,
        choices=TRANSFORMS,
        help=f"feature transform: UN, L2N or CL2N (centred by the base-class mean); {why}",
    )


class FrozenFeatureLearner(Learner):
    """A backbone trained (or given) once, then frozen; a method on its features per episode.

    A subclass sets :attr:`transform_default` in its ``params`` and implements :meth:`head`;
    a transductive one sets :attr:`transductive_because`."""

    batch_kind = "examples"
    state_attributes = ("network", "optimizer")
    # Why a query's prediction depends on the other queries (empty: it does not).
    transductive_because: ClassVar[str] = ""
    # What adapts to the support set, in words, for the protocol card.
    adaptation: ClassVar[str] = ""

    # -- setup and training ---------------------------------------------------------------
    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        refuse_non_classification(self.name, ctx)
        self.features, self.width = ctx.backbone.build_features(ctx.input_shape)
        self.classifier = nn.Linear(self.width, ctx.num_train_classes)
        self.network = nn.Sequential(self.features, self.classifier).to(ctx.device)
        self.optimizer = torch.optim.SGD(
            self.network.parameters(),
            lr=self.config["lr"],
            momentum=0.9,
            weight_decay=self.config["weight_decay"],
        )
        self.base_mean = torch.zeros(self.width, device=ctx.device)
        self.base_mean_current = False
        self.total_iterations: int | None = None
        self.features_key: str | None = None  # the frozen backbone's digest, for the cache

    @property
    def backbone_given(self) -> bool:
        """Whether the backbone arrived trained (weights or pretrained): then nothing trains."""
        return bool(self.ctx is not None and self.ctx.backbone.arrives_trained())

    def batch_size(self) -> int:
        return self.config["batch_size"]

    def iterations(self, suite_iterations: int) -> int:
        if self.backbone_given:
            self.total_iterations = 0
        else:
            self.total_iterations = self.config["iterations"] or suite_iterations
        return self.total_iterations

    def learning_rate(self, iteration: int) -> float:
        """The step schedule at ``iteration``; undecayed until :meth:`iterations` is known."""
        return step_decay(
            self.config["lr"],
            self.config["lr_decay_at"],
            self.config["lr_decay"],
            iteration,
            self.total_iterations,
        )

    def train_step(self, batch: LabelledBatch, iteration: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(iteration)
        self.network.train()
        self.base_mean_current = False
        smoothing = self.config["label_smoothing"]
        return supervised_step(
            self.optimizer,
            lambda: nn.functional.cross_entropy(
                self.network(batch.x), batch.y, label_smoothing=smoothing
            ),
        )

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "base_mean": self.base_mean,
            "base_mean_current": self.base_mean_current,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.base_mean = state["base_mean"].to(self.base_mean.device)
        self.base_mean_current = bool(state["base_mean_current"])

    # -- the base-class mean --------------------------------------------------------------
    @property
    def needs_base_mean(self) -> bool:
        return self.config["transform"] == "CL2N"

    @torch.no_grad()
    def update_base_mean(self) -> None:
        """The mean feature of every training example, with the backbone as it is now."""
        examples = self.ctx.base_examples if self.ctx is not None else None
        if examples is None:
            raise FewbenchError(
                f"{self.name}: transform CL2N needs the base-class mean, which needs the "
                "training split's examples in order; this dataset cannot give them (choose "
                "transform L2N)"
            )
        self.network.eval()
        total = torch.zeros(self.width, dtype=torch.float64, device=self.base_mean.device)
        count = 0
        for batch in examples(BASE_MEAN_BATCH):
            total += self.features(batch.x).double().sum(0)
            count += len(batch.y)
        self.base_mean = (total / max(count, 1)).float()
        self.base_mean_current = True

    # -- prediction -----------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, episodes: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """Support ``[T, S, D]`` and query ``[T, Q, D]`` features: looked up in the cell's
        feature cache when the backbone is given (frozen for the whole cell) and treats each
        example alone; else one eval-mode pass per episode over both sets."""
        self.network.eval()
        cache = self.ctx.feature_cache if self.ctx is not None else None
        if cache is not None and self.backbone_given:
            if self.features_key is None:
                self.features_key = cache.digest(self.features)
            found = cache.episode_features(self.features, self.features_key, episodes)
            if found is not None:
                return found
        return embed_episodes(self.features, episodes)

    def transformed(self, features: Tensor) -> Tensor:
        return transform_features(
            features, self.config["transform"], self.base_mean if self.needs_base_mean else None
        )

    def predict(self, episodes: EpisodeBatch) -> Tensor:
        if self.needs_base_mean and not self.base_mean_current:
            self.update_base_mean()
        support, query = self.embed(episodes)
        with torch.no_grad():
            return self.head(support, episodes.support_y, query, episodes.ways)

    def head(self, support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
        """Query scores ``[T, Q, ways]`` from raw (untransformed) features."""
        self.not_implemented("head")

    def prediction_protocol(self) -> PredictionProtocol:
        """Support and query of an episode embedded in one eval-mode pass (batch norm with
        running statistics treats each example alone; without them, the card says
        transductive); the method itself is transductive where the class says why."""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_QUERY,
            adaptation=self.adaptation,
            transductive_because=self.transductive_because,
        )

    def describe_engine(self) -> str:
        frozen = "given backbone" if self.backbone_given else "pretrained backbone"
        return f"{self.config['transform']} features of the {frozen}"


def frozen_params(transform: str, why: str, **own: Param) -> dict[str, Param]:
    """A frozen-feature learner's parameters: the shared pretraining, its transform, its own."""
    return {**PRETRAINING_PARAMS, "transform": transform_param(transform, why), **own}


class SimpleShot(FrozenFeatureLearner):
    """SimpleShot (Wang et al. 2019): nearest class mean of the transformed features.

    Sec. 3: each query takes the label of the nearest support class mean in Euclidean
    distance (the code's ``num_NN = 1``; with one shot, the nearest support example), after
    the feature transform, CL2N by default (the paper's best)."""

    name = "simpleshot"
    display_name = (({"transform": "UN"}, "SimpleShot (UN)"), ({}, "SimpleShot"))
    description = "Nearest class mean on centred, L2-normalised features (Wang et al. 2019)"
    adaptation = "class means of the transformed support features (no gradient step)"
    params = frozen_params("CL2N", "SimpleShot's best: CL2N")

    def head(self, support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
        return nearest_centroid(self.transformed(support), labels, self.transformed(queries), ways)


class LogisticProbe(FrozenFeatureLearner):
    """A multinomial logistic regression fitted on each episode's transformed support
    features (the linear probe of Tian et al. 2020's RFS and of frozen-feature studies),
    scikit-learn's objective (``C``, unpenalised bias) minimised by L-BFGS in float64
    (:func:`fewbench.methods.feature_heads.logistic_regression`), all episodes of a batch
    at once. RFS's defaults: L2-normalised features, ``C = 1``."""

    name = "logistic_probe"
    display_name = "Logistic regression (frozen)"
    description = "Logistic regression on frozen support features (the linear probe)"
    adaptation = "a logistic regression fitted on the support features (L-BFGS)"
    params = frozen_params(
        "L2N",
        "RFS's: L2N",
        C=Param(1.0, minimum=0.0, help="inverse L2 penalty (RFS: 1)"),
        max_iter=Param(100, minimum=1, help="L-BFGS iterations"),
    )

    def head(self, support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
        return logistic_regression(
            self.transformed(support),
            labels,
            self.transformed(queries),
            ways,
            C=self.config["C"],
            max_iter=self.config["max_iter"],
        )


class NearestNeighbours(FrozenFeatureLearner):
    """A vote of the ``k`` nearest transformed support features, ties to the class whose
    voters are nearer (:func:`fewbench.methods.feature_heads.nearest_neighbours`); with
    ``k = 1``, SimpleShot's 1-shot rule."""

    name = "knn"
    display_name = "kNN (frozen)"
    description = "k-nearest-neighbour vote on frozen support features"
    adaptation = "the k nearest support features vote (no gradient step)"
    params = frozen_params(
        "CL2N", "SimpleShot's: CL2N", k=Param(1, minimum=1, help="neighbours that vote")
    )

    def head(self, support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
        return nearest_neighbours(
            self.transformed(support), labels, self.transformed(queries), ways, self.config["k"]
        )


class FineTunedPrototypes(FrozenFeatureLearner):
    """P>M>F's meta-test fine-tuning (Hu et al. 2022, Sec. 3.3; ``ProtoNet_Finetune`` in the
    authors' code): for each episode a copy of the backbone is fine-tuned on the support set,
    Adam on every parameter for ``steps`` steps at ``finetune_lr``, each step classifying the
    augmented support set (:func:`fewbench.methods.finetuning.diff_augment`: colour and
    translation with probability 0.9, and flips) against the prototypes of the un-augmented
    support set with the cosine classifier ``scale * (cos + bias)``; the queries are then
    classified the same way by the fine-tuned copy. ``finetune_lr`` 0 is P>M>F without its F
    (the ProtoNet classifier on the backbone as given).

    In P>M>F the backbone is pretrained on external data (DINO) and meta-trained as a ProtoNet
    with this cosine classifier before this step; here it is given by ``weights`` (any cell's
    ``fewbench export --backbone``, for instance of ``protonet`` with ``distance: cosine``) or
    trained with SimpleShot's recipe. Deviations: the authors choose the learning rate per
    domain on a few validation episodes from {0, 1e-4, 1e-3, 1e-2} (``fewbench tune`` does that
    on the cell's validation episodes; the default 1e-3 is one of them); 50 steps, the
    README's example (the code's default is 40, its Meta-Dataset commands use 100); the scale
    and bias are the classifier's initial values (10 and 0: the meta-trained ones are not part
    of a backbone's weights); the copy is fine-tuned in eval mode, so batch norms keep their
    running statistics (the authors' ViTs have none)."""

    name = "finetune_pmf"
    display_name = "P>M>F fine-tuning"
    description = "Backbone fine-tuned on each support set, cosine prototypes (Hu et al. 2022)"
    adaptation = "the backbone fine-tuned on the augmented support set (Adam), cosine prototypes"
    params = frozen_params(
        "UN",
        "the cosine classifier normalises: UN",
        steps=Param(50, minimum=0, help="fine-tuning steps per episode (P>M>F README: 50)"),
        finetune_lr=Param(
            1e-3, minimum=0.0, help="Adam rate (P>M>F: chosen from 0, 1e-4, 1e-3, 1e-2)"
        ),
        scale=Param(10.0, minimum=0.0, help="cosine classifier scale (P>M>F: 10)"),
        bias=Param(0.0, help="cosine classifier bias (P>M>F: 0)"),
    )

    def check(self) -> None:
        if self.config["transform"] != "UN":
            raise FewbenchError(
                f"learner {self.name}: transform {self.config['transform']} does not apply "
                "(the cosine classifier normalises the features itself); leave it UN"
            )

    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.network.eval()
        scores = []
        for t in range(len(episodes)):
            generator = torch.Generator().manual_seed(t)
            tuned = finetune_on_support(
                self.features,
                episodes.support_x[t],
                episodes.support_y[t],
                episodes.ways,
                steps=self.config["steps"],
                lr=self.config["finetune_lr"],
                scale=self.config["scale"],
                bias=self.config["bias"],
                generator=generator,
            )
            with torch.no_grad():
                support, query = tuned(episodes.support_x[t]), tuned(episodes.query_x[t])
                prototypes = class_means(support[None], episodes.support_y[t][None], episodes.ways)
                scores.append(
                    cosine_logits(query, prototypes[0], self.config["scale"], self.config["bias"])
                )
        return torch.stack(scores)

    def prediction_protocol(self) -> PredictionProtocol:
        """Fine-tuned on the support set alone (``steps`` Adam steps); the query set through
        the tuned copy in its own eval-mode pass: inductive with running statistics,
        transductive with batch statistics (the query set normalised together)."""
        return PredictionProtocol(
            PredictionProtocol.QUERY_SET,
            adaptation=self.adaptation,
            adaptation_steps=self.config["steps"] if self.config["finetune_lr"] else 0,
        )


LEARNERS: tuple[type[Learner], ...] = (
    SimpleShot,
    LogisticProbe,
    NearestNeighbours,
    FineTunedPrototypes,
)


@hookimpl
def fewbench_register_learners(register: Callable[[type], None]) -> None:
    for learner in LEARNERS:
        register(learner)
