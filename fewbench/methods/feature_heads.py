"""Inductive classifiers on frozen features: each query is classified from the support set
and that query alone. Batched over episodes: support ``[T, S, D]`` with labels ``[T, S]``
(0..ways-1), queries ``[T, Q, D]``; each returns scores ``[T, Q, ways]`` whose arg-max is the
prediction (log-probabilities where the method has them).

* :func:`transform_features`: SimpleShot's feature transforms (Wang et al. 2019, Sec. 3):
  ``UN`` (unchanged), ``L2N`` (L2-normalised), ``CL2N`` (centred by the base-class mean, then
  L2-normalised).
* :func:`nearest_centroid`: SimpleShot's rule, the nearest class mean in Euclidean distance.
* :func:`nearest_neighbours`: a k-nearest-neighbour vote.
* :func:`logistic_regression`: a multinomial logistic regression fitted on each support set
  (the linear probe of Tian et al. 2020 and of the frozen-feature literature).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

TRANSFORMS = ("UN", "L2N", "CL2N")


def transform_features(features: Tensor, transform: str, base_mean: Tensor | None) -> Tensor:
    """SimpleShot's transforms of features ``[..., D]``: ``UN`` leaves them, ``L2N`` divides
    each by its L2 norm, ``CL2N`` subtracts ``base_mean`` ``[D]`` (the mean feature of the
    training classes' examples) first."""
    if transform == "UN":
        return features
    if transform == "CL2N":
        if base_mean is None:
            raise ValueError("CL2N needs the base-class mean")
        features = features - base_mean
    elif transform != "L2N":
        raise ValueError(f"unknown transform {transform!r}; one of {', '.join(TRANSFORMS)}")
    return functional.normalize(features, dim=-1)


def class_means(support: Tensor, labels: Tensor, ways: int) -> Tensor:
    """The mean support feature of each class, ``[T, ways, D]`` (prototypical networks'
    prototypes, Snell et al. 2017 Eq. 1; SimpleShot's centroids)."""
    one_hot = functional.one_hot(labels, ways).to(support.dtype)  # [T, S, N]
    return one_hot.transpose(1, 2) @ support / one_hot.sum(1).clamp_min(1)[:, :, None]


def squared_distances(queries: Tensor, centres: Tensor) -> Tensor:
    """``||q - c||^2`` of every query ``[T, Q, D]`` to every centre ``[T, C, D]``: ``[T, Q, C]``.

    Expanded as ``|q|^2 - 2 q.c + |c|^2`` (a batched matrix product, no ``[T, Q, C, D]``
    tensor); clamped at 0 against rounding."""
    cross = queries @ centres.transpose(1, 2)
    norms = queries.pow(2).sum(-1, keepdim=True) + centres.pow(2).sum(-1)[:, None, :]
    return (norms - 2 * cross).clamp_min(0)


def nearest_centroid(support: Tensor, labels: Tensor, queries: Tensor, ways: int) -> Tensor:
    """SimpleShot's nearest-centroid rule: scores are minus the squared Euclidean distance of a
    query to each class mean of the support set."""
    return -squared_distances(queries, class_means(support, labels, ways))


def nearest_neighbours(
    support: Tensor, labels: Tensor, queries: Tensor, ways: int, k: int
) -> Tensor:
    """A vote of the ``k`` nearest support examples (Euclidean). The score of a class is its
    number of votes; a tie goes to the class whose voters are nearer on average (the score
    moves by less than one vote). ``k`` is capped at the support set's size."""
    k = min(k, support.shape[1])
    distances = torch.cdist(queries, support)  # [T, Q, S]
    nearest, index = distances.topk(k, dim=-1, largest=False)
    voters = torch.gather(labels[:, None, :].expand(-1, queries.shape[1], -1), 2, index)
    votes = functional.one_hot(voters, ways).to(queries.dtype)  # [T, Q, k, N]
    counts = votes.sum(2)
    # Tie-break: minus the mean distance of each class's voters, scaled into (0, 0.5).
    mean_distance = (votes * nearest[..., None]).sum(2) / counts.clamp_min(1)
    scale = 0.5 / (1.0 + nearest.amax(dim=-1, keepdim=True))
    return counts - scale * mean_distance * (counts > 0) - (counts == 0).to(queries.dtype)


def logistic_regression(
    support: Tensor,
    labels: Tensor,
    queries: Tensor,
    ways: int,
    *,
    C: float = 1.0,
    max_iter: int = 100,
    tolerance: float = 1e-6,
) -> Tensor:
    """A multinomial logistic regression fitted on each support set; the queries'
    log-probabilities.

    Minimises, per episode, ``C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2`` (scikit-learn's
    objective for ``LogisticRegression(C=C)``: the bias is not penalised) with L-BFGS in
    float64. The episodes' objectives are independent, so their sum is minimised at once: its
    minimum is every episode's minimum."""
    x = support.double()
    t, _, dim = x.shape
    weight = torch.zeros(t, dim, ways, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(t, 1, ways, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        optimizer.zero_grad()
        logits = x @ weight + bias
        loss = (
            C
            * functional.cross_entropy(
                logits.reshape(-1, ways), labels.reshape(-1), reduction="sum"
            )
            + 0.5 * weight.pow(2).sum()
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    with torch.no_grad():
        logits = queries.double() @ weight + bias
        return functional.log_softmax(logits, dim=-1).to(queries.dtype)
