"""Learning-rate schedules the built-in learners share, computed from the iteration so that a
resumed run follows the same schedule as an uninterrupted one."""

from __future__ import annotations


def halved_every(
    lr: float, every: int, iteration: int, episodes_per_step: int, factor: float = 0.5
) -> float:
    """``lr`` multiplied by ``factor`` (halved) once per ``every`` training episodes trained
    before ``iteration`` (Snell et al.'s, Sung et al.'s and FEAT's step decay); ``every`` 0
    keeps it constant."""
    if not every:
        return lr
    episodes_before = (iteration - 1) * episodes_per_step
    return lr * factor ** (episodes_before // every)


def decayed_at_fractions(
    lr: float, fractions: list[float], factors: list[float], iteration: int, total: int | None
) -> float:
    """``lr`` times the factor of the last fraction of the ``total`` steps passed before
    ``iteration`` (MetaOptNet's table of factors), ``lr`` until ``total`` is known."""
    rate = lr
    if not total:
        return rate
    for fraction, factor in zip(fractions, factors, strict=True):
        if iteration > fraction * total:
            rate = lr * factor
    return rate


def step_decay(
    lr: float, fractions: list[float], factor: float, iteration: int, total: int | None
) -> float:
    """``lr`` times ``factor`` once per fraction of the ``total`` steps passed before
    ``iteration`` (RFS's and SimpleShot's step decay), ``lr`` until ``total`` is known."""
    if not total:
        return lr
    return lr * factor ** sum(iteration > f * total for f in fractions)
