"""DIVISION's dual-precision split: a block-averaged low-frequency part kept precise, the
high-frequency residual in a few bits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.codecs.base import Packed, check_packed, decode_stored_as_is
from lowbit.codecs.lossless import MaskCodec
from lowbit.codecs.uniform import FLOAT_DTYPES, UniformCodec

_LFC_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class FrequencySplitCodec:
    """t -> (LFC, Q(HFC)) with ``LFC = avg_pool(t, block)`` and ``HFC = t - upsample(LFC)``.

    Pooling follows the tensor's structure: a conv map [N, C, H, W] is averaged over
    ``block x block`` spatial tiles, a sequence [B, T, D] over ``block`` tokens x ``block``
    features, anything else over ``block**2`` consecutive elements (edge tiles are averaged over
    the part that exists).
    The LFC is stored in ``lfc_dtype`` (float16: 2 bytes per tile); the HFC, which carries little
    energy, in ``hfc_bits`` with per-group stochastic rounding (``UniformCodec``). Decoding
    returns ``upsample(LFC) + HFC'``, so the error is the HFC's quantization error only.

    ``keep_zeros``: a tensor with at least ``zero_fraction`` exact zeros (a ReLU output, whose
    backward reads its mask from the zeros) also stores a 1-bit nonzero mask, and decoding
    restores those zeros exactly (and keeps the other elements of a non-negative tensor positive);
    without it a ReLU's backward, which reads its mask from the saved output, would see noisy zeros.
    """

    name = "frequency"

    def __init__(self, block: int = 8, hfc_bits: int = 2, group_size: int = 256, lfc_dtype: str = "float16", seed: int = 0,
                 keep_zeros: bool = True, zero_fraction: float = 0.1):
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive integer, got {block!r}")
        if lfc_dtype not in _LFC_DTYPES:
            raise ValueError(f"lfc_dtype must be one of {sorted(_LFC_DTYPES)}, got {lfc_dtype!r}")
        self.block, self.lfc_dtype = block, _LFC_DTYPES[lfc_dtype]
        self.hfc = UniformCodec(hfc_bits, group_size, "stochastic", seed)
        self.keep_zeros, self.zero_fraction = keep_zeros, zero_fraction
        self._mask = MaskCodec()

    def __repr__(self) -> str:
        return f"FrequencySplitCodec(block={self.block}, hfc_bits={self.hfc.bits}, lfc={self.lfc_dtype})"

    def _view(self, t: torch.Tensor) -> tuple[torch.Tensor, str]:
        if t.dim() == 4:
            return t, "spatial"
        if t.dim() == 3:
            return t.unsqueeze(1), "spatial"  # [B, 1, T, D]: tiles of tokens x features
        return t.reshape(1, 1, -1), "flat"

    def _pool(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        # ceil_mode: edge tiles average only their existing elements (no zero padding counted)
        k = self.block if kind != "flat" else self.block * self.block
        if kind == "spatial":
            return F.avg_pool2d(x, k, k, ceil_mode=True)
        return F.avg_pool1d(x, k, k, ceil_mode=True)

    def _upsample(self, low: torch.Tensor, shape: torch.Size, kind: str) -> torch.Tensor:
        k = self.block if kind != "flat" else self.block * self.block
        if kind == "spatial":
            up = low.repeat_interleave(k, 2).repeat_interleave(k, 3)
            return up[:, :, : shape[2], : shape[3]]
        return low.repeat_interleave(k, 2)[:, :, : shape[2]]

    def low_high(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact split: (upsampled LFC, HFC), both shaped like ``t``, summing to ``t``."""
        x, kind = self._view(t.float())
        up = self._upsample(self._pool(x, kind), x.shape, kind)
        return self._unview(up, t, kind), self._unview(x - up, t, kind)

    @staticmethod
    def _unview(x: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
        return x.reshape(like.shape)

    def encode(self, t: torch.Tensor, group_size: int | None = None) -> Packed:
        """t: floating, any shape (4-D conv maps and 3-D sequences pooled along their structure).
        ``group_size`` overrides the HFC's quantization group for this call."""
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"FrequencySplitCodec takes floating tensors, got {getattr(t, 'dtype', type(t).__name__)}")
        t = t.detach()
        if t.numel() == 0:
            return Packed(self.name, t.shape, t.dtype, t.device, {}, {"mode": "empty"})
        x, kind = self._view(t.float())
        low = self._pool(x, kind)
        up = self._upsample(low, x.shape, kind)
        high = self.hfc.encode(x - up, group_size=group_size)  # non-finite input: stored raw inside, with the codec's warning
        payload = {"low": low.to(self.lfc_dtype), **{f"high.{k}": v for k, v in high.payload.items()}}
        info = {"mode": "split", "kind": kind, "view_shape": tuple(x.shape), "high": high.info}
        if self.keep_zeros:
            nonzero = t != 0
            if float(nonzero.float().mean()) <= 1 - self.zero_fraction:
                payload["nonzero"] = self._mask.encode(nonzero).payload["bits"]
                info["nonnegative"] = bool(t.min() >= 0)
        return Packed(self.name, t.shape, t.dtype, t.device, payload, info)

    def decode(self, p: Packed) -> torch.Tensor:
        check_packed(p, self.name)
        as_is = decode_stored_as_is(p)
        if as_is is not None:
            return as_is
        kind, view_shape = p.info["kind"], torch.Size(p.info["view_shape"])
        high_payload = {k[5:]: v for k, v in p.payload.items() if k.startswith("high.")}
        high = self.hfc.decode(Packed(self.hfc.name, view_shape, torch.float32, p.device, high_payload, p.info["high"]))
        up = self._upsample(p.payload["low"].float(), view_shape, kind)
        out = (up + high).reshape(p.shape)
        if "nonzero" in p.payload:
            mask = self._mask.decode(Packed(self._mask.name, p.shape, torch.bool, p.device, {"bits": p.payload["nonzero"]}))
            if p.info.get("nonnegative"):  # a ReLU output: every kept element stays positive, so is its mask
                out = out.clamp_min(torch.finfo(torch.float32).tiny)
            out = out * mask
        return out.to(p.dtype)
