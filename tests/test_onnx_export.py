"""ONNX QDQ export: onnxruntime runs the file and agrees with the fake-quantized model."""
import numpy as np
import pytest
import torch
from torch import nn

from lowbit import quant

onnx = pytest.importorskip("onnx", reason="needs the onnx extra")
ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra")


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(),
                         nn.Linear(32, 10)).eval()


@pytest.mark.parametrize("recipe,weight_type", [("int8", "INT8"), ("int4", "INT4"), ("ternary", "INT4"), ("xnor", "INT4")])
def test_onnxruntime_matches_the_fake_quantized_model(recipe, weight_type, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 1, 14, 14)
    q = quant.quantize(_cnn(), recipe)
    with torch.no_grad():
        q(x)  # LSQ steps initialise on the first batch
    q.eval()
    path = quant.export_onnx(q, x[:2], tmp_path / f"{recipe}.onnx")
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    kbit = recipe in ("int8", "int4")
    # the three inner layers' weights, and their inputs for the k-bit recipes
    assert ops.count("DequantizeLinear") == (6 if kbit else 3) and ops.count("QuantizeLinear") == (3 if kbit else 0)
    assert {i.data_type for i in proto.graph.initializer} >= {getattr(onnx.TensorProto, weight_type)}
    out = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]  # batch 5: the batch is dynamic
    with torch.no_grad():
        ref = q(x).numpy()
    assert np.abs(out - ref).max() < 1e-5 * max(1.0, np.abs(ref).max()), recipe


def test_onnx_export_refuses_what_it_cannot_express(tmp_path):
    q = quant.quantize(_cnn(), "qnn")  # DoReFa inputs on [0, 1]: no QDQ form here
    with pytest.raises(ValueError, match="UniformActivation input quantizer"):
        quant.export_onnx(q, torch.randn(1, 1, 14, 14), tmp_path / "x.onnx")


def _hf_case(name: str, recipe: str, tmp_path):
    hf = pytest.importorskip("lowbit.models.hf", reason="needs the hf extra")
    pytest.importorskip("transformers", reason="needs the hf extra")
    torch.manual_seed(0)
    model = hf.hf_model(name).eval()
    x = next(iter(hf.hf_batch(name, model, batch=3, generator=torch.Generator().manual_seed(0)).values()))
    q = quant.quantize(model, recipe)
    with torch.no_grad():
        q(x)  # LSQ steps initialise on the first batch
    q.eval()
    path = quant.export_onnx(q, x[:2], tmp_path / f"{name}-{recipe}.onnx")
    out = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]  # batch 3: the batch is dynamic
    with torch.no_grad():
        ref = q(x).logits.numpy()
    assert out.shape == ref.shape
    # xnor too: the sign products are exact in both, scaled after, so later signs agree
    assert np.abs(out - ref).max() < 1e-5 * max(1.0, np.abs(ref).max()), (name, recipe)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    layers = quant.quant_layers(q)
    assert len(layers) >= 6 and ops.count("DequantizeLinear") >= len(layers)  # every quantized weight: an integer constant


@pytest.mark.parametrize("name,recipe", [("bert", "int8"), ("gpt2", "xnor")])
def test_onnx_export_of_quantized_transformers(name, recipe, tmp_path):
    _hf_case(name, recipe, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name,recipe", [("bert", "int4"), ("bert", "xnor"), ("gpt2", "int8"), ("gpt2", "int4")])
def test_onnx_export_of_quantized_transformers_every_recipe(name, recipe, tmp_path):
    _hf_case(name, recipe, tmp_path)
