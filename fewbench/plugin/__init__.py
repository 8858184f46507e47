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

import importlib
from typing import TYPE_CHECKING, Any

# Where each name lives. The names load on first use: the contracts' modules import each other
# and the core's lower layers, and a package that loaded them all up front would be imported
# half-way by any of them (an import cycle at run time).
_WHERE = {
    "load_array_cache": "fewbench.data.cache",
    "load_tensor_cache": "fewbench.data.cache",
    "save_array_cache": "fewbench.data.cache",
    "save_tensor_cache": "fewbench.data.cache",
    "Resource": "fewbench.data.download",
    "DataError": "fewbench.errors",
    "FewbenchError": "fewbench.errors",
    "PluginError": "fewbench.errors",
    "GraphStep": "fewbench.methods.cuda_graphs",
    "Backbone": "fewbench.plugin.backbone",
    "NotImplementedByPlugin": "fewbench.plugin.base",
    "Plugin": "fewbench.plugin.base",
    "SPLITS": "fewbench.plugin.dataset",
    "ClassPool": "fewbench.plugin.dataset",
    "Dataset": "fewbench.plugin.dataset",
    "EpisodeBatch": "fewbench.plugin.dataset",
    "EpisodeSource": "fewbench.plugin.dataset",
    "LabelledBatch": "fewbench.plugin.dataset",
    "SplitSize": "fewbench.plugin.dataset",
    "derive_seed": "fewbench.plugin.dataset",
    "seeded_generator": "fewbench.plugin.dataset",
    "Environment": "fewbench.plugin.environment",
    "Policy": "fewbench.plugin.environment",
    "TaskBatch": "fewbench.plugin.environment",
    "Trajectories": "fewbench.plugin.environment",
    "hookimpl": "fewbench.plugin.hookspecs",
    "Learner": "fewbench.plugin.learner",
    "LearnerContext": "fewbench.plugin.learner",
    "supervised_step": "fewbench.plugin.learner",
    "PredictionProtocol": "fewbench.plugin.protocol",
    "FinalMetrics": "fewbench.plugin.logger",
    "LoggedCell": "fewbench.plugin.logger",
    "Logger": "fewbench.plugin.logger",
    "Param": "fewbench.plugin.params",
    "ParamSet": "fewbench.plugin.params",
    "CLASSIFICATION": "fewbench.plugin.task_types",
    "REGRESSION": "fewbench.plugin.task_types",
    "REINFORCEMENT": "fewbench.plugin.task_types",
    "TaskType": "fewbench.plugin.task_types",
    "Executor": "fewbench.plugin.executor",
    "SchedulerExecutor": "fewbench.plugin.executor",
    "ExecutorOption": "fewbench.plugin.executor",
    "RunDir": "fewbench.plugin.executor",
    "run_cell_task": "fewbench.plugin.executor",
    "mark_task_interrupted": "fewbench.plugin.executor",
}

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
    "Executor",
    "SchedulerExecutor",
    "ExecutorOption",
    "RunDir",
    "run_cell_task",
    "mark_task_interrupted",
    # what the contracts pass around
    "LearnerContext",
    "supervised_step",
    "PredictionProtocol",
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
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fewbench.plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and editors see
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
    from fewbench.plugin.executor import (
        Executor,
        ExecutorOption,
        RunDir,
        SchedulerExecutor,
        mark_task_interrupted,
        run_cell_task,
    )
    from fewbench.plugin.hookspecs import hookimpl
    from fewbench.plugin.learner import Learner, LearnerContext, supervised_step
    from fewbench.plugin.logger import FinalMetrics, LoggedCell, Logger
    from fewbench.plugin.params import Param, ParamSet
    from fewbench.plugin.protocol import PredictionProtocol
    from fewbench.plugin.task_types import CLASSIFICATION, REGRESSION, REINFORCEMENT, TaskType
