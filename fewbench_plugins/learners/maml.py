"""MAML (Finn, Abbeel & Levine 2017) and its first-order variant.

Inner loop: ``theta' = theta - inner_lr * grad L_support(theta)``, repeated
``inner_steps`` times. Second order differentiates the query loss at ``theta'``
through the adaptation; first order takes the inner gradients as constants, which
makes ``d theta' / d theta`` the identity and applies the query gradient at
``theta'`` directly to ``theta``. The meta-loss is the mean of the tasks' query
losses, as in Finn et al.'s code; the meta-optimizer is Adam with ``meta_lr``.

The inner loop is the core's :class:`fewbench.methods.adaptation.Adapter` (every
parameter adapts, one fixed scalar step size); how the tasks of a meta-batch are
computed (all at once, or one at a time) is its ``engine``. ``engine: higher`` runs
the ``higher`` library instead, the reference the engines are tested against
(:mod:`fewbench_plugins.learners.maml_engines`).

Batch norm of the query set (``eval_batch_norm``), where the backbone keeps no running
statistics (``batch_norm: batch``): ``transductive`` (the default, Finn et al.'s code) forwards
the query set as one batch after adaptation, so each query is normalised with the statistics
of the whole query set and its prediction depends on the other queries; ``inductive``
normalises each query with the support set's statistics at the adapted weights
(:func:`fewbench.methods.adaptation.support_statistics`), so a query's prediction depends on
the support set and itself alone. The choice holds in meta-training too (the query loss is
computed the same way), so the model is tested as it was trained. A backbone with
``batch_norm: running`` is tested with its running statistics (inductive) either way.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from fewbench.methods.adaptation import ENGINES as CORE_ENGINES
from fewbench.methods.adaptation import (
    Adapter,
    EngineChoice,
    PerStepBatchNorm,
    StepSizes,
    TaskInit,
    Which,
)
from fewbench.methods.cuda_graphs import GRAPH_MODES, GraphStep
from fewbench.plugin import (
    EpisodeBatch,
    FewbenchError,
    Learner,
    LearnerContext,
    Param,
    PredictionProtocol,
    hookimpl,
)
from fewbench_plugins.learners import data_parallel, maml_engines
from fewbench_plugins.learners.maml_engines import ENGINES


class MAML(Learner):
    name = "maml"
    display_name = "MAML"
    state_attributes = ("model", "optimizer")
    out_of_memory_hint = "lower meta_batch_size or use first_order: true"
    description = "Model-agnostic meta-learning, second order (Finn et al. 2017)"
    params = {
        "inner_lr": Param(0.4, minimum=0.0, help="inner-loop step size (alpha)"),
        "inner_steps": Param(1, minimum=0, help="inner gradient steps while meta-training"),
        "eval_inner_steps": Param(
            3, minimum=0, help="inner gradient steps at validation and test time"
        ),
        "meta_batch_size": Param(32, minimum=1, help="tasks per meta-update"),
        "meta_lr": Param(0.001, minimum=0.0, help="Adam learning rate of the meta-update (beta)"),
        "first_order": Param(False, help="drop second derivatives (first-order MAML)"),
        "engine": Param(
            "auto",
            choices=ENGINES,
            help="all tasks at once (batched, torch.func.vmap), one at a time (loop, higher), "
            "or auto: batched on CUDA and for small tasks on CPU",
        ),
        "tasks_per_call": Param(
            0,
            minimum=0,
            help="batched engine: at most this many tasks per vmap call (0 = all); lowers peak "
            "memory, same result",
        ),
        "threads": Param(
            0,
            minimum=0,
            help="CPU: threads that adapt shares of the meta-batch in parallel (0 = one per "
            "core); ignored on CUDA",
        ),
        "graph": Param(
            "auto",
            choices=GRAPH_MODES,
            added_later=True,
            help="CUDA: replay each meta-iteration as one captured CUDA graph (auto: after a "
            "self-check against an eager step, else eager, with the reason recorded; on: "
            "fail instead of falling back; off: eager). Ignored on CPU",
        ),
        "eval_batch_norm": Param(
            "transductive",
            choices=("transductive", "inductive"),
            added_later=True,
            help="batch norm of the query set (batch_norm: batch backbones): transductive "
            "(Finn et al.: the query set's own statistics, so a query's prediction depends on "
            "the other queries) or inductive (the support set's statistics; in meta-training "
            "too)",
        ),
    }

    def check(self) -> None:
        super().check()
        if self.config["engine"] == "higher" and self.config["eval_batch_norm"] != "transductive":
            raise FewbenchError(
                f"{self.name}: engine: higher is the reference of Finn et al.'s transductive "
                "MAML; eval_batch_norm: inductive needs engine batched, loop or auto"
            )

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        if ctx.train_ways != ctx.ways:
            raise FewbenchError(
                f"{self.name} adapts one {ctx.ways}-way head to every episode: training "
                f"episodes must be {ctx.ways}-way too (tasks.train_ways is {ctx.train_ways})"
            )
        self.model = ctx.backbone.build(ctx.input_shape, ctx.ways).to(ctx.device)
        self.adapter = self.build_adapter(ctx).to(ctx.device)
        learnt = [p for p in self.adapter.parameters() if p.requires_grad]
        # capturable: Adam's step count lives on the GPU, so a CUDA graph can take the step.
        self.optimizer = torch.optim.Adam(
            learnt, lr=self.config["meta_lr"], capturable=ctx.device.type == "cuda"
        )

    def build_adapter(self, ctx: LearnerContext) -> Adapter:
        """The inner loop; a learner of the family overrides this (or the pieces below)."""
        engine = self.config["engine"]
        return Adapter(
            self.model,
            ctx.loss,
            adapt=self.adapted(),
            step_size=self.step_size(),
            first_order=self.config["first_order"],
            engine="loop" if engine == "higher" else engine,  # higher is a training reference
            threads=self.config["threads"],
            tasks_per_call=self.config["tasks_per_call"],
            per_step_batch_norm=self.per_step_batch_norm(),
            task_init=self.task_init(),
            query_statistics=(
                "support" if self.config["eval_batch_norm"] == "inductive" else "query"
            ),
        )

    def adapted(self) -> Which:
        """Which parameters the inner loop adapts: every one (MAML)."""
        return "all"

    def step_size(self) -> float | StepSizes:
        """The inner step size: one fixed scalar (MAML)."""
        return self.config["inner_lr"]

    def per_step_batch_norm(self) -> PerStepBatchNorm | None:
        return None

    def task_init(self) -> TaskInit | None:
        return None

    @property
    def engines(self) -> dict[str, EngineChoice]:
        """The engine chosen for each phase (train | predict), from its first batch."""
        return self.adapter.engines

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def engine_for(self, phase: str, batch: EpisodeBatch) -> EngineChoice:
        """The engine for ``phase`` (train | predict), chosen once, from its first batch."""
        if phase == "train" and self.config["engine"] == "higher":
            return self.engines.setdefault(phase, EngineChoice("higher", 1, "set in the suite"))
        return self.adapter.engine_for(phase, batch)

    def describe_engine(self) -> str:
        order = "first-order" if self.config["first_order"] else "second-order"
        if not self.engines:
            return f"{self.config['engine']} ({order}; chosen at the first batch)"
        return f"{order}; {self.adapter.describe()}"

    # What the inner loop adapts, in words, for the protocol card (a subclass says its own).
    adapts: ClassVar[str] = "every parameter"

    def prediction_protocol(self) -> PredictionProtocol:
        """``eval_inner_steps`` gradient steps on the support set, then one forward of the
        query set (its own batch statistics: Finn et al.'s transductive test) or, with
        ``eval_batch_norm: inductive``, of each query with the support set's statistics."""
        inductive = self.config["eval_batch_norm"] == "inductive"
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_ONLY if inductive else PredictionProtocol.QUERY_SET,
            adaptation=f"{self.adapts}, by gradient steps on the support set",
            adaptation_steps=self.config["eval_inner_steps"],
        )

    def meta_gradient_step(self, batch: EpisodeBatch, **options: Any) -> float:
        """Add the meta-gradient of the mean query loss to ``.grad``; return that loss.

        Under ``torch.distributed`` (several ranks), each rank adapts its share of the
        tasks and the shares are combined (:mod:`fewbench_plugins.learners.data_parallel`)."""

        def local(tasks: EpisodeBatch) -> float:
            if self.engine_for("train", tasks).engine == "higher":
                return maml_engines.higher_meta_gradient(
                    self.model,
                    self.ctx.loss,
                    tasks,
                    lr=self.config["inner_lr"],
                    steps=self.config["inner_steps"],
                    second_order=not self.config["first_order"],
                )
            return self.adapter.meta_gradient(tasks, steps=self.config["inner_steps"], **options)

        if data_parallel.active():
            return data_parallel.meta_gradient(self.adapter, batch, local)
        return local(batch)

    # -- the learner contract ------------------------------------------------------------
    def train_step(self, batch: EpisodeBatch, iteration: int) -> float | Tensor:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.meta_gradient_step(batch)
        self.optimizer.step()
        return loss

    def graph_step(self) -> GraphStep | None:
        """MAML's step is the same at every iteration: offered for capture on CUDA, unless
        ``graph: off``, the ``higher`` reference, several ranks, or a subclass whose own
        ``train_step`` may read the iteration (it must opt in itself)."""
        if (
            self.config["graph"] == "off"
            or self.ctx.device.type != "cuda"
            or self.config["engine"] == "higher"
            or data_parallel.active()
            or type(self).train_step is not MAML.train_step
        ):
            return None
        return GraphStep(
            lambda batch: self.train_step(batch, 0),
            required=self.config["graph"] == "on",
            parameters=[p for group in self.optimizer.param_groups for p in group["params"]],
        )

    def predict(self, episodes: EpisodeBatch) -> Tensor:
        return self.adapter.predict(episodes, steps=self.config["eval_inner_steps"])


# The family's learners built on MAML: its parameters, less the ``higher`` engine (a reference
# implementation of MAML itself, which would silently ignore what the subclass changes).
FAMILY_PARAMS = {
    **MAML.params,
    "engine": Param(
        "auto",
        choices=CORE_ENGINES,
        help="all tasks at once (batched, torch.func.vmap), one at a time (loop), or auto: "
        "batched on CUDA and for small tasks on CPU",
    ),
}


class FirstOrderMAML(MAML):
    name = "fomaml"
    display_name = "FO-MAML"
    description = "First-order MAML: the query gradient at the adapted weights updates theta"
    params = {**MAML.params, "first_order": Param(True, help="drop second derivatives")}


@hookimpl
def fewbench_register_learners(register):
    register(MAML)
    register(FirstOrderMAML)
