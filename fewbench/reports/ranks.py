"""The rank summary of a report (``fewbench report --ranks``), Meta-Dataset leaderboard style.

In each setting (a column of the report: by default dataset x ways x shots) the methods
(its rows: by default learner x backbone) that have a result there are ranked by their
mean metric, 1 = best in the task type's direction (highest accuracy, lowest mean squared
error); tied means share the average of the ranks they span (scipy.stats.rankdata's
"average"). Each method then gets its average rank over the settings where it was ranked,
how many settings those are, and in how many it had the best mean (ties for first
included). A method with no result in a setting (failed, pending, never run) is not ranked
there, and the caption names each such gap: its average is over fewer settings.

The summary is a :class:`fewbench.reports.formats.RankTable`, so every format of the main
table renders it. scipy is imported where a column is ranked, not here: the command line
imports :mod:`fewbench.reports.table`, and with it this module, on every start.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from fewbench.plugin.task_types import by_metric
from fewbench.reports.formats import (
    RANK_SUMMARY_COLUMNS,
    Entry,
    RankEntry,
    RankTable,
    ReportTable,
    Row,
)
from fewbench.reports.significance import Mark

__all__ = ["MethodRanks", "rank_column", "rank_table", "summarize"]

# Means equal to this many significant digits tie: the same per-episode values summed in
# another order can give means that differ in the last bit, and that is no difference.
TIE_DIGITS = 12
# The caption names at most this many gaps (a method without a result in a setting).
MAX_LISTED = 8


def _tie_key(value: float) -> float:
    return float(f"{value:.{TIE_DIGITS}g}")


def rank_column(means: Sequence[float | None], higher_is_better: bool) -> list[float | None]:
    """The rank of each mean among those present (None where a mean is None or NaN):
    1 = best, tied means share the average of their ranks."""
    from scipy.stats import rankdata

    present = [i for i, m in enumerate(means) if m is not None and math.isfinite(m)]
    out: list[float | None] = [None] * len(means)
    if not present:
        return out
    sign = -1.0 if higher_is_better else 1.0
    keys = [sign * _tie_key(means[i]) for i in present]
    for i, rank in zip(present, rankdata(keys, method="average"), strict=True):
        out[i] = float(rank)
    return out


@dataclass
class MethodRanks:
    method: Hashable  # the method's key in the grid given to summarize
    ranks: dict[Hashable, float] = field(default_factory=dict)  # setting -> rank, where ranked
    best: int = 0  # settings where its mean is the best (ties for first included)

    @property
    def settings(self) -> int:
        return len(self.ranks)

    @property
    def average(self) -> float | None:
        return sum(self.ranks.values()) / len(self.ranks) if self.ranks else None


def summarize(
    means: Mapping[Hashable, Mapping[Hashable, float | None]],
    settings: Sequence[Hashable],
    higher_is_better: bool,
) -> list[MethodRanks]:
    """``means[method][setting]`` -> each method's ranks, in the order of ``means``. A
    setting missing from a method's mapping, or None there, leaves it unranked there."""
    methods = list(means)
    out = {m: MethodRanks(m) for m in methods}
    for setting in settings:
        ranks = rank_column([means[m].get(setting) for m in methods], higher_is_better)
        ranked = [r for r in ranks if r is not None]
        if not ranked:
            continue
        top = min(ranked)
        for m, rank in zip(methods, ranks, strict=True):
            if rank is None:
                continue
            out[m].ranks[setting] = rank
            out[m].best += int(rank == top)
    return list(out.values())


def rank_table(table: ReportTable) -> RankTable:
    """The rank summary of a built report: its measured rows (published ones left out)
    ranked in each of its columns, sorted by average rank (methods never ranked last)."""
    task = by_metric(table.metric)
    measured = [row for row in table.rows if row.reference is None]
    means = {
        i: {col: e.mean for col, e in row.entries.items() if isinstance(e, Entry)}
        for i, row in enumerate(measured)
    }
    summary = summarize(means, table.columns, task.higher_is_better)
    tops = {
        col: min((m.ranks[col] for m in summary if col in m.ranks), default=None)
        for col in table.columns
    }
    averages = [m.average for m in summary if m.average is not None]
    best_average = min((_tie_key(a) for a in averages), default=None)
    order = sorted(summary, key=lambda m: (m.average is None, m.average or 0.0))
    rows = []
    for m in order:
        source = measured[m.method]
        entries: dict[tuple, RankEntry] = {}
        for col in table.columns:
            if col in m.ranks:
                rank = m.ranks[col]
                entries[col] = RankEntry(rank, "rank", mark=Mark(best=rank == tops[col]))
            elif col in source.entries:  # a cell with no result yet: say which status
                entries[col] = RankEntry(None, status=source.entries[col].setting.status)
        average = m.average
        is_best = average is not None and _tie_key(average) == best_average
        entries[("average_rank",)] = RankEntry(average, "average", mark=Mark(best=is_best))
        entries[("settings_ranked",)] = RankEntry(m.settings, "count")
        entries[("best_count",)] = RankEntry(m.best, "count")
        # A mixed table's setting (fewbench.reports.protocol) stays marked on each method's row.
        rows.append(Row(source.labels, entries, keys=source.keys, block=source.block))
    ranked = RankTable(
        table.options,
        [*table.columns, *RANK_SUMMARY_COLUMNS],
        [*table.column_labels, *RANK_SUMMARY_COLUMNS.values()],
        rows,
        "",
        table.metric,
        table.settings,
        names=table.names,
        setting_columns=list(table.columns),
        setting_labels=list(table.column_labels),
    )
    ranked.caption = _caption(table, measured, summary)
    return ranked


def _caption(table: ReportTable, measured: list[Row], summary: list[MethodRanks]) -> str:
    o = table.options
    task = by_metric(table.metric)
    n = len(table.columns)
    parts = [
        f"Rank of each method (row: {', '.join(o.rows)}) in each setting (column: "
        f"{', '.join(o.cols)}) by its mean {task.noun} on the test episodes, 1 = "
        f"{task.direction}; tied means share the average of their ranks.",
        "Avg. rank: the mean of its ranks over the settings where it has a result; Settings: "
        f"in how many of the {n} setting{'' if n == 1 else 's'} it was ranked; Best: in how "
        "many it has the best mean (ties included). {best}: the best rank in its column. "
        "Sorted by average rank.",
        "Ranks compare means only: the report without --ranks marks which differences are "
        "significant.",
    ]
    gaps, partial = [], []
    for m in summary:
        row = measured[m.method]
        name = " ".join(row.labels)
        for col, label in zip(table.columns, table.column_labels, strict=True):
            entry = row.entries.get(col)
            if col not in m.ranks:
                status = entry.setting.status if isinstance(entry, Entry) else "not run"
                gaps.append(f"{name} in {label} ({status})")
            elif isinstance(entry, Entry) and entry.setting.status != "done":
                partial.append(f"{name} in {label} ({entry.setting.status})")
    if gaps:
        parts.append(
            "Not ranked where it has no result, so its average is over fewer settings and "
            f"not directly comparable with a full one: {_listed(gaps)}."
        )
    elif summary and n:
        parts.append("Every method has a result in every setting.")
    if partial:
        parts.append(f"Ranked on the seeds that finished: {_listed(partial)}.")
    return " ".join(parts)


def _listed(items: list[str]) -> str:
    if len(items) <= MAX_LISTED:
        return "; ".join(items)
    return "; ".join(items[:MAX_LISTED]) + f"; and {len(items) - MAX_LISTED} more"
