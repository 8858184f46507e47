"""The comparison table: layout, significance marks, reference rows, and its formats.

A report is a pivot of settings (seeds merged): ``rows`` and ``cols`` are lists
of the dimensions dataset, ways, shots, backbone and learner. Each entry is
"mean ± 95% CI"; in each column the best entry is marked, and so is every entry
that a paired test on the shared test episodes cannot tell from it
(:mod:`fewbench.significance`). Formats: text table, Markdown, LaTeX (booktabs),
CSV, JSON; HTML lives in :mod:`fewbench.html_report`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fewbench import references as refs
from fewbench.errors import FewbenchError
from fewbench.results import DIMENSIONS, Results, Setting, load_runs
from fewbench.significance import CORRECTIONS, TESTS, Mark, mark_column

FORMATS = ("table", "markdown", "latex", "csv", "json", "html")
DEFAULT_ROWS = ("learner", "backbone")
DEFAULT_COLS = ("dataset", "ways", "shots")
METRIC_NAMES = {"accuracy": "Accuracy (%)", "mse": "Mean squared error"}


@dataclass(frozen=True)
class Options:
    rows: tuple[str, ...] = DEFAULT_ROWS
    cols: tuple[str, ...] = DEFAULT_COLS
    decimals: int = 2
    test: str = "t"
    correction: str = "holm"
    alpha: float = 0.05
    with_reference: bool = False


@dataclass
class Entry:
    setting: Setting
    mean: float | None
    ci95: float | None
    mark: Mark = field(default_factory=Mark)

    def text(self, decimals: int, pm: str = "±") -> str:
        if self.mean is None:
            return self.setting.status
        text = f"{self.mean:.{decimals}f} {pm} {self.ci95:.{decimals}f}"
        return text if self.setting.status == "done" else f"{text} ({self.setting.status})"


@dataclass
class ReferenceEntry:
    reference: refs.Reference
    measured: Entry

    def text(self, decimals: int, pm: str = "±", delta: str = "Δ") -> str:
        r = self.reference
        text = f"{r.mean:.{decimals}f} {pm} {r.ci95:.{decimals}f}"
        if self.measured.mean is None:
            return text
        overlap = (
            "CIs overlap" if r.overlaps(self.measured.mean, self.measured.ci95) else "no overlap"
        )
        return f"{text} ({delta} {self.measured.mean - r.mean:+.{decimals}f}, {overlap})"


@dataclass
class Row:
    labels: tuple[str, ...]  # one per row dimension
    entries: dict[tuple, Entry | ReferenceEntry]
    reference: refs.Reference | None = None  # set on a row of published numbers


@dataclass
class ReportTable:
    options: Options
    columns: list[tuple]  # column keys, in order
    column_labels: list[str]
    rows: list[Row]
    caption: str
    metric: str
    settings: list[Setting]


def _label(dimension: str, value: Any) -> str:
    return {"ways": f"{value}-way", "shots": f"{value}-shot"}.get(dimension, str(value))


def _check_layout(options: Options, settings: list[Setting]) -> None:
    for dim in (*options.rows, *options.cols):
        if dim not in DIMENSIONS:
            raise FewbenchError(
                f"--rows/--cols: unknown dimension '{dim}'; choose from {', '.join(DIMENSIONS)}"
            )
    overlap = set(options.rows) & set(options.cols)
    if overlap:
        raise FewbenchError(f"--rows and --cols both name '{sorted(overlap)[0]}'")
    for dim in DIMENSIONS:
        if dim in options.rows or dim in options.cols:
            continue
        values = {s.keys[dim] for s in settings}
        if len(values) > 1:
            raise FewbenchError(
                f"the results have {len(values)} values of '{dim}' ({', '.join(map(str, sorted(values, key=str)))}) "
                f"but --rows/--cols leave it out; add it to one of them"
            )


def build(results: Results, options: Options) -> ReportTable:
    settings = results.settings
    _check_layout(options, settings)
    metrics = {s.metric for s in settings if s.done} or {"accuracy"}
    if len(metrics) > 1:
        raise FewbenchError(
            f"the runs mix metrics ({', '.join(sorted(metrics))}); report them separately"
        )
    metric = metrics.pop()
    columns: list[tuple] = []
    row_keys: list[tuple] = []
    grid: dict[tuple[tuple, tuple], Entry] = {}
    for s in settings:
        col = tuple(s.keys[d] for d in options.cols)
        row = tuple(s.keys[d] for d in options.rows)
        if col not in columns:
            columns.append(col)
        if row not in row_keys:
            row_keys.append(row)
        mean, ci = s.estimate() if s.done else (None, None)
        grid[(row, col)] = Entry(s, mean, ci)
    for col in columns:
        in_column = [grid[(row, col)] for row in row_keys if (row, col) in grid]
        marks = mark_column(
            [e.setting.per_episode if e.mean is not None else None for e in in_column],
            [e.mean for e in in_column],
            [e.setting.episode_key for e in in_column],
            higher_is_better=metric == "accuracy",
            test=options.test,
            correction=options.correction,
            alpha=options.alpha,
        )
        for entry, mark in zip(in_column, marks, strict=True):
            entry.mark = mark
    rows: list[Row] = []
    for row in row_keys:
        entries = {col: grid[(row, col)] for col in columns if (row, col) in grid}
        rows.append(Row(tuple(str(v) for v in row), entries))
        if options.with_reference:
            rows += _reference_rows(row, entries, options)
    column_labels = [
        " ".join(_label(d, v) for d, v in zip(options.cols, col, strict=True)) for col in columns
    ]
    table = ReportTable(options, columns, column_labels, rows, "", metric, settings)
    table.caption = caption(table)
    return table


def _reference_rows(row: tuple, entries: dict[tuple, Entry], options: Options) -> list[Row]:
    by_source: dict[tuple[str, str], dict[tuple, ReferenceEntry]] = {}
    found: dict[tuple[str, str], refs.Reference] = {}
    for col, entry in entries.items():
        s = entry.setting
        for r in refs.matching(
            s.dataset_config["name"], s.keys["ways"], s.keys["shots"], s.learner_config
        ):
            key = (r.source, r.method)
            by_source.setdefault(key, {})[col] = ReferenceEntry(r, entry)
            found[key] = r
    out = []
    for key, cells in by_source.items():
        r = found[key]
        labels = [str(v) for v in row]
        if "learner" in options.rows:
            i = options.rows.index("learner")
            name = f"{r.method}, " if r.method else ""
            labels[i] = f"{labels[i]} ({name}published: {r.source})"
        else:
            labels[0] = f"{labels[0]} (published: {r.source})"
        out.append(Row(tuple(labels), cells, reference=r))
    return out


def caption(table: ReportTable) -> str:
    o = table.options
    done = [s for s in table.settings if s.done]
    episodes = sorted({s.values.shape[1] for s in done})
    seeds = sorted({s.values.shape[0] for s in done})
    count = (
        (f"{episodes[0]:,}" if len(episodes) == 1 else f"{episodes[0]:,} to {episodes[-1]:,}")
        if episodes
        else "no"
    )
    ci = (
        "Student t over the episodes"
        if seeds in ([], [1])
        else "crossed seeds x episodes, two-way ANOVA with Satterthwaite degrees of freedom"
    )
    seed_text = (
        "" if seeds in ([], [1]) else f", {'/'.join(map(str, seeds))} training seeds averaged"
    )
    unpaired = any(
        e.mark.p_adjusted is not None and not e.mark.paired
        for row in table.rows
        for e in row.entries.values()
        if isinstance(e, Entry)
    )
    better = "highest" if table.metric == "accuracy" else "lowest"
    parts = [
        f"{METRIC_NAMES.get(table.metric, table.metric)} on {count} fixed test episodes per "
        f"setting, shared by all methods{seed_text}; mean ± 95% confidence interval ({ci}).",
        f"{{best}}: best ({better}) in its column. †: not significantly different from the best "
        f"({TESTS[o.test]} on the per-episode results, paired by episode"
        + (", Welch's t-test where the episodes differ" if unpaired else "")
        + f"; {CORRECTIONS[o.correction]} correction over the column's comparisons; "
        f"level {o.alpha:g}).",
    ]
    sources = {row.reference.citation for row in table.rows if row.reference is not None}
    if sources:
        parts.append(
            "Published rows: the papers' own numbers (Δ: measured minus published; whether the "
            "two 95% intervals overlap); " + "; ".join(sorted(sources)) + "."
        )
    return " ".join(parts)


# -- formats ---------------------------------------------------------------------------------
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


def _frame(table: ReportTable, render) -> pd.DataFrame:
    records = []
    for row in table.rows:
        record = dict(zip(table.options.rows, row.labels, strict=True))
        for col, label in zip(table.columns, table.column_labels, strict=True):
            entry = row.entries.get(col)
            record[label] = "" if entry is None else render(entry)
        records.append(record)
    return pd.DataFrame(records, columns=[*table.options.rows, *table.column_labels])


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
    spec = "l" * len(table.options.rows) + "c" * len(table.columns)
    header = [latex_escape(h.capitalize()) for h in table.options.rows] + [
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
        cells = [latex_escape(str(v)) for v in record.tolist()[: len(table.options.rows)]]
        cells += [str(v) for v in record.tolist()[len(table.options.rows) :]]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def records(table: ReportTable) -> list[dict[str, Any]]:
    """One record per measured entry (long format), for CSV and JSON."""
    out = []
    for row in table.rows:
        if row.reference is not None:
            continue
        for entry in row.entries.values():
            s = entry.setting
            record: dict[str, Any] = dict(s.keys)
            record.update(
                seeds=s.values.shape[0] if s.done else 0,
                episodes=s.values.shape[1] if s.done else 0,
                metric=s.metric,
                mean=entry.mean,
                ci95=entry.ci95,
                status=s.status,
                best=entry.mark.best,
                not_worse_than_best=entry.mark.tie,
                p_vs_best=entry.mark.p_adjusted,
                paired=entry.mark.paired,
                engine=s.engine,
            )
            if table.options.with_reference:
                matched = refs.matching(
                    s.dataset_config["name"], s.keys["ways"], s.keys["shots"], s.learner_config
                )
                record["published"] = [
                    {"source": r.source, "method": r.method, "mean": r.mean, "ci95": r.ci95,
                     "difference": None if entry.mean is None else entry.mean - r.mean,
                     "overlap": None if entry.mean is None else r.overlaps(entry.mean, entry.ci95)}
                    for r in matched
                ]  # fmt: skip
            out.append(record)
    return out


def to_csv(table: ReportTable) -> str:
    frame = pd.DataFrame(records(table))
    if "published" in frame:
        frame["published"] = frame["published"].map(json.dumps)
    return frame.to_csv(index=False, float_format=f"%.{table.options.decimals + 2}f")


def to_json(table: ReportTable) -> str:
    def clean(value: Any) -> Any:
        return None if isinstance(value, float) and math.isnan(value) else value

    data = [{k: clean(v) for k, v in r.items()} for r in records(table)]
    text = table.caption.replace("{best}", '"best"')
    return json.dumps({"caption": text, "entries": data}, indent=2) + "\n"


def render(run_dirs: list[Path] | Path, fmt: str = "table", options: Options | None = None) -> str:
    """The report of ``run_dirs`` in ``fmt`` (reads the results stores only)."""
    run_dirs = [run_dirs] if isinstance(run_dirs, Path | str) else list(run_dirs)
    results = load_runs([Path(p) for p in run_dirs])
    table = build(results, options or Options())
    if fmt == "html":
        from fewbench.html_report import to_html

        return to_html(table, results)
    return {
        "table": to_text,
        "markdown": to_markdown,
        "latex": to_latex,
        "csv": to_csv,
        "json": to_json,
    }[fmt](table)
