"""DIVISION (Wang et al., ICLR 2023): keep each activation map's low-frequency part precise and
its high-frequency residual in 1-2 bits."""
from __future__ import annotations

import torch

from lowbit.act.policy import Policy, register_policy
from lowbit.codecs import Packed
from lowbit.codecs.frequency import FrequencySplitCodec


@register_policy("division")
class DivisionPolicy(Policy):
    """Every saved floating tensor through :class:`FrequencySplitCodec`: ``block`` x ``block``
    average-pooled LFC in float16, HFC in ``bits`` (default 2; 1, 2, 4 or 8)."""

    def __init__(self, bits: float | None = 2, block: int = 8, group_size: int = 256, seed: int = 0):
        self.bits = 2 if bits is None else int(bits)
        self.codec = FrequencySplitCodec(block=block, hfc_bits=self.bits, group_size=group_size, seed=seed)

    def encode(self, index: int, t: torch.Tensor, act) -> Packed | None:
        return self.codec.encode(t, group_size=act.group_for(t))  # the HFC keeps the layout's groups (channel planes, token rows)

    def codecs(self) -> dict:
        return {self.codec.name: self.codec}

    def describe(self) -> str:
        return f"division (LFC fp16 / {self.codec.block}x{self.codec.block}, HFC {self.bits}-bit)"
