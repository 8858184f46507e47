"""The comparison table: layout, significance marks, reference rows; ``render`` picks a format.

A report is a pivot of settings (seeds merged): ``rows`` and ``cols`` are lists
of the dimensions dataset, ways, shots, backbone and learner. Each entry is
"mean ± 95% CI"; in each column the best entry is marked, and so is every entry
that a paired test on the shared test episodes cannot tell from it
(:mod:`fewbench.reports.significance`). The table types and the text table, Markdown,
LaTeX (booktabs), CSV and JSON formats live in :mod:`fewbench.reports.formats`;
HTML lives in :mod:`fewbench.reports.html`, which imports only the former, so
this module can use both without an import cycle. ``Options.ranks`` replaces the table by
its rank summary (:mod:`fewbench.reports.ranks`), rendered by the same formats.

Learners are shown by their names (:mod:`fewbench.reports.names`: ``--names``, the suite's
``names:``, the plugins' paper spellings); a smoke run's entries (``--max-iterations``) say
they are capped, and a published number is never set against one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewbench.errors import FewbenchError
from fewbench.plugin.task_types import by_metric
from fewbench.reports import references as refs
from fewbench.reports.formats import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    RENDERERS,
    Entry,
    Options,
    ReferenceEntry,
    ReportTable,
    Row,
)
from fewbench.reports.significance import CORRECTIONS, TESTS, mark_column

if TYPE_CHECKING:
    from fewbench.reports.results import Results, Setting

# fewbench.reports.results (numpy, pandas) is imported where runs are read: the command line
# imports this module for FORMATS and the default layout, on every start.

__all__ = ["DEFAULT_COLS", "DEFAULT_ROWS", "FORMATS", "Options", "build", "caption", "render"]

FORMATS = (*RENDERERS, "html")


def _label(dimension: str, value: Any, names: dict[str, str] | None = None) -> str:
    """How a dimension's value is shown; a learner by its name (fewbench.reports.names)."""
    if dimension == "learner" and names:
        return names.get(str(value), str(value))
    return {"ways": f"{value}-way", "shots": f"{value}-shot"}.get(dimension, str(value))


def _column_label(
    dimensions: tuple[str, ...], values: tuple, metric: str, names: dict[str, str] | None = None
) -> str:
    """A column's heading; an environment's tasks have no ways or shots to show."""
    shown = [
        _label(d, v, names)
        for d, v in zip(dimensions, values, strict=True)
        if by_metric(metric).has_ways or d not in ("ways", "shots")
    ]
    return " ".join(shown)


def _check_layout(options: Options, settings: list[Setting]) -> None:
    from fewbench.reports.results import DIMENSIONS

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
    from fewbench.reports.names import learner_names

    settings = results.settings
    _check_layout(options, settings)
    names = learner_names(results, dict(options.names), ids=options.ids)
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
            higher_is_better=by_metric(metric).higher_is_better,
            test=options.test,
            correction=options.correction,
            alpha=options.alpha,
        )
        for entry, mark in zip(in_column, marks, strict=True):
            entry.mark = mark
    rows: list[Row] = []
    for row in row_keys:
        entries = {col: grid[(row, col)] for col in columns if (row, col) in grid}
        labels = tuple(
            _label(d, v, names) if d == "learner" else str(v)
            for d, v in zip(options.rows, row, strict=True)
        )
        rows.append(Row(labels, entries, keys=tuple(str(v) for v in row)))
        if options.with_reference:
            rows += _reference_rows(labels, entries, options)
    column_labels = [_column_label(options.cols, col, metric, names) for col in columns]
    table = ReportTable(options, columns, column_labels, rows, "", metric, settings, names)
    table.caption = caption(table)
    return table


def _reference_rows(row: tuple, entries: dict[tuple, Entry], options: Options) -> list[Row]:
    by_source: dict[tuple[str, str], dict[tuple, ReferenceEntry]] = {}
    found: dict[tuple[str, str], refs.Reference] = {}
    for col, entry in entries.items():
        s = entry.setting
        for r in refs.matching(s.config):
            key = (r.source, r.method)
            by_source.setdefault(key, {})[col] = ReferenceEntry(r, entry)
            found[key] = r
    out = []
    for key, cells in by_source.items():
        r = found[key]
        labels = [str(v) for v in row]
        if "learner" in options.rows:
            i = options.rows.index("learner")
            # The method's name, unless the row's learner already goes by it (Baseline++).
            said = labels[i] == r.method or labels[i].startswith(f"{r.method}[")
            name = f"{r.method}, " if r.method and not said else ""
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
    task_type = by_metric(table.metric)
    better = task_type.direction
    what = "episodes" if task_type.has_ways else "tasks"
    parts = [
        f"{task_type.metric_title} on {count} fixed test {what} per "
        f"setting, shared by all methods{seed_text}; mean ± 95% confidence interval ({ci}).",
        f"{{best}}: best ({better}) in its column. †: not significantly different from the best "
        f"({TESTS[o.test]} on the per-episode results, paired by episode"
        + (", Welch's t-test where the episodes differ" if unpaired else "")
        + f"; {CORRECTIONS[o.correction]} correction over the column's comparisons; "
        f"level {o.alpha:g}).",
    ]
    published = [
        e.reference
        for row in table.rows
        if row.reference is not None
        for e in row.entries.values()
        if isinstance(e, ReferenceEntry)
    ]
    if published:
        parts.append(_published_caption(published))
    parts += capped_caption(table)
    if o.with_reference:
        parts += _refused_caption(table)
    return " ".join(parts)


def capped_caption(table: ReportTable) -> list[str]:
    """What "capped" means, when a setting of the table is: a smoke run
    (``fewbench run --max-iterations``) looks like a real one in every number it prints, so
    each of its entries says it, and a published number is not set against it."""
    capped = [s for s in table.settings if s.cap is not None]
    if not capped:
        return []
    text = (
        "Capped: a smoke run (fewbench run --max-iterations) that trained only the iterations "
        "shown, fewer than its settings give; not the method's result."
    )
    if table.options.with_reference and any(refs.matching(s.config) for s in capped):
        text += (
            " A published number beside a capped entry is not compared with it (no Δ, no "
            "overlap): the difference would measure the budget, not the method."
        )
    return [text]


def _refused_caption(table: ReportTable) -> list[str]:
    """One sentence per published number left out because its cell ran under another
    protocol, saying what differs: the reader learns the number exists and why it is
    not beside the measured one."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for s in table.settings:
        for r, differs in refs.refused(s.config):
            name = f"{r.method} ({r.source})" if r.method else r.source
            key = (name, f"{s.keys['ways']}-way {s.keys['shots']}-shot", "; ".join(differs))
            out.setdefault(key, []).append(table.name(s.keys["learner"]))
    return [
        f"Not shown, published under another protocol: {name}, {setting} {', '.join(sorted(set(learners)))}"
        f" ({differs})."
        for (name, setting, differs), learners in out.items()
    ]


def _setting_words(s: Setting) -> str:
    if not by_metric(s.metric).has_ways:
        return str(s.keys["dataset"])
    return f"{s.keys['dataset']} {s.keys['ways']}-way {s.keys['shots']}-shot"


def _published_caption(published: list[refs.Reference]) -> str:
    """What the published rows show: each kind of ± present said in words (a standard
    deviation is never called a confidence interval), how they are compared, sources."""
    kinds = {r.pm_means for r in published}
    pm = []
    if "ci95" in kinds:
        pm.append("± with no mark: the paper's 95% confidence interval")
    if "std" in kinds:
        pm.append(
            "± marked std: a standard deviation over the paper's seeds or runs, "
            "not a confidence interval"
        )
    if "sem" in kinds:
        pm.append("± marked SEM: a standard error of the mean")
    if "none" in kinds:
        pm.append("no ±: none published or none confirmed")
    compare = ["Δ: measured minus published"]
    if any(r.ci95 is not None for r in published):
        compare.append("CIs overlap / no overlap: whether the two 95% intervals overlap")
    if any(r.ci95 is None for r in published):
        compare.append(
            "inside / outside our CI: where the paper gives no 95% interval, whether its "
            "mean lies in ours"
        )
    if not all(r.verified for r in published):
        compare.append("unverified: not confirmed in the paper itself, only where others quote it")
    sources = sorted({r.citation for r in published})
    return (
        "Published rows: the papers' own numbers ("
        + "; ".join(pm + compare)
        + "); "
        + "; ".join(sources)
        + "."
    )


def render(run_dirs: list[Path] | Path, fmt: str = "table", options: Options | None = None) -> str:
    """The report of ``run_dirs`` in ``fmt`` (reads the results stores only); with
    ``options.ranks``, its rank summary (:mod:`fewbench.reports.ranks`) in its place."""
    from fewbench.reports.results import load_runs

    run_dirs = [run_dirs] if isinstance(run_dirs, Path | str) else list(run_dirs)
    results = load_runs([Path(p) for p in run_dirs])
    options = options or Options()
    table = build(results, options)
    if options.ranks:
        from fewbench.reports.ranks import rank_table

        capped = [
            f"{table.name(s.keys['learner'])} {s.keys['backbone']} in {_setting_words(s)} "
            f"({s.cap.ran:,} of {s.cap.planned:,} iterations)"
            for s in table.settings
            if s.cap is not None
        ]
        table = rank_table(table)
        if capped:  # the ranks of a smoke run are a smoke run's
            table.caption += (
                " Ranked on capped results, smoke runs (fewbench run --max-iterations) that "
                f"trained fewer iterations than their settings give: {'; '.join(capped)}."
            )
    if fmt == "html":
        # Imported here, not at the top: it draws the figures, and matplotlib would slow
        # every command that imports this module (the CLI does) for the one format.
        from fewbench.reports.html import to_html

        return to_html(table, results)
    text = RENDERERS[fmt](table)
    if fmt in ("table", "markdown"):
        from fewbench.reports.tuning import (
            tuning_sections,  # a tuned run: the trial chosen, and why
        )

        text += tuning_sections(run_dirs)
    return text
