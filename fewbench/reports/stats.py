"""Mean and 95% confidence interval of test accuracy, and what the interval covers.

Two intervals, chosen by ``fewbench report --interval`` (what each covers, in the
words reports use: :data:`fewbench.reports.formats.INTERVALS`):

``episodes`` (the default, :func:`mean_ci95`)
    Every cell is tested on fixed episodes, each drawn by its own seeded generator from the
    dataset's test classes and their stored examples. Given that pool, the episodes are
    independent draws, so the interval covers *other episodes drawn from these same test
    classes and examples* (and other training seeds where there are several).

    One training seed: the usual Student-t interval over the test episodes,
    ``t_{0.975, E-1} * s / sqrt(E)``.

    Several seeds, all evaluated on the same fixed episodes, form a crossed seeds x episodes
    design. Both seeds and episodes are random draws from what a reader cares about (other
    training runs, other test episodes), so the grand mean has variance
    ``sigma_seed^2/S + sigma_episode^2/E + sigma_residual^2/(S E)``. The two-way ANOVA mean
    squares (no replication) estimate it without bias as
    ``(MS_seed + MS_episode - MS_residual) / (S E)``; the degrees of freedom of that linear
    combination come from Satterthwaite's approximation, and the half-width is
    ``t_{0.975, df} * sqrt(variance)``. With many episodes and few seeds the interval is
    dominated by the seed-to-seed spread, as it should be.

``population`` (:func:`population_ci95`)
    A benchmark's test split is itself a sample: a few classes (20 in mini-ImageNet), each
    with a few hundred examples, and every episode is drawn from that one pool, so the same
    classes and examples come back episode after episode. Lafargue et al., "Oops, I Sampled
    it Again: Reinterpreting Confidence Intervals in Few-Shot Learning" (TMLR 2024,
    arXiv:2409.02850), show that the usual interval, over tasks drawn with replacement from
    the fixed test data, accounts for the randomness of the sampler but not of the data,
    and is much too narrow for a claim about the method rather than about this test pool.
    Two episodes that share a class are correlated (the class is easy or hard for both),
    and no number of episodes averages that away: the mean has a floor of variance
    ``~ sigma_class^2 / classes``.

    This interval covers *new test classes, with new examples, drawn from the population the
    test classes come from*, as well as new episodes (and training seeds where there are
    several). Its model is the crossed random-effects (multiple-membership) model

    ``y[s, e] = mu + b_s + (1/N) sum_{c in e} a_c + u_e + r_se``

    with ``N`` ways, seed effects ``b_s``, a random effect ``a_c`` for each test class as it
    is stored (its concept and its examples: an example's difficulty that is the same in
    every episode it appears in is part of its class's effect), an episode effect ``u_e``
    (which examples and queries it drew) and a residual. With ``m_c`` the number of episodes
    that hold class ``c``, the variance of the grand mean is

    ``V_population = V_episodes + sigma_class^2 * kappa``,
    ``kappa = sum_c m_c (m_c - 1) / (N^2 E (E - 1))``,

    where ``V_episodes`` is what the episodes interval estimates (see above) and the second
    term is the covariance of the pairs of distinct episodes that share a class, which the
    episodes interval takes to be zero (``kappa`` counts those pairs, once per class shared).
    ``sigma_class^2`` is estimated from the per-episode means over seeds by Henderson's
    method III (fitting constants; Searle, Casella & McCulloch, *Variance Components*, 1992,
    ch. 5): the reduction in sum of squares due to the classes, ``R`` on ``rank - 1``
    degrees of freedom, against the residual sum of squares after fitting them, on
    ``E - rank`` degrees of freedom, whose expectations are known exactly for the design the
    episodes happen to have. A negative estimate is taken as zero, which gives the episodes
    interval back. The half-width is Student t; the part of the variance that comes from the
    episodes and classes is taken on ``classes - 1`` degrees of freedom, as for a mean over
    that many clusters (Cameron & Miller, "A Practitioner's Guide to Cluster-Robust
    Inference", J. Human Resources 2015, on few clusters), and combined with the seed terms by
    Satterthwaite's approximation (1946). A benchmark with 20 test classes is a sample of
    20, whatever the number of episodes. (Satterthwaite's approximation of the estimate
    itself, a difference of mean squares, gives a fraction of a degree of freedom, and an
    absurdly wide interval, where the class variance is near zero.) The interval is never
    narrower than the episodes interval, since it covers strictly more.

    Why it needs each episode's classes: given the pool, the episodes are independent
    whatever their order or evaluation seed, so splitting them into blocks (batch means) or
    comparing evaluation seeds shows no more variation than the episodes interval already
    has; the class variance is seen only through which episodes share which classes. The
    results store keeps each episode's result, not its classes, so the report draws them
    again from the data, as evaluation drew them (:class:`fewbench.episodes.classes.DrawnTestClasses`).

    Where the episodes are too few to tell class effects from episode effects (no fewer
    distinct classes than episodes: no residual degrees of freedom), the interval is a
    conservative bound instead: all of the within-pool variation between episodes is
    counted as class effects, ``sigma_class^2 <= s^2 N U / (U - N)`` for ``U`` classes,
    since an episode of ``N`` of them has a between-episode variance of at least
    ``sigma_class^2 (U - N) / (N U)`` (:attr:`Estimate.bound`). Where every episode holds the
    same classes there is one draw of classes and no interval (``nan``). Where no two
    episodes share a class, ``kappa`` is zero and the two intervals are the same.

    What it does not cover: interactions of classes (a pair of similar classes that is hard
    only together) beyond what the episode effect absorbs, a grouping of the classes above
    the level the pool draws them at (Omniglot's rotations of one character, or its
    alphabets, counted as unrelated classes), and a population of classes unlike the test
    split's (the usual caveat: new classes *of the same kind*).
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
    # The population interval only: distinct test classes the episodes drew from, and whether
    # the half-width is the conservative bound (too few episodes to estimate the class
    # variance; see the module's docstring).
    classes: int = 0
    bound: bool = False


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


def population_ci95(
    values: np.ndarray | list, classes: np.ndarray | list, confidence: float = 0.95
) -> Estimate:
    """``values[seed, episode]`` (or flat) and ``classes[episode, way]``, the test classes
    each episode holds (any integer ids) -> mean and the half-width of the interval that also
    covers the draw of the test classes (the module's docstring gives the model).

    ``classes`` may list more episodes than ``values`` holds (the first ones are used: a
    setting keeps its seeds' common episodes)."""
    from scipy import stats  # here, not at the top: scipy is slow to import

    table = np.asarray(values, dtype=float)
    if table.ndim == 1:
        table = table[None, :]
    seeds, episodes = table.shape
    narrow = mean_ci95(table, confidence)
    members = np.asarray(classes)
    if members.ndim != 2 or members.shape[0] < episodes:
        raise ValueError(
            f"classes: expected [episodes, ways] for {episodes} episodes, got shape {members.shape}"
        )
    members = members[:episodes]
    ways = members.shape[1]
    _, flat = np.unique(members, return_inverse=True)
    index = flat.reshape(members.shape)
    distinct = int(index.max()) + 1 if index.size else 0
    if (np.diff(np.sort(index, axis=1), axis=1) == 0).any():
        raise ValueError("classes: an episode lists the same class twice")
    mean = narrow.mean

    def result(ci: float, bound: bool = False) -> Estimate:
        return Estimate(mean, ci, seeds, episodes, distinct, bound)

    if episodes < 2 or distinct <= ways:  # one draw of classes: nothing to generalise from
        return result(math.nan)
    counts = np.bincount(index.ravel(), minlength=distinct).astype(float)
    # Pairs of distinct episodes that share a class, once per class shared, over N^2 E (E-1).
    kappa = float((counts * (counts - 1)).sum()) / (ways**2 * episodes * (episodes - 1))
    if kappa == 0:  # no two episodes share a class: they are independent in the population too
        return result(narrow.ci95)

    # The episodes interval's seed terms (mean_ci95's, with the same fall-back), as
    # (coefficient * mean square, degrees of freedom); the episode term is split below.
    z = table.mean(axis=0)  # per-episode means over seeds
    z_centred = z - z.mean()
    total = float((z_centred**2).sum())  # Q1, on E - 1 degrees of freedom
    seed_terms: list[tuple[float, float]] = []
    if seeds > 1:
        seed_means = table.mean(axis=1)
        residual = table - seed_means[:, None] - z[None, :] + mean
        ms_seed = episodes * float(((seed_means - mean) ** 2).sum()) / (seeds - 1)
        ms_residual = float((residual**2).sum()) / ((seeds - 1) * (episodes - 1))
        ms_episode = seeds * total / (episodes - 1)
        if ms_seed + ms_episode - ms_residual > 0:
            scale = 1.0 / (seeds * episodes)
            seed_terms = [
                (scale * ms_seed, seeds - 1),
                (-scale * ms_residual, (seeds - 1) * (episodes - 1)),
            ]

    rank, reduction = _class_fit(index, z_centred, ways) if distinct < episodes else (episodes, 0.0)
    reduction = min(reduction, total)  # R(classes | mu)
    within = total - reduction
    # E[R] = tau^2 (rank - 1) + sigma_class^2 * a, a = tr((P_S - J/E) S S') / N^2.
    a = (episodes * ways - float((counts**2).sum()) / episodes) / ways**2
    per_episode = 1.0 / (episodes * (episodes - 1))  # V_episodes' episode term is Q1 * this
    if episodes - rank >= 1 and rank >= 2:
        ms_class = reduction / (rank - 1)
        ms_within = within / (episodes - rank)
        if ms_class <= ms_within:  # no class effect beyond the episodes': the narrow interval
            return result(narrow.ci95)
        # V = seed terms + Q1 / (E (E-1)) + kappa * (rank - 1) (MS_class - MS_within) / a. The
        # classes' part is taken on rank - 1 degrees of freedom, as a mean over that many
        # clusters is: Satterthwaite's approximation of the difference of mean squares gives
        # far fewer (and absurd widths) where the class variance is near zero.
        extra = kappa * (rank - 1) / a
        classes_part = ((rank - 1) * per_episode + extra) * ms_class + (
            (episodes - rank) * per_episode - extra
        ) * ms_within
        terms = [*seed_terms, (classes_part, rank - 1)]
        bound = False
    else:  # sigma_class^2 <= s^2 N U / (U - N): all between-episode variation is classes'
        s2 = total / (episodes - 1)
        factor = per_episode * (episodes - 1) + kappa * ways * distinct / (distinct - ways)
        terms = [*seed_terms, (factor * s2, episodes - 1)]
        bound = True
    variance = sum(value for value, _ in terms)
    if variance <= 0:
        return result(narrow.ci95, bound)
    df = variance**2 / sum(value**2 / d for value, d in terms)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(variance)
    # It covers strictly more than the episodes interval: never narrower.
    return result(max(half, narrow.ci95) if math.isfinite(narrow.ci95) else half, bound)


def _class_fit(index: np.ndarray, centred: np.ndarray, ways: int) -> tuple[int, float]:
    """Henderson III's fit: the rank of the class incidence ``S`` (``E x U``, a 1 where an
    episode holds a class) and the sum of squares of ``centred`` that least squares on ``S``
    explains, through the ``U x U`` Gram matrix ``S'S`` (``S 1 = N 1``: the intercept is in
    its span, so this is the reduction due to the classes after the mean)."""
    distinct = int(index.max()) + 1
    gram = np.zeros((distinct, distinct))
    for i in range(ways):
        for j in range(ways):
            np.add.at(gram, (index[:, i], index[:, j]), 1.0)
    sums = np.zeros(distinct)
    np.add.at(sums, index.ravel(), np.repeat(centred, ways))
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    kept = eigenvalues > eigenvalues.max() * distinct * np.finfo(float).eps
    projected = eigenvectors[:, kept].T @ sums
    return int(kept.sum()), float((projected**2 / eigenvalues[kept]).sum())
