"""RFS-simple: a supervised embedding and a logistic regression fitted on each support set.

Tian, Wang, Krishnan, Tenenbaum & Isola, "Rethinking Few-Shot Image Classification: a
Good Embedding Is All You Need?", ECCV 2020 (arXiv:2003.11539); authors' code:
github.com/WangYueFt/rfs (``train_supervised.py``, ``eval/meta_eval.py``).

Training ("RFS-simple", the paper's supervised embedding): backbone + linear classifier
trained with the cross-entropy on labelled batches from all training classes; SGD with
momentum 0.9, weight decay 5e-4, batches of 64, learning rate 0.05 multiplied by 0.1 at
60% and 80% of training (the code's mini-ImageNet schedule: 100 epochs,
``lr_decay_epochs`` 60,80).

Test time, per episode: the classifier is dropped, the frozen backbone embeds support and
query, every embedding is L2-normalised (``normalize`` in ``meta_eval.py``), and a
multinomial logistic regression is fitted on the support set with scikit-learn, as the
authors' code does: ``LogisticRegression(random_state=0, solver='lbfgs', max_iter=1000,
multi_class='multinomial')``, so an L2 penalty with ``C = 1``. Recent scikit-learn has no
``multi_class`` (lbfgs is multinomial for three or more classes, and was by default since
0.22), so it is not passed. The query outputs are the regression's log-probabilities.

Deliberate deviations:

* Self-distillation ("RFS-distill", born-again students) is left out.
* The authors' evaluation adds 5 augmented copies of each support image
  (``n_aug_support_samples``); here the support set is used as drawn.
* Embeddings are computed per episode over support and query together, because fewbench's
  backbones normalise with batch statistics (the authors' network uses running averages).
* ``embedding: penultimate`` (the default) uses the backbone's features, as the paper
  describes; ``logits`` uses the pretraining classifier's outputs, which is what the
  code's ``meta_test(use_logit=True)`` evaluates by default (it reports both).
* Step decay is placed at fractions of the pretraining iterations, not at epochs.

scikit-learn is imported only when the learner is set up, so ``fewbench plugins`` works
without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
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


def logistic_regression_class() -> Any:
    """scikit-learn's ``LogisticRegression``, or a one-line error saying how to install it."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise FewbenchError(
            "the rfs learner needs scikit-learn: pip install 'fewbench[rfs]' (or scikit-learn)"
        ) from None
    return LogisticRegression


def normalize(features: Tensor) -> Tensor:
    """Each row divided by its L2 norm (the authors' ``normalize``, guarded against zero)."""
    return nn.functional.normalize(features, dim=-1)


class RFS(Learner):
    name = "rfs"
    display_name = "RFS-simple"
    state_attributes = ("network", "optimizer")
    description = "Supervised embedding + per-episode logistic regression (Tian et al. 2020)"
    batch_kind = "examples"
    params = {
        "batch_size": Param(64, minimum=1, help="pretraining batch size"),
        "iterations": Param(
            None,
            type=int,
            nullable=True,
            minimum=1,
            help="pretraining steps (default train.iterations)",
        ),
        "lr": Param(0.05, minimum=0.0, help="SGD learning rate (momentum 0.9)"),
        "weight_decay": Param(5e-4, minimum=0.0, help="SGD weight decay"),
        "lr_decay_at": Param(
            [0.6, 0.8],
            item_type=float,
            minimum=0.0,
            help="fractions of the pretraining iterations after which the rate decays",
        ),
        "lr_decay": Param(0.1, minimum=0.0, help="learning rate factor at each decay"),
        "embedding": Param(
            "penultimate",
            choices=("penultimate", "logits"),
            help="backbone features, or the pretraining classifier's outputs",
        ),
        "C": Param(1.0, minimum=0.0, help="inverse L2 penalty of the logistic regression"),
        "max_iter": Param(1000, minimum=1, help="lbfgs iterations of the logistic regression"),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        if not ctx.task_type.predicts_classes:
            raise FewbenchError(
                f"{self.name} fits a logistic regression: it needs a classification dataset, "
                f"not {ctx.task_type.name}"
            )
        self.regression_class = logistic_regression_class()  # fail before training, not after
        self.features, self.width = ctx.backbone.build_features(ctx.input_shape)
        self.classifier = nn.Linear(self.width, ctx.num_train_classes)
        self.network = nn.Sequential(self.features, self.classifier).to(ctx.device)
        self.optimizer = torch.optim.SGD(
            self.network.parameters(),
            lr=self.config["lr"],
            momentum=0.9,
            weight_decay=self.config["weight_decay"],
        )
        self.total_iterations: int | None = None

    def batch_size(self) -> int:
        return self.config["batch_size"]

    def iterations(self, suite_iterations: int) -> int:
        self.total_iterations = self.config["iterations"] or suite_iterations
        return self.total_iterations

    def describe_engine(self) -> str:
        return f"scikit-learn logistic regression on {self.config['embedding']} embeddings"

    def prediction_protocol(self) -> PredictionProtocol:
        """A logistic regression fitted on the support embeddings (lbfgs until it converges,
        at most ``max_iter`` iterations: no fixed step count); support and query embedded in
        one pass per episode (transductive with batch statistics)."""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_QUERY,
            adaptation="a logistic regression fitted on the support embeddings (scikit-learn "
            f"lbfgs, at most {self.config['max_iter']} iterations)",
        )

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
        return supervised_step(
            self.optimizer, lambda: self.ctx.loss(self.network(batch.x), batch.y)
        )

    @torch.no_grad()
    def embed(self, episodes: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """L2-normalised embeddings of support ``[T, NK, E]`` and query ``[T, NQ, E]``."""
        self.network.eval()
        embed = self.network if self.config["embedding"] == "logits" else self.features
        n_support = episodes.support_x.shape[1]
        support, query = [], []
        for t in range(len(episodes)):
            both = normalize(embed(torch.cat([episodes.support_x[t], episodes.query_x[t]])))
            support.append(both[:n_support])
            query.append(both[n_support:])
        return torch.stack(support), torch.stack(query)

    def fit_regression(self, support: np.ndarray, labels: np.ndarray) -> Any:
        """The authors' classifier, fitted on one episode's support embeddings."""
        regression = self.regression_class(
            C=self.config["C"], solver="lbfgs", max_iter=self.config["max_iter"], random_state=0
        )
        return regression.fit(support, labels)

    def predict(self, episodes: EpisodeBatch) -> Tensor:
        support, query = self.embed(episodes)
        support_np = support.double().cpu().numpy()
        query_np = query.double().cpu().numpy()
        labels = episodes.support_y.cpu().numpy()
        outputs = np.full((len(episodes), query_np.shape[1], episodes.ways), -np.inf)
        for t in range(len(episodes)):
            regression = self.fit_regression(support_np[t], labels[t])
            # Columns follow regression.classes_; every label of an episode has support.
            outputs[t][:, regression.classes_] = regression.predict_log_proba(query_np[t])
        return torch.from_numpy(outputs).to(device=query.device, dtype=torch.float32)


@hookimpl
def fewbench_register_learners(register):
    register(RFS)
