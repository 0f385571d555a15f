"""``export(qmodel)``: a quantized model as an inference module that stores its quantized layers
bit-packed and, where inputs are binary too, computes them with XOR-popcount.

- binary weights x binary inputs (recipes bnn, xnor, fda, dirnet): PackedBinaryConv2d /
  PackedBinaryLinear. Weights are stored as packed signs (1 bit) plus one float scale per output
  channel; inputs are sign-packed on the fly; the integer product comes from
  ``lowbit.kernels.binary_matmul``. Conv zero padding is exact: the padded positions (0, not +-1)
  are corrected by a per-position term computed once per input size. XNOR-Net's input scale K
  is computed as in training.
- sparse binary weights x binary inputs (sbnn): W = beta + (alpha - beta) M, so
  W x = beta * sum(x) + (alpha - beta) * (M x), M x from the two-plane kernel.
- k-bit weights (int8, int4 recipes; ``ptq`` models) with inputs of at most 8 bits or float:
  PackedIntLayer / PackedIntEmbedding (``export_int``): integer codes (4-bit ones two per byte)
  with per-channel scales, integer GEMM on int8 input codes.
- binary or ternary weights x float inputs (bwn, ternary, ternary-hq, ternary-ptq):
  PackedWeightConv2d / PackedWeightLinear store 1 or 2 bit-planes plus scales and decode to
  float on the first forward (the file and the stored model are small; the product is float).

Outputs equal the fake-quantized model's in eval mode (the integer parts exactly).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lowbit.kernels import binary_conv
from lowbit.kernels.binary import (
    binary_matmul,
    pack_mask,
    pack_signs,
    gather_conv_taps,
    scale_epilogue,
    ternary_matmul,
    unpack_mask,
    unpack_signs,
    xor_popcount_product,
)
from lowbit.quant.export_int import PackedIntEmbedding, PackedIntLayer, int_exportable
from lowbit.quant.layers import QUANT_LAYERS, QuantConv1d, QuantEmbedding, is_hf_conv1d, set_submodule
from lowbit.quant.quantizers import BinaryActivation, BinaryWeight, SparseBinaryWeight, TernaryWeight


FUSED = True  # binary convs on the CPU as one fused kernel (lowbit.kernels.binary_conv); False: step by step


def _out_size(h: int, w: int, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """A conv's output height and width for an h x w input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _im2col(x: torch.Tensor, conv_args: dict) -> tuple[torch.Tensor, int, int]:
    """[N, C, H, W] -> rows [N * L, C * kh * kw] (zero padded), with the output height and width."""
    n, _, h, w = x.shape
    ho, wo = _out_size(h, w, conv_args["kernel_size"], conv_args["stride"], conv_args["padding"], conv_args["dilation"])
    cols = F.unfold(x, conv_args["kernel_size"], dilation=conv_args["dilation"], padding=conv_args["padding"],
                    stride=conv_args["stride"])  # [N, K, L]
    return cols.transpose(1, 2).reshape(n * ho * wo, -1), ho, wo


class _PackedBase(nn.Module):
    def _conv_args(self) -> dict:
        return {k: getattr(self, k) for k in ("kernel_size", "stride", "padding", "dilation")}

    def _copy_geometry(self, layer: nn.Module) -> None:
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

    def _finish(self, y2d: torch.Tensor, n: int, ho: int, wo: int) -> torch.Tensor:
        if self.bias is not None:
            y2d = y2d + self.bias
        if not self.is_conv:
            return y2d
        return y2d.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)


class PackedBinaryLayer(_PackedBase):
    """Binary weights (packed signs + per-channel scale) times sign(input), by XOR-popcount.

    Linear: x [..., F] -> [..., O], weights packed along F. Conv: x [N, C, H, W] -> [N, O, H', W']
    (returned channels-last in memory, so the next layer's packing needs no copy); the input is
    sign-packed along channels once per pixel and its taps are gathered as bits, 32-64x less data
    than a float im2col; weights are packed in the same (kh, kw, C) order. Taps in the zero
    padding hold 0 bits, i.e. -1, where the fake-quantized conv sees 0: a per-position correction
    (sum of the filter's signs over the padded taps, computed once per input size) restores it.
    On the CPU, with C dividing 64 or a multiple of it, the whole conv is one fused call
    (``lowbit.kernels.binary_conv``); otherwise it runs step by step (pack, gather, GEMM, epilogue).
    ``alpha`` and ``bias`` are the per-channel output scale and shift: a BatchNorm that follows the
    layer can be folded into them (``fold_batchnorm``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._copy_geometry(layer)
        wq = layer.quantized_weight().detach()
        self.weight_shape = tuple(wq.shape)
        self.register_buffer("weight_signs", pack_signs(wq.reshape(self.out_features, -1)))  # int64 [O, ceil(K/64)]
        self.register_buffer("alpha", wq.reshape(self.out_features, -1).abs().amax(1).float())  # |w| per channel
        self.xnor_scale = bool(getattr(layer.input_quantizer, "xnor_scale", False))
        self._cache: dict = {}
        self._taps: torch.Tensor | None = None

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

    def _load_from_state_dict(self, *args, **kwargs):
        self._taps, self._cache = None, {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _padding_correction(self, c: int, h: int, w: int) -> torch.Tensor | None:
        """[L, O]: sum of each filter's signs over the taps that fall in the padding."""
        if not any(self.padding):
            return None
        key = (h, w)
        if key not in self._cache:
            signs = unpack_signs(self.weight_signs, self.k)
            valid, _, _ = _im2col(torch.ones(1, c, h, w, device=signs.device), self._conv_args())  # [L, K], 0 where padded
            self._cache[key] = ((1 - valid) @ signs.T).round().to(torch.int32)
        return self._cache[key]

    def _conv_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Gathered tap words [N * L, kh * kw * ceil(C / 64)]."""
        n, c, h, w = x.shape
        (kh, kw), (ph, pw), (sh, sw), (dh, dw) = self.kernel_size, self.padding, self.stride, self.dilation
        pix = pack_signs(x.permute(0, 2, 3, 1).reshape(n * h * w, c))  # [N*H*W, Wc]
        wc = pix.shape[1]
        ho, wo = _out_size(h, w, self.kernel_size, self.stride, self.padding, self.dilation)
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
            ho, wo = _out_size(h, w, self.kernel_size, stride, self.padding, self.dilation)
            if self._tight() and binary_conv.available():
                plan = binary_conv.plan_conv(self._tap_signs(), c, self.kernel_size, stride, self.padding,
                                             self.dilation, ho, wo, self.k, self.xnor_scale, self.alpha,
                                             self._padding_correction(c, h, w), self.bias)
            self._cache[key] = plan
        return plan

    def _subsample(self) -> bool:
        """A strided 1x1 conv without padding reads only every stride-th pixel: subsample first."""
        return self.kernel_size == (1, 1) and self.padding == (0, 0) and self.stride != (1, 1)

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
        self._cache = {}

    def _xnor_k(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.xnor_scale:
            return None
        if self.is_conv:
            a = x.abs().mean(1, keepdim=True)
            return F.avg_pool2d(a, self.kernel_size, self.stride, self.padding, count_include_pad=True).reshape(-1)
        return x.abs().mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv and FUSED and x.device.type == "cpu":
            plan = self._plan(x.shape[1:])
            if plan is not None:
                if self._subsample():
                    x = x[:, :, :: self.stride[0], :: self.stride[1]]
                y = binary_conv.binary_conv2d_nhwc(x.permute(0, 2, 3, 1), plan)
                if x.dtype != torch.float32:
                    y = y.to(x.dtype)
                # channels-last memory: the next layer's packing needs no copy
                return y.reshape(x.shape[0], plan.ho, plan.wo, -1).permute(0, 3, 1, 2)
        if self.is_conv:
            n, c, h, w = x.shape
            rows, ho, wo = self._conv_rows(x)
            acc = xor_popcount_product(rows, self._tap_signs(), self.k)  # padded channel bits are 0 in both
            corr = self._padding_correction(c, h, w)
        else:
            lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
            acc = binary_matmul(pack_signs(x), self.weight_signs, self.k)  # [N, O] exact integers
            # the epilogue in the fake-quantized layer's own order of float operations
            # ((acc * alpha) * K + bias): the same bits, so no downstream sign can flip
            y = acc.to(torch.float32) * self.alpha
            k = self._xnor_k(x)
            if k is not None:
                y = y * k.reshape(-1, 1)
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).reshape(*lead, -1)
        y = scale_epilogue(acc, self.alpha, corr, ho * wo, self._xnor_k(x), self.bias).to(x.dtype)
        return y.reshape(n, ho, wo, -1).permute(0, 3, 1, 2)  # channels-last memory: the next pack needs no copy


class PackedSparseBinaryLayer(_PackedBase):
    """SBNN weights {beta_c, alpha_c} (1-bit mask M) times sign(input):
    W x = beta_c * sum_k x_k + (alpha_c - beta_c) * (M x)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._copy_geometry(layer)
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
            self._taps_present[key] = _im2col(torch.ones(1, *x.shape[1:], dtype=x.dtype, device=x.device),
                                              self._conv_args())[0]
        return self._taps_present[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            n = x.shape[0]
            rows, ho, wo = _im2col(x, self._conv_args())
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
        y = self._finish(y, n, ho, wo)
        return y if self.is_conv else y.reshape(*lead, -1)


class PackedWeightLayer(_PackedBase):
    """Binary or ternary weights stored as bit-planes + scales; float inputs. Decodes the weight
    once (cached, not saved) and runs the ordinary float conv / linear."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._copy_geometry(layer)
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


def _packed_for(name: str, layer: nn.Module) -> nn.Module:
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if isinstance(layer, QuantEmbedding):
        if int_exportable(layer):
            return PackedIntEmbedding(layer)
        raise ValueError(f"export: embedding {name!r} has {type(wq).__name__} weights; lowbit exports k-bit (LSQ) "
                         f"embeddings; quantize without embeddings=True to keep it float")
    binary_in = isinstance(iq, BinaryActivation)
    if isinstance(layer, QuantConv1d) and (binary_in or isinstance(wq, (BinaryWeight, TernaryWeight, SparseBinaryWeight))):
        raise ValueError(f"export: layer {name!r} (QuantConv1d) with {type(wq).__name__} weights has no packed form; "
                         f"lowbit packs k-bit (int8/int4, ptq) Conv1d layers")
    if isinstance(wq, SparseBinaryWeight) and binary_in:
        return PackedSparseBinaryLayer(layer)
    if type(wq) is BinaryWeight and binary_in:
        return PackedBinaryLayer(layer)
    if iq is None and isinstance(wq, (BinaryWeight, TernaryWeight)):
        return PackedWeightLayer(layer)
    if int_exportable(layer):
        return PackedIntLayer(layer)
    raise ValueError(f"export: layer {name!r} ({type(wq).__name__ if wq is not None else 'float'} weights, "
                     f"{type(iq).__name__ if iq else 'float'} inputs) has no packed form; lowbit exports binary "
                     f"(bnn, xnor, fda, dirnet, sbnn), binary/ternary-weight (bwn, ternary*) and k-bit "
                     f"(int8, int4, ptq with inputs of at most 8 bits) layers")


def export(qmodel: nn.Module, fold_batchnorm: bool = True, channels_last: bool = True) -> nn.Module:
    """A packed inference copy of a quantized model (eval mode; ``qmodel`` is not modified).

    fold_batchnorm: a BatchNorm2d whose only input is a conv (found by tracing the model with
    torch.fx) is folded into it: into a packed binary layer's per-channel scale and shift, or into
    a float conv's weights; it becomes nn.Identity. Other BatchNorms stay.
    channels_last: float convs keep their weights channels-last, so their outputs are NHWC like
    the packed layers' (no layout changes between layers; torch's NCHW max-pool is ~9x slower).
    Outputs match the fake-quantized model up to float rounding (exactly per layer with
    ``fold_batchnorm=False``)."""
    from lowbit.quant.mixed import foldable_conv_bn_pairs

    model = copy.deepcopy(qmodel).eval()
    pairs = foldable_conv_bn_pairs(model, "export") if fold_batchnorm else []  # traced before packing
    packed = []
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]:
        if layer.grad_quantizer is not None:
            layer.grad_quantizer = None
        set_submodule(model, name, _packed_for(name, layer))
        packed.append(name)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if isinstance(conv, PackedBinaryLayer):
            conv.fold_batchnorm(bn)
        elif type(conv) is nn.Conv2d:
            set_submodule(model, conv_name, fuse_conv_bn_eval(conv, bn))
        else:
            continue  # a layer that stores its weights packed and decodes them: BatchNorm kept
        set_submodule(model, bn_name, nn.Identity())
    if channels_last:
        for m in model.modules():
            if type(m) is nn.Conv2d:
                m.to(memory_format=torch.channels_last)
    float_left = [n for n, m in model.named_modules() if n and (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding))
                                                                or is_hf_conv1d(m))]
    model.lowbit_export = {"packed": packed, "float": float_left}
    return model.requires_grad_(False)


def storage_bytes(module: nn.Module) -> int:
    """Bytes the module stores (parameters and persistent buffers, each tensor once)."""
    seen, total = set(), 0
    for t in list(module.state_dict(keep_vars=True).values()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


__all__ = ["export", "storage_bytes", "PackedBinaryLayer", "PackedSparseBinaryLayer", "PackedWeightLayer", "PackedIntLayer",
           "PackedIntEmbedding"]
