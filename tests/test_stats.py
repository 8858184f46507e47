import math

import numpy as np
import pytest
from scipy import stats

from fewbench.reports.stats import mean_ci95


def test_one_seed_is_the_student_t_interval_by_hand():
    values = [1.0, 0.0, 1.0, 1.0]
    # mean 0.75; sample sd sqrt(((.25^2)*3 + .75^2)/3) = 0.5; t(0.975, 3) = 3.18245
    estimate = mean_ci95(values)
    assert estimate.mean == pytest.approx(0.75)
    assert estimate.ci95 == pytest.approx(3.182446305 * 0.5 / 2, rel=1e-6)
    assert (estimate.seeds, estimate.episodes) == (1, 4)


def test_several_seeds_by_hand():
    # 2 seeds x 3 episodes.
    table = np.array([[0.6, 0.8, 1.0], [0.4, 0.8, 0.6]])
    grand = table.mean()  # 0.7
    seed_means = np.array([0.8, 0.6])
    episode_means = np.array([0.5, 0.8, 0.8])
    ms_seed = 3 * ((seed_means - grand) ** 2).sum() / 1  # 0.06
    ms_episode = 2 * ((episode_means - grand) ** 2).sum() / 2  # 0.06
    residual = table - seed_means[:, None] - episode_means[None, :] + grand
    ms_residual = (residual**2).sum() / 2  # 0.02
    assert (ms_seed, ms_episode, ms_residual) == pytest.approx((0.06, 0.06, 0.02))
    variance = (0.06 + 0.06 - 0.02) / 6
    df = 0.1**2 / (0.06**2 / 1 + 0.06**2 / 2 + 0.02**2 / 2)
    expected = stats.t.ppf(0.975, df) * math.sqrt(variance)
    estimate = mean_ci95(table)
    assert estimate.mean == pytest.approx(0.7)
    assert estimate.ci95 == pytest.approx(expected)


def test_seed_variation_widens_the_interval():
    rng = np.random.default_rng(0)
    episodes = rng.normal(0.9, 0.05, size=200)
    same = np.stack([episodes, episodes + 0.001, episodes - 0.001])
    spread = np.stack([episodes, episodes + 0.05, episodes - 0.05])
    assert mean_ci95(spread).ci95 > 3 * mean_ci95(same).ci95


@pytest.mark.parametrize("seeds", [1, 3])
def test_coverage_is_close_to_95_percent(seeds):
    """Simulate seeds x episodes with random seed, episode and residual effects.

    With one seed the seed effect cannot be observed: the interval is about that
    trained model, so its target includes the seed effect.
    """
    rng = np.random.default_rng(1)
    covered, trials = 0, 1500
    for _ in range(trials):
        seed_effect = rng.normal(0, 0.02, size=(seeds, 1))
        episode_effect = rng.normal(0, 0.08, size=(1, 60))
        table = 0.9 + seed_effect + episode_effect + rng.normal(0, 0.03, size=(seeds, 60))
        estimate = mean_ci95(table)
        target = 0.9 + (seed_effect[0, 0] if seeds == 1 else 0.0)
        covered += abs(estimate.mean - target) <= estimate.ci95
    assert 0.92 <= covered / trials <= 0.985
