"""GACT's linear probe (every saved tensor's sensitivity from one differentiable backward and one
double backward) against the sampled probe it replaces, the stochastic-rounding variance it uses
against the codec, and the group-size allocation under a metadata allowance."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.act import ActivationCompressor, GactConfig
from lowbit.act.gact import GROUP_META_BITS, TensorStat, allocate_groups, group_candidates
from lowbit.act.probe import rounding_variance
from lowbit.codecs import UniformCodec


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU(),
                         nn.Linear(128, 128), nn.Sigmoid(), nn.Linear(128, 10))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)


def test_linear_probe_matches_sampled_sensitivities():
    model, (x, y) = _net(), _data()
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    # at 4 bits, where the noise is small enough for the linear model (at 2 bits curvature, e.g. of
    # GELU, makes the two differ more)
    lin = ActivationCompressor("gact", bits=2, model=model, min_numel=1024, probe_draws=4, probe_bits=4)
    c_lin = lin.estimate(loss)
    smp = ActivationCompressor("gact", bits=2, model=model, min_numel=1024, probe_method="sampled",
                               probe_groups=None, probe_draws=6, probe_bits=4)
    c_smp = smp.estimate(loss)
    assert set(c_lin) == set(c_smp) and len(c_lin) >= 5
    stats = lin.policy.stats
    for i in c_lin:  # the same quantity (gradient error per unit of rounding variance), two estimators
        ratio = c_lin[i] / c_smp[i]
        if stats[i].role == "norm_input":
            # torch's double backward of a norm also moves the statistics with the input, which the
            # compressor keeps exact: the linear probe overrates norm inputs (within a few times)
            assert 0.5 < ratio < 6.0, (i, c_lin[i], c_smp[i])
        else:
            assert 0.5 < ratio < 2.0, (i, c_lin[i], c_smp[i])
    # the smooth net's sensitivities span orders of magnitude: the ranking is what allocation uses
    assert max(c_lin.values()) > 10 * min(c_lin.values())


def test_linear_probe_costs_two_backwards_and_restores_nothing_else():
    model, (x, y) = _net(), _data()
    backwards = []

    def closure():
        out = F.cross_entropy(model(x), y)
        out.register_hook(lambda g: backwards.append(1))
        return out

    act = ActivationCompressor("gact", bits=2, model=model, min_numel=1024)
    act.estimate(closure)
    assert len(backwards) == 1  # the differentiable backward; the double backward starts from the gradient
    # the hooks it put on the forward graph are gone: a plain backward afterwards is exact
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    closure().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(ref, model.parameters()))


class _DistanceNet(nn.Module):
    """Logits from distances to learned prototypes (``torch.cdist``, whose backward has no derivative)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(32, 128), nn.Tanh())
        self.prototypes = nn.Parameter(torch.randn(10, 128))

    def forward(self, x):
        return -torch.cdist(self.embed(x), self.prototypes, compute_mode="donot_use_mm_for_euclid_dist")


def test_linear_probe_falls_back_to_sampling_without_double_backward():
    torch.manual_seed(0)
    model, (x, y) = _DistanceNet(), _data()
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    act = ActivationCompressor("gact", bits=2, model=model, min_numel=1024)
    with pytest.warns(RuntimeWarning, match="sampled instead"):
        measured = act.estimate(loss)
    assert measured and all(c > 0 for c in measured.values())


@pytest.mark.parametrize("bits,group", [(1, 64), (2, 100), (4, 48)])
def test_rounding_variance_is_the_codecs(bits, group):
    x = torch.randn(1003, generator=torch.Generator().manual_seed(1)) * 3 + 1
    codec = UniformCodec(bits, group)
    draws = torch.stack([codec.decode(codec.encode(x)) - x for _ in range(3000)])
    predicted = rounding_variance(x, bits, group)
    assert predicted.shape == (1003,)
    assert abs(float(draws.var(0).sum()) / float(predicted.sum()) - 1) < 0.05
    assert float((draws.mean(0)).abs().max()) < 0.1 * float(predicted.max().sqrt())  # unbiased


def test_group_candidates_split_the_engine_groups():
    assert group_candidates(64) == [64, 32, 16, 8]
    assert group_candidates(48) == [48, 24, 12]
    assert group_candidates(72) == [72, 36, 18, 9]
    assert group_candidates(9) == [9]
    for g in (64, 48, 72, 256, 2304):
        assert all(g % c == 0 for c in group_candidates(g))


def test_allocate_groups_spends_the_allowance_on_the_sensitive_tensor():
    def stat(c):
        return TensorStat(numel=4096, rsq=100.0, sensitivity=c, rsq_groups={64: 100.0, 32: 70.0, 16: 50.0, 8: 35.0})

    stats = {0: stat(1.0), 1: stat(100.0), 2: stat(1.0)}
    bits = {0: 2, 1: 2, 2: 4}
    groups = allocate_groups(stats, bits, meta_bits=1.0)
    assert groups.get(1, 64) < groups.get(0, 64)  # the sensitive one is split first
    assert 2 not in groups  # a 4-bit tensor keeps the engine's layout
    n = sum(s.numel for s in stats.values())
    assert sum(s.numel * GROUP_META_BITS / groups.get(i, 64) for i, s in stats.items()) <= 1.0 * n
    assert allocate_groups(stats, bits, meta_bits=0.5) == {}  # the engine's layout already spends 0.5


def test_gact_config_checks_new_fields():
    assert GactConfig().probe_method == "linear" and GactConfig().meta_bits == 1.0
    with pytest.raises(ValueError, match="probe_method"):
        GactConfig(probe_method="exact")
    with pytest.raises(ValueError, match="meta_bits"):
        GactConfig(meta_bits=-1)
    act = ActivationCompressor(GactConfig(meta_bits=None, probe_method="sampled"), model=_net())
    assert act.policy.meta_bits is None and act.policy.probe_method == "sampled"


@pytest.mark.parametrize("name", ["bert", "gpt2", "resnet18"])
@pytest.mark.parametrize("probe_method", ["linear", "sampled"])
def test_probe_sees_the_saved_tensors_a_training_step_saves(probe_method, name):
    # GACT assigns widths by the order in which tensors are saved: the probe's forward must save
    # (and share between views of one storage) exactly what a training step does, although the
    # linear probe holds the saved tensors it differentiates through (HF BERT and GPT-2 share
    # storages between views; the ResNet's input image has no graph and is never held).
    hf = pytest.importorskip("lowbit.models.hf", reason="needs the hf extra")
    torch.manual_seed(0)
    model = hf.hf_model(name).train()
    batch = hf.hf_batch(name, model, batch=4, generator=torch.Generator().manual_seed(0))
    act = ActivationCompressor("gact", bits=2, model=model, probe_method=probe_method, min_numel=0, floor_numel=0)
    act.estimate(lambda: hf.hf_loss(model, batch))
    with act:
        loss = hf.hf_loss(model, batch)
    lossy = [r for r in act.report().rows if r.kind == "float"]
    assert sum(r.count for r in lossy) == len(act.policy.stats)
    assert sum(r.numel for r in lossy) == sum(s.numel for s in act.policy.stats.values())
    loss.backward()
    act.close()


def test_reference_gradient_at_8_bits_measures_errors_without_bias():
    from lowbit.act.probe import ProbeState, _Reference

    gen = torch.Generator().manual_seed(0)
    params = [torch.zeros(300, 200, requires_grad=True), torch.zeros(10, requires_grad=True),
              torch.zeros(5, requires_grad=True)]  # the last one gets no gradient
    g = [torch.randn(300, 200, generator=gen), torch.randn(10, generator=gen)]

    def loss(grads):  # a loss whose gradient with respect to params[:2] is ``grads``
        return sum((p * t).sum() for p, t in zip(params, grads))

    ref = _Reference(loss(g), params, ProbeState().codec)
    assert ref.sq == pytest.approx(sum(float(t.pow(2).sum()) for t in g), rel=1e-5)
    assert all(p.grad is None for p in params)  # streamed: nothing accumulated
    for scale in (1e-1, 1e-2):
        e = [scale * torch.randn(t.shape, generator=gen) for t in g]
        truth = sum(float(t.pow(2).sum()) for t in e)
        assert ref.error(loss([a + b for a, b in zip(g, e)]), params) == pytest.approx(truth, rel=0.02)


def _hf_sensitivities(name: str, **patch) -> tuple[dict[int, float], dict]:
    hf = pytest.importorskip("lowbit.models.hf", reason="needs the hf extra")
    torch.manual_seed(0)
    model = hf.hf_model(name).train()
    batch = hf.hf_batch(name, model, batch=8, generator=torch.Generator().manual_seed(0))
    act = ActivationCompressor("gact", bits=2, model=model, probe_draws=4)
    with pytest.MonkeyPatch.context() as mp:
        for target, value in patch.items():
            mp.setattr(target, value)
        c = act.estimate(lambda: hf.hf_loss(model, batch))
    return c, act.policy.stats


def test_sliced_block_replay_gives_the_whole_batch_sensitivities():
    # Llama's blocks have no dropout and no batch statistics: a quarter of the batch at a time is
    # the same derivative (only the rounding groups of the variance are cut per slice)
    sliced, stats = _hf_sensitivities("llama")
    whole, _ = _hf_sensitivities("llama", **{"lowbit.act.probe_linear.SLICES": 1})
    inside = [i for i in sliced if stats[i].position is not None and whole[i] > 0]
    assert len(inside) >= 10
    for i in inside:
        assert 0.8 < sliced[i] / whole[i] < 1.25, (i, sliced[i], whole[i])


def test_batchnorm_stem_adjoint_by_replays_matches_the_double_backward():
    # the ResNet's conv-BN stem gives the blocks their adjoint by a central difference (J r);
    # without a stem the probe differentiates the stem's backward instead: the same quantity
    from lowbit.act import probe_linear

    by_jvp, stats = _hf_sensitivities("resnet18")
    attach = probe_linear.SegmentRecorder.attach
    by_double, _ = _hf_sensitivities("resnet18", **{
        "lowbit.act.probe_linear.SegmentRecorder.attach": lambda self, model=None: attach(self, None)})
    blocks = [i for i in by_jvp if stats[i].position is not None and by_double[i] > 0]
    assert len(blocks) >= 10
    for i in blocks:
        assert by_jvp[i] == pytest.approx(by_double[i], rel=1e-2), i
