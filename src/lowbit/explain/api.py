"""``shapley(model, x, baseline, method=...)``: one entry point for every estimator."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lowbit.explain.estimators import exact_shapley, kernel_shapley, permutation_shapley
from lowbit.explain.shear import (
    OUTSIDE_LAWS,
    NotDifferentiable,
    finite_difference_interactions,
    group_interactions,
    hessian_interactions_batch,
    shear_shapley,
)
from lowbit.explain.value import Model, ValueFunction, check_groups

METHODS = ("exact", "permutation", "antithetic", "kernel", "shear")
DEFAULT_BUDGET = 16
_HESSIAN_ELEMENTS = 1 << 22  # per batched Hessian call (16 MiB of float32)


@dataclass
class ShapleyResult:
    values: torch.Tensor  # [M] or [B, M] (players, when groups are given)
    base_value: torch.Tensor  # v(empty): mean model output on the baseline, [] or [B]
    full_value: torch.Tensor  # v(all) = f(x), [] or [B]
    evaluations: list[int] = field(default_factory=list)  # coalitions evaluated per instance
    seconds: list[float] = field(default_factory=list)  # wall time per instance


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {list(t.shape)})")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t


def shapley(
    model: Model,
    x: torch.Tensor,
    baseline: torch.Tensor,
    method: str = "exact",
    budget: int | None = None,
    seed: int = 0,
    target: int | Sequence[int] | torch.Tensor | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    batch_size: int = 8192,
    max_exact_players: int = 16,
    interactions: str = "hessian",
    shear_outside: str = "shapley",
    return_details: bool = False,
) -> torch.Tensor | ShapleyResult:
    """Shapley values of ``model``'s prediction at ``x`` against ``baseline``.

    model: maps float [N, M] to [N] (or [N, C] with ``target`` = a class, or one class per row of x).
    x: one instance [M] or a batch [B, M]. baseline: one reference row [M] or a background set
    [K, M]; v(S) = mean over its rows of f(x on S, baseline elsewhere).
    method: "exact" (all 2^P coalitions; refused past ``max_exact_players``), "permutation",
    "antithetic", "kernel" (KernelSHAP, paired sampling, efficiency constrained), "shear".
    budget: coalition evaluations per player per instance (SHEAR's unit; default 16), ignored
    by "exact". groups: lists of feature indices that act as one player (one-hot blocks); then
    the result has one value per group. interactions (SHEAR): "hessian" (autograd second
    derivatives; a clear error when the model has none) or "finite-difference" (mixed differences
    of the value function, P(P+1)/2 + 1 extra evaluations counted in the budget). shear_outside:
    how SHEAR sets the players outside a feature's cooperator game, "shapley" (unbiased, default)
    or "uniform" (x or baseline with probability 1/2 each, the paper's description).
    Returns [M] / [B, M] in x's dtype (or a ShapleyResult with ``return_details``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    if shear_outside not in OUTSIDE_LAWS:
        raise ValueError(f"unknown shear_outside {shear_outside!r}: choose one of {OUTSIDE_LAWS}")
    if interactions not in ("hessian", "finite-difference"):
        raise ValueError(f"unknown interactions {interactions!r}: choose 'hessian' or 'finite-difference'")
    x = _check_tensor("x", x)
    baseline = _check_tensor("baseline", baseline).to(x.dtype)
    single = x.dim() == 1
    xs = x[None] if single else x
    if xs.dim() != 2:
        raise ValueError(f"x must be [M] or [B, M], got shape {list(x.shape)}")
    background = baseline[None] if baseline.dim() == 1 else baseline
    if background.dim() != 2 or background.shape[1] != xs.shape[1]:
        raise ValueError(f"baseline must be [M] or [K, M] with M = {xs.shape[1]} features, got shape {list(baseline.shape)}")
    players = check_groups(groups, xs.shape[1])
    p = len(players)
    if method == "exact" and p > max_exact_players:
        raise ValueError(f"exact Shapley values need 2^{p} = {2**p:,} coalitions per instance; the limit is "
                         f"max_exact_players={max_exact_players} (raise it, or use method='shear' / 'kernel')")
    if budget is None:
        budget = DEFAULT_BUDGET
    if method != "exact" and (int(budget) != budget or budget < 2):
        raise ValueError(f"budget (evaluations per feature) must be an integer >= 2, got {budget}")
    targets = _targets(target, xs.shape[0])
    gen = torch.Generator().manual_seed(seed)
    values, base, full, evals, secs = [], [], [], [], []
    etas, eta_secs = None, 0.0
    if method == "shear" and interactions == "hessian":  # one batched Hessian for all instances
        t0 = time.perf_counter()
        rows = max(1, _HESSIAN_ELEMENTS // xs.shape[1] ** 2)  # chunks keep [rows, M, M] small
        etas = [group_interactions(e, players)
                for c in range(0, xs.shape[0], rows)
                for e in hessian_interactions_batch(model, xs[c : c + rows], background.mean(0), targets[c : c + rows])]
        eta_secs = (time.perf_counter() - t0) / xs.shape[0]  # its share of each instance's time
    for b in range(xs.shape[0]):
        t0 = time.perf_counter() - eta_secs
        v = ValueFunction(model, xs[b], background, players, targets[b], batch_size)
        total = int(budget) * p
        if method == "exact":
            phi = exact_shapley(v)
        elif method in ("permutation", "antithetic"):
            phi = permutation_shapley(v, total, gen, antithetic=method == "antithetic")
        elif method == "kernel":
            phi = kernel_shapley(v, total, gen)
        else:
            eta = etas[b] if etas is not None else finite_difference_interactions(v)
            phi = shear_shapley(v, eta, int(budget), gen, shear_outside)
        secs.append(time.perf_counter() - t0)
        evals.append(v.evaluations)
        values.append(phi)
        if return_details:  # outside the timed part
            v0, vn = ValueFunction(model, xs[b], background, players, targets[b], batch_size).empty_and_full()
            base.append(v0)
            full.append(vn)
    out = torch.stack(values).to(x.dtype)
    if not return_details:
        return out[0] if single else out
    return ShapleyResult(out[0] if single else out, torch.tensor(base[0] if single else base, dtype=x.dtype),
                         torch.tensor(full[0] if single else full, dtype=x.dtype), evals, secs)


def _targets(target, n: int) -> list:
    if target is None or isinstance(target, int):
        return [target] * n
    t = torch.as_tensor(target)
    if t.dim() == 0:
        return [int(t)] * n
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for {n} instances")
    return [int(i) for i in t.reshape(-1)]


__all__ = ["shapley", "ShapleyResult", "METHODS", "NotDifferentiable"]
