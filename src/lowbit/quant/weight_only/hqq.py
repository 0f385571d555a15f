"""Half-quadratic quantization (HQQ, Badri & Shaji 2023): calibration-free, optimises each group's
zero point for a sparsity-promoting l_p error (p < 1) that tolerates a few outliers.

The problem  min_z ||W - (Q(W; s, z) - z) s||_p  is split with an auxiliary error variable E:
alternately (1) E = shrink_p(W - W_r, beta), the l_p proximal step (generalised soft threshold),
(2) z = mean over the group of (Q - (W - E) / s), the closed-form least-squares zero given E,
while beta grows by kappa each round. The scale stays at its min-max value. Each group keeps the
zero with the lowest squared reconstruction error seen, so the result is never worse than the
min-max start in that measure."""
from __future__ import annotations

import torch

from lowbit.quant.weight_only.rtn import codes_for, grouped, half, minmax_params, ungrouped


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of |x|^p / beta (approximate, as in the HQQ paper):
    sign(x) * max(|x| - |x|^(p-1) / beta, 0)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp(min=1e-12).pow(p - 1) / beta)


def hqq(w: torch.Tensor, bits: int, group_size: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HQQ codes, float16 scales and zeros for w [N, K] (see the module doc). iters: alternations;
    p: the l_p exponent; beta, kappa: the penalty's start and growth per iteration."""
    if not 0 < p <= 1:
        raise ValueError(f"p must lie in (0, 1], got {p}")
    wg, mask = grouped(w, group_size)
    m = mask.to(wg.dtype)
    count = m.sum(-1)  # [G] real weights per group
    scale, zero = minmax_params(wg, mask, bits, include_zero=False, round_zero=False)
    s = scale[..., None]

    def error(z: torch.Tensor) -> torch.Tensor:
        wr = (codes_for(wg, scale, z, bits) - z[..., None]) * s
        return (((wg - wr) * m) ** 2).sum(-1)

    best_z, best_err = zero, error(zero)
    z = zero
    for _ in range(iters):
        q = codes_for(wg, scale, z, bits)
        wr = (q - z[..., None]) * s
        e = shrink_lp(wg - wr, beta, p)
        z = ((q - (wg - e) / s) * m).sum(-1) / count
        zh = half(z)
        err = error(zh)
        better = err < best_err
        best_z, best_err = torch.where(better, zh, best_z), torch.where(better, err, best_err)
        beta *= kappa
    codes = codes_for(wg, scale, best_z, bits)
    return ungrouped(codes, w.shape[1]).to(torch.uint8), scale.half(), best_z.half()
