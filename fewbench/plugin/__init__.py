"""Everything a plugin author imports, in one place::

    from fewbench.plugin import Learner, Param, hookimpl

A plugin implements one or more of the hooks of :mod:`fewbench.plugin.hookspecs` and, in
each, registers its classes: subclasses of the contracts below, which all derive from
:class:`Plugin` (name, description, parameters with defaults filled in, ``check``, a one-line
error for a contract method left out). The contracts' own modules
(``fewbench.plugin.learner`` and the rest) hold their full documentation. The mathematics
that several learners share is a library beside this one: :mod:`fewbench.methods`.

``tests/test_architecture.py`` checks that the built-in plugins import from fewbench only
this namespace, ``fewbench.methods`` and ``fewbench.errors``.
"""

from __future__ import annotations

from typing import Any

from fewbench.data.cache import (
    load_array_cache,
    load_tensor_cache,
    save_array_cache,
    save_tensor_cache,
)
from fewbench.data.download import Resource
from fewbench.errors import DataError, FewbenchError, PluginError
from fewbench.methods.cuda_graphs import GraphStep
from fewbench.plugin.backbone import Backbone
from fewbench.plugin.base import NotImplementedByPlugin, Plugin
from fewbench.plugin.dataset import (
    SPLITS,
    ClassPool,
    Dataset,
    EpisodeBatch,
    EpisodeSource,
    LabelledBatch,
    SplitSize,
    derive_seed,
    seeded_generator,
)
from fewbench.plugin.environment import Environment, Policy, TaskBatch, Trajectories
from fewbench.plugin.hookspecs import hookimpl
from fewbench.plugin.learner import Learner, LearnerContext, supervised_step
from fewbench.plugin.logger import FinalMetrics, LoggedCell, Logger
from fewbench.plugin.params import Param, ParamSet
from fewbench.plugin.task_types import CLASSIFICATION, REGRESSION, REINFORCEMENT, TaskType

# The executor contract wraps the run directory and the worker, which themselves use the
# contracts above: its names load on first use, so that importing a learner's contract does
# not load the whole running machinery.
_EXECUTOR_NAMES = (
    "Executor",
    "SchedulerExecutor",
    "ExecutorOption",
    "RunDir",
    "run_cell_task",
    "mark_task_interrupted",
)

__all__ = [
    # the hook marker and parameters
    "hookimpl",
    "Param",
    "ParamSet",
    # the contracts
    "Plugin",
    "Dataset",
    "Environment",
    "Backbone",
    "Learner",
    "Logger",
    *_EXECUTOR_NAMES,
    # what the contracts pass around
    "LearnerContext",
    "supervised_step",
    "EpisodeSource",
    "ClassPool",
    "EpisodeBatch",
    "LabelledBatch",
    "SplitSize",
    "SPLITS",
    "TaskBatch",
    "Trajectories",
    "Policy",
    "LoggedCell",
    "FinalMetrics",
    "GraphStep",
    "TaskType",
    "CLASSIFICATION",
    "REGRESSION",
    "REINFORCEMENT",
    # a dataset's files, caches and seeds
    "Resource",
    "load_array_cache",
    "save_array_cache",
    "load_tensor_cache",
    "save_tensor_cache",
    "derive_seed",
    "seeded_generator",
    # one-line errors
    "FewbenchError",
    "DataError",
    "PluginError",
    "NotImplementedByPlugin",
]


def __getattr__(name: str) -> Any:
    if name in _EXECUTOR_NAMES:
        from fewbench.plugin import executor

        return getattr(executor, name)
    raise AttributeError(f"module 'fewbench.plugin' has no attribute {name!r}")
