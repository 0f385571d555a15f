"""DIVISION, COMET and Mesa: their codecs against plain float references, and their policies in
ActivationCompressor; the torch.utils.checkpoint baseline."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _grad_helpers import cos as _cos, grad as _grad

from lowbit.act import ActivationCompressor, checkpoint_blocks, remove_checkpoints
from lowbit.bench.common import image_data
from lowbit.codecs import ErrorBoundedCodec, FrequencySplitCodec, HeadwiseCodec
from lowbit.models import CharGPT, ResNet, ViT



def _images(n=64):
    (x, y), _, _ = image_data(limit=n, test_limit=1, notice=lambda *a: None)
    return x[:n], y[:n]


def _real_activations():
    """Every float tensor a ResNet saves for backward on real images."""
    x, y = _images(32)
    model = ResNet(image_size=x.shape[-1]) if "image_size" in ResNet.__init__.__code__.co_varnames else ResNet()
    saved = []

    def pack(t):
        if t.dtype.is_floating_point and t.numel() > 1000 and not isinstance(t, nn.Parameter):
            saved.append(t.detach().clone())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return saved


# --- DIVISION's frequency split ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 8, 28, 28), (4, 8, 7, 7), (3, 65, 64), (1000,)])
def test_frequency_split_low_plus_high_is_exact_and_decoding_errs_only_in_the_hfc(shape):
    t = torch.randn(shape).cumsum(-1) / 4
    codec = FrequencySplitCodec(block=8, hfc_bits=4, keep_zeros=False)
    low, high = codec.low_high(t)
    assert torch.allclose(low + high, t, atol=1e-5)
    out = codec.decode(codec.encode(t))
    assert out.shape == t.shape and out.dtype == t.dtype
    # error per element at most one HFC quantization step (stochastic rounding), and much below the HFC itself
    step = (high.max() - high.min()) / 15
    assert (out - t).abs().max() <= step + 1e-4
    assert (out - t).pow(2).mean() < 0.05 * high.pow(2).mean()


def test_frequency_split_keeps_relu_zeros_exactly_and_compresses():
    t = torch.relu(torch.randn(8, 16, 28, 28))
    p = FrequencySplitCodec(hfc_bits=2).encode(t)
    out = FrequencySplitCodec(hfc_bits=2).decode(p)
    assert torch.equal(out == 0, t == 0)
    assert p.bits_per_element < 4  # vs 32 for float32
    assert "nonzero" not in FrequencySplitCodec().encode(torch.randn(4, 4, 16, 16)).payload


def test_frequency_split_rejects_bad_input():
    with pytest.raises(TypeError):
        FrequencySplitCodec().encode(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError):
        FrequencySplitCodec(block=0)
    assert FrequencySplitCodec().decode(FrequencySplitCodec().encode(torch.empty(0, 3))).shape == (0, 3)


# --- COMET's error-bounded codec --------------------------------------------------------------

@pytest.mark.parametrize("scale,eb", [(1.0, 1e-2), (1.0, 1e-4), (1000.0, 1e-1), (1e-3, 1e-6), (50.0, 3.0)])
def test_error_bound_holds_for_every_element_of_random_tensors(scale, eb):
    g = torch.Generator().manual_seed(int(scale * 7) % 1000)
    t = torch.randn(3, 50, 70, generator=g) * scale
    t[0, 0, :5] = torch.tensor([0.0, -0.0, scale * 10, -scale * 10, eb])
    out = ErrorBoundedCodec(eb).decode(ErrorBoundedCodec(eb).encode(t))
    assert out.dtype == t.dtype and out.shape == t.shape
    assert (out - t).abs().max().item() <= eb


def test_error_bound_holds_on_real_activations_and_compresses_them():
    acts = _real_activations()
    assert len(acts) > 5
    for t in acts:
        eb = 0.01 * float(t.max() - t.min())
        p = ErrorBoundedCodec(eb).encode(t)
        assert (ErrorBoundedCodec().decode(p) - t).abs().max().item() <= eb
        assert p.bits_per_element < 16


def test_error_bounded_codec_edge_cases():
    t = torch.tensor([1.0, float("nan"), 2.0])
    p = ErrorBoundedCodec(0.1).encode(t)
    assert p.info["mode"] == "raw" and torch.equal(ErrorBoundedCodec().decode(p).isnan(), t.isnan())
    tiny = ErrorBoundedCodec(1e-12).encode(torch.full((10,), 1e6))  # below float32 resolution: exact
    assert torch.equal(ErrorBoundedCodec().decode(tiny), torch.full((10,), 1e6))
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="error bound"):
            ErrorBoundedCodec(bad)
    with pytest.raises(TypeError):
        ErrorBoundedCodec().encode(torch.ones(3, dtype=torch.int32))


# --- Mesa's head-wise codec -------------------------------------------------------------------

def test_headwise_codec_error_within_half_a_step_per_head_and_clips_outside():
    t = torch.randn(2, 4, 10, 10) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(1, 4, 1, 1)
    lo, hi = t.amin(dim=(0, 2, 3)), t.amax(dim=(0, 2, 3))
    p = HeadwiseCodec().encode(t, lo, hi)
    out = HeadwiseCodec().decode(p)
    step = (hi - lo) / 255
    assert ((out - t).abs() <= step.view(1, 4, 1, 1) / 2 + 1e-6).all()  # each head at its own resolution
    narrow = HeadwiseCodec().decode(HeadwiseCodec().encode(t, lo / 2, hi / 2))
    assert torch.allclose(narrow.amax(dim=(0, 2, 3)), hi / 2, atol=1e-4)
    with pytest.raises(ValueError, match="ranges"):
        HeadwiseCodec().encode(t, lo[:3], hi[:3])


# --- the policies in ActivationCompressor -------------------------------------------------------

def test_division_keeps_resnet_gradients_close_at_high_compression():
    x, y = _images()
    model = ResNet()
    model.eval()
    exact = _grad(model, lambda: F.cross_entropy(model(x), y))
    act = ActivationCompressor("division", bits=2, model=model)
    g = _grad(model, lambda: F.cross_entropy(model(x), y), act)
    rep = act.report()
    assert _cos(g, exact) > 0.95
    assert rep.raw_bytes / rep.stored_bytes > 8


def test_comet_adapts_a_bound_per_tensor_to_the_gradient_tolerance():
    x, y = _images(16)
    model = ResNet()
    model.eval()
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    exact = _grad(model, loss)
    act = ActivationCompressor("comet", model=model, tolerance=0.1, interval=1, probe_draws=1, max_probes=4)
    act.estimate(loss)
    bounds = act.policy.error_bounds
    assert len(bounds) > 5 and len({round(v, 12) for v in bounds.values()}) > 5  # one bound per saved tensor
    assert act.policy.measured_error <= 0.1 + 1e-9
    g = _grad(model, loss, act)
    assert _cos(g, exact) > 0.98
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):  # training moves the weights; the next estimate moves the bounds
        with act:
            l = loss()
        l.backward()
        opt.step()
        opt.zero_grad()
    act.step(loss)
    assert act.policy.error_bounds != bounds and len(act.policy.history) == 2


def test_comet_rejects_bad_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        ActivationCompressor("comet", model=ResNet(), tolerance=2.0)


def test_mesa_quantizes_attention_head_wise_on_hand_written_and_torch_attention():
    x, y = _images(16)
    vit = ViT()
    vit.eval()
    exact = _grad(vit, lambda: F.cross_entropy(vit(x), y))
    act = ActivationCompressor("mesa", model=vit)
    g = _grad(vit, lambda: F.cross_entropy(vit(x), y), act)
    assert act.policy.headwise_count > 0 and _cos(g, exact) > 0.999
    rep = act.report()
    assert 3.3 < rep.raw_bytes / rep.stored_bytes <= 4.0

    class TorchAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 64)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.out = nn.Linear(64, 50)

        def forward(self, ids):
            h = self.emb(ids)
            return self.out(self.attn(h, h, h, need_weights=False)[0])

    m = TorchAttn()
    ids = torch.randint(0, 50, (8, 64))
    loss = lambda: F.cross_entropy(m(ids).reshape(-1, 50), ids.reshape(-1))  # noqa: E731
    exact = _grad(m, loss)
    act = ActivationCompressor("mesa", model=m, min_numel=1024)
    _grad(m, loss, act)  # the first forward finds the attention modules (their input hooks see the next ones)
    count = act.policy.headwise_count
    g = _grad(m, loss, act)
    assert act.policy.headwise_count - count >= 4 and _cos(g, exact) > 0.999  # q, k, v, weights: [B * heads, ...]


def test_mesa_needs_the_model():
    with pytest.raises(ValueError, match="model="):
        ActivationCompressor("mesa")


@pytest.mark.parametrize("make", [ResNet, ViT, lambda: CharGPT(vocab_size=40)])
def test_checkpoint_blocks_gives_the_same_gradients(make):
    torch.manual_seed(0)
    model = make()
    model.eval()
    x = torch.randint(0, 40, (4, 32)) if isinstance(model, CharGPT) else torch.randn(8, 1, 28, 28)
    loss = lambda: model(x).float().pow(2).mean()  # noqa: E731
    exact = _grad(model, loss)
    blocks = checkpoint_blocks(model)
    assert len(blocks) >= 3
    assert torch.allclose(_grad(model, loss), exact, rtol=1e-4, atol=1e-6)
    remove_checkpoints(model)
    assert all("forward" not in b.__dict__ for b in blocks)
    with pytest.raises(ValueError, match="composite"):
        checkpoint_blocks(nn.Linear(3, 3))


def _train_losses(method, bits, x, y, **opts):
    torch.manual_seed(0)
    model = ViT() if opts.pop("vit", False) else ResNet()
    act = ActivationCompressor(method, bits=bits, model=model, **opts)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for xb, yb in zip(x.split(32), y.split(32)):
        with act:
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, act.report()


@pytest.mark.parametrize("method,bits", [("division", 2), ("comet", None), ("mesa", None)])
def test_each_method_trains_a_model_on_real_data_like_plain_autograd(method, bits):
    x, y = _images(320)
    vit = method == "mesa"
    opts = {"interval": 100, "probe_draws": 1, "max_probes": 4} if method == "comet" else {}
    plain, _ = _train_losses("none", None, x, y, vit=vit)
    losses, rep = _train_losses(method, bits, x, y, vit=vit, **opts)
    assert rep.stored_bytes < rep.raw_bytes / 3
    tail = sum(losses[-3:]) / 3
    assert tail < 0.9 * sum(losses[:3]) / 3  # it learns ...
    assert tail < 1.05 * sum(plain[-3:]) / 3  # ... as plain autograd does from the same start and data


# --- bounded workspace, method domains, real models ------------------------------------------------

@pytest.mark.parametrize("shape,dtype,strided", [((6, 8, 28, 28), torch.float32, False), ((3, 65, 64), torch.float32, False),
                                                 ((10000,), torch.float32, False), ((5, 6, 7, 9), torch.bfloat16, False),
                                                 ((6, 8, 28, 28), torch.float32, True)])
def test_frequency_split_in_small_chunks_keeps_the_error_and_the_layout(shape, dtype, strided):
    g = torch.Generator().manual_seed(3)
    t = torch.relu(torch.randn(shape, generator=g).cumsum(-1) / 4).to(dtype)
    if strided:
        t = t.transpose(2, 3).contiguous().transpose(2, 3)  # same values, channels-transposed strides
    codec = FrequencySplitCodec(block=8, hfc_bits=4, chunk_numel=1000)  # many chunks
    p = codec.encode(t, group_size=64)
    out = codec.decode(p)
    assert out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(out == 0, t == 0)  # ReLU zeros exact across chunk boundaries
    low, high = codec.low_high(t)
    step = float(high.max() - high.min()) / 15
    tol = step + (0.02 * float(t.float().abs().max()) if dtype == torch.bfloat16 else 1e-4)
    assert float((out.float() - t.float()).abs().max()) <= tol
    one = FrequencySplitCodec(block=8, hfc_bits=4, chunk_numel=1 << 30).encode(t, group_size=64)
    assert p.nbytes == one.nbytes and torch.equal(p.payload["low"], one.payload["low"])  # chunks change nothing stored


_WORKSPACE_CHILD = r"""
import json, torch
from lowbit.bench.memory import peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap
from lowbit.codecs import FrequencySplitCodec
t = torch.relu(torch.randn(16, 64, 128, 128))  # 64 MiB
codec = FrequencySplitCodec(hfc_bits=2)
codec.decode(codec.encode(t[:1]))  # warm-up (kernel compilation)
trim_heap(); before = rss_bytes(); reset_peak_rss()
p = codec.encode(t, group_size=16384)
enc = peak_rss_bytes() - before
trim_heap(); before = rss_bytes(); reset_peak_rss()
out = codec.decode(p)
dec = peak_rss_bytes() - before
print(json.dumps({"encode": enc, "decode": dec, "stored": p.nbytes, "size": t.numel() * 4}))
"""


def test_frequency_split_encodes_and_decodes_in_bounded_workspace():
    """Peak RSS growth (child process, large tensors in their own mappings): encoding holds the
    codes plus a few chunk buffers, decoding the output plus a few chunk buffers, never a float
    copy of the whole tensor."""
    import json
    import os
    import subprocess
    import sys

    from lowbit.bench.memory import CHILD_ENV

    out = subprocess.run([sys.executable, "-c", _WORKSPACE_CHILD], env=dict(os.environ, **CHILD_ENV),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = r["size"]
    assert r["encode"] < r["stored"] + 0.25 * size  # one float copy of the map alone would be 1.0
    assert r["decode"] < size + 0.25 * size


def _hf(name, **kw):
    pytest.importorskip("transformers", reason="needs the hf extra")
    from lowbit.models.hf import hf_batch, hf_loss, hf_model

    torch.manual_seed(0)
    model = hf_model(name, "tiny", **kw)
    model.train()
    batch = hf_batch(name, model, 4, generator=torch.Generator().manual_seed(1))

    def loss():
        torch.manual_seed(5)  # the same dropout masks in every forward
        return hf_loss(model, batch)
    return model, loss


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_division_splits_no_token_tensor_and_says_so(name):
    model, loss = _hf(name)
    exact = _grad(model, loss)
    act = ActivationCompressor("division", bits=2, model=model, min_numel=1024)
    g = _grad(model, loss, act)
    assert act.policy.counts["split"] == 0 and act.policy.counts["other"] > 10  # attention scores [B, H, T, T] too
    assert "0 split" in act.report().method and "uniform 4-bit" in act.report().method
    assert _cos(g, exact) > 0.99
    assert act.report().ratio > 6


def test_division_splits_the_maps_of_a_resnet18_and_warns_without_the_model():
    model, loss = _hf("resnet18")
    act = ActivationCompressor("division", bits=2, model=model)
    _grad(model, loss, act)
    assert act.policy.counts["split"] > 10 and act.report().ratio > 2.5  # tiny maps (2x2..16x16): small gains
    with pytest.warns(UserWarning, match="model="):
        bare = ActivationCompressor("division", bits=2)
        _grad(model, loss, bare)


@pytest.mark.parametrize("name,attn", [("bert", "eager"), ("llama", "eager"), ("bert", "sdpa")])
def test_mesa_is_head_wise_in_transformers_attention(name, attn):
    model, loss = _hf(name, attn_implementation=attn)
    exact = _grad(model, loss)
    act = ActivationCompressor("mesa", model=model, min_numel=1024)
    _grad(model, loss, act)
    g = _grad(model, loss, act)
    assert act.policy.headwise_modules == set(act.policy.attention) and len(act.policy.attention) == 2
    assert "2 of 2 attention modules" in act.report().method
    assert _cos(g, exact) > 0.999


def test_mesa_refuses_attention_whose_heads_it_cannot_find():
    class MyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(64, 192)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            return torch.softmax(q @ k.transpose(1, 2), -1) @ v

    model = nn.Sequential(nn.Linear(64, 64), MyAttention())
    with pytest.raises(ValueError, match="MyAttention.*'1'"):  # at construction, before any forward
        ActivationCompressor("mesa", model=model, min_numel=16)
