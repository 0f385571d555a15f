import itertools

import pytest
import torch
from torch import nn

from lowbit import quant
from lowbit.data import load_images
from lowbit.models import MLP, ResNet, ViT
from lowbit.models.resnet import BasicBlock


def test_rtn_weight_levels_and_error():
    w = torch.randn(6, 5, 3, 3)
    for bits in (2, 3, 4, 8):
        q = quant.rtn_weight(w, bits)
        assert max(row.unique().numel() for row in q.flatten(1)) <= 2**bits - 1
    errs = [float((quant.rtn_weight(w, b) - w).pow(2).sum()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_hutchinson_matches_exact_hessian_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    w = model[0].weight

    def loss_of(wflat):
        out = torch.tanh(x @ wflat.reshape(3, 4).T + model[0].bias)
        return nn.functional.cross_entropy(model[2](out), y)

    exact = float(torch.autograd.functional.hessian(loss_of, w.detach().flatten()).diagonal().sum())
    est = quant.hutchinson_trace(model, (x, y), [w], samples=4000)[0]
    assert est == pytest.approx(exact, rel=0.05, abs=1e-3)


def _brute_force(sens, sizes, total_bits):
    names = list(sens)
    best = None
    for combo in itertools.product(*[sorted(sens[n]) for n in names]):
        if sum(sizes[n] * b for n, b in zip(names, combo)) <= total_bits + 1e-9:
            cost = sum(sens[n][b] for n, b in zip(names, combo))
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_optimal_and_within_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(4)]
    sizes = {n: int(torch.randint(10, 200, (1,), generator=gen)) for n in names}
    sens = {}
    for n in names:  # decreasing in bits, like real sensitivities
        vals = sorted(torch.rand(4, generator=gen).tolist(), reverse=True)
        sens[n] = dict(zip((2, 3, 4, 8), vals))
    for avg in (2.5, 3.0, 4.5):
        plan = quant.allocate_bits(sens, sizes, average_bits=avg)
        total = avg * sum(sizes.values())
        assert sum(sizes[n] * b for n, b in plan.items()) <= total + 1e-6
        assert quant.average_bits(plan, sizes) <= avg + 1e-9
        assert sum(sens[n][plan[n]] for n in names) == pytest.approx(_brute_force(sens, sizes, total))
    plan = quant.allocate_bits(sens, sizes, budget_bytes=sum(sizes.values()) * 3 / 8)
    assert sum(sizes[n] * b for n, b in plan.items()) <= sum(sizes.values()) * 3 + 1e-6
    with pytest.raises(ValueError, match="below the smallest"):
        quant.allocate_bits(sens, sizes, average_bits=1)
    with pytest.raises(ValueError, match="exactly one"):
        quant.allocate_bits(sens, sizes)
    assert quant.average_bits({"a": 2, "b": 8}, {"a": 3, "b": 1}) == 3.5  # weighted by layer size


def test_sensitivity_hessian_loss_and_kl_on_a_trained_model():
    torch.manual_seed(0)
    x, y = load_images("digits", "train", 256)
    model = MLP(in_features=64, hidden=(32, 32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for how in ("hessian", "loss", "kl"):
        s = quant.sensitivity(model, (x, y), bits=(2, 4, 8), how=how, samples=8)
        assert set(s) == {"net.1", "net.3", "net.5"}
        for name, per_bits in s.items():
            assert per_bits[2] > per_bits[8]  # fewer bits, more damage
            if how == "kl":  # a divergence from the float model's outputs: never negative
                assert min(per_bits.values()) >= 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    plan = quant.allocate_bits(quant.sensitivity(model, (x, y), bits=(2, 4, 8), samples=8),
                               quant.weight_counts(model), average_bits=4)
    assert set(plan.values()) <= {2, 4, 8}
    with pytest.raises(ValueError, match="unknown sensitivity"):
        quant.sensitivity(model, (x, y), how="fisher")
    with pytest.raises(ValueError, match="integers in 1..16"):
        quant.sensitivity(model, (x, y), bits=(0, 4))


def test_fold_batchnorm_preserves_outputs():
    torch.manual_seed(0)
    model = ResNet(widths=(8, 16, 16))
    model(torch.randn(32, 1, 12, 12))  # running statistics
    model.eval()
    folded = quant.fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # input untouched
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    # the copy keeps the model's own classes (its blocks can be run and hooked on their own)
    assert type(folded) is ResNet and isinstance(folded.layers[0], BasicBlock)
    assert isinstance(folded.layers[0].bn1, nn.Identity)


def test_find_units_groups_layers_into_blocks():
    names = [n for n, _ in quant.mixed.weight_layers(ResNet(widths=(8, 16, 16)))]
    units = dict(quant.find_units(ResNet(widths=(8, 16, 16)), names))
    assert units["stem.0"] == ["stem.0"] and units["head"] == ["head"]
    assert units["layers.1"] == ["layers.1.conv1", "layers.1.conv2", "layers.1.shortcut.0"]
    vit = ViT(image_size=8, patch=4, dim=16, depth=2, heads=2)
    names = [n for n, _ in quant.mixed.weight_layers(vit)]
    units = dict(quant.find_units(vit, names))
    assert units["blocks.0"] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2"]
    assert [u for u, _ in quant.find_units(vit, names, "layer")] == names
    with pytest.raises(ValueError, match="granularity"):
        quant.find_units(vit, names, "model")


def _trained_resnet():
    torch.manual_seed(0)
    train = load_images("digits", "train", 600)
    model = ResNet(widths=(16, 32, 32))
    quant.train_quantized(model, train, train, epochs=3, batch_size=64, lr=5e-3, progress=False)
    return model.eval(), train


def test_ptq_rtn_keeps_accuracy_at_8_bits_and_puts_values_on_the_grid():
    model, (x, y) = _trained_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    test_x, test_y = load_images("digits", "test", 300)
    with torch.no_grad():
        float_acc = float((model(test_x).argmax(1) == test_y).float().mean())
    accs = {}
    for wb, ab in ((8, 8), (4, 8), (2, 2)):
        q = quant.ptq(model, x[:256], w_bits=wb, a_bits=ab)
        with torch.no_grad():
            accs[(wb, ab)] = float((q(test_x).argmax(1) == test_y).float().mean())
        layer = quant.quant_layers(q)[0][1]
        assert max(row.unique().numel() for row in layer.weight.flatten(1)) <= 2**wb - 1
        xin = torch.randn(2, layer.in_channels, 6, 6) * 3
        assert layer.input_quantizer(xin).unique().numel() <= 2**ab
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert accs[(8, 8)] >= float_acc - 0.01
    assert accs[(2, 2)] < accs[(8, 8)]
    size8 = quant.model_size(quant.ptq(model, x[:64], w_bits=8, a_bits=8)).packed_bytes
    size4 = quant.model_size(quant.ptq(model, x[:64], w_bits=4, a_bits=8)).packed_bytes
    assert size4 < size8


def test_ptq_mixed_widths_and_calibrations():
    model, (x, _) = _trained_resnet()
    names = [n for n, _ in quant.mixed.weight_layers(quant.fold_batchnorm(model))][1:-1]
    plan = {n: (2 if i % 2 else 8) for i, n in enumerate(names)}
    q = quant.ptq(model, x[:128], w_bits=plan, a_bits=None)
    for n, layer in quant.quant_layers(q):
        assert layer.weight_bits == plan[n] and layer.input_quantizer is None
    from lowbit.quant.ptq import _range

    acts = torch.relu(torch.randn(20000)) ** 2  # heavy tail
    err = {}
    for how in ("minmax", "percentile", "mse"):
        lo, hi = _range(acts, 4, how, 99.9)
        err[how] = float((quant.FixedUniform(4, lo, hi)(acts) - acts).pow(2).mean())
        assert lo == 0.0  # unsigned data keeps 0 exact
    assert err["mse"] <= err["minmax"] and err["percentile"] < err["minmax"]
    with pytest.raises(ValueError, match="unknown ptq method"):
        quant.ptq(model, x[:8], method="gptq")
    with pytest.raises(ValueError, match="does not have"):
        quant.ptq(model, x[:8], w_bits={"nope": 4})


def test_adaround_rounds_each_weight_up_or_down_and_beats_rtn():
    from lowbit.quant.ptq import adaround_weight

    torch.manual_seed(0)
    layer = nn.Conv2d(8, 6, 3, padding=1)
    # correlated channels, as real activations are: rounding errors can then cancel across
    # weights, which AdaRound exploits (for white inputs round-to-nearest is already optimal)
    x = torch.randn(128, 1, 6, 6).repeat(1, 8, 1, 1) + 0.2 * torch.randn(128, 8, 6, 6)
    w = layer.weight.detach()
    for bits in (2, 3):
        wq = adaround_weight(layer, x, x, bits, iters=300, batch=32)
        scale = w.abs().amax((1, 2, 3), keepdim=True) / (2 ** (bits - 1) - 1)
        steps = wq / scale
        assert torch.allclose(steps, steps.round(), atol=1e-4)  # on the grid
        assert ((steps.round() == torch.floor(w / scale)) | (steps.round() == torch.ceil(w / scale))).all()
        with torch.no_grad():
            ref = layer(x)
            err_ada = float((nn.functional.conv2d(x, wq, layer.bias, padding=1) - ref).pow(2).mean())
            err_rtn = float((nn.functional.conv2d(x, quant.rtn_weight(w, bits), layer.bias, padding=1) - ref).pow(2).mean())
        assert err_ada < err_rtn


def test_adaround_one_bit_learns_signs_on_the_binary_levels():
    """1 bit: two levels +-mean|w| per output channel; the hard rounding at initialisation is
    rtn_weight's sign(w) * mean|w|, and learning only flips signs (lowering the output error)."""
    from lowbit.quant.ptq import adaround_weight

    torch.manual_seed(0)
    layer = nn.Conv2d(8, 6, 3, padding=1)
    x = torch.randn(128, 1, 6, 6).repeat(1, 8, 1, 1) + 0.2 * torch.randn(128, 8, 6, 6)
    w = layer.weight.detach()
    alpha = w.abs().mean((1, 2, 3), keepdim=True)
    assert torch.equal(quant.AdaRoundWeight(w, 1)(), quant.rtn_weight(w, 1))
    wq = adaround_weight(layer, x, x, 1, iters=300, batch=32)
    assert torch.allclose(wq.abs(), alpha.expand_as(wq))  # only the two levels
    with torch.no_grad():
        ref = layer(x)
        err_ada = float((nn.functional.conv2d(x, wq, layer.bias, padding=1) - ref).pow(2).mean())
        err_rtn = float((nn.functional.conv2d(x, quant.rtn_weight(w, 1), layer.bias, padding=1) - ref).pow(2).mean())
    assert err_ada < err_rtn
    with pytest.raises(ValueError, match="weight bits"):
        quant.AdaRoundWeight(w, 0)


def test_block_reconstruction_beats_rtn_on_a_vit_and_stays_on_the_grid():
    torch.manual_seed(0)
    x, y = load_images("digits", "train", 600)
    vit = ViT(image_size=8, patch=4, dim=32, depth=2, heads=2, dropout=0.0)
    quant.train_quantized(vit, (x, y), (x, y), epochs=4, batch_size=64, lr=3e-3, progress=False)
    vit.eval()
    with torch.no_grad():
        ref = vit(x[256:])
    err = {}
    for method in ("rtn", "adaround"):
        q = quant.ptq(vit, x[:256], w_bits=3, a_bits=None, method=method, adaround={"iters": 120})
        with torch.no_grad():
            err[method] = float((q(x[256:]) - ref).pow(2).mean())
        layer = q.blocks[0].mlp[0]
        assert isinstance(layer, quant.QuantLinear) and layer.weight_quantizer is None  # rounding baked in
        scale = layer.weight.abs().amax(1, keepdim=True) / 3
        assert torch.allclose(layer.weight / scale, (layer.weight / scale).round(), atol=1e-4)
    assert err["adaround"] < err["rtn"]


def test_ptq_adaround_recovers_2_bit_weights():
    model, (x, y) = _trained_resnet()
    test_x, test_y = load_images("digits", "test", 300)

    def acc(m):
        with torch.no_grad():
            return float((m(test_x).argmax(1) == test_y).float().mean())

    rtn = quant.ptq(model, x[:256], w_bits=2, a_bits=8)
    ada = quant.ptq(model, x[:256], w_bits=2, a_bits=8, method="adaround", adaround={"iters": 150})
    assert acc(ada) > acc(rtn)


def test_border_function_moves_rounding_by_at_most_one_level():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2
    bq = quant.BorderQuantizer(2, -3.0, 3.0, channels=3, channel_dim=1)
    rtn = quant.FixedUniform(2, -3.0, 3.0)
    assert torch.equal(bq(x), rtn(x))  # border 0.5 at the start: plain rounding
    with torch.no_grad():
        bq.a.copy_(torch.tensor([0.8, -0.8, 0.0]))
        bq.b.copy_(torch.tensor([0.0, 0.5, -1.0]))
    scale = 6.0 / 3
    levels_b = (bq(x) + 3.0) / scale
    levels_r = (rtn(x) + 3.0) / scale
    assert torch.allclose(levels_b, levels_b.round(), atol=1e-5)  # on the grid
    assert (levels_b.round() - levels_r.round()).abs().max() <= 1
    assert not torch.equal(bq(x), rtn(x))
    bq.soft = True  # the relaxation used while learning is differentiable in the border parameters
    bq(x).sum().backward()
    assert bq.a.grad is not None and bq.a.grad.abs().sum() > 0


def test_ptq_aquant_learns_borders():
    model, (x, _) = _trained_resnet()
    q = quant.ptq(model, x[:128], w_bits=4, a_bits=2, method="aquant", adaround={"iters": 60})
    borders = [m.input_quantizer for _, m in quant.quant_layers(q)]
    assert all(isinstance(b, quant.BorderQuantizer) and not b.soft for b in borders)
    assert any(float(b.a.abs().sum() + b.b.abs().sum()) > 0 for b in borders)


def test_aquant_borders_never_raise_the_unit_error_over_adaround():
    """Stage 1 of an AQuant unit is AdaRound itself (same seed, hard rounding with a straight-through
    gradient); the borders learned after it are kept only where they lower the calibration error."""
    import copy

    from lowbit.quant.ptq import quant_layer_from_float
    from lowbit.quant.reconstruct import reconstruct

    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(256, 12)
    errors = {}
    for method in ("adaround", "aquant"):
        unit = copy.deepcopy(fp)
        with torch.no_grad():
            h = fp[:2](x)
        lo, hi = float(h.min()), float(h.max())
        iq = (quant.BorderQuantizer(2, lo, hi, channels=16, channel_dim=-1) if method == "aquant"
              else quant.FixedUniform(2, lo, hi))
        unit[2] = quant_layer_from_float(fp[2], input_quantizer=iq,
                                               weight_quantizer=quant.AdaRoundWeight(fp[2].weight, 2))
        unit[0] = quant_layer_from_float(fp[0], weight_quantizer=quant.AdaRoundWeight(fp[0].weight, 2))
        reconstruct(unit, fp, x, x, iters=80, seed=3)
        with torch.no_grad():
            errors[method] = float((unit(x) - fp(x)).pow(2).sum(1).mean())
        if method == "aquant":  # hard border: the straight-through gradient of plain rounding
            xi, xr = (h * 1.5).requires_grad_(True), (h * 1.5).requires_grad_(True)
            iq(xi).sum().backward()
            quant.FixedUniform(2, lo, hi)(xr).sum().backward()
            assert torch.equal(xi.grad, xr.grad) and 0 < xi.grad.mean() < 1
    assert errors["aquant"] <= errors["adaround"] * (1 + 1e-6), errors


def test_recorded_block_outputs_are_the_float_targets_and_only_rounding_learns():
    """capture_all_unit_inputs keeps each block's float output (the reconstruction target, no
    second run); reconstruct trains only the rounding variables and leaves the rest as it was."""
    from lowbit.quant.ptq import AdaRoundWeight, quant_layer_from_float
    from lowbit.quant.reconstruct import capture_all_unit_inputs, reconstruct

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.ReLU()),
                          nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Linear(6, 2)).eval()
    x = torch.randn(40, 6)
    got = capture_all_unit_inputs(model, ["1", "2"], x, batch_size=16)
    with torch.no_grad():
        for u in ("1", "2"):
            inputs, _ = got[u]
            assert torch.allclose(inputs.output, model.get_submodule(u)(inputs.x))
    unit = nn.Sequential(quant_layer_from_float(model[1][0], weight_quantizer=AdaRoundWeight(model[1][0].weight, 2)),
                         nn.ReLU())
    reconstruct(unit, model[1], got["1"][0], got["1"][0], iters=20, target=got["1"][0].output)
    assert unit[0].weight_quantizer is None and unit[0].bias.requires_grad  # baked, bias untouched
    with pytest.raises(ValueError, match="target holds"):
        reconstruct(unit, model[1], got["1"][0], got["1"][0], iters=1, target=torch.zeros(3, 6))
