"""DIVISION (Wang et al., ICLR 2023): keep each activation map's low-frequency part precise and
its high-frequency residual in 1-2 bits.

The split is made for spatial maps, where neighbouring pixels are alike and block means carry
most of the energy. Token tensors ([B, T, D] hidden states, [B, H, T, T] attention scores) have
no such structure: their block means carry little and a 2-bit residual loses too much (on a small
GPT the split cost 1.4 nats of validation loss, on a ViT 25 points of accuracy). So the policy
splits only spatial maps and stores every other floating tensor with per-group uniform codes at
``other_bits`` (4 by default), and its description in ``act.report()`` says how many tensors
went which way.
"""
from __future__ import annotations

import warnings

import torch

from lowbit.act.attention import attention_heads, looks_like_attention
from lowbit.act.policy import Policy, register_policy
from lowbit.codecs import Packed
from lowbit.codecs.frequency import FrequencySplitCodec
from lowbit.codecs.uniform import check_bits


@register_policy("division")
class DivisionPolicy(Policy):
    """Spatial maps through :class:`FrequencySplitCodec` (``block`` x ``block`` average-pooled LFC
    in float16, HFC in ``bits``: 1, 2, 4 or 8, default 2); every other floating tensor in
    ``other_bits`` per-group uniform codes (default 4; ``other_bits=None`` keeps them raw).

    A spatial map is a 4-D tensor [N, C, H, W] with H, W >= 2 saved outside attention modules
    (attention scores [B, heads, T, T] are 4-D too). Recognising attention needs the compressor's
    ``model=``; without it every such 4-D tensor counts as a map, with a warning. ``counts``
    (and the report's method line) say how many tensors of the last forward went each way."""

    def __init__(self, bits: float | None = 2, block: int = 8, group_size: int = 256, seed: int = 0,
                 other_bits: int | None = 4):
        bits = 2 if bits is None else bits
        if isinstance(bits, float) and bits.is_integer():
            bits = int(bits)
        self.bits = check_bits(bits)
        self.other_bits = None if other_bits is None else check_bits(other_bits)
        self.codec = FrequencySplitCodec(block=block, hfc_bits=self.bits, group_size=group_size, seed=seed)
        self.counts = {"split": 0, "other": 0}  # tensors of the last forward stored each way
        self._warned = False

    def is_spatial(self, t: torch.Tensor, act) -> bool:
        """Whether ``t`` is a spatial map (see the class doc); ``act`` is the compressor's
        policy context (its running modules)."""
        if t.dim() != 4 or t.shape[2] < 2 or t.shape[3] < 2:
            return False
        running = act.enclosing_modules()
        if not running:  # no model= (or a tensor saved outside the model's forward)
            if not self._warned:
                self._warned = True
                warnings.warn("division without model=: every 4-D tensor is treated as a spatial map, attention "
                              "scores included; pass model= so tensors inside attention modules get uniform codes",
                              UserWarning, stacklevel=4)
            return True
        return not any(looks_like_attention(m) or attention_heads(m) is not None for m in running)

    def encode(self, index: int, t: torch.Tensor, act) -> Packed | None:
        if index == 0:  # the first floating tensor of a forward: count afresh
            self.counts = {"split": 0, "other": 0}
        if self.is_spatial(t, act):
            self.counts["split"] += 1
            # the HFC keeps the layout's groups (channel planes)
            return self.codec.encode(t, group_size=act.group_for(t))
        self.counts["other"] += 1
        if self.other_bits is None:
            return None
        return act.uniform_codec.encode(t, bits=self.other_bits, group_size=act.group_for(t, self.other_bits))

    def codecs(self) -> dict:
        return {self.codec.name: self.codec}

    def describe(self) -> str:
        other = "kept raw" if self.other_bits is None else f"uniform {self.other_bits}-bit"
        return (f"division (spatial maps: LFC fp16 / {self.codec.block}x{self.codec.block}, HFC {self.bits}-bit; "
                f"other tensors: {other}; last forward {self.counts['split']} split, {self.counts['other']} other)")
