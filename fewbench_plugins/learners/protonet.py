"""Prototypical networks (Snell, Swersky & Zemel, NeurIPS 2017).

Each class's prototype is the mean embedding of its support examples (their Eq. 1),
``c_k = 1/|S_k| sum_{x_i in S_k} f(x_i)``, and a query's class scores are the negative
squared Euclidean distances to the prototypes (Eq. 2), ``-||f(x) - c_k||^2``, whose
softmax is ``p(y = k | x)``. Training follows their Algorithm 1: the loss is the
query cross-entropy averaged over the episode's queries, one episode per Adam step,
learning rate 10^-3 halved every 2,000 episodes (Section 3.1; the authors' code,
jakesnell/prototypical-networks, has the same defaults: ``StepLR`` with
``gamma=0.5`` every 20 epochs of 100 episodes). The higher-way training episodes
of the paper (60-way on Omniglot) are a suite setting (``tasks.train_ways``), not
a learner parameter: this learner takes the ways of each batch it is given.

Choices and deviations:

* ``distance: cosine`` replaces Eq. 2 by ``s * cos(f(x), c_k)`` with a *learnt*
  scale ``s`` (initial value ``cosine_scale``), because unscaled cosine logits lie
  in [-1, 1] and cannot express a confident softmax. The paper compares Euclidean
  distance with unscaled cosine distance and finds Euclidean better; it stays the
  default.
* Batch norm: the backbone normalises with the statistics of the batch at hand
  (see the README). Support and query of an episode are embedded together in one
  forward pass, as in the authors' code (which concatenates ``xs`` and ``xq``), so
  the query set shares the episode's statistics; different episodes never share
  a pass. The authors' code evaluates with running averages instead (``eval()``):
  a backbone with ``batch_norm: running`` keeps them and :meth:`predict` uses them
  (inductive: a query's prediction then depends on no other query), as
  ``suites/reproduce/snell2017-omniglot.yaml`` does.
* The learning-rate decay counts training episodes (steps x ``meta_batch_size``),
  so it matches the paper's schedule whatever the meta-batch; it is computed from
  the iteration number, so a run resumed from a checkpoint continues it exactly.
* Classification only: a task type that does not predict classes is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewbench.methods.feature_heads import class_means, squared_distances
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
from fewbench_plugins.learners.schedules import halved_every


def refuse_non_classification(name: str, ctx: LearnerContext) -> None:
    """Metric learners score classes; a regression task has none to compare with."""
    if not ctx.task_type.predicts_classes:
        raise FewbenchError(
            f"learner {name} classifies by comparing queries with labelled support examples; "
            f"it cannot learn {ctx.task_type.name} tasks (use maml or finetune)"
        )


def embed_episodes(features: nn.Module, episodes: EpisodeBatch) -> tuple[Tensor, Tensor]:
    """Support and query embeddings ``[T, N*K, D]``, ``[T, N*Q, D]``.

    One forward pass per episode over its support and query examples together: the
    backbone's batch norm then uses that episode's statistics (and no other's)."""
    n_support = episodes.support_x.shape[1]
    support, query = [], []
    for t in range(len(episodes)):
        both = features(torch.cat([episodes.support_x[t], episodes.query_x[t]]))
        support.append(both[:n_support])
        query.append(both[n_support:])
    return torch.stack(support), torch.stack(query)


def cosine_similarities(query: Tensor, keys: Tensor) -> Tensor:
    """``cos(q, k)`` for every query and key, ``[T, NQ, M]``."""
    return nn.functional.normalize(query, dim=-1) @ nn.functional.normalize(keys, dim=-1).transpose(
        1, 2
    )


class ProtoNet(Learner):
    name = "protonet"
    display_name = "Prototypical Networks"
    state_attributes = ("network", "optimizer")
    description = "Prototypical networks: distances to class-mean embeddings (Snell et al. 2017)"
    out_of_memory_hint = "lower meta_batch_size, or the ways and query of the training episodes"
    params = {
        "distance": Param(
            "euclidean",
            choices=("euclidean", "cosine"),
            help="euclidean: negative squared distance (the paper); cosine: learnt scale x cosine",
        ),
        "cosine_scale": Param(
            10.0, minimum=0.0, help="distance: cosine: initial value of the learnt scale"
        ),
        "meta_batch_size": Param(1, minimum=1, help="episodes per Adam step (the paper: 1)"),
        "lr": Param(0.001, minimum=0.0, help="Adam learning rate (the paper: 10^-3)"),
        "lr_halve_every": Param(
            2000,
            minimum=0,
            help="halve the learning rate every this many training episodes (the paper: 2000; "
            "0 = constant)",
        ),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        refuse_non_classification(self.name, ctx)
        self.network = nn.Module()
        self.network.features, _ = ctx.backbone.build_features(ctx.input_shape)
        if self.config["distance"] == "cosine":
            self.network.scale = nn.Parameter(torch.tensor(float(self.config["cosine_scale"])))
        self.network.to(ctx.device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.config["lr"])

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def describe_engine(self) -> str:
        if self.config["distance"] == "cosine":
            return "cosine (learnt scale); support + query in one pass per episode"
        return "euclidean; support + query in one pass per episode"

    def prediction_protocol(self) -> PredictionProtocol:
        """Prototypes from the support embeddings, no gradient step; support and query of an
        episode embedded in one pass (as the authors' code): with a backbone normalising by
        batch statistics, each query's embedding depends on the other queries (transductive)."""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_QUERY,
            adaptation="class prototypes, the mean support embeddings (no gradient step)",
        )

    def learning_rate(self, iteration: int) -> float:
        """The paper's step decay, from the number of episodes trained before this step."""
        return halved_every(
            self.config["lr"], self.config["lr_halve_every"], iteration, self.batch_size()
        )

    def logits(self, episodes: EpisodeBatch) -> Tensor:
        """Query class scores ``[T, N*Q, ways]`` (Eq. 2, or the scaled cosine)."""
        support, query = embed_episodes(self.network.features, episodes)
        prototypes = class_means(support, episodes.support_y, episodes.ways)
        if self.config["distance"] == "cosine":
            return self.network.scale * cosine_similarities(query, prototypes)
        return -squared_distances(query, prototypes)

    # -- the learner contract ------------------------------------------------------------
    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        self.network.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(iteration)
        return supervised_step(
            self.optimizer, lambda: self.ctx.loss(self.logits(batch), batch.query_y)
        )

    @torch.no_grad()
    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.network.eval()
        return self.logits(episodes)


@hookimpl
def fewbench_register_learners(register):
    register(ProtoNet)
