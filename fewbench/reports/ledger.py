"""The reproduction ledger: measured numbers beside published ones, from committed files.

A reproduction run's finished cells are exported (:func:`export_run`) as compact JSON
files, one per cell, under a folder that is committed with the code
(``reproduction/<suite>/``): the cell's configuration, the suite's ``reproduces:``
section, every per-episode test value, the validation curve, the training time, the
machine, the date and the fewbench commit. :func:`render` turns a folder of such
files into one Markdown table (``docs/reproduction.md``), with a verdict per row:

* *intervals overlap*: the published 95% interval and ours overlap;
* *published mean inside ours*: the paper gives no confidence interval (or a ± of
  another kind), and its mean lies inside our 95% interval;
* *not reproduced*: neither. A miss is listed again below the table with its
  validation curve.

A published number is compared only with a cell that ran under its protocol
(:func:`fewbench.reports.references.matching`); a cell whose paper publishes the
setting under another protocol says what differs instead. Each row says its setting,
inductive or transductive with the batch norm at test, from the cell's protocol card
(:mod:`fewbench.running.protocol`), exported with it; an export made before cards existed
has its card derived from its stored configuration
(:func:`fewbench.running.protocol.card_of_config`), and says so. The page is generated,
never typed: ``fewbench ledger write --check`` (and a test) fail when it differs from
what the committed exports give.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fewbench.errors import FewbenchError
from fewbench.plugin.task_types import TaskType, by_metric
from fewbench.reports import protocol
from fewbench.reports import references as refs
from fewbench.reports.stats import mean_ci95
from fewbench.running.durations import in_words
from fewbench.running.protocol import DERIVED
from fewbench.suite.reproduces import Reproduces, parse_reproduces, reproduces_of

FORMAT = 1  # of an exported cell file; bumped when its keys change meaning
DECIMALS = 6  # per-episode values: accuracies are fractions with small denominators


@dataclass(frozen=True)
class Measured:
    """One exported cell, as read back."""

    path: Path
    suite: str
    reproduces: Reproduces
    cell_id: str
    label: str
    config: dict[str, Any]
    metric: str
    values: np.ndarray
    curve: list[tuple[int, float | None, float | None]]
    iterations: int | None
    best_iteration: int | None
    train_seconds: float | None
    machine: str
    date: str
    commit: str
    # The cell's protocol card: exported with it, or derived from its configuration for an
    # export of before cards (see load); None where neither is possible.
    protocol: dict[str, Any] | None = None

    @property
    def task_type(self) -> TaskType:
        return by_metric(self.metric)

    @property
    def scale(self) -> float:
        return self.task_type.scale

    def setting(self) -> str:
        """The cell's configuration without its seed: seeds of one setting merge."""
        return json.dumps({k: v for k, v in self.config.items() if k != "seed"}, sort_keys=True)


# -- export -------------------------------------------------------------------------------


def export_run(run_dir: Path, into: Path) -> list[Path]:
    """Write one file per finished cell of ``run_dir`` under ``into/<suite name>/``.

    The run's suite must have a ``reproduces:`` section (a ledger row without the paper
    it reproduces would mean nothing). Existing files of the same cells are replaced;
    nothing else in ``into`` is touched."""
    from fewbench.storage.store import ResultsStore, damage_reported

    store = ResultsStore.open_run(run_dir, must_exist=True, readonly=True)
    try:
        with damage_reported(store.path):
            suite_text = store.meta("suite") or ""
            environment = json.loads(store.meta("environment") or "{}")
            reproduces = reproduces_of(suite_text)
            if reproduces is None:
                raise FewbenchError(
                    f"{run_dir}: its suite has no 'reproduces:' section; the ledger holds "
                    "reproduction runs only (suites/reproduce/)"
                )
            suite_name = _suite_name(suite_text)
            cells = [c for c in store.cells() if c["status"] == "done"]
            if not cells:
                raise FewbenchError(f"{run_dir}: no finished cell to export")
            records = [_record(store, cell, suite_name, reproduces, environment) for cell in cells]
    finally:
        store.close()
    folder = into / suite_name
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for record in records:
        path = folder / f"{_file_name(record['cell']['label'])}.json"
        path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n", encoding="utf-8")
        written.append(path)
    return written


def _suite_name(suite_text: str) -> str:
    import yaml

    return str(yaml.safe_load(suite_text)["name"])


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


def _record(store, cell, suite_name: str, reproduces: Reproduces, environment: dict) -> dict:
    values = [round(float(v), DECIMALS) for v in store.episode_values(cell["id"])]
    curve = [
        [int(r["iteration"]), _rounded(r["loss"]), _rounded(r["val_metric"])]
        for r in store.curve(cell["id"])
    ]
    updated = cell["updated_at"]
    return {
        "format": FORMAT,
        "suite": suite_name,
        "reproduces": reproduces.as_dict(),
        "cell": {"id": cell["id"], "label": cell["label"], "config": json.loads(cell["config"])},
        "metric": cell["metric"],
        "iterations": cell["iterations"],
        "best_iteration": cell["best_iteration"],
        "train_seconds": _rounded(cell["train_seconds"], 1),
        "eval_seconds": _rounded(cell["eval_seconds"], 1),
        "machine": _machine(environment),
        "date": datetime.fromtimestamp(updated, UTC).date().isoformat() if updated else "",
        "commit": (environment.get("git_commit") or "")[:12],
        "episodes": values,
        "curve": curve,
        "protocol": store.protocol(cell["id"]),
    }


def _rounded(value: Any, decimals: int = DECIMALS) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), decimals)


def _machine(environment: dict[str, Any]) -> str:
    """The device in words: a GPU's name, or the CPU with the threads torch used."""
    name = environment.get("device_name") or environment.get("device") or "unknown device"
    if str(environment.get("device", "")).startswith("cpu"):
        threads = environment.get("torch_threads")
        return f"CPU ({name}), {threads} threads" if threads else f"CPU ({name})"
    return str(name)


# -- reading ------------------------------------------------------------------------------


def load(folder: Path) -> list[Measured]:
    """Every exported cell under ``folder`` (recursively), in path order."""
    if not folder.is_dir():
        raise FewbenchError(f"{folder}: no such folder of ledger exports")
    measured = sorted((_read(path) for path in folder.rglob("*.json")), key=_order)
    return [m if m.protocol is not None else _with_derived_card(m) for m in measured]


def _with_derived_card(m: Measured) -> Measured:
    """An export of before protocol cards, with the card its stored configuration gives
    (the plugins loaded once per process); unchanged where they cannot give one."""
    from dataclasses import replace

    from fewbench.registry import plugin_registry
    from fewbench.running.protocol import card_of_config

    registry = plugin_registry()
    if registry is None:
        return m
    card = card_of_config(
        m.config, iterations=m.iterations, kept_step=m.best_iteration, registry=registry
    )
    return replace(m, protocol=card)


def _order(m: Measured) -> tuple:
    """Suites, then the learner, then ways and shots as numbers (5-way before 20-way)."""
    tasks = m.config.get("tasks", {})
    return (
        m.suite,
        m.label.split("/")[-2] if "/" in m.label else m.label,
        tasks.get("ways", 0),
        tasks.get("shots", 0),
        m.label,
    )


def _read(path: Path) -> Measured:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise FewbenchError(
                f"{path}: ledger export format {record.get('format')!r}; this fewbench reads "
                f"format {FORMAT}"
            )
        return Measured(
            path=path,
            suite=record["suite"],
            reproduces=parse_reproduces(record["reproduces"], f"{path}: reproduces"),
            cell_id=record["cell"]["id"],
            label=record["cell"]["label"],
            config=record["cell"]["config"],
            metric=record["metric"],
            values=np.asarray(record["episodes"], dtype=float),
            curve=[tuple(point) for point in record["curve"]],
            iterations=record["iterations"],
            best_iteration=record["best_iteration"],
            train_seconds=record["train_seconds"],
            machine=record["machine"],
            date=record["date"],
            commit=record["commit"],
            protocol=record.get("protocol"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise FewbenchError(f"{path}: not a ledger export ({type(exc).__name__}: {exc})") from None


# -- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    cells: list[Measured]  # the seeds of one setting
    reference: refs.Reference | None
    other_protocol: list[tuple[refs.Reference, list[str]]]
    mean: float
    ci95: float
    verdict: str

    @property
    def first(self) -> Measured:
        return self.cells[0]

    @property
    def missed(self) -> bool:
        return self.verdict.startswith("not reproduced")


def rows(measured: Iterable[Measured]) -> list[Row]:
    """One row per published number a setting is compared with (one without, where the
    paper publishes none under this protocol), seeds merged."""
    settings: dict[str, list[Measured]] = {}
    for m in measured:
        settings.setdefault(m.setting(), []).append(m)
    out = []
    for cells in settings.values():
        first = cells[0]
        episodes = min(len(c.values) for c in cells)
        estimate = mean_ci95(np.stack([c.values[:episodes] for c in cells]))
        mean, ci95 = first.scale * estimate.mean, first.scale * estimate.ci95
        matched = refs.matching(first.config)
        published = [r for r in matched if r.paper_key == first.reproduces.paper] or matched
        refused = refs.refused(first.config)
        for r in published or [None]:
            out.append(Row(cells, r, refused, mean, ci95, verdict(r, mean, ci95)))
    return out


def verdict(reference: refs.Reference | None, mean: float, ci95: float) -> str:
    """The issue's three outcomes, and which comparison decided it."""
    if reference is None:
        return "no published number under this protocol"
    overlap = reference.overlaps(mean, ci95)
    if overlap:
        return "reproduced: intervals overlap"
    inside = reference.inside(mean, ci95)
    if overlap is None:
        if inside:
            return "reproduced: published mean inside ours (no interval published)"
        return (
            f"not reproduced: published mean outside ours, ours {_side(mean, reference.mean)} "
            "(no interval published)"
        )
    if inside:
        return "reproduced: published mean inside ours"
    return f"not reproduced: no overlap, ours {_side(mean, reference.mean)}"


NOTES = "causes.yaml"  # in the exports' folder: {suite: {cell label: the named cause of a miss}}


def load_causes(folder: Path) -> dict[tuple[str, str], str]:
    """The named cause of each miss, written by whoever looked at its curve
    (``reproduction/causes.yaml``); a miss without one is listed as not yet explained."""
    import yaml

    path = folder / NOTES
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise FewbenchError(f"{path}: expected {{suite: {{cell label: cause}}}}")
    return {(suite, label): " ".join(str(text).split()) for suite, cells in data.items()
            for label, text in cells.items()}  # fmt: skip


def _side(mean: float, published: float) -> str:
    return "higher" if mean > published else "lower"


def render(
    measured: list[Measured], source: str, causes: dict[tuple[str, str], str] | None = None
) -> str:
    """``docs/reproduction.md``: the ledger table, each suite's protocol and deviations,
    and each miss with its validation curve and named cause. ``source`` names the exports'
    folder."""
    table_rows = rows(measured)
    lines = [
        "# Reproduction ledger",
        "",
        "<!-- Generated by `fewbench ledger write` from the exports in "
        f"`{source}/`. Do not edit: a test regenerates this page and fails on a difference. -->",
        "",
        "Every row is a fewbench cell run under its paper's protocol (the suites in "
        "`suites/reproduce/`), beside the number the paper publishes for it. *Measured* is the "
        "mean over the fixed test episodes (and seeds) ± the half-width of its 95% confidence "
        "interval. *Published* gives the paper's ± in the paper's own sense. The verdict: "
        "*intervals overlap* when the paper gives a 95% interval; *published mean inside ours* "
        "when it gives none; otherwise *not reproduced*. The exports behind each row "
        f"(per-episode values, validation curve, machine, commit) are in `{source}/`.",
        "",
        "*Protocol* is the setting the number was measured in, from the cell's protocol card, "
        f"and what normalises a test query's batch norm. {protocol.MEANING} A cell exported "
        "before cards were stored has its card derived from its stored configuration "
        "(*derived*).",
        "",
    ]
    if not table_rows:
        lines += ["No reproduction run has been exported yet.", ""]
        return "\n".join(lines)
    reproduced = sum(1 for r in table_rows if r.verdict.startswith("reproduced"))
    compared = sum(1 for r in table_rows if r.reference is not None)
    lines += [
        f"**{reproduced} of {compared}** compared rows reproduced.",
        "",
        "| Method | Paper, table | Setting | Protocol | Published | Measured | Verdict | "
        "Training | Machine | Date | Commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_table_line(row) for row in table_rows]
    lines += ["", "## Protocols and deviations", ""]
    for suite, reproduces in _suites(measured):
        short, citation = refs.paper_citation(reproduces.paper)
        lines += [f"### `{suite}`: {citation}", ""]
        lines += [f"- **Tables:** {', '.join(reproduces.tables)}"]
        lines += [
            f"- **{key.replace('_', ' ').capitalize()}:** {text}"
            for key, text in reproduces.stated.items()
        ]
        lines += [f"- **Deviation:** {d}" for d in reproduces.deviations] or [
            "- **Deviations:** none"
        ]
        lines.append("")
    missed = [r for r in table_rows if r.missed]
    if missed:
        lines += ["## Misses and their validation curves", ""]
        for row in missed:
            lines += _miss(row, (causes or {}).get((row.first.suite, row.first.label)))
    other = [r for r in table_rows if r.reference is None and r.other_protocol]
    if other:
        lines += ["## Published under another protocol", ""]
        for row in other:
            for r, differs in row.other_protocol:
                lines.append(f"- `{row.first.label}`: {r.source} ({'; '.join(differs)})")
        lines.append("")
    return "\n".join(lines)


def _suites(measured: list[Measured]) -> list[tuple[str, Reproduces]]:
    seen: dict[str, Reproduces] = {}
    for m in measured:
        seen.setdefault(m.suite, m.reproduces)
    return sorted(seen.items())


def _setting_words(m: Measured) -> str:
    c = m.config
    tasks, dataset = c["tasks"], c["dataset"]
    split = f" ({dataset['split']})" if "split" in dataset else ""
    if m.metric == "accuracy":
        return f"{dataset['name']}{split} {tasks['ways']}-way {tasks['shots']}-shot"
    return f"{dataset['name']}{split}"


def _table_line(row: Row) -> str:
    m, r = row.first, row.reference
    decimals = 2
    method = (r.method if r and r.method else m.config["learner"]["name"]).replace("|", "/")
    paper = f"{r.paper}, {r.table}" if r else refs.paper_citation(m.reproduces.paper)[0]
    if r is None:
        published = "—"
    elif r.pm is None:
        published = f"{r.mean:.{decimals}f} (no ±)"
    else:
        published = f"{r.mean:.{decimals}f} ± {r.pm:g} ({refs.PM_MEANS[r.pm_means]})"
    if r is not None and not r.verified:
        published += ", unverified"
    episodes = len(m.values)
    seeds = len(row.cells)
    unit = "episodes" if m.task_type.has_ways else "tasks"
    count = f"{episodes:,} {unit}" + (f" x {seeds} seeds" if seeds > 1 else "")
    measured = f"**{row.mean:.{decimals}f} ± {row.ci95:.{decimals}f}** ({count})"
    iterations = f"{m.iterations:,} it." if m.iterations else "?"
    planned = m.config.get("train", {})
    if planned.get("max_iterations") and m.iterations and m.iterations < planned["iterations"]:
        iterations = f"{m.iterations:,} of {planned['iterations']:,} it."
    seconds = m.train_seconds
    training = f"{iterations}, {in_words(seconds)}" if seconds is not None else iterations
    commit = f"`{m.commit}`" if m.commit else "?"
    return (
        f"| {method} | {paper} | {_setting_words(m)} | {_protocol_words(m)} | {published} | "
        f"{measured} | {row.verdict} | {training} | {m.machine} | {m.date} | {commit} |"
    )


def _protocol_words(m: Measured) -> str:
    """The row's setting: inductive or transductive, and the batch norm at test."""
    card = m.protocol
    if not protocol.usable(card) or protocol.kind(card) == protocol.NOT_RECORDED:
        return protocol.NOT_RECORDED
    derived = "; derived" if card.get("recorded") == DERIVED else ""
    return f"{protocol.kind(card)}; batch norm at test: {card.get('batch_norm_at_test')}{derived}"


def _miss(row: Row, cause: str | None) -> list[str]:
    m, r = row.first, row.reference
    assert r is not None
    gap = row.mean - r.mean
    points = [(it, val) for it, _, val in m.curve if val is not None]
    curve = ", ".join(f"{it:,}: {m.scale * v:.1f}" for it, v in points) or "none recorded"
    return [
        f"### `{m.label}`: {gap:+.2f} against {r.source}",
        "",
        f"Validation {m.metric} by training iteration: {curve}.",
        "",
        f"Cause: {cause}" if cause else f"Cause: not yet named (add it to `{NOTES}`).",
        "",
    ]
