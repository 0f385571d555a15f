import pytest
import torch

from lowbit import quant
from lowbit.data import load_images
from lowbit.models import ResNet
from lowbit.quant import vertical as V


def test_every_width_is_the_cascade_of_the_next_one_up():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    codes, scale = V.store_codes(w)
    assert codes.dtype == torch.int8 and codes.abs().max() == 127
    for b in range(7, 1, -1):
        upper, lower = V.cascade(codes, b + 1), V.cascade(codes, b)
        halved = torch.sign(upper) * torch.div(upper.abs() + 1, 2, rounding_mode="floor")
        assert torch.equal(lower, halved.clamp(-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1))
        assert torch.equal(V.cascade(upper, b, from_bits=b + 1), lower)  # derived from b+1 alone
        assert lower.abs().max() <= 2 ** (b - 1) - 1
    # each width approximates the float weight on its own grid: error at most one step of it
    for b in V.WIDTHS:
        err = (V.decode(codes, scale, b) - w).abs()
        assert (err <= scale * 2 ** (8 - b) * 1.0 + 1e-6).all()
    with pytest.raises(ValueError, match="2..8"):
        V.cascade(codes, 1)


def test_set_bits_switches_the_whole_model_or_layer_by_layer():
    torch.manual_seed(0)
    m = quant.quantize(ResNet(widths=(8, 16, 16)), "vertical")
    x = torch.randn(3, 1, 12, 12)
    m.eval()
    outs = {}
    for b in V.WIDTHS:
        with V.use_bits(m, b):
            outs[b] = m(x)
            assert set(V.get_bits(m).values()) == {b}
    assert set(V.get_bits(m).values()) == {8}  # restored
    assert not torch.allclose(outs[8], outs[2])
    layer = m.layers[0].conv1
    V.set_bits(m, {"layers.0.conv1": 3})
    bits = V.get_bits(m)
    assert bits["layers.0.conv1"] == 3 and bits["layers.1.conv1"] == 8 and layer.input_quantizer.bits == 3
    codes, scale = V.store_codes(layer.weight)
    assert torch.equal(layer.quantized_weight(), V.decode(codes, scale, 3))
    with pytest.raises(ValueError, match="2..8"):
        V.set_bits(m, 9)
    with pytest.raises(ValueError, match="no vertical layer"):
        V.set_bits(m, {"nope": 4})
    with pytest.raises(ValueError, match="no vertical quantizer"):
        V.set_bits(ResNet(), 4)


def test_once_qat_trains_every_width_and_one_store_reloads_them_all(tmp_path):
    torch.manual_seed(0)
    train = load_images("digits", "train", 500)
    test = load_images("digits", "test", 300)
    m = quant.quantize(ResNet(widths=(8, 16, 16)), "vertical")
    quant.train_quantized(m, train, test, epochs=3, batch_size=64, lr=5e-3, progress=False, loss_fn=V.once_loss())
    from lowbit.train import evaluate_classifier

    acc = {}
    for b in (8, 4, 2):
        with V.use_bits(m, b):
            acc[b] = evaluate_classifier(m, *test)
    assert acc[8] > 50 and acc[4] > 50 and acc[2] > 25  # ten classes: chance is 10
    path = tmp_path / "once.pt"
    torch.save(V.export_store(m), path)
    state = torch.load(path, weights_only=True)
    assert all(state[f"{n}.weight_codes"].dtype == torch.int8 for n in V.get_bits(m))
    fresh = V.load_store(quant.quantize(ResNet(widths=(8, 16, 16)), "vertical"), state, bits=4)
    m.eval(), fresh.eval()
    x = test[0][:16]
    for b in V.WIDTHS:
        with torch.no_grad(), V.use_bits(m, b), V.use_bits(fresh, b):
            assert torch.allclose(m(x), fresh(x), atol=1e-5)
    with pytest.raises(ValueError, match="objective"):
        V.once_loss(objective="max")
    with pytest.raises(ValueError, match="no entry"):
        V.once_loss(widths=(8, 4), objective="weighted", weights={8: 1.0})
