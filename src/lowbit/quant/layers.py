"""QuantConv2d and QuantLinear: a float layer plus a weight quantizer, an input quantizer and an
optional gradient quantizer. The latent float weight is what the optimizer updates;
``quantized_weight()`` is the tensor the forward multiplies with."""
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
        y = op(xq, self.quantized_weight())
        scale = getattr(self.input_quantizer, "output_scale", None)
        k = scale(x, self) if scale is not None else None
        if k is not None:
            y = y * k
        if self.bias is not None:  # added after XNOR's scaling: the bias is not part of the binary product
            y = y + (self.bias if isinstance(self, nn.Linear) else self.bias.reshape(-1, 1, 1))
        return y if self.grad_quantizer is None else self.grad_quantizer(y)

    def set_progress(self, fraction: float) -> None:
        for q in (self.weight_quantizer, self.input_quantizer, self.grad_quantizer):
            if q is not None:
                q.set_progress(fraction, self.weight if q is self.weight_quantizer else None)

    def penalty(self) -> torch.Tensor | None:
        return None if self.weight_quantizer is None else self.weight_quantizer.penalty(self.weight)


class QuantConv2d(QuantMixin, nn.Conv2d):
    """nn.Conv2d whose forward is conv(input_quantizer(x), quantized_weight()); x: [N, C, H, W]."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant) -> "QuantConv2d":
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype, **quant)
        return q._copy_params_from(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_quant(x, lambda a, w: F.conv2d(a, w, None, self.stride, self.padding, self.dilation, self.groups))


class QuantLinear(QuantMixin, nn.Linear):
    """nn.Linear whose forward is linear(input_quantizer(x), quantized_weight()); x: [..., F]."""

    @classmethod
    def from_float(cls, lin: nn.Linear, **quant) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype, **quant)
        return q._copy_params_from(lin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_quant(x, lambda a, w: F.linear(a, w))


QUANT_LAYERS = (QuantConv2d, QuantLinear)


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


def quant_layer_from_float(layer: nn.Module, **quant) -> QuantConv2d | QuantLinear:
    """QuantConv2d.from_float or QuantLinear.from_float, whichever fits ``layer``."""
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    return cls.from_float(layer, **quant)
