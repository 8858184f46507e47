"""Published reference numbers shipped with fewbench (``references.yaml``), and matching.

A reference matches a measured setting when dataset, ways, shots and learner name
agree and the learner's configuration holds the reference's ``params`` (so
Baseline is ``finetune`` with ``head: linear`` and Baseline++ the cosine head).

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
    "dataset_params",
)  # fmt: skip


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
    return Reference(
        paper=paper["short"],
        citation=paper["citation"],
        table=str(r["table"]),
        protocol=protocols[r["protocol"]],
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
    )


def parse(text: str) -> tuple[Reference, ...]:
    """The results of a references file's text, checked (FewbenchError names the entry)."""
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not all(k in data for k in ("papers", "protocols", "results")):
        raise FewbenchError("references.yaml: expected the keys 'papers', 'protocols', 'results'")
    papers, protocols = data["papers"], data["protocols"]
    return tuple(_reference(i, r, papers, protocols) for i, r in enumerate(data["results"] or []))


@cache
def all_references() -> tuple[Reference, ...]:
    text = resources.files("fewbench").joinpath("references.yaml").read_text(encoding="utf-8")
    return parse(text)


def matching(
    dataset: str | dict[str, Any], ways: int, shots: int, learner_config: dict[str, Any]
) -> list[Reference]:
    """The published results for one measured setting; ``dataset`` is its name or its
    configuration (then a reference's ``dataset_params`` must match it too)."""
    config = dataset if isinstance(dataset, dict) else {"name": dataset}
    return [
        r
        for r in all_references()
        if (r.dataset, r.ways, r.shots, r.learner)
        == (config["name"], ways, shots, learner_config.get("name"))
        and all(learner_config.get(k) == v for k, v in r.params.items())
        and all(config.get(k) == v for k, v in r.dataset_params.items())
    ]
