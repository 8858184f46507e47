"""What every plugin is: a named class with a one-line description and declared parameters.

:class:`Plugin` owns what the six kinds (datasets, environments, backbones, learners,
executors, loggers) share, so that they behave alike: ``self.config`` holds the parameters
with every declared default filled in, :meth:`Plugin.check` is where a plugin refuses
settings that cannot work, and a contract method a plugin left out fails with one line
naming the plugin and the method instead of a bare ``NotImplementedError``.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn

from fewbench.errors import PluginError
from fewbench.plugin.params import ParamSet


class NotImplementedByPlugin(PluginError, NotImplementedError):
    """A contract method the plugin does not implement (one line; still a
    ``NotImplementedError`` for code that asks whether a capability exists)."""


class Plugin:
    """Base of every plugin class.

    Class attributes: ``name`` (how suites name it, unique per kind), ``description`` (one
    line for ``fewbench plugins``) and ``params`` (``{parameter: default}`` or
    :class:`~fewbench.plugin.params.Param`). ``kind`` is set by each contract's base class.
    """

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        # Defaults first: a parameter a stored cell does not record still has its value.
        self.config: dict[str, Any] = {**ParamSet.of(type(self)).defaults(), **params}

    def check(self) -> None:
        """Refuse, with one line (:class:`~fewbench.errors.FewbenchError`), settings that
        cannot work here (a missing library, a bad combination of parameters), before
        anything trains. Nothing by default."""

    def not_implemented(self, method: str, why: str = "") -> NoReturn:
        """Raise the one-line error for a contract method this plugin left out."""
        raise not_implemented_error(type(self), method, why)


def not_implemented_error(cls: type, method: str, why: str = "") -> NotImplementedByPlugin:
    kind = getattr(cls, "kind", "plugin")
    name = getattr(cls, "name", "") or cls.__name__
    return NotImplementedByPlugin(
        f"the {kind} plugin '{name}' ({cls.__module__}.{cls.__qualname__}) does not "
        f"implement {method}(){': ' + why if why else ''}; see the {kind} contract in "
        f"fewbench.plugin"
    )
