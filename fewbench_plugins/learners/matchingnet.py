"""Matching networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

A query ``x`` is labelled by attention over the support set (their Eq. 1-2):
``P(y | x, S) = sum_i a(x, x_i) y_i`` with one-hot ``y_i`` and
``a(x, x_i) = softmax_i c(f(x), g(x_i))``, ``c`` the cosine similarity (the paper
says "cosine distance" but exponentiates it as a similarity). Training maximises
``log P(y | x, S)`` of the query labels over episodes (Eq. 3); :meth:`predict`
returns those log-probabilities, so the task's cross-entropy on them is exactly
that loss. Without full context embeddings ``f = g`` = the backbone's features.

``fce: true`` adds the full context embeddings of Appendix A:

* ``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)`` (A.2): a bidirectional LSTM over the
  support embeddings in episode order (class by class), summed with a skip
  connection;
* ``f(x, S) = attLSTM(f'(x), g(S), K)`` (A.1): ``K`` steps (``fce_steps``) of
  ``a = softmax(h_{k-1} . g(x_i))`` (dot-product attention), ``r = sum_i a_i g(x_i)``,
  ``h_k, c_k = LSTM([f'(x), r], (h_{k-1}, c_{k-1}))``, ``h_k += f'(x)``.

Choices and deviations:

* A.1 writes the LSTM as ``LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})``, a state twice
  as wide as the ``h_k = h^_k + f'(x)`` it adds to ``f'(x)``; like Chen et al.'s code
  (wyharveychen/CloserLookFewShot, ``FullyContextualEmbedding``) the read-out is fed
  as input next to ``f'(x)`` instead, with ``h_0 = f'(x)`` and ``c_0 = 0``, and the
  default ``K`` is the number of support examples, as there.
* ``cosine_scale`` multiplies the similarities before the softmax; 1 (the paper's
  unscaled cosine) by default. Chen et al.'s code uses 100 (after a ReLU): unscaled
  similarities in [-1, 1] keep the attention, and the predicted probabilities, soft.
* ``fce`` is off by default: the paper reports Omniglot without FCE and uses it for
  mini-ImageNet. (Chen et al. 2019 did not recommend turning it off for shallow
  backbones: their code always uses FCE.)
* One episode per Adam step at learning rate 10^-3, as in Chen et al.'s code.
* Batch norm: support and query of an episode are embedded in one forward pass
  (as in Chen et al.'s code), so both use that episode's batch statistics.
* Classification only: a task type that does not predict classes is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewbench.plugin import (
    EpisodeBatch,
    Learner,
    LearnerContext,
    Param,
    PredictionProtocol,
    hookimpl,
    supervised_step,
)
from fewbench_plugins.learners.protonet import (
    cosine_similarities,
    embed_episodes,
    refuse_non_classification,
)


def class_log_probabilities(scores: Tensor, labels: Tensor, ways: int) -> Tensor:
    """``log sum_i a_i y_i`` per class ``[T, NQ, ways]`` from attention scores ``[T, NQ, NK]``.

    Computed as a log-sum-exp over each class's support examples, shifted by the
    class's largest log-attention, so a class whose attention underflows in float32
    still gets a finite log-probability (the shift is exact and carries no gradient)."""
    log_attention = scores.log_softmax(dim=-1)
    index = labels[:, None, :].expand_as(log_attention)
    peak = log_attention.new_full((*log_attention.shape[:2], ways), float("-inf"))
    peak = peak.scatter_reduce(-1, index, log_attention.detach(), "amax")
    shifted = (log_attention - peak.gather(-1, index)).exp()
    one_hot = nn.functional.one_hot(labels, ways).to(scores.dtype)  # [T, NK, N]
    return peak + (shifted @ one_hot).log()


class FullContextEmbeddings(nn.Module):
    """Vinyals et al.'s Appendix A: ``g`` reads the support set, ``f`` attends to it."""

    def __init__(self, width: int):
        super().__init__()
        self.support_lstm = nn.LSTM(width, width, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * width, width)

    def embed_support(self, support: Tensor) -> Tensor:
        """``g(x_i, S)`` ``[T, NK, D]`` (A.2)."""
        out, _ = self.support_lstm(support)
        forward, backward = out.chunk(2, dim=-1)
        return support + forward + backward

    def embed_query(self, query: Tensor, support: Tensor, steps: int) -> Tensor:
        """``f(x, S)`` ``[T, NQ, D]`` after ``steps`` attention reads of ``support`` (A.1)."""
        tasks, queries, width = query.shape
        flat = query.reshape(tasks * queries, width)
        h, c = flat, torch.zeros_like(flat)
        for _ in range(steps):
            attention = (h.view(tasks, queries, width) @ support.transpose(1, 2)).softmax(-1)
            read = (attention @ support).reshape(tasks * queries, width)
            h, c = self.query_cell(torch.cat([flat, read], dim=-1), (h, c))
            h = h + flat
        return h.view(tasks, queries, width)


class MatchingNet(Learner):
    name = "matchingnet"
    display_name = "Matching Networks"
    state_attributes = ("network", "optimizer")
    description = "Matching networks: cosine attention over the support set (Vinyals et al. 2016)"
    out_of_memory_hint = "lower meta_batch_size, or the ways and query of the training episodes"
    params = {
        "fce": Param(False, help="full context embeddings (bidirectional + attention LSTMs)"),
        "fce_steps": Param(
            None,
            type=int,
            nullable=True,
            minimum=1,
            help="fce: attention-LSTM reads per query (K); default the support set's size",
        ),
        "cosine_scale": Param(
            1.0, minimum=0.0, help="fixed factor on the cosine similarities (the paper: 1)"
        ),
        "meta_batch_size": Param(1, minimum=1, help="episodes per Adam step"),
        "lr": Param(0.001, minimum=0.0, help="Adam learning rate"),
    }

    def setup(self, ctx: LearnerContext) -> None:
        super().setup(ctx)
        refuse_non_classification(self.name, ctx)
        self.network = nn.Module()
        self.network.features, width = ctx.backbone.build_features(ctx.input_shape)
        if self.config["fce"]:
            self.network.fce = FullContextEmbeddings(width)
        self.network.to(ctx.device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=self.config["lr"])

    def batch_size(self) -> int:
        return self.config["meta_batch_size"]

    def describe_engine(self) -> str:
        if self.config["fce"]:
            return f"full context embeddings, K = {self.config['fce_steps'] or 'support size'}"
        return "cosine attention, shared embedding"

    def prediction_protocol(self) -> PredictionProtocol:
        """Attention over the support embeddings, no gradient step; support and query embedded
        in one pass per episode (transductive with batch statistics), as protonet."""
        fce = " with full context embeddings" if self.config["fce"] else ""
        return PredictionProtocol(
            PredictionProtocol.SUPPORT_AND_QUERY,
            adaptation=f"attention over the support embeddings{fce} (no gradient step)",
        )

    def scores(self, episodes: EpisodeBatch) -> Tensor:
        """Attention logits ``cosine_scale * c(f(x), g(x_i))``, ``[T, N*Q, N*K]``."""
        support, query = embed_episodes(self.network.features, episodes)
        if self.config["fce"]:
            support = self.network.fce.embed_support(support)
            steps = self.config["fce_steps"] or support.shape[1]
            query = self.network.fce.embed_query(query, support, steps)
        return self.config["cosine_scale"] * cosine_similarities(query, support)

    @torch.no_grad()
    def attention(self, episodes: EpisodeBatch) -> Tensor:
        """``a(x, x_i)`` of every query over its episode's support set (Eq. 2)."""
        self.network.eval()
        return self.scores(episodes).softmax(dim=-1)

    def log_probabilities(self, episodes: EpisodeBatch) -> Tensor:
        """``log P(y = k | x, S)`` ``[T, N*Q, ways]`` (Eq. 1)."""
        return class_log_probabilities(self.scores(episodes), episodes.support_y, episodes.ways)

    # -- the learner contract ------------------------------------------------------------
    def train_step(self, batch: EpisodeBatch, iteration: int) -> float:
        self.network.train()
        # Cross-entropy on log-probabilities is their negative log-likelihood (they sum to 1).
        return supervised_step(
            self.optimizer, lambda: self.ctx.loss(self.log_probabilities(batch), batch.query_y)
        )

    @torch.no_grad()
    def predict(self, episodes: EpisodeBatch) -> Tensor:
        self.network.eval()
        return self.log_probabilities(episodes)


@hookimpl
def fewbench_register_learners(register):
    register(MatchingNet)
