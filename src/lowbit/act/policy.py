"""Policies decide, per saved floating tensor, how many bits it gets. A registry maps each
``method=`` name to its policy class, so a new method is one new class and nothing else changes."""
from __future__ import annotations

from typing import Callable

import torch

from lowbit.codecs.uniform import check_bits

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


def make_policy(method: str, bits: float | None, **options) -> Policy:
    if method not in POLICIES:
        raise ValueError(f"unknown method {method!r}: choose one of {sorted(POLICIES)}")
    return POLICIES[method](bits, **options)
