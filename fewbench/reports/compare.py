"""``fewbench compare``: every method against a baseline, episode by episode.

For each setting (dataset, ways, shots, backbone) that has the baseline, every
other learner's per-episode results minus the baseline's: the mean difference,
its 95% confidence interval from the paired differences, and the p-values of the
paired t-test and the Wilcoxon signed-rank test (uncorrected: one comparison per
line). Entries not evaluated on the same episodes fall back to Welch's test.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from fewbench.errors import FewbenchError
from fewbench.plugin.params import closest
from fewbench.reports.significance import difference

if TYPE_CHECKING:
    from fewbench.reports.results import Results

# pandas only where a comparison is rendered: the command line imports this module for
# FORMATS, and pandas would slow every command's start.

GROUP = ("dataset", "ways", "shots", "backbone")
FORMATS = ("table", "markdown", "csv", "json")


def compare_to_baseline(results: Results, baseline: str) -> list[dict[str, Any]]:
    learners = sorted({s.keys["learner"] for s in results.settings})
    if baseline not in learners:
        raise FewbenchError(
            f"--baseline {baseline!r}: no such learner in these runs{closest(baseline, learners)}; "
            f"learners: {', '.join(learners)}"
        )
    groups: dict[tuple, list] = {}
    for s in results.settings:
        groups.setdefault(tuple(s.keys[k] for k in GROUP), []).append(s)
    out = []
    for key, members in groups.items():
        base = next((s for s in members if s.keys["learner"] == baseline), None)
        if base is None:
            continue
        for s in members:
            if s is base:
                continue
            record: dict[str, Any] = dict(zip(GROUP, key, strict=True))
            record.update(learner=s.keys["learner"], baseline=baseline)
            if not (s.done and base.done):
                missing = s if not s.done else base
                record.update(
                    difference=math.nan, ci95=math.nan, p_t=math.nan, p_wilcoxon=math.nan,
                    episodes=0, paired=None,
                    status=f"{missing.keys['learner']}: {missing.status}",
                )  # fmt: skip
                out.append(record)
                continue
            d = difference(
                s.per_episode, base.per_episode, paired=s.episode_key == base.episode_key
            )
            record.update(
                difference=s.scale * d.mean,
                ci95=s.scale * d.ci95,
                p_t=d.p_t,
                p_wilcoxon=d.p_wilcoxon,
                episodes=d.episodes,
                paired=d.paired,
                status="done",
            )
            out.append(record)
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
        return "nothing to compare: no setting has both the baseline and another learner\n"
    if fmt == "csv":
        return frame.to_csv(index=False, float_format=f"%.{decimals + 4}f")
    shown = pd.DataFrame(
        {
            "setting": [
                f"{r['dataset']} {r['ways']}-way {r['shots']}-shot {r['backbone']}" for r in records
            ],
            "learner": frame["learner"],
            f"minus {records[0]['baseline']}": [
                f"{r['difference']:+.{decimals}f} ± {r['ci95']:.{decimals}f}"
                if r["status"] == "done"
                else r["status"]
                for r in records
            ],
            "p (paired t)": [_p(r["p_t"]) for r in records],
            "p (Wilcoxon)": [_p(r["p_wilcoxon"]) for r in records],
            "episodes": [
                f"{r['episodes']}" + ("" if r["paired"] in (True, None) else " (unpaired: Welch)")
                for r in records
            ],
        }
    )
    note = (
        "Difference of the per-episode results (learner minus baseline), mean ± 95% CI from the "
        "paired differences; two-sided p-values, not corrected for multiple comparisons."
    )
    if fmt == "markdown":
        header = list(shown.columns)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in shown.itertuples(index=False)]
        return "\n".join(lines) + "\n\n" + note + "\n"
    return shown.to_string(index=False) + "\n\n" + note + "\n"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "<1e-4" if value < 1e-4 else f"{value:.4f}"
