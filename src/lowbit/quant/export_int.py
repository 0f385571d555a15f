"""Integer inference layers for k-bit (2..8) weights: the int8 / int4 recipes (LSQ) and
post-training quantized models (``ptq``: RTN, AdaRound, AQuant).

Weights are stored as signed integer codes with one float32 scale per output channel (int8, or
two 4-bit codes per byte when the width is 4 or less). Inputs quantized to at most 8 bits are
turned into int8 codes on the fly, x_q = a * c + b (a the step; b the offset of an asymmetric
or unsigned range), and the product runs as an integer GEMM (``lowbit.kernels.int8.int_matmul``,
``torch._int_mm``):

    y = s_w * (a * (C @ Wq^T) + b * (V @ Wq^T)) + bias

with V the 0/1 pattern of taps that read the image (not the zero padding; all ones for a linear
layer), so the result is the fake-quantized layer's up to float rounding. Layers whose inputs
stay float (weight-only) decode their weights once and run the float op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.int8 import int_matmul, pack_int4, unpack_int4
from lowbit.quant.packed_base import PackedLayer, conv_out_size
from lowbit.quant.quantizers import LSQ, BorderQuantizer, FixedUniform


def layer_weight_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(int8 codes [O, ...], float32 scale [O], bits) of a quantized layer's weight, or raises
    ValueError when its weights are not k-bit codes times a per-channel scale."""
    wq = layer.weight_quantizer
    w = layer.weight.detach()
    if isinstance(wq, LSQ):
        if not wq.per_channel:
            raise ValueError("LSQ weights with one step per tensor")
        s = wq.step.detach().abs() + 1e-12
        lo, hi = wq._range()
        shape = (-1,) + (1,) * (w.dim() - 1)
        codes = torch.round(torch.clamp(w / s.reshape(shape), lo, hi))
        return codes.to(torch.int8), s.float(), wq.bits
    bits = getattr(layer, "weight_bits", None)
    scale = getattr(layer, "weight_scale", None)
    if wq is None and bits is not None and scale is not None and bits <= 8:  # ptq: weights baked on the grid
        shape = (-1,) + (1,) * (w.dim() - 1)
        codes = torch.round(w / scale.reshape(shape))
        return codes.to(torch.int8), scale.float(), bits
    raise ValueError(f"{type(wq).__name__ if wq is not None else 'float'} weights")


def _input_codes(iq, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(int8 codes c, a, b) with the fake-quantized input equal to a * c + b. The codes are the
    quantizer's own (same operations in the same order, so the same roundings); in-place on one
    float work tensor, since this pass over the activations is what an integer layer pays on
    top of its GEMM."""
    if isinstance(iq, LSQ):
        s = float(iq.step.detach().abs()) + 1e-12
        lo, hi = iq._range()
        v = torch.clamp(x / s, lo, hi).round_()
        if hi > 127:  # unsigned 8 bits: shift into int8
            return v.sub_(128).to(torch.int8), s, 128 * s
        return v.to(torch.int8), s, 0.0
    n = 2**iq.bits - 1
    scale_t = (iq.hi - iq.lo).clamp_min(1e-12) / n  # as FixedUniform computes it
    lo, hi, scale = float(iq.lo), float(iq.hi), float(scale_t)
    v = torch.clamp(x, lo, hi).sub_(iq.lo).div_(scale_t)
    if isinstance(iq, BorderQuantizer):
        low = torch.floor(v)
        q = torch.clamp(low + (v - low >= iq.border(x)).to(x.dtype), 0, n)
    else:
        q = v.round_()
    if n > 127:
        return q.sub_(128).to(torch.int8), scale, lo + 128 * scale
    return q.to(torch.int8), scale, lo


def int_exportable(layer: nn.Module) -> bool:
    """Whether ``layer`` has k-bit (<= 8) weight codes and an input that is float or quantized
    to at most 8 bits by LSQ / FixedUniform / BorderQuantizer."""
    try:
        layer_weight_codes(layer)
    except ValueError:
        return False
    iq = layer.input_quantizer
    return iq is None or (isinstance(iq, (LSQ, FixedUniform)) and iq.bits <= 8 and (not isinstance(iq, LSQ) or not iq.per_channel))


class PackedIntLayer(PackedLayer):
    """A conv (1d/2d) or linear layer with integer weight codes and per-channel scales; integer
    GEMM on int8 input codes when the input is quantized, float op on decoded weights otherwise.
    Linear: x [..., F] -> [..., O]; Conv2d: [N, C, H, W] -> [N, O, H', W']; Conv1d: [N, C, L] -> [N, O, L']."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        codes, scale, bits = layer_weight_codes(layer)
        self.kind = "conv2d" if isinstance(layer, nn.Conv2d) else "conv1d" if isinstance(layer, nn.Conv1d) else "linear"
        if self.kind != "linear":
            if layer.groups != 1:
                raise ValueError(f"grouped convolutions (groups={layer.groups}) have no integer form here")
            one = (lambda t: (1,) + tuple(t)) if self.kind == "conv1d" else tuple  # conv1d runs as a 1 x L conv2d
            self.kernel_size, self.stride = one(layer.kernel_size), one(layer.stride)
            self.padding, self.dilation = (((0,) + tuple(layer.padding)) if self.kind == "conv1d" else tuple(layer.padding)), \
                one(layer.dilation)
        self.weight_shape = tuple(codes.shape)
        self.bits, self.out_features, self.k = bits, codes.shape[0], int(codes[0].numel())
        flat = codes.reshape(self.out_features, -1)  # (C, kh, kw): the order F.unfold gathers taps in
        self.register_buffer("weight_codes", pack_int4(flat) if bits <= 4 else flat.clone())
        self.register_buffer("weight_scale", scale.reshape(-1).clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.input_quantizer = layer.input_quantizer
        if self.input_quantizer is not None:
            self.input_quantizer.requires_grad_(False)
        self._codes: torch.Tensor | None = None
        self._corr: dict = {}

    def codes(self) -> torch.Tensor:
        """int8 weight codes [O, K] (unpacked once, not saved)."""
        if self._codes is None:
            c = self.weight_codes
            self._codes = unpack_int4(c, self.k) if self.bits <= 4 else c
        return self._codes

    def _load_from_state_dict(self, *args, **kwargs):
        self._codes, self._corr = None, {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _valid_sum(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """[L, O]: sum of each filter's codes over the taps that read the image (not the padding)."""
        if shape not in self._corr:
            ones = torch.ones(1, *shape)
            valid = F.unfold(ones, **self.conv_args())[0].T  # [L, K]
            self._corr[shape] = valid @ self.codes().float().T
        return self._corr[shape]

    def _row_sums(self) -> torch.Tensor:
        """[O]: each output channel's sum of weight codes (the offset b's share, cached)."""
        if "rows" not in self._corr:
            self._corr["rows"] = self.codes().float().sum(1)
        return self._corr["rows"]

    def _epilogue(self, acc: torch.Tensor, a: float, shift: torch.Tensor | None) -> torch.Tensor:
        """s_w * (a * acc + shift) + bias for an int32 accumulator [..., O], in two passes: the
        per-channel factor a * s_w and the constant s_w * shift + bias are folded first."""
        y = acc.to(torch.float32).mul_(a * self.weight_scale)
        const = None if shift is None else shift * self.weight_scale
        if self.bias is not None:
            const = self.bias if const is None else const + self.bias
        return y if const is None else y.add_(const)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.kind == "conv1d":
            return self._forward_conv(x.unsqueeze(2)).squeeze(2)
        if self.kind == "conv2d":
            return self._forward_conv(x)
        lead = x.shape[:-1]
        if self.input_quantizer is None:
            return F.linear(x, self._float_weight(dtype), self.bias)
        c, a, b = _input_codes(self.input_quantizer, x.reshape(-1, x.shape[-1]))
        y = self._epilogue(int_matmul(c, self.codes()), a, b * self._row_sums() if b else None)
        return y.to(dtype).reshape(*lead, -1)

    def _float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The decoded weight [O, K] (weight-only layers; cached per dtype)."""
        key = ("w", dtype)
        if key not in self._corr:
            self._corr[key] = (self.codes().float() * self.weight_scale[:, None]).to(dtype)
        return self._corr[key]

    def _conv_codes(self) -> torch.Tensor:
        """int8 weight codes [O, kh * kw * C]: the taps in ``_im2col``'s order (cached)."""
        if "hwc" not in self._corr:
            o, ch, kh, kw = self.out_features, self.k // (self.kernel_size[0] * self.kernel_size[1]), *self.kernel_size
            self._corr["hwc"] = self.codes().reshape(o, ch, kh, kw).permute(0, 2, 3, 1).reshape(o, -1).contiguous()
        return self._corr["hwc"]

    def _im2col(self, c: torch.Tensor) -> torch.Tensor:
        """int8 codes [N, C, H, W] -> patches [N * H' * W', kh * kw * C], gathered channels-last
        in int8 (each tap one strided slice with C contiguous: a quarter of float32's traffic and
        no 6-d gather); zero codes in the padding, whose share of the offset ``_valid_sum``
        corrects. Pairs with ``_conv_codes``."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        n, ch, h, w = c.shape
        ho, wo = conv_out_size(h, w, self.kernel_size, self.stride, self.padding, self.dilation)
        c = c.permute(0, 2, 3, 1)  # NHWC (a view when the input is channels-last, as integer layers emit)
        if ph or pw:
            c = F.pad(c, (0, 0, pw, pw, ph, ph))
        taps = [c[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
                for i in range(kh) for j in range(kw)]
        if len(taps) == 1:
            return taps[0].reshape(n * ho * wo, ch)
        return torch.stack(taps, 3).reshape(n * ho * wo, kh * kw * ch)

    def _forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        n, c_in, h, w = x.shape
        kh, kw = self.kernel_size
        ph, pw = self.padding
        ho, wo = conv_out_size(h, w, self.kernel_size, self.stride, self.padding, self.dilation)
        if self.input_quantizer is None:
            wt = self._float_weight(x.dtype).reshape(self.out_features, c_in, kh, kw)
            return F.conv2d(x, wt, self.bias, self.stride, self.padding, self.dilation)
        c, a, b = _input_codes(self.input_quantizer, x)
        acc = int_matmul(self._im2col(c), self._conv_codes()).reshape(n, ho * wo, -1)
        shift = None
        if b:
            shift = self._row_sums() if (ph, pw) == (0, 0) else self._valid_sum((c_in, h, w))
            shift = b * shift
        y = self._epilogue(acc, a, shift)
        # [N, H'W', O] -> [N, O, H', W'] as a channels-last view: no copy; the next layer reads it
        return y.reshape(n, ho, wo, -1).permute(0, 3, 1, 2).to(x.dtype)


class PackedIntEmbedding(nn.Module):
    """An embedding table as k-bit codes with one scale per row: ids [...] -> [..., D]."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        codes, scale, bits = layer_weight_codes(layer)
        self.bits, self.num_embeddings, self.embedding_dim = bits, codes.shape[0], codes.shape[1]
        self.padding_idx = layer.padding_idx
        self.register_buffer("weight_codes", pack_int4(codes) if bits <= 4 else codes.clone())
        self.register_buffer("weight_scale", scale.reshape(-1).clone())

    def stored_size(self) -> tuple[int, int]:
        stored = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return stored, self.num_embeddings * self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_codes[ids.reshape(-1)]
        codes = unpack_int4(rows, self.embedding_dim) if self.bits <= 4 else rows
        out = codes.float() * self.weight_scale[ids.reshape(-1)][:, None]
        return out.reshape(*ids.shape, self.embedding_dim)


__all__ = ["PackedIntLayer", "PackedIntEmbedding", "int_exportable"]
