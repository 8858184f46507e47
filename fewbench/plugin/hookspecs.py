"""The hook specifications: the whole plugin API of fewbench in one module.

Each hook receives a ``register`` callback in the style of ``llm``'s
``register_models(register)``. A plugin calls ``register(cls)`` once per thing it
provides. The class describes itself through class attributes:

* ``name``: the name used in suite files (unique per kind across all plugins);
* ``description``: one line shown by ``fewbench plugins``;
* ``params``: ``{parameter: default}`` (or :class:`fewbench.plugin.params.Param`), which is
  what a suite may set and what validation checks against.

The built-in plugins in ``plugins/`` implement these hooks exactly as a
third-party package would, and are found through the ``fewbench`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from fewbench.plugin.executor import ExecutorOption

PROJECT_NAME = "fewbench"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[type], None]


@hookspec
def fewbench_register_datasets(register: Register) -> None:
    """Register dataset classes (subclasses of :class:`fewbench.plugin.dataset.Dataset`)."""


@hookspec
def fewbench_register_environments(register: Register) -> None:
    """Register reinforcement-learning environments (subclasses of
    :class:`fewbench.plugin.environment.Environment`): distributions of tasks and their dynamics.
    A suite names them in its ``datasets`` list; their task type is reinforcement."""


@hookspec
def fewbench_register_backbones(register: Register) -> None:
    """Register backbone classes (subclasses of :class:`fewbench.plugin.backbone.Backbone`)."""


@hookspec
def fewbench_register_learners(register: Register) -> None:
    """Register learner classes (subclasses of :class:`fewbench.plugin.learner.Learner`)."""


@hookspec
def fewbench_register_executors(register: Register) -> None:
    """Register executor classes (subclasses of :class:`fewbench.plugin.executor.Executor`): how the
    cells of a run are spread over processes, GPUs or machines."""


@hookspec
def fewbench_register_loggers(register: Register) -> None:
    """Register logger classes (subclasses of :class:`fewbench.plugin.logger.Logger`): experiment
    trackers that follow each cell in its worker (configuration, curve, final metrics).
    Chosen per run (``--log NAME``, a suite's ``log:``), never part of a cell."""


@hookspec
def fewbench_add_executor_options(add_option: Callable[[ExecutorOption], None]) -> None:
    """Declare command-line options of ``fewbench run`` that set executor parameters
    (:class:`fewbench.plugin.executor.ExecutorOption`), in the manner of pytest's
    ``pytest_addoption``: the core's parser names no executor. Two executors may
    declare the same flag for a parameter of the same name (``--gpus-per-cell``)."""
