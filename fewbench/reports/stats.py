"""Mean and 95% confidence interval of test accuracy.

One training seed: the usual Student-t interval over the test episodes,
``t_{0.975, E-1} * s / sqrt(E)``.

Several seeds, all evaluated on the same fixed episodes, form a crossed
seeds x episodes design. Both seeds and episodes are random draws from what a
reader cares about (other training runs, other test episodes), so the grand mean
has variance ``sigma_seed^2/S + sigma_episode^2/E + sigma_residual^2/(S E)``.
The two-way ANOVA mean squares (no replication) estimate it without bias as
``(MS_seed + MS_episode - MS_residual) / (S E)``; the degrees of freedom of that
linear combination come from Satterthwaite's approximation, and the half-width is
``t_{0.975, df} * sqrt(variance)``. With many episodes and few seeds the
interval is dominated by the seed-to-seed spread, as it should be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    mean: float
    ci95: float
    seeds: int
    episodes: int


def mean_ci95(values: np.ndarray | list, confidence: float = 0.95) -> Estimate:
    """``values[seed, episode]`` (or a flat list for one seed) -> mean and CI half-width."""
    from scipy import stats  # here, not at the top: scipy is slow to import

    table = np.asarray(values, dtype=float)
    if table.ndim == 1:
        table = table[None, :]
    seeds, episodes = table.shape
    if episodes == 0:
        raise ValueError("no episodes to summarise")
    mean = float(table.mean())
    quantile = 0.5 + confidence / 2
    if seeds == 1:
        if episodes < 2:
            return Estimate(mean, math.nan, seeds, episodes)
        sd = float(table[0].std(ddof=1))
        return Estimate(
            mean,
            float(stats.t.ppf(quantile, episodes - 1)) * sd / math.sqrt(episodes),
            seeds,
            episodes,
        )
    if episodes == 1:  # only seed-to-seed variation is observable
        sd = float(table[:, 0].std(ddof=1))
        return Estimate(
            mean, float(stats.t.ppf(quantile, seeds - 1)) * sd / math.sqrt(seeds), seeds, episodes
        )
    seed_means = table.mean(axis=1)
    episode_means = table.mean(axis=0)
    residual = table - seed_means[:, None] - episode_means[None, :] + mean
    df_seed, df_episode, df_residual = seeds - 1, episodes - 1, (seeds - 1) * (episodes - 1)
    ms_seed = episodes * float(((seed_means - mean) ** 2).sum()) / df_seed
    ms_episode = seeds * float(((episode_means - mean) ** 2).sum()) / df_episode
    ms_residual = float((residual**2).sum()) / df_residual
    terms = [(ms_seed, df_seed), (ms_episode, df_episode), (-ms_residual, df_residual)]
    combined = sum(ms for ms, _ in terms)
    if combined <= 0:  # sampling noise can push the estimate below zero; fall back to episodes
        terms = [(ms_episode, df_episode)]
        combined = ms_episode
    if combined == 0:
        return Estimate(mean, 0.0, seeds, episodes)
    df = combined**2 / sum(ms**2 / d for ms, d in terms)
    variance = combined / (seeds * episodes)
    return Estimate(mean, float(stats.t.ppf(quantile, df)) * math.sqrt(variance), seeds, episodes)
