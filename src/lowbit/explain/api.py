"""``shapley(model, x, baseline, config)``: one entry point for every estimator.

``config`` is an estimator config (:mod:`lowbit.explain.config`: ``ExactConfig``,
``PermutationConfig``, ``AntitheticConfig``, ``KernelConfig``, ``ShearConfig`` or a registered one)
or its string shortcut (``"shear"`` with ``budget=``, ``seed=``, ...)."""
from __future__ import annotations

import time
import warnings
from typing import Mapping, Sequence

import torch

from lowbit.explain.blackbox import as_model
from lowbit.explain.config import DEFAULT_BUDGET, SHORTCUTS, ShapleyConfig, config_for, estimator_for
from lowbit.explain.inputs import as_rows, players as player_groups
from lowbit.explain.result import ShapleyResult
from lowbit.explain.shear import NotDifferentiable
from lowbit.explain.value import Model, ValueFunction

METHODS = tuple(SHORTCUTS)  # the built-in string shortcuts


def shapley(
    model: Model,
    x,
    baseline,
    method: ShapleyConfig | str = "exact",
    budget: int | None = None,
    seed: int | None = None,
    target: int | Sequence[int] | torch.Tensor | None = None,
    groups: Sequence[Sequence[int | str]] | Mapping[str, Sequence[int | str]] | None = None,
    batch_size: int = 8192,
    max_exact_players: int | None = None,
    interactions: str | None = None,
    shear_outside: str | None = None,
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
    method: an estimator config, ``ExactConfig(max_players=16)``, ``PermutationConfig(budget,
    seed)``, ``AntitheticConfig(...)``, ``KernelConfig(...)`` (KernelSHAP, paired sampling,
    efficiency constrained), ``ShearConfig(budget, seed, interactions, outside)``, or its string
    shortcut "exact", "permutation", "antithetic", "kernel", "shear"; the shortcut takes the
    config's options as ``budget``, ``seed``, ``max_exact_players``, ``interactions`` and
    ``shear_outside`` (options a method does not have are ignored; with a config, set them in
    the config). budget: coalition evaluations per player per instance (default 16).
    groups: players made of several columns (one-hot blocks): lists of column
    indices or names, or {player name: columns}; then the result has one value per group.
    interactions (SHEAR): "hessian" (autograd second derivatives; a clear error when the model has
    none; a saturated probability output is ranked on its logit, with a ``SaturationWarning``) or
    "finite-difference" (mixed differences of the value function, P(P+1)/2 + 1 extra evaluations
    counted in the budget). shear_outside: how SHEAR sets the players outside a feature's
    cooperator game, "shapley" (unbiased, default) or "uniform" (x or baseline with probability
    1/2 each, the paper's description).
    Returns a tensor [P] / [B, P] in x's dtype (float64 for DataFrames), or with
    ``return_details`` a :class:`ShapleyResult` (base value, names, ``.to_shap()``)."""
    shortcut = dict(budget=budget, seed=seed, max_exact_players=max_exact_players, interactions=interactions,
                    shear_outside=shear_outside)
    if isinstance(method, ShapleyConfig):
        given = sorted(k for k, v in shortcut.items() if v is not None)
        if given:
            raise TypeError(f"shapley(..., {type(method).__name__}(...)) takes its options from the config; "
                            f"set {given} there instead")
        config = method
    else:
        config = config_for(method, **shortcut)
    estimator = estimator_for(config)
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
    model = as_model(model, background[:1], columns)
    targets = _targets(target, xs.shape[0])
    gen = torch.Generator().manual_seed(getattr(config, "seed", 0))
    values, base, full, evals, secs = [], [], [], [], []
    prepared, modes, prep_secs = None, [], 0.0
    if estimator.prepare is not None:  # batch-wide work (SHEAR: one batched Hessian for all instances)
        t0 = time.perf_counter()
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                prepared, modes = estimator.prepare(model, xs, background, players, targets, config)
        finally:
            for w in caught:  # shown at the caller's line, whatever the depth of the estimator's code
                warnings.warn(w.message, w.category, stacklevel=2)
        prep_secs = (time.perf_counter() - t0) / xs.shape[0]  # its share of each instance's time
    for b in range(xs.shape[0]):
        t0 = time.perf_counter() - prep_secs
        v = ValueFunction(model, xs[b], background, players, targets[b], batch_size)
        phi = estimator.run(v, config, gen, b, prepared)
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
