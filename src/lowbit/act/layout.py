"""Saved-tensor layouts: which part of a storage to encode, and how to give backward a tensor with
exactly the size, stride and storage offset autograd saved.

Eager autograd accepts any strides, but compiled backward graphs (``torch.compile``) check them
(``assert_size_stride``) and inductor indexes its inputs by their strides, so a restored tensor
must have the saved layout, not merely the saved values.
"""
from __future__ import annotations

import torch

# A partial view whose elements fill at least this fraction of the storage span they touch is
# encoded as that span (one read, layout restored by as_strided); a sparser one (a q/k/v slice
# interleaved with the others) is encoded by value and scattered back into its strides.
_DENSE_SPAN = 0.8


def extent(size: torch.Size | tuple, stride: tuple) -> int:
    """Elements of storage a view of ``size``/``stride`` spans from its first element (0 if empty)."""
    if any(s == 0 for s in size):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(size, stride))


def span_of(t: torch.Tensor) -> torch.Tensor | None:
    """The flat storage slice ``[offset, offset + extent)`` under ``t`` when ``t`` covers it densely
    (or overlaps itself, as an expanded tensor does), else None. Shares memory with ``t``."""
    n = t.numel()
    ext = extent(t.shape, t.stride())
    if n == 0 or ext == 0 or n < _DENSE_SPAN * ext:
        return None
    if any(st < 0 for st in t.stride()):
        return None
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), (ext,), (1,))


def restore_layout(base: torch.Tensor, size: torch.Size, stride: tuple, offset: int, span: bool) -> torch.Tensor:
    """A tensor of exactly ``size``/``stride``/``storage_offset``: ``base`` is either the decoded
    view itself (values in logical order, ``span=False``) or the decoded flat span
    (``span=True``). Returns ``base`` untouched when it already has the layout. The storage is
    allocated with ``offset`` leading elements that are never written (large ones are never
    touched, so they take address space, not memory)."""
    if not span and tuple(base.stride()) == tuple(stride) and base.storage_offset() == offset:
        return base
    ext = extent(size, stride)
    buf = torch.empty(offset + ext, dtype=base.dtype, device=base.device)
    if span:
        buf[offset:].copy_(base.reshape(-1)[:ext])
        return buf.as_strided(size, stride, offset)
    out = buf.as_strided(size, stride, offset)
    out.copy_(base.reshape(size))
    return out
