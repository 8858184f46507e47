"""MetaOptNet-SVM: a multi-class SVM solved on each support set, trained end to end.

Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex Optimization",
CVPR 2019 (arXiv:1904.03758); authors' code github.com/kjunelee/MetaOptNet (``train.py``,
``models/classification_heads.py``).

Per episode (Sec. 3, Eq. 3-4): the backbone embeds support and query; Crammer & Singer's
multi-class SVM is fitted on the support embeddings through its dual (``C`` 0.1, the code's
``C_reg``), with the linear kernel; a query's logits are ``scale * sum_i alpha_i^m <x_i, q>``
with a learnt ``scale`` starting at 1 (the code's ``ClassificationHead``). Training minimises
the cross-entropy with label smoothing 0.1 (``--eps``) over the query set, back-propagating
through the SVM's solution into the backbone.

Training settings (``train.py``): SGD with Nesterov momentum 0.9, weight decay 5e-4, learning
rate 0.1 multiplied by 0.06, 0.012 and 0.0024 after epochs 20, 40 and 50 of 60 (here at those
fractions of the training steps), 8 episodes per step. The paper trains with more shots than it
tests (mini-ImageNet 15, CIFAR-FS 5): a suite sets ``tasks.train_shots``. Its ResNet-12 keeps the
last feature map whole (``resnet12`` with ``global_pool: false``).

Deliberate deviation: the authors solve the dual with qpth's interior-point method (20
iterations in training, 3 at test in ``test.py``) and differentiate through its KKT conditions;
qpth is unmaintained, so fewbench solves it by accelerated projected gradient
(``solver_iterations``, 100 by default) and back-propagates through those iterations
(:mod:`fewbench.methods.svm`, checked against scipy's SLSQP in ``tests/test_metaoptnet.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fewbench.methods.svm import svm_logits
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
from fewbench_plugins.learners.protonet import embed_episodes, refuse_non_classification
from fewbench_plugins.learners.schedules import decayed_at_fractions


def smoothed_cross_entropy(logits: Tensor, labels: Tensor, epsilon: float) -> Tensor:
    """The authors' smoothing: target ``1 - epsilon`` on the label and ``epsilon / (N - 1)`` on
    each other class (PyTorch's ``label_smoothing`` spreads ``epsilon / N`` over all)."""
    ways = logits.shape[-1]
    one_hot = nn.functional.one_hot(labels, ways).to(logits.dtype)
    target = one_hot * (1 - epsilon) + (1 - one_hot) * epsilon / max(ways - 1, 1)
    return -(target * nn.functional.log_softmax(logits, -1)).sum(-1).mean()


class MetaOptNetSVM(Learner):
    name = "metaoptnet_svm"
    display_name = "MetaOptNet-SVM"
    description = "A differentiable multi-class SVM head on each support set (Lee et al. 2019)"
    state_attributes = ("network", "optimizer")
    params = {
        "C": Param(0.1, minimum=0.0, help="the SVM's C (MetaOptNet: 0.1)"),
        "solver_iterations": Param(
            100, minimum=1, help="projected-gradient iterations of the dual (differentiated)"
        ),
        "label_smoothing": Param(0.1, minimum=0.0, help="of the training loss (MetaOptNet: 0.1)"),
        "lr": Param(0.1, minimum=0.0, help="SGD learning rate, Nesterov 0.9 (MetaOptNet: 0.1)"),
        "weight_decay": Param(5e-4, minimum=0.0, help="SGD weight decay (MetaOptNet: 5e-4)"),
        "lr_steps": Param(
            [1 / 3, 2 / 3, 5 / 6],
            item_type=float,
            minimum=0.0,
            help="fractions of training after which the rate steps (MetaOptNet: epochs 20, 40, "
            "50 of 60)",
        ),
        "lr_factors": Param(
            [0.06, 0.012, 0.0024],
            item_type=float,
            minimum=0.0,
            help="the rate's factor after each step (MetaOptNet: 0.06, 0.012, 0.0024)",
        ),
        "meta_batch_size": Param(8, minimum=1, help="episodes per step (MetaOptNet: 8)"),
    }

    def check(self) -> None:
        if len(self.config["lr_steps"]) != len(self.config["lr_factors"]):
            raise FewbenchError(
                f"learner {self.name}: lr_steps and lr_factors need as many values each "
                f"({len(self.config['lr_steps'])} and {len(self.config['lr_factors'])})"
            )

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        refuse_non_classification(self.name, ctx)
        self.network = nn.Module()
        self.network.features, _ = ctx.backbone.build_features(ctx.input_shape)
        self.network.scale = nn.Parameter(torch.tensor(1.0))
        self.network.to(ctx.device)
        self.features = self.network.features
        self.optimizer = torch.optim.SGD(
            self.network.parameters(),
            lr=self.config["lr"],
            momentum=0.9,
            nesterov=True,
            weight_decay=self.config["weight_decay"],
        )
        self.total_iterations: int | None = None

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def iterations(self, suite_iterations: int) -> int:
        self.total_iterations = suite_iterations
        return suite_iterations

    def learning_rate(self, iteration: int) -> float:
        """The step schedule at ``iteration``; the base rate until the total is known."""
        return decayed_at_fractions(
            self.config["lr"],
            self.config["lr_steps"],
            self.config["lr_factors"],
            iteration,
            self.total_iterations,
        )

    def logits(self, episodes: EpisodeBatch) -> Tensor:
        support, query = embed_episodes(self.network.features, episodes)
        scores = svm_logits(
            support,
            episodes.support_y,
            query,
            episodes.ways,
            C=self.config["C"],
            iterations=self.config["solver_iterations"],
        )
        return self.network.scale * scores

    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        self.network.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(iteration)
        smoothing = self.config["label_smoothing"]

        def loss() -> Tensor:
            return smoothed_cross_entropy(self.logits(batch), batch.query_y, smoothing)

        return supervised_step(self.optimizer, loss)

    @torch.no_grad()
    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.network.eval()
        return self.logits(episodes)

    def prediction_protocol(self) -> PredictionProtocol:
        """An SVM fitted on the support embeddings (a fixed number of solver iterations, not
        gradient steps of the network); support and query embedded in one pass (transductive
        with batch statistics only)."""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_QUERY,
            adaptation="a multi-class SVM fitted on the support embeddings (dual, "
            f"{self.config['solver_iterations']} projected-gradient iterations)",
        )


@hookimpl
def fewbench_register_learners(register: Callable[[type], None]) -> None:
    register(MetaOptNetSVM)
