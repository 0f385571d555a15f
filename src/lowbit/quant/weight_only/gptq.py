"""GPTQ (Frantar et al. 2022): quantize a layer's columns one at a time and spread each column's
rounding error over the not yet quantized columns, weighted by the inverse Hessian of the layer's
reconstruction loss ||X W^T - X Q^T||^2 (H = 2 X^T X over calibration inputs).

Columns go left to right in blocks (the error of a block is pushed to the rest with one matrix
product); each group's scale and zero are chosen (min-max, integer zero) from the error-updated
weights when the quantizer reaches the group's first column."""
from __future__ import annotations

import torch

from lowbit.quant.weight_only.rtn import _MIN_SCALE, half


class HessianAccumulator:
    """Running H = 2/n sum x x^T over the rows x [*, K] of a layer's inputs (float64)."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)  # H lives on the CPU, in float64
        rows = x.shape[0]
        self.h *= self.n / (self.n + rows)
        self.n += rows
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.T @ x


def _group_params(cols: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 [N], float16-rounded, for weight columns [N, S] (range includes 0)."""
    qmax = (1 << bits) - 1
    lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
    scale = half(((hi - lo) / qmax).clamp(min=_MIN_SCALE))
    zero = half(torch.round(-lo / scale).clamp(0, qmax))
    return scale, zero


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
         block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes uint8 [N, K] and float16 scales/zeros [N, G] for w [N, K] given the Hessian
    h [K, K] of its inputs. damp: fraction of the mean diagonal added to H (numerical stability);
    block: columns whose errors are applied lazily together."""
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian has shape {tuple(h.shape)}, expected ({k}, {k})")
    qmax = (1 << bits) - 1
    w = w.detach().to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    dead = torch.diag(h) == 0  # inputs that were always 0: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)
    # upper Cholesky factor of H^-1: row i holds the update weights for the columns after i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g_count = -(-k // group_size)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, g_count, dtype=torch.float32)
    zeros = torch.zeros(n, g_count, dtype=torch.float32)
    scale = zero = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col % group_size == 0:
                g = col // group_size
                stop = min(col + group_size, k)
                # the group's columns as updated so far (those in later blocks lack this block's update)
                cols = torch.cat([wb[:, j:], w[:, b1:stop]], 1)[:, :stop - col]
                scale, zero = _group_params(cols.float(), bits)
                scales[:, g], zeros[:, g] = scale, zero
            s, z = scale.double(), zero.double()
            q = torch.clamp(torch.round(wb[:, j] / s + z), 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            e = (wb[:, j] - (q - z) * s) / hb[j, j]
            wb[:, j:] -= e[:, None] * hb[j, j:][None, :]
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return codes, scales.half(), zeros.half()
