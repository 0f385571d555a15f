"""SHEAR (Wang et al., ICML 2022): the Shapley value of each feature computed exactly in a small
game with its strongest cooperators, chosen from the model's second derivatives.

Cross-contribution eta_ij = |d2f/dxi dxj (x)| * |xi - ri| * |xj - rj| (one-hot groups: the max
over the block, diagonal 0). For a budget of s evaluations per feature, K = floor(log2 s) - 1
cooperators; the 2^K coalitions S of the cooperators each cost v(S + i) and v(S), so s in all.
Players outside {i} + C_i take x or r by a random mask R, the same for S and S + i, and the
complementary coalition gets the complementary mask (antithetic).

lowbit draws R from the law it has in the Shapley value itself: the outside players that precede
i in a uniform random order in which exactly S precedes i among {i} + C_i (each outside player is
then in R with probability (|S| + 1) / (K + 2), not 1/2). With that law the estimate is unbiased
for any model; the cooperators are enumerated exactly, so only the weak interactions with the
outside players are left to sampling. The reversed order gives the complement S and R."""
from __future__ import annotations

import math

import torch

from lowbit.explain.estimators import coalition_masks
from lowbit.explain.value import Model, ValueFunction, model_output


class NotDifferentiable(ValueError):
    """The model gives SHEAR no usable second derivatives."""


ALTERNATIVES = ("use method='kernel' or method='antithetic' (they need only the model's outputs), or keep "
                "method='shear' with interactions='finite-difference' (mixed differences of model outputs)")


def hessian_interactions(model: Model, x: torch.Tensor, reference: torch.Tensor, target=None) -> torch.Tensor:
    """|H(x)| * |x - r| outer |x - r| over features: float64 [M, M], zero diagonal."""
    return hessian_interactions_batch(model, x[None], reference, [target])[0]


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def hessian_interactions_batch(model: Model, xs: torch.Tensor, reference: torch.Tensor, targets: list) -> torch.Tensor:
    """:func:`hessian_interactions` of every row of ``xs`` [B, M] at once: float64 [B, M, M] (host).
    Raises :class:`NotDifferentiable` when a row's Hessian is not finite or all zero."""
    h = hessian_batch(model, xs, targets)
    if not torch.isfinite(h).all():
        raise NotDifferentiable(f"SHEAR: the model's Hessian at x is not finite; {ALTERNATIVES}")
    if xs.shape[1] > 1 and bool((h.flatten(1).abs().sum(1) == 0).any()):
        raise NotDifferentiable(ZERO_HESSIAN)
    return cross_contributions(h, xs, reference)


def cross_contributions(h: torch.Tensor, xs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """eta = |H| * |x - r| outer |x - r| with a zero diagonal: float64 [B, M, M] on the host."""
    d = (xs.detach() - reference).abs().double().to(h.device)
    eta = h.abs() * d[:, :, None] * d[:, None, :]
    eta.diagonal(dim1=1, dim2=2).zero_()
    return eta.cpu()  # cooperator selection and the coalition masks are small host work


def hessian_batch(model: Model, xs: torch.Tensor, targets: list, link: str = "identity") -> torch.Tensor:
    """Hessians of the explained output at every row of ``xs`` [B, M]: float64 [B, M, M].

    One forward of the whole batch, its input gradient with a graph, then one backward per
    feature j (row j of every instance's Hessian): M + 1 backward passes for the batch instead
    of a functorch Hessian per instance. The model must treat rows independently (eval mode).
    link: "identity" (the model's output) or "logit" (log(f / (1 - f)) of a probability output)."""
    if getattr(model, "differentiable", True) is False:
        raise NotDifferentiable(f"SHEAR's interactions='hessian' needs the model's second derivatives, and {model!r} is a "
                                f"black box (arrays in, arrays out: no autograd); {ALTERNATIVES}")
    tgt = targets[0] if all(t == targets[0] for t in targets) else torch.tensor(targets)
    b, m = xs.shape
    try:
        with torch.enable_grad():
            z = xs.detach().clone().requires_grad_(True)
            out = model_output(model, z, tgt)
            if not out.requires_grad:
                raise NotDifferentiable(
                    "SHEAR's interactions='hessian' needs the model's second derivatives, and its output carries no "
                    f"autograd graph (a numpy or black-box model, or one run under torch.no_grad); {ALTERNATIVES}")
            (g,) = torch.autograd.grad((_logit(out) if link == "logit" else out).sum(), z, create_graph=True)
            h = torch.zeros(b, m, m, dtype=xs.dtype, device=xs.device)
            if g.requires_grad:  # else the gradient is constant in x: a zero Hessian
                for j in range(m):
                    (row,) = torch.autograd.grad(g[:, j].sum(), z, retain_graph=j < m - 1, allow_unused=True)
                    if row is not None:
                        h[:, j] = row.detach()
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise NotDifferentiable(
            f"SHEAR needs second derivatives of the model and autograd could not take them ({e}); {ALTERNATIVES}") from None
    return h.double()


ZERO_HESSIAN = ("SHEAR: the model's second derivatives are zero at x (a piecewise-linear model such as a ReLU "
                "network?), so they cannot rank cooperators; use interactions='finite-difference' or a smooth "
                "activation (softplus, GELU)")


def finite_difference_interactions(v: ValueFunction, link: str = "identity") -> torch.Tensor:
    """|v(N) - v(N - i) - v(N - j) + v(N - i - j)| for every pair of players: the discrete mixed
    difference between x and the reference, which equals |H_ij| |dx_i| |dx_j| to second order.
    Costs 1 + P + P (P - 1) / 2 evaluations (counted in the budget). link "logit": the differences
    of logit(v), v clipped to [eps, 1 - eps] of float32 (a saturated coalition stands at the
    logit float32 can still tell from 1)."""
    p = v.players
    full = torch.ones(p, dtype=torch.bool)
    singles = full.repeat(p, 1)
    singles[torch.arange(p), torch.arange(p)] = False
    iu = torch.triu_indices(p, p, 1)
    pairs = full.repeat(iu.shape[1], 1)
    pairs[torch.arange(iu.shape[1]), iu[0]] = False
    pairs[torch.arange(iu.shape[1]), iu[1]] = False
    vals = v(torch.cat([full[None], singles, pairs]))
    if link == "logit":
        eps = torch.finfo(torch.float32).eps
        vals = _logit(vals.clamp(eps, 1 - eps))
    vn, vs, vp = vals[0], vals[1 : p + 1], vals[p + 1 :]
    eta = torch.zeros(p, p, dtype=torch.float64)
    eta[iu[0], iu[1]] = (vn - vs[iu[0]] - vs[iu[1]] + vp).abs()
    return eta + eta.T


def group_interactions(eta: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Feature-level [M, M] -> player-level [P, P] by the max over each pair of blocks, zero diagonal."""
    p = len(groups)
    if all(len(g) == 1 for g in groups):
        return eta[[g[0] for g in groups]][:, [g[0] for g in groups]]
    member = torch.zeros(p, eta.shape[0], dtype=torch.bool)
    for a, g in enumerate(groups):
        member[a, g] = True
    low = torch.tensor(-math.inf, dtype=eta.dtype)
    rows = torch.where(member[:, :, None], eta[None], low).amax(1)  # [P, M]: max over block a's rows
    out = torch.where(member[None], rows[:, None, :], low).amax(2)  # [P, P]: and over block b's columns
    return out.fill_diagonal_(0)


def cooperators_for_budget(budget: int, players: int) -> int:
    """K = floor(log2(budget)) - 1, within [0, players - 1]."""
    return max(0, min(players - 1, int(math.floor(math.log2(max(budget, 1)))) - 1))


OUTSIDE_LAWS = ("shapley", "uniform")


def shear_shapley(v: ValueFunction, eta: torch.Tensor, budget: int, generator: torch.Generator,
                  outside: str = "shapley") -> torch.Tensor:
    """phi_i = (1/n) sum_{S in C_i} C(n-1, |S|)^-1 [v(S + i + R_S) - v(S + R_S)], n = K + 1.
    ``outside``: the law of R_S, "shapley" (the outside players preceding i in a random order
    consistent with S: unbiased) or "uniform" (each outside player in R with probability 1/2,
    as in the paper's description; biased where i interacts with outside players)."""
    if outside not in OUTSIDE_LAWS:
        raise ValueError(f"unknown outside law {outside!r}: choose one of {OUTSIDE_LAWS}")
    p = v.players
    k = cooperators_for_budget(budget, p)
    n = k + 1
    sub = coalition_masks(k)  # [2^k, k]; row r and row 2^k - 1 - r are complements
    sizes = sub.sum(1)
    weight = torch.tensor([1.0 / (n * math.comb(n - 1, int(s))) for s in sizes], dtype=torch.float64)
    half = 2 ** (k - 1) if k else 1
    score = eta.clone()
    score.fill_diagonal_(-math.inf)
    coop = torch.topk(score, k, dim=1).indices if k else torch.zeros(p, 0, dtype=torch.long)  # [P, K]
    group = torch.cat([coop, torch.arange(p)[:, None]], dim=1)  # [P, K+1]: each player's game
    rest = torch.ones(p, p, dtype=torch.bool).scatter_(1, group, False)  # [P, P]: outside that game
    if outside == "uniform":
        r = torch.rand(p, half, p, generator=generator) < 0.5
    else:
        # one uniform random order per pair of complementary coalitions; the group's positions in it
        # are relabelled so that exactly S comes before i: i takes the (|S|+1)-th group position
        ranks = torch.argsort(torch.rand(p, half, p, generator=generator), dim=2)  # [P, half, P]
        group_pos = ranks.gather(2, group[:, None, :].expand(p, half, n)).sort(dim=2).values
        i_pos = group_pos.gather(2, sizes[:half].reshape(1, half, 1).expand(p, half, 1))
        r = ranks < i_pos  # outside players before i
    rmask = torch.cat([r, ~r.flip(1)], dim=1) if k else r  # coalition 2^k-1-j is the complement of j
    without = rmask & rest[:, None, :]  # [P, 2^K, P]
    without.scatter_(2, coop[:, None, :].expand(p, 2**k, k), sub[None].expand(p, 2**k, k))
    with_i = without.clone()
    with_i[torch.arange(p), :, torch.arange(p)] = True
    masks = torch.cat([without.reshape(-1, p), with_i.reshape(-1, p)])
    vals = v(masks)
    half_n = p * 2**k
    diff = (vals[half_n:] - vals[:half_n]).reshape(p, 2**k)
    return (diff * weight[None]).sum(1)
