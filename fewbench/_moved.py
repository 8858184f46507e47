"""Old import paths: every module of the flat 0.1 layout still imports, with a warning.

fewbench 0.2 moved its modules into sub-packages that follow the architecture (see
``docs/architecture.md``). Code that imports a module by its old name
(``fewbench.learner``) gets the module at its new place (``fewbench.plugin.learner``), the
same object, and a :class:`DeprecationWarning` naming the new place. Three old modules gave
their names to packages (``fewbench.suite``, ``fewbench.data``, ``fewbench.cli``): their old
attributes are forwarded by those packages' ``__getattr__`` with the same warning.

These aliases go in the release after 0.2.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

# The old name of each moved module and where it lives now.
MOVED_MODULES: dict[str, str] = {
    "fewbench.adaptation": "fewbench.methods.adaptation",
    "fewbench.atomic": "fewbench.storage.atomic",
    "fewbench.augment": "fewbench.methods.augment",
    "fewbench.backbone": "fewbench.plugin.backbone",
    "fewbench.cache": "fewbench.data.cache",
    "fewbench.cell": "fewbench.suite.cell",
    "fewbench.commands": "fewbench.cli.commands",
    "fewbench.compare": "fewbench.reports.compare",
    "fewbench.cpu_heap": "fewbench.running.cpu_heap",
    "fewbench.datacheck": "fewbench.data.check",
    "fewbench.datastore": "fewbench.data.root",
    "fewbench.download": "fewbench.data.download",
    "fewbench.environment": "fewbench.running.provenance",
    "fewbench.environments": "fewbench.plugin.environment",
    "fewbench.evaluation": "fewbench.running.evaluation",
    "fewbench.execution": "fewbench.running.executor_setup",
    "fewbench.executor": "fewbench.plugin.executor",
    "fewbench.faults": "fewbench.storage.faults",
    "fewbench.graphs": "fewbench.methods.cuda_graphs",
    "fewbench.grid": "fewbench.suite.grid",
    "fewbench.heartbeat": "fewbench.running.heartbeat",
    "fewbench.hookspecs": "fewbench.plugin.hookspecs",
    "fewbench.html_report": "fewbench.reports.html",
    "fewbench.interrupts": "fewbench.running.interrupts",
    "fewbench.journal": "fewbench.storage.journal",
    "fewbench.learner": "fewbench.plugin.learner",
    "fewbench.loggers": "fewbench.plugin.logger",
    "fewbench.params": "fewbench.plugin.params",
    "fewbench.paths": "fewbench.storage.paths",
    "fewbench.plots": "fewbench.reports.plots",
    "fewbench.plugin_index": "fewbench.cli.plugin_index",
    "fewbench.policy_gradient": "fewbench.methods.policy_gradient",
    "fewbench.rank_summary": "fewbench.reports.ranks",
    "fewbench.ranks": "fewbench.running.torchrun",
    "fewbench.references": "fewbench.reports.references",
    "fewbench.report": "fewbench.reports.table",
    "fewbench.report_formats": "fewbench.reports.formats",
    "fewbench.results": "fewbench.reports.results",
    "fewbench.runner": "fewbench.running.runner",
    "fewbench.search": "fewbench.suite.search",
    "fewbench.significance": "fewbench.reports.significance",
    "fewbench.sink": "fewbench.storage.sink",
    "fewbench.stats": "fewbench.reports.stats",
    "fewbench.status": "fewbench.reports.status",
    "fewbench.store": "fewbench.storage.store",
    "fewbench.task_types": "fewbench.plugin.task_types",
    "fewbench.training": "fewbench.running.training",
    "fewbench.tuning": "fewbench.running.tuning",
    "fewbench.worker": "fewbench.running.worker",
}


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} moved to {new}; import it from there (the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the module at its new place (the same object)."""

    def __init__(self, old: str, new: str):
        self.old, self.new = old, new
        self._spec: Any = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warn_moved(self.old, self.new, stacklevel=2)
        module = importlib.import_module(self.new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system stamped the old name's spec on the module: give it its own back,
        # so that pickling, reloading and ``python -m`` still see the module's real place.
        module.__spec__ = self._spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())


def forward(package: str, old_module: str, new_module: str, name: str) -> Any:
    """An old module's attribute, asked of the package that took its name: warn, then give
    it from the module's new place (``AttributeError`` when the old module had no such name)."""
    if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
        # A submodule's name is asked before it is imported (``from fewbench.data import root``
        # probes the package first): say "not an attribute" so the import system loads the
        # submodule, rather than loading the old module's new place (and torch with it).
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = importlib.import_module(new_module)
    if not hasattr(module, name):
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warn_moved(f"{old_module}.{name}", f"{new_module}.{name}")
    return getattr(module, name)
