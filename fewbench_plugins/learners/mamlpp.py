"""MAML++ (Antoniou, Edwards & Storkey, How to train your MAML, ICLR 2019, section 4).

Five of the paper's changes to MAML, each a parameter that switches it off so that
an ablation is a list in the suite:

* ``msl``: multi-step loss (section 4, "Multi-Step Loss Optimization"): the
  meta-objective is the weighted sum of the query losses after every inner step.
  The weights are the authors' code's schedule (``get_per_step_loss_importance_vector``
  in HowToTrainYourMAMLPytorch): all ``1/S`` at epoch 0; each non-final weight falls
  by ``1/(S * msl_epochs)`` per epoch to at least ``0.03/S``, the final weight rises
  by what they lose; after ``msl_epochs`` epochs only the final step's loss counts.
  :func:`msl_weights` is that schedule.
* ``derivative_order_annealing`` (section 4, "Derivative-Order Annealing"): first
  order for the first ``first_order_epochs`` epochs, second order after.
* ``lslr`` (section 4, "Learning Per-Layer Per-Step Learning Rates"): one learnt
  inner learning rate per parameter tensor and per step, starting at ``inner_lr``
  (the core's :class:`~fewbench.methods.adaptation.StepSizes`, ``per="tensor"``).
* ``per_step_bn`` (section 4, "Per-Step Batch Normalization Running Statistics" and
  "Per-Step Batch Normalization Weights and Biases"): one batch-norm weight and bias
  per step (:class:`~fewbench.methods.adaptation.PerStepBatchNorm`), meta-learnt and not
  adapted in the inner loop. Deviation: normalisation uses each step's batch
  statistics, as the authors' code does in every phase; the per-step running
  statistics that code also accumulates are never read there, so none are kept.
* ``cosine_annealing`` (section 4, "Cosine Annealing of Meta-Optimizer Learning
  Rate"): the meta learning rate follows a cosine from ``meta_lr`` to ``min_meta_lr``
  over the training epochs (PyTorch's ``CosineAnnealingLR`` stepped once an epoch, as
  in their code).

An epoch is ``iterations_per_epoch`` meta-iterations (500 in the authors' configs).
The defaults follow the authors' configs (HowToTrainYourMAMLPytorch), which differ
between datasets and versions: 5 inner steps; LSLR starting at 0.1 (their 20-way
Omniglot config; 0.01 in the mini-ImageNet one); ``msl_epochs`` 15 (the current
mini-ImageNet config; 20 in the Omniglot one); ``first_order_epochs`` 80 (an older
mini-ImageNet config; the current one never anneals, ``-1``); ``min_meta_lr``
0.00001 (the older config). The paper's own values could not be read here. The
paper's results are ensembles of the top validation models; fewbench tests one.
Batched engine: yes (every change is expressible under vmap).
"""

from __future__ import annotations

import math

from fewbench.methods.adaptation import (
    PerStepBatchNorm,
    StepSizes,
    Which,
    batch_norm_affine_names,
    cosine,
    parameter_names,
)
from fewbench.plugin import EpisodeBatch, FewbenchError, Param, hookimpl
from fewbench_plugins.learners.maml import FAMILY_PARAMS, MAML


def msl_weights(steps: int, msl_epochs: int, epoch: int) -> list[float]:
    """The multi-step loss weights of ``epoch`` (from 0); sums to 1."""
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - epoch * decay, floor)
    weights[-1] = min(weights[-1] + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


class MAMLPlusPlus(MAML):
    name = "mamlpp"
    display_name = "MAML++"
    description = "MAML++: MAML with the five stabilising changes of Antoniou et al. (2019)"
    state_attributes = ("adapter", "optimizer")
    adapts = "the parameters (per-step batch-norm weights aside), at learnt per-step rates"
    params = {
        **FAMILY_PARAMS,
        "inner_lr": Param(0.1, minimum=0.0, help="inner step size (the start of every LSLR rate)"),
        "inner_steps": Param(5, minimum=1, help="inner gradient steps while meta-training"),
        "eval_inner_steps": Param(5, minimum=0, help="inner steps at validation and test time"),
        "iterations_per_epoch": Param(500, minimum=1, help="meta-iterations per epoch"),
        "msl": Param(True, help="multi-step loss"),
        "msl_epochs": Param(15, minimum=1, help="epochs during which the multi-step loss is used"),
        "derivative_order_annealing": Param(True, help="first order for first_order_epochs"),
        "first_order_epochs": Param(80, minimum=0, help="epochs of first order before second"),
        "lslr": Param(True, help="learnt per-layer per-step inner learning rates"),
        "per_step_bn": Param(True, help="per-step batch-norm weights and biases"),
        "cosine_annealing": Param(True, help="cosine annealing of the meta learning rate"),
        "min_meta_lr": Param(0.00001, minimum=0.0, help="where the cosine annealing ends"),
    }

    def setup(self, ctx):
        self.total_iterations = getattr(self, "total_iterations", 0)
        super().setup(ctx)

    def iterations(self, suite_iterations: int) -> int:
        self.total_iterations = suite_iterations
        return suite_iterations

    # -- the adapter's pieces ----------------------------------------------------------
    def _bn_names(self) -> set[str]:
        return set(batch_norm_affine_names(self.model))

    def adapted(self) -> Which:
        if not self.config["per_step_bn"]:
            return "all"
        frozen = self._bn_names()  # replaced by the per-step weights, which do not adapt
        return lambda name: name not in frozen

    def step_size(self) -> float | StepSizes:
        if not self.config["lslr"]:
            return self.config["inner_lr"]
        names = parameter_names(self.model, self.adapted())
        steps = max(self.config["inner_steps"], self.config["eval_inner_steps"])
        return StepSizes(self.model, names, self.config["inner_lr"], per="tensor", steps=steps)

    def per_step_batch_norm(self) -> PerStepBatchNorm | None:
        if not self.config["per_step_bn"]:
            return None
        if not self._bn_names():
            raise FewbenchError(
                f"mamlpp: the {self.ctx.backbone.name} backbone has no batch norm with weights "
                "for per-step batch norm; set per_step_bn: false"
            )
        steps = max(self.config["inner_steps"], self.config["eval_inner_steps"])
        return PerStepBatchNorm(self.model, steps)

    # -- the schedules -------------------------------------------------------------------
    def epoch_of(self, iteration: int) -> int:
        return (iteration - 1) // self.config["iterations_per_epoch"]

    def step_weights(self, epoch: int) -> list[float] | None:
        if self.config["msl"] and epoch < self.config["msl_epochs"]:
            return msl_weights(self.config["inner_steps"], self.config["msl_epochs"], epoch)
        return None

    def first_order_at(self, epoch: int) -> bool:
        if self.config["first_order"]:
            return True
        return (
            self.config["derivative_order_annealing"] and epoch < self.config["first_order_epochs"]
        )

    def meta_lr_at(self, epoch: int) -> float:
        if not self.config["cosine_annealing"] or not self.total_iterations:
            return self.config["meta_lr"]
        epochs = math.ceil(self.total_iterations / self.config["iterations_per_epoch"])
        return cosine(self.config["meta_lr"], self.config["min_meta_lr"], epoch / epochs)

    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        epoch = self.epoch_of(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = self.meta_lr_at(epoch)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.meta_gradient_step(
            batch, first_order=self.first_order_at(epoch), step_weights=self.step_weights(epoch)
        )
        self.optimizer.step()
        return loss

    def describe_engine(self) -> str:
        described = super().describe_engine()
        if self.config["derivative_order_annealing"] and not self.config["first_order"]:
            epochs = self.config["first_order_epochs"]
            described = described.replace(
                "second-order", f"first-order {epochs} epochs, then second", 1
            )
        return described


@hookimpl
def fewbench_register_learners(register):
    register(MAMLPlusPlus)
