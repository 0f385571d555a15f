"""Weight-only low-bit quantization: packing, the CPU kernel against the torch reference, the packed
layer against its dequantized weight, RTN / HQQ / GPTQ on the real-model matrix, state_dict round
trips and bad input."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.kernels import int4_gemv as kern
from lowbit.quant import quantize_weights
from lowbit.quant.weight_only import PackedLinear, gptq, hqq, load_quantized, packed_layers, rtn
from lowbit.quant.weight_only.gptq import HessianAccumulator

# (N, K, group_size): tile-aligned, rows past a tile, K not a multiple of 8, ragged group tails
SHAPES = [(64, 128, 64), (70, 100, 32), (5, 40, 16), (130, 260, 64), (3, 8, 8), (65, 203, 128)]


def _exact_operands(n, k, g, bits, m, seed):
    """Codes, power-of-two scales, integer zeros and small-integer activations: every product and
    partial sum is exact in float32, so any summation order gives the same bits."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // g)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = torch.pow(2.0, torch.randint(-3, 1, (n, groups), generator=gen).float()).half()
    zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen).half()
    x = torch.randint(-4, 5, (m, k), generator=gen).float()
    return codes, scales, zeros, x


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_roundtrip(bits):
    for n, k, _ in SHAPES:
        codes = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(n * k))
        packed = kern.pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == kern.packed_shape(n, k, bits)
        assert torch.equal(kern.unpack_codes(packed, bits, n, k), codes.to(torch.uint8))


def test_four_bit_layout_is_two_codes_per_byte():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    packed = kern.pack_codes(codes, 4)
    # one tile, 4 bytes, row 0: even weight in the low nibble
    assert packed[0, :, 0].tolist() == [0x21, 0x43, 0x65, 0x87]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_kernel_exact_against_reference(bits):
    for i, (n, k, g) in enumerate(SHAPES):
        for m in (1, 3, 8):
            codes, scales, zeros, x = _exact_operands(n, k, g, bits, m, seed=100 * i + m)
            q = kern.pack_codes(codes, bits)
            per_weight = lambda t: t.double().repeat_interleave(g, 1)[:, :k]  # noqa: E731
            w = (codes.double() - per_weight(zeros)) * per_weight(scales)
            want = (x.double() @ w.T).float()
            ref = kern.packed_linear_torch(x, q, scales, zeros, bits, g, k)
            s32, sz32 = kern.kernel_params(scales, zeros)
            for threads in ((1, 2) if m == 3 else (2,)):
                got = kern.packed_linear_cpu(x, q, s32, sz32, bits, g, n, k, threads=threads)
                assert torch.equal(got, want), (bits, n, k, g, m, threads)
            assert torch.equal(ref, want)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_random_floats_within_rounding(bits):
    gen = torch.Generator().manual_seed(bits)
    for n, k, g in SHAPES:
        codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
        groups = -(-k // g)
        scales = (torch.rand(n, groups, generator=gen) * 0.05 + 1e-3).half()
        zeros = (torch.rand(n, groups, generator=gen) * (1 << bits)).half()
        x = torch.randn(4, k, generator=gen)
        q = kern.pack_codes(codes, bits)
        w = kern.dequantize_packed(q, scales, zeros, bits, g, k, torch.float64)
        want = x.double() @ w.T
        got = kern.packed_linear(x, q, scales, zeros, bits, g, k)
        bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6  # float32 rounding of K-term sums
        assert ((got.double() - want).abs() <= bound).all()


def test_packed_layer_equals_dequantized_reference():
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 200, generator=gen) * 0.05, torch.randn(96, generator=gen)
    codes, scales, zeros = rtn(w, 4, 64)
    layer = PackedLinear.from_codes(codes, scales, zeros, 4, 64, b)
    assert not hasattr(layer, "weight") and layer.qweight.dtype == torch.uint8
    assert layer.scales.dtype == torch.float16 and layer.zeros.dtype == torch.float16
    deq = layer.dequantize()
    for rows in (1, 5, 40):  # kernel path (2 x rows <= kernel_max_rows) and the dequantize + F.linear path
        x = torch.randn(2, rows, 200, generator=gen)
        want = F.linear(x.double(), deq.double(), b.double())
        got = layer(x)
        assert got.shape == (2, rows, 96)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    # a gradient flows to the input through the reference path
    x = torch.randn(3, 200, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, deq.sum(0).expand(3, -1), atol=1e-5)


def test_rtn_and_hqq_codes_reconstruct_within_half_a_step():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    for fn in (rtn, hqq):
        codes, scales, zeros = fn(w, 4, 32)
        layer = PackedLinear.from_codes(codes, scales, zeros, 4, 32, None)
        step = scales.float().repeat_interleave(32, 1)
        err = (layer.dequantize() - w).abs()
        inside = err <= 0.5 * step + 1e-6
        assert inside.float().mean() > 0.97  # only clipped weights (HQQ's zero moves the range) lie outside


def test_hqq_beats_rtn_on_heavy_tailed_weights():
    # Student-t weights (outliers): HQQ's l_p zero search lowers the squared error at 3 and 4 bits
    torch.manual_seed(3)
    w = torch.distributions.StudentT(3.0).sample((128, 256)) * 0.02
    for bits in (3, 4):
        errs = {}
        for name, fn in (("rtn", rtn), ("hqq", hqq)):
            codes, scales, zeros = fn(w, bits, 64)
            deq = PackedLinear.from_codes(codes, scales, zeros, bits, 64, None).dequantize()
            errs[name] = float((deq - w).pow(2).sum())
        assert errs["hqq"] < errs["rtn"], (bits, errs)


def test_gptq_lowers_output_error_against_rtn():
    gen = torch.Generator().manual_seed(2)
    k = 128
    mix = torch.randn(k, k, generator=gen) / k**0.5
    x = torch.randn(2048, k, generator=gen) @ mix + 0.3 * torch.randn(2048, k, generator=gen)  # correlated inputs
    w = torch.randn(64, k, generator=gen) * 0.05
    acc = HessianAccumulator(k)
    for chunk in x.split(500):
        acc.add(chunk)
    assert torch.allclose(acc.h, 2 * x.double().T @ x.double() / len(x), rtol=1e-9, atol=1e-9)
    for bits in (3, 4):
        outs = {}
        for name, res in (("rtn", rtn(w, bits, 32)), ("gptq", gptq(w, acc.h, bits, 32))):
            deq = PackedLinear.from_codes(*res, bits, 32, None).dequantize()
            outs[name] = float((x @ (deq - w).T).pow(2).mean())
        assert outs["gptq"] < 0.8 * outs["rtn"], (bits, outs)


def _float_linears(model):
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_quantize_weights_on_hf_models(name):
    pytest.importorskip("transformers", reason="the hf extra builds the real-model matrix")
    from lowbit.models.hf import hf_batch, hf_model

    torch.manual_seed(0)
    model = hf_model(name).eval()
    batch = hf_batch(name, model, batch=2)
    batch.pop("labels")
    with torch.no_grad():
        ref = model(**batch).logits
    methods = {"gpt2": ("gptq",), "llama": ("hqq",), "bert": ("rtn",)}[name]
    for method in methods:
        q = quantize_weights(model, bits=4, group_size=32, method=method,
                             calibration=[batch] if method == "gptq" else None)
        left = _float_linears(q)
        # GPT-2's lm_head shares the embedding's weight: it stays float (tied), everything else is packed
        assert left == (["lm_head"] if name == "gpt2" else []), left
        assert len(packed_layers(q)) == len(_float_linears(model)) - len(left)
        assert len(_float_linears(model)) > len(left)  # the original is untouched
        with torch.no_grad():
            y = q(**batch).logits  # 64 rows per layer: the dequantize + F.linear path
            if name != "bert":  # causal: the first 4 positions alone (4 rows: the kernel path) give the same logits
                y4 = q(input_ids=batch["input_ids"][:1, :4]).logits
                assert torch.allclose(y4, y[:1, :4], rtol=1e-4, atol=1e-4)
        assert torch.isfinite(y).all()
        assert float((y - ref).abs().max()) < 0.25 * float(ref.abs().max())
        # state_dict round trip of the packed form, loaded with weights_only=True
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in dict(packed_layers(q)) for k in state)
        q2 = load_quantized(hf_model(name).eval(), state)
        with torch.no_grad():
            assert torch.equal(q2(**batch).logits, y)


def test_kernel_path_inside_model_matches_reference_path():
    pytest.importorskip("transformers", reason="the hf extra builds the real-model matrix")
    from lowbit.models.hf import hf_model

    model = hf_model("llama").eval()
    q = quantize_weights(model, bits=3, group_size=32, method="rtn")
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        fast = q(input_ids=ids).logits
        old, PackedLinear.kernel_max_rows = PackedLinear.kernel_max_rows, 0  # every layer through dequantize + F.linear
        try:
            slow = q(input_ids=ids).logits
        finally:
            PackedLinear.kernel_max_rows = old
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-4)


def test_ragged_group_tail_when_allowed():
    model = nn.Sequential(nn.Linear(100, 20), nn.ReLU(), nn.Linear(20, 5))
    with pytest.raises(ValueError, match="does not divide layer '0'"):
        quantize_weights(model, group_size=32)
    q = quantize_weights(model, group_size=32, allow_ragged=True)
    assert q[0].scales.shape == (20, 4) and q[2].scales.shape == (5, 1)
    x = torch.randn(3, 100)
    want = F.linear(F.relu(F.linear(x, q[0].dequantize(), q[0].bias)), q[2].dequantize(), q[2].bias)
    assert torch.allclose(q(x), want, atol=1e-5)


def test_bad_input_is_rejected_clearly():
    model = nn.Sequential(nn.Linear(64, 16))
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
            quantize_weights(model, bits=bits, group_size=32)
    for g in (0, 12, -8):
        with pytest.raises(ValueError, match="group_size must be a positive multiple of 8"):
            quantize_weights(model, group_size=g)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weights(model, group_size=48)
    with pytest.raises(ValueError, match="unknown method"):
        quantize_weights(model, group_size=32, method="awq")
    with pytest.raises(ValueError, match="calibration"):
        quantize_weights(model, group_size=32, method="gptq")
    ints = nn.Sequential(nn.Linear(64, 16))
    ints[0].weight = nn.Parameter(torch.zeros(16, 64, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="needs a float weight"):
        quantize_weights(ints, group_size=32)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_weights(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="expects 64"):
        quantize_weights(model, group_size=32)(torch.randn(2, 63))


def test_torch_int4_kernel_operands_match():
    from lowbit.bench.weight_only import _random_layer, aten_int4_pack

    layer, w = _random_layer(64, 256, 4, 64)
    packed, sz = aten_int4_pack(layer)
    x = torch.randn(3, 256)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz)
    assert torch.allclose(got, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bench_weight_only_quick(tmp_path):
    pytest.importorskip("transformers", reason="the benchmark's model is a transformers GPT-2")
    pytest.importorskip("hqq", reason="the benchmark runs the hqq package side by side")
    from lowbit.bench import weight_only

    res = weight_only.run(quick=True, out=tmp_path, progress=False, log=lambda *a: None)
    assert (tmp_path / "weight-only.json").exists() and (tmp_path / "weight-only.md").exists()
    assert res["omp_wait_policy"] == "PASSIVE" and {r["batch"] for r in res["kernel_rows"]} == {1, 4}
    assert all(r["packed_rel_err"] < 1e-5 for r in res["kernel_rows"])
    methods = {r["method"] for r in res["quality"]["rows"]}
    assert methods == {"float32", "rtn", "hqq", "gptq", "hqq-package"}
    assert all(r["perplexity"] > 1 for r in res["quality"]["rows"])
