"""Binary weights times binary inputs, computed by XOR-popcount (recipes bnn, xnor, fda, dirnet).

Weights are stored as packed signs (1 bit) plus one float scale per output channel; inputs are
sign-packed on the fly; the integer product comes from ``lowbit.kernels``. XNOR-Net's input
scale K is computed as in training. ``PackedBinaryLayer.from_layer`` picks the linear or conv form.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import binary_conv
from lowbit.kernels.binary import (
    binary_matmul,
    gather_conv_taps,
    pack_signs,
    scale_epilogue,
    unpack_signs,
    xor_popcount_product,
)
from lowbit.quant.packed_base import PackedLayer, conv_out_size, im2col_rows

FUSED = True  # binary convs on the CPU as one fused kernel (lowbit.kernels.binary_conv); False: step by step


class PackedBinaryLayer(PackedLayer):
    """What the linear and conv forms share: the packed signs ``weight_signs`` (int64 words
    [O, ceil(K / 64)]), the per-channel output scale ``alpha`` and shift ``bias`` (a following
    BatchNorm folds into them, ``fold_batchnorm``), and whether XNOR-Net's input scale applies."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.copy_geometry(layer)
        wq = layer.quantized_weight().detach()
        self.weight_shape = tuple(wq.shape)
        self.register_buffer("weight_signs", pack_signs(wq.reshape(self.out_features, -1)))  # int64 [O, ceil(K/64)]
        self.register_buffer("alpha", wq.reshape(self.out_features, -1).abs().amax(1).float())  # |w| per channel
        self.xnor_scale = bool(getattr(layer.input_quantizer, "xnor_scale", False))

    @staticmethod
    def from_layer(layer: nn.Module) -> "PackedBinaryLayer":
        """The packed form of a binary-weight, binary-input QuantConv2d or QuantLinear."""
        return PackedBinaryConv2d(layer) if isinstance(layer, nn.Conv2d) else PackedBinaryLinear(layer)

    def forget_derived(self) -> None:
        """Drop what is derived from the stored tensors (called when they change)."""

    def _load_from_state_dict(self, *args, **kwargs):
        self.forget_derived()
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> None:
        """Fold an eval-mode BatchNorm applied to this layer's output into alpha and bias:
        BN(y) = y * s + (beta - mean * s) with s = gamma / sqrt(var + eps), per channel."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("fold_batchnorm: the BatchNorm keeps no running statistics")
        s = (bn.running_var + bn.eps).rsqrt()
        if bn.weight is not None:
            s = s * bn.weight
        shift = -bn.running_mean * s + (0 if bn.bias is None else bn.bias)
        if self.bias is not None:
            shift = shift + self.bias * s
        self.alpha.mul_(s.float())
        self.bias = nn.Parameter(shift.detach().float().clone(), requires_grad=False)
        self.forget_derived()


class PackedBinaryLinear(PackedBinaryLayer):
    """x [..., F] -> [..., O]: sign(x) packed along F times the packed weight signs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        acc = binary_matmul(pack_signs(x), self.weight_signs, self.k)  # [N, O] exact integers
        # the epilogue in the fake-quantized layer's own order of float operations
        # ((acc * alpha) * K + bias): the same bits, so no downstream sign can flip
        y = acc.to(torch.float32) * self.alpha
        if self.xnor_scale:
            y = y * x.abs().mean(-1).reshape(-1, 1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*lead, -1)


class PackedBinaryConv2d(PackedBinaryLayer):
    """x [N, C, H, W] -> [N, O, H', W'] (returned channels-last in memory, so the next layer's
    packing needs no copy). The input is sign-packed along channels once per pixel and its taps
    are gathered as bits, 32-64x less data than a float im2col; weights are packed in the same
    (kh, kw, C) order. Taps in the zero padding hold 0 bits, i.e. -1, where the fake-quantized
    conv sees 0: a per-position correction (sum of the filter's signs over the padded taps,
    computed once per input size) restores it. On the CPU, with C dividing 64 or a multiple of
    it, the whole conv is one fused call (``lowbit.kernels.binary_conv``); otherwise it runs step
    by step (pack, gather, GEMM, epilogue)."""

    def __init__(self, layer: nn.Module):
        super().__init__(layer)
        self._cache: dict = {}
        self._taps: torch.Tensor | None = None

    def forget_derived(self) -> None:
        self._taps, self._cache = None, {}

    def _tight(self) -> bool:
        c = self.weight_shape[1]
        return c % 64 == 0 or 64 % c == 0

    def _tap_signs(self) -> torch.Tensor:
        """The stored signs re-packed in the (kh, kw, C) order of the gathered input rows: end to
        end when C divides 64 or is a multiple of it, else one word group per tap (derived, not saved)."""
        if self._taps is None:
            o, c, kh, kw = self.weight_shape
            w = unpack_signs(self.weight_signs, self.k).reshape(o, c, kh, kw).permute(0, 2, 3, 1)
            if self._tight():
                self._taps = pack_signs(w.reshape(o, -1))
            else:
                self._taps = pack_signs(w.reshape(o * kh * kw, c)).reshape(o, -1)
        return self._taps

    def _padding_correction(self, c: int, h: int, w: int) -> torch.Tensor | None:
        """[L, O]: sum of each filter's signs over the taps that fall in the padding."""
        if not any(self.padding):
            return None
        key = (h, w)
        if key not in self._cache:
            signs = unpack_signs(self.weight_signs, self.k)
            valid, _, _ = im2col_rows(torch.ones(1, c, h, w, device=signs.device), self.conv_args())  # [L, K], 0 where padded
            self._cache[key] = ((1 - valid) @ signs.T).round().to(torch.int32)
        return self._cache[key]

    def _conv_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Gathered tap words [N * L, kh * kw * ceil(C / 64)]."""
        n, c, h, w = x.shape
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = self.kernel_size, self.padding, self.stride, self.dilation
        pix = pack_signs(x.permute(0, 2, 3, 1).reshape(n * h * w, c))  # [N*H*W, Wc]
        wc = pix.shape[1]
        ho, wo = conv_out_size(h, w, self.kernel_size, self.stride, self.padding, self.dilation)
        if self._tight() and pix.device.type == "cpu":
            rows = gather_conv_taps(pix.reshape(n, h, w, wc), c, self.kernel_size, self.stride, self.padding,
                                    self.dilation, ho, wo)
            return rows, ho, wo
        img = torch.zeros(n, h + 2 * ph, w + 2 * pw, wc, dtype=torch.int64, device=pix.device)
        img[:, ph : ph + h, pw : pw + w] = pix.reshape(n, h, w, wc)
        sn, sh_, sw_, sc = img.stride()
        taps = img.as_strided((n, ho, wo, kh, kw, wc), (sn, sh * sh_, sw * sw_, dh * sh_, dw * sw_, sc))
        return taps.reshape(n * ho * wo, kh * kw * wc), ho, wo

    def _plan(self, shape: torch.Size) -> binary_conv.ConvPlan | None:
        """The fused kernel's plan for inputs [*, C, H, W] (built once per size), or None where it
        cannot run (C neither divides 64 nor is a multiple of it, or no CPU JIT)."""
        key = ("plan", *shape)
        plan = self._cache.get(key)
        if plan is None and key not in self._cache:
            c, h, w = shape
            stride = self.stride
            if self._subsample():
                h, w, stride = -(-h // stride[0]), -(-w // stride[1]), (1, 1)
            ho, wo = conv_out_size(h, w, self.kernel_size, stride, self.padding, self.dilation)
            if self._tight() and binary_conv.available():
                plan = binary_conv.plan_conv(self._tap_signs(), c, self.kernel_size, stride, self.padding,
                                             self.dilation, ho, wo, self.k, self.xnor_scale, self.alpha,
                                             self._padding_correction(c, h, w), self.bias)
            self._cache[key] = plan
        return plan

    def _subsample(self) -> bool:
        """A strided 1x1 conv without padding reads only every stride-th pixel: subsample first."""
        return self.kernel_size == (1, 1) and self.padding == (0, 0) and self.stride != (1, 1)

    def _xnor_k(self, x: torch.Tensor) -> torch.Tensor | None:
        """XNOR-Net's K per output position [N * L]: the mean |x| over channels, box-filtered."""
        if not self.xnor_scale:
            return None
        a = x.abs().mean(1, keepdim=True)
        return F.avg_pool2d(a, self.kernel_size, self.stride, self.padding, count_include_pad=True).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FUSED and x.device.type == "cpu":
            plan = self._plan(x.shape[1:])
            if plan is not None:
                if self._subsample():
                    x = x[:, :, :: self.stride[0], :: self.stride[1]]
                y = binary_conv.binary_conv2d_nhwc(x.permute(0, 2, 3, 1), plan)
                if x.dtype != torch.float32:
                    y = y.to(x.dtype)
                # channels-last memory: the next layer's packing needs no copy
                return y.reshape(x.shape[0], plan.ho, plan.wo, -1).permute(0, 3, 1, 2)
        n, c, h, w = x.shape
        rows, ho, wo = self._conv_rows(x)
        acc = xor_popcount_product(rows, self._tap_signs(), self.k)  # padded channel bits are 0 in both
        corr = self._padding_correction(c, h, w)
        y = scale_epilogue(acc, self.alpha, corr, ho * wo, self._xnor_k(x), self.bias).to(x.dtype)
        return y.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)  # channels-last memory: the next pack needs no copy
