"""A differentiable multi-class SVM on each episode's support set: MetaOptNet's head.

Lee, Maji, Ravichandran & Soatto, "Meta-Learning with Differentiable Convex Optimization",
CVPR 2019 (arXiv:1904.03758), Eq. 3-4; the authors' ``MetaOptNetHead_SVM_CS``
(github.com/kjunelee/MetaOptNet, ``models/classification_heads.py``) solves the dual of
Crammer & Singer's multi-class SVM over the support features ``x_i`` with labels ``y_i``:

    minimise over alpha [n, N]   1/2 sum_m ||sum_i alpha_i^m x_i||^2 - sum_i alpha_i^{y_i}
    subject to                   alpha_i^m <= C * [m == y_i],   sum_m alpha_i^m = 0  (each i)

and scores a query ``q`` for class ``m`` by ``w_m . q`` with ``w_m = sum_i alpha_i^m x_i``.

The authors solve it with qpth's interior-point method and differentiate through its KKT
conditions. qpth is unmaintained, so here the dual is solved by accelerated projected gradient
(FISTA), batched over episodes, and differentiated by back-propagating through its iterations
(:func:`solve_crammer_singer_dual`); the constraint set is a product over examples of
``{v : v <= u, sum v = 0}``, onto which :func:`project_rows` projects exactly (a sort and a
cumulative sum, differentiable almost everywhere). The solution is checked against a reference
solver (scipy's SLSQP) in ``tests/test_metaoptnet.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional


def project_rows(z: Tensor, upper: Tensor) -> Tensor:
    """The Euclidean projection of each row of ``z`` ``[..., N]`` onto
    ``{v : v <= upper, sum(v) = 0}``: ``v = min(z - tau, upper)`` with the one ``tau`` that
    makes the row sum to zero. With the ``j`` largest breakpoints ``b = z - upper`` clipped
    at ``upper`` and the rest free, ``tau = (sum of free z + sum of clipped upper) / free``;
    the right ``j`` is the one whose ``tau`` separates clipped from free breakpoints."""
    n = z.shape[-1]
    breakpoints = z - upper
    order = breakpoints.argsort(dim=-1, descending=True)
    b_sorted = breakpoints.gather(-1, order)
    z_sorted, u_sorted = z.gather(-1, order), upper.gather(-1, order)
    # j clipped (the j largest breakpoints), j = 0 .. n-1.
    clipped_u = torch.cumsum(u_sorted, -1) - u_sorted  # sum of upper over the first j
    free_z = z_sorted.sum(-1, keepdim=True) - (torch.cumsum(z_sorted, -1) - z_sorted)
    free = torch.arange(n, 0, -1, device=z.device, dtype=z.dtype)  # n - j
    tau = (free_z + clipped_u) / free
    # Valid j: every free breakpoint <= tau (b_sorted[j] <= tau_j), every clipped one >= tau.
    previous = torch.cat([torch.full_like(b_sorted[..., :1], float("inf")), b_sorted[..., :-1]], -1)
    valid = (b_sorted <= tau) & (previous >= tau)
    # The first valid j (there is one: the sum is monotone in tau); argmax finds the first True.
    chosen = valid.to(torch.int8).argmax(-1, keepdim=True)
    return torch.minimum(z - tau.gather(-1, chosen), upper)


def dual_objective(alpha: Tensor, kernel: Tensor, one_hot: Tensor) -> Tensor:
    """``1/2 tr(alpha^T K alpha) - sum_i alpha_i^{y_i}`` per episode, ``[T]``."""
    return 0.5 * (alpha * (kernel @ alpha)).sum((1, 2)) - (alpha * one_hot).sum((1, 2))


def solve_crammer_singer_dual(
    kernel: Tensor, labels: Tensor, ways: int, C: float, iterations: int = 100
) -> Tensor:
    """The dual solution ``alpha`` ``[T, n, ways]`` by FISTA with step ``1 / L``, ``L`` the
    largest eigenvalue of the support kernel ``K`` ``[T, n, n]`` (the gradient ``K alpha - Y``
    is ``L``-Lipschitz), from ``alpha = 0`` (feasible), every iterate projected with
    :func:`project_rows`. Differentiable in ``kernel`` through its iterations."""
    one_hot = functional.one_hot(labels, ways).to(kernel.dtype)
    upper = C * one_hot
    lipschitz = torch.linalg.eigvalsh(kernel.detach()).amax(-1).clamp_min(1e-6)[:, None, None]
    alpha = torch.zeros_like(one_hot)
    momentum_point, t = alpha, 1.0
    for _ in range(iterations):
        gradient = kernel @ momentum_point - one_hot
        following = project_rows(momentum_point - gradient / lipschitz, upper)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum_point = following + ((t - 1) / t_next) * (following - alpha)
        alpha, t = following, t_next
    return alpha


def svm_logits(
    support: Tensor,
    labels: Tensor,
    queries: Tensor,
    ways: int,
    *,
    C: float = 0.1,
    iterations: int = 100,
) -> Tensor:
    """MetaOptNet-SVM's query scores ``[T, Q, ways]``: ``sum_i alpha_i^m <x_i, q>`` with the
    linear kernel, as ``MetaOptNetHead_SVM_CS`` computes them."""
    kernel = support @ support.transpose(1, 2)
    alpha = solve_crammer_singer_dual(kernel, labels, ways, C, iterations)
    return (queries @ support.transpose(1, 2)) @ alpha
