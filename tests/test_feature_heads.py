"""The classifiers on frozen features (fewbench.methods.feature_heads, .transductive) on inputs
small enough to check by hand, and against direct, unbatched computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional

from fewbench.methods.feature_heads import (
    class_means,
    logistic_regression,
    nearest_centroid,
    nearest_neighbours,
    squared_distances,
    transform_features,
)
from fewbench.methods.transductive import (
    bd_cspn,
    centre_each_set,
    knn_affinity,
    laplacian_energy,
    laplacian_shot,
    power_transform,
    pt_map,
    rectify_prototypes,
    shift_queries,
    sinkhorn,
    tim_gd,
    tim_logits,
)


def t(rows) -> torch.Tensor:
    """One episode's rows as ``[1, n, d]`` float64."""
    return torch.tensor(rows, dtype=torch.float64)[None]


def random_episodes(tasks=3, ways=3, shots=2, queries=4, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(tasks, ways * shots, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query = torch.randn(tasks, ways * queries, dim, generator=g, dtype=torch.float64)
    return support, labels, query


# -- SimpleShot's transforms and rule -----------------------------------------------------------
def test_the_transforms_are_simpleshots_un_l2n_and_cl2n():
    x = t([[3.0, 4.0], [0.0, 2.0]])
    assert torch.equal(transform_features(x, "UN", None), x)
    torch.testing.assert_close(transform_features(x, "L2N", None), t([[0.6, 0.8], [0.0, 1.0]]))
    mean = torch.tensor([3.0, 0.0], dtype=torch.float64)
    # x - mean: [0, 4] and [-3, 2]; then each divided by its norm.
    torch.testing.assert_close(
        transform_features(x, "CL2N", mean), t([[0.0, 1.0], [-3 / 13**0.5, 2 / 13**0.5]])
    )
    with pytest.raises(ValueError, match="base-class mean"):
        transform_features(x, "CL2N", None)
    with pytest.raises(ValueError, match="unknown transform"):
        transform_features(x, "ZCA", None)


def test_nearest_centroid_scores_are_minus_squared_distances_to_class_means():
    support = t([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    labels = torch.tensor([[0, 0, 1, 1]])
    query = t([[1.0, 1.0], [10.0, 9.0]])
    # Means (1, 0) and (10, 11): query 0 is 1 from the first and 81 + 100 from the second.
    expected = t([[-1.0, -181.0], [-(81.0 + 81.0), -4.0]])
    torch.testing.assert_close(nearest_centroid(support, labels, query, 2), expected)


def test_class_means_and_squared_distances_match_a_loop():
    support, labels, query = random_episodes()
    means = class_means(support, labels, 3)
    distances = squared_distances(query, means)
    for e in range(3):
        for c in range(3):
            mean = support[e][labels[e] == c].mean(0)
            torch.testing.assert_close(means[e, c], mean)
            for q in range(query.shape[1]):
                torch.testing.assert_close(distances[e, q, c], (query[e, q] - mean).pow(2).sum())


def test_nearest_neighbours_votes_and_breaks_ties_by_distance():
    # Class 0 at x = 0, 1, 5; class 1 at x = 2, 3, 9.
    support = t([[0.0], [1.0], [5.0], [2.0], [3.0], [9.0]])
    labels = torch.tensor([[0, 0, 0, 1, 1, 1]])
    query = t([[1.9], [4.2]])
    scores = nearest_neighbours(support, labels, query, 2, k=3)
    # 1.9: neighbours 2 (c1), 1 (c0), 3 (c1): two votes for class 1.
    # 4.2: neighbours 5 (c0), 3 (c1), 2 (c1): two votes for class 1.
    assert scores.argmax(-1).tolist() == [[1, 1]]
    assert torch.ceil(scores[0, 0]).tolist() == [1.0, 2.0]
    # k = 2 at 2.5: neighbours 2 (c1, 0.5 away) and 3 (c1) -> class 1; at 1.4: 1 (c0, 0.4) and
    # 2 (c1, 0.6), one vote each: the nearer voter's class wins.
    tie = nearest_neighbours(support, labels, t([[1.4]]), 2, k=2)
    assert torch.ceil(tie[0, 0]).tolist() == [1.0, 1.0]
    assert tie.argmax(-1).item() == 0
    # k = 1 is the nearest support example's class, whatever the others.
    one = nearest_neighbours(support, labels, t([[8.0], [0.4]]), 2, k=1)
    assert one.argmax(-1).tolist() == [[1, 0]]


def test_logistic_regression_matches_scikit_learn_and_is_at_its_minimum():
    linear_model = pytest.importorskip("sklearn.linear_model")
    support, labels, query = random_episodes(tasks=2, ways=3, shots=4, dim=6, seed=3)
    ours = logistic_regression(support, labels, query, 3, C=0.5, max_iter=500)
    for e in range(2):
        fitted = linear_model.LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(
            support[e].numpy(), labels[e].numpy()
        )
        theirs = fitted.predict_log_proba(query[e].numpy())
        np.testing.assert_allclose(ours[e].numpy(), theirs, atol=2e-4)


# -- TIM ----------------------------------------------------------------------------------------
def test_tim_logits_are_minus_half_temperature_squared_distances():
    x, w = t([[1.0, 0.0]]), t([[0.0, 0.0], [1.0, 2.0]])
    torch.testing.assert_close(tim_logits(x, w, 15.0), t([[-7.5, -30.0]]))


def direct_tim_loss(weights, support, labels, query, ways, temperature, loss_weights):
    """Eq. 3 for one episode, written out as the paper states it."""
    ce_w, h_w, c_w = loss_weights
    log_support = functional.log_softmax(-temperature / 2 * torch.cdist(support, weights) ** 2, 1)
    probabilities = torch.softmax(-temperature / 2 * torch.cdist(query, weights) ** 2, 1)
    ce = -log_support[torch.arange(len(labels)), labels].mean()
    marginal = probabilities.mean(0)
    h_y = -(marginal * marginal.log()).sum()
    h_y_x = -(probabilities * probabilities.log()).sum(1).mean()
    return ce_w * ce - (h_w * h_y - c_w * h_y_x)


def test_tim_gd_descends_eq3_from_the_support_means_episode_by_episode():
    support, labels, query = random_episodes(tasks=2, dim=4, seed=5)
    support, query = functional.normalize(support, dim=-1), functional.normalize(query, dim=-1)
    # No iteration: the support means' logits.
    start = tim_gd(support, labels, query, 3, iterations=0)
    expected = functional.log_softmax(tim_logits(query, class_means(support, labels, 3), 15.0), -1)
    torch.testing.assert_close(start, expected)
    # One Adam step moves each weight by lr against the sign of its gradient of Eq. 3 (Adam's
    # first step), the episodes independent of one another.
    lr = 1e-3
    one = tim_gd(support, labels, query, 3, iterations=1, lr=lr)
    for e in range(2):
        w = class_means(support[e : e + 1], labels[e : e + 1], 3)[0].requires_grad_(True)
        loss = direct_tim_loss(w, support[e], labels[e], query[e], 3, 15.0, (0.1, 1.0, 0.1))
        (grad,) = torch.autograd.grad(loss, w)
        stepped = (w - lr * grad.sign()).detach()
        direct = functional.log_softmax(-7.5 * torch.cdist(query[e], stepped) ** 2, -1)
        torch.testing.assert_close(one[e], direct, atol=1e-6, rtol=1e-6)


def test_tim_lowers_its_loss_and_uses_the_query_clusters():
    # One shot per class, the two support points nearly equidistant from the queries' clusters'
    # border: the marginal-entropy term spreads the queries over both classes.
    support = t([[1.0, 0.05], [1.0, -0.05]])
    labels = torch.tensor([[0, 1]])
    query = t([[1.0, 0.5]] * 3 + [[1.0, -0.4]] * 3)
    support, query = functional.normalize(support, dim=-1), functional.normalize(query, dim=-1)
    before = tim_gd(support, labels, query, 2, iterations=0).argmax(-1)
    after = tim_gd(support, labels, query, 2, iterations=300, lr=1e-2).argmax(-1)
    assert after.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert before.tolist() == after.tolist()  # already right here: the loss must not undo it
    w0 = class_means(support, labels, 2)[0].requires_grad_(True)
    loss0 = direct_tim_loss(w0, support[0], labels[0], query[0], 2, 15.0, (0.1, 1.0, 0.1))
    assert math.isfinite(loss0.item())


# -- PT-MAP -------------------------------------------------------------------------------------
def test_power_transform_and_centring():
    x = t([[4.0, 0.0], [1.0, 1.0]])
    powered = power_transform(x, 0.5, epsilon=0.0)
    torch.testing.assert_close(powered, t([[1.0, 0.0], [2**-0.5, 2**-0.5]]))
    with pytest.raises(ValueError, match="non-negative"):
        power_transform(t([[-1.0, 1.0]]))
    support, query = centre_each_set(t([[1.0, 0.0], [0.0, 1.0]]), t([[2.0, 0.0], [0.0, 0.0]]))
    # Support mean (0.5, 0.5): (0.5, -0.5) and (-0.5, 0.5), normalised.
    torch.testing.assert_close(support, t([[2**-0.5, -(2**-0.5)], [-(2**-0.5), 2**-0.5]]))
    torch.testing.assert_close(query, t([[1.0, 0.0], [-1.0, 0.0]]))


def test_sinkhorn_balances_rows_and_columns_as_a_direct_loop():
    costs = t([[0.0, 1.0], [0.2, 1.5], [0.1, 0.3], [2.0, 0.0]])
    plan = sinkhorn(costs, lam=2.0, column_mass=2.0, tolerance=1e-12)
    torch.testing.assert_close(plan.sum(2), torch.ones(1, 4, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(1), torch.full((1, 2), 2.0, dtype=torch.float64))
    # The same plan as alternating scalings of exp(-lam * costs), written as a loop.
    p = torch.exp(-2.0 * costs[0])
    for _ in range(2000):
        p = p / p.sum(1, keepdim=True)
        p = p * (2.0 / p.sum(0, keepdim=True))
    torch.testing.assert_close(plan[0], p)


def test_pt_map_assumes_balanced_classes():
    # Every query is nearer class 0's support point, but half of them clearly less so: the
    # equal-share plan gives those to class 1, where a nearest-centroid rule would not.
    support = t([[0.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([[0, 1]])
    query = t([[0.0, 0.1], [0.1, 0.0], [1.2, 0.0], [1.3, 0.1]])
    assert nearest_centroid(support, labels, query, 2).argmax(-1).tolist() == [[0, 0, 0, 0]]
    scores = pt_map(support, labels, query, 2, epochs=5)
    assert scores.argmax(-1).tolist() == [[0, 0, 1, 1]]
    # Rows sum to one within the stopping rule's slack (the last scaling is the columns').
    torch.testing.assert_close(
        scores.exp().sum(-1), torch.ones(1, 4, dtype=torch.float64), atol=1e-2, rtol=0
    )
    # No epoch: the plan of the distances to the support means.
    start = pt_map(support, labels, query, 2, epochs=0)
    torch.testing.assert_close(start.exp(), sinkhorn(squared_distances(query, support), 10.0, 2.0))


# -- BD-CSPN --------------------------------------------------------------------------------------
def test_shift_queries_moves_the_query_mean_onto_the_support_mean():
    support, _, query = random_episodes(seed=7)
    shifted = shift_queries(support, query)
    torch.testing.assert_close(shifted.mean(1), support.mean(1))
    torch.testing.assert_close(shifted - query, (shifted - query)[:, :1].expand_as(query))


def test_rectified_prototypes_weigh_the_support_and_the_top_z_pseudo_labelled_queries():
    support = t([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[0, 1]])
    # Queries 0-2 are nearest class 0 (cosine 1.0, 0.99.., 0.8..), query 3 class 1.
    query = t([[2.0, 0.0], [1.0, 0.1], [1.0, 0.7], [0.0, 3.0]])
    # epsilon 0: plain means of each class's members.
    flat = rectify_prototypes(support, labels, query, 2, top_z=2, epsilon=0.0)
    torch.testing.assert_close(flat[0, 0], (t([[1.0, 0.0], [2.0, 0.0], [1.0, 0.1]])[0]).mean(0))
    torch.testing.assert_close(flat[0, 1], (t([[0.0, 1.0], [0.0, 3.0]])[0]).mean(0))
    every = rectify_prototypes(support, labels, query, 2, top_z=None, epsilon=0.0)
    torch.testing.assert_close(
        every[0, 0], t([[1.0, 0.0], [2.0, 0.0], [1.0, 0.1], [1.0, 0.7]])[0].mean(0)
    )
    # epsilon 10: softmax weights of 10 x cosine to the basic prototype, over the members.
    members = t([[1.0, 0.0], [2.0, 0.0], [1.0, 0.1]])[0]
    cosine = functional.normalize(members, dim=-1) @ torch.tensor([1.0, 0.0], dtype=torch.float64)
    weights = torch.softmax(10 * cosine, 0)
    weighted = rectify_prototypes(support, labels, query, 2, top_z=2, epsilon=10.0)
    torch.testing.assert_close(weighted[0, 0], weights @ members)


def test_bd_cspn_scores_cosines_of_shifted_queries_to_rectified_prototypes():
    support, labels, query = random_episodes(seed=11)
    scores = bd_cspn(support, labels, query, 3, top_z=2, epsilon=10.0)
    shifted = shift_queries(support, query)
    prototypes = rectify_prototypes(support, labels, shifted, 3, top_z=2, epsilon=10.0)
    for e in range(3):
        for q in range(shifted.shape[1]):
            for c in range(3):
                cos = functional.cosine_similarity(shifted[e, q], prototypes[e, c], dim=0)
                torch.testing.assert_close(scores[e, q, c], 10 * cos)


# -- LaplacianShot --------------------------------------------------------------------------------
def test_knn_affinity_is_the_authors_directed_graph():
    points = t([[0.0], [1.0], [3.0], [10.0]])
    # k = 3 counts the point itself, so two neighbours each: 0 -> {1, 3}, 1 -> {0, 3},
    # 3 -> {1, 0}, 10 -> {3, 1}; not symmetric (10 -> 3, but not 3 -> 10).
    expected = t([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]])
    torch.testing.assert_close(knn_affinity(points, 3), expected)


def test_laplacian_shot_rounds_follow_the_bound_update():
    prototypes = t([[0.0, 0.0], [2.0, 0.0]])
    # Query 2 is a little nearer class 0, but its two nearest queries are class 1's.
    query = t([[1.3, 0.0], [1.5, 0.0], [0.95, 0.0], [-1.0, 0.0]])
    unary = squared_distances(query, prototypes)
    plain = laplacian_shot(prototypes, query, lam=0.0)
    torch.testing.assert_close(plain.exp(), (-unary).softmax(-1))
    assert plain.argmax(-1).tolist() == [[1, 1, 0, 0]]
    coupled = laplacian_shot(prototypes, query, lam=1.0, knn=3)
    assert coupled.argmax(-1).tolist() == [[1, 1, 1, 0]]
    # Two rounds by hand.
    w = knn_affinity(query, 3)
    y = (-unary).softmax(-1)
    for _ in range(2):
        y = (-unary + 1.0 * w @ y).softmax(-1)
    torch.testing.assert_close(laplacian_shot(prototypes, query, lam=1.0, max_iter=2).exp(), y)
    energy = laplacian_energy(y, unary, w, 1.0)
    assert energy.shape == (1,)
