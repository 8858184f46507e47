"""Choosing and configuring the executor of a run (the core's side of executor plugins).

An executor's parameters come from four layers, each overriding the one before:
its defaults, the suite's ``execution:`` section, what the run directory last ran
with (``execution.json``, each only when it names the same executor), and the
command line (the options executors declare, and ``--executor-set KEY=VALUE``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fewbench.errors import FewbenchError
from fewbench.plugin.executor import Executor
from fewbench.plugin.params import check_value
from fewbench.registry import Registry

EXECUTION_FILE = "execution.json"  # the executor and parameters a run directory last ran with


@dataclass(frozen=True)
class ExecutorRequest:
    """What the command line says about the executor."""

    name: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)  # option flag -> value given
    sets: tuple[str, ...] = ()  # --executor-set KEY=VALUE


def previous_execution(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / EXECUTION_FILE).read_text())
    except (OSError, ValueError):
        return None


def executor_config(
    request: ExecutorRequest,
    registry: Registry,
    execution: dict[str, Any],
    previous: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The executor's name and parameters, layered (see the module docstring)."""
    previous = previous or {}
    name = request.name or previous.get("executor") or execution.get("executor", "local")
    item = registry.get("executor", name)
    params = item.params.params
    config = item.params.defaults()
    for layer in (execution, previous):
        if layer.get("executor", "local") == name:
            config.update({k: v for k, v in layer.items() if k in params})
    for flag, value in request.flags.items():
        option = registry.executor_options[flag]
        key = option.param
        if key not in params:
            raise FewbenchError(
                f"{flag}: not an option of the {name} executor (its parameters: "
                f"{', '.join(params) or 'none'})"
            )
        if option.convert is not None:
            try:
                value = option.convert(value)
            except ValueError as exc:
                raise FewbenchError(f"{flag} {value!r}: {exc}") from None
        if isinstance(value, float) and params[key].value_type is int and value.is_integer():
            value = int(value)
        config[key], problem = check_value(params[key], value)
        if problem:
            raise FewbenchError(f"{flag}: {problem}")
    for assignment in request.sets:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or key not in params:
            raise FewbenchError(
                f"--executor-set {assignment!r}: expected KEY=VALUE with KEY one of the {name} "
                f"executor's parameters: {', '.join(params) or 'none'}"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise FewbenchError(f"--executor-set {assignment!r}: not a YAML value") from None
        config[key], problem = check_value(params[key], value)
        if problem:
            raise FewbenchError(f"--executor-set {key}: {problem}")
    return name, config


def build_executor(
    request: ExecutorRequest, registry: Registry, execution: dict[str, Any], run_dir: Path
) -> tuple[Executor, dict[str, Any]]:
    """The checked executor of this run, and what to record in ``execution.json``.

    Rerunning a run directory reuses the executor and parameters it last ran with, so
    that ``fewbench run RUN_DIR`` alone carries on a cluster run.
    """
    name, config = executor_config(request, registry, execution, previous_execution(run_dir))
    executor = registry.get("executor", name).build(**config)
    executor.check()
    return executor, {"executor": name, **config}
