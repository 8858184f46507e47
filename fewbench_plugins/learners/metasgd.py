"""Meta-SGD (Li, Zhou, Chen & Li 2017, arXiv:1707.09835).

One inner step ``theta' = theta - alpha o grad L_support(theta)`` (their equation 4),
where ``alpha`` has the shape of ``theta`` (one learning rate per parameter element,
``o`` the element-wise product) and is meta-learnt with ``theta`` by the outer loop
(their Algorithm 1, line 9: both updated with the gradient of the query losses,
second order). ``alpha`` is the core's :class:`fewbench.methods.adaptation.StepSizes` with
``per="element"``; its values start uniform in ``[alpha_low, alpha_high]``. How the
paper initialises ``alpha`` could not be read here (only its first page was
available, and no official code was found): that range is fewbench's choice, a
deliberate one to state beside any number. Training and test adapt with the same
learnt ``alpha`` and, by default, one step, as in the paper. Batched engine: yes.
"""

from __future__ import annotations

import torch

from fewbench.methods.adaptation import StepSizes, parameter_names
from fewbench.plugin import Param, hookimpl
from fewbench_plugins.learners.maml import FAMILY_PARAMS, MAML


class MetaSGD(MAML):
    name = "metasgd"
    display_name = "Meta-SGD"
    description = "Meta-SGD: a meta-learnt learning rate per parameter element (Li et al. 2017)"
    state_attributes = ("adapter", "optimizer")
    adapts = "every parameter, with its learnt per-element step sizes"
    params = {
        **FAMILY_PARAMS,
        "eval_inner_steps": Param(1, minimum=0, help="inner steps at validation and test time"),
        "alpha_low": Param(
            0.005, minimum=0.0, help="alpha starts uniform in [alpha_low, alpha_high]"
        ),
        "alpha_high": Param(
            0.1, minimum=0.0, help="alpha starts uniform in [alpha_low, alpha_high]"
        ),
    }
    params.pop("inner_lr")

    def step_size(self) -> StepSizes:
        names = parameter_names(self.model, self.adapted())
        sizes = StepSizes(self.model, names, 0.0, per="element", learnable=True)
        low, high = self.config["alpha_low"], self.config["alpha_high"]
        with torch.no_grad():  # drawn from the global generator the core has seeded
            for value in sizes.values.values():
                value.uniform_(low, high)
        return sizes

    def predict(self, episodes):
        return self.adapter.predict(episodes, steps=self.config["eval_inner_steps"])


@hookimpl
def fewbench_register_learners(register):
    register(MetaSGD)
