"""``export_onnx(qmodel, example_input, path)``: a quantized model as a standard ONNX QDQ graph.

Each quantized layer's weight becomes an integer constant with one float scale per output
channel, read through ``DequantizeLinear`` (axis 0): INT4 constants for codes in -8..7 (int4
recipes, ternary {-1, 0, 1} and binary {-1, 1} weights; opset 21), INT8 otherwise. k-bit (LSQ)
inputs go through ``QuantizeLinear`` / ``DequantizeLinear``; binary inputs through
``Where(x >= 0, 1, -1)`` (sign with sign(0) = +1, as in training), XNOR-Net's input scale K with
ReduceMean / AveragePool. Everything else is the float graph torch exports. onnxruntime runs
the file; its outputs match the fake-quantized model's up to float rounding.
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.layers import QUANT_LAYERS, QuantConv1d, QuantConv2d, QuantEmbedding, set_submodule
from lowbit.quant.quantizers import LSQ, BinaryActivation, BinaryWeight, TernaryWeight

OPSET = 21  # INT4 in DequantizeLinear; torch's TorchScript exporter writes 20, the file is then marked 21


class _Dequantize(torch.autograd.Function):
    """codes (int8 [O, ...]) * scale [O] along axis 0; exported as one DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, scale, zero):
        return codes.float() * scale.reshape(-1, *([1] * (codes.dim() - 1)))

    @staticmethod
    def symbolic(g, codes, scale, zero):
        return g.op("DequantizeLinear", codes, scale, zero, axis_i=0)


def layer_weight_codes(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 per-channel scale) with quantized_weight == codes * scale."""
    from lowbit.quant.export_int import layer_weight_codes as int_codes

    wq = layer.weight_quantizer
    w = layer.quantized_weight().detach()
    o = w.shape[0]
    if isinstance(wq, (BinaryWeight, TernaryWeight)):
        scale = w.reshape(o, -1).abs().amax(1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(w / safe.reshape(-1, *([1] * (w.dim() - 1))))
        return codes.to(torch.int8), safe.float()
    codes, scale, _ = int_codes(layer)
    return codes, scale


class _OnnxLayer(nn.Module):
    """A quantized layer in export-friendly ops: constant integer weight + DequantizeLinear, the
    input quantized by QuantizeLinear/DequantizeLinear or sign()."""

    def __init__(self, layer: nn.Module, name: str):
        super().__init__()
        iq = layer.input_quantizer
        if iq is not None and not isinstance(iq, (LSQ, BinaryActivation)):
            raise ValueError(f"export_onnx: layer {name!r} has a {type(iq).__name__} input quantizer; ONNX export "
                             f"supports LSQ (int8/int4 recipes) and binary inputs")
        if isinstance(iq, LSQ) and iq.per_channel:
            raise ValueError(f"export_onnx: layer {name!r}: per-channel input steps have no QDQ form")
        codes, scale = layer_weight_codes(layer)
        factors = getattr(layer.weight_quantizer, "factors", None)
        # sign inputs x sign weights: as the fake-quantized layer computes it, the product of the
        # +-1 codes (exact integers in float) scaled per output channel after, so later signs
        # see the same bits (scaling the weights first rounds differently and flips near-zero signs)
        self.scale_after = factors is not None and isinstance(iq, BinaryActivation)
        if self.scale_after:
            b, alpha = factors(layer.weight.detach())
            codes = b.detach().round().to(torch.int8)
            self.register_buffer("alpha", None if alpha is None else alpha.detach().float().reshape(-1).clone())
            scale = torch.ones(codes.shape[0])
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", torch.zeros(scale.shape, dtype=torch.int8))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.kind = "conv2d" if isinstance(layer, QuantConv2d) else "conv1d" if isinstance(layer, QuantConv1d) else "linear"
        if self.kind != "linear":
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
            self.kernel_size = layer.kernel_size
        self.binary = isinstance(iq, BinaryActivation)
        self.xnor = self.binary and iq.xnor_scale
        self.lsq = None
        if isinstance(iq, LSQ):
            lo, hi = iq._range()
            self.lsq = (float(iq.step.detach().abs()) + 1e-12, lo, hi)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
        if self.lsq is None:
            return x
        s, lo, hi = self.lsq
        if (lo, hi) not in ((-128, 127), (0, 255)):  # 4-bit and the like: clamp, then an 8-bit QDQ
            x = torch.clamp(x, lo * s, hi * s)
            lo, hi = (-128, 127) if lo < 0 else (0, 255)
        return torch.fake_quantize_per_tensor_affine(x, s, 0, lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _Dequantize.apply(self.codes, self.scale, self.zero)
        xq = self._input(x)
        if self.kind == "conv2d":
            y = F.conv2d(xq, w, None, **self.conv)
        elif self.kind == "conv1d":
            y = F.conv1d(xq, w, None, **self.conv)
        else:
            y = F.linear(xq, w)
        if self.scale_after and self.alpha is not None:
            y = y * (self.alpha if self.kind == "linear" else self.alpha.reshape(-1, *([1] * (y.dim() - 2))))
        if self.xnor:
            a = x.abs().mean(1, keepdim=True)
            if self.kind == "conv2d":
                k = F.avg_pool2d(a, self.kernel_size, self.conv["stride"], self.conv["padding"], count_include_pad=True)
            elif self.kind == "conv1d":
                k = F.avg_pool1d(a, self.kernel_size, self.conv["stride"], self.conv["padding"], count_include_pad=True)
            else:
                k = x.abs().mean(-1, keepdim=True)
            y = y * k
        if self.bias is not None:
            y = y + (self.bias if self.kind == "linear" else self.bias.reshape(-1, *([1] * (y.dim() - 2))))
        return y


def onnx_ready(qmodel: nn.Module) -> nn.Module:
    """An eval-mode copy of ``qmodel`` whose quantized layers are ``_OnnxLayer``s (what
    ``export_onnx`` traces); runs in torch with the fake-quantized model's outputs."""
    model = copy.deepcopy(qmodel).eval()
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]:
        if isinstance(layer, QuantEmbedding):
            raise ValueError(f"export_onnx: embedding {name!r}: quantized embeddings have no QDQ export here; "
                             f"quantize without embeddings=True")
        set_submodule(model, name, _OnnxLayer(layer, name))
    return model.requires_grad_(False)


class _FirstTensor(nn.Module):
    """``model``'s first output tensor: a transformers ``ModelOutput`` (its logits when no labels
    are given) or a tuple's first element; a tensor passes through. Token ids [batch, seq] go in
    with an all-ones attention mask where the model takes one (what it assumes without a mask;
    without it, transformers' masks look for packed sequences with ops ONNX does not have)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        try:
            self.takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self.takes_mask = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_mask and x.dim() == 2 and not x.is_floating_point():
            out = self.model(x, attention_mask=torch.ones_like(x))
        else:
            out = self.model(x)
        while not torch.is_tensor(out):
            if isinstance(out, dict):
                out = next(v for v in out.values() if v is not None)
            elif isinstance(out, (tuple, list)):
                out = out[0]
            else:
                raise TypeError(f"export_onnx: the model returns {type(out).__name__}, not a tensor, tuple or dict")
        return out


def _to_int4(model_proto) -> int:
    """Turn the INT8 weight constants feeding DequantizeLinear whose values fit -8..7 into INT4;
    returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    producers = {o: n for n in model_proto.graph.node for o in n.output}
    inits = {i.name: i for i in model_proto.graph.initializer}
    changed = 0
    for node in model_proto.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = node.input[0]
        arr = None
        if src in inits:
            arr = numpy_helper.to_array(inits[src])
        elif src in producers and producers[src].op_type == "Constant":
            arr = numpy_helper.to_array(producers[src].attribute[0].t)
        if arr is None or arr.dtype.name != "int8" or arr.size == 0 or arr.min() < -8 or arr.max() > 7:
            continue
        zp_name = node.input[2] if len(node.input) > 2 else None
        new_w = helper.make_tensor(src + "_int4", onnx.TensorProto.INT4, arr.shape, arr.flatten().tolist())
        new_z = helper.make_tensor(src + "_int4_zero", onnx.TensorProto.INT4, [arr.shape[0]], [0] * arr.shape[0])
        model_proto.graph.initializer.extend([new_w, new_z])
        node.input[0] = src + "_int4"
        if zp_name is not None:
            node.input[2] = src + "_int4_zero"
        changed += 1
    used = {i for n in model_proto.graph.node for i in n.input}
    keep = [i for i in model_proto.graph.initializer if i.name in used]
    del model_proto.graph.initializer[:]
    model_proto.graph.initializer.extend(keep)  # the INT8 copies the INT4 ones replace
    return changed


def export_onnx(qmodel: nn.Module, example_input: torch.Tensor, path: str | Path, int4: bool = True) -> Path:
    """Write ``qmodel`` (from ``quantize``: int8, int4, binary and ternary recipes) as an ONNX QDQ
    graph to ``path`` (opset 21), traced on ``example_input``; the batch dimension is dynamic
    (other dimensions, such as a transformer's sequence length, are those of the example).
    transformers models (BERT, GPT-2, ...: ``example_input`` the token ids [batch, seq]) are
    exported with their KV cache off, and the graph's one output is the model's first output
    tensor (the logits). int4: weight codes in -8..7 stored as INT4 (two per byte), else INT8.
    Returns the path."""
    import onnx

    path = Path(path)
    ready = _FirstTensor(onnx_ready(qmodel))
    cfg = getattr(ready.model, "config", None)
    if getattr(cfg, "use_cache", None):  # a KV cache is state, not an output of one forward
        cfg.use_cache = False
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ready, (example_input,), buf, opset_version=20, dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          do_constant_folding=False)
    proto = onnx.load_from_string(buf.getvalue())
    if int4:
        _to_int4(proto)
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = OPSET
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


__all__ = ["export_onnx", "onnx_ready", "OPSET"]
