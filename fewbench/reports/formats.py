"""The comparison table's model and its plain formats: text, Markdown, LaTeX, CSV, JSON.

:mod:`fewbench.reports.table` builds a :class:`ReportTable` (loads the runs, marks the
significance) and picks a format; :mod:`fewbench.reports.html` renders the same
table as HTML. Both import the table types from here, so neither imports the
other's module to get them: no import cycle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fewbench.reports import references as refs
from fewbench.reports.protocol import kind as protocol_kind
from fewbench.reports.significance import Mark

if TYPE_CHECKING:
    import pandas as pd

    from fewbench.reports.results import Setting

# pandas (and fewbench.reports.results, which imports it) only where a table is rendered: the
# command line imports this module for its defaults, and pandas would slow every start.

DEFAULT_ROWS = ("learner", "backbone")
DEFAULT_COLS = ("dataset", "ways", "shots")


# ``fewbench report --interval``: what each 95% interval covers, as the caption and the JSON
# say it (fewbench.reports.stats: mean_ci95 and population_ci95 compute them).
INTERVALS: dict[str, str] = {
    "episodes": "other episodes drawn from the same test classes and examples",
    "population": "new test classes and examples drawn from the population the test classes "
    "come from, and new episodes",
}


@dataclass(frozen=True)
class Options:
    """How a report is laid out and marked. Defined here, beside the table, because the
    formats read it from the table (rows, decimals, with_reference); fewbench.reports.table
    re-exports it for its callers."""

    rows: tuple[str, ...] = DEFAULT_ROWS
    cols: tuple[str, ...] = DEFAULT_COLS
    decimals: int = 2
    test: str = "t"
    correction: str = "holm"
    alpha: float = 0.05
    with_reference: bool = False
    ranks: bool = False  # the rank summary (fewbench.reports.ranks) instead of the table
    # Learner names given on the command line (``--names``: label or plugin -> name), over the
    # suites' and the plugins' own (fewbench.reports.names); ``ids``: the labels, as stored.
    names: tuple[tuple[str, str], ...] = ()
    ids: bool = False
    # ``--protocol``: each entry's protocol card (fewbench.reports.protocol) after the table.
    protocol: bool = False
    # ``--cost``: what each setting cost (fewbench.reports.cost) after the table, and in the
    # CSV and JSON records.
    cost: bool = False
    # ``--interval``: which 95% interval the ± is (fewbench.reports.stats.INTERVALS): over the
    # episodes of these test classes (the default), or also over the draw of the classes.
    interval: str = "episodes"


@dataclass
class Entry:
    setting: Setting
    mean: float | None
    ci95: float | None
    mark: Mark = field(default_factory=Mark)
    # ``--interval population``: the test classes its interval generalises from (None where the
    # tasks are drawn afresh, with no pool of classes), and whether the ± is the conservative
    # bound (too few episodes to estimate the class variance; fewbench.reports.stats).
    test_classes: int | None = None
    bound: bool = False

    def text(self, decimals: int, pm: str = "±") -> str:
        """``mean ± CI``, then what the reader must know to read it: a smoke run's cap
        (``capped: 30 of 60,000 iterations``) and a status other than done. A CI that
        cannot be computed (one episode, one seed) is ``n/a``, not ``nan``."""
        if self.mean is None:
            return self.setting.status
        text = f"{self.mean:.{decimals}f} {pm} {interval(self.ci95, decimals)}"
        notes = [self.setting.cap.text()] if self.setting.cap is not None else []
        if self.setting.status != "done":
            notes.append(self.setting.status)
        return f"{text} ({'; '.join(notes)})" if notes else text


def interval(ci95: float | None, decimals: int) -> str:
    """A CI half-width as printed: ``n/a`` where there is none (one test episode)."""
    if ci95 is None or not math.isfinite(ci95):
        return "n/a"
    return f"{ci95:.{decimals}f}"


# How a reference cell marks its ±: a 95% CI is the default and goes unmarked.
PM_MARKS = {"ci95": "", "std": " std", "sem": " SEM", "none": ""}


@dataclass
class ReferenceEntry:
    reference: refs.Reference
    measured: Entry

    def text(self, decimals: int, pm: str = "±", delta: str = "Δ") -> str:
        """``mean ± pm`` as published, the ± named unless it is a 95% CI (``std``, ``SEM``;
        no ± when the paper gives none), then: unverified, measured minus published, and
        either whether the two 95% intervals overlap or, where the paper gives no 95%
        interval, whether its mean lies inside ours. A std is never called a CI."""
        r = self.reference
        text = f"{r.mean:.{decimals}f}"
        if r.pm is not None:
            text += f" {pm} {r.pm:.{decimals}f}{PM_MARKS[r.pm_means]}"
        notes = [] if r.verified else ["unverified"]
        m = self.measured
        cap = m.setting.cap
        if m.mean is not None and cap is not None:
            # A smoke run's number says nothing about the method against its paper.
            notes.append(f"not compared: ours trained {cap.ran:,} of {cap.planned:,} iterations")
        elif m.mean is not None:
            notes.append(f"{delta} {m.mean - r.mean:+.{decimals}f}")
            if m.ci95 is None or not math.isfinite(m.ci95):
                notes.append("our CI n/a")
            elif (overlap := r.overlaps(m.mean, m.ci95)) is not None:
                notes.append("CIs overlap" if overlap else "no overlap")
            else:
                notes.append("inside our CI" if r.inside(m.mean, m.ci95) else "outside our CI")
        return f"{text} ({', '.join(notes)})" if notes else text


@dataclass
class Row:
    labels: tuple[str, ...]  # one per row dimension, as shown (learners by their names)
    entries: dict[tuple, Entry | ReferenceEntry]
    reference: refs.Reference | None = None  # set on a row of published numbers
    keys: tuple[str, ...] = ()  # the dimensions' stored values (learner labels); CSV, JSON
    # Its entries' setting (fewbench.reports.protocol: inductive, transductive, not recorded)
    # where the table mixes settings and keeps each in a block of its own; else empty.
    block: str = ""


@dataclass
class ReportTable:
    options: Options
    columns: list[tuple]  # column keys, in order
    column_labels: list[str]
    rows: list[Row]
    caption: str
    metric: str
    settings: list[Setting]
    # Learner label -> the name shown (fewbench.reports.names); a label not in it shows itself.
    names: dict[str, str] = field(default_factory=dict)

    def name(self, learner: Any) -> str:
        return self.names.get(str(learner), str(learner))


@dataclass
class RankEntry:
    """A cell of the rank summary (:mod:`fewbench.reports.ranks`): a setting's rank, an
    average rank or a count. ``mark.best`` marks the best in its column, as in the main
    table, so every format shows it the same way."""

    value: float | None
    kind: str = "rank"  # rank (1, 1.5), average (to the table's decimals) or count
    status: str = ""  # shown where a method has no rank: its setting's status (failed)
    mark: Mark = field(default_factory=Mark)

    def text(self, decimals: int, pm: str = "±") -> str:
        if self.value is None:
            return self.status
        if self.kind == "rank":
            return f"{self.value:g}"
        if self.kind == "average":
            return f"{self.value:.{decimals}f}"
        return f"{self.value:.0f}"


# The rank summary's columns after the settings' own: keys (in a row's entries), labels.
RANK_SUMMARY_COLUMNS = {
    ("average_rank",): "Avg. rank",
    ("settings_ranked",): "Settings",
    ("best_count",): "Best",
}


@dataclass
class RankTable(ReportTable):
    """``report --ranks``: one row per method (the main table's rows, published ones left
    out), its rank in each setting (the main table's columns), then the summary columns.
    ``setting_columns`` and ``setting_labels`` are the first columns, the settings."""

    setting_columns: list[tuple] = field(default_factory=list)
    setting_labels: list[str] = field(default_factory=list)


def to_text(table: ReportTable) -> str:
    d = table.options.decimals
    frame = _frame(table, lambda e: _decorate(e, d, "{} *", "{} †"))
    if frame.empty:
        return "no cells in these runs\n"
    return frame.to_string(index=False) + "\n\n" + table.caption.replace("{best}", "*") + "\n"


def _decorate(
    entry: Entry | ReferenceEntry, decimals: int, best: str, tie: str, pm: str = "±"
) -> str:
    if isinstance(entry, ReferenceEntry):
        return entry.text(decimals, pm)
    text = entry.text(decimals, pm)
    if entry.mark.best:
        return best.format(text)
    if entry.mark.tie:
        return tie.format(text)
    return text


def lead_columns(table: ReportTable) -> list[str]:
    """The columns before the entries: ``protocol`` where the rows are in blocks of settings
    (fewbench.reports.protocol), then the row dimensions."""
    blocked = any(row.block for row in table.rows)
    return (["protocol"] if blocked else []) + list(table.options.rows)


def _frame(table: ReportTable, render) -> pd.DataFrame:
    import pandas as pd

    lead = lead_columns(table)
    records = []
    for row in table.rows:
        record = {"protocol": row.block} if lead[:1] == ["protocol"] else {}
        record.update(zip(table.options.rows, row.labels, strict=True))
        for col, label in zip(table.columns, table.column_labels, strict=True):
            entry = row.entries.get(col)
            record[label] = "" if entry is None else render(entry)
        records.append(record)
    return pd.DataFrame(records, columns=[*lead, *table.column_labels])


def to_markdown(table: ReportTable) -> str:
    d = table.options.decimals
    frame = _frame(table, lambda e: _decorate(e, d, "**{}**", "{} †"))
    header = list(frame.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, record in frame.iterrows():
        lines.append("| " + " | ".join(str(v) for v in record.tolist()) + " |")
    return "\n".join(lines) + "\n\n" + table.caption.replace("{best}", "Bold") + "\n"


LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}  # fmt: skip


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def to_latex(table: ReportTable, label: str = "tab:fewbench") -> str:
    d = table.options.decimals

    def render(entry: Entry | ReferenceEntry) -> str:
        if isinstance(entry, ReferenceEntry):
            return (
                latex_escape(entry.text(d, "±", "Δ"))
                .replace("±", r"$\pm$")
                .replace("Δ", r"$\Delta$")
            )
        text = latex_escape(entry.text(d)).replace("±", r"$\pm$")
        if entry.mark.best:
            return rf"\textbf{{{text}}}"
        if entry.mark.tie:
            return rf"{text}$^\dagger$"
        return text

    frame = _frame(table, render)
    caption_text = latex_escape(table.caption.replace("{best}", "Bold"))
    caption_text = caption_text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")
    caption_text = caption_text.replace("†", r"$^\dagger$")
    lead = lead_columns(table)
    spec = "l" * len(lead) + "c" * len(table.columns)
    header = [latex_escape(h.capitalize()) for h in lead] + [
        latex_escape(h) for h in table.column_labels
    ]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption_text}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for _, record in frame.iterrows():
        cells = [latex_escape(str(v)) for v in record.tolist()[: len(lead)]]
        cells += [str(v) for v in record.tolist()[len(lead) :]]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def records(table: ReportTable) -> list[dict[str, Any]]:
    """One record per measured entry (long format), for CSV and JSON; for the rank
    summary, one per method (:func:`rank_records`)."""
    if isinstance(table, RankTable):
        return rank_records(table)
    out = []
    for row in table.rows:
        if row.reference is not None:
            continue
        for entry in row.entries.values():
            s = entry.setting
            record: dict[str, Any] = dict(s.keys)  # the learner's label, as stored
            record.update(
                learner_name=table.name(s.keys["learner"]),
                seeds=s.values.shape[0] if s.done else 0,
                episodes=s.values.shape[1] if s.done else 0,
                metric=s.metric,
                mean=entry.mean,
                ci95=entry.ci95,
                status=s.status,
                best=entry.mark.best,
                # The best is not worse than itself: true for it and for its ties.
                not_worse_than_best=entry.mark.best or entry.mark.tie,
                p_vs_best=entry.mark.p_adjusted,
                paired=entry.mark.paired,
                engine=s.engine,
                iterations=s.cap.ran if s.cap is not None else s.iterations,
                capped=s.cap is not None,
                planned_iterations=s.cap.planned if s.cap is not None else s.iterations,
                # The setting it was measured in (None: not recorded), and the card it comes
                # from (None: stored without one): fewbench.reports.protocol.
                transductive={"transductive": True, "inductive": False}.get(
                    protocol_kind(s.protocol)
                ),
                protocol=s.protocol,
            )
            if table.options.cost:
                from fewbench.reports.cost import summary

                record.update({f"cost_{k}": v for k, v in summary(s).items()})
            if table.options.interval != "episodes":  # the default's records stay as they were
                record.update(
                    interval=table.options.interval,
                    test_classes=entry.test_classes,
                    interval_bound=entry.bound,
                )
            if table.options.with_reference:
                matched = refs.matching(s.config)
                # Not set against a published number: a capped cell (a smoke run), and an
                # entry with nothing measured; where there is no CI, no overlap either.
                compared = entry.mean is not None and s.cap is None
                has_ci = compared and entry.ci95 is not None and math.isfinite(entry.ci95)
                record["published"] = [
                    {"source": r.source, "method": r.method, "mean": r.mean, "pm": r.pm,
                     "pm_means": r.pm_means, "ci95": r.ci95, "episodes": r.episodes,
                     "verified": r.verified, "compared": compared,
                     "not_compared_because": s.cap.text() if s.cap is not None else None,
                     "difference": entry.mean - r.mean if compared else None,
                     "overlap": r.overlaps(entry.mean, entry.ci95) if has_ci else None,
                     "inside_ci": r.inside(entry.mean, entry.ci95) if has_ci else None}
                    for r in matched
                ]  # fmt: skip
                record["published_under_another_protocol"] = [
                    {"source": r.source, "method": r.method, "mean": r.mean, "differs": differs}
                    for r, differs in refs.refused(s.config)
                ]
            out.append(record)
    return out


def rank_records(table: RankTable) -> list[dict[str, Any]]:
    """One record per method: its row labels, average rank, settings ranked, best count,
    then its rank in each setting under the setting's label (None where not ranked)."""
    out = []
    for row in table.rows:
        record: dict[str, Any] = dict(zip(table.options.rows, row.keys or row.labels, strict=True))
        if "learner" in table.options.rows:
            record["learner_name"] = row.labels[table.options.rows.index("learner")]
        for key in RANK_SUMMARY_COLUMNS:
            value = row.entries[key].value
            record[key[0]] = int(value) if key != ("average_rank",) and value is not None else value
        for col, label in zip(table.setting_columns, table.setting_labels, strict=True):
            entry = row.entries.get(col)
            record[label] = None if entry is None else entry.value
        out.append(record)
    return out


def to_csv(table: ReportTable) -> str:
    import pandas as pd

    frame = pd.DataFrame(records(table))
    if "published" in frame:
        frame["published"] = frame["published"].map(json.dumps)
    if "protocol" in frame:
        frame["protocol"] = frame["protocol"].map(lambda card: json.dumps(card, sort_keys=True))
    return frame.to_csv(index=False, float_format=f"%.{table.options.decimals + 2}f")


def to_json(table: ReportTable) -> str:
    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    data = [{k: clean(v) for k, v in r.items()} for r in records(table)]
    text = table.caption.replace("{best}", '"best"')
    if isinstance(table, RankTable):  # ranks: no ± to name
        return json.dumps({"caption": text, "methods": data}, indent=2) + "\n"
    # What the ± is, by name (the caption says it in words).
    body = {"caption": text, "interval": interval_record(table), "entries": data}
    return json.dumps(body, indent=2) + "\n"


def interval_record(table: ReportTable) -> dict[str, str]:
    """What the table's ± is, for JSON and the caption: its name (``--interval``), what it
    covers and how it is computed (fewbench.reports.stats explains both)."""
    name = table.options.interval
    seeds = sorted({s.values.shape[0] for s in table.settings if s.done})
    several = seeds not in ([], [1])
    method = (
        "Student t over the episodes"
        if not several
        else "crossed seeds x episodes, two-way ANOVA with Satterthwaite degrees of freedom"
    )
    covers = INTERVALS["episodes"]
    if name == "population" and pooled(table):
        covers = INTERVALS["population"]
        method = (
            "test classes as random effects shared by the episodes that hold them, variances by "
            "Henderson's method III, Student t on the classes' degrees of freedom"
            + (", seeds' terms by two-way ANOVA and Satterthwaite" if several else "")
        )
    elif name == "population":  # tasks drawn afresh for every episode: no pool to draw from
        covers = (
            "new tasks (every episode's task is drawn afresh from the task distribution, from "
            "no fixed pool of test classes)"
        )
    covers += ", and other training seeds" if several else ""
    return {"name": name, "covers": covers, "method": method}


def pooled(table: ReportTable) -> bool:
    """Whether any entry's episodes come from a pool of test classes (``--interval
    population`` found their classes; tasks drawn afresh have none)."""
    return any(
        isinstance(e, Entry) and e.test_classes is not None
        for row in table.rows
        for e in row.entries.values()
    )


# The formats that need nothing but the table; HTML also embeds figures drawn from the
# runs, so it lives in fewbench.reports.html and takes the results as well.
RENDERERS: dict[str, Callable[[ReportTable], str]] = {
    "table": to_text,
    "markdown": to_markdown,
    "latex": to_latex,
    "csv": to_csv,
    "json": to_json,
}
