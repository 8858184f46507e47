"""``fewbench compare``: methods against each other, episode by episode.

With ``--baseline``: for each setting (dataset, ways, shots, backbone) that has the
baseline, every other learner's per-episode results minus the baseline's: the mean
difference, its 95% confidence interval from the paired differences, and the p-values of
the paired t-test and the Wilcoxon signed-rank test (uncorrected: one comparison per line).

Without it, every pair of learners in each setting (in the order the runs list them, the
first of a pair minus the second), with the same numbers and the p-values adjusted by
Holm's method over the setting's pairs: with k learners there are k(k-1)/2 comparisons,
and one of them would look significant by chance at 0.05 long before k is large.

Entries not evaluated on the same episodes fall back to Welch's test. Learners are shown
by their names (:mod:`fewbench.reports.names`); the JSON and CSV keep their labels too.

Two entries measured under different protocol cards (:mod:`fewbench.reports.protocol`: one
transductive and one inductive, other test-time steps, another training budget) are not one
measurement: what differs is said before any p-value (above the table, and in a ``protocol``
column beside the difference), and ``protocol_differs`` lists it in CSV and JSON.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from fewbench.errors import FewbenchError
from fewbench.plugin.params import closest
from fewbench.reports import protocol
from fewbench.reports.significance import adjust, difference

if TYPE_CHECKING:
    from fewbench.reports.results import Results, Setting

# pandas only where a comparison is rendered: the command line imports this module for
# FORMATS, and pandas would slow every command's start.

GROUP = ("dataset", "ways", "shots", "backbone")
FORMATS = ("table", "markdown", "csv", "json")


def _groups(results: Results) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for s in results.settings:
        groups.setdefault(tuple(s.keys[k] for k in GROUP), []).append(s)
    return groups


def _record(key: tuple, s: Setting, base: Setting, names: dict[str, str]) -> dict[str, Any]:
    """``s`` minus ``base`` (two settings of one group), per episode."""
    record: dict[str, Any] = dict(zip(GROUP, key, strict=True))
    learner, other = str(s.keys["learner"]), str(base.keys["learner"])
    record.update(
        learner=learner,
        baseline=other,
        learner_name=names.get(learner, learner),
        baseline_name=names.get(other, other),
        # Smoke runs (--max-iterations) among the two: their difference is a short budget's.
        capped=[str(x.keys["learner"]) for x in (s, base) if x.cap is not None],
        # What differs between the two protocol cards, said before the p-values.
        protocol_differs=protocol.differences(
            s.protocol, base.protocol, (names.get(learner, learner), names.get(other, other))
        ),
    )
    if not (s.done and base.done):
        missing = s if not s.done else base
        record.update(
            difference=math.nan, ci95=math.nan, p_t=math.nan, p_wilcoxon=math.nan,
            episodes=0, paired=None,
            status=f"{names.get(str(missing.keys['learner']), missing.keys['learner'])}: "
            f"{missing.status}",
        )  # fmt: skip
        return record
    paired = s.episode_key == base.episode_key
    same_episodes = paired and len(s.per_episode) == len(base.per_episode)
    if not same_episodes and min(len(s.per_episode), len(base.per_episode)) < 2:
        # Welch's test needs two episodes a side: the difference of the means, nothing more.
        record.update(
            difference=s.scale * float(s.per_episode.mean() - base.per_episode.mean()),
            ci95=math.nan, p_t=math.nan, p_wilcoxon=math.nan,
            episodes=min(len(s.per_episode), len(base.per_episode)), paired=False, status="done",
        )  # fmt: skip
        return record
    d = difference(s.per_episode, base.per_episode, paired=paired)
    record.update(
        difference=s.scale * d.mean,
        ci95=s.scale * d.ci95,
        p_t=d.p_t,
        p_wilcoxon=d.p_wilcoxon,
        episodes=d.episodes,
        paired=d.paired,
        status="done",
    )
    return record


def _baseline_label(results: Results, baseline: str, names: dict[str, str]) -> str:
    """The label of ``--baseline``, given as a label or as the name the report shows."""
    learners = sorted({str(s.keys["learner"]) for s in results.settings})
    if baseline in learners:
        return baseline
    by_name = [label for label in learners if names.get(label) == baseline]
    if len(by_name) == 1:
        return by_name[0]
    raise FewbenchError(
        f"--baseline {baseline!r}: no such learner in these runs{closest(baseline, learners)}; "
        f"learners: {', '.join(learners)}"
    )


def compare_to_baseline(
    results: Results, baseline: str, names: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every learner minus ``baseline`` (a label, or the name shown), in each setting
    that has it; p-values uncorrected."""
    names = names or {}
    baseline = _baseline_label(results, baseline, names)
    out = []
    for key, members in _groups(results).items():
        base = next((s for s in members if s.keys["learner"] == baseline), None)
        if base is None:
            continue
        out += [_record(key, s, base, names) for s in members if s is not base]
    return out


def compare_all_pairs(
    results: Results, names: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Every pair of learners in each setting, the first (in the runs' order) minus the
    second, with the p-values also adjusted by Holm's method over the setting's pairs that
    both finished (``p_t_holm``, ``p_wilcoxon_holm``)."""
    names = names or {}
    out = []
    for key, members in _groups(results).items():
        pairs = [_record(key, a, b, names) for i, a in enumerate(members) for b in members[i + 1 :]]
        done = [r for r in pairs if r["status"] == "done"]
        for column in ("p_t", "p_wilcoxon"):
            observed = [r for r in done if not math.isnan(r[column])]
            adjusted = adjust([r[column] for r in observed], "holm")
            for r in pairs:
                r[f"{column}_holm"] = math.nan
            for r, p in zip(observed, adjusted, strict=True):
                r[f"{column}_holm"] = p
        out += pairs
    return out


def render_comparison(records: list[dict[str, Any]], fmt: str, decimals: int = 2) -> str:
    if fmt == "json":
        clean = [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in records
        ]
        return json.dumps(clean, indent=2) + "\n"
    import pandas as pd

    frame = pd.DataFrame(records)
    if frame.empty:
        return "nothing to compare: no setting has two learners (and the baseline, if given)\n"
    if fmt == "csv":
        if "capped" in frame:
            frame["capped"] = frame["capped"].map(";".join)
        if "protocol_differs" in frame:
            frame["protocol_differs"] = frame["protocol_differs"].map("; ".join)
        return frame.to_csv(index=False, float_format=f"%.{decimals + 4}f")
    all_pairs = "p_t_holm" in records[0]

    def shown_name(r: dict[str, Any], side: str) -> str:
        capped = r[side] in r.get("capped", ())
        return r[f"{side}_name"] + (" (capped)" if capped else "")

    columns: dict[str, list[str]] = {
        "setting": [
            f"{r['dataset']} {r['ways']}-way {r['shots']}-shot {r['backbone']}" for r in records
        ],
        "learner": [shown_name(r, "learner") for r in records],
    }
    differences = [
        f"{r['difference']:+.{decimals}f} ± {_ci(r['ci95'], decimals)}"
        if r["status"] == "done"
        else r["status"]
        for r in records
    ]
    if all_pairs:
        columns["minus"] = [shown_name(r, "baseline") for r in records]
        columns["difference"] = differences
    else:
        columns[f"minus {shown_name(records[0], 'baseline')}"] = differences
    differing = [r for r in records if r.get("protocol_differs")]
    if differing:  # before the p-values: they compare two measurements, not one
        columns["protocol"] = ["differs" if r.get("protocol_differs") else "same" for r in records]
    columns["p (paired t)"] = [_p(r["p_t"]) for r in records]
    columns["p (Wilcoxon)"] = [_p(r["p_wilcoxon"]) for r in records]
    if all_pairs:
        columns["p (t, Holm)"] = [_p(r["p_t_holm"]) for r in records]
        columns["p (Wilcoxon, Holm)"] = [_p(r["p_wilcoxon_holm"]) for r in records]
    columns["episodes"] = [
        f"{r['episodes']}" + ("" if r["paired"] in (True, None) else " (unpaired: Welch)")
        for r in records
    ]
    shown = pd.DataFrame(columns)
    if all_pairs:
        note = (
            "Every pair of learners in each setting: the difference of the per-episode results "
            "(learner minus the other), mean ± 95% CI from the paired differences; two-sided "
            "p-values, and the same adjusted by Holm's method over the pairs of the setting "
            "(family-wise error rate)."
        )
    else:
        note = (
            "Difference of the per-episode results (learner minus baseline), mean ± 95% CI from "
            "the paired differences; two-sided p-values, not corrected for multiple comparisons."
        )
    if any(r.get("capped") for r in records):
        note += (
            " (capped): a smoke run (fewbench run --max-iterations) that trained fewer "
            "iterations than its settings give; a difference to it is a short budget's."
        )
    before = protocol_notes(differing, markdown=fmt == "markdown")
    if fmt == "markdown":
        header = list(shown.columns)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in shown.itertuples(index=False)]
        return before + "\n".join(lines) + "\n\n" + note + "\n"
    return before + shown.to_string(index=False) + "\n\n" + note + "\n"


def protocol_notes(records: list[dict[str, Any]], markdown: bool = False) -> str:
    """What differs between the protocol cards of each pair that differs, said before the
    table of p-values: such a difference is between two settings, not only two methods."""
    if not records:
        return ""
    bullet, sub = ("- ", "  - ") if markdown else ("  ", "    ")
    lines = [
        "Protocols differ: these pairs were measured in different settings, and their "
        "p-values compare the settings as much as the methods (protocol column: differs).",
        "",
    ]
    for r in records:
        where = f"{r['dataset']} {r['ways']}-way {r['shots']}-shot {r['backbone']}"
        lines.append(f"{bullet}{r['learner_name']} minus {r['baseline_name']} ({where}):")
        lines += [f"{sub}{difference}" for difference in r["protocol_differs"]]
    return "\n".join(lines) + "\n\n"


def _ci(value: float, decimals: int) -> str:
    """A CI half-width as printed: ``n/a`` where there is none (one test episode)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "<1e-4" if value < 1e-4 else f"{value:.4f}"
