"""How a learner predicts a test episode: what a cell's protocol card is derived from.

A number in a few-shot table depends on more than the method's name: whether a query's
prediction may depend on the *other* queries of its episode (a *transductive* test) or on
the support set and that query alone (*inductive*), how many gradient steps adapt to the
support set, which split chose the kept state. Published tables mix these settings without
saying so (Finn et al.'s MAML normalises the query set with its own batch statistics; Snell
et al.'s evaluation uses running averages). fewbench stores a *protocol card* with every
finished cell (:mod:`fewbench.running.protocol`), derived from what ran: the networks the
learner built (their batch norms, their parameters) and what the learner declares here.

A learner declares, through :meth:`fewbench.plugin.learner.Learner.prediction_protocol`, a
:class:`PredictionProtocol`: above all, **which examples share a forward pass with a query**
at test time (:attr:`PredictionProtocol.batch_statistics`): that is what a batch norm keeping
no running statistics normalises the query with. The core finds out itself whether the
networks have such batch norms; the card says "transductive" when they do and the query's
statistics include other queries, or when the learner is transductive by its algorithm
(:attr:`PredictionProtocol.transductive_because`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# Which examples a batch norm without running statistics normalises a test query with: the
# examples of the forward pass that computes the query's output.
SUPPORT_AND_QUERY = "support and query together"  # one pass per episode over both sets
QUERY_SET = "the query set"  # the query set in its own pass (MAML's adapted forward)
SUPPORT_ONLY = "the support set only"  # the support set's statistics applied to each query
SUPPORT_AND_ONE_QUERY = "the support set and that query alone"  # one query per pass
UNDECLARED = "not declared by the learner"

# The scopes in which a query's statistics come from other queries too: a learner that does
# not say is counted transductive, the safe side for a reader.
TRANSDUCTIVE_SCOPES = (SUPPORT_AND_QUERY, QUERY_SET, UNDECLARED)
SCOPES = (SUPPORT_AND_QUERY, QUERY_SET, SUPPORT_ONLY, SUPPORT_AND_ONE_QUERY, UNDECLARED)

# The batch-norm modes a network can be found in (fewbench.running.protocol.batch_norm_mode):
# no batch norm, all keeping running statistics (used in eval mode at test), all normalising
# with the batch at hand, or some of each.
MODES = ("none", "running", "batch", "mixed")


@dataclass(frozen=True)
class PredictionProtocol:
    """How a learner predicts a test episode's query set; see the module docstring.

    ``batch_statistics``: one of :data:`SCOPES`, which examples share a forward pass with a
    query at test time (a batch norm that keeps no running statistics normalises the query
    with theirs). ``own_batch_norm``: the mode (:data:`MODES`) of batch norms in the
    learner's own modules, beside the backbone's (a relation module), for cards derived
    from a stored configuration without the networks. ``running_statistics``: whether batch
    norms that keep running statistics use them at test time (eval mode, as every built-in
    learner but Reptile, whose prediction runs the network in training mode as the authors'
    code does: batch statistics always). ``adaptation``: what adapts to the
    support set at test time, in words; ``adaptation_steps``: its gradient (or optimiser)
    steps, None where nothing steps (prototypes, a closed-form solve). ``transductive_because``:
    why a query's prediction depends on the other queries apart from batch norm (a
    transductive algorithm: label propagation over the query set), empty when it does not.
    ``ensemble``: how many models vote, in words ("none": one model)."""

    # The scopes, for plugins, which import fewbench.plugin only: PredictionProtocol.QUERY_SET.
    SUPPORT_AND_QUERY: ClassVar[str] = SUPPORT_AND_QUERY
    QUERY_SET: ClassVar[str] = QUERY_SET
    SUPPORT_ONLY: ClassVar[str] = SUPPORT_ONLY
    SUPPORT_AND_ONE_QUERY: ClassVar[str] = SUPPORT_AND_ONE_QUERY

    batch_statistics: str = UNDECLARED
    own_batch_norm: str = "none"
    running_statistics: bool = True
    adaptation: str = ""
    adaptation_steps: int | None = None
    transductive_because: str = ""
    ensemble: str = "none"

    def __post_init__(self) -> None:
        if self.batch_statistics not in SCOPES:
            raise ValueError(
                f"batch_statistics must be one of {', '.join(map(repr, SCOPES))}; "
                f"got {self.batch_statistics!r}"
            )
        if self.own_batch_norm not in MODES:
            raise ValueError(f"own_batch_norm must be one of {', '.join(MODES)}")
