"""Mesa (Pan et al., 2021): 8-bit activations for transformers, with a quantization range per
attention head for the multi-head attention tensors, tracked with running estimates."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.act.policy import Policy, register_policy
from lowbit.codecs import Packed
from lowbit.codecs.headwise import HeadwiseCodec


def attention_heads(module: nn.Module) -> int | None:
    """Number of heads of an attention module (``nn.MultiheadAttention``, or any module with an
    integer ``heads`` / ``num_heads`` / ``n_heads`` attribute), else None."""
    if isinstance(module, nn.MultiheadAttention):
        return module.num_heads
    for attr in ("heads", "num_heads", "n_heads"):
        h = getattr(module, attr, None)
        if isinstance(h, int) and h > 1:
            return h
    return None


@register_policy("mesa")
class MesaPolicy(Policy):
    """Inside an attention module (needs ``model=``), tensors laid out [B, H, ...] (hand-written
    attention, ``scaled_dot_product_attention`` inputs) or [B*H, ...] (``nn.MultiheadAttention``)
    get 8-bit codes with one running range per head (``momentum`` of the running min/max); every
    other saved tensor gets 8-bit per-group codes."""

    needs_model = True

    def __init__(self, bits: float | None = 8, momentum: float = 0.9):
        if bits not in (None, 8):
            raise ValueError(f"mesa stores 8-bit activations; got bits={bits}")
        self.bits, self.momentum = 8, momentum
        self.codec = HeadwiseCodec()
        self.ranges: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.headwise_count = 0  # tensors stored head-wise so far (for reports and tests)

    def _head_view(self, t: torch.Tensor, act) -> torch.Tensor | None:
        for m in act.enclosing_modules():
            h = attention_heads(m)
            if h is None:
                continue
            if t.dim() == 4 and t.shape[1] == h:
                return t
            if isinstance(m, nn.MultiheadAttention) and t.dim() == 3 and t.shape[0] % h == 0:
                return t.reshape(t.shape[0] // h, h, *t.shape[1:])
            return None
        return None

    def encode(self, index: int, t: torch.Tensor, act) -> Packed | None:
        v = self._head_view(t, act)
        if v is None:
            return act.uniform_codec.encode(t, bits=8, group_size=act.group_for(t))
        dims = [d for d in range(v.dim()) if d != 1]
        lo_now, hi_now = v.detach().amin(dim=dims).float(), v.detach().amax(dim=dims).float()
        if not bool(torch.isfinite(lo_now).all() & torch.isfinite(hi_now).all()):
            return None
        old = self.ranges.get(index)
        if old is None or old[0].shape != lo_now.shape:
            lo, hi = lo_now, hi_now
        else:
            m = self.momentum
            lo, hi = m * old[0] + (1 - m) * lo_now, m * old[1] + (1 - m) * hi_now
        self.ranges[index] = (lo, hi)
        self.headwise_count += 1
        p = self.codec.encode(v, lo, hi)
        if v.shape != t.shape:
            p.info["view_from"] = tuple(t.shape)
        return p

    def codecs(self) -> dict:
        return {self.codec.name: _ReshapingHeadwise(self.codec)}

    def describe(self) -> str:
        return "mesa (8-bit, head-wise attention ranges)"


class _ReshapingHeadwise:
    """Decodes head-wise codes back to the saved tensor's own layout ([B*H, ...] for nn.MultiheadAttention)."""

    name = HeadwiseCodec.name

    def __init__(self, codec: HeadwiseCodec):
        self.codec = codec

    def decode(self, p: Packed) -> torch.Tensor:
        out = self.codec.decode(p)
        shape = p.info.get("view_from")
        return out.reshape(shape) if shape is not None else out
