"""Transductive classifiers on frozen features: a query's label depends on the other queries
of its episode. Batched over episodes as :mod:`fewbench.methods.feature_heads`: support
``[T, S, D]`` with labels ``[T, S]``, queries ``[T, Q, D]``; each returns scores
``[T, Q, ways]`` whose arg-max is the prediction.

Each function implements its paper's algorithm as the authors' code runs it; the learners
built on them (the ``tim``, ``pt_map``, ``laplacianshot`` and ``bd_cspn`` plugins) name the
equations and every deviation.

* :func:`tim_gd`: TIM-GD (Boudiaf et al. 2020, Eq. 3 and Sec. 3.2).
* :func:`pt_map`: PT-MAP (Hu, Gripon & Pateux 2021, Sec. 3: power transform, Algorithm 1).
* :func:`laplacian_shot`: LaplacianShot (Ziko et al. 2020, Eq. 12, Algorithm 1).
* :func:`rectify_prototypes`: BD-CSPN (Liu, Song & Qin 2020, Sec. 3.2-3.3).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from fewbench.methods.feature_heads import class_means, squared_distances


# -- TIM ------------------------------------------------------------------------------------
def tim_logits(features: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """TIM's classifier: ``-temperature / 2 * ||x - w_k||^2`` (the authors' ``get_logits``)."""
    return -0.5 * temperature * squared_distances(features, weights)


def tim_gd(
    support: Tensor,
    labels: Tensor,
    queries: Tensor,
    ways: int,
    *,
    temperature: float = 15.0,
    loss_weights: tuple[float, float, float] = (0.1, 1.0, 0.1),
    lr: float = 1e-4,
    iterations: int = 1000,
) -> Tensor:
    """TIM-GD: class weights ``W``, initialised at the support class means, descend

        ``l_ce * CE(support) - (l_h * H(Y_Q) - l_c * H(Y_Q | X_Q))``

    (Eq. 3 with the code's weights ``[0.1, 1.0, 0.1]``): the support cross-entropy, minus the
    mutual information between query features and labels, the entropy of the query set's
    mean prediction (classes used evenly) less the mean entropy of each query's prediction
    (confident predictions). Adam on ``W`` alone; the episodes' losses are summed, so each
    episode's ``W`` follows its own gradient. Returns the queries' log-probabilities."""
    ce_weight, marginal_weight, conditional_weight = loss_weights
    weights = class_means(support, labels, ways).detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weights], lr=lr)
    one_hot = functional.one_hot(labels, ways).to(support.dtype)
    with torch.enable_grad():
        for _ in range(iterations):
            log_support = functional.log_softmax(tim_logits(support, weights, temperature), -1)
            probabilities = tim_logits(queries, weights, temperature).softmax(-1)
            cross_entropy = -(one_hot * log_support).sum(-1).mean(1).sum(0)
            marginal = probabilities.mean(1)
            marginal_entropy = -(marginal * torch.log(marginal + 1e-12)).sum(-1).sum(0)
            conditional_entropy = (
                -(probabilities * torch.log(probabilities + 1e-12)).sum(-1).mean(1).sum(0)
            )
            loss = ce_weight * cross_entropy - (
                marginal_weight * marginal_entropy - conditional_weight * conditional_entropy
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return functional.log_softmax(tim_logits(queries, weights, temperature), -1)


# -- PT-MAP -----------------------------------------------------------------------------------
def power_transform(features: Tensor, beta: float = 0.5, epsilon: float = 1e-6) -> Tensor:
    """PT-MAP's power transform ``(x + epsilon) ** beta``, then L2 normalisation (Eq. 1). The
    features must be non-negative (a ReLU network's)."""
    if bool((features < 0).any()):
        raise ValueError("the power transform needs non-negative features (a ReLU's output)")
    return functional.normalize((features + epsilon).pow(beta), dim=-1)


def centre_each_set(support: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
    """The authors' ``centerDatas``: the support set centred on its own mean, the query set on
    its own, each example then L2-normalised again."""
    support = functional.normalize(support - support.mean(1, keepdim=True), dim=-1)
    queries = functional.normalize(queries - queries.mean(1, keepdim=True), dim=-1)
    return support, queries


def sinkhorn(
    costs: Tensor, lam: float, column_mass: float, tolerance: float = 1e-6, max_iter: int = 1000
) -> Tensor:
    """The transport plan ``P ∝ exp(-lam * costs)`` ``[T, Q, N]`` scaled until each row sums
    to 1 (one unit per query) and each column to ``column_mass`` (classes of equal size),
    the authors' ``compute_optimal_transport``: it stops when the row sums move by at most
    ``tolerance``, or after ``max_iter`` rounds."""
    plan = torch.exp(-lam * (costs - costs.amin(dim=(1, 2), keepdim=True)))
    plan = plan / plan.sum(dim=(1, 2), keepdim=True)
    rows = torch.zeros(plan.shape[:2], dtype=plan.dtype, device=plan.device)
    for _ in range(max_iter):
        if float((rows - plan.sum(2)).abs().max()) <= tolerance:
            break
        rows = plan.sum(2)
        plan = plan / rows[:, :, None]
        plan = plan * (column_mass / plan.sum(1))[:, None, :]
    return plan


def pt_map(
    support: Tensor,
    labels: Tensor,
    queries: Tensor,
    ways: int,
    *,
    lam: float = 10.0,
    alpha: float = 0.2,
    epochs: int = 20,
) -> Tensor:
    """PT-MAP's MAP estimation (Algorithm 1) on features already power-transformed and
    centred (:func:`power_transform`, :func:`centre_each_set`). Class centres start at the
    support means; each epoch the queries' soft labels are the Sinkhorn plan of their
    squared distances to the centres (``lam``; every class given an equal share of the
    queries), the support keeps its labels, and each centre moves ``alpha`` of the way to
    the weighted mean of its examples. Returns the final plan's logarithm (each query's
    row sums to 1)."""
    queries_per_class = queries.shape[1] / ways
    everything = torch.cat([support, queries], dim=1)
    support_mask = functional.one_hot(labels, ways).to(support.dtype)
    centres = class_means(support, labels, ways)
    for _ in range(epochs):
        plan = sinkhorn(squared_distances(queries, centres), lam, queries_per_class)
        mask = torch.cat([support_mask, plan], dim=1)  # [T, S + Q, N]
        estimate = mask.transpose(1, 2) @ everything / mask.sum(1)[:, :, None]
        centres = centres + alpha * (estimate - centres)
    plan = sinkhorn(squared_distances(queries, centres), lam, queries_per_class)
    return torch.log(plan.clamp_min(1e-30))


# -- BD-CSPN ----------------------------------------------------------------------------------
def shift_queries(support: Tensor, queries: Tensor) -> Tensor:
    """BD-CSPN's cross-class bias diminishing (Sec. 3.3): every query moved by the mean
    support feature minus the mean query feature, ``xi = mean(S) - mean(Q)``."""
    return queries + (support.mean(1, keepdim=True) - queries.mean(1, keepdim=True))


def rectify_prototypes(
    support: Tensor,
    labels: Tensor,
    queries: Tensor,
    ways: int,
    *,
    top_z: int | None,
    epsilon: float = 10.0,
) -> Tensor:
    """BD-CSPN's intra-class bias diminishing (Sec. 3.2): each query is pseudo-labelled by its
    nearest basic prototype (support mean) in cosine similarity; each class takes its
    ``top_z`` most similar pseudo-labelled queries (all of them: ``None``) beside its support
    examples, and its rectified prototype is their weighted mean, the weights a softmax over
    the class's examples of ``epsilon * cos(x, P_n)``. Returns ``[T, ways, D]``."""
    prototypes = class_means(support, labels, ways)
    similarity = functional.normalize(queries, dim=-1) @ functional.normalize(
        prototypes, dim=-1
    ).transpose(1, 2)  # [T, Q, N]
    best, pseudo = similarity.max(-1)  # [T, Q]
    chosen = functional.one_hot(pseudo, ways).to(torch.bool)  # [T, Q, N]
    if top_z is not None and top_z < queries.shape[1]:
        ranked = best[:, :, None].expand(-1, -1, ways).masked_fill(~chosen, float("-inf"))
        order = ranked.argsort(dim=1, descending=True).argsort(dim=1)  # rank within class
        chosen = chosen & (order < top_z)
    members = torch.cat([functional.one_hot(labels, ways).to(torch.bool), chosen], dim=1)
    examples = torch.cat([support, queries], dim=1)  # [T, S + Q, D]
    cosine = functional.normalize(examples, dim=-1) @ functional.normalize(
        prototypes, dim=-1
    ).transpose(1, 2)  # [T, S + Q, N]
    weights = (epsilon * cosine).masked_fill(~members, float("-inf")).softmax(dim=1)
    return weights.transpose(1, 2) @ examples


def bd_cspn(
    support: Tensor,
    labels: Tensor,
    queries: Tensor,
    ways: int,
    *,
    top_z: int | None = 8,
    epsilon: float = 10.0,
) -> Tensor:
    """BD-CSPN: the queries shifted (:func:`shift_queries`), the prototypes rectified with the
    shifted queries (:func:`rectify_prototypes`), each query scored by ``epsilon`` times its
    cosine similarity to every rectified prototype (Sec. 3.1's cosine classifier)."""
    shifted = shift_queries(support, queries)
    prototypes = rectify_prototypes(support, labels, shifted, ways, top_z=top_z, epsilon=epsilon)
    return epsilon * (
        functional.normalize(shifted, dim=-1)
        @ functional.normalize(prototypes, dim=-1).transpose(1, 2)
    )


# -- LaplacianShot ----------------------------------------------------------------------------
def knn_affinity(queries: Tensor, k: int) -> Tensor:
    """The authors' affinity ``[T, Q, Q]``: ``W[i, j] = 1`` when ``j`` is among the ``k``
    nearest queries of ``i`` in Euclidean distance, ``i`` itself counted among them and then
    dropped (so ``k - 1`` neighbours, as scikit-learn's ``kneighbors_graph`` on the training
    points gives), not symmetrised."""
    k = min(k, queries.shape[1])
    distances = torch.cdist(queries, queries)
    eye = torch.eye(queries.shape[1], dtype=torch.bool, device=queries.device)
    distances = distances.masked_fill(eye, float("-inf"))  # itself first, as sklearn's
    index = distances.topk(k, dim=-1, largest=False).indices
    affinity = torch.zeros_like(distances).scatter_(-1, index, 1.0)
    return affinity.masked_fill(eye, 0.0)


def laplacian_energy(assign: Tensor, unary: Tensor, affinity: Tensor, lam: float) -> Tensor:
    """The bound's energy per episode: ``sum Y log Y + sum a Y - lam * sum (W Y) . Y``."""
    return (
        (assign * torch.log(assign.clamp_min(1e-20))).sum((1, 2))
        + (unary * assign).sum((1, 2))
        - lam * ((affinity @ assign) * assign).sum((1, 2))
    )


def laplacian_shot(
    prototypes: Tensor,
    queries: Tensor,
    *,
    lam: float = 1.0,
    knn: int = 3,
    max_iter: int = 20,
) -> Tensor:
    """LaplacianShot's bound optimisation (Algorithm 1, Eq. 12): unary costs
    ``a_qc = ||x_q - m_c||^2`` to the prototypes ``[T, N, D]``; starting from
    ``Y = softmax(-a)``, each round sets ``Y = softmax(-a + lam * W Y)`` with the kNN
    affinity ``W`` of the queries, until the energy changes by at most 1e-6 of itself (after
    the third round, as the authors' ``bound_update``) or after ``max_iter`` rounds. All
    episodes run the same rounds; an episode that has converged keeps its assignments.
    Returns ``log Y``."""
    unary = squared_distances(queries, prototypes)
    affinity = knn_affinity(queries, knn)
    assign = (-unary).softmax(-1)
    done = torch.zeros(len(queries), dtype=torch.bool, device=queries.device)
    previous = torch.full((len(queries),), float("inf"), dtype=queries.dtype, device=queries.device)
    for round_ in range(max_iter):
        updated = (-unary + lam * affinity @ assign).softmax(-1)
        assign = torch.where(done[:, None, None], assign, updated)
        energy = laplacian_energy(assign, unary, affinity, lam)
        if round_ > 1:
            done = done | ((energy - previous).abs() <= 1e-6 * previous.abs())
        previous = energy
        if bool(done.all()):
            break
    return torch.log(assign.clamp_min(1e-30))
