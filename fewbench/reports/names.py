"""How reports name learners: display names ("MAML", "Baseline++") instead of plugin ids.

A paper's table names its methods as their papers spell them, not by the plugin ids a
suite uses (``maml``, ``fomaml``, ``finetune``). A learner's name in a report is the first
of:

1. ``report --names`` (``maml=MAML,finetune=Baseline++``, or a YAML file of that mapping);
2. the suite's ``names:`` section (of the first run that names it, when runs merge);
3. the learner class's :attr:`~fewbench.plugin.learner.Learner.display_name`, its paper's
   spelling (finetune's depends on its head: Baseline or Baseline++);
4. its label, as before; ``report --ids`` shows the labels only.

A name is given for a learner's label (``maml[inner_lr=0.1]``) or for its plugin
(``maml``); given for the plugin, a variant keeps its label's suffix (``MAML[inner_lr=0.1]``),
so variants stay apart. Two learners that would get one name both get their label added
(``MAML (maml)``, ``MAML (maml_trpo)``): a table never shows two rows it cannot tell apart.

The built-in names are read from the plugins' source through the plugin index
(:mod:`fewbench.cli.plugin_index`) when it is current, so a report does not import the
plugins and torch (about 2 s); otherwise, or when a value is not a literal, from the loaded
classes. A report never fails for a name: a plugin that is not installed shows its label.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewbench.errors import FewbenchError
from fewbench.plugin.params import closest
from fewbench.registry import plugin_registry

if TYPE_CHECKING:
    from fewbench.reports.results import Results

# A class's declared display name: a name, or ({parameter: value}, name) pairs tried in order.
Declared = str | tuple[tuple[dict[str, Any], str], ...]
NOT_LITERAL = object()  # a display_name the source gives as an expression: ask the class

__all__ = ["learner_names", "parse_names", "plugin_registry", "split_label"]


def split_label(label: str, plugin: str) -> tuple[str, str]:
    """``maml[inner_lr=0.1]`` of plugin ``maml`` -> ``("maml", "[inner_lr=0.1]")``; a label
    that is the plugin's name -> ``(plugin, "")``; any other label -> ``(label, "")``."""
    if plugin and label.startswith(plugin + "[") and label.endswith("]"):
        return plugin, label[len(plugin) :]
    return label, ""


def _checked(value: Any) -> Declared | None:
    """``value`` when it has the form of a display name (see Learner.display_name), else None."""
    if isinstance(value, str):
        return value.strip() or None
    if not isinstance(value, tuple | list):
        return None
    pairs = []
    for pair in value:
        if not (
            isinstance(pair, tuple | list)
            and len(pair) == 2
            and isinstance(pair[0], dict)
            and isinstance(pair[1], str)
            and pair[1].strip()
        ):
            return None
        pairs.append((dict(pair[0]), pair[1].strip()))
    return tuple(pairs) or None


def resolve(declared: Declared | None, config: Mapping[str, Any]) -> str | None:
    """The name ``declared`` gives a learner of configuration ``config`` (its parameters),
    or None: no name declared, or no pair's values match."""
    if declared is None or isinstance(declared, str):
        return declared
    for condition, name in declared:
        if all(config.get(key) == value for key, value in condition.items()):
            return name
    return None


# -- what the plugin classes declare ------------------------------------------------------------


def _from_classes(plugins: Iterable[str]) -> dict[str, Declared | None]:
    registry = plugin_registry()
    out: dict[str, Declared | None] = {}
    for name in plugins:
        if registry is None or not registry.has("learner", name):
            out[name] = None
            continue
        # Only the class that declares it: a subclass under another name is not its parent.
        out[name] = _checked(vars(registry.get("learner", name).cls).get("display_name"))
    return out


def _class_body(tree: ast.Module, qualname: str) -> list[ast.stmt] | None:
    body: list[ast.stmt] = tree.body
    for part in qualname.split("."):
        found = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == part), None)
        if found is None:
            return None
        body = found.body
    return body


def _literal_in(body: list[ast.stmt]) -> Any:
    """The value of ``display_name = ...`` in a class body: None when it has none,
    :data:`NOT_LITERAL` when the value is an expression."""
    for node in body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "display_name" for t in targets):
            try:
                return ast.literal_eval(value)
            except ValueError:
                return NOT_LITERAL
    return None


def _from_source(plugins: set[str]) -> dict[str, Declared | None] | None:
    """The display names the plugin index's classes declare, read from their source (no
    plugin imported); None when the index is off or a class must be asked itself."""
    from fewbench.cli import plugin_index

    if not plugin_index.enabled():
        return None
    infos = {info.name: info for info in plugin_index.current().items("learner")}
    trees: dict[str, ast.Module | None] = {}
    out: dict[str, Declared | None] = {}
    for name in plugins:
        info = infos.get(name)
        if info is None:  # not installed here: its label is shown
            out[name] = None
            continue
        if info.module not in trees:
            trees[info.module] = _module_tree(info.module)
        tree = trees[info.module]
        body = None if tree is None else _class_body(tree, info.qualname)
        if body is None:
            return None
        value = _literal_in(body)
        if value is NOT_LITERAL:
            return None
        out[name] = _checked(value)
    return out


def _module_tree(module: str) -> ast.Module | None:
    try:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (ImportError, ValueError, OSError, SyntaxError):
        return None


def declared_names(plugins: Iterable[str]) -> dict[str, Declared | None]:
    """Each learner plugin's declared display name (None: none, or not installed)."""
    wanted = {p for p in plugins if p}
    if not wanted:
        return {}
    try:
        found = _from_source(wanted)
    except Exception:  # noqa: BLE001 - a damaged index is the index's business: ask the classes
        found = None
    return found if found is not None else _from_classes(wanted)


# -- names given by suites and on the command line ----------------------------------------------


def suite_names(results: Results) -> dict[str, str]:
    """The ``names:`` of the runs' suites, the first run's winning (checked when it ran; an
    entry of another form, in a store edited by hand, is left out)."""
    from fewbench.errors import SuiteError
    from fewbench.suite.loading import parse_yaml

    out: dict[str, str] = {}
    for run in results.runs:
        if "names" not in run.suite_text:
            continue
        try:
            names = parse_yaml(run.suite_text, "the stored suite").data.get("names")
        except SuiteError:
            continue
        if isinstance(names, dict):
            for key, value in names.items():
                if isinstance(key, str) and isinstance(value, str) and value.strip():
                    out.setdefault(key, value.strip())
    return out


def parse_names(text: str) -> dict[str, str]:
    """``--names``: ``LEARNER=NAME`` pairs separated by commas, or a YAML file holding a mapping
    of learner to name (a suite file: its ``names:`` section)."""
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        return _names_file(path)
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise FewbenchError(
                f"--names: expected LEARNER=NAME pairs separated by commas (maml=MAML,"
                f"finetune=Baseline++) or a YAML file, got {item.strip()!r}"
            )
        out[key.strip()] = value.strip()
    return out


def _names_file(path: Path) -> dict[str, str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FewbenchError(f"--names {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FewbenchError(f"--names {path}: cannot read it: {exc}") from None
    except yaml.YAMLError as exc:
        raise FewbenchError(f"--names {path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("names"), dict):
        data = data["names"]  # a suite file
    if not isinstance(data, dict) or not data:
        raise FewbenchError(
            f"--names {path}: expected a mapping of learner to name, like 'maml: MAML'"
        )
    out = {}
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip():
            raise FewbenchError(f"--names {path}: {key}: expected a name, got {value!r}")
        out[str(key)] = value.strip()
    return out


def _given(names: Mapping[str, str], label: str, base: str, suffix: str) -> str | None:
    if label in names:
        return names[label]
    if suffix and base in names:
        return names[base] + suffix
    return None


def learner_names(
    results: Results, given: Mapping[str, str] | None = None, *, ids: bool = False
) -> dict[str, str]:
    """Each learner label of ``results`` -> the name reports show (see the module docstring).
    ``given`` (``--names``) must name learners of these runs: a misspelt one is refused."""
    configs: dict[str, list[Mapping[str, Any]]] = {}
    for s in results.settings:
        configs.setdefault(str(s.keys["learner"]), []).append(s.learner_config)
    if ids:
        return {label: label for label in configs}
    given = dict(given or {})
    plugins = {str(c[0].get("name", "")) for c in configs.values()}
    known = sorted(set(configs) | plugins - {""})
    for key in given:
        if key not in known:
            raise FewbenchError(
                f"--names: no learner '{key}' in these runs{closest(key, known)}; "
                f"learners: {', '.join(known)}"
            )
    suite = suite_names(results)
    out: dict[str, str] = {}
    unnamed: dict[str, tuple[str, str]] = {}  # label -> (plugin, suffix)
    for label, group in configs.items():
        plugin = str(group[0].get("name", ""))
        base, suffix = split_label(label, plugin)
        name = _given(given, label, base, suffix) or _given(suite, label, base, suffix)
        if name is not None:
            out[label] = name
        elif base == plugin:
            unnamed[label] = (plugin, suffix)
        else:
            out[label] = label
    declared = declared_names(plugin for plugin, _ in unnamed.values()) if unnamed else {}
    for label, (plugin, suffix) in unnamed.items():
        # A label over cells of different variants (runs merged) keeps its label.
        found = {resolve(declared.get(plugin), c) for c in configs[label]}
        name = found.pop() if len(found) == 1 else None
        out[label] = name + suffix if name else label
    counts = Counter(out.values())
    return {
        label: f"{name} ({label})" if counts[name] > 1 and name != label else name
        for label, name in out.items()
    }
