import math

import pytest
import torch

from lowbit.codecs import IndexCodec, MaskCodec, UniformCodec
from lowbit.kernels import uniform as K


def _group_scales(p):
    """Per-element scale of a quantized Packed (float32 [numel])."""
    gs = p.info["group_size"]
    return p.payload["scale"].float().repeat_interleave(gs)[: p.numel]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_roundtrip_error_bound(bits, rounding):
    x = torch.randn(3, 1000) * 5 + 2
    codec = UniformCodec(bits=bits, rounding=rounding)
    p = codec.encode(x)
    y = codec.decode(p)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (y - x).abs().reshape(-1)
    bound = _group_scales(p) * (1.0 if rounding == "stochastic" else 0.5)
    assert bool((err <= bound * (1 + 1e-5) + 1e-6).all())
    # each scale is at most the group range / levels, up to float16 rounding
    assert float(p.payload["scale"].float().max()) <= float(x.max() - x.min()) / (2**bits - 1) * 1.01 + 1e-3


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_rounding_is_unbiased(bits):
    x = torch.rand(4096) * 3 - 1
    codec = UniformCodec(bits=bits, seed=1)
    draws = 400
    mean = sum(codec.decode(codec.encode(x)) for _ in range(draws)) / draws
    scale = _group_scales(codec.encode(x))
    # per-element std of the mean <= scale / (2 sqrt(draws)); allow 5 sigma, and the
    # average bias over all elements must be far smaller still
    assert bool(((mean - x).abs() <= 5 * scale / (2 * math.sqrt(draws)) + 1e-6).all())
    assert abs(float((mean - x).mean())) < float(scale.mean()) * 0.01
    # nearest rounding is biased in the same setting: the test can tell the difference
    near = UniformCodec(bits=bits, rounding="nearest")
    assert float((near.decode(near.encode(x)) - x).abs().mean()) > float((mean - x).abs().mean())


def test_sizes_and_packing():
    x = torch.randn(10_000)
    for bits in (1, 2, 4, 8):
        p = UniformCodec(bits=bits, group_size=256).encode(x)
        groups = math.ceil(10_000 / 256)
        assert p.payload["codes"].numel() == math.ceil(10_000 * bits / 8)
        assert p.payload["min"].dtype == torch.float16
        assert p.nbytes == math.ceil(10_000 * bits / 8) + groups * 2 * 2
        assert 32 / p.bits_per_element > 0.9 * 32 / (bits + 32 / 256 * 2 / 2)


@pytest.mark.parametrize("shape", [(), (0,), (0, 5), (1,), (7,), (3, 5, 7), (257,), (2, 300)])
def test_any_shape(shape):
    x = torch.randn(shape)
    codec = UniformCodec(bits=4)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape
    if x.numel():
        assert float((y - x).abs().max()) <= float(x.max() - x.min()) / 15 + 1e-6


def test_non_contiguous_and_dtypes():
    x = torch.randn(64, 48).t()
    codec = UniformCodec(bits=8, rounding="nearest")
    assert torch.allclose(codec.decode(codec.encode(x)), x, atol=float(x.max() - x.min()) / 255)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        xd = torch.randn(1000).to(dt)
        y = codec.decode(codec.encode(xd))
        assert y.dtype == dt
        assert torch.allclose(y.float(), xd.float(), atol=0.05)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_relu_outputs_keep_their_zeros(bits):
    """Groups whose minimum is exactly 0 reserve code 0 for zeros: a ReLU's mask survives exactly
    (positives never decode to 0) and rounding stays unbiased."""
    x = torch.relu(torch.randn(8, 4096))
    codec = UniformCodec(bits=bits)
    p = codec.encode(x)
    assert bool(torch.signbit(p.payload["min"]).all())
    y = codec.decode(p)
    assert torch.equal(y > 0, x > 0)
    mean = sum(codec.decode(codec.encode(x)) for _ in range(200)) / 200
    assert abs(float((mean - x).mean())) < float(p.payload["scale"].float().mean()) * 0.01
    assert bool(((y - x).abs().reshape(-1) <= _group_scales(p) * 1.0001 + 1e-6).all())


def test_constant_and_zero_groups():
    codec = UniformCodec(bits=2)
    z = torch.zeros(1000)
    assert torch.equal(codec.decode(codec.encode(z)), z)
    c = torch.full((1000,), 0.1)
    assert torch.allclose(codec.decode(codec.encode(c)), c, atol=1e-3)


def test_large_values_use_float32_metadata():
    x = torch.randn(1000) * 1e6
    p = UniformCodec(bits=8, rounding="nearest").encode(x)
    assert p.payload["min"].dtype == torch.float32
    assert float((UniformCodec(bits=8).decode(p) - x).abs().max()) <= float(x.max() - x.min()) / 255 * 0.51


def test_nonfinite_stored_exactly_with_warning():
    x = torch.randn(1000)
    x[10] = float("nan")
    x[20] = float("inf")
    codec = UniformCodec(bits=2)
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        p = codec.encode(x)
    y = codec.decode(p)
    assert torch.equal(y.isnan(), x.isnan())
    assert torch.equal(y[~x.isnan()], x[~x.isnan()])


@pytest.mark.parametrize("n", [300, 200_000])  # the serial and the parallel kernel
@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf"), -float("inf")])
def test_kernel_flags_any_nonfinite_group(n, bad):
    """The fused kernel finds a single NaN (either sign) or Inf in any group from its range pass."""
    x = torch.randn(n)
    for pos in (0, n // 2 + 3, n - 1):
        y = x.clone()
        y[pos] = bad
        assert K.quantize_pack(y, 256, 2, 0, True) is None
    assert K.quantize_pack(x, 256, 2, 0, True) is not None


def test_negative_zero_minimum_is_not_a_zero_preserving_marker():
    """A group whose minimum is -0.0 and whose scale needs float32 (tiny range) decodes as a
    plain group: a stored -0.0 minimum is the zero-preserving marker."""
    x = torch.tensor([-0.0, 1e-6, 5e-7, 2e-7] * 16)
    for bits in (1, 2):
        for fn in (K.quantize_pack, K.quantize_pack_torch):
            args = (x, 64, *K.group_minmax(x, 64)) if fn is K.quantize_pack_torch else (x, 64)
            codes, mins, scales, wide = fn(*args, bits, 3, False)
            dec = K.unpack_dequant(codes, x.numel(), 64, mins, scales, bits)
            assert float((dec - x).abs().max()) <= float(scales.max()) * 0.5001


def test_bad_inputs():
    with pytest.raises(ValueError, match="unsupported bits"):
        UniformCodec(bits=3)
    with pytest.raises(ValueError, match="group_size"):
        UniformCodec(group_size=0)
    with pytest.raises(ValueError, match="rounding"):
        UniformCodec(rounding="up")
    with pytest.raises(TypeError, match="floating"):
        UniformCodec().encode(torch.arange(10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        UniformCodec().encode([1.0, 2.0])
    with pytest.raises(ValueError, match="made by"):
        UniformCodec().decode(MaskCodec().encode(torch.ones(3, dtype=torch.bool)))
    with pytest.raises(TypeError):
        MaskCodec().encode(torch.ones(3))
    with pytest.raises(TypeError):
        IndexCodec().encode(torch.ones(3))


def test_global_rng_untouched():
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    UniformCodec(bits=2).encode(torch.arange(100.0))
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("n", [7, 100, 4096, 37_001])
@pytest.mark.parametrize("group_size", [64, 49, 7])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("stochastic", [True, False])
def test_numba_kernels_bit_exact_against_torch(n, group_size, bits, stochastic):
    x = torch.randn(n) * 3 + 1
    gmin, gmax = K.group_minmax(x, group_size)
    fast = K.quantize_pack(x, group_size, bits, 1234, stochastic)
    ref = K.quantize_pack_torch(x, group_size, gmin, gmax, bits, 1234, stochastic)
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    codes, mins, scales, _ = fast
    assert codes.numel() == K.packed_nbytes(n, group_size, bits)
    dec = K.unpack_dequant(codes, n, group_size, mins, scales, bits)
    assert torch.equal(dec, K.unpack_dequant_torch(codes, n, group_size, mins, scales, bits))
    assert bool(((dec - x).abs() <= scales.repeat_interleave(group_size)[:n] * 1.0001 + 1e-6).all())
    raw = torch.randint(0, 2**bits, (n,), dtype=torch.uint8)
    packed = K.pack_bits(raw, bits)
    assert torch.equal(packed, K.pack_bits_torch(raw, bits))
    assert torch.equal(K.unpack_bits(packed, bits, n), raw)


def test_mask_codec():
    m = torch.rand(3, 333) > 0.5
    p = MaskCodec().encode(m)
    assert p.nbytes == math.ceil(999 / 8)
    assert torch.equal(MaskCodec().decode(p), m)


def test_index_codec_maxpool_positions():
    x = torch.randn(16, 8, 28, 28)
    _, idx = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    p = IndexCodec().encode(idx)
    assert p.info["mode"] == "dict" and p.info["bits"] == 2
    assert p.raw_nbytes / p.nbytes > 25
    assert torch.equal(IndexCodec().decode(p), idx)


@pytest.mark.parametrize(
    "t",
    [
        torch.randint(-5, 5, (100,)),
        torch.randint(0, 200, (7, 9)),
        torch.randint(-(2**40), 2**40, (50,)),
        torch.randint(0, 70000, (3, 4, 5, 6)),
        torch.tensor(3),
        torch.empty(0, dtype=torch.int64),
        torch.randint(0, 3, (10,), dtype=torch.int32),
    ],
)
def test_index_codec_lossless(t):
    y = IndexCodec().decode(IndexCodec().encode(t))
    assert y.dtype == t.dtype and torch.equal(y, t)


def test_index_codec_fused_cpu_path_matches_torch_path(monkeypatch):
    """The numba passes (CPU) store the same bytes as the torch path, and each decodes the other's."""
    from lowbit.codecs import lossless

    x = torch.randn(40, 7, 66, 50)  # 4.6e4 outputs: several parallel chunks, rows of 33 * 25 that straddle them
    _, pool = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
    for t in (pool, torch.randint(-3, 250, (300, 301)), torch.randint(0, 5, (70001,)), torch.randint(-9, 9, (2, 3, 4))):
        p_fused = IndexCodec().encode(t)
        monkeypatch.setattr(lossless, "FUSED_CPU", False)
        p_torch = IndexCodec().encode(t)
        assert p_fused.info == p_torch.info and p_fused.payload.keys() == p_torch.payload.keys()
        for k in p_fused.payload:
            assert torch.equal(p_fused.payload[k], p_torch.payload[k]), k
        assert torch.equal(IndexCodec().decode(p_fused), t)
        monkeypatch.setattr(lossless, "FUSED_CPU", True)
        assert torch.equal(IndexCodec().decode(p_torch), t)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group_size", [196, 64])  # 64: the small-group dequantizer (blocks of groups)
def test_parallel_kernels_match_serial_and_torch(bits, group_size):
    """Large tensors take the multi-threaded kernels: same bits as the torch reference, with
    zero-preserving (ReLU) groups mixed in."""
    n = (1 << 18) + 4099
    x = torch.randn(n)
    x[: n // 2] = x[: n // 2].relu()
    gmin, gmax = K.group_minmax(x, group_size)
    fast = K.quantize_pack(x, group_size, bits, 99, True)
    ref = K.quantize_pack_torch(x, group_size, gmin, gmax, bits, 99, True)
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)
    codes, mins, scales, _ = fast
    dec = K.unpack_dequant(codes, n, group_size, mins, scales, bits)
    assert torch.equal(dec, K.unpack_dequant_torch(codes, n, group_size, mins, scales, bits))
    if bits > 1:
        head = (n // 2) // group_size * group_size  # groups wholly in the ReLU half
        assert bool((dec[:head][x[:head] == 0] == 0).all())  # their zeros stay exact


def test_error_bounded_codec_in_chunks_keeps_the_bound_and_decodes_like_one_frame():
    from lowbit.codecs import ErrorBoundedCodec

    x = torch.cumsum(torch.randn(10_007), 0).reshape(1, -1) * 0.1  # smooth: Lorenzo carries across frames
    whole, parts = ErrorBoundedCodec(chunk=1 << 20), ErrorBoundedCodec(chunk=1000)
    pw, pp = whole.encode(x, eb=0.01), parts.encode(x, eb=0.01)
    assert len(pp.info["frames"]) == 11 and len(pw.info["frames"]) == 1
    yw, yp = whole.decode(pw), parts.decode(pp)
    assert torch.equal(yw, yp) and float((yp - x).abs().max()) <= 0.01
    assert pp.nbytes < 0.5 * x.numel() * 4
    with pytest.raises(ValueError, match="chunk"):
        ErrorBoundedCodec(chunk=0)


def test_layout_group_follows_planes_and_rows():
    from lowbit.codecs.uniform import layout_group

    maps = torch.randn(2, 4, 24, 24)
    assert layout_group(maps, 256) == 576  # a whole channel plane
    assert layout_group(maps, 256, bits=2) == 64  # at 2 bits: 64-element blocks inside the plane
    assert layout_group(torch.randn(2, 4, 3, 3), 256) == 72  # small planes several at a time
    assert layout_group(torch.randn(2, 10, 64), 256) == 64  # a token row
    assert layout_group(torch.randn(1000), 256) == 256
