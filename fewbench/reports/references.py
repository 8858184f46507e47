"""Published reference numbers shipped with fewbench (``references.yaml``), and matching.

A reference is a *candidate* for a measured cell when dataset, ways, shots and
learner name agree and the learner's configuration holds the reference's
``params`` (so Baseline is ``finetune`` with ``head: linear`` and Baseline++ the
cosine head). It *matches* only when the cell also ran under the published
protocol: every key the protocol ``requires`` (a dotted path into the cell's
configuration, such as ``dataset.split``, ``backbone.pool`` or
``learner.eval_inner_steps``) holds the published value. A candidate that does not
match is not printed beside the cell; :func:`differences` says what differs
("dataset.split: published finn, this cell vinyals"), so a number is never shown
beside a cell that ran under another split, backbone or test-time protocol.

Papers do not agree on what their ± is: most give a 95% confidence interval over
the test episodes, some a standard deviation over training seeds, some nothing.
Each result therefore says what its ``pm`` is (``pm_means``), over how many test
episodes the mean was taken, and whether the number was found in the paper itself
(``verified``) or only quoted by others (with a ``source`` note saying where). A
report compares intervals only where the published one is a confidence interval.
The old form, ``ci95: X``, is still read as ``pm: X, pm_means: ci95``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from fewbench.errors import FewbenchError

# What a published ± can be, and how a report names it.
PM_MEANS = {
    "ci95": "95% confidence interval",
    "std": "standard deviation",
    "sem": "standard error of the mean",
    "none": "no ±",
}
REQUIRED = ("paper", "table", "protocol", "dataset", "ways", "shots", "learner", "mean")
OPTIONAL = (
    "pm", "pm_means", "ci95", "episodes", "verified", "source", "method", "params",
    "dataset_params", "requires",
)  # fmt: skip
SECTIONS = ("dataset", "backbone", "learner", "tasks", "train", "eval")  # of a cell's config
NOT_SET = "not set"  # how a difference names a key the cell's configuration lacks


@dataclass(frozen=True)
class Reference:
    paper: str  # short citation, e.g. "Finn et al. 2017"
    citation: str
    table: str
    protocol: str
    dataset: str
    ways: int
    shots: int
    learner: str
    mean: float
    pm: float | None = None  # the published ±, in the paper's own sense (pm_means)
    pm_means: str = "none"  # a key of PM_MEANS
    episodes: int | None = None  # test episodes behind the mean; None: not stated
    verified: bool = False  # found in the paper itself, not only quoted elsewhere
    note: str = ""  # where the number was found (the YAML's `source`)
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    # Dataset parameters the published protocol fixes (navigation2d's reward: distance).
    dataset_params: dict[str, Any] = field(default_factory=dict)
    protocol_name: str = ""  # the key under ``protocols`` (``protocol`` is its text)
    paper_key: str = ""  # the key under ``papers`` (``paper`` is its short citation)
    # The protocol as checkable keys: dotted paths into a cell's configuration
    # ("backbone.pool") and the published values; the protocol's and the entry's own.
    requires: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.paper}, {self.table}"

    @property
    def ci95(self) -> float | None:
        """Half-width of the published 95% confidence interval, where there is one.

        A standard error becomes one with Student's t over the test episodes (when
        their number is known); a standard deviation over seeds or runs does not."""
        if self.pm_means == "ci95":
            return self.pm
        if self.pm_means == "sem" and self.pm is not None and self.episodes and self.episodes > 1:
            from scipy import stats  # here, not at the top: scipy is slow to import

            return float(stats.t.ppf(0.975, self.episodes - 1)) * self.pm
        return None

    def overlaps(self, mean: float, ci95: float) -> bool | None:
        """Whether the measured interval and the published one overlap; None when the
        paper gives no confidence interval to compare with."""
        published = self.ci95
        if published is None:
            return None
        return abs(mean - self.mean) <= ci95 + published

    def inside(self, mean: float, ci95: float) -> bool:
        """Whether the published mean lies inside the measured 95% interval."""
        return abs(mean - self.mean) <= ci95


def _protocol(name: str, entry: Any) -> tuple[str, dict[str, Any]]:
    """A protocol's text and requirements; the plain-text form requires nothing."""
    where = f"references.yaml: protocols.{name}"
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
        raise FewbenchError(f"{where}: expected its text, or a mapping with 'text' and 'requires'")
    unknown = sorted(set(entry) - {"text", "requires"})
    if unknown:
        raise FewbenchError(f"{where}: unknown key '{unknown[0]}'; a protocol has text, requires")
    return entry["text"], _requires(entry.get("requires", {}), where)


def _requires(requires: Any, where: str) -> dict[str, Any]:
    """Checked requirements: ``{section.key: value}`` over a cell's configuration."""
    if not isinstance(requires, dict):
        raise FewbenchError(f"{where}: 'requires' must be a mapping of section.key: value")
    for key in requires:
        section, _, rest = str(key).partition(".")
        if section not in SECTIONS or not rest:
            raise FewbenchError(
                f"{where}: requires '{key}': name a key of a cell's configuration as "
                f"section.key, with section one of {', '.join(SECTIONS)}"
            )
    return dict(requires)


def _where(index: int, entry: Any) -> str:
    if not isinstance(entry, dict):
        return f"references.yaml: results[{index}]"
    what = " ".join(str(entry[k]) for k in ("paper", "dataset", "learner") if k in entry)
    if "ways" in entry and "shots" in entry:
        what += f" {entry['ways']}-way {entry['shots']}-shot"
    return f"references.yaml: results[{index}] ({what})"


def _number(value: Any, where: str, key: str, *, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise FewbenchError(f"{where}: '{key}' must be {kind}, not {value!r}")
    return value if integer else float(value)


def _mean(value: Any, where: str) -> float:
    """A published mean: any finite number (a return is negative)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise FewbenchError(f"{where}: 'mean' must be a number, not {value!r}")
    return float(value)


def _reference(index: int, r: Any, papers: dict, protocols: dict) -> Reference:
    where = _where(index, r)
    if not isinstance(r, dict):
        raise FewbenchError(f"{where}: expected a mapping, got {type(r).__name__}")
    unknown = sorted(set(r) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise FewbenchError(
            f"{where}: unknown key '{unknown[0]}'; a result has {', '.join(REQUIRED + OPTIONAL)}"
        )
    missing = [k for k in REQUIRED if k not in r]
    if missing:
        raise FewbenchError(f"{where}: missing '{missing[0]}'")
    if r["paper"] not in papers:
        raise FewbenchError(f"{where}: paper '{r['paper']}' is not under 'papers'")
    if r["protocol"] not in protocols:
        raise FewbenchError(f"{where}: protocol '{r['protocol']}' is not under 'protocols'")
    if "ci95" in r:  # the form before pm/pm_means: a 95% confidence interval
        if "pm" in r or "pm_means" in r:
            raise FewbenchError(f"{where}: give either 'ci95' or 'pm' with 'pm_means', not both")
        pm, pm_means = r["ci95"], "ci95"
    else:
        pm, pm_means = r.get("pm"), r.get("pm_means")
        if pm_means is None:
            raise FewbenchError(
                f"{where}: 'pm_means' is missing; say what the ± is: {', '.join(PM_MEANS)}"
            )
    if pm_means not in PM_MEANS:
        raise FewbenchError(
            f"{where}: unknown pm_means '{pm_means}'; choose from {', '.join(PM_MEANS)} "
            "(ci95: 95% confidence interval, std: standard deviation, sem: standard error, "
            "none: no ± published)"
        )
    if pm_means == "none":
        if pm is not None:
            raise FewbenchError(f"{where}: pm_means is 'none' but 'pm' is {pm!r}")
    else:
        pm = _number(pm, where, "pm")
    episodes = r.get("episodes")
    if episodes is not None:
        episodes = _number(episodes, where, "episodes", integer=True)
    verified = r.get("verified", False)
    if not isinstance(verified, bool):
        raise FewbenchError(f"{where}: 'verified' must be true or false, not {verified!r}")
    params, dataset_params = r.get("params", {}), r.get("dataset_params", {})
    for key, value in (("params", params), ("dataset_params", dataset_params)):
        if not isinstance(value, dict):
            raise FewbenchError(f"{where}: '{key}' must be a mapping")
    paper = papers[r["paper"]]
    text, requires = protocols[r["protocol"]]
    requires = {**requires, **_requires(r.get("requires", {}), where)}
    return Reference(
        paper=paper["short"],
        citation=paper["citation"],
        table=str(r["table"]),
        protocol=text,
        dataset=r["dataset"],
        ways=_number(r["ways"], where, "ways", integer=True),
        shots=_number(r["shots"], where, "shots", integer=True),
        learner=r["learner"],
        mean=_mean(r["mean"], where),
        pm=pm,
        pm_means=pm_means,
        episodes=episodes,
        verified=verified,
        note=str(r.get("source", "")),
        method=r.get("method", ""),
        params=params,
        dataset_params=dataset_params,
        protocol_name=r["protocol"],
        paper_key=r["paper"],
        requires=requires,
    )


def parse(text: str) -> tuple[Reference, ...]:
    """The results of a references file's text, checked (FewbenchError names the entry)."""
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not all(k in data for k in ("papers", "protocols", "results")):
        raise FewbenchError("references.yaml: expected the keys 'papers', 'protocols', 'results'")
    papers = data["papers"]
    protocols = {name: _protocol(name, entry) for name, entry in (data["protocols"] or {}).items()}
    return tuple(_reference(i, r, papers, protocols) for i, r in enumerate(data["results"] or []))


def _shipped_text() -> str:
    return resources.files("fewbench.reports").joinpath("references.yaml").read_text("utf-8")


@cache
def all_references() -> tuple[Reference, ...]:
    return parse(_shipped_text())


@cache
def _shipped_data() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(_shipped_text())


def known_papers_and_protocols() -> tuple[frozenset[str], frozenset[str]]:
    """The keys of the shipped file's ``papers`` and ``protocols`` (a reproduction suite
    names one of each)."""
    data = _shipped_data()
    return frozenset(data["papers"]), frozenset(data["protocols"])


def paper_citation(key: str) -> tuple[str, str]:
    """A shipped paper's short name and full citation."""
    paper = _shipped_data()["papers"][key]
    return paper["short"], paper["citation"]


def _value(config: dict[str, Any], key: str) -> Any:
    """The cell's value of ``section.key``; a plugin parameter a cell does not record
    (one added later, at its default: :attr:`fewbench.plugin.params.Param.added_later`)
    has the plugin's default."""
    section, _, name = key.partition(".")
    values = config.get(section) or {}
    if not isinstance(values, dict):
        return NOT_SET
    if name in values:
        return values[name]
    if section in ("dataset", "backbone", "learner") and "name" in values:
        return _plugin_default(section, values["name"], name)
    return NOT_SET


@cache
def _plugin_default(kind: str, plugin: str, key: str) -> Any:
    # Loaded only for a key a cell lacks: the registry imports the plugins (and torch).
    registry = _registry()
    if not registry.has(kind, plugin):
        return NOT_SET
    param = registry.get(kind, plugin).params.params.get(key)
    return NOT_SET if param is None else param.default


def _registry() -> Any:
    """The report's one registry (:func:`fewbench.registry.plugin_registry`, loaded once
    per process); when the plugins cannot be loaded, loading them again raises their error."""
    from fewbench.registry import Registry, plugin_registry

    return plugin_registry() or Registry()


def differences(reference: Reference, config: dict[str, Any]) -> list[str]:
    """What in a cell's configuration differs from the reference's protocol, one
    ``"key: published X, this cell Y"`` per key; empty when the cell ran under it."""
    out = []
    for key, published in reference.requires.items():
        measured = _value(config, key)
        if measured != published:
            out.append(f"{key}: published {_show(published)}, this cell {_show(measured)}")
    return out


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def candidates(config: dict[str, Any]) -> list[Reference]:
    """The published results for a cell's method and setting (dataset, ways, shots,
    learner and its ``params``), whatever the protocol; ``config`` is a cell's
    configuration (sections dataset, backbone, learner, tasks, eval)."""
    dataset, learner, tasks = config["dataset"], config["learner"], config["tasks"]
    return [
        r
        for r in all_references()
        if (r.dataset, r.ways, r.shots, r.learner)
        == (dataset["name"], tasks["ways"], tasks["shots"], learner.get("name"))
        and all(learner.get(k) == v for k, v in r.params.items())
        and all(dataset.get(k) == v for k, v in r.dataset_params.items())
    ]


def matching(config: dict[str, Any]) -> list[Reference]:
    """The published results measured under the cell's own protocol."""
    return [r for r in candidates(config) if not differences(r, config)]


def refused(config: dict[str, Any]) -> list[tuple[Reference, list[str]]]:
    """The candidates published under another protocol, with what differs."""
    return [(r, d) for r in candidates(config) if (d := differences(r, config))]
