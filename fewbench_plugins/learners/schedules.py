"""Learning-rate schedules the built-in learners share, computed from the iteration so that a
resumed run follows the same schedule as an uninterrupted one."""

from __future__ import annotations


def halved_every(lr: float, every: int, iteration: int, episodes_per_step: int) -> float:
    """``lr`` halved once per ``every`` training episodes trained before ``iteration``
    (Snell et al.'s and Sung et al.'s step decay); ``every`` 0 keeps it constant."""
    if not every:
        return lr
    episodes_before = (iteration - 1) * episodes_per_step
    return lr * 0.5 ** (episodes_before // every)
