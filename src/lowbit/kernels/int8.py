"""Integer GEMM and 4-bit packing for integer inference layers.

``int_matmul(a, b)``: int8 [M, K] x int8 [N, K] -> int32 [M, N] (a @ b.T), through
``torch._int_mm`` (oneDNN / fbgemm on CPU, cuBLAS on CUDA) and, where that is missing or refuses
the shapes, a plain int32 matmul as the reference (both exact). ``pack_int4`` stores signed 4-bit
codes two per byte (low nibble first); ``unpack_int4`` restores them as int8.
"""
from __future__ import annotations

import torch

_INT_MM_OK: dict[str, bool] = {}


def int_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference: exact int32 a @ b.T for int8 a [M, K], b [N, K]."""
    return a.to(torch.int32) @ b.to(torch.int32).T


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 a [M, K] times int8 b [N, K] transposed -> int32 [M, N], exact."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_matmul expects int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int_matmul expects [M, K] and [N, K], got {list(a.shape)} and {list(b.shape)}")
    dev = a.device.type
    if _INT_MM_OK.get(dev, True) and hasattr(torch, "_int_mm"):
        try:
            return torch._int_mm(a.contiguous(), b.T)
        except RuntimeError:  # shapes this backend's kernel refuses (e.g. small M on CUDA)
            if dev not in _INT_MM_OK:
                _INT_MM_OK[dev] = False
    return int_matmul_reference(a, b)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes (int8 in -8..7) [R, K] -> uint8 [R, ceil(K / 2)], two per byte."""
    if codes.dim() != 2:
        raise ValueError(f"pack_int4 expects a matrix [R, K], got shape {list(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("pack_int4: codes must lie in -8..7")
    r, k = codes.shape
    u = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if k % 2:
        u = torch.cat([u, torch.zeros(r, 1, dtype=torch.uint8, device=u.device)], 1)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [R, ceil(K / 2)] -> int8 codes [R, K] (inverse of ``pack_int4``)."""
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    u = torch.stack([lo, hi], -1).reshape(packed.shape[0], -1)[:, :k]
    return torch.where(u >= 8, u - 16, u)


__all__ = ["int_matmul", "int_matmul_reference", "pack_int4", "unpack_int4"]
