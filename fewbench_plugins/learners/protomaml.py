"""Proto-MAML (Triantafillou et al., Meta-Dataset, ICLR 2020, section 3.3 and appendix).

MAML whose linear head is, for every task, initialised from the support set's
prototypes before the inner loop: with ``c_k`` the mean embedding of class ``k``'s
support examples, the row of class ``k`` is ``W_k = 2 c_k`` and its bias
``b_k = -||c_k||^2``, which makes the head's logits equal to a prototypical
network's negative squared distances up to a term constant across classes (Snell et
al.'s equivalence). The inner loop then adapts every parameter from there; the
gradient of the query loss flows through the prototypes into the embedding. First
order by default (``fo-Proto-MAML``, the variant Triantafillou et al. evaluate; their
code, google-research/meta-dataset, sets ``fc_weights = 2 * prototypes`` and
``fc_bias = -||prototypes||^2`` with no stop-gradient, and its base configuration
takes 5 inner steps of 0.01; fewbench's defaults are MAML's, set them in the suite).
The model's own head parameters are therefore never used. Batched engine: yes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fewbench.methods.adaptation import InnerLoop, Params, TaskInit, head_names
from fewbench.plugin import Param, hookimpl
from fewbench_plugins.learners.maml import FAMILY_PARAMS, MAML


def prototype_head(loop: InnerLoop, params: Params, sx: Tensor, sy: Tensor) -> Params:
    """``params`` with the head set to ``W_k = 2 c_k``, ``b_k = -||c_k||^2`` for this task."""
    weight_name, bias_name = head_names(loop.model)
    ways = params[weight_name].shape[0]
    features = loop.features(params, sx)
    one_hot = torch.nn.functional.one_hot(sy, ways).to(features.dtype)
    prototypes = (one_hot.T @ features) / one_hot.sum(dim=0).unsqueeze(1)
    return {
        **params,
        weight_name: 2 * prototypes,
        bias_name: -(prototypes * prototypes).sum(dim=1),
    }


class ProtoMAML(MAML):
    name = "protomaml"
    display_name = "Proto-MAML"
    description = (
        "Proto-MAML: MAML from a head initialised by prototypes (Triantafillou et al. 2020)"
    )
    adapts = "every parameter, from a head set by the support prototypes"
    params = {
        **FAMILY_PARAMS,
        "first_order": Param(True, help="drop second derivatives (fo-Proto-MAML)"),
    }

    def setup(self, ctx):
        super().setup(ctx)
        if len(head_names(self.model)) != 2:
            raise ValueError("protomaml needs a model whose head is one linear layer with a bias")

    def task_init(self) -> TaskInit:
        return prototype_head


@hookimpl
def fewbench_register_learners(register):
    register(ProtoMAML)
