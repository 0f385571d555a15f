"""COMET's error-bounded lossy codec: every element within an absolute bound ``eb``."""
from __future__ import annotations

import math

import numpy as np
import torch
import zstandard

from lowbit.codecs.base import Packed, check_packed, decode_stored_as_is
from lowbit.codecs.uniform import FLOAT_DTYPES

_F32_REL = 2.0**-23  # float32 spacing relative to the value


class ErrorBoundedCodec:
    """x -> integer codes ``q = round(x / (2 eb'))`` -> Lorenzo prediction (each code minus the
    previous one along the flattened tensor) -> zigzag -> the narrowest integer type -> zstandard.

    Decoding is ``cumsum`` then ``q * 2 eb'``. Guarantee: ``|x - x'| <= eb`` for every element.
    ``eb'`` is ``eb`` less the float32 rounding encoding and decoding can add (``max|x| * 2**-22``),
    so the bound holds in float32, not only in exact arithmetic; a bound below float32 resolution
    of the tensor (or NaN/Inf in it) stores it raw. Smooth and sparse maps (ReLU zeros) give
    small, repetitive residuals that zstandard packs to a fraction of a byte each. Encoding and
    decoding go ``chunk`` elements at a time (one zstandard frame each), in bounded workspace.
    """

    name = "error_bounded"

    def __init__(self, eb: float = 1e-2, level: int = 1, chunk: int = 1 << 20):
        self.eb = _check_eb(eb)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk (elements per frame) must be a positive integer, got {chunk!r}")
        self.level = level
        self.chunk = chunk
        self._zc = zstandard.ZstdCompressor(level=level)
        self._zd = zstandard.ZstdDecompressor()

    def __repr__(self) -> str:
        return f"ErrorBoundedCodec(eb={self.eb:g}, level={self.level})"

    def encode(self, t: torch.Tensor, eb: float | None = None) -> Packed:
        """t: floating, any shape, any device (compressed on the host). ``eb`` overrides the codec's bound.

        Works in chunks of ``chunk`` elements (each its own zstandard frame, the Lorenzo
        prediction carried across), so the workspace stays a few chunk-sized buffers however big
        ``t`` is: never a float copy of the whole tensor when it is contiguous float32 on the CPU."""
        eb = self.eb if eb is None else _check_eb(eb)
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"ErrorBoundedCodec takes floating tensors, got {getattr(t, 'dtype', type(t).__name__)}")
        t = t.detach()
        if t.numel() == 0:
            return Packed(self.name, t.shape, t.dtype, t.device, {}, {"mode": "empty", "eb": eb})
        x = t.reshape(-1)  # a view when t is contiguous
        lo, hi = torch.aminmax(x)  # one pass, no copy
        amax = max(abs(float(lo)), abs(float(hi)))
        # float32 arithmetic (x / step, q * step) is off by at most ~|x| 2**-24 each way: keep that margin
        margin = amax * _F32_REL * 2 if t.dtype == torch.float32 else amax * 2.0**-7  # or the output dtype's rounding
        step = 2.0 * (eb - margin)
        if not math.isfinite(amax) or step <= 0 or amax / step > 2**30:
            return Packed(self.name, t.shape, t.dtype, t.device, {"data": t.clone()}, {"mode": "raw", "eb": eb})
        frames: list[bytes] = []
        sizes: list[int] = []
        widths: list[str] = []
        prev = torch.zeros(1, dtype=torch.int32)
        for s in range(0, x.numel(), self.chunk):
            xc = x[s : s + self.chunk].to("cpu", torch.float32)
            q = torch.round(xc / step).to(torch.int32)
            del xc
            r = torch.diff(q, prepend=prev)
            prev = q[-1:].clone()
            del q
            z = (r << 1) ^ (r >> 31)  # zigzag: small magnitudes -> small unsigned
            del r
            top = int(z.max())
            width = next(d for d in (torch.uint8, torch.int16, torch.int32) if top <= torch.iinfo(d).max)
            frames.append(self._zc.compress(z.to(width).numpy().tobytes()))
            sizes.append(len(frames[-1]))
            widths.append(str(width).split(".")[-1])
        data = torch.frombuffer(bytearray(b"".join(frames)), dtype=torch.uint8)
        info = {"mode": "lorenzo", "eb": eb, "step": step, "chunk": self.chunk, "frames": sizes, "widths": widths}
        return Packed(self.name, t.shape, t.dtype, t.device, {"blob": data}, info)

    def decode(self, p: Packed) -> torch.Tensor:
        """Frame by frame into one output tensor (workspace: a few chunk-sized buffers)."""
        check_packed(p, self.name)
        as_is = decode_stored_as_is(p)
        if as_is is not None:
            return as_is
        out = torch.empty(p.numel, dtype=p.dtype)
        blob = p.payload["blob"].numpy()
        chunk, step = p.info["chunk"], p.info["step"]
        carry = torch.zeros((), dtype=torch.int32)
        off = 0
        for k, (nb, width) in enumerate(zip(p.info["frames"], p.info["widths"])):
            raw = bytearray(self._zd.decompress(blob[off : off + nb]))
            off += nb
            z = torch.frombuffer(raw, dtype=getattr(torch, width)).to(torch.int32)
            r = (z >> 1) ^ -(z & 1)
            del z
            q = torch.cumsum(r, 0, dtype=torch.int32)  # every partial sum is a code, so int32 is exact
            q += carry
            carry = q[-1].clone()
            out[k * chunk : k * chunk + q.numel()] = q.to(torch.float32) * step
        return out.view(p.shape).to(p.device)


def _check_eb(eb: float) -> float:
    if isinstance(eb, bool) or not isinstance(eb, (int, float)) or not np.isfinite(eb) or eb <= 0:
        raise ValueError(f"error bound eb must be a positive finite number, got {eb!r}")
    return float(eb)
