"""``export(qmodel)``: a quantized model as an inference module that stores its quantized layers
bit-packed and, where inputs are binary too, computes them with XOR-popcount.

- binary weights x binary inputs (recipes bnn, xnor, fda, dirnet): PackedBinaryConv2d /
  PackedBinaryLinear (``packed_binary``), XOR-popcount on packed signs; conv zero padding exact.
- sparse binary weights x binary inputs (sbnn): PackedSparseBinaryLayer (``packed_planes``).
- k-bit weights (int8, int4 recipes; ``ptq`` models) with inputs of at most 8 bits or float:
  PackedIntLayer / PackedIntEmbedding (``export_int``): integer codes (4-bit ones two per byte)
  with per-channel scales, integer GEMM on int8 input codes.
- binary or ternary weights x float inputs (bwn, ternary, ternary-hq, ternary-ptq):
  PackedWeightLayer (``packed_planes``) stores 1 or 2 bit-planes plus scales and decodes to
  float on the first forward (the file and the stored model are small; the product is float).

Outputs equal the fake-quantized model's in eval mode (the integer parts exactly).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lowbit.quant.export_int import PackedIntEmbedding, PackedIntLayer, int_exportable
from lowbit.quant.layers import QUANT_LAYERS, QuantConv1d, QuantEmbedding, is_hf_conv1d, set_submodule
from lowbit.quant.packed_binary import PackedBinaryConv2d, PackedBinaryLayer, PackedBinaryLinear
from lowbit.quant.packed_planes import PackedSparseBinaryLayer, PackedWeightLayer
from lowbit.quant.quantizers import BinaryActivation, BinaryWeight, SparseBinaryWeight, TernaryWeight


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
        return PackedBinaryLayer.from_layer(layer)
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


__all__ = ["export", "storage_bytes", "PackedBinaryLayer", "PackedBinaryConv2d", "PackedBinaryLinear", "PackedSparseBinaryLayer", "PackedWeightLayer", "PackedIntLayer",
           "PackedIntEmbedding"]
