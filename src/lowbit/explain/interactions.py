"""How SHEAR ranks each instance's cooperators: the model's Hessian at x, and what it does where
the Hessian carries no information because the output is a saturated probability.

A probability at 0 or 1 (softmax of well separated logits, a sigmoid of a large margin) has
second derivatives that underflow to exactly zero, although the model is smooth. Such rows are
told apart from piecewise-linear models (zero Hessian, output not saturated) and ranked on the
logit log(f / (1 - f)) instead: its Hessian, in float64 where the model runs in float64 (a torch
module is copied to float64), else mixed finite differences of the logit of the value function.
The Shapley values stay those of f; ``ShapleyResult.interactions`` records what each row used
and a :class:`SaturationWarning` says so."""
from __future__ import annotations

import copy
import warnings

import torch

from lowbit.explain.shear import (
    ZERO_HESSIAN,
    NotDifferentiable,
    cross_contributions,
    group_interactions,
    hessian_batch,
)
from lowbit.explain.value import Model, model_output

SATURATION = 1e-6  # an output in [0, 1] this close to 0 or 1 is a saturated probability
_HESSIAN_ELEMENTS = 1 << 22  # per batched Hessian call (16 MiB of float32)
MODES = ("hessian", "hessian-logit", "finite-difference-logit", "finite-difference")


class SaturationWarning(UserWarning):
    """SHEAR met a saturated probability and ranked cooperators on its logit."""


def _chunked_hessian(model: Model, xs: torch.Tensor, targets: list, link: str = "identity") -> torch.Tensor:
    rows = max(1, _HESSIAN_ELEMENTS // xs.shape[1] ** 2)  # chunks keep [rows, M, M] small
    return torch.cat([hessian_batch(model, xs[c : c + rows], targets[c : c + rows], link)
                      for c in range(0, xs.shape[0], rows)])


def _usable(h: torch.Tensor) -> torch.Tensor:
    """[B] bool: finite and, with more than one feature, not all zero."""
    ok = torch.isfinite(h).flatten(1).all(1)
    if h.shape[1] > 1:
        ok &= h.abs().flatten(1).sum(1) > 0
    return ok


def logit_hessian(model: Model, xs: torch.Tensor, targets: list) -> torch.Tensor:
    """Hessians of logit(f) at the rows of ``xs``, float64 [B, M, M]; computed in float64 when the
    model runs in float64 (torch modules are copied to float64), else in x's dtype."""
    if xs.dtype != torch.float64:
        try:
            wide = copy.deepcopy(model).double() if isinstance(model, torch.nn.Module) else model
            return _chunked_hessian(wide, xs.double(), targets, "logit")
        except NotDifferentiable:  # e.g. a function over float32 weights: stay in its dtype
            pass
    return _chunked_hessian(model, xs, targets, "logit")


def shear_hessian_interactions(model: Model, xs: torch.Tensor, background: torch.Tensor, players: list[list[int]],
                               targets: list) -> tuple[list[torch.Tensor | None], list[str]]:
    """Player-level cross-contributions [P, P] per row of ``xs`` [B, M] and how each was made.

    A row gets None with mode "finite-difference-logit" when neither the Hessian nor the logit's
    Hessian is usable: the caller takes finite differences of the logit of its value function
    (:func:`finite_difference_logit`). Raises :class:`NotDifferentiable` naming the cause for
    rows that are not saturated (a piecewise-linear model, a non-finite Hessian)."""
    reference = background.mean(0)
    h = _chunked_hessian(model, xs, targets)
    ok = _usable(h)
    etas: list[torch.Tensor | None] = list(cross_contributions(torch.nan_to_num(h), xs, reference))
    modes = ["hessian"] * xs.shape[0]
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        sel = torch.tensor(bad)
        tsel = [targets[b] for b in bad]
        tgt = tsel[0] if all(t == tsel[0] for t in tsel) else torch.tensor(tsel)
        with torch.no_grad():
            fx = model_output(model, xs[sel], tgt).double().cpu()
        saturated = (fx >= 0) & (fx <= 1) & (torch.minimum(fx, 1 - fx) <= SATURATION)
        for j, b in enumerate(bad):
            if not saturated[j]:
                if not torch.isfinite(h[b]).all():
                    raise NotDifferentiable(f"SHEAR: the model's Hessian at instance {b} is not finite (f(x) = "
                                            f"{float(fx[j]):.6g}); use interactions='finite-difference'")
                raise NotDifferentiable(f"{ZERO_HESSIAN} (instance {b}: f(x) = {float(fx[j]):.6g}, not a saturated probability)")
        hl = logit_hessian(model, xs[sel], tsel)
        good = _usable(hl)
        eta_l = cross_contributions(torch.nan_to_num(hl), xs[sel], reference)
        for j, b in enumerate(bad):
            etas[b], modes[b] = (eta_l[j], "hessian-logit") if good[j] else (None, "finite-difference-logit")
        shown = ", ".join(f"{b} (f(x) = {float(fx[j]):.6g})" for j, b in enumerate(bad[:5])) + (" ..." if len(bad) > 5 else "")
        how = {m for m in modes if m != "hessian"}
        warnings.warn(SaturationWarning(
            f"SHEAR: the model's output is a saturated probability at instance(s) {shown}: its second derivatives "
            f"underflow to zero there, so SHEAR ranked those instances' cooperators on the logit log(f / (1 - f)) "
            f"instead ({' / '.join(sorted(how))}); the Shapley values are still those of f "
            "(ShapleyResult.interactions and .saturated record it per instance)"), stacklevel=3)
    return [group_interactions(e, players) if e is not None else None for e in etas], modes


def finite_difference_logit(v, instance: int) -> torch.Tensor:
    """The fallback for a saturated row whose logit has no usable Hessian: mixed differences of
    logit(v) (``finite_difference_interactions(v, link="logit")``; costs 1 + P + P(P-1)/2
    evaluations). Raises :class:`NotDifferentiable` naming saturation when those are all zero
    too: the output stays saturated whichever two players are removed."""
    from lowbit.explain.shear import finite_difference_interactions

    eta = finite_difference_interactions(v, link="logit")
    if v.players > 1 and float(eta.abs().sum()) == 0:
        fx = float(v(torch.ones(1, v.players, dtype=torch.bool))[0])
        raise NotDifferentiable(
            f"SHEAR: the model's output is a saturated probability at instance {instance} (f(x) = {fx:.6g}): its second "
            "derivatives underflow to zero, its logit is infinite at this precision, and the output stays saturated "
            "whichever two players are removed, so nothing ranks the cooperators. Explain the model's logit (the "
            "output before the sigmoid / softmax) instead of the probability, or use method='kernel' or 'antithetic'")
    return eta


__all__ = ["SaturationWarning", "shear_hessian_interactions", "logit_hessian", "finite_difference_logit", "MODES",
           "SATURATION"]
