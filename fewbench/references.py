"""Published reference numbers shipped with fewbench (``references.yaml``), and matching.

A reference matches a measured setting when dataset, ways, shots and learner name
agree and the learner's configuration holds the reference's ``params`` (so
Baseline is ``finetune`` with ``head: linear`` and Baseline++ the cosine head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml


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
    ci95: float
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.paper}, {self.table}"

    def overlaps(self, mean: float, ci95: float) -> bool:
        """Whether the measured interval and the published one overlap."""
        return abs(mean - self.mean) <= ci95 + self.ci95


@cache
def all_references() -> tuple[Reference, ...]:
    text = resources.files("fewbench").joinpath("references.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    papers, protocols = data["papers"], data["protocols"]
    return tuple(
        Reference(
            paper=papers[r["paper"]]["short"],
            citation=papers[r["paper"]]["citation"],
            table=r["table"],
            protocol=protocols[r["protocol"]],
            dataset=r["dataset"],
            ways=r["ways"],
            shots=r["shots"],
            learner=r["learner"],
            mean=float(r["mean"]),
            ci95=float(r["ci95"]),
            method=r.get("method", ""),
            params=r.get("params", {}),
        )
        for r in data["results"]
    )


def matching(
    dataset: str, ways: int, shots: int, learner_config: dict[str, Any]
) -> list[Reference]:
    """The published results for one measured setting."""
    return [
        r
        for r in all_references()
        if (r.dataset, r.ways, r.shots, r.learner)
        == (dataset, ways, shots, learner_config.get("name"))
        and all(learner_config.get(k) == v for k, v in r.params.items())
    ]
