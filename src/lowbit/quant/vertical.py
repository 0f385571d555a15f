"""Vertical-layered quantization: one model that runs at every bit-width from 8 down to 2.

Weights are held once as 8-bit integer codes per output channel (symmetric, scale
s_8 = max|w| / 127). Every lower width is derived from the next one up by cascade downsampling,
q_b = clamp(round(q_{b+1} / 2), -(2^(b-1) - 1), 2^(b-1) - 1) (halves rounded away from zero), with
the scale s_b = s_8 * 2^(8-b), so the widths share their most significant bits and switching
width costs nothing but the shifts. Each quantized layer's input has a learned step (LSQ) per width.

    qmodel = quantize(model, "vertical")              # every layer at 8 bits
    train_once(qmodel, train, test, objective="sum")  # one run, the loss of every width
    with use_bits(qmodel, 3): ...                     # or set_bits(qmodel, 3) / {layer: bits}
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.quantizers import LSQ, Quantizer, straight_through

STORE_BITS = 8
MIN_BITS = 2
WIDTHS = tuple(range(STORE_BITS, MIN_BITS - 1, -1))  # 8, 7, ..., 2
OBJECTIVES = ("sum", "weighted", "sample")


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _check_width(bits: int) -> int:
    if not isinstance(bits, int) or not MIN_BITS <= bits <= STORE_BITS:
        raise ValueError(f"vertical widths are integers {MIN_BITS}..{STORE_BITS}, got {bits!r}")
    return bits


def store_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit store of a weight [C_out, ...]: (int8 codes, float scale [C_out, 1, ...])."""
    scale = w.detach().abs().amax(tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / _qmax(STORE_BITS)
    codes = torch.clamp(torch.round(w.detach() / scale), -_qmax(STORE_BITS), _qmax(STORE_BITS))
    return codes.to(torch.int8), scale


def cascade(codes: torch.Tensor, bits: int, from_bits: int = STORE_BITS) -> torch.Tensor:
    """Integer codes of width ``bits`` from codes of width ``from_bits`` (>= bits) by repeated
    halving with rounding half away from zero, clamped to the symmetric range of each width."""
    _check_width(bits)
    q = codes.to(torch.int32)
    for b in range(from_bits - 1, bits - 1, -1):
        q = torch.sign(q) * ((q.abs() + 1) // 2)
        q = q.clamp(-_qmax(b), _qmax(b))
    return q


def decode(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Float weight of width ``bits`` from the 8-bit store."""
    return cascade(codes, bits).to(scale.dtype) * scale * 2 ** (STORE_BITS - bits)


class VerticalWeight(Quantizer):
    """The weight at the current width ``bits`` derived from its 8-bit store (straight-through
    gradient to the latent float weight). ``storage_bits`` is 8: one store serves every width."""

    def __init__(self, bits: int = STORE_BITS):
        super().__init__()
        self.bits = _check_width(bits)
        self.storage_bits = float(STORE_BITS)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, scale = store_codes(w)
        return straight_through(decode(codes, scale, self.bits), w)

    def num_scales(self, weight: torch.Tensor) -> int:
        return weight.shape[0]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, stored at {STORE_BITS}"


class VerticalActivation(Quantizer):
    """The input at the current width: one LSQ quantizer (learned step, sign decided on the first
    batch) per width 8..2, so each width keeps its own range."""

    def __init__(self, bits: int = STORE_BITS):
        super().__init__()
        self.bits = _check_width(bits)
        self.by_width = nn.ModuleDict({str(b): LSQ(b, signed=None) for b in WIDTHS})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.by_width[str(self.bits)](x)

    def num_scales(self, weight: torch.Tensor) -> int:
        return len(WIDTHS)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, a step per width"


class SwitchableBatchNorm2d(nn.Module):
    """BatchNorm2d with running statistics kept per width (the affine parameters are shared):
    activations at 2 bits do not have the statistics of those at 8, and one set of running
    statistics averaged over widths would fit none of them (any-precision networks do the same).
    ``follows`` names the conv whose width it takes in layer-by-layer ``set_bits``.
    x: [N, C, H, W]."""

    def __init__(self, bn: nn.BatchNorm2d, bits: int = STORE_BITS, follows: str | None = None):
        super().__init__()
        if not bn.affine or not bn.track_running_stats:
            raise ValueError("SwitchableBatchNorm2d needs an affine BatchNorm2d that tracks running statistics")
        self.bits, self.follows = _check_width(bits), follows
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.register_buffer("width_mean", bn.running_mean.detach().repeat(len(WIDTHS), 1))
        self.register_buffer("width_var", bn.running_var.detach().repeat(len(WIDTHS), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = STORE_BITS - self.bits
        # rows of the [widths, C] buffers are contiguous views: batch_norm updates them in place
        return F.batch_norm(x, self.width_mean[i], self.width_var[i], self.weight, self.bias, self.training,
                            0.1 if self.momentum is None else self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, bits={self.bits}, statistics per width"


def switch_batchnorm(model: nn.Module, bits: int = STORE_BITS) -> nn.Module:
    """Replace every BatchNorm2d of a vertical model by a SwitchableBatchNorm2d at width ``bits``
    (in place), each paired with the conv it follows when torch.fx can trace the model."""
    from lowbit.quant.layers import set_submodule
    from lowbit.quant.mixed import conv_bn_pairs

    try:
        follows = {bn: conv for conv, bn in conv_bn_pairs(model)}
    except Exception:  # untraceable: the BatchNorms switch with the whole model only
        follows = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            set_submodule(model, name, SwitchableBatchNorm2d(m, bits, follows=follows.get(name)))
    return model


_SWITCHED = (VerticalWeight, VerticalActivation, SwitchableBatchNorm2d)


def _vertical(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _SWITCHED)]


def _layer_of(name: str, module: nn.Module) -> str:
    if isinstance(module, SwitchableBatchNorm2d):
        return module.follows or name
    return name.rsplit(".", 1)[0]  # a quantizer's layer


def set_bits(model: nn.Module, bits: int | dict[str, int]) -> nn.Module:
    """Switch a vertical model to width ``bits`` (8..2), or layer by layer with {layer name: bits}
    (layers not named keep their width; a SwitchableBatchNorm2d follows its conv). Returns the model."""
    quantizers = _vertical(model)
    if not quantizers:
        raise ValueError("the model has no vertical quantizer: build it with quantize(model, 'vertical')")
    if isinstance(bits, dict):
        layers = {_layer_of(n, q) for n, q in quantizers}
        unknown = sorted(set(bits) - layers)
        if unknown:
            raise ValueError(f"set_bits: no vertical layer named {unknown}")
        for n, q in quantizers:
            layer = _layer_of(n, q)
            if layer in bits:
                q.bits = _check_width(bits[layer])
    else:
        _check_width(bits)
        for _, q in quantizers:
            q.bits = bits
    return model


def get_bits(model: nn.Module) -> dict[str, int]:
    """{layer name: width} of every vertical layer (from its weight quantizer)."""
    return {n.rsplit(".", 1)[0]: q.bits for n, q in _vertical(model) if isinstance(q, VerticalWeight)}


@contextmanager
def use_bits(model: nn.Module, bits: int | dict[str, int]):
    """Run the model at ``bits`` inside the block and restore the previous widths after it."""
    before = {n: q.bits for n, q in _vertical(model)}
    set_bits(model, bits)
    try:
        yield model
    finally:
        for n, q in _vertical(model):
            q.bits = before[n]


def once_loss(widths=WIDTHS, objective: str = "sum", weights: dict[int, float] | None = None, seed: int = 0):
    """The multi-objective loss of once-QAT, as a ``loss_fn(model, x, y)`` for ``train_quantized``:
    "sum" of the cross-entropies at every width, "weighted" sum with ``weights`` {width: weight}
    (default 1 each), or "sample": one width drawn at random per step (seeded). The model is left
    at the widest width."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown once-QAT objective {objective!r}: choose one of {OBJECTIVES}")
    widths = [_check_width(b) for b in widths]
    if not widths:
        raise ValueError("once-QAT needs at least one width")
    weights = {b: 1.0 for b in widths} if weights is None else weights
    missing = [b for b in widths if b not in weights]
    if objective == "weighted" and missing:
        raise ValueError(f"weights has no entry for width(s) {missing}")
    rng = random.Random(seed)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        chosen = [rng.choice(widths)] if objective == "sample" else widths
        total = x.new_zeros(())
        for b in chosen:
            set_bits(model, b)
            w = weights[b] if objective == "weighted" else 1.0
            total = total + w * F.cross_entropy(model(x), y)
        set_bits(model, max(widths))
        return total

    return loss_fn


def export_store(model: nn.Module) -> dict:
    """The one file for every width: the model's state with each vertical layer's weight replaced
    by its int8 codes and per-channel scales (``weight_codes``, ``weight_scale``)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in get_bits(model):
        layer = model.get_submodule(name)
        codes, scale = store_codes(layer.weight)
        state.pop(f"{name}.weight")
        state[f"{name}.weight_codes"], state[f"{name}.weight_scale"] = codes, scale
    return state


def load_store(model: nn.Module, state: dict, bits: int = STORE_BITS) -> nn.Module:
    """Load an ``export_store`` dict into a vertical model of the same architecture (its latent
    weights become the decoded 8-bit weights, so every width is reproduced exactly) and switch it
    to ``bits``."""
    state = dict(state)
    for name in get_bits(model):
        codes, scale = state.pop(f"{name}.weight_codes"), state.pop(f"{name}.weight_scale")
        state[f"{name}.weight"] = decode(codes, scale, STORE_BITS)
    model.load_state_dict(state)
    return set_bits(model, bits)
