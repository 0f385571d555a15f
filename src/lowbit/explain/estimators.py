"""Shapley estimators over a ValueFunction with P players. Each returns float64 [P].

Formulas (``../shared/METHODS.md``): exact enumeration; permutation sampling and its antithetic
version; KernelSHAP with paired sampling and the efficiency constraint; SHEAR lives in shear.py.
Budgets are coalition evaluations in total (the caller turns "per feature" into a total)."""
from __future__ import annotations

import functools
import math

import torch

from lowbit.explain.value import ValueFunction


def coalition_masks(p: int) -> torch.Tensor:
    """[2^p, p] bool: row r holds the bits of r (player j in the coalition iff bit j of r)."""
    ints = torch.arange(2**p, dtype=torch.int64)
    return ((ints[:, None] >> torch.arange(p)) & 1).bool()


@functools.lru_cache(maxsize=4)
def _masks_by_size(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(all masks [2^p, p], their sizes [2^p]), built once per p (read only: KernelSHAP's design
    selects rows from them for every instance)."""
    masks = coalition_masks(p)
    return masks, masks.sum(1)


def shapley_weights(p: int) -> torch.Tensor:
    """w[s] = s! (p - s - 1)! / p! for s = 0..p-1 (float64)."""
    s = torch.arange(p, dtype=torch.float64)
    return torch.exp(torch.lgamma(s + 1) + torch.lgamma(p - s) - math.lgamma(p + 1))


def exact_shapley(v: ValueFunction) -> torch.Tensor:
    """All 2^P coalitions evaluated once, shared by every player: phi_i = sum over S without i of
    w(|S|) (v(S + i) - v(S)), for all players at once on a [2^P, P] table of differences."""
    p = v.players
    masks, sizes = _masks_by_size(p)
    vals = v(masks)
    ints = torch.arange(2**p, dtype=torch.int64)
    with_i = ints[:, None] | (1 << torch.arange(p))[None, :]  # [2^P, P]: S + i
    diff = vals[with_i] - vals[:, None]  # v(S + i) - v(S); zero where i is already in S
    w = shapley_weights(p)[sizes.clamp(max=p - 1)]  # w(|S|); rows with |S| = P only hold zeros
    return (diff * w[:, None]).masked_fill(masks, 0.0).sum(0)


def permutation_shapley(v: ValueFunction, evaluations: int, generator: torch.Generator, antithetic: bool = False) -> torch.Tensor:
    """Average marginal contributions along random orders of the players.

    v(empty) and v(all) are evaluated once; each order then costs P - 1 evaluations, so
    ``evaluations`` buys (evaluations - 2) // (P - 1) orders (at least 1; 2 when antithetic, where
    each order is paired with its reverse). Every order satisfies efficiency exactly."""
    p = v.players
    v0, vn = v.empty_and_full()
    if p == 1:
        return torch.tensor([vn - v0], dtype=torch.float64)
    n = max(1, (evaluations - 2) // (p - 1))
    if antithetic:
        n = max(2, n - n % 2)
        half = torch.stack([torch.randperm(p, generator=generator) for _ in range(n // 2)])
        perms = torch.cat([half, half.flip(1)])
    else:
        perms = torch.stack([torch.randperm(p, generator=generator) for _ in range(n)])
    ranks = torch.argsort(perms, dim=1)  # ranks[r, j] = position of player j in order r
    ks = torch.arange(1, p)
    masks = ranks[:, None, :] < ks[None, :, None]  # [n, p-1, p]: first k players of each order
    vals = v(masks.reshape(-1, p)).reshape(n, p - 1)
    chain = torch.cat([torch.full((n, 1), v0, dtype=torch.float64), vals, torch.full((n, 1), vn, dtype=torch.float64)], 1)
    contrib = chain[:, 1:] - chain[:, :-1]  # contribution of perms[:, k]
    phi = torch.zeros(p, dtype=torch.float64)
    phi.scatter_add_(0, perms.reshape(-1), contrib.reshape(-1))
    return phi / n


def _kernel_design(p: int, budget: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Coalitions (bool [n, p]) and their kernel weights, as KernelSHAP samples them: sizes in
    complementary pairs (s, p - s); a pair of sizes is enumerated completely while the budget left
    covers its expected share, the rest is sampled in complementary pairs with sizes drawn in
    proportion to the Shapley kernel mass (p - 1) / (s (p - s))."""
    sizes = list(range(1, p // 2 + 1))
    mass = {s: (p - 1) / (s * (p - s)) * (1 if 2 * s == p else 2) for s in sizes}
    count = {s: math.comb(p, s) * (1 if 2 * s == p else 2) for s in sizes}
    rows: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    left, left_mass = budget, sum(mass.values())
    open_sizes = list(sizes)
    all_masks, all_sizes = _masks_by_size(p) if p <= 16 else (None, None)  # enumeration: affordable for small p only
    for s in sizes:
        if all_masks is None or left_mass <= 0 or left * mass[s] / left_mass < count[s]:
            break
        full = all_masks[(all_sizes == s) | (all_sizes == p - s)]
        rows.append(full)
        weights.append(torch.full((full.shape[0],), (p - 1) / (math.comb(p, s) * s * (p - s)), dtype=torch.float64))
        left -= count[s]
        left_mass -= mass[s]
        open_sizes.remove(s)
    pairs = left // 2
    if open_sizes and pairs > 0:
        probs = torch.tensor([mass[s] for s in open_sizes], dtype=torch.float64)
        draw = torch.multinomial(probs / probs.sum(), pairs, replacement=True, generator=generator)
        size = torch.tensor(open_sizes)[draw]  # [pairs]
        ranks = torch.argsort(torch.rand(pairs, p, generator=generator), dim=1)  # a uniform subset of each size
        m = ranks < size[:, None]
        sampled = torch.cat([m, ~m])  # complementary pairs
        rows.append(sampled)
        weights.append(torch.full((sampled.shape[0],), left_mass / sampled.shape[0], dtype=torch.float64))
    if not rows:
        return torch.zeros(0, p, dtype=torch.bool), torch.zeros(0, dtype=torch.float64)
    return torch.cat(rows), torch.cat(weights)


def kernel_shapley(v: ValueFunction, evaluations: int, generator: torch.Generator) -> torch.Tensor:
    """KernelSHAP: weighted least squares of v(S) - v(empty) on the coalition indicators, with
    efficiency (sum phi = v(all) - v(empty)) imposed exactly by eliminating the last player."""
    p = v.players
    v0, vn = v.empty_and_full()
    delta = vn - v0
    if p == 1:
        return torch.tensor([delta], dtype=torch.float64)
    z, w = _kernel_design(p, max(evaluations - 2, 2), generator)
    if z.shape[0] == 0:
        return torch.full((p,), delta / p, dtype=torch.float64)
    y = v(z) - v0
    zf = z.double()
    a = zf[:, :-1] - zf[:, -1:]
    b = y - zf[:, -1] * delta
    sw = w.sqrt()[:, None]
    sol = torch.linalg.lstsq(a * sw, (b * sw[:, 0])[:, None], driver="gelsd").solution[:, 0]
    return torch.cat([sol, (delta - sol.sum()).reshape(1)])
