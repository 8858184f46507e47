"""Reptile (Nichol, Achiam & Schulman, On First-Order Meta-Learning Algorithms, 2018).

Their Algorithm 2 (batched version), one meta-iteration:

1. for each of ``meta_batch_size`` tasks, ``W_i = SGD(L_task, phi, k)``: ``inner_steps``
   steps of Adam (or SGD) on the task's examples, ``inner_batch`` at a time (their
   section 6 and appendix A: Adam with ``beta1 = 0`` in the inner loop);
2. ``phi <- phi + epsilon * mean_i(W_i - phi)``, the outer step size ``epsilon``
   annealed linearly from ``outer_lr`` to ``outer_lr_final`` over training (their
   code's ``frac_done`` rule).

No support/query split while training: a training episode's support and query
examples together are the task's data (set ``tasks.train_shots`` for their "train
shots"), in one order drawn per meta-iteration from a generator seeded by the
iteration (so a resumed run draws the same). At test time the support set is
learnt with ``eval_inner_steps`` steps of ``eval_inner_batch`` examples, then the
query set is predicted either all at once (``transductive: true``: batch norm sees
every query example, as MAML's evaluation) or one query example at a time together
with the support set (``transductive: false``, their default evaluation).

Defaults are the authors' Omniglot 5-way command (openai/supervised-reptile README,
which the author says is the paper's Appendix A): inner batch 10, 5 inner steps of
Adam at 0.001 with ``beta1 = 0``, meta-batch 5, outer step 1 annealed to 0, 50 test
steps on batches of 5, train shots 10 (set ``tasks.train_shots``); their test
episodes have one query example per class, and their count is 10,000.

Deviation: the inner Adam's moments start at zero for every task; the authors'
TensorFlow code keeps the Adam slot variables across tasks (they are not part of
the model state it resets). Independent states are what lets the tasks of a
meta-batch be adapted at once (batched engine: yes, vmap over tasks).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from fewbench.methods.adaptation import Adapter
from fewbench.plugin import (
    EpisodeBatch,
    FewbenchError,
    Learner,
    LearnerContext,
    Param,
    PredictionProtocol,
    hookimpl,
)


class Reptile(Learner):
    name = "reptile"
    display_name = (({"transductive": True}, "Reptile + Transduction"), ({}, "Reptile"))
    description = (
        "Reptile: move the initialisation towards task-adapted weights (Nichol et al. 2018)"
    )
    state_attributes = ("model",)
    out_of_memory_hint = "lower meta_batch_size or set tasks_per_call"
    params = {
        "inner_lr": Param(0.001, minimum=0.0, help="inner-loop (Adam or SGD) step size"),
        "inner_optimizer": Param("adam", choices=("adam", "sgd"), help="inner-loop optimizer"),
        "inner_steps": Param(5, minimum=1, help="inner steps per task while meta-training"),
        "inner_batch": Param(10, minimum=0, help="examples per inner step (0 = all)"),
        "eval_inner_steps": Param(50, minimum=0, help="inner steps at validation and test"),
        "eval_inner_batch": Param(5, minimum=0, help="examples per inner step at test (0 = all)"),
        "outer_lr": Param(1.0, minimum=0.0, help="outer step size epsilon at the start"),
        "outer_lr_final": Param(0.0, minimum=0.0, help="epsilon at the end (linear annealing)"),
        "meta_batch_size": Param(5, minimum=1, help="tasks per meta-iteration"),
        "transductive": Param(False, help="predict the query set at once (batch norm sees it)"),
        "engine": Param("auto", choices=("auto", "batched", "loop"), help="see maml"),
        "tasks_per_call": Param(0, minimum=0, help="batched engine: tasks per vmap call"),
        "threads": Param(0, minimum=0, help="CPU threads adapting shares of the tasks"),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        if ctx.train_ways != ctx.ways:
            raise FewbenchError(
                f"reptile trains one {ctx.ways}-way head: training episodes must be "
                f"{ctx.ways}-way too (tasks.train_ways is {ctx.train_ways})"
            )
        self.total_iterations = getattr(self, "total_iterations", 0)
        self.model = ctx.backbone.build(ctx.input_shape, ctx.ways).to(ctx.device)
        self.adapter = Adapter(
            self.model,
            ctx.loss,
            step_size=self.config["inner_lr"],
            first_order=True,
            optimizer=self.config["inner_optimizer"],
            engine=self.config["engine"],
            threads=self.config["threads"],
            tasks_per_call=self.config["tasks_per_call"],
        )

    def iterations(self, suite_iterations: int) -> int:
        self.total_iterations = suite_iterations
        return suite_iterations

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def outer_lr_at(self, iteration: int) -> float:
        """Linear from ``outer_lr`` (first iteration) towards ``outer_lr_final``."""
        done = (iteration - 1) / self.total_iterations if self.total_iterations else 0.0
        return done * self.config["outer_lr_final"] + (1 - done) * self.config["outer_lr"]

    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        self.model.train()
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        order = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(iteration))
        x, y = x[:, order.to(x.device)], y[:, order.to(y.device)]
        adapted = self.adapter.adapt(
            x, y, steps=self.config["inner_steps"], batch_size=self.config["inner_batch"]
        )
        epsilon = self.outer_lr_at(iteration)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.add_(adapted[name].mean(dim=0) - p, alpha=epsilon)
            loss = self._loss_after(adapted, x, y)
        return loss

    def _loss_after(self, adapted: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
        """The mean training loss of the adapted weights on their task's data (for the curve)."""
        buffers = dict(self.model.named_buffers())

        def task_loss(params, tx, ty):
            return self.ctx.loss(functional_call(self.model, (params, buffers), (tx,)), ty)

        return vmap(task_loss)(adapted, x, y).mean().item()

    def predict(self, episodes: EpisodeBatch) -> Tensor:
        adapted = self.adapter.adapt(
            episodes.support_x,
            episodes.support_y,
            steps=self.config["eval_inner_steps"],
            batch_size=self.config["eval_inner_batch"],
        )
        buffers = dict(self.model.named_buffers())

        def forward(params, x):
            return functional_call(self.model, (params, buffers), (x,))

        with torch.no_grad():
            if self.config["transductive"]:
                return torch.stack(
                    [
                        forward({n: v[t] for n, v in adapted.items()}, episodes.query_x[t])
                        for t in range(len(episodes))
                    ]
                )
            outputs = []
            for t in range(len(episodes)):
                params = {n: v[t] for n, v in adapted.items()}
                support = episodes.support_x[t]

                def one(q, params=params, support=support):
                    return forward(params, torch.cat([support, q.unsqueeze(0)]))[-1]

                outputs.append(vmap(one)(episodes.query_x[t]))
            return torch.stack(outputs)

    def prediction_protocol(self) -> PredictionProtocol:
        """``eval_inner_steps`` steps on the support set, then the query set at once
        (``transductive: true``: its batch statistics) or each query with the support set
        alone (the default: inductive). The network runs in training mode, as in the authors'
        code: a batch norm normalises with the batch at hand even where it keeps running
        statistics."""
        scope = (
            PredictionProtocol.QUERY_SET
            if self.config["transductive"]
            else PredictionProtocol.SUPPORT_AND_ONE_QUERY
        )
        return PredictionProtocol(
            scope,
            running_statistics=False,
            adaptation=f"every parameter, by {self.config['inner_optimizer']} steps on the "
            "support set",
            adaptation_steps=self.config["eval_inner_steps"],
        )

    def describe_engine(self) -> str:
        return f"first-order; {self.adapter.describe()}"


@hookimpl
def fewbench_register_learners(register):
    register(Reptile)
