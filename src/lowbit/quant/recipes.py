"""Recipes: named ways to turn a float model into a quantized one (``quantize(model, "xnor")``).

A recipe is a small registered record (as torchao registers one handler per config): its
defaults, the function that builds each layer's quantizers, and whether the model's ReLUs must
become hardtanh (a ReLU output is never negative, so sign() of it would be all +1).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from lowbit.quant.attention import SplitMultiheadAttention
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
# embeddings: also quantize nn.Embedding weights (one scale per row; lookups need no input quantizer)
_COMMON = {"keep_first_last": True, "skip": (), "embeddings": False}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    build: Callable[[nn.Module, dict], dict]  # (float layer, options) -> QuantConv2d/QuantLinear kwargs
    defaults: dict = field(default_factory=dict)
    binary_inputs: bool = False  # the layers' inputs are binarised: ReLU -> Hardtanh(-1, 1)
    distill: float = 0.0  # weight of representation distillation from a float teacher (DIR-Net)
    weight_bits: float = 32.0  # bits per quantized weight when packed
    finish: Callable[[nn.Module, dict], None] | None = None  # (quantized copy, options): model-wide changes

    def options(self, overrides: dict) -> dict:
        allowed = {**_COMMON, **self.defaults, "distill": self.distill}
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise TypeError(f"recipe {self.name!r} has no option(s) {unknown}; its options are {sorted(allowed)}")
        return {**allowed, **overrides}


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, defaults: dict | None = None, **flags):
    def deco(build):
        RECIPES[name] = Recipe(name, description, build, defaults or {}, **flags)
        return build

    return deco


def _channels(layer: nn.Module) -> tuple[int, bool]:
    return in_features_of(layer), isinstance(layer, (nn.Conv1d, nn.Conv2d))


@register_recipe("bnn", "QNN/BNN: weights and inputs sign(), clipped straight-through estimator", binary_inputs=True, weight_bits=1)
def _bnn(layer, o):
    return dict(weight_quantizer=BinaryWeight(scale="none", estimator="clipped"), input_quantizer=BinaryActivation(estimator="clipped"))


@register_recipe("qnn", "QNN/DoReFa: k-bit weights, k-bit inputs on [0, 1], k-bit stochastic gradients",
                 {"w_bits": 2, "a_bits": 2, "g_bits": 6}, weight_bits=2)
def _qnn(layer, o):
    return dict(weight_quantizer=UniformWeight(o["w_bits"]), input_quantizer=UniformActivation(o["a_bits"]), grad_bits=o["g_bits"])


@register_recipe("bwn", "Binary-Weight-Network: alpha_c * sign(w), float inputs", weight_bits=1)
def _bwn(layer, o):
    return dict(weight_quantizer=BinaryWeight(scale="mean", estimator="ste"))


@register_recipe("xnor", "XNOR-Net: alpha_c * sign(w), sign inputs scaled by K (mean |x| over channels, box-filtered)",
                 binary_inputs=True, weight_bits=1)
def _xnor(layer, o):
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and any(d != 1 for d in layer.dilation):
        raise ValueError("xnor: XNOR-Net's input scaling K is defined for dilation 1 only")
    return dict(weight_quantizer=BinaryWeight(scale="mean", estimator="ste"),
                input_quantizer=BinaryActivation(estimator="clipped", xnor_scale=True))


@register_recipe("fda", "FDA-BNN: sign with the Fourier-series gradient and a noise adaptation module",
                 {"omega": 0.1, "terms": 10, "noise_adaptation": True, "estimator": "fourier"}, binary_inputs=True, weight_bits=1)
def _fda(layer, o):
    """``estimator="ste"`` with ``noise_adaptation=False`` is the paper's STE baseline (same scales)."""
    ch, conv = _channels(layer)
    fourier = dict(estimator=o["estimator"], omega=o["omega"], terms=o["terms"])
    return dict(weight_quantizer=BinaryWeight(scale="mean", **fourier),
                input_quantizer=BinaryActivation(noise_channels=ch if o["noise_adaptation"] else None, noise_conv=conv, **fourier))


@register_recipe("dirnet", "DIR-Net: information-maximizing binarization (balanced, standardised weights, 2^n scale), "
                 "two-stage tanh estimator, representation distillation from a float teacher",
                 {"t_min": 0.1, "t_max": 10.0}, binary_inputs=True, distill=1.0, weight_bits=1)
def _dirnet(layer, o):
    dte = dict(estimator="tanh", t_min=o["t_min"], t_max=o["t_max"])
    return dict(weight_quantizer=BinaryWeight(scale="pow2", standardize=True, **dte), input_quantizer=BinaryActivation(**dte))


@register_recipe("sbnn", "Sparse binary: 1-bit weights with a target share on the sparse value ({beta_c, alpha_c}; "
                 "domain='01' for {0, alpha_c}), sign inputs", {"sparsity": 0.75, "domain": "general"}, binary_inputs=True, weight_bits=1)
def _sbnn(layer, o):
    return dict(weight_quantizer=SparseBinaryWeight(o["sparsity"], o["domain"]), input_quantizer=BinaryActivation(estimator="clipped"))


@register_recipe("ternary", "naive ternary (TWN): threshold 0.7 mean|w|, float inputs", weight_bits=2)
def _twn(layer, o):
    return dict(weight_quantizer=TernaryWeight("twn"))


@register_recipe("ternary-hq", "HQ: hyperspherical (L2-normalised) weights, gradual pruning, re-initialisation, ternary",
                 {"sparsity": 0.5, "float_phase": 0.25}, weight_bits=2)
def _hq(layer, o):
    return dict(weight_quantizer=TernaryWeight("hq", sparsity=o["sparsity"], float_phase=o["float_phase"]))


@register_recipe("ternary-ptq", "PTQ: L2 normalisation, pruning, weight decay toward the grid, symmetric ternary",
                 {"sparsity": 0.5, "decay": 1e-3}, weight_bits=2)
def _ptq(layer, o):
    return dict(weight_quantizer=TernaryWeight("ptq", sparsity=o["sparsity"], decay=o["decay"]))


def _lsq(bits):
    def build(layer, o):
        return dict(weight_quantizer=LSQ(o["bits"], signed=True, per_channel=True, channels=out_features_of(layer)),
                    input_quantizer=LSQ(o["bits"], signed=None))

    return build


def _switch_batchnorm(qmodel: nn.Module, o: dict) -> None:
    from lowbit.quant.vertical import switch_batchnorm

    if o["switch_bn"]:
        switch_batchnorm(qmodel, o["bits"])


@register_recipe("vertical", "vertical-layered: weights stored once at 8 bits, every width 8..2 by cascade "
                 "downsampling (set_bits / use_bits switch it), a learned input step and BatchNorm statistics per width",
                 {"bits": 8, "switch_bn": True}, weight_bits=8, finish=_switch_batchnorm)
def _vertical(layer, o):
    from lowbit.quant.vertical import VerticalActivation, VerticalWeight

    return dict(weight_quantizer=VerticalWeight(o["bits"]), input_quantizer=VerticalActivation(o["bits"]))


register_recipe("int8", "8-bit weights (per channel) and inputs, learned step size (LSQ)", {"bits": 8}, weight_bits=8)(_lsq(8))
register_recipe("int4", "4-bit weights (per channel) and inputs, learned step size (LSQ)", {"bits": 4}, weight_bits=4)(_lsq(4))


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


def quantize(model: nn.Module, recipe: str | Recipe, **overrides) -> nn.Module:
    """A quantized copy of ``model`` (``model`` itself is not modified).

    Every nn.Conv2d, nn.Conv1d, nn.Linear and ``transformers`` Conv1D (GPT-2) becomes a
    QuantConv2d / QuantConv1d / QuantLinear with the recipe's quantizers, except the first and the
    last (``keep_first_last=True``, as the papers do) and the modules named in ``skip`` (a name
    skips everything under it). nn.MultiheadAttention is first rewritten with separate q/k/v
    projections (``SplitMultiheadAttention``), which are then quantized like any linear.
    ``embeddings=True`` also quantizes nn.Embedding weights (one scale per row; tied weights stay
    tied). Recipes that binarise inputs replace nn.ReLU by nn.Hardtanh(-1, 1). ``overrides`` set
    recipe options (``bits=4``, ``sparsity=0.9``, ...). Raises ValueError naming any layer the
    recipe cannot handle, its type and the ``skip=`` that keeps it float."""
    rec = get_recipe(recipe)
    opts = rec.options(overrides)
    skip = tuple(opts["skip"])
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
    if opts["keep_first_last"] and len(targets) >= 1:
        targets = targets[1:-1]
    if opts["embeddings"]:
        targets += [n for n, m in qmodel.named_modules() if type(m) is nn.Embedding and not _under(n, skip)]
    if not targets:
        raise ValueError(f"quantize(recipe={rec.name!r}): the model has no nn.Conv2d/nn.Linear layer left to quantize "
                         f"(nor nn.Conv1d / Conv1D; keep_first_last={opts['keep_first_last']}, skip={list(skip)})")
    for name in targets:
        layer = qmodel.get_submodule(name)
        try:
            kwargs = rec.build(layer, opts)
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
        rec.finish(qmodel, opts)
    qmodel.lowbit_recipe = {"name": rec.name, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}}
    return qmodel
