"""Which differences between methods are real, from paired per-episode results.

Every method of a suite is evaluated on the same fixed test episodes, so two
methods can be compared episode by episode: the per-episode differences remove
the (large) variation in episode difficulty that an unpaired comparison of two
means has to carry. With several seeds, each method's per-episode values are first
averaged over its seeds. When two entries were not evaluated on the same episodes
(different eval seed, query count or data), the comparison falls back to Welch's
unpaired t-test and says so.

Marking a column: the best entry (highest accuracy, lowest error) is compared
with every other entry; the p-values are adjusted for the number of comparisons
(Holm's step-down method by default) and an entry whose adjusted p-value is at
least ``alpha`` is "not significantly worse than the best".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# numpy and scipy are imported where a test runs, not here: the command line imports this
# module for TESTS and CORRECTIONS, and scipy alone would slow every command's start.

TESTS = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank test"}
CORRECTIONS = {"holm": "Holm", "bonferroni": "Bonferroni", "none": "no"}


@dataclass(frozen=True)
class Comparison:
    p: float
    paired: bool


def compare(a: np.ndarray, b: np.ndarray, test: str = "t", *, paired: bool = True) -> Comparison:
    """Two-sided p-value for "a and b have the same mean" (per-episode values)."""
    import numpy as np
    from scipy import stats

    if paired and len(a) == len(b):
        difference = a - b
        if not np.any(difference):
            return Comparison(1.0, True)
        if test == "wilcoxon":
            return Comparison(float(stats.wilcoxon(a, b, zero_method="wilcox").pvalue), True)
        if np.allclose(difference, difference[0], rtol=0, atol=1e-12):  # a constant shift
            # has no variance to test against (float noise would make one up).
            return Comparison(0.0, True)
        return Comparison(float(stats.ttest_rel(a, b).pvalue), True)
    if len(a) < 2 or len(b) < 2:
        return Comparison(math.nan, False)
    return Comparison(float(stats.ttest_ind(a, b, equal_var=False).pvalue), False)


def adjust(pvalues: list[float], method: str = "holm") -> list[float]:
    """P-values adjusted for ``len(pvalues)`` comparisons (family-wise error rate)."""
    m = len(pvalues)
    if method == "none" or m == 0:
        return list(pvalues)
    if method == "bonferroni":
        return [min(1.0, p * m) for p in pvalues]
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Mark:
    best: bool = False
    tie: bool = False  # not significantly worse than the best
    p_adjusted: float | None = None  # against the best
    paired: bool = True


def mark_column(
    per_episode: list[np.ndarray | None],
    means: list[float | None],
    episode_keys: list[str],
    *,
    higher_is_better: bool = True,
    test: str = "t",
    correction: str = "holm",
    alpha: float = 0.05,
) -> list[Mark]:
    """Marks for the entries of one column; ``None`` entries (nothing done) get none."""
    present = [i for i, m in enumerate(means) if m is not None and not math.isnan(m)]
    marks = [Mark() for _ in means]
    if not present:
        return marks
    pick = max if higher_is_better else min
    best = pick(present, key=lambda i: means[i])
    marks[best] = Mark(best=True)
    others = [i for i in present if i != best]
    results = [
        compare(
            per_episode[i],
            per_episode[best],
            test,
            paired=episode_keys[i] == episode_keys[best],
        )
        for i in others
    ]
    adjusted = adjust([1.0 if math.isnan(r.p) else r.p for r in results], correction)
    for i, result, p in zip(others, results, adjusted, strict=True):
        marks[i] = Mark(tie=p >= alpha, p_adjusted=p, paired=result.paired)
    return marks


@dataclass(frozen=True)
class Difference:
    """Method minus baseline, per episode: mean, 95% CI half-width and p-values."""

    mean: float
    ci95: float
    p_t: float
    p_wilcoxon: float
    episodes: int
    paired: bool


def difference(method: np.ndarray, baseline: np.ndarray, *, paired: bool = True) -> Difference:
    from scipy import stats

    if paired and len(method) == len(baseline):
        diff = method - baseline
        n = len(diff)
        sd = float(diff.std(ddof=1)) if n > 1 else math.nan
        ci = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else math.nan
        return Difference(
            float(diff.mean()),
            ci,
            compare(method, baseline, "t").p,
            compare(method, baseline, "wilcoxon").p,
            n,
            True,
        )
    # Welch: unpaired difference of means with Satterthwaite degrees of freedom.
    va, vb = method.var(ddof=1) / len(method), baseline.var(ddof=1) / len(baseline)
    df = (va + vb) ** 2 / (va**2 / (len(method) - 1) + vb**2 / (len(baseline) - 1))
    return Difference(
        float(method.mean() - baseline.mean()),
        float(stats.t.ppf(0.975, df)) * math.sqrt(va + vb),
        compare(method, baseline, paired=False).p,
        math.nan,
        min(len(method), len(baseline)),
        False,
    )
