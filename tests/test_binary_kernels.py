import pytest
import torch

from lowbit.kernels.binary import (
    binary_matmul,
    binary_matmul_torch,
    pack_mask,
    pack_signs,
    pack_signs_torch,
    pack_ternary,
    ternary_matmul,
    ternary_matmul_torch,
    unpack_signs,
)


def _pm1(x):
    return torch.where(x >= 0, 1.0, -1.0)


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 5, 64), (7, 3, 65), (33, 17, 130), (4, 9, 640)])
def test_binary_matmul_is_exact(m, n, k):
    a, b = torch.randn(m, k), torch.randn(n, k)
    pa, pb = pack_signs(a), pack_signs(b)
    assert torch.equal(pa, pack_signs_torch(a)) and torch.equal(unpack_signs(pa, k), _pm1(a))
    ref = (_pm1(a).double() @ _pm1(b).double().T).round().int()
    assert torch.equal(binary_matmul(pa, pb, k), ref)
    assert torch.equal(binary_matmul_torch(pa, pb, k), ref)
    valid = torch.rand(m, k) > 0.3  # conv padding: those entries are 0, not +-1
    ref_v = ((_pm1(a) * valid).double() @ _pm1(b).double().T).round().int()
    assert torch.equal(binary_matmul(pa, pb, k, pack_mask(valid)), ref_v)
    t = torch.randint(-1, 2, (n, k)).float()
    plus, minus = pack_ternary(t)
    ref_t = (_pm1(a).double() @ t.double().T).round().int()
    assert torch.equal(ternary_matmul(pa, plus, minus, k), ref_t)
    assert torch.equal(ternary_matmul_torch(pa, plus, minus, k), ref_t)
    ref_tv = ((_pm1(a) * valid).double() @ t.double().T).round().int()
    assert torch.equal(ternary_matmul(pa, plus, minus, k, pack_mask(valid)), ref_tv)


def test_non_contiguous_inputs_and_zero_is_plus_one():
    a = torch.randn(70, 12).T  # [12, 70], non-contiguous
    b = torch.randn(5, 70)
    a[0, :3] = 0.0
    ref = (_pm1(a) @ _pm1(b).T).round().int()
    assert torch.equal(binary_matmul(pack_signs(a), pack_signs(b), 70), ref)
    assert unpack_signs(pack_signs(a), 70)[0, 0] == 1.0


def test_bad_packed_inputs():
    a = pack_signs(torch.randn(3, 100))
    with pytest.raises(ValueError, match="k=200"):
        binary_matmul(a, a, 200)
    with pytest.raises(TypeError, match="packed int64"):
        binary_matmul(a.int(), a, 100)
    with pytest.raises(TypeError, match="floating-point"):
        pack_signs(torch.ones(2, 3, dtype=torch.long))


def test_llvm_popcount_gemm_matches_numba_and_reference():
    from lowbit.kernels import popcount_gemm
    from lowbit.kernels.binary import _BINARY_MM_NB

    assert popcount_gemm.available(), popcount_gemm.fallback_reason()
    # every column-block variant (N < 16, < 32, >= 32), rows and columns not multiples of the
    # micro-tile, K not a multiple of 64, K past 16-bit sums, one word
    for m, n, k in [(4, 4, 64), (9, 13, 513), (64, 5, 1000), (6, 17, 130), (13, 33, 515), (100, 40, 70000), (7, 9, 1)]:
        a, b = pack_signs(torch.randn(m, k)), pack_signs(torch.randn(n, k))
        ref = binary_matmul_torch(a, b, k)
        for threads in (1, 2):
            assert torch.equal(popcount_gemm.popcount_gemm(a, b, k, threads=threads), ref)
        assert torch.equal(popcount_gemm.popcount_gemm(a[1::2], b[::2], k), ref[1::2, ::2])  # strided rows
        out = torch.empty(m, n, dtype=torch.int32)
        for kernel in _BINARY_MM_NB:  # parallel and serial builds
            kernel(a.numpy(), b.numpy(), k, out.numpy())
            assert torch.equal(out, ref)
        assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="int32"):
        popcount_gemm.popcount_gemm(a, b, 1 << 31)


@pytest.mark.parametrize("c,o,kernel,stride,padding,dilation,hw,batch,xnor", [
    (32, 32, (3, 3), (1, 1), (1, 1), (1, 1), (14, 14), 3, True),   # two taps per word, padded
    (64, 40, (3, 3), (2, 2), (1, 1), (1, 1), (7, 9), 2, False),    # one word per tap, odd sizes, stride
    (128, 9, (1, 1), (1, 1), (0, 0), (1, 1), (4, 4), 1, True),     # two words per tap, 1x1, batch 1
    (8, 16, (5, 3), (1, 2), (2, 0), (2, 1), (11, 8), 2, True),     # 8 taps per word, dilation, uneven
    (1, 3, (3, 3), (1, 1), (0, 0), (1, 1), (5, 5), 7, False),      # one channel
])
def test_fused_binary_conv_matches_float_conv(c, o, kernel, stride, padding, dilation, hw, batch, xnor):
    import torch.nn.functional as F

    from lowbit.kernels import binary_conv, popcount_gemm

    assert binary_conv.available(), popcount_gemm.fallback_reason()
    torch.manual_seed(0)
    x = torch.randn(batch, c, *hw)
    w = torch.randn(o, c, *kernel)
    alpha, bias = torch.rand(o) + 0.5, torch.randn(o)
    ref_int = F.conv2d(_pm1(x), _pm1(w), None, stride, padding, dilation)  # padded zeros are 0, not -1
    ho, wo = ref_int.shape[-2:]
    scale = torch.ones(batch, 1, ho, wo)
    if xnor:  # XNOR-Net's K: mean |x| over channels, box-filtered over the taps, padding counted
        ka = F.conv2d(x.abs().mean(1, keepdim=True), torch.ones(1, 1, *kernel), None, stride, padding, dilation)
        scale = ka / (kernel[0] * kernel[1])
    ref = ref_int * alpha.reshape(1, -1, 1, 1) * scale + bias.reshape(1, -1, 1, 1)
    # the packed layout: taps of C bits end to end in (kh, kw, C) order, padding taps 0 bits = -1
    taps = pack_signs(w.permute(0, 2, 3, 1).reshape(o, -1))
    valid = F.unfold(torch.ones(1, c, *hw), kernel, dilation, padding, stride)[0].T  # [L, K] in (C, kh, kw) order
    corr = ((1 - valid) @ _pm1(w).reshape(o, -1).T).round().to(torch.int32) if any(padding) else None
    plan = binary_conv.plan_conv(taps, c, kernel, stride, padding, dilation, ho, wo, c * kernel[0] * kernel[1], xnor,
                                 alpha, corr, bias)
    for threads in (1, 2):
        y = binary_conv.binary_conv2d_nhwc(x.permute(0, 2, 3, 1), plan, threads=threads)
        y = y.reshape(batch, ho, wo, o).permute(0, 3, 1, 2)
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-5), float((y - ref).abs().max())
    with pytest.raises(ValueError, match="divide 64"):
        binary_conv.plan_conv(taps, 96, kernel, stride, padding, dilation, ho, wo, 96, xnor, alpha, corr, bias)
