"""Recipes: registered ways to turn a float model into a quantized one.

    quantize(model, XnorConfig())           # a config: the recipe's options, validated
    quantize(model, "xnor")                 # the string shortcut for the same
    quantize(model, "sbnn", sparsity=0.9)   # = quantize(model, SbnnConfig(sparsity=0.9))

A recipe is a small registered record (as torchao registers one handler per config type): its
config type (:mod:`lowbit.quant.config`), the handler that builds each layer's quantizers from the
config, and whether the model's ReLUs must become hardtanh (a ReLU output is never negative, so
sign() of it would be all +1). ``CONFIGS`` maps config type -> recipe, ``RECIPES`` name -> recipe.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from lowbit.quant.attention import SplitMultiheadAttention
from lowbit.quant.config import (
    BnnConfig,
    BwnConfig,
    DirNetConfig,
    FdaConfig,
    HqConfig,
    Int4Config,
    Int8Config,
    LsqConfig,
    QnnConfig,
    QuantConfig,
    SbnnConfig,
    TernaryPtqConfig,
    TwnConfig,
    VerticalConfig,
    XnorConfig,
)
from lowbit.quant.layers import in_features_of, is_hf_conv1d, out_features_of, quant_layer_from_float, set_submodule
from lowbit.quant.quantizers import (
    LSQ,
    BinaryActivation,
    BinaryWeight,
    SparseBinaryWeight,
    TernaryWeight,
    UniformActivation,
    UniformWeight,
)

# weight layers a recipe cannot rewrite: their weights are used functionally or have another layout
_UNSUPPORTED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear, nn.RNNBase)
# the float layers a recipe replaces (exact types: a subclass may have its own forward);
# transformers' Conv1D is recognised by ``is_hf_conv1d``
_TARGETS = (nn.Conv2d, nn.Conv1d, nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    build: Callable[[nn.Module, Any], dict]  # (float layer, config) -> QuantConv2d/QuantLinear kwargs
    config: type[QuantConfig] = QuantConfig  # the recipe's options
    binary_inputs: bool = False  # the layers' inputs are binarised: ReLU -> Hardtanh(-1, 1)
    weight_bits: float = 32.0  # bits per quantized weight when packed
    finish: Callable[[nn.Module, Any], None] | None = None  # (quantized copy, config): model-wide changes

    @property
    def defaults(self) -> dict:
        """The recipe's own options and their defaults (those of ``quantize`` itself left out)."""
        common = {f.name for f in dataclasses.fields(QuantConfig)}
        return {f.name: f.default for f in dataclasses.fields(self.config) if f.name not in common}

    @property
    def distill(self) -> float:
        """Default weight of representation distillation from a float teacher (DIR-Net: 1)."""
        return next(f.default for f in dataclasses.fields(self.config) if f.name == "distill")

    def make_config(self, overrides: dict) -> QuantConfig:
        """The config ``quantize(model, name, **overrides)`` means."""
        allowed = sorted(f.name for f in dataclasses.fields(self.config))
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise TypeError(f"recipe {self.name!r} has no option(s) {unknown}; its options are {allowed}")
        return self.config(**overrides)

    def options(self, overrides: dict) -> dict:
        """{option: value} of the config ``overrides`` make (validated)."""
        return self.make_config(overrides).options()


class RecipeRegistry(dict):
    """Recipe name -> :class:`Recipe`. Recipes that live outside ``lowbit.quant`` (lowbit's own
    ``smartdeal`` in ``lowbit.decompose``, or another package's) are declared as entry points
    in the group ``lowbit.recipes`` (``name = "package.module"``) and imported on the first
    lookup or listing, so ``quantize(model, "smartdeal")`` works without importing the module
    first and ``lowbit.quant`` imports nothing from the packages above it."""

    GROUP = "lowbit.recipes"

    def __init__(self) -> None:
        super().__init__()
        self._loaded = False

    def load_plugins(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: a plugin's own register_recipe call looks names up here
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.GROUP):
            if ep.name in dict.keys(self):
                continue
            try:
                ep.load()
            except Exception as e:  # a broken plugin must not take the built-in recipes down with it
                warnings.warn(f"recipe {ep.name!r} from entry point {ep.value!r} could not be loaded: "
                              f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=3)

    def __getitem__(self, name: str) -> Recipe:
        self.load_plugins()
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return super().__contains__(name)

    def get(self, name, default=None):
        self.load_plugins()
        return super().get(name, default)

    def __iter__(self):
        self.load_plugins()
        return super().__iter__()

    def __len__(self) -> int:
        self.load_plugins()
        return super().__len__()

    def keys(self):
        self.load_plugins()
        return super().keys()

    def values(self):
        self.load_plugins()
        return super().values()

    def items(self):
        self.load_plugins()
        return super().items()


RECIPES: RecipeRegistry = RecipeRegistry()
CONFIGS: dict[type[QuantConfig], Recipe] = {}


def _config_from_defaults(name: str, defaults: dict, distill: float) -> type[QuantConfig]:
    """A config type for a recipe registered with a defaults dict (its fields are not validated)."""
    cls_name = "".join(p.capitalize() for p in name.replace("_", "-").split("-")) + "Config"
    fields = [(k, Any, dataclasses.field(default=v)) for k, v in defaults.items()]
    fields.append(("distill", float, dataclasses.field(default=distill)))
    return dataclasses.make_dataclass(cls_name, fields, bases=(QuantConfig,), frozen=True, kw_only=True)


def register_recipe(name: str, description: str, defaults: dict | None = None, *,
                    config: type[QuantConfig] | None = None, distill: float = 0.0, **flags):
    """Register the decorated ``build(layer, config) -> quantizer kwargs`` as recipe ``name``.

    ``config``: the recipe's config type (a frozen :class:`QuantConfig` subclass; its ``distill``
    default is the recipe's). Without it, ``defaults`` ({option: default}) makes an unvalidated
    one, and ``build`` (and ``finish``) get the options as a dict, as recipes written before
    configs expect. ``flags``: ``binary_inputs``, ``weight_bits``, ``finish``."""
    def deco(build):
        cfg, fn, finish = config, build, flags.pop("finish", None)
        if cfg is None:
            cfg = _config_from_defaults(name, defaults or {}, distill)
            fn = lambda layer, c: build(layer, c.options())  # noqa: E731
            if finish is not None:
                finish_dict = finish
                finish = lambda model, c: finish_dict(model, c.options())  # noqa: E731
        elif defaults or distill:
            raise TypeError(f"register_recipe({name!r}): with config=, set defaults (and distill) as its fields")
        if not (isinstance(cfg, type) and issubclass(cfg, QuantConfig)):
            raise TypeError(f"register_recipe({name!r}): config must be a QuantConfig subclass, got {cfg!r}")
        rec = Recipe(name, description, fn, cfg, finish=finish, **flags)
        old = dict.get(RECIPES, name)
        if old is not None:
            CONFIGS.pop(old.config, None)
        RECIPES[name] = rec
        CONFIGS[cfg] = rec
        cfg.recipe = name
        return build

    return deco


def _channels(layer: nn.Module) -> tuple[int, bool]:
    return in_features_of(layer), isinstance(layer, (nn.Conv1d, nn.Conv2d))


@register_recipe("bnn", "QNN/BNN: weights and inputs sign(), clipped straight-through estimator", config=BnnConfig,
                 binary_inputs=True, weight_bits=1)
def _bnn(layer, c: BnnConfig):
    return dict(weight_quantizer=BinaryWeight(scale="none", estimator="clipped"), input_quantizer=BinaryActivation(estimator="clipped"))


@register_recipe("qnn", "QNN/DoReFa: k-bit weights, k-bit inputs on [0, 1], k-bit stochastic gradients", config=QnnConfig,
                 weight_bits=2)
def _qnn(layer, c: QnnConfig):
    return dict(weight_quantizer=UniformWeight(c.w_bits), input_quantizer=UniformActivation(c.a_bits), grad_bits=c.g_bits)


@register_recipe("bwn", "Binary-Weight-Network: alpha_c * sign(w), float inputs", config=BwnConfig, weight_bits=1)
def _bwn(layer, c: BwnConfig):
    return dict(weight_quantizer=BinaryWeight(scale="mean", estimator="ste"))


@register_recipe("xnor", "XNOR-Net: alpha_c * sign(w), sign inputs scaled by K (mean |x| over channels, box-filtered)",
                 config=XnorConfig, binary_inputs=True, weight_bits=1)
def _xnor(layer, c: XnorConfig):
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and any(d != 1 for d in layer.dilation):
        raise ValueError("xnor: XNOR-Net's input scaling K is defined for dilation 1 only")
    return dict(weight_quantizer=BinaryWeight(scale="mean", estimator="ste"),
                input_quantizer=BinaryActivation(estimator="clipped", xnor_scale=True))


@register_recipe("fda", "FDA-BNN: sign with the Fourier-series gradient and a noise adaptation module", config=FdaConfig,
                 binary_inputs=True, weight_bits=1)
def _fda(layer, c: FdaConfig):
    """``estimator="ste"`` with ``noise_adaptation=False`` is the paper's STE baseline (same scales)."""
    ch, conv = _channels(layer)
    fourier = dict(estimator=c.estimator, omega=c.omega, terms=c.terms)
    return dict(weight_quantizer=BinaryWeight(scale="mean", **fourier),
                input_quantizer=BinaryActivation(noise_channels=ch if c.noise_adaptation else None, noise_conv=conv, **fourier))


@register_recipe("dirnet", "DIR-Net: information-maximizing binarization (balanced, standardised weights, 2^n scale), "
                 "two-stage tanh estimator, representation distillation from a float teacher",
                 config=DirNetConfig, binary_inputs=True, weight_bits=1)
def _dirnet(layer, c: DirNetConfig):
    dte = dict(estimator="tanh", t_min=c.t_min, t_max=c.t_max)
    return dict(weight_quantizer=BinaryWeight(scale="pow2", standardize=True, **dte), input_quantizer=BinaryActivation(**dte))


@register_recipe("sbnn", "Sparse binary: 1-bit weights with a target share on the sparse value ({beta_c, alpha_c}; "
                 "domain='01' for {0, alpha_c}), sign inputs", config=SbnnConfig, binary_inputs=True, weight_bits=1)
def _sbnn(layer, c: SbnnConfig):
    return dict(weight_quantizer=SparseBinaryWeight(c.sparsity, c.domain), input_quantizer=BinaryActivation(estimator="clipped"))


@register_recipe("ternary", "naive ternary (TWN): threshold 0.7 mean|w|, float inputs", config=TwnConfig, weight_bits=2)
def _twn(layer, c: TwnConfig):
    return dict(weight_quantizer=TernaryWeight("twn"))


@register_recipe("ternary-hq", "HQ: hyperspherical (L2-normalised) weights, gradual pruning, re-initialisation, ternary",
                 config=HqConfig, weight_bits=2)
def _hq(layer, c: HqConfig):
    return dict(weight_quantizer=TernaryWeight("hq", sparsity=c.sparsity, float_phase=c.float_phase))


@register_recipe("ternary-ptq", "PTQ: L2 normalisation, pruning, weight decay toward the grid, symmetric ternary",
                 config=TernaryPtqConfig, weight_bits=2)
def _ptq(layer, c: TernaryPtqConfig):
    return dict(weight_quantizer=TernaryWeight("ptq", sparsity=c.sparsity, decay=c.decay))


def _lsq(layer, c: LsqConfig):
    return dict(weight_quantizer=LSQ(c.bits, signed=True, per_channel=True, channels=out_features_of(layer)),
                input_quantizer=LSQ(c.bits, signed=None))


def _switch_batchnorm(qmodel: nn.Module, c: VerticalConfig) -> None:
    from lowbit.quant.vertical import switch_batchnorm

    if c.switch_bn:
        switch_batchnorm(qmodel, c.bits)


@register_recipe("vertical", "vertical-layered: weights stored once at 8 bits, every width 8..2 by cascade "
                 "downsampling (set_bits / use_bits switch it), a learned input step and BatchNorm statistics per width",
                 config=VerticalConfig, weight_bits=8, finish=_switch_batchnorm)
def _vertical(layer, c: VerticalConfig):
    from lowbit.quant.vertical import VerticalActivation, VerticalWeight

    return dict(weight_quantizer=VerticalWeight(c.bits), input_quantizer=VerticalActivation(c.bits))


register_recipe("int8", "8-bit weights (per channel) and inputs, learned step size (LSQ)", config=Int8Config, weight_bits=8)(_lsq)
register_recipe("int4", "4-bit weights (per channel) and inputs, learned step size (LSQ)", config=Int4Config, weight_bits=4)(_lsq)


def recipe_for(config: QuantConfig) -> Recipe:
    """The recipe registered for ``type(config)``."""
    rec = CONFIGS.get(type(config))
    if rec is None:
        raise TypeError(f"no recipe is registered for {type(config).__name__}: register one with "
                        f"@register_recipe(name, description, config={type(config).__name__})")
    return rec


def get_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: choose one of {sorted(RECIPES)}")
    return RECIPES[recipe]


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_target(m: nn.Module) -> bool:
    return type(m) in _TARGETS or is_hf_conv1d(m)


def _fix(rec: Recipe, names: list[str]) -> str:
    return f"keep {'it' if len(names) == 1 else 'them'} float with quantize(model, {rec.name!r}, skip={names!r})"


def quantize(model: nn.Module, recipe: QuantConfig | str | Recipe, **overrides) -> nn.Module:
    """A quantized copy of ``model`` (``model`` itself is not modified).

    ``recipe``: a config (``XnorConfig()``, ``SbnnConfig(sparsity=0.9)``, any registered one), or
    the shortcut: a recipe name (or :class:`Recipe`) with ``overrides`` as the config's fields
    (``quantize(model, "sbnn", sparsity=0.9)`` is ``quantize(model, SbnnConfig(sparsity=0.9))``).

    Every nn.Conv2d, nn.Conv1d, nn.Linear and ``transformers`` Conv1D (GPT-2) becomes a
    QuantConv2d / QuantConv1d / QuantLinear with the recipe's quantizers, except the first and the
    last (``keep_first_last=True``, as the papers do) and the modules named in ``skip`` (a name
    skips everything under it). nn.MultiheadAttention is first rewritten with separate q/k/v
    projections (``SplitMultiheadAttention``), which are then quantized like any linear.
    ``embeddings=True`` also quantizes nn.Embedding weights (one scale per row; tied weights stay
    tied). Recipes that binarise inputs replace nn.ReLU by nn.Hardtanh(-1, 1). ``overrides`` set
    config fields (``bits=4``, ``sparsity=0.9``, ...). Raises ValueError naming any layer the
    recipe cannot handle, its type and the ``skip=`` that keeps it float."""
    if isinstance(recipe, QuantConfig):
        if overrides:
            raise TypeError(f"quantize(model, {type(recipe).__name__}(...)) takes its options from the config; "
                            f"set {sorted(overrides)} there instead")
        rec, config = recipe_for(recipe), recipe
    else:
        rec = get_recipe(recipe)
        config = rec.make_config(overrides)
    skip = config.skip
    qmodel = copy.deepcopy(model)
    bad = [(n, type(m).__name__) for n, m in qmodel.named_modules() if isinstance(m, _UNSUPPORTED) and not _under(n, skip)]
    if bad:
        names = ", ".join(f"{n!r} ({t})" for n, t in bad)
        raise ValueError(f"quantize(recipe={rec.name!r}): cannot quantize {names}: lowbit quantizes nn.Conv2d, "
                         f"nn.Conv1d, nn.Linear, transformers Conv1D, nn.Embedding and nn.MultiheadAttention; "
                         f"{_fix(rec, [n for n, _ in bad])}")
    for name, m in list(qmodel.named_modules()):
        if isinstance(m, nn.MultiheadAttention) and not _under(name, skip):
            try:
                set_submodule(qmodel, name, SplitMultiheadAttention.from_mha(m))
            except ValueError as e:
                raise ValueError(f"quantize(recipe={rec.name!r}): layer {name!r} ({type(m).__name__}): {e}; "
                                 f"{_fix(rec, [name])}") from None
    targets = [n for n, m in qmodel.named_modules() if _is_target(m) and not _under(n, skip)]
    if config.keep_first_last and len(targets) >= 1:
        targets = targets[1:-1]
    if config.embeddings:
        targets += [n for n, m in qmodel.named_modules() if type(m) is nn.Embedding and not _under(n, skip)]
    if not targets:
        raise ValueError(f"quantize(recipe={rec.name!r}): the model has no nn.Conv2d/nn.Linear layer left to quantize "
                         f"(nor nn.Conv1d / Conv1D; keep_first_last={config.keep_first_last}, skip={list(skip)})")
    for name in targets:
        layer = qmodel.get_submodule(name)
        try:
            kwargs = rec.build(layer, config)
            if isinstance(layer, nn.Embedding):  # a lookup: only its weights are quantized
                kwargs = {"weight_quantizer": kwargs.get("weight_quantizer")}
            q = quant_layer_from_float(layer, **kwargs)
            if not is_hf_conv1d(layer):  # the copy's own Parameters: weights tied elsewhere stay tied
                q.weight = layer.weight
                if not isinstance(layer, nn.Embedding):
                    q.bias = layer.bias
            set_submodule(qmodel, name, q)
        except (ValueError, TypeError) as e:
            raise ValueError(f"quantize(recipe={rec.name!r}): layer {name!r} ({type(layer).__name__}): {e}; "
                             f"{_fix(rec, [name])}") from None
    if rec.binary_inputs:
        for name, m in list(qmodel.named_modules()):
            if type(m) in (nn.ReLU, nn.ReLU6) and name:
                set_submodule(qmodel, name, nn.Hardtanh(-1.0, 1.0))
    if rec.finish is not None:
        rec.finish(qmodel, config)
    qmodel.lowbit_recipe = {"name": rec.name, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in config.options().items()}}
    return qmodel
