"""Mesa's head-wise 8-bit codec: one (min, max) range per attention head."""
from __future__ import annotations

import torch

from lowbit.codecs.base import Packed, check_packed
from lowbit.codecs.uniform import FLOAT_DTYPES


class HeadwiseCodec:
    """t: [B, H, ...] with given per-head ranges ``lo``/``hi`` (float [H]) -> uint8 codes,
    ``q = clamp(round((t - lo_h) / s_h), 0, 255)``, ``s_h = (hi_h - lo_h) / 255``; values outside
    the range are clipped to it (Mesa tracks the ranges with running estimates, so they lag a
    little behind the data). Error inside the range is at most ``s_h / 2``."""

    name = "headwise"

    def encode(self, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> Packed:
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"HeadwiseCodec takes floating tensors, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() < 2 or lo.shape != (t.shape[1],) or hi.shape != (t.shape[1],):
            raise ValueError(f"ranges of shape [{t.shape[1] if t.dim() > 1 else '?'}] expected for a tensor {tuple(t.shape)}")
        shape = (1, -1) + (1,) * (t.dim() - 2)
        lo32, hi32 = lo.float().to(t.device), hi.float().to(t.device)
        scale = ((hi32 - lo32) / 255).clamp_min(torch.finfo(torch.float32).tiny)
        q = ((t.detach().float() - lo32.view(shape)) / scale.view(shape)).round_().clamp_(0, 255).to(torch.uint8)
        return Packed(self.name, t.shape, t.dtype, t.device, {"codes": q, "lo": lo32, "scale": scale}, {"mode": "quant"})

    def decode(self, p: Packed) -> torch.Tensor:
        check_packed(p, self.name)
        pl = p.payload
        shape = (1, -1) + (1,) * (len(p.shape) - 2)
        return (pl["codes"].float() * pl["scale"].view(shape) + pl["lo"].view(shape)).to(p.dtype)
