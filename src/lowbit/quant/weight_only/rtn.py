"""Group helpers shared by the methods, and round-to-nearest (RTN) with min-max ranges.

Every method returns ``(codes, scales, zeros)``: codes uint8 [N, K] in 0..2**bits-1 and float16
scales/zeros [N, ceil(K / group_size)], with ``w ~ (code - zero) * scale``. Codes are always
computed from the float16-rounded scale and zero, so the stored values are the ones that were
optimised."""
from __future__ import annotations

import torch

_MIN_SCALE = 2.0**-16  # float16 keeps ~3 digits down to 6e-5; smaller ranges are rounded up to this step


def grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (float32 [N, G, group_size] zero-padded, mask bool [G, group_size] of real weights)."""
    n, k = w.shape
    g = -(-k // group_size)
    padded = torch.zeros(n, g * group_size, dtype=torch.float32, device=w.device)
    padded[:, :k] = w
    mask = torch.zeros(g * group_size, dtype=torch.bool, device=w.device)
    mask[:k] = True
    return padded.view(n, g, group_size), mask.view(g, group_size)


def ungrouped(t: torch.Tensor, k: int) -> torch.Tensor:
    """[N, G, group_size] -> [N, K] (drops the ragged tail's padding)."""
    return t.reshape(t.shape[0], -1)[:, :k]


def half(t: torch.Tensor) -> torch.Tensor:
    """Round to float16 and back: the values the packed layer will use."""
    return t.to(torch.float16).to(torch.float32)


def codes_for(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes of grouped weights [N, G, S] for per-group scale/zero [N, G] (float32)."""
    return torch.clamp(torch.round(wg / scale[..., None] + zero[..., None]), 0, (1 << bits) - 1)


def minmax_params(wg: torch.Tensor, mask: torch.Tensor, bits: int, include_zero: bool = True,
                  round_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) float32 [N, G] (already float16-rounded) mapping each group's range
    onto 0..2**bits-1. ``include_zero`` widens the range to contain 0 (so zero stays inside
    0..qmax); ``round_zero`` makes the zero an integer code (classic asymmetric RTN)."""
    qmax = (1 << bits) - 1
    big = torch.finfo(torch.float32).max
    lo = torch.where(mask, wg, torch.full_like(wg, big)).amin(-1)
    hi = torch.where(mask, wg, torch.full_like(wg, -big)).amax(-1)
    if include_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = half(((hi - lo) / qmax).clamp(min=_MIN_SCALE))
    zero = -lo / scale
    if round_zero:
        zero = torch.round(zero).clamp(0, qmax)
    return scale, half(zero)


def rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with each group's min-max range (including 0) and an integer zero."""
    wg, mask = grouped(w, group_size)
    scale, zero = minmax_params(wg, mask, bits)
    codes = codes_for(wg, scale, zero, bits)
    return ungrouped(codes, w.shape[1]).to(torch.uint8), scale.half(), zero.half()
