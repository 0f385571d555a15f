"""How good an explanation is: error against exact values, ranking agreement, faithfulness."""
from __future__ import annotations

import torch

from lowbit.explain.value import ValueFunction, check_groups


def _batch(t: torch.Tensor) -> torch.Tensor:
    return t[None] if t.dim() == 1 else t


def absolute_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """sum_i |phi_hat_i - phi_i| per instance, averaged over instances (SHEAR's error measure)."""
    return float((_batch(estimate).double() - _batch(exact).double()).abs().sum(1).mean())


def ranking_accuracy(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of rank positions (features sorted by |phi|, largest first) where the estimate puts
    the same feature as the exact values, averaged over instances; 1.0 = identical ranking."""
    e = torch.argsort(_batch(estimate).abs(), dim=1, descending=True, stable=True)
    x = torch.argsort(_batch(exact).abs(), dim=1, descending=True, stable=True)
    return float((e == x).double().mean())


@torch.no_grad()
def faithfulness(model, x: torch.Tensor, baseline: torch.Tensor, values: torch.Tensor, target=None,
                 groups=None) -> float:
    """Pearson correlation between each player's value and the drop of v when that player alone
    is removed (set to the baseline), averaged over instances (Alvarez-Melis & Jaakkola)."""
    xs, vals = _batch(x), _batch(values)
    background = baseline[None] if baseline.dim() == 1 else baseline
    players = check_groups(groups, xs.shape[1])
    p = len(players)
    corrs = []
    for b in range(xs.shape[0]):
        v = ValueFunction(model, xs[b], background, players, target)
        masks = torch.ones(p + 1, p, dtype=torch.bool)
        masks[torch.arange(1, p + 1), torch.arange(p)] = False
        out = v(masks)
        drop = out[0] - out[1:]
        a, d = vals[b].double() - vals[b].double().mean(), drop - drop.mean()
        denom = a.norm() * d.norm()
        corrs.append(float((a * d).sum() / denom) if denom > 0 else 0.0)
    return sum(corrs) / len(corrs)
