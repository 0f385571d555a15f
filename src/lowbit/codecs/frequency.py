"""DIVISION's dual-precision split: a block-averaged low-frequency part kept precise, the
high-frequency residual in a few bits, encoded and decoded in bounded workspace."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lowbit.codecs.base import Packed, check_packed, decode_stored_as_is
from lowbit.codecs.uniform import FLOAT_DTYPES, UniformCodec
from lowbit.kernels import pack_bits, unpack_bits, unpack_dequant

_LFC_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class FrequencySplitCodec:
    """t -> (LFC, Q(HFC)) with ``LFC = avg_pool(t, block)`` and ``HFC = t - upsample(LFC)``.

    Pooling follows the tensor's structure: a conv map [N, C, H, W] is averaged over
    ``block x block`` spatial tiles of each channel plane, a 3-D tensor [B, T, D] over ``block``
    rows x ``block`` columns of each [T, D] plane, anything else over ``block**2`` consecutive
    elements (edge tiles are averaged over the part that exists). DIVISION's premise (most of an
    activation's energy sits in its low spatial frequencies) holds for conv maps; for token
    tensors, whose features have no spatial order, the split does not help and a uniform code
    is the better choice (``lowbit.act.DivisionPolicy`` routes them so).

    The LFC is stored in ``lfc_dtype`` (float16: 2 bytes per tile); the HFC, which carries little
    energy, in ``hfc_bits`` with per-group stochastic rounding (``UniformCodec``). Decoding
    returns ``upsample(LFC) + HFC'``, so the error is the HFC's quantization error only.

    Bounded workspace: encoding and decoding walk the tensor in chunks of whole planes (or of
    whole tiles, for flat tensors) of about ``chunk_numel`` elements, so besides its input and
    output a call holds at most a few float32 chunks, never a float copy of the whole tensor.
    Chunks hold whole quantization groups, so the codes are the same as one pass would make.

    ``keep_zeros``: a tensor with at least ``zero_fraction`` exact zeros (a ReLU output, whose
    backward reads its mask from the zeros) also stores a 1-bit nonzero mask, and decoding
    restores those zeros exactly (and keeps the other elements of a non-negative tensor positive);
    without it a ReLU's backward, which reads its mask from the saved output, would see noisy zeros.
    """

    name = "frequency"

    def __init__(self, block: int = 8, hfc_bits: int = 2, group_size: int = 256, lfc_dtype: str = "float16", seed: int = 0,
                 keep_zeros: bool = True, zero_fraction: float = 0.1, chunk_numel: int = 1 << 20):
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        if lfc_dtype not in _LFC_DTYPES:
            raise ValueError(f"lfc_dtype must be one of {sorted(_LFC_DTYPES)}, got {lfc_dtype!r}")
        if not isinstance(chunk_numel, int) or chunk_numel < 1:
            raise ValueError(f"chunk_numel must be a positive integer, got {chunk_numel!r}")
        self.block, self.lfc_dtype = block, _LFC_DTYPES[lfc_dtype]
        self.hfc = UniformCodec(hfc_bits, group_size, "stochastic", seed)
        self.keep_zeros, self.zero_fraction = keep_zeros, zero_fraction
        self.chunk_numel = chunk_numel

    def __repr__(self) -> str:
        return f"FrequencySplitCodec(block={self.block}, hfc_bits={self.hfc.bits}, lfc={self.lfc_dtype})"

    # ------------------------------------------------------------------ layout
    def _layout(self, shape: torch.Size) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """(kind, plane (h, w), tile (kh, kw)) of a tensor of ``shape``: it is a stack of planes."""
        b = self.block
        if len(shape) == 4:
            return "spatial", (shape[2], shape[3]), (b, b)
        if len(shape) == 3:
            return "sequence", (shape[1], shape[2]), (b, b)
        n = math.prod(shape)
        return "flat", (1, n), (1, b * b)

    def _chunks(self, shape: torch.Size, group_size: int) -> list[tuple[int, int]]:
        """Element ranges [start, stop) of the chunks: whole planes (whole tiles of a flat
        tensor), each a multiple of the quantization group and of 8 (the mask's bytes) but the last."""
        kind, (h, w), (kh, kw) = self._layout(shape)
        n = math.prod(shape)
        if kind == "flat":
            unit = math.lcm(kh * kw, group_size, 8)
        else:
            plane = h * w
            unit = math.lcm(plane, group_size, 8)  # whole planes, whole groups, whole mask bytes
        size = max(unit, (self.chunk_numel // unit) * unit)
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    @staticmethod
    def _pool(x: torch.Tensor, plane: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
        """x: a flat float32 chunk of whole planes -> its LFC, [planes, ceil(h/kh), ceil(w/kw)]."""
        # ceil_mode: edge tiles average only their existing elements (no zero padding counted)
        return F.avg_pool2d(x.view(-1, 1, *plane), tile, tile, ceil_mode=True).squeeze(1)

    @staticmethod
    def _upsample(low: torch.Tensor, plane: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
        h, w = plane
        up = low.repeat_interleave(tile[0], 1).repeat_interleave(tile[1], 2)
        return up[:, :h, :w]

    def _chunk_plane(self, kind: str, plane: tuple[int, int], s: int, e: int) -> tuple[int, int]:
        """The plane a chunk is cut into: the tensor's own, or the chunk itself for a flat tensor
        (its chunks hold whole tiles, so they pool as the whole would)."""
        return (1, e - s) if kind == "flat" else plane

    def low_high(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact split: (upsampled LFC, HFC), both shaped like ``t``, summing to ``t``
        (float32; not bounded, for analysis)."""
        x = t.detach().float().reshape(-1).contiguous()
        kind, plane, tile = self._layout(t.shape)
        plane = self._chunk_plane(kind, plane, 0, x.numel())
        up = self._upsample(self._pool(x, plane, tile), plane, tile).reshape(t.shape)
        return up, x.view(t.shape) - up

    # ------------------------------------------------------------------ codec
    def encode(self, t: torch.Tensor, group_size: int | None = None) -> Packed:
        """t: floating, any shape (4-D conv maps and 3-D tensors pooled along their structure).
        ``group_size`` overrides the HFC's quantization group for this call."""
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"FrequencySplitCodec takes floating tensors, got {getattr(t, 'dtype', type(t).__name__)}")
        t = t.detach()
        if t.numel() == 0:
            return Packed(self.name, t.shape, t.dtype, t.device, {}, {"mode": "empty"})
        gs = self.hfc.group_size if group_size is None else group_size
        if not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0:
            raise ValueError(f"group_size must be a positive integer, got {gs!r}")
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)  # a strided input: one copy
        kind, plane, tile = self._layout(t.shape)
        n = flat.numel()
        mask = None
        info: dict = {"mode": "split", "kind": kind, "group_size": gs, "bits": self.hfc.bits}
        if self.keep_zeros:
            zeros = n - int(torch.count_nonzero(flat))
            if zeros >= self.zero_fraction * n:
                mask = torch.empty((n + 7) // 8, dtype=torch.uint8, device=t.device)
                info["nonnegative"] = bool(flat.min() >= 0)
        lows, codes, mins, scales = [], [], [], []
        for s, e in self._chunks(t.shape, gs):
            x = flat[s:e].float()  # a view for float32 input, a chunk-sized copy otherwise
            cplane = self._chunk_plane(kind, plane, s, e)
            low = self._pool(x, cplane, tile)
            high = x - self._upsample(low, cplane, tile).reshape(-1)
            p = self.hfc.encode(high, group_size=gs)  # non-finite input: stored raw inside, with the codec's warning
            if p.info.get("mode") != "quant":
                return Packed(self.name, t.shape, t.dtype, t.device, {"data": t}, {"mode": "raw"})
            lows.append(low.reshape(-1).to(self.lfc_dtype))
            codes.append(p.payload["codes"])
            mins.append(p.payload["min"])
            scales.append(p.payload["scale"])
            if mask is not None:
                mask[s // 8: (e + 7) // 8] = pack_bits((flat[s:e] != 0).to(torch.uint8), 1)
            del x, low, high, p
        meta_dtype = torch.float32 if any(m.dtype == torch.float32 for m in mins) else torch.float16
        payload = {
            "low": torch.cat(lows),
            "high.codes": torch.cat(codes),
            "high.min": torch.cat([m.to(meta_dtype) for m in mins]),  # float16 -> float32 is exact
            "high.scale": torch.cat([c.to(meta_dtype) for c in scales]),
        }
        if mask is not None:
            payload["nonzero"] = mask
        return Packed(self.name, t.shape, t.dtype, t.device, payload, info)

    def decode(self, p: Packed) -> torch.Tensor:
        check_packed(p, self.name)
        as_is = decode_stored_as_is(p)
        if as_is is not None:
            return as_is
        gs, bits = p.info["group_size"], p.info["bits"]
        kind, plane, tile = self._layout(p.shape)
        out = torch.empty(p.numel, dtype=p.dtype, device=p.device)
        pl = p.payload
        group_bytes = (gs * bits + 7) // 8
        mask = pl.get("nonzero")
        lfc_at = 0  # LFC elements of the chunks before this one
        for s, e in self._chunks(p.shape, gs):
            g0, g1 = s // gs, -(-e // gs)  # chunks start on a group boundary
            codes = pl["high.codes"][g0 * group_bytes: g0 * group_bytes + _codes_nbytes(e - s, gs, bits)]
            high = unpack_dequant(codes, e - s, gs, pl["high.min"][g0:g1].float().contiguous(),
                                  pl["high.scale"][g0:g1].float().contiguous(), bits)
            cplane = self._chunk_plane(kind, plane, s, e)
            planes = (e - s) // (cplane[0] * cplane[1])
            shape = (planes, -(-cplane[0] // tile[0]), -(-cplane[1] // tile[1]))
            count = math.prod(shape)
            low = pl["low"][lfc_at: lfc_at + count].float().view(shape)
            lfc_at += count
            chunk = high.add_(self._upsample(low, cplane, tile).reshape(-1))
            if mask is not None:
                keep = unpack_bits(mask[s // 8: (e + 7) // 8], 1, e - s).to(torch.bool)
                if p.info.get("nonnegative"):  # a ReLU output: every kept element stays positive, so is its mask
                    chunk.clamp_min_(torch.finfo(torch.float32).tiny)
                chunk.mul_(keep)
            out[s:e] = chunk
            del high, chunk, low
        return out.view(p.shape)


def _codes_nbytes(n: int, group_size: int, bits: int) -> int:
    """Bytes of the codes of ``n`` elements in groups of ``group_size`` (each group byte-aligned)."""
    full, last = divmod(n, group_size)
    return full * ((group_size * bits + 7) // 8) + (last * bits + 7) // 8
