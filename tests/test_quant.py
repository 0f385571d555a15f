import math

import pytest
import torch
from torch import nn

from lowbit import quant
from lowbit.data import load_images
from lowbit.models import MLP, ResNet
from lowbit.quant.functions import (
    GradQuant,
    SignClippedSTE,
    SignFourier,
    SignSTE,
    SignTanh,
    lsq_quantize,
    quantize_gradient,
)

X = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5])


def _grad(fn, x=X):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


# --- estimators: forward rounding and backward formula -------------------------------------------

def test_sign_is_two_valued_and_ste_passes_gradient():
    y, g = _grad(SignSTE.apply)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]  # sign(0) = +1: exactly two values
    assert torch.equal(g, torch.ones_like(X))


def test_clipped_ste_gradient_is_indicator():
    _, g = _grad(lambda x: SignClippedSTE.apply(x, 1.0))
    assert g.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_fourier_gradient_matches_series():
    omega, n = 0.5, 4
    _, g = _grad(lambda x: SignFourier.apply(x, omega, n, None))
    expect = [4 * omega / math.pi * sum(math.cos((2 * i + 1) * omega * v) for i in range(n)) for v in X.tolist()]
    assert torch.allclose(g, torch.tensor(expect), atol=1e-6)
    _, gc = _grad(lambda x: SignFourier.apply(x, omega, n, 1.0))
    assert gc[0] == 0 and gc[-1] == 0 and torch.allclose(gc[1:-1], g[1:-1])


def test_fourier_series_approaches_sign():
    """Integrating the truncated derivative reproduces sign in the low-frequency sense (more terms -> closer)."""
    t = torch.linspace(0.2, 3.0, 50)
    errs = []
    for n in (2, 8, 32):
        s = sum(torch.sin((2 * i + 1) * 1.0 * t) / (2 * i + 1) for i in range(n)) * 4 / math.pi
        errs.append(float((s - 1).abs().mean()))
    assert errs[0] > errs[1] > errs[2]


def test_tanh_estimator_gradient_and_schedule():
    t, k = 2.0, 0.5
    _, g = _grad(lambda x: SignTanh.apply(x, t, k))
    assert torch.allclose(g, k * t * (1 - torch.tanh(t * X) ** 2))
    q = quant.SignQuantizer("tanh", t_min=0.1, t_max=10.0)
    q.set_progress(0.0)
    assert q.tanh_schedule() == pytest.approx((0.1, 10.0))  # stage 1: k = 1/t keeps the gradient wide
    q.set_progress(1.0)
    assert q.tanh_schedule() == pytest.approx((10.0, 1.0))  # stage 2: k = 1, close to sign


def test_lsq_gradients_match_paper():
    x = torch.tensor([0.26, 1.0, -5.0, 5.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq_quantize(x, s, -4, 3, grad_scale=0.25)
    assert y.tolist() == pytest.approx([0.5, 1.0, -2.0, 1.5])
    y.sum().backward()
    assert x.grad.tolist() == [1, 1, 0, 0]  # clipped STE
    v = torch.tensor([0.52, 2.0])
    expect = (torch.round(v) - v).sum() + (-4) + 3
    assert float(s.grad) == pytest.approx(0.25 * float(expect), abs=1e-6)


def test_uniform_activation_values_and_clipped_gradient():
    q = quant.UniformActivation(2)
    y, g = _grad(q, torch.tensor([-0.5, 0.1, 0.5, 0.9, 1.2]))
    assert y.tolist() == pytest.approx([0, 0, 2 / 3, 1, 1])  # torch.round: 1.5 -> 2 (half to even)
    assert g.tolist() == [0, 1, 1, 1, 0]


def test_gradient_quantization_really_quantizes_and_is_unbiased():
    g = torch.randn(4, 300)
    q = quantize_gradient(g, 3)
    for row in q:
        assert row.unique().numel() <= 2**3
    step = 2 * g.abs().amax(1, keepdim=True) / 7
    assert ((q - g).abs() <= step + 1e-6).all()
    mean = torch.stack([quantize_gradient(g, 2) for _ in range(400)]).mean(0)
    assert (mean - g).abs().mean() < 0.05 * g.abs().mean()

    x = torch.randn(8, 16, requires_grad=True)
    seen = {}
    y = GradQuant.apply(x, 2)
    y.register_hook(lambda grad: seen.setdefault("g", grad))
    (y * torch.randn(8, 16)).sum().backward()
    for row in x.grad:
        assert row.unique().numel() <= 4  # what reaches x is the 2-bit gradient
    assert not torch.equal(x.grad, seen["g"])


def test_qnn_layers_quantize_their_gradients():
    lin = quant.QuantLinear(6, 6, bias=False, grad_bits=2)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))  # so x.grad is exactly the gradient the layer passed on
    x = torch.randn(5, 6, requires_grad=True)
    G = torch.randn(5, 6)
    lin(x).backward(G)
    qg = x.grad
    assert not torch.allclose(qg, G)
    for row in qg:
        assert row.unique().numel() <= 4
    assert torch.allclose(lin.weight.grad, qg.T @ x.detach(), atol=1e-6)  # weight gradient from Q(g) too
    model = quant.quantize(MLP(in_features=16, hidden=(32, 32)), "qnn")
    assert model.net[3].grad_quantizer.bits == 6


# --- quantized_weight takes the values the method allows ----------------------------------------

def _values_per_channel(w):
    return [row.unique().numel() for row in w.detach().flatten(1)]


@pytest.mark.parametrize("recipe", ["bwn", "xnor", "fda", "dirnet"])
def test_binary_with_scale_has_two_values_per_channel(recipe):
    m = quant.quantize(ResNet(widths=(8, 16, 16)), recipe)
    for name, layer in quant.quant_layers(m):
        w = layer.quantized_weight()
        assert max(_values_per_channel(w)) == 2, name
        assert ((w.flatten(1) > 0).any(1) & (w.flatten(1) < 0).any(1)).all()
    if recipe == "dirnet":  # power-of-two scales
        w = quant.quant_layers(m)[0][1].quantized_weight().abs().flatten(1).amax(1)
        assert torch.equal(torch.log2(w), torch.round(torch.log2(w)))


def test_bnn_weights_and_inputs_are_plus_minus_one():
    m = quant.quantize(ResNet(widths=(8, 16, 16)), "bnn")
    _, layer = quant.quant_layers(m)[0]
    assert set(layer.quantized_weight().unique().tolist()) == {-1.0, 1.0}
    assert set(layer.input_quantizer(torch.randn(2, 8, 4, 4)).unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("recipe", ["ternary", "ternary-hq", "ternary-ptq"])
def test_ternary_has_three_values_with_zero(recipe):
    m = quant.quantize(ResNet(widths=(8, 16, 16)), recipe)
    quant.set_progress(m, 1.0)
    for _, layer in quant.quant_layers(m):
        w = layer.quantized_weight().detach()
        assert max(_values_per_channel(w)) <= 3
        assert (w == 0).any() and (w > 0).any() and (w < 0).any()
        if recipe == "ternary-ptq":  # symmetric, one scale per layer
            assert w.abs().unique().numel() == 2


@pytest.mark.parametrize("bits,recipe", [(2, "qnn"), (4, "int4"), (8, "int8")])
def test_k_bit_weights_have_at_most_2_to_the_k_values(bits, recipe):
    m = quant.quantize(ResNet(widths=(8, 16, 16)), recipe, **({"w_bits": bits} if recipe == "qnn" else {}))
    for _, layer in quant.quant_layers(m):
        w = layer.quantized_weight().detach()
        if recipe == "qnn":
            assert w.unique().numel() <= 2**bits
        else:
            assert max(_values_per_channel(w)) <= 2**bits


@pytest.mark.parametrize("recipe,sparsity", [("sbnn", 0.8), ("ternary-hq", 0.6), ("ternary-ptq", 0.7)])
def test_sparse_recipes_reach_the_requested_sparsity(recipe, sparsity):
    extra = {"domain": "01"} if recipe == "sbnn" else {}
    m = quant.quantize(ResNet(widths=(8, 16, 16)), recipe, sparsity=sparsity, **extra)
    quant.set_progress(m, 1.0)
    for _, layer in quant.quant_layers(m):
        w = layer.quantized_weight().detach()
        assert float((w == 0).float().mean()) == pytest.approx(sparsity, abs=1.0 / w.numel() + 1e-6)
    if recipe == "sbnn":
        w = quant.quant_layers(m)[0][1].quantized_weight().detach()
        assert (w >= 0).all() and max(_values_per_channel(w)) == 2  # {0, alpha_c}


def test_sbnn_general_domain_is_binary_with_sparse_mask():
    m = quant.quantize(ResNet(widths=(8, 16, 16)), "sbnn", sparsity=0.8)
    for _, layer in quant.quant_layers(m):
        w = layer.quantized_weight().detach()
        mask = layer.weight_quantizer.mask(layer.weight)
        assert max(_values_per_channel(w)) <= 2
        assert float(1 - mask.mean()) == pytest.approx(0.8, abs=1.0 / w.numel() + 1e-6)
        for row, mrow in zip(w.flatten(1), mask.flatten(1)):  # alpha_c on the mask, beta_c < alpha_c off it
            on, off = row[mrow == 1], row[mrow == 0]
            assert on.unique().numel() <= 1 and off.unique().numel() <= 1
            if on.numel() and off.numel():
                assert on[0] > off[0]


def test_hq_prunes_gradually_then_reinitialises_latent_weights():
    m = quant.quantize(ResNet(widths=(8, 16, 16)), "ternary-hq", sparsity=0.5, float_phase=0.5)
    _, layer = quant.quant_layers(m)[0]
    quant.set_progress(m, 0.25)
    w = layer.quantized_weight().detach()
    # ramping: halfway through the float phase, sparsity * (1 - (1 - 1/2)^3) of the layer is pruned
    assert float((w == 0).float().mean()) == pytest.approx(0.5 * (1 - 0.5**3), abs=1.0 / w.numel() + 1e-6)
    assert w.flatten(1)[0].abs().unique().numel() > 3  # still float on the hypersphere
    assert (layer.weight == 0).float().mean() == 0
    quant.set_progress(m, 0.5)
    assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=1.0 / w.numel() + 1e-6)  # re-initialised
    assert torch.allclose(layer.weight.flatten(1).norm(dim=1), torch.ones(layer.weight.shape[0]))


def test_ptq_penalty_pulls_weights_toward_the_grid():
    m = quant.quantize(ResNet(widths=(8, 16, 16)), "ternary-ptq", decay=1.0)
    p0 = quant.penalty(m)
    assert p0 is not None and p0 > 0
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        quant.penalty(m).backward()
        opt.step()
    assert quant.penalty(m) < 0.1 * p0  # measured 0.017-0.030 of p0 over 4 seeds


def test_each_ternary_method_is_its_own_class_and_the_string_shortcut_builds_it():
    from lowbit.quant.quantizers import (HypersphericalTernaryWeight, PrunedTernaryWeight,
                                         ThresholdTernaryWeight, TernaryWeight)

    hq = TernaryWeight("hq", sparsity=0.3, float_phase=0.5)
    assert type(hq) is HypersphericalTernaryWeight and (hq.sparsity, hq.float_phase) == (0.3, 0.5)
    assert type(TernaryWeight()) is ThresholdTernaryWeight and type(TernaryWeight("twn")) is ThresholdTernaryWeight
    ptq = TernaryWeight("ptq", decay=0.1)
    assert type(ptq) is PrunedTernaryWeight and (ptq.sparsity, ptq.decay) == (0.5, 0.1)
    assert isinstance(ptq, TernaryWeight) and isinstance(hq, quant.Quantizer)  # export's checks still apply
    for recipe, cls in [("ternary", ThresholdTernaryWeight), ("ternary-hq", HypersphericalTernaryWeight),
                        ("ternary-ptq", PrunedTernaryWeight)]:
        m = quant.quantize(ResNet(widths=(8, 16, 16)), recipe)
        assert {type(layer.weight_quantizer) for _, layer in quant.quant_layers(m)} == {cls}
    with pytest.raises(ValueError, match="'twn' .* takes no sparsity"):
        TernaryWeight("twn", sparsity=0.5)
    with pytest.raises(ValueError, match="'ptq' .* takes no float_phase"):
        TernaryWeight("ptq", float_phase=0.5)
    with pytest.raises(ValueError, match="unknown ternary method 'xyz'"):
        TernaryWeight("xyz")
    with pytest.raises(ValueError, match="sparsity must be"):
        HypersphericalTernaryWeight(sparsity=1.0)
    # a state_dict from when one class held all three methods (HQ's flag in every one) still loads
    w = torch.randn(8, 4, 3, 3)
    twn = ThresholdTernaryWeight()
    twn.load_state_dict({"progress": torch.tensor(1.0), "reinitialized": torch.tensor(False)})
    assert float(twn.progress) == 1.0 and "reinitialized" not in twn.state_dict()
    assert max(_values_per_channel(twn(w))) <= 3


# --- layers ------------------------------------------------------------------------------------

def test_xnor_conv_equals_scaled_binary_conv():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    q = quant.QuantConv2d.from_float(conv, weight_quantizer=quant.BinaryWeight("mean"),
                                     input_quantizer=quant.BinaryActivation(xnor_scale=True))
    x = torch.randn(2, 4, 5, 5)
    alpha = conv.weight.abs().mean((1, 2, 3), keepdim=True)
    wb = torch.where(conv.weight >= 0, 1.0, -1.0) * alpha
    xb = torch.where(x >= 0, 1.0, -1.0)
    k = torch.nn.functional.avg_pool2d(x.abs().mean(1, keepdim=True), 3, 1, 1)
    ref = torch.nn.functional.conv2d(xb, wb, None, 1, 1) * k + conv.bias.reshape(1, -1, 1, 1)
    assert torch.allclose(q(x), ref, atol=1e-5)


def test_float_layers_are_unchanged_by_default_quantizers():
    lin = nn.Linear(5, 3)
    q = quant.QuantLinear.from_float(lin)
    x = torch.randn(4, 5)
    assert torch.allclose(q(x), lin(x))


# --- quantize(): copies, first/last, errors, state_dict ------------------------------------------

def test_quantize_copies_and_keeps_first_and_last_float():
    model = ResNet(widths=(8, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quant.quantize(model, "xnor")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (quant.QuantConv2d, quant.QuantLinear)) for m in model.modules())
    assert type(q.stem[0]) is nn.Conv2d and type(q.head) is nn.Linear
    assert isinstance(q.layers[0].conv1, quant.QuantConv2d)
    assert not any(isinstance(m, nn.ReLU) for m in q.modules())  # sign of a ReLU output would be all +1
    assert any(isinstance(m, nn.ReLU) for m in quant.quantize(model, "bwn").modules())
    q_all = quant.quantize(model, "bwn", keep_first_last=False)
    assert isinstance(q_all.stem[0], quant.QuantConv2d) and isinstance(q_all.head, quant.QuantLinear)


def _with_rnn() -> nn.Module:
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    m.add_module("rnn", nn.LSTM(3, 3))
    return m


def test_quantize_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown recipe 'xnr'"):
        quant.quantize(MLP(), "xnr")
    with pytest.raises(TypeError, match="no option.*'bitz'"):
        quant.quantize(MLP(), "int4", bitz=3)
    with pytest.raises(ValueError, match="sparsity"):
        quant.quantize(MLP(hidden=(8, 8)), "sbnn", sparsity=1.5)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mid = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.mid(self.mha(h, h, h)[0]))

    with pytest.raises(ValueError, match=r"rnn' \(LSTM\).*skip=\['rnn'\]"):
        quant.quantize(_with_rnn(), "bnn")
    q = quant.quantize(Attn(), "int8", skip=["mha"])
    assert isinstance(q.mid, quant.QuantLinear) and type(q.mha.out_proj) is not quant.QuantLinear
    assert q(torch.randn(2, 3, 8)).shape == (2, 3, 2)
    with pytest.raises(ValueError, match="no nn.Conv2d/nn.Linear layer left"):
        quant.quantize(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), "bnn")
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, dilation=2), nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="layer '1'.*dilation"):
        quant.quantize(conv, "xnor")


@pytest.mark.parametrize("recipe", sorted(quant.RECIPES))
def test_state_dict_round_trip(recipe, tmp_path):
    torch.manual_seed(0)
    model = ResNet(widths=(8, 16, 16))
    q = quant.quantize(model, recipe)
    q(torch.randn(4, 1, 12, 12))  # LSQ initialises its steps on the first batch
    quant.set_progress(q, 0.6)
    q.eval()
    x = torch.randn(3, 1, 12, 12)
    ref = q(x)
    torch.save(q.state_dict(), tmp_path / "q.pt")
    fresh = quant.quantize(model, recipe)
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    fresh.eval()
    assert torch.allclose(fresh(x), ref, atol=1e-6)


def test_model_size_counts_bits_and_scales():
    model = MLP(in_features=16, hidden=(64, 32), out_features=4)
    q = quant.quantize(model, "bwn")
    size = quant.model_size(q)
    # first and last linear float; middle one 64*32 weights at 1 bit + 32 scales + 32 biases in fp32
    float_bytes = 4 * ((16 * 64 + 64) + (32 * 4 + 4))
    assert size.packed_bytes == float_bytes + 64 * 32 // 8 + 4 * (32 + 32)
    assert size.float32_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert size.compression > 1
    int4 = quant.model_size(quant.quantize(model, "int4"))
    assert int4.packed_bytes > size.packed_bytes  # 4 bits > 1 bit
    text = quant.summary(q)
    assert "recipe: bwn" in text and "BinaryWeight" in text and "compression" in text


def test_fda_noise_adaptation_is_training_only():
    q = quant.quantize(ResNet(widths=(8, 16, 16)), "fda")
    _, layer = quant.quant_layers(q)[0]
    assert layer.input_quantizer.noise is not None
    sizes = quant.model_size(q)
    assert not any("noise" in r.name for r in sizes.rows)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        layer.input_quantizer.noise.net[2].weight.fill_(0.1)
    layer.input_quantizer.train()
    assert layer.input_quantizer(x).unique().numel() > 2
    layer.input_quantizer.eval()
    assert set(layer.input_quantizer(x).unique().tolist()) == {-1.0, 1.0}
    quant.set_progress(q, 1.0)  # faded out by the end of training
    layer.input_quantizer.train()
    assert set(layer.input_quantizer(x).unique().tolist()) == {-1.0, 1.0}


def test_distillation_loss_zero_for_identical_and_trains_with_teacher():
    a = {"l": torch.randn(4, 3, 2, 2)}
    assert float(quant.distillation_loss(a, {"l": 3 * a["l"]})) == pytest.approx(0, abs=1e-6)
    x, y = load_images("digits", "train", 128)
    teacher = ResNet(widths=(8, 8, 8))
    student = quant.quantize(teacher, "dirnet")
    r = quant.train_quantized(student, (x, y), (x[:32], y[:32]), epochs=1, batch_size=64, teacher=teacher, progress=False)
    assert math.isfinite(r.train_losses[-1])


@pytest.mark.parametrize("recipe", sorted(quant.RECIPES))
def test_every_recipe_learns_on_real_data(recipe):
    """Three epochs on 1000 scikit-learn digits: every recipe near what it reaches (chance is 10%)."""
    torch.manual_seed(0)
    train = load_images("digits", "train", 1000)
    test = load_images("digits", "test", 300)
    q = quant.quantize(ResNet(widths=(16, 32, 32)), recipe)
    r = quant.train_quantized(q, train, test, epochs=3, batch_size=64, lr=5e-3, progress=False)
    # measured at this seed and at seed 1: binary inputs 67-77%, qnn (2-bit inputs) 81-87%, the
    # rest 94-98%; each floor leaves 10 points or more below the lowest
    floor = 55 if quant.get_recipe(recipe).binary_inputs else 70 if recipe == "qnn" else 84
    assert r.metric > floor, r.metric


# --- export: packed inference ------------------------------------------------------------------

@pytest.mark.parametrize("recipe,kw", [("bnn", {}), ("xnor", {}), ("fda", {}), ("dirnet", {}), ("sbnn", {}),
                                       ("sbnn", {"domain": "01"}), ("bwn", {}), ("ternary", {}),
                                       ("ternary-hq", {}), ("ternary-ptq", {})])
@pytest.mark.parametrize("batch,fused", [(1, True), (40, True), (40, False)])
def test_export_matches_fake_quantized_model(recipe, kw, batch, fused, monkeypatch):
    import importlib

    export_module = importlib.import_module("lowbit.quant.packed_binary")
    monkeypatch.setattr(export_module, "FUSED", fused)
    torch.manual_seed(0)
    q = quant.quantize(ResNet(widths=(8, 16, 96)), recipe, **kw)  # 96 channels: neither divides nor is a multiple of 64
    q(torch.randn(16, 1, 12, 12))  # BatchNorm statistics
    quant.set_progress(q, 1.0)
    q.eval()
    exported = quant.export(q, fold_batchnorm=False)  # layer by layer below: each layer as it was
    x = torch.randn(batch, 1, 12, 12)
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, (i[0], o)))
             for n, m in quant.quant_layers(q)]
    with torch.no_grad():
        ref, out = q(x), exported(x)
        for h in hooks:
            h.remove()
        for name, (xi, yi) in inputs.items():  # layer by layer on the same input: integer part exact
            packed = exported.get_submodule(name)
            assert torch.allclose(packed(xi), yi, atol=1e-5, rtol=1e-5), name
    # end to end: the packed model computes the same function, up to float rounding after scaling
    # (at most 2.4e-7 measured over every case here and 3 more seeds at batch 40; no sample of
    # them differed by more)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), float((out - ref).abs().max())
    assert not any(isinstance(m, (quant.QuantConv2d, quant.QuantLinear)) for m in exported.modules())
    assert quant.storage_bytes(exported) < quant.storage_bytes(q) / 4
    # BatchNorm folded into the packed layers' scale and shift (and the float stem conv): same outputs
    folded = quant.export(q)
    with torch.no_grad():
        y = folded(x)
    assert torch.allclose(y, out, atol=1e-5, rtol=1e-5), float((y - out).abs().max())  # measured: <= 1.8e-7
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    binary = recipe in ("bnn", "xnor", "fda", "dirnet")
    assert n_bn == (0 if binary else sum(isinstance(m, nn.BatchNorm2d) for m in exported.modules()) - 1), n_bn


def test_export_saves_loads_and_is_small(tmp_path):
    torch.manual_seed(0)
    model = ResNet()
    q = quant.quantize(model, "xnor")
    q(torch.randn(8, 1, 28, 28))
    q.eval()
    unfolded = quant.export(q, fold_batchnorm=False)
    size = quant.model_size(unfolded)  # real bytes of the packed layers, float32 of the rest
    assert size.packed_bytes == quant.storage_bytes(unfolded) - 8 * sum(
        1 for k in unfolded.state_dict() if k.endswith("num_batches_tracked"))
    assert size.float32_bytes == quant.model_size(model).float32_bytes and size.compression > 20
    exported = quant.export(q)  # BatchNorms folded: smaller still
    assert quant.storage_bytes(model) / quant.storage_bytes(exported) > 20
    assert quant.model_size(exported).packed_bytes < size.packed_bytes
    assert "PackedBinaryConv2d" in quant.summary(exported)
    torch.save(exported.state_dict(), tmp_path / "packed.pt")
    fresh = quant.export(quant.quantize(ResNet(), "xnor"))
    fresh.load_state_dict(torch.load(tmp_path / "packed.pt", weights_only=True))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fresh(x), exported(x))
    for recipe in ("xnor", "sbnn", "ternary"):
        mlp = quant.quantize(MLP(in_features=20, hidden=(70, 64)), recipe)
        mlp.eval()
        seq = nn.Sequential(*list(mlp.net.children())[1:])  # without Flatten: takes [..., F] inputs
        x = torch.randn(3, 5, 20)  # a leading batch and token dimension
        with torch.no_grad():
            assert torch.allclose(quant.export(seq)(x), seq(x), atol=1e-5), recipe


def test_export_refuses_what_it_cannot_pack():
    with pytest.raises(ValueError, match=r"UniformActivation inputs\) has no packed form"):
        quant.export(quant.quantize(ResNet(widths=(8, 8, 8)), "qnn"))  # DoReFa inputs on [0, 1]


def test_export_of_an_untraceable_model_warns_and_keeps_batchnorm():
    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if float(y.sum()) > -1e9 else -y

    m = Branchy().eval()
    with pytest.warns(UserWarning, match="not folded"):
        e = quant.export(m)
    assert isinstance(e.bn, nn.BatchNorm2d)
    x = torch.randn(2, 1, 6, 6)
    with torch.no_grad():
        assert torch.allclose(e(x), m(x), atol=1e-6)
