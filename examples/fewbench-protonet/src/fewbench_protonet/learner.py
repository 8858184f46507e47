"""Prototypical networks (Snell, Swersky & Zemel, "Prototypical Networks for Few-shot
Learning", NeurIPS 2017), written as a third-party fewbench learner.

An embedding network ``f`` (the suite's backbone, without a head) maps every example to
a vector. For an episode with support set ``S`` and classes ``k = 1..N``:

* **Eq. 1**, the prototypes: each class's mean embedded support example,
  ``c_k = 1/|S_k| sum_{(x_i, y_i) in S_k} f(x_i)``;
* **Eq. 2**, the class distribution of a query ``x``: a softmax over the negative
  squared Euclidean distances to the prototypes,
  ``p(y = k | x) = exp(-||f(x) - c_k||^2) / sum_k' exp(-||f(x) - c_k'||^2)``.
  The logits this learner returns are therefore ``-||f(x) - c_k||^2``.

Training (their Algorithm 1) minimises the cross-entropy of Eq. 2 over the episode's
query examples by Adam (learning rate 10^-3, the paper's). Deviations: the mean loss of
``meta_batch_size`` episodes per step (the paper: one episode per step), and no step
decay of the learning rate (the paper halves it every 2,000 episodes; the built-in
``protonet`` learner does). Each episode's support and query examples are embedded in
one forward pass, so a batch-norm backbone normalises them with that episode's
statistics, as the authors' code does.

Contract points (see ``fewbench/plugin/learner.py``): the core sets neither grad mode nor
train/eval mode, so :meth:`train_step` calls ``train()`` and :meth:`predict` runs under
``torch.no_grad()`` with the network in ``eval()`` mode; the network and optimizer are
the learner's state (``state_attributes``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewbench.plugin import EpisodeBatch, FewbenchError, Learner, LearnerContext, Param


class ProtoNetExample(Learner):
    # Not "protonet": that name belongs to the built-in learner, and two plugins
    # registering one name is an error.
    name = "protonet_example"
    description = (
        "Prototypical networks, example plugin: distances to class means (Snell et al. 2017)"
    )
    params = {
        "meta_batch_size": Param(1, minimum=1, help="episodes per Adam step (the paper: 1)"),
        "lr": Param(0.001, minimum=0.0, help="Adam learning rate (the paper: 10^-3)"),
    }
    batch_kind = "episodes"
    state_attributes = ("network", "optimizer")
    out_of_memory_hint = "lower meta_batch_size, or the ways and query of the training episodes"

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        if not ctx.task_type.predicts_classes:
            raise FewbenchError(
                f"learner {self.name} compares queries with class prototypes; it cannot "
                f"learn {ctx.task_type.name} tasks"
            )
        self.network, _ = ctx.backbone.build_features(ctx.input_shape)
        self.network.to(ctx.device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.config["lr"])

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def describe_engine(self) -> str:
        return "euclidean; support + query in one pass per episode"

    def logits(self, episodes: EpisodeBatch) -> Tensor:
        """Query logits ``[T, N*Q, N]``: ``-||f(x) - c_k||^2`` (Eq. 2) for the prototypes
        ``c_k`` of Eq. 1."""
        n_support = episodes.support_x.shape[1]
        outputs = []
        for t in range(len(episodes)):
            embedded = self.network(torch.cat([episodes.support_x[t], episodes.query_x[t]]))
            support, query = embedded[:n_support], embedded[n_support:]
            one_hot = nn.functional.one_hot(episodes.support_y[t], episodes.ways).to(support.dtype)
            prototypes = one_hot.T @ support / one_hot.sum(0)[:, None]  # Eq. 1: [N, D]
            distances = (query[:, None, :] - prototypes[None, :, :]).pow(2).sum(-1)  # [NQ, N]
            outputs.append(-distances)  # Eq. 2's logits
        return torch.stack(outputs)

    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.ctx.loss(self.logits(batch), batch.query_y)  # cross-entropy of Eq. 2
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.network.eval()
        return self.logits(episodes)
