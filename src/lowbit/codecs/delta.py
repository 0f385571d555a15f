"""Delta codec (AC-SGD): encode the change of a tensor against a reference both sides hold."""
from __future__ import annotations

import torch

from lowbit.codecs.base import Packed, check_packed
from lowbit.codecs.uniform import UniformCodec


class DeltaCodec:
    """``a`` given ``ref`` -> ``inner.encode(a - ref)``; decoding returns ``ref + inner.decode(.)``.

    The codec is stateless about the references: the caller (``lowbit.distributed``) keeps
    ``ref`` per training example on both ends of a link and replaces it with the *decoded* value
    after every message, so sender and receiver hold bit-identical references. As training
    converges the change shrinks, so a few bits carry it (AC-SGD, Wang et al. 2022).

    ``inner`` defaults to 4-bit per-group stochastic :class:`UniformCodec`.
    """

    name = "delta"

    def __init__(self, inner: UniformCodec | None = None):
        self.inner = inner if inner is not None else UniformCodec(bits=4, group_size=128)

    def __repr__(self) -> str:
        return f"DeltaCodec({self.inner!r})"

    def encode(self, t: torch.Tensor, ref: torch.Tensor) -> Packed:
        """t, ref: same shape; ref is cast to t's dtype and device."""
        if not isinstance(t, torch.Tensor) or not isinstance(ref, torch.Tensor):
            raise TypeError("DeltaCodec.encode takes two tensors (t, ref)")
        if t.shape != ref.shape:
            raise ValueError(f"t has shape {tuple(t.shape)} but its reference has {tuple(ref.shape)}")
        inner = self.inner.encode(t.detach() - ref.to(t.device, t.dtype))
        return Packed(self.name, inner.shape, inner.dtype, inner.device, inner.payload, inner.info)

    def decode(self, p: Packed, ref: torch.Tensor) -> torch.Tensor:
        check_packed(p, self.name)
        change = self.inner.decode(Packed(self.inner.name, p.shape, p.dtype, p.device, p.payload, p.info))
        if ref.shape != change.shape:
            raise ValueError(f"reference has shape {tuple(ref.shape)}, the encoded change {tuple(change.shape)}")
        return ref.to(change.device, change.dtype) + change
