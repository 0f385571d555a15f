"""Policies decide, per saved floating tensor, how it is stored. A method's config
(:mod:`lowbit.act.config`) is turned into its policy by the handler registered for the config's
type; ``POLICIES`` lists the policy classes by name (``register_policy`` sets ``Policy.name``).

The default :meth:`Policy.encode` asks :meth:`Policy.bits_for` for a width and uses the
context's per-group uniform codec; a policy with its own codec overrides ``encode`` and lists
the codec in :meth:`Policy.codecs` so the compressor can decode what it made."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from lowbit.codecs import Packed
from lowbit.codecs.uniform import check_bits

if TYPE_CHECKING:
    from lowbit.act.context import PolicyContext

POLICIES: dict[str, type["Policy"]] = {}


def register_policy(name: str) -> Callable[[type["Policy"]], type["Policy"]]:
    def deco(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        POLICIES[name] = cls
        return cls

    return deco


class Policy:
    """Base policy: ``bits_for`` returns a width in SUPPORTED_BITS, or None to keep the tensor raw."""

    name = "base"
    adaptive = False

    def __init__(self, bits: float | None = None, **options):
        if options:
            raise TypeError(f"method {self.name!r} takes no options {sorted(options)}")
        self.bits = bits

    def bits_for(self, index: int, t: torch.Tensor) -> int | None:
        raise NotImplementedError

    def encode(self, index: int, t: torch.Tensor, ctx: "PolicyContext") -> Packed | None:
        """The ``index``-th saved floating tensor of the step -> its encoding, or None to keep it raw.
        ``ctx`` answers which codec, which groups and which module is running."""
        bits = self.bits_for(index, t)
        if bits is None:
            return None
        return ctx.uniform_codec.encode(t, bits=bits, group_size=ctx.group_for(t, bits))

    def codecs(self) -> dict:
        """{name: codec} of the codecs this policy's encodings need for decoding (besides uniform)."""
        return {}

    def bind(self, model: "torch.nn.Module") -> None:
        """Called once with the compressor's ``model=`` (when given), before any forward."""

    def close(self) -> None:
        """Remove whatever the policy installed (module hooks); called by the compressor's close()."""

    def describe(self) -> str:
        return self.name


@register_policy("none")
class NonePolicy(Policy):
    """Plain autograd: everything stays raw, but is still accounted (the baseline)."""

    def bits_for(self, index: int, t: torch.Tensor) -> int | None:
        return None


@register_policy("uniform")
class UniformPolicy(Policy):
    """The same width for every tensor (ActNN-style per-group stochastic quantization)."""

    def __init__(self, bits: float | None = 2, **options):
        super().__init__(check_bits(2 if bits is None else bits), **options)

    def bits_for(self, index: int, t: torch.Tensor) -> int | None:
        return self.bits

    def describe(self) -> str:
        return f"uniform {self.bits}-bit"
