"""Lossless codecs for what must stay exact: raw tensors, bool masks, integer index tensors."""
from __future__ import annotations

import torch

from lowbit.codecs.base import Packed, check_packed
from lowbit.kernels import index as index_kernels
from lowbit.kernels import pack_bits, unpack_bits

# Widths the dense bit packer supports; larger ranges fall back to a narrower integer dtype.
_PACK_BITS = (1, 2, 4, 8)
_INT_DTYPES = (torch.int16, torch.int32, torch.int64)
# A dictionary (code -> value) is worth it while it is this small.
_MAX_DICT = 16
# Rows (leading-dim slices) that fix the per-position reference of >= 3-d index tensors.
_BASE_ROWS = 64
# CPU tensors take the fused numba passes of lowbit.kernels.index (False: the torch reference path).
FUSED_CPU = True


def _bits_for(count: int) -> int:
    """Smallest supported packing width that can hold ``count`` distinct codes."""
    for b in _PACK_BITS:
        if count <= (1 << b):
            return b
    raise ValueError(count)


class RawCodec:
    """Keeps the tensor as it is (contiguous copy-free reference). Used for tensors that must not
    be touched, and as the exact fallback for non-finite data."""

    name = "raw"

    def encode(self, t: torch.Tensor) -> Packed:
        return Packed(self.name, t.shape, t.dtype, t.device, {"data": t})

    def decode(self, p: Packed) -> torch.Tensor:
        check_packed(p, self.name)
        return p.payload["data"]


class MaskCodec:
    """bool tensor -> 1 bit per element."""

    name = "mask"

    def encode(self, t: torch.Tensor) -> Packed:
        if t.dtype != torch.bool:
            raise TypeError(f"MaskCodec takes bool tensors, got {t.dtype}")
        flat = t.reshape(-1).to(torch.uint8)
        return Packed(self.name, t.shape, t.dtype, t.device, {"bits": pack_bits(flat, 1)})

    def decode(self, p: Packed) -> torch.Tensor:
        check_packed(p, self.name)
        return unpack_bits(p.payload["bits"], 1, p.numel).to(torch.bool).view(p.shape)


class IndexCodec:
    """Integer tensor -> as few bits as its values need, exactly.

    Values are first offset: by the global minimum, or, for tensors of 3+ dims such as max-pool
    argmax positions ``[N, C, H, W]``, by the minimum over the leading dims at each spatial
    position (the window's corner), which leaves a handful of distinct offsets. If at most 16
    distinct offsets remain they are coded through a small dictionary (2 bits for a 2x2 window),
    otherwise the offsets are packed at the bit width their range needs.
    """

    name = "index"

    def encode(self, t: torch.Tensor) -> Packed:
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"IndexCodec takes integer tensors, got {t.dtype}")
        if t.numel() == 0:
            return Packed(self.name, t.shape, t.dtype, t.device, {}, {"mode": "empty"})
        x = t.to(torch.int64)
        if x.dim() >= 3:  # per-position reference from the first rows (cheap)
            base = x.reshape(-1, *x.shape[-2:])[:_BASE_ROWS].amin(dim=0)
        else:
            base = torch.zeros(1, dtype=torch.int64, device=t.device)
        rows = x.reshape(-1, base.numel())
        fused = FUSED_CPU and rows.device.type == "cpu"
        if fused:  # numba: three passes instead of ~7 (max-pool indices are the largest exact tensor a CNN saves)
            rows = rows.contiguous()
            flat_base = base.reshape(-1)
            rmin, rmax = index_kernels.offset_range(rows, flat_base)
            rmax -= rmin
        else:
            r = rows - base.reshape(-1)
            rmin = int(r.min())
            r = (r - rmin).reshape(-1)
            rmax = int(r.max())
        payload: dict[str, torch.Tensor] = {"base": _narrow_int(base + rmin)}  # offsets are now >= 0

        def packed_codes(lut: torch.Tensor, bits: int) -> torch.Tensor:
            if fused:
                return index_kernels.encode_offsets(rows, flat_base, rmin, lut, bits)
            return pack_bits(lut[r], bits)

        if rmax < 65536:
            if fused:
                present = index_kernels.offset_presence(rows, flat_base, rmin, rmax + 1)
            else:
                present = torch.bincount(r, minlength=rmax + 1) > 0
            values = present.nonzero().reshape(-1)
            if len(values) <= _MAX_DICT and len(values) < rmax + 1:  # a few distinct offsets: code them
                lut = torch.zeros(rmax + 1, dtype=torch.uint8, device=t.device)
                lut[values] = torch.arange(len(values), dtype=torch.uint8, device=t.device)
                bits = _bits_for(len(values))
                payload["codes"] = packed_codes(lut, bits)
                payload["dict"] = _narrow_int(values)
                return Packed(self.name, t.shape, t.dtype, t.device, payload, {"mode": "dict", "bits": bits})
        if rmax < 256:
            bits = _bits_for(rmax + 1)
            payload["codes"] = packed_codes(torch.arange(rmax + 1, device=t.device).to(torch.uint8), bits)
            return Packed(self.name, t.shape, t.dtype, t.device, payload, {"mode": "packed", "bits": bits})
        if fused:
            r = (rows - (base.reshape(-1) + rmin)).reshape(-1)
        payload["codes"] = _narrow_int(r)
        return Packed(self.name, t.shape, t.dtype, t.device, payload, {"mode": "int"})

    def decode(self, p: Packed) -> torch.Tensor:
        check_packed(p, self.name)
        mode = p.info["mode"]
        if mode == "empty":
            return torch.empty(p.shape, dtype=p.dtype, device=p.device)
        n = p.numel
        base = p.payload["base"].to(torch.int64)
        if mode in ("dict", "packed") and FUSED_CPU and p.device.type == "cpu":  # one fused pass
            bits = p.info["bits"]
            values = p.payload["dict"] if mode == "dict" else torch.arange(1 << bits)
            return index_kernels.decode_offsets(p.payload["codes"], bits, n, values, base.reshape(-1)).view(p.shape).to(p.dtype)
        if mode == "dict":
            codes = unpack_bits(p.payload["codes"], p.info["bits"], n).to(torch.int64)
            r = p.payload["dict"].to(torch.int64)[codes]
        elif mode == "packed":
            r = unpack_bits(p.payload["codes"], p.info["bits"], n).to(torch.int64)
        else:
            r = p.payload["codes"].to(torch.int64)
        if len(p.shape) >= 3:
            x = r.view(-1, *p.shape[-2:]) + base
        else:
            x = r + base
        return x.view(p.shape).to(p.dtype)


def _narrow_int(x: torch.Tensor) -> torch.Tensor:
    """The narrowest signed integer dtype that holds every value of ``x`` exactly."""
    lo, hi = int(x.min()), int(x.max())
    for dt in _INT_DTYPES:
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return x.to(dt)
    return x
