"""What every codec returns: a :class:`Packed` that knows its size in bytes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Packed:
    """A tensor in compact form.

    ``payload`` holds every tensor the encoding keeps (codes, per-group metadata, ...);
    ``info`` holds plain Python values (bits, group size, ...). ``shape``/``dtype``/``device``
    describe the decoded tensor.
    """

    codec: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    payload: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Every byte this encoding holds in tensors: codes and metadata."""
        return sum(t.numel() * t.element_size() for t in self.payload.values())

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the decoded tensor (contiguous)."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)


class Codec(Protocol):
    """tensor <-> compact bytes. Codecs carry no autograd and no training logic."""

    name: str

    def encode(self, t: torch.Tensor) -> Packed: ...

    def decode(self, p: Packed) -> torch.Tensor: ...


def check_packed(p: Packed, name: str) -> None:
    if not isinstance(p, Packed):
        raise TypeError(f"expected a Packed, got {type(p).__name__}")
    if p.codec != name:
        raise ValueError(f"this Packed was made by the {p.codec!r} codec, not {name!r}")


def decode_stored_as_is(p: Packed) -> torch.Tensor | None:
    """The decoded tensor of an ``"empty"`` or ``"raw"`` (stored exactly) encoding, else None."""
    mode = p.info.get("mode")
    if mode == "empty":
        return torch.empty(p.shape, dtype=p.dtype, device=p.device)
    if mode == "raw":
        return p.payload["data"]
    return None
