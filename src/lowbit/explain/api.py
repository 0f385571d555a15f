"""``shapley(model, x, baseline, method=...)``: one entry point for every estimator."""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch

from lowbit.explain.blackbox import as_model
from lowbit.explain.estimators import exact_shapley, kernel_shapley, permutation_shapley
from lowbit.explain.inputs import as_rows, players as player_groups
from lowbit.explain.interactions import finite_difference_logit, shear_hessian_interactions
from lowbit.explain.result import ShapleyResult
from lowbit.explain.shear import OUTSIDE_LAWS, NotDifferentiable, finite_difference_interactions, shear_shapley
from lowbit.explain.value import Model, ValueFunction

METHODS = ("exact", "permutation", "antithetic", "kernel", "shear")
DEFAULT_BUDGET = 16


def shapley(
    model: Model,
    x,
    baseline,
    method: str = "exact",
    budget: int | None = None,
    seed: int = 0,
    target: int | Sequence[int] | torch.Tensor | None = None,
    groups: Sequence[Sequence[int | str]] | Mapping[str, Sequence[int | str]] | None = None,
    batch_size: int = 8192,
    max_exact_players: int = 16,
    interactions: str = "hessian",
    shear_outside: str = "shapley",
    return_details: bool = False,
    feature_names: Sequence[str] | None = None,
) -> torch.Tensor | ShapleyResult:
    """Shapley values of ``model``'s prediction at ``x`` against ``baseline``.

    model: maps float [N, M] to [N] (or [N, C] with ``target`` = a class, or one class per row of
    x): a torch module or function, or any black box taking a 2-D array (numpy; a DataFrame with
    x's columns when x is one) and returning an array, e.g. scikit-learn's ``clf.predict_proba``;
    it is called on chunks of ``batch_size`` rows. Black boxes work with every method except
    SHEAR's default ``interactions="hessian"`` (it needs autograd; an error says what to use).
    x: one instance [M] or a batch [B, M]; baseline: one reference row [M] or a background set
    [K, M]; v(S) = mean over its rows of f(x on S, baseline elsewhere). Both may be torch tensors,
    numpy arrays or pandas DataFrames (a Series for one row); DataFrame column names become
    ``feature_names``.
    method: "exact" (all 2^P coalitions; refused past ``max_exact_players``), "permutation",
    "antithetic", "kernel" (KernelSHAP, paired sampling, efficiency constrained), "shear".
    budget: coalition evaluations per player per instance (SHEAR's unit; default 16), ignored
    by "exact". groups: players made of several columns (one-hot blocks): lists of column
    indices or names, or {player name: columns}; then the result has one value per group.
    interactions (SHEAR): "hessian" (autograd second derivatives; a clear error when the model has
    none; a saturated probability output is ranked on its logit, with a ``SaturationWarning``) or
    "finite-difference" (mixed differences of the value function, P(P+1)/2 + 1 extra evaluations
    counted in the budget). shear_outside: how SHEAR sets the players outside a feature's
    cooperator game, "shapley" (unbiased, default) or "uniform" (x or baseline with probability
    1/2 each, the paper's description).
    Returns a tensor [P] / [B, P] in x's dtype (float64 for DataFrames), or with
    ``return_details`` a :class:`ShapleyResult` (base value, names, ``.to_shap()``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    if shear_outside not in OUTSIDE_LAWS:
        raise ValueError(f"unknown shear_outside {shear_outside!r}: choose one of {OUTSIDE_LAWS}")
    if interactions not in ("hessian", "finite-difference"):
        raise ValueError(f"unknown interactions {interactions!r}: choose 'hessian' or 'finite-difference'")
    x, columns = as_rows("x", x)
    baseline = as_rows("baseline", baseline, columns if hasattr(baseline, "columns") and columns else None)[0].to(x.dtype)
    single = x.dim() == 1
    xs = x[None] if single else x
    if xs.dim() != 2:
        raise ValueError(f"x must be [M] or [B, M], got shape {list(x.shape)}")
    background = baseline[None] if baseline.dim() == 1 else baseline
    if background.dim() != 2 or background.shape[1] != xs.shape[1]:
        raise ValueError(f"baseline must be [M] or [K, M] with M = {xs.shape[1]} features, got shape {list(baseline.shape)}")
    names = list(feature_names) if feature_names is not None else columns
    players, player_names = player_groups(groups, names, xs.shape[1])
    p = len(players)
    if method == "exact" and p > max_exact_players:
        raise ValueError(f"exact Shapley values need 2^{p} = {2**p:,} coalitions per instance; the limit is "
                         f"max_exact_players={max_exact_players} (raise it, or use method='shear' / 'kernel')")
    if budget is None:
        budget = DEFAULT_BUDGET
    if method != "exact" and (int(budget) != budget or budget < 2):
        raise ValueError(f"budget (evaluations per feature) must be an integer >= 2, got {budget}")
    model = as_model(model, background[:1], columns)
    targets = _targets(target, xs.shape[0])
    gen = torch.Generator().manual_seed(seed)
    values, base, full, evals, secs = [], [], [], [], []
    etas, modes, eta_secs = None, [], 0.0
    if method == "shear" and interactions == "hessian":  # one batched Hessian for all instances
        t0 = time.perf_counter()
        etas, modes = shear_hessian_interactions(model, xs, background, players, targets)
        eta_secs = (time.perf_counter() - t0) / xs.shape[0]  # its share of each instance's time
    elif method == "shear":
        modes = ["finite-difference"] * xs.shape[0]
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
            if etas is None:
                eta = finite_difference_interactions(v)
            elif etas[b] is None:  # a saturated row without a usable logit Hessian
                eta = finite_difference_logit(v, b)
            else:
                eta = etas[b]
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
                         torch.tensor(full[0] if single else full, dtype=x.dtype), evals, secs,
                         data=x.detach().clone(), feature_names=player_names, column_names=names,
                         groups=players if groups is not None else None, interactions=modes,
                         saturated=[b for b, m in enumerate(modes) if m.endswith("-logit")])


def _targets(target, n: int) -> list:
    if target is None or isinstance(target, int):
        return [target] * n
    t = torch.as_tensor(target)
    if t.dim() == 0:
        return [int(t)] * n
    if t.numel() != n:
        raise ValueError(f"target has {t.numel()} entries for {n} instances")
    return [int(i) for i in t.reshape(-1)]


__all__ = ["shapley", "ShapleyResult", "METHODS", "NotDifferentiable", "DEFAULT_BUDGET"]
