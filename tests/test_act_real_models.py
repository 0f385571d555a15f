"""ActivationCompressor on the layouts, nets and probes real models bring: saved views restored
with their exact strides, recurrent nets with many small saved tensors, a probe whose cost does
not grow with depth."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _grad_helpers import cos as _cos, grad as _grad

from lowbit.act import ActivationCompressor
from lowbit.act.probe import probe_groups
from lowbit.act.gact import TensorStat
from lowbit.models.rnn import CharRNN


def _views():
    x = torch.randn(4, 32, 3 * 64)
    q, k, v = x.split(64, dim=2)  # GPT-2's c_attn split: interleaved, stride 3x the row
    return [q, k, v, q.view(4, 32, 4, 16).transpose(1, 2), x.transpose(1, 2), x[:, 1:], x[1:], x[:, :, 5],
            torch.randn(64, 1).expand(64, 128), torch.randn(8, 64)[2:].t(), torch.randn(2, 3, 5, 7)[:, 1:]]


@pytest.mark.parametrize("i", range(11))
def test_restored_tensor_keeps_size_stride_and_offset(i):
    t = _views()[i]
    act = ActivationCompressor("uniform", bits=8, min_numel=16)
    back = act._unpack(act._pack(t))
    assert back.shape == t.shape and back.stride() == t.stride() and back.storage_offset() == t.storage_offset()
    assert torch.allclose(back, t, atol=float(t.max() - t.min()) / 255 * 1.01 + 1e-6)


def test_views_of_one_storage_restore_through_a_real_backward():
    torch.manual_seed(0)
    lin = nn.Linear(64, 192)
    x = torch.randn(8, 32, 64)

    def loss():
        q, k, v = lin(x).split(64, -1)
        q, k, v = (t.reshape(8, 32, 4, 16).transpose(1, 2) for t in (q, k, v))
        return (torch.matmul(q, k.transpose(-1, -2)).softmax(-1) @ v).pow(2).sum()

    exact = _grad(lin, loss)
    assert _cos(_grad(lin, loss, ActivationCompressor("uniform", bits=8, model=lin, min_numel=256)), exact) > 0.999


@pytest.mark.parametrize("cell", ["gru"])  # CPU LSTMs (oneDNN) save an opaque integer workspace instead
def test_recurrent_net_gets_4x_at_4_bits_with_default_settings(cell):
    torch.manual_seed(0)
    model = CharRNN(vocab_size=64, dim=128, depth=2, cell=cell)
    ids = torch.randint(0, 64, (32, 48))
    loss = lambda: F.cross_entropy(model(ids).reshape(-1, 64), ids.roll(-1, 1).reshape(-1))  # noqa: E731
    exact = _grad(model, loss)
    act = ActivationCompressor("uniform", bits=4, model=model)
    g = _grad(model, loss, act)
    rep = act.report()
    assert rep.ratio >= 4, str(rep)
    assert _cos(g, exact) > 0.98
    small_raw = sum(r.raw_bytes for r in rep.rows if r.kind == "raw")
    assert small_raw <= 0.06 * rep.raw_bytes  # the few kept raw stay within small_fraction


def test_small_tensors_stay_raw_when_they_are_few():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    act = ActivationCompressor("uniform", bits=2, model=model)
    with act:
        out = F.log_softmax(model(torch.randn(64, 256)), -1).sum()
    kinds = {(r.op, r.kind) for r in act.report().rows}
    assert ("LogSoftmax", "raw") in kinds  # 640 elements: under the floor, exact
    del out
    with pytest.raises(ValueError, match="small_fraction"):
        ActivationCompressor("uniform", bits=2, small_fraction=1.5)


def test_probe_groups_split_in_forward_order_by_size():
    stats = {i: TensorStat(numel=n, rsq=1.0) for i, n in enumerate([100, 100, 100, 100, 400, 50, 50, 100])}
    groups = probe_groups(sorted(stats), stats, 3)
    assert [i for g in groups for i in g] == sorted(stats) and len(groups) == 3
    assert probe_groups(sorted(stats), stats, None) == [[i] for i in sorted(stats)]


@pytest.mark.parametrize("method", ["gact", "comet"])
def test_probe_costs_a_bounded_number_of_backwards(method):
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(128, 128), nn.Tanh())], nn.Linear(128, 10))
    x, y = torch.randn(64, 128), torch.randint(0, 10, (64,))
    backwards = []

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.register_hook(lambda g: backwards.append(1))
        return loss

    act = ActivationCompressor(method, bits=2, model=model, min_numel=1024, probe_groups=3)
    measured = act.estimate(closure)
    assert len(measured) >= 12  # every saved tensor got a sensitivity
    rounds = act.policy.calibration_rounds if method == "comet" else 0
    assert len(backwards) <= 1 + 3 * act.policy.probe_draws + rounds
    with pytest.raises(ValueError, match="probe_groups"):
        ActivationCompressor(method, bits=2, model=model, probe_groups=0)


def test_model_inputs_are_not_compressed_but_intermediates_are():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
    x = torch.randn(8, 3, 32, 32)
    act = ActivationCompressor("uniform", bits=2, model=model)
    with act:
        model(x).sum().backward()
    ops = {r.op for r in act.report().rows if r.kind == "float"}
    assert "input" not in ops and "Convolution" in ops  # x skipped (the caller holds it); conv output compressed
    assert act.report().raw_bytes < (8 * 16 * 32 * 32 * 4) * 3  # conv out, relu out (+ small stats): not x
