"""What a policy may ask while it encodes a saved tensor: a narrow view of the compressor.

Policies get a :class:`PolicyContext` instead of the compressor itself, so they depend on four
questions (which codec, which groups, which module is running) and not on the hook engine."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.codecs.uniform import UniformCodec, layout_group


class PolicyContext:
    """The shared uniform codec (its private generator drives stochastic rounding), the group
    layout rule, and the modules whose forward is running (needs ``model=`` on the compressor)."""

    def __init__(self, codec: UniformCodec, module_stack: list[str], modules: dict[str, nn.Module]):
        self._codec = codec
        self._stack = module_stack  # shared with the compressor's forward hooks, not copied
        self._modules = modules

    @property
    def uniform_codec(self) -> UniformCodec:
        return self._codec

    def group_for(self, t: torch.Tensor, bits: int | None = None) -> int:
        """Elements per quantization group for ``t`` at ``bits`` (see :func:`lowbit.codecs.uniform.layout_group`)."""
        return layout_group(t, self._codec.group_size, bits)

    def current_module(self) -> tuple[str, nn.Module | None]:
        """(name, module) innermost in the forward right now (("-", None) without ``model=``)."""
        if not self._stack:
            return "-", None
        label = self._stack[-1]
        return label, self._modules.get(label)

    def enclosing_modules(self) -> list[nn.Module]:
        """Every module whose forward is running right now, innermost first."""
        return [self._modules[l] for l in reversed(self._stack) if l in self._modules]

