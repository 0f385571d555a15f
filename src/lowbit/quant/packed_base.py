"""What every packed inference layer shares: the float layer's geometry (a conv's kernel, stride,
padding, dilation; a linear's sizes), the im2col rows of a conv input, and the stored-size count
``lowbit.quant.model_size`` reads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_out_size(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """A conv's output height and width for an h x w input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def im2col_rows(x: torch.Tensor, conv_args: dict) -> tuple[torch.Tensor, int, int]:
    """[N, C, H, W] -> rows [N * L, C * kh * kw] (zero padded), with the output height and width."""
    n, _, h, w = x.shape
    ho, wo = conv_out_size(h, w, conv_args["kernel_size"], conv_args["stride"], conv_args["padding"], conv_args["dilation"])
    cols = F.unfold(x, conv_args["kernel_size"], dilation=conv_args["dilation"], padding=conv_args["padding"],
                    stride=conv_args["stride"])  # [N, K, L]
    return cols.transpose(1, 2).reshape(n * ho * wo, -1), ho, wo


class PackedLayer(nn.Module):
    """Base of the packed layers: the replaced layer's geometry and bias (``copy_geometry``)."""

    def conv_args(self) -> dict:
        """The conv's kernel_size, stride, padding and dilation (each a pair)."""
        return {k: getattr(self, k) for k in ("kernel_size", "stride", "padding", "dilation")}

    def copy_geometry(self, layer: nn.Module) -> None:
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.out_features = layer.weight.shape[0]
        self.k = int(layer.weight[0].numel())
        if self.is_conv:
            if layer.groups != 1:
                raise ValueError(f"export: grouped convolutions (groups={layer.groups}) are not supported")
            self.kernel_size, self.stride = tuple(layer.kernel_size), tuple(layer.stride)
            self.padding, self.dilation = tuple(layer.padding), tuple(layer.dilation)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def stored_size(self) -> tuple[int, int]:
        """(bytes this layer stores, values of the float layer it replaces: weights + bias)."""
        stored = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return stored, self.out_features * self.k + (0 if self.bias is None else self.bias.numel())

    def finish(self, y2d: torch.Tensor, n: int, ho: int, wo: int) -> torch.Tensor:
        """Rows [N * H' * W', O] (+ bias) -> [N, O, H', W'] (channels-last memory) for a conv; as is for a linear."""
        if self.bias is not None:
            y2d = y2d + self.bias
        if not self.is_conv:
            return y2d
        return y2d.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)
