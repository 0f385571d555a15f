"""QuantConv2d, QuantConv1d, QuantLinear and QuantEmbedding: a float layer plus a weight
quantizer, an input quantizer and an optional gradient quantizer. The latent float weight is what
the optimizer updates; ``quantized_weight()`` is the tensor the forward multiplies with.

Layers of real models map onto them: ``transformers``' ``Conv1D`` (GPT-2's projections, weight
stored transposed as [in, out]) becomes a QuantLinear holding the weight as [out, in], so the
per-output-channel scales of every quantizer apply unchanged; nn.Embedding becomes a
QuantEmbedding that shares (not copies) the float weight, so a tied LM head stays tied."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.quantizers import GradientQuantizer, Quantizer


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root`` by ``module``."""
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class QuantMixin:
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    grad_quantizer: GradientQuantizer | None

    def __init__(self, *args, weight_quantizer: Quantizer | None = None, input_quantizer: Quantizer | None = None,
                 grad_bits: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)  # nn.Conv2d / nn.Linear
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.grad_quantizer = GradientQuantizer(grad_bits) if grad_bits else None

    def _copy_params_from(self, layer: nn.Module):
        """Take the float layer's weight and bias; returns self."""
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.bias.copy_(layer.bias)
        return self

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (same shape as ``weight``)."""
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)

    def _apply_quant(self, x: torch.Tensor, op) -> torch.Tensor:
        xq = x if self.input_quantizer is None else self.input_quantizer(x)
        factors = getattr(self.weight_quantizer, "factors", None)
        if factors is not None and getattr(self.input_quantizer, "binary_input", False):
            # sign inputs x sign weights: the product is an exact integer in float (as in the packed
            # kernels), then scaled per output channel: export gives the same bits, not only close
            b, alpha = factors(self.weight)
            y = op(xq, b)
            if alpha is not None:
                y = y * alpha.reshape(-1, *([1] * (y.dim() - 2))) if y.dim() > 2 and not isinstance(self, nn.Linear) \
                    else y * alpha.reshape(-1)
        else:
            y = op(xq, self.quantized_weight())
        scale = getattr(self.input_quantizer, "output_scale", None)
        k = scale(x, self) if scale is not None else None
        if k is not None:
            y = y * k
        if self.bias is not None:  # added after XNOR's scaling: the bias is not part of the binary product
            y = y + (self.bias if isinstance(self, nn.Linear) else self.bias.reshape(-1, *([1] * (y.dim() - 2))))
        return y if self.grad_quantizer is None else self.grad_quantizer(y)

    def set_progress(self, fraction: float) -> None:
        for q in (self.weight_quantizer, self.input_quantizer, self.grad_quantizer):
            if q is not None:
                q.set_progress(fraction, self.weight if q is self.weight_quantizer else None)

    def penalty(self) -> torch.Tensor | None:
        return None if self.weight_quantizer is None else self.weight_quantizer.penalty(self.weight)


def _conv_from_float(cls, conv: nn.Module, quant: dict) -> nn.Module:
    """A quantized ``cls`` (QuantConv1d / QuantConv2d) with ``conv``'s geometry and parameters."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"{cls.__name__} supports padding_mode='zeros' only, got {conv.padding_mode!r}")
    q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype, **quant)
    return q._copy_params_from(conv)


class QuantConv2d(QuantMixin, nn.Conv2d):
    """nn.Conv2d whose forward is conv(input_quantizer(x), quantized_weight()); x: [N, C, H, W]."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant) -> "QuantConv2d":
        return _conv_from_float(cls, conv, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_quant(x, lambda a, w: F.conv2d(a, w, None, self.stride, self.padding, self.dilation, self.groups))


class QuantConv1d(QuantMixin, nn.Conv1d):
    """nn.Conv1d whose forward is conv1d(input_quantizer(x), quantized_weight()); x: [N, C, L]."""

    @classmethod
    def from_float(cls, conv: nn.Conv1d, **quant) -> "QuantConv1d":
        if isinstance(conv.padding, str):
            raise ValueError(f"QuantConv1d needs a numeric padding, got padding={conv.padding!r}")
        return _conv_from_float(cls, conv, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_quant(x, lambda a, w: F.conv1d(a, w, None, self.stride, self.padding, self.dilation, self.groups))


class QuantLinear(QuantMixin, nn.Linear):
    """nn.Linear whose forward is linear(input_quantizer(x), quantized_weight()); x: [..., F]."""

    @classmethod
    def from_float(cls, lin: nn.Module, **quant) -> "QuantLinear":
        """From an nn.Linear, or from ``transformers``' Conv1D (weight [in, out], stored here transposed)."""
        fin, fout = in_features_of(lin), out_features_of(lin)
        q = cls(fin, fout, lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype, **quant)
        if is_hf_conv1d(lin):
            with torch.no_grad():
                q.weight.copy_(lin.weight.T)
                if lin.bias is not None:
                    q.bias.copy_(lin.bias)
            return q
        return q._copy_params_from(lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_quant(x, lambda a, w: F.linear(a, w))


class QuantEmbedding(QuantMixin, nn.Embedding):
    """nn.Embedding whose lookup reads quantized_weight() (one scale per row for per-channel
    quantizers); ids: [...] int -> [..., D]. Inputs are indices: there is no input quantizer."""

    @classmethod
    def from_float(cls, emb: nn.Embedding, weight_quantizer: Quantizer | None = None, **_) -> "QuantEmbedding":
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("QuantEmbedding supports max_norm=None and sparse=False only")
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, scale_grad_by_freq=emb.scale_grad_by_freq,
                _weight=emb.weight, weight_quantizer=weight_quantizer)  # the same Parameter: ties stay tied
        q.weight = emb.weight
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.quantized_weight(), self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)


QUANT_LAYERS = (QuantConv2d, QuantConv1d, QuantLinear, QuantEmbedding)


def is_hf_conv1d(m: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's projections: a linear layer whose weight is
    [in, out]), recognised without importing transformers."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None \
        and m.weight.dim() == 2


def in_features_of(layer: nn.Module) -> int:
    """Input channels / features of a conv, linear, Conv1D or embedding (its row width)."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return layer.in_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Embedding):
        return layer.embedding_dim
    if is_hf_conv1d(layer):
        return layer.weight.shape[0]
    raise TypeError(f"{type(layer).__name__} is not a weight layer lowbit knows")


def out_features_of(layer: nn.Module) -> int:
    """Output channels / features (the per-channel scale count); an embedding's rows."""
    if is_hf_conv1d(layer):
        return layer.weight.shape[1]
    return layer.weight.shape[0]


def quant_layers(model: nn.Module):
    """(name, layer) for every quantized layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def set_progress(model: nn.Module, fraction: float) -> None:
    """Tell every quantized layer how far training is (0..1): schedules (DIR-Net, HQ, FDA) follow it."""
    for _, m in quant_layers(model):
        m.set_progress(fraction)


def penalty(model: nn.Module) -> torch.Tensor | None:
    """Sum of the methods' extra loss terms (PTQ's weight decay toward the ternary grid), or None."""
    terms = [p for _, m in quant_layers(model) if (p := m.penalty()) is not None]
    return torch.stack(terms).sum() if terms else None


def quant_layer_from_float(layer: nn.Module, **quant) -> nn.Module:
    """QuantConv2d / QuantConv1d / QuantLinear / QuantEmbedding ``from_float``, whichever fits
    ``layer`` (an nn.Linear or a transformers Conv1D becomes a QuantLinear)."""
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d.from_float(layer, **quant)
    if isinstance(layer, nn.Conv1d):
        return QuantConv1d.from_float(layer, **quant)
    if isinstance(layer, nn.Embedding):
        return QuantEmbedding.from_float(layer, **quant)
    if isinstance(layer, nn.Linear) or is_hf_conv1d(layer):
        return QuantLinear.from_float(layer, **quant)
    raise TypeError(f"lowbit has no quantized form of {type(layer).__name__}")
