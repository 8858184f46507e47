"""MAML (Finn, Abbeel & Levine 2017) and its first-order variant.

The inner loop runs through ``torch.func.functional_call`` on a dict of
parameters: ``theta' = theta - inner_lr * grad L_support(theta)``, repeated
``inner_steps`` times. Second order keeps the graph of the inner gradients
(``create_graph=True``), so the query loss at ``theta'`` is differentiated through
the adaptation; first order takes the inner gradients as constants, which makes
``d theta' / d theta`` the identity and applies the query gradient at ``theta'``
directly to ``theta``. ``inner_loop: higher`` runs the same algorithm through the
``higher`` library (the reference implementation used in tests and benchmarks).

The meta-loss is the mean of the tasks' query losses, as in Finn et al.'s code;
the meta-optimizer is Adam with ``meta_lr``.
"""

from __future__ import annotations

import higher
import torch
from torch import Tensor
from torch.func import functional_call

from fewbench.data import EpisodeBatch
from fewbench.hookspecs import hookimpl
from fewbench.learner import Learner, LearnerContext
from fewbench.params import Param

Params = dict[str, Tensor]


class MAML(Learner):
    name = "maml"
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
        "inner_loop": Param(
            "functional", choices=("functional", "higher"), help="inner-loop implementation"
        ),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        self.model = ctx.backbone.build(ctx.input_shape, ctx.ways).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config["meta_lr"])

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def describe_engine(self) -> str:
        order = "first-order" if self.config["first_order"] else "second-order"
        return f"{self.config['inner_loop']} per-task loop, {order}"

    # -- the inner loop ------------------------------------------------------------
    def adapt(self, params: Params, x: Tensor, y: Tensor, steps: int, create_graph: bool) -> Params:
        """``steps`` SGD steps on the support set, as a differentiable function of ``params``."""
        lr = self.config["inner_lr"]
        for _ in range(steps):
            loss = self.ctx.loss(functional_call(self.model, params, (x,)), y)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {name: p - lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
        return params

    def meta_gradient_step(self, batch: EpisodeBatch) -> float:
        """Accumulate the meta-gradient of the mean query loss into ``.grad``; return the loss."""
        tasks = len(batch)
        steps = self.config["inner_steps"]
        second_order = not self.config["first_order"]
        if self.config["inner_loop"] == "higher":
            return self._higher_meta_gradient(batch, steps, second_order)
        base = dict(self.model.named_parameters())
        total = 0.0
        for t in range(tasks):
            adapted = self.adapt(base, batch.support_x[t], batch.support_y[t], steps, second_order)
            query_out = functional_call(self.model, adapted, (batch.query_x[t],))
            loss = self.ctx.loss(query_out, batch.query_y[t]) / tasks
            loss.backward()  # per task, so only one task's graph is alive at a time
            total += loss.item()
        return total

    def _higher_meta_gradient(self, batch: EpisodeBatch, steps: int, second_order: bool) -> float:
        tasks = len(batch)
        inner_opt = torch.optim.SGD(self.model.parameters(), lr=self.config["inner_lr"])
        params = list(self.model.parameters())
        total = 0.0
        for t in range(tasks):
            with higher.innerloop_ctx(
                self.model, inner_opt, copy_initial_weights=False, track_higher_grads=second_order
            ) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(self.ctx.loss(fmodel(batch.support_x[t]), batch.support_y[t]))
                loss = self.ctx.loss(fmodel(batch.query_x[t]), batch.query_y[t]) / tasks
                if second_order:
                    loss.backward()
                else:  # higher detaches the fast weights: carry their gradient over to theta
                    grads = torch.autograd.grad(loss, list(fmodel.parameters()))
                    for p, g in zip(params, grads, strict=True):
                        p.grad = g.detach() if p.grad is None else p.grad + g.detach()
                total += loss.item()
        return total

    # -- the learner contract ------------------------------------------------------------
    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.meta_gradient_step(batch)
        self.optimizer.step()
        return loss

    def predict(self, episodes: EpisodeBatch) -> Tensor:
        steps = self.config["eval_inner_steps"]
        outputs = []
        for t in range(len(episodes)):
            base = {name: p.detach().requires_grad_() for name, p in self.model.named_parameters()}
            with torch.enable_grad():
                adapted = self.adapt(
                    base, episodes.support_x[t], episodes.support_y[t], steps, False
                )
            with torch.no_grad():
                outputs.append(functional_call(self.model, adapted, (episodes.query_x[t],)))
        return torch.stack(outputs)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class FirstOrderMAML(MAML):
    name = "fomaml"
    description = "First-order MAML: the query gradient at the adapted weights updates theta"
    params = {**MAML.params, "first_order": Param(True, help="drop second derivatives")}


@hookimpl
def fewbench_register_learners(register):
    register(MAML)
    register(FirstOrderMAML)
