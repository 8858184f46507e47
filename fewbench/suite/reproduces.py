"""A suite's ``reproduces:`` section: which published protocol the suite follows.

A reproduction suite (``suites/reproduce/<paper>-<dataset>.yaml``) states, in a form the
ledger reads back from the stored suite, the paper and tables it reproduces, the protocol
of ``references.yaml`` its cells must match, and in words the split, backbone, training
budget, batch-norm mode and test-time procedure, with every deviation from the paper and
its reason. The words are for the reader; the cells' configuration is what
:func:`fewbench.reports.references.differences` checks against the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fewbench.errors import FewbenchError

# What every reproduction suite must say, in the order a reader wants it.
STATED = ("split", "backbone", "training", "batch_norm", "test_time")
KEYS = ("paper", "tables", "protocol", *STATED, "deviations")


@dataclass(frozen=True)
class Reproduces:
    paper: str  # a key of references.yaml's papers
    tables: tuple[str, ...]
    protocol: str  # a key of references.yaml's protocols
    stated: dict[str, str]  # STATED key -> the suite's words
    deviations: tuple[str, ...]  # each: what differs from the paper, and why

    def as_dict(self) -> dict[str, Any]:
        return {
            "paper": self.paper,
            "tables": list(self.tables),
            "protocol": self.protocol,
            **self.stated,
            "deviations": list(self.deviations),
        }


def parse_reproduces(value: Any, where: str = "reproduces") -> Reproduces:
    """The checked section; :class:`FewbenchError` names the key that is wrong."""
    from fewbench.reports.references import known_papers_and_protocols

    if not isinstance(value, dict):
        raise FewbenchError(f"{where}: expected a mapping with {', '.join(KEYS)}")
    unknown = sorted(set(value) - set(KEYS), key=str)
    if unknown:
        raise FewbenchError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(KEYS)}")
    missing = [k for k in KEYS if k not in value]
    if missing:
        raise FewbenchError(
            f"{where}: missing '{missing[0]}' (a reproduction states {', '.join(KEYS)})"
        )
    papers, protocols = known_papers_and_protocols()
    if value["paper"] not in papers:
        raise FewbenchError(
            f"{where}.paper: '{value['paper']}' is not a paper of references.yaml "
            f"(known: {', '.join(sorted(papers))})"
        )
    if value["protocol"] not in protocols:
        raise FewbenchError(
            f"{where}.protocol: '{value['protocol']}' is not a protocol of references.yaml "
            f"(known: {', '.join(sorted(protocols))})"
        )
    tables = value["tables"]
    if isinstance(tables, str):
        tables = [tables]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, str) for t in tables):
        raise FewbenchError(f"{where}.tables: expected a table name or a list of them")
    for key in STATED:
        if not isinstance(value[key], str) or not value[key].strip():
            raise FewbenchError(f"{where}.{key}: expected a sentence, got {value[key]!r}")
    deviations = value["deviations"] or []
    if not isinstance(deviations, list) or not all(
        isinstance(d, str) and d.strip() for d in deviations
    ):
        raise FewbenchError(
            f"{where}.deviations: expected a list of sentences (what differs and why), "
            "or an empty list"
        )
    return Reproduces(
        paper=value["paper"],
        tables=tuple(tables),
        protocol=value["protocol"],
        stated={k: " ".join(value[k].split()) for k in STATED},
        deviations=tuple(" ".join(d.split()) for d in deviations),
    )


def reproduces_of(suite_text: str) -> Reproduces | None:
    """The section of a stored suite's text; None for a suite without one."""
    import yaml

    data = yaml.safe_load(suite_text) if suite_text else None
    if not isinstance(data, dict) or "reproduces" not in data:
        return None
    return parse_reproduces(data["reproduces"])
