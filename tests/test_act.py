import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from _grad_helpers import cos as _cos, grad as _grad

from lowbit.act import ActivationCompressor, allocate_bits
from lowbit.act.gact import TensorStat
from lowbit.bench.common import fortunes_corpus, image_data
from lowbit.data import DatasetNotFound
from lowbit.models import CharGPT, MLP, ResNet, ViT


def _text_ids(n: int, block: int):
    try:
        corpus = fortunes_corpus()
    except DatasetNotFound:
        return torch.randint(0, 60, (n, block)), 60
    x, _ = corpus.batch(n, block, torch.Generator().manual_seed(0))
    return x, corpus.vocab_size


def _reference_cases():
    """Real data (Fashion-MNIST or the bundled digits; fortunes text when installed): gradients of
    random noise images at initialisation are mostly noise themselves."""
    (img, lab), _, _ = image_data(limit=32, test_limit=1, notice=lambda *a: None)
    side = img.shape[-1]
    ids, vocab = _text_ids(8, 32)
    cases = {
        "resnet": (ResNet(), lambda m: F.cross_entropy(m(img), lab)),
        "vit": (ViT(image_size=side, patch=7 if side % 7 == 0 else 4, dropout=0.0), lambda m: F.cross_entropy(m(img), lab)),
        "gpt": (CharGPT(vocab_size=vocab, block_size=32, dim=64, depth=2), lambda m: F.cross_entropy(m(ids).reshape(-1, vocab), ids.roll(-1, 1).reshape(-1))),
        "mlp": (MLP(in_features=side * side), lambda m: F.cross_entropy(m(img), lab)),
    }
    return cases


@pytest.mark.parametrize("name", ["resnet", "vit", "gpt", "mlp"])
def test_4bit_gradients_close_on_every_reference_model(name):
    model, loss = _reference_cases()[name]
    exact = _grad(model, lambda: loss(model))
    g = _grad(model, lambda: loss(model), ActivationCompressor("uniform", bits=4, model=model))
    assert _cos(g, exact) > 0.97
    none = _grad(model, lambda: loss(model), ActivationCompressor("none", model=model))
    assert torch.equal(none, exact)  # the baseline is plain autograd, bit for bit


def test_compressed_gradient_is_unbiased():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    exact = _grad(model, loss)
    act = ActivationCompressor("uniform", bits=2, model=model, min_numel=1024)
    draws = [_grad(model, loss, act) for _ in range(200)]
    single = sum((d - exact).norm() for d in draws[:20]) / 20
    mean = sum(draws) / len(draws)
    # the error of the mean shrinks like 1/sqrt(draws): far below a single draw's
    assert float((mean - exact).norm()) < 0.25 * float(single)
    assert _cos(mean, exact) > 0.99


def test_parameters_not_counted_and_storage_compressed_once():
    lin = nn.Linear(512, 512)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(512, 512))
    x = torch.randn(16, 512, requires_grad=False)
    act = ActivationCompressor("uniform", bits=4, model=model, min_numel=1024)
    with act:
        model(x).sum().backward()
    rep = act.report()
    # saved: x (by lin: the model's input, held by the caller anyway, skipped), the relu output
    # (by relu AND the second linear: one storage); weights skipped
    assert rep.raw_bytes == 16 * 512 * 4
    assert sum(r.count for r in rep.rows) == 1
    assert rep.ratio > 6


def test_parameters_skipped_without_model_argument():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    act = ActivationCompressor("uniform", bits=4, min_numel=1024)
    with act:
        model(torch.randn(8, 256)).sum().backward()
    assert act.report().raw_bytes == 2 * 8 * 256 * 4


def test_tiny_tensors_kept_raw_and_integer_tensors_exact():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(2))
    x = torch.randn(16, 1, 16, 16)
    exact = _grad(model, lambda: model(x).pow(2).sum())
    act = ActivationCompressor("uniform", bits=8, model=model, min_numel=1024)
    g = _grad(model, lambda: model(x).pow(2).sum(), act)
    assert _cos(g, exact) > 0.999
    kinds = {r.kind: r for r in act.report().rows}
    assert kinds["index"].ratio > 20  # max-pool argmax positions packed losslessly
    with act:
        out = (torch.randn(10, requires_grad=True) * 2).sigmoid()
    assert {r.kind for r in act.report().rows if r.numel == 10} == {"raw"}
    del out


def test_bool_masks_are_packed():
    x = torch.randn(64, 256, requires_grad=True)
    act = ActivationCompressor("uniform", bits=2, min_numel=1024)
    with act:
        y = torch.where(x > 0, x, x * 0.1).sum()  # saves a bool condition
        y2 = F.dropout(x, 0.5, training=True).sum()  # saves a bool/float mask
    (y + y2).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_inplace_modification_raises():
    w = torch.randn(100, 100, requires_grad=True)
    act = ActivationCompressor("uniform", bits=4, min_numel=1024)
    with act:
        h = (torch.randn(64, 100) @ w).sigmoid()
        out = (h * 3).sum()
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_autocast_bf16():
    model = ResNet(widths=(8, 16, 32))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    act = ActivationCompressor("uniform", bits=8, model=model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grad(model, lambda: F.cross_entropy(model(x), y))
        g = _grad(model, lambda: F.cross_entropy(model(x), y), act)
    assert torch.isfinite(g).all() and _cos(g, ref) > 0.97


@pytest.mark.parametrize("reentrant", [False, True])
def test_with_checkpoint(reentrant):
    block = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    head = nn.Linear(128, 1)
    model = nn.ModuleList([block, head])
    x = torch.randn(32, 128, requires_grad=True)
    loss = lambda: head(checkpoint(block, x, use_reentrant=reentrant)).pow(2).sum()  # noqa: E731
    exact = _grad(model, loss)
    g = _grad(model, loss, ActivationCompressor("uniform", bits=8, model=model, min_numel=1024))
    assert _cos(g, exact) > 0.999


def test_gradient_accumulation_over_several_forwards():
    model = MLP(in_features=64, hidden=(128,))
    xs = [torch.randn(16, 64) for _ in range(3)]
    exact = _grad(model, lambda: sum(model(x).pow(2).mean() for x in xs))
    act = ActivationCompressor("uniform", bits=8, model=model, min_numel=1024)
    model.zero_grad()
    losses = []
    for x in xs:  # three separate `with` blocks, one backward
        with act:
            losses.append(model(x).pow(2).mean())
    sum(losses).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert _cos(g, exact) > 0.999
    assert act.live_bytes == (0, 0)  # everything released after backward


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        ActivationCompressor("jpeg")
    with pytest.raises(ValueError, match="unsupported bits"):
        ActivationCompressor("uniform", bits=3)
    with pytest.raises(ValueError, match="average bits"):
        ActivationCompressor("gact", bits=0.5)
    with pytest.raises(TypeError, match="takes no options"):
        ActivationCompressor("uniform", bits=2, interval=5)
    act = ActivationCompressor("gact", bits=2)
    with pytest.raises(ValueError, match="model="):
        act.estimate(lambda: torch.zeros((), requires_grad=True))


def test_allocate_bits_respects_budget_and_sensitivity():
    stats = {i: TensorStat(numel=1000, rsq=1.0, sensitivity=s) for i, s in enumerate([100.0, 1.0, 0.01, 0.0001])}
    bits = allocate_bits(stats, budget=2.0)
    assert sum(b * 1000 for b in bits.values()) <= 2.0 * 4000
    assert bits[0] >= bits[1] >= bits[2] >= bits[3]
    assert bits[0] > bits[3]
    with pytest.raises(ValueError):
        allocate_bits(stats, budget=0.5)


class _TwoBranch(nn.Module):
    """One branch's saved activations matter 30x more to the gradient than the other's."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
        self.b = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))

    def forward(self, x):
        return 30 * self.a(x) + self.b(x)


def test_gact_beats_uniform_at_equal_memory():
    torch.manual_seed(0)
    model = _TwoBranch()
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    exact = _grad(model, loss)

    def err(act, draws=4):
        return sum(float((_grad(model, loss, act) - exact).pow(2).sum()) for _ in range(draws)) / draws

    uni = ActivationCompressor("uniform", bits=2, model=model, min_numel=256)
    gact = ActivationCompressor("gact", bits=2, model=model, min_numel=256, meta_bits=None)  # widths only
    gact.estimate(loss)
    alloc = gact.bit_allocation
    assert len(set(alloc.values())) > 1
    e_uni, e_gact = err(uni), err(gact)
    assert gact.report().stored_bytes <= uni.report().stored_bytes * 1.05  # same memory
    assert e_gact < 0.5 * e_uni
    # finer groups for the most sensitive 2-bit tensors, within the metadata allowance
    finer = ActivationCompressor("gact", bits=2, model=model, min_numel=256, meta_bits=1.0)
    finer.estimate(loss)
    assert finer.policy.groups and finer.bit_allocation == alloc
    e_finer = err(finer)
    stats = finer.policy.stats
    n = sum(s.numel for s in stats.values())
    meta = sum(s.numel * 32 / finer.policy.groups.get(i, max(s.rsq_groups)) for i, s in stats.items())
    assert meta <= 1.0 * n
    extra = (finer.report().stored_bytes - gact.report().stored_bytes) / 4  # per forward (err draws 4)
    assert 0 < extra <= n / 8  # at most 1 bit more per element
    assert e_finer < e_gact


def test_gact_step_reestimates_on_interval():
    model = MLP(in_features=64, hidden=(128, 128))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    act = ActivationCompressor("gact", bits=2, model=model, interval=3, min_numel=1024)
    for _ in range(7):
        with act:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        act.step(lambda: F.cross_entropy(model(x), y))
    assert act.policy.estimates == 3  # steps 0, 3, 6


def test_report_table():
    model = ResNet()
    act = ActivationCompressor("uniform", bits=2, model=model)
    with act:
        model(torch.randn(32, 1, 28, 28)).sum().backward()
    rep = act.report()
    text = str(rep)
    assert "total" in text and "stem" in text
    assert rep.ratio > 10
    assert rep.to_dict()["ratio"] == rep.ratio
