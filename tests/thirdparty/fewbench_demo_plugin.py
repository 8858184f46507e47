"""A third-party plugin used by the tests, installed as its own distribution.

It provides a prototypical-network learner (Snell et al. 2017), which shows the
learner contract admits a metric-based method with no change to the core, and a
learner whose loss becomes NaN, to test that a diverging cell is contained.
"""

from __future__ import annotations

import torch
from torch import nn

from fewbench.plugin import Learner, Param, hookimpl


class ProtoNet(Learner):
    name = "protonet_demo"
    description = "Prototypical networks: nearest class mean in feature space"
    params = {"meta_batch_size": Param(4, minimum=1), "lr": Param(0.001)}

    def setup(self, ctx):
        super().setup(ctx)
        self.features, _ = ctx.backbone.build_features(ctx.input_shape)
        self.features.to(ctx.device)
        self.optimizer = torch.optim.Adam(self.features.parameters(), lr=self.config["lr"])

    def batch_size(self):
        return self.config["meta_batch_size"]

    def _logits(self, episodes):
        outputs = []
        for t in range(len(episodes)):
            support = self.features(episodes.support_x[t])
            query = self.features(episodes.query_x[t])
            one_hot = nn.functional.one_hot(episodes.support_y[t], episodes.ways).float()
            prototypes = one_hot.T @ support / one_hot.sum(0)[:, None]
            outputs.append(-(torch.cdist(query, prototypes) ** 2))
        return torch.stack(outputs)

    def train_step(self, batch, iteration):
        self.optimizer.zero_grad()
        loss = self.ctx.loss(self._logits(batch), batch.query_y)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def predict(self, episodes):
        return self._logits(episodes)

    def state_dict(self):
        return {"features": self.features.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.features.load_state_dict(state["features"])
        self.optimizer.load_state_dict(state["optimizer"])


class Diverging(ProtoNet):
    name = "diverging_demo"
    description = "Reports a NaN loss from its second step on"
    params = {"meta_batch_size": Param(2, minimum=1), "lr": Param(0.001)}

    def train_step(self, batch, iteration):
        loss = super().train_step(batch, iteration)
        return float("nan") if iteration >= 2 else loss


class Crashing(ProtoNet):
    name = "crashing_demo"
    description = "Raises an exception from its third step on"
    out_of_memory_hint = "lower meta_batch_size"
    params = {
        "meta_batch_size": Param(2, minimum=1),
        "lr": Param(0.001),
        "error": Param("bug", choices=("bug", "oom")),
    }

    def train_step(self, batch, iteration):
        if iteration >= 3:
            if self.config["error"] == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError("demo plugin bug")
        return super().train_step(batch, iteration)


@hookimpl
def fewbench_register_learners(register):
    register(ProtoNet)
    register(Diverging)
    register(Crashing)
