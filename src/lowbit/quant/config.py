"""Typed configs for the quantization recipes: one frozen dataclass per registered recipe.

    qmodel = lowbit.quant.quantize(model, XnorConfig())
    qmodel = lowbit.quant.quantize(model, SbnnConfig(sparsity=0.9))
    # the same, by the string shortcut: quantize(model, "sbnn", sparsity=0.9)

A config validates itself when built (ValueError naming ``Config.field``). Every config has the
options of :func:`~lowbit.quant.recipes.quantize` itself (:class:`QuantConfig`); the recipe's own
fields come after. Widths are bits per element: ``w_bits`` of weights, ``a_bits`` of layer
inputs, ``g_bits`` of the gradients flowing back (QNN), ``bits`` where weights and inputs share
one width (LSQ int8 / int4, vertical). The registry from config type to recipe lives in
:mod:`lowbit.quant.recipes` (``register_recipe(name, description, config=...)``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from lowbit.fields import check_bool, check_choice, check_int, check_number, integral
from lowbit.quant.quantizers import ESTIMATORS


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Options every recipe takes.

    keep_first_last: keep the first and the last weight layer float (as the papers do).
    skip: names of modules kept float (a name skips everything under it); a list is stored as a tuple.
    embeddings: also quantize nn.Embedding weights (one scale per row).
    distill: weight of representation distillation from a float teacher in ``train_quantized``
        (>= 0; DIR-Net's default is 1).
    """

    recipe: ClassVar[str] = ""  # the recipe name, set when registered

    keep_first_last: bool = True
    skip: tuple[str, ...] = ()
    embeddings: bool = False
    distill: float = 0.0

    def __post_init__(self) -> None:
        check_bool(self, "keep_first_last")
        skip = self.skip
        if isinstance(skip, str):
            skip = (skip,)
        if not isinstance(skip, (list, tuple)) or not all(isinstance(n, str) for n in skip):
            raise ValueError(f"{type(self).__name__}.skip must be a list of module names, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(skip))
        check_bool(self, "embeddings")
        check_number(self, "distill", 0.0)

    def options(self) -> dict:
        """{field: value} (what ``qmodel.lowbit_recipe`` records, besides the recipe name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, kw_only=True)
class BnnConfig(QuantConfig):
    """QNN/BNN: weights and inputs sign(), clipped straight-through estimator."""


@dataclass(frozen=True, kw_only=True)
class QnnConfig(QuantConfig):
    """QNN/DoReFa: ``w_bits``-bit weights, ``a_bits``-bit inputs on [0, 1], ``g_bits``-bit stochastic
    gradients (each 1..16; ``g_bits=None``: float gradients)."""

    w_bits: int = 2
    a_bits: int = 2
    g_bits: int | None = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("w_bits", "a_bits", "g_bits"):
            integral(self, f)
        check_int(self, "w_bits", 1, 16)
        check_int(self, "a_bits", 1, 16)
        check_int(self, "g_bits", 1, 16, allow_none=True)


@dataclass(frozen=True, kw_only=True)
class BwnConfig(QuantConfig):
    """Binary-Weight-Network: alpha_c * sign(w), float inputs."""


@dataclass(frozen=True, kw_only=True)
class XnorConfig(QuantConfig):
    """XNOR-Net: alpha_c * sign(w), sign inputs scaled by K."""


@dataclass(frozen=True, kw_only=True)
class FdaConfig(QuantConfig):
    """FDA-BNN: sign with a Fourier-series gradient of ``terms`` terms (>= 1) at frequency
    ``omega`` (> 0), and a noise adaptation module. ``estimator="ste"`` with
    ``noise_adaptation=False`` is the paper's STE baseline."""

    omega: float = 0.1
    terms: int = 10
    noise_adaptation: bool = True
    estimator: str = "fourier"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "omega", 0.0, low_open=True)
        check_int(self, "terms", 1)
        check_bool(self, "noise_adaptation")
        check_choice(self, "estimator", ESTIMATORS)


@dataclass(frozen=True, kw_only=True)
class DirNetConfig(QuantConfig):
    """DIR-Net: balanced standardised weights with a 2^n scale, the two-stage tanh estimator going
    from ``t_min`` to ``t_max`` (0 < t_min <= t_max), distillation from a float teacher."""

    t_min: float = 0.1
    t_max: float = 10.0
    distill: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "t_min", 0.0, low_open=True)
        check_number(self, "t_max", self.t_min if isinstance(self.t_min, (int, float)) else 0.0)


@dataclass(frozen=True, kw_only=True)
class SbnnConfig(QuantConfig):
    """Sparse binary: 1-bit weights with a share ``sparsity`` (in (0, 1)) on the sparse value;
    ``domain`` "general" ({beta_c, alpha_c}) or "01" ({0, alpha_c})."""

    sparsity: float = 0.75
    domain: str = "general"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "sparsity", 0.0, 1.0, low_open=True, high_open=True)
        check_choice(self, "domain", ("general", "01"))


@dataclass(frozen=True, kw_only=True)
class TwnConfig(QuantConfig):
    """Naive ternary (TWN): threshold 0.7 mean|w|, float inputs."""


@dataclass(frozen=True, kw_only=True)
class HqConfig(QuantConfig):
    """HQ ternary: hyperspherical weights, gradual pruning to ``sparsity`` (share of zeros, in
    [0, 1)) after a float phase of ``float_phase`` of training (in [0, 1])."""

    sparsity: float = 0.5
    float_phase: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "sparsity", 0.0, 1.0, high_open=True)
        check_number(self, "float_phase", 0.0, 1.0)


@dataclass(frozen=True, kw_only=True)
class TernaryPtqConfig(QuantConfig):
    """PTQ ternary (pruning ternary quantization): L2 normalisation, pruning to ``sparsity`` (in
    [0, 1)), weight decay ``decay`` (>= 0) toward the grid."""

    sparsity: float = 0.5
    decay: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "sparsity", 0.0, 1.0, high_open=True)
        check_number(self, "decay", 0.0)


@dataclass(frozen=True, kw_only=True)
class VerticalConfig(QuantConfig):
    """Vertical-layered: weights stored once at 8 bits, used at ``bits`` (2..8) until switched;
    ``switch_bn``: BatchNorm statistics per width."""

    bits: int = 8
    switch_bn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        integral(self, "bits")
        check_int(self, "bits", 2, 8)
        check_bool(self, "switch_bn")


@dataclass(frozen=True, kw_only=True)
class LsqConfig(QuantConfig):
    """Learned step size: ``bits``-bit (2..16) weights (one step per output channel) and inputs."""

    bits: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        integral(self, "bits")
        check_int(self, "bits", 2, 16)


@dataclass(frozen=True, kw_only=True)
class Int8Config(LsqConfig):
    """8-bit LSQ weights and inputs (the "int8" recipe)."""

    bits: int = 8


@dataclass(frozen=True, kw_only=True)
class Int4Config(LsqConfig):
    """4-bit LSQ weights and inputs (the "int4" recipe)."""

    bits: int = 4
