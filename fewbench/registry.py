"""Plugin discovery and the name -> class registry built from the hooks."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

import pluggy

from fewbench.errors import PluginError
from fewbench.plugin import hookspecs
from fewbench.plugin.params import ParamSet, closest

KINDS = ("dataset", "backbone", "learner", "executor", "logger")
_HOOKS = {
    "dataset": "fewbench_register_datasets",
    "backbone": "fewbench_register_backbones",
    "learner": "fewbench_register_learners",
    "executor": "fewbench_register_executors",
    "logger": "fewbench_register_loggers",
}
# Hooks that register one more kind: environments are datasets of the grid (a suite's
# ``datasets`` list), with a hook of their own so that a plugin says what it provides.
_MORE_HOOKS = (("dataset", "fewbench_register_environments"),)


@dataclass(frozen=True)
class Registered:
    """One plugin class as the registry knows it."""

    kind: str
    name: str
    cls: type
    description: str
    params: ParamSet
    provider: str

    def build(self, **params: Any) -> Any:
        return self.cls(**params)


class Registry:
    """Loads plugins (entry points plus any given modules) and indexes what they register."""

    def __init__(
        self, extra_plugins: list[ModuleType | object] | None = None, *, entry_points: bool = True
    ):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        if entry_points:
            try:
                self.manager.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
            except Exception as exc:  # a broken third-party plugin must say who it is
                raise PluginError(_failing_entry_point(exc)) from exc
        for plugin in extra_plugins or []:
            self.manager.register(plugin)
        self._items: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        providers = {
            id(plugin): dist.project_name for plugin, dist in self.manager.list_plugin_distinfo()
        }
        for kind, hook_name in (*_HOOKS.items(), *_MORE_HOOKS):
            hook = getattr(self.manager.hook, hook_name)
            for impl in hook.get_hookimpls():
                provider = providers.get(id(impl.plugin)) or impl.plugin_name
                register = self._registrar(kind, provider, impl.plugin_name)
                _call_hook(impl, hook_name, provider, register=register)
        self.executor_options: dict[str, Any] = {}  # flag -> ExecutorOption
        for impl in self.manager.hook.fewbench_add_executor_options.get_hookimpls():
            provider = providers.get(id(impl.plugin)) or impl.plugin_name
            _call_hook(
                impl,
                "fewbench_add_executor_options",
                provider,
                add_option=self._add_option(impl.plugin_name),
            )

    def _add_option(self, module: str):
        def add_option(option: Any) -> None:
            known = self.executor_options.get(option.flag)
            if known is not None and known.param != option.param:
                raise PluginError(
                    f"{module} declares {option.flag} for the executor parameter "
                    f"'{option.param}', but it already sets '{known.param}'"
                )
            self.executor_options.setdefault(option.flag, option)

        return add_option

    def _registrar(self, kind: str, provider: str, module: str):
        def register(cls: type) -> None:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(
                    f"{provider} ({module}) registered a {kind} class {cls!r} without a 'name'"
                )
            existing = self._items[kind].get(name)
            if existing is not None:
                raise PluginError(
                    f"{kind} '{name}' is registered twice: by {existing.provider} "
                    f"({existing.cls.__module__}.{existing.cls.__qualname__}) and by {provider} "
                    f"({cls.__module__}.{cls.__qualname__})"
                )
            description = (
                getattr(cls, "description", "") or (cls.__doc__ or "").strip().split("\n")[0]
            )
            try:
                params = ParamSet.of(cls)
            except (AttributeError, TypeError, ValueError):
                raise PluginError(
                    f"{provider} ({module}): {kind} '{name}' declares params "
                    f"{getattr(cls, 'params', None)!r:.80}; expected a mapping of parameter "
                    "names to defaults or Param"
                ) from None
            self._items[kind][name] = Registered(kind, name, cls, description, params, provider)

        return register

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def items(self, kind: str) -> list[Registered]:
        return [self._items[kind][name] for name in self.names(kind)]

    def get(self, kind: str, name: str) -> Registered:
        try:
            return self._items[kind][name]
        except KeyError:
            known = self.names(kind)
            raise PluginError(
                f"unknown {kind} '{name}'{closest(name, known)}; known {kind}s: {', '.join(known) or 'none'}"
            ) from None

    def has(self, kind: str, name: str) -> bool:
        return name in self._items[kind]


def _call_hook(impl: Any, hook_name: str, provider: str, **arguments: Any) -> None:
    """Call one plugin's hook; its failure becomes one line naming the plugin."""
    try:
        impl.function(**arguments)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"the plugin {impl.plugin_name} ({provider}) failed in {hook_name}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _failing_entry_point(error: Exception) -> str:
    """Which entry point of the group failed to load, and why (pluggy's error names none)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=hookspecs.PROJECT_NAME):
        try:
            entry.load()
        except Exception as exc:
            where = entry.dist.name if entry.dist is not None else "an unknown distribution"
            return (
                f"could not load the fewbench plugin '{entry.name}' ({entry.value}, from "
                f"{where}): {type(exc).__name__}: {exc}"
            )
    return f"could not load a '{hookspecs.PROJECT_NAME}' entry point: {error}"


@cache
def plugin_registry() -> Registry | None:
    """The plugins, loaded once per process for what a report must ask a class itself (a
    display name that is not a literal, a capped cell's own training count); None when they
    cannot be loaded: a report reads the store and must not fail for a broken plugin."""
    try:
        return Registry()
    except Exception:  # noqa: BLE001 - any plugin's import error; the report goes on without
        return None
