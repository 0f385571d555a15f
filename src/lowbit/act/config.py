"""Typed configs for activation-compressed training, and the registry from config type to policy.

A method is a frozen dataclass that validates itself when built (a bad value fails there, with
the field named) and one registered handler that turns it into a :class:`~lowbit.act.policy.Policy`:

    act = lowbit.act.compress(model, GactConfig(average_bits=2))

Every field has one meaning and unit: ``UniformConfig.bits`` is the width of every tensor,
``GactConfig.average_bits`` the average-width budget, ``DivisionConfig.hfc_bits`` the width of the
high-frequency residual. The options of the hook engine itself (``group_size``, ``min_numel``,
``small_fraction``, ``floor_numel``, ``seed``) are on every config (:class:`ActConfig`).

The string form ``ActivationCompressor("gact", bits=2, ...)`` is a shortcut: it builds the
config (:func:`config_for`; ``bits`` goes to the field it means for that method) and follows
the same path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, TypeVar

from lowbit.act.comet import CometPolicy
from lowbit.act.division import DivisionPolicy
from lowbit.act.gact import PROBE_METHODS, GactPolicy
from lowbit.act.mesa import MesaPolicy
from lowbit.act.policy import NonePolicy, Policy, UniformPolicy
from lowbit.codecs.uniform import SUPPORTED_BITS
from lowbit.fields import check_choice, check_int, check_number, integral


@dataclass(frozen=True, kw_only=True)
class ActConfig:
    """Options of the hook engine, shared by every method.

    group_size: elements per quantization group (a positive integer; the uniform codec's unit).
    min_numel: tensors with fewer elements are kept raw while they add up to at most
        ``small_fraction`` of the step's saved bytes (default 16384: 64 KiB of float32).
    small_fraction: that share, in [0, 1].
    floor_numel: tensors with fewer elements are always kept raw (capped at ``min_numel``).
    seed: seed of the private generators used for stochastic rounding.
    """

    name: ClassVar[str] = ""  # the string shortcut, set by register_method
    bits_field: ClassVar[str | None] = None  # the field the shortcut's ``bits=`` sets

    group_size: int = 256
    min_numel: int = 16384
    small_fraction: float = 0.05
    floor_numel: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self, "group_size", 1, unit="elements per quantization group")
        check_int(self, "min_numel", 0, unit="elements")
        check_number(self, "small_fraction", 0.0, 1.0)
        check_int(self, "floor_numel", 0, unit="elements")
        check_int(self, "seed")

    @classmethod
    def shortcut(cls, bits: float | None = None, **options) -> "ActConfig":
        """The config ``ActivationCompressor(name, bits=..., **options)`` means."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(f"method {cls.name or cls.__name__!r} takes no options {unknown}; "
                            f"its options are {sorted(fields)}")
        if bits is not None:
            if cls.bits_field is None:
                raise TypeError(f"method {cls.name or cls.__name__!r} has no bits option")
            options[cls.bits_field] = bits
        return cls(**options)

    def engine_options(self) -> dict:
        """The hook engine's options (the fields of :class:`ActConfig`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ActConfig)}


@dataclass(frozen=True, kw_only=True)
class NoneConfig(ActConfig):
    """Plain autograd: every saved tensor stays raw but is accounted (the baseline)."""

    @classmethod
    def shortcut(cls, bits: float | None = None, **options) -> "NoneConfig":
        return super().shortcut(None, **options)  # a baseline next to other methods: their bits= is not used


@dataclass(frozen=True, kw_only=True)
class UniformConfig(ActConfig):
    """ActNN-style: every saved floating tensor in ``bits`` bits (1, 2, 4 or 8) per element,
    per-group stochastic rounding."""

    bits_field: ClassVar[str | None] = "bits"
    bits: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        integral(self, "bits")
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"unsupported bits={self.bits!r}: UniformConfig.bits (bits per element) must be one "
                             f"of {SUPPORTED_BITS}")


@dataclass(frozen=True, kw_only=True)
class _ProbeConfig(ActConfig):
    """The sensitivity probe's options (GACT and COMET share it, see :mod:`lowbit.act.probe`).

    interval: training steps between estimates. probe_bits: the width tensors are probed at (None:
    each tensor's lowest allowed width). probe_draws: rounding draws averaged per probe.
    max_probes: tensors probed per estimate after the first (``probe_groups=None`` only).
    momentum: weight of the previous sensitivity in the moving average, in [0, 1).
    probe_groups: groups of consecutive tensors probed together (None: tensor by tensor); "sampled" only.
    probe_method: "linear" (differentiate the backward block by block: every tensor on its own;
    ``probe_draws`` random projections) or "sampled" (one backward per probe group
    with the group quantized, ``probe_draws`` rounding draws each).
    """

    interval: int = 100
    probe_bits: int | None = None
    probe_draws: int = 1
    max_probes: int = 16
    momentum: float = 0.5
    probe_groups: int | None = 6
    probe_method: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "interval", 1, unit="training steps")
        check_choice(self, "probe_method", PROBE_METHODS)
        if self.probe_bits is not None:
            check_choice(self, "probe_bits", SUPPORTED_BITS)
        check_int(self, "probe_draws", 1)
        check_int(self, "max_probes", 1)
        check_number(self, "momentum", 0.0, 1.0, high_open=True)
        check_int(self, "probe_groups", 1, allow_none=True)


@dataclass(frozen=True, kw_only=True)
class GactConfig(_ProbeConfig):
    """GACT: per-tensor widths from measured gradient sensitivities, averaging ``average_bits``
    bits per element over the saved floating tensors (may be fractional, 1..8).

    meta_bits: the group metadata (a float16 minimum and scale, 32 bits per group) the allocator
    may spend, in bits per element on average: the tensors at 2 bits or fewer whose noise moves
    the gradient most get groups finer than the engine's layout until that is spent (None: the
    engine's layout everywhere). The default, 1.0, keeps the stored size within about
    ``average_bits + 1`` bits per element."""

    bits_field: ClassVar[str | None] = "average_bits"
    average_bits: float = 2.0
    meta_bits: float | None = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = min(SUPPORTED_BITS), max(SUPPORTED_BITS)
        v = self.average_bits
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"GactConfig.average_bits (the average bits per element) must be a number within "
                             f"{lo}..{hi}, got {v!r}")
        object.__setattr__(self, "average_bits", float(v))
        if self.meta_bits is not None:
            check_number(self, "meta_bits", 0.0, 32.0)


@dataclass(frozen=True, kw_only=True)
class DivisionConfig(ActConfig):
    """DIVISION: spatial maps split into a ``block`` x ``block`` average-pooled low-frequency part
    (float16) and a high-frequency residual in ``hfc_bits`` bits (1, 2, 4, 8); every other floating
    tensor in ``other_bits`` per-group uniform bits (None: kept raw)."""

    bits_field: ClassVar[str | None] = "hfc_bits"
    hfc_bits: int = 2
    block: int = 8
    other_bits: int | None = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        integral(self, "hfc_bits")
        check_choice(self, "hfc_bits", SUPPORTED_BITS)
        check_int(self, "block", 1)
        if self.other_bits is not None:
            check_choice(self, "other_bits", SUPPORTED_BITS)


@dataclass(frozen=True, kw_only=True)
class CometConfig(_ProbeConfig):
    """COMET: error-bounded codes with a bound per tensor, set so the relative parameter-gradient
    error is about ``tolerance`` (in (0, 1)). ``init_eb``: the bound before the first estimate, as
    a fraction of each tensor's range, in (0, 0.5). ``level``: the lossless back end's effort
    (>= 1). ``calibration_rounds``: closed-loop corrections of the bounds per estimate (>= 0)."""

    probe_bits: int | None = 4
    tolerance: float = 0.2
    init_eb: float = 0.01
    level: int = 1
    calibration_rounds: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "tolerance", 0.0, 1.0, low_open=True, high_open=True)
        check_number(self, "init_eb", 0.0, 0.5, low_open=True, high_open=True)
        check_int(self, "level", 1)
        check_int(self, "calibration_rounds", 0)

    @classmethod
    def shortcut(cls, bits: float | None = None, **options) -> "CometConfig":
        # COMET sets error bounds, not widths: the shortcut's bits= is not used (as it never was)
        return super().shortcut(None, **options)


@dataclass(frozen=True, kw_only=True)
class MesaConfig(ActConfig):
    """Mesa: 8-bit codes, one running range per attention head inside attention modules (needs
    the model), per-group elsewhere. ``momentum``: of the running min/max, in [0, 1)."""

    momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "momentum", 0.0, 1.0, high_open=True)

    @classmethod
    def shortcut(cls, bits: float | None = None, **options) -> "MesaConfig":
        if bits not in (None, 8):
            raise ValueError(f"mesa stores 8-bit activations; got bits={bits}")
        return super().shortcut(None, **options)


# ---------------------------------------------------------------------------- registry
C = TypeVar("C", bound=ActConfig)
Handler = Callable[[ActConfig], Policy]

HANDLERS: dict[type[ActConfig], Handler] = {}  # config type -> the function building its policy
METHODS: dict[str, type[ActConfig]] = {}  # string shortcut -> config type


def register_method(config_type: type[C], name: str | None = None) -> Callable[[Callable[[C], Policy]], Callable[[C], Policy]]:
    """Register ``handler(config) -> Policy`` for ``config_type``; ``name`` (optional) makes
    ``ActivationCompressor(name, bits=..., **options)`` a shortcut for it (``bits`` sets the
    config's ``bits_field``)."""
    if not (isinstance(config_type, type) and issubclass(config_type, ActConfig)):
        raise TypeError(f"register_method needs a subclass of ActConfig, got {config_type!r}")

    def deco(handler: Callable[[C], Policy]) -> Callable[[C], Policy]:
        HANDLERS[config_type] = handler
        if name is not None:
            config_type.name = name
            METHODS[name] = config_type
        return handler

    return deco


def config_for(method: str, bits: float | None = None, **options) -> ActConfig:
    """The config the string shortcut ``ActivationCompressor(method, bits=..., **options)`` means."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {sorted(METHODS)}")
    return METHODS[method].shortcut(bits, **options)


def build_policy(config: ActConfig) -> Policy:
    """The policy the registered handler makes for ``config``."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no ACT method is registered for {type(config).__name__}: register one with "
                        f"@lowbit.act.register_method({type(config).__name__})")
    policy = handler(config)
    if not isinstance(policy, Policy):
        raise TypeError(f"the handler for {type(config).__name__} returned {type(policy).__name__}, not a Policy")
    return policy


@register_method(NoneConfig, "none")
def _none(c: NoneConfig) -> Policy:
    return NonePolicy()


@register_method(UniformConfig, "uniform")
def _uniform(c: UniformConfig) -> Policy:
    return UniformPolicy(c.bits)


@register_method(GactConfig, "gact")
def _gact(c: GactConfig) -> Policy:
    return GactPolicy(c.average_bits, interval=c.interval, probe_bits=c.probe_bits, probe_draws=c.probe_draws,
                      max_probes=c.max_probes, momentum=c.momentum, probe_groups=c.probe_groups,
                      probe_method=c.probe_method, meta_bits=c.meta_bits)


@register_method(DivisionConfig, "division")
def _division(c: DivisionConfig) -> Policy:
    return DivisionPolicy(c.hfc_bits, block=c.block, group_size=c.group_size, seed=c.seed, other_bits=c.other_bits)


@register_method(CometConfig, "comet")
def _comet(c: CometConfig) -> Policy:
    return CometPolicy(tolerance=c.tolerance, init_eb=c.init_eb, interval=c.interval, probe_bits=c.probe_bits,
                       probe_draws=c.probe_draws, max_probes=c.max_probes, momentum=c.momentum, level=c.level,
                       calibration_rounds=c.calibration_rounds, probe_groups=c.probe_groups,
                       probe_method=c.probe_method)


@register_method(MesaConfig, "mesa")
def _mesa(c: MesaConfig) -> Policy:
    return MesaPolicy(momentum=c.momentum)
