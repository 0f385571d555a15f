"""Packed layers whose weights are bit-planes plus per-channel scales:

- PackedSparseBinaryLayer (sbnn): weights {beta_c, alpha_c} as a 1-bit mask, binary inputs,
  computed as beta_c * sum(x) + (alpha_c - beta_c) * (M x) with M x from the two-plane kernel.
- PackedWeightLayer (bwn, ternary*): binary or ternary weights as one or two planes, float
  inputs; the weight is decoded once and the product is the ordinary float conv / linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels.binary import pack_mask, pack_signs, ternary_matmul, unpack_mask
from lowbit.quant.packed_base import PackedLayer, im2col_rows


class PackedSparseBinaryLayer(PackedLayer):
    """SBNN weights {beta_c, alpha_c} (1-bit mask M) times sign(input):
    W x = beta_c * sum_k x_k + (alpha_c - beta_c) * (M x)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.copy_geometry(layer)
        wq = layer.quantized_weight().detach().reshape(self.out_features, -1)
        mask = layer.weight_quantizer.mask(layer.weight.detach()).reshape(self.out_features, -1) > 0
        hi = torch.where(mask, wq, torch.full_like(wq, -torch.inf)).amax(1)
        lo = torch.where(mask, torch.full_like(wq, torch.inf), wq).amin(1)
        self.register_buffer("mask", pack_mask(mask))
        self.register_buffer("alpha", torch.where(torch.isfinite(hi), hi, 0.0).float())
        self.register_buffer("beta", torch.where(torch.isfinite(lo), lo, 0.0).float())
        self.register_buffer("zeros", torch.zeros_like(self.mask), persistent=False)
        self._taps_present: dict = {}

    def _present(self, x: torch.Tensor) -> torch.Tensor:
        """[L, K] 1 where a tap reads the image, 0 where it reads the zero padding (once per size)."""
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._taps_present:
            self._taps_present[key] = im2col_rows(torch.ones(1, *x.shape[1:], dtype=x.dtype, device=x.device),
                                              self.conv_args())[0]
        return self._taps_present[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            n = x.shape[0]
            rows, ho, wo = im2col_rows(x, self.conv_args())
            present = self._present(x).repeat(n, 1)
            valid = pack_mask(present > 0)
        else:
            lead = x.shape[:-1]
            rows = x.reshape(-1, x.shape[-1])
            n, ho, wo, valid = rows.shape[0], 1, 1, None
        signs = pack_signs(rows)
        mx = ternary_matmul(signs, self.mask, self.zeros, self.k, valid)  # [N*L, O]
        sx = torch.where(rows >= 0, 1.0, -1.0)
        if self.is_conv:
            sx = sx * present  # padded taps are 0
        y = sx.sum(1, keepdim=True) * self.beta + mx.to(x.dtype) * (self.alpha - self.beta)
        y = self.finish(y, n, ho, wo)
        return y if self.is_conv else y.reshape(*lead, -1)


class PackedWeightLayer(PackedLayer):
    """Binary or ternary weights stored as bit-planes + scales; float inputs. Decodes the weight
    once (cached, not saved) and runs the ordinary float conv / linear."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.copy_geometry(layer)
        self.weight_shape = tuple(layer.weight.shape)
        wq = layer.quantized_weight().detach().reshape(self.out_features, -1)
        self.register_buffer("plus", pack_mask(wq > 0))
        self.register_buffer("minus", pack_mask(wq < 0))
        self.register_buffer("alpha", wq.abs().amax(1).float())
        self._decoded: torch.Tensor | None = None

    def decoded_weight(self) -> torch.Tensor:
        if self._decoded is None:
            t = unpack_mask(self.plus, self.k).float() - unpack_mask(self.minus, self.k).float()
            self._decoded = (t * self.alpha[:, None]).reshape(self.weight_shape)
        return self._decoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.decoded_weight().to(x.dtype)
        if self.is_conv:
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)
        return F.linear(x, w, self.bias)

    def _load_from_state_dict(self, *args, **kwargs):
        self._decoded = None
        return super()._load_from_state_dict(*args, **kwargs)
