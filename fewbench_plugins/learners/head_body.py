"""ANIL (Raghu et al. 2020) and BOIL (Oh et al. 2021): MAML with half the network frozen
in the inner loop.

* ANIL, "Almost No Inner Loop" (Raghu, Raghu, Bengio & Vinyals, ICLR 2020, section 4):
  the inner loop adapts only the head (the final linear layer); the body is
  meta-learnt by the outer loop alone. Everything else is MAML's (their Algorithm 1
  with the inner update restricted to the head's parameters).
* BOIL, "Body Only update in Inner Loop" (Oh, Yoo, Kim & Yun, ICLR 2021, section 3):
  the mirror image: the inner loop adapts only the body and the head keeps its
  meta-learnt weights (their head inner learning rate of zero; the authors' code runs
  ``--extractor-step-size=0.5 --classifier-step-size=0.0``, one inner step, meta-batch 4).

Both are :class:`~fewbench_plugins.learners.maml.MAML` with another ``adapt`` for the
core's :class:`fewbench.methods.adaptation.Adapter`; parameters, engines and defaults are
MAML's. Batched engine: yes (vmap over tasks, as MAML).
"""

from __future__ import annotations

from fewbench.methods.adaptation import Which
from fewbench.plugin import hookimpl
from fewbench_plugins.learners.maml import FAMILY_PARAMS, MAML


class ANIL(MAML):
    name = "anil"
    display_name = "ANIL"
    description = "ANIL: MAML adapting only the head in the inner loop (Raghu et al. 2020)"
    adapts = "the head only"
    params = FAMILY_PARAMS

    def adapted(self) -> Which:
        return "head"


class BOIL(MAML):
    name = "boil"
    display_name = "BOIL"
    description = "BOIL: MAML adapting only the body in the inner loop (Oh et al. 2021)"
    adapts = "the body only"
    params = FAMILY_PARAMS

    def adapted(self) -> Which:
        return "body"


@hookimpl
def fewbench_register_learners(register):
    register(ANIL)
    register(BOIL)
