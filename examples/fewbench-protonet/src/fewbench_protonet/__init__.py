"""fewbench-protonet: an example third-party fewbench plugin.

The distribution's entry point in the ``fewbench`` group names this module; fewbench
loads it and calls the hooks below, which register

* the learner ``protonet_example`` (prototypical networks, :mod:`.learner`), and
* the dataset ``shapes_example`` (generated stroke glyphs, no download, :mod:`.shapes`).
"""

from __future__ import annotations

from fewbench.plugin import hookimpl

from .learner import ProtoNetExample
from .shapes import ShapesExample

__version__ = "0.1.0"


@hookimpl
def fewbench_register_learners(register):
    register(ProtoNetExample)


@hookimpl
def fewbench_register_datasets(register):
    register(ShapesExample)
