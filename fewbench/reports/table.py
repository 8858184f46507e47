"""The comparison table: layout, significance marks, reference rows; ``render`` picks a format.

A report is a pivot of settings (seeds merged): ``rows`` and ``cols`` are lists
of the dimensions dataset, ways, shots, backbone and learner. Each entry is
"mean ± 95% CI" (``Options.interval``: over the test episodes, or also over the draw of the
test classes; the caption says which, :mod:`fewbench.reports.stats` how); in each column the best entry is marked, and so is every entry
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

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewbench.errors import FewbenchError
from fewbench.plugin.task_types import by_metric
from fewbench.reports import protocol
from fewbench.reports import references as refs
from fewbench.reports.formats import (
    DEFAULT_COLS,
    DEFAULT_ROWS,
    INTERVALS,
    RENDERERS,
    Entry,
    Options,
    ReferenceEntry,
    ReportTable,
    Row,
    interval_record,
    pooled,
)
from fewbench.reports.significance import CORRECTIONS, TESTS, mark_column

if TYPE_CHECKING:
    import numpy as np

    from fewbench.reports.results import Results, Setting

# A setting -> its test episodes' classes, [episodes, ways]; None where every episode's task is
# drawn afresh (no pool of classes). ``--interval population`` needs it (DrawnTestClasses).
EpisodeClasses = Callable[["Setting"], "np.ndarray | None"]

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


def build(
    results: Results, options: Options, episode_classes: EpisodeClasses | None = None
) -> ReportTable:
    """The table of ``results``; with ``--interval population``, ``episode_classes`` gives
    each setting's test classes (default: drawn again from the data, DrawnTestClasses)."""
    from fewbench.reports.names import learner_names

    settings = results.settings
    _check_layout(options, settings)
    if options.interval not in INTERVALS:
        raise FewbenchError(
            f"--interval: unknown interval '{options.interval}'; choose from {', '.join(INTERVALS)}"
        )
    if options.interval == "population" and episode_classes is None:
        from fewbench.episodes.classes import DrawnTestClasses  # loads data: only then

        episode_classes = DrawnTestClasses()
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
    # Settings measured inductively and transductively are not one measurement: where the
    # table mixes them, each gets a block of rows (its kind leads the row's key), and the best
    # and † are judged within a block (fewbench.reports.protocol).
    blocked = protocol.blocks_needed([s.protocol for s in settings])
    for s in settings:
        col = tuple(s.keys[d] for d in options.cols)
        row = tuple(s.keys[d] for d in options.rows)
        if blocked:
            row = (protocol.kind(s.protocol), *row)
        if col not in columns:
            columns.append(col)
        if row not in row_keys:
            row_keys.append(row)
        grid[(row, col)] = _entry(s, options, episode_classes)
    if blocked:
        row_keys.sort(key=lambda row: protocol.KINDS.index(row[0]))
    blocks = sorted({row[0] for row in row_keys}) if blocked else [None]
    for col, block in ((col, block) for col in columns for block in blocks):
        in_column = [
            grid[(row, col)]
            for row in row_keys
            if (row, col) in grid and (block is None or row[0] == block)
        ]
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
        block, shown = (row[0], row[1:]) if blocked else ("", row)
        labels = tuple(
            _label(d, v, names) if d == "learner" else str(v)
            for d, v in zip(options.rows, shown, strict=True)
        )
        rows.append(Row(labels, entries, keys=tuple(str(v) for v in shown), block=block))
        if options.with_reference:
            for reference_row in _reference_rows(labels, entries, options):
                reference_row.block = block
                rows.append(reference_row)
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
    ci = _interval_clause(table)
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
        f"setting, shared by all methods{seed_text}; {ci}.",
        *_interval_notes(table),
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
    parts += protocol.caption_sentence(
        [s.protocol for s in table.settings], any(row.block for row in table.rows)
    )
    parts += capped_caption(table)
    if o.with_reference:
        parts += _refused_caption(table)
    return " ".join(parts)


def _entry(s: Setting, options: Options, episode_classes: EpisodeClasses | None) -> Entry:
    """A setting's entry: its mean and the 95% interval ``options.interval`` names
    (fewbench.reports.stats). Where its tasks are drawn afresh for every episode (no pool of
    classes), the episodes interval already covers new tasks, and is the one given."""
    if not s.done:
        return Entry(s, None, None)
    classes = None
    if options.interval == "population" and episode_classes is not None:
        classes = episode_classes(s)
    if classes is None:
        mean, ci = s.estimate()
        return Entry(s, mean, ci)
    from fewbench.reports.stats import population_ci95

    estimate = population_ci95(s.values, classes)
    return Entry(
        s,
        s.scale * estimate.mean,
        s.scale * estimate.ci95,
        test_classes=estimate.classes,
        bound=estimate.bound,
    )


def _interval_clause(table: ReportTable) -> str:
    """The caption's words for the ±: which interval, what it covers where it is not the
    default, how it is computed (the default's words are the ones reports always printed)."""
    record = interval_record(table)
    if table.options.interval == "episodes":
        return f"mean ± 95% confidence interval ({record['method']})"
    if not pooled(table):
        return f"mean ± 95% confidence interval covering {record['covers']} ({record['method']})"
    counts = sorted({e.test_classes for row in table.rows for e in _entries(row) if e.test_classes})
    classes = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    return (
        f"mean ± 95% confidence interval covering {record['covers']} ({record['method']}; "
        f"{classes} test classes). The interval over the episodes alone (--interval episodes) "
        "covers only other episodes of these same classes and examples"
    )


def _interval_notes(table: ReportTable) -> list[str]:
    """What the caption must add about ``--interval population`` entries that are not the
    plain estimate: a conservative bound, or none at all."""
    if table.options.interval == "episodes":
        return []
    entries = [e for row in table.rows for e in _entries(row) if e.test_classes is not None]
    bound = sorted({_setting_words(e.setting) for e in entries if e.bound})
    none = sorted(
        {_setting_words(e.setting) for e in entries if e.ci95 is not None and math.isnan(e.ci95)}
    )
    notes = []
    if bound:
        notes.append(
            f"In {', '.join(bound)}, with no more episodes than test classes, class effects "
            "cannot be told from episode effects: the ± there is a conservative bound that "
            "counts all the variation between episodes as the classes'."
        )
    if none:
        notes.append(
            f"n/a in {', '.join(none)}: the episodes hold too few test classes (or are too "
            "few) to say anything of other classes."
        )
    return notes


def _entries(row: Row) -> list[Entry]:
    return [e for e in row.entries.values() if isinstance(e, Entry)]


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


def protocol_cards(table: ReportTable, fmt: str) -> str:
    """``--protocol``: every setting's protocol card after the table, under the name the
    table gives it (CSV and JSON carry the cards in every record)."""
    from fewbench.reports.formats import latex_escape

    entries = [
        (
            f"{table.name(s.keys['learner'])}, {s.keys['backbone']}, {_setting_words(s)}",
            s.protocol,
        )
        for s in table.settings
    ]
    return protocol.section(entries, fmt, latex_escape)


def cost_section(table: ReportTable, fmt: str) -> str:
    """``--cost``: what each setting cost, after the table (fewbench.reports.cost)."""
    from fewbench.reports import cost
    from fewbench.reports.formats import latex_escape

    entries = [
        (
            table.name(s.keys["learner"]),
            f"{table.name(s.keys['learner'])}, {s.keys['backbone']}, {_setting_words(s)}",
            s,
        )
        for s in table.settings
    ]
    return cost.section(entries, fmt, latex_escape)


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


def render(
    run_dirs: list[Path] | Path,
    fmt: str = "table",
    options: Options | None = None,
    episode_classes: EpisodeClasses | None = None,
) -> str:
    """The report of ``run_dirs`` in ``fmt`` (reads the results stores only; ``--interval
    population`` also draws the test episodes' classes again from the data, unless
    ``episode_classes`` gives them); with ``options.ranks``, its rank summary
    (:mod:`fewbench.reports.ranks`) in its place."""
    from fewbench.reports.results import load_runs

    run_dirs = [run_dirs] if isinstance(run_dirs, Path | str) else list(run_dirs)
    results = load_runs([Path(p) for p in run_dirs])
    options = options or Options()
    table = build(results, options, episode_classes)
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
    if options.protocol and fmt in ("table", "markdown", "latex"):
        text += protocol_cards(table, fmt)
    if options.cost and fmt in ("table", "markdown", "latex") and not options.ranks:
        text += cost_section(table, fmt)
    if fmt in ("table", "markdown"):
        from fewbench.reports.tuning import (
            tuning_sections,  # a tuned run: the trial chosen, and why
        )

        text += tuning_sections(run_dirs)
    return text
