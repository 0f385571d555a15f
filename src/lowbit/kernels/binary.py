"""Bit-packed binary and ternary matrix products (XNOR/XOR + popcount).

Layout: a +-1 matrix [R, K] is packed along K into int64 words [R, ceil(K / 64)]: bit b of word w
is 1 where element 64 w + b is >= 0 (+1), 0 where it is negative (-1); padding bits are 0 in
every operand. Then for rows a, b of the same K:

    a . b = K - 2 * popcount(a XOR b)              (padding bits are 0 in both: never counted)
    with a validity mask v (conv padding, where the input is 0 rather than +-1):
    a . b = popcount(v) - 2 * popcount((a XOR b) AND v)

Ternary values {-1, 0, +1} use two bit-planes, plus (p) and minus (n); against +-1 signs s:
    t . x = [2 popcount(p AND s) - popcount(p)] - [2 popcount(n AND s) - popcount(n)].

CPU tensors use a register-blocked LLVM kernel for the plain binary product (popcount_gemm.py,
512-bit vectors where the CPU has them) and numba kernels for the rest (parallel over rows, LLVM's
ctpop); every other device uses the torch reference (unpack to +-1 and an ordinary matmul),
which is also what tests compare the kernels against bit for bit.
"""
from __future__ import annotations

import types as pytypes

import numba
import numpy as np
import torch
from numba import types
from numba.extending import intrinsic

from lowbit.kernels import popcount_gemm

WORD = 64


@intrinsic
def _popcount(typingctx, x):
    """LLVM ctpop on a 64-bit integer."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


_PARALLEL_MIN = 1 << 16  # work items below which the serial twin runs (a parallel launch costs ~10-50 us)


def parallel_and_serial(fn, cache: bool = True, **options):
    """(parallel, serial) numba builds of one kernel body (prange is range in the serial one); the
    serial copy has its own qualified name so the two never share a cache entry. ``options`` go
    to both builds (e.g. fastmath)."""
    serial = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    serial.__qualname__ = fn.__qualname__ + "_serial"
    return (numba.njit(parallel=True, cache=cache, **options)(fn), numba.njit(cache=cache, **options)(serial))


def _pick(twins, work: int):
    return twins[0] if work >= _PARALLEL_MIN else twins[1]


def words_for(k: int) -> int:
    return (k + WORD - 1) // WORD


# ----------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------
def _pack_signs_nb(x, out):  # x float32 [R, K] -> out int64 [R, W]
    r, k = x.shape
    w = out.shape[1]
    for i in numba.prange(r):
        for j in range(w):
            word = np.int64(0)
            base = j * 64
            top = min(64, k - base)
            for b in range(top):
                if x[i, base + b] >= 0:
                    word |= np.int64(1) << np.int64(b)
            out[i, j] = word


_PACK_SIGNS_NB = parallel_and_serial(_pack_signs_nb)


def pack_signs_torch(x: torch.Tensor) -> torch.Tensor:
    """Reference: float [R, K] -> int64 [R, ceil(K/64)] (bit = x >= 0)."""
    r, k = x.shape
    w = words_for(k)
    bits = torch.zeros(r, w * WORD, dtype=torch.int64, device=x.device)
    bits[:, :k] = (x >= 0).to(torch.int64)
    shifts = torch.arange(WORD, device=x.device, dtype=torch.int64)
    return (bits.reshape(r, w, WORD) << shifts).sum(-1)  # disjoint bits: the sum is the OR


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of a float matrix [R, K] (any strides) along K: int64 [R, ceil(K / 64)]."""
    if x.dim() != 2:
        raise ValueError(f"pack_signs expects a matrix [R, K], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"pack_signs expects a floating-point tensor, got {x.dtype}")
    if x.device.type != "cpu":
        return pack_signs_torch(x)
    xc = x.detach().to(torch.float32).contiguous()
    out = torch.empty(x.shape[0], words_for(x.shape[1]), dtype=torch.int64)
    if x.numel():
        _pick(_PACK_SIGNS_NB, x.numel())(xc.numpy(), out.numpy())
    return out


def unpack_signs(packed: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [R, W] -> float32 +-1 [R, k]."""
    shifts = torch.arange(WORD, device=packed.device, dtype=torch.int64)
    bits = (packed[:, :, None] >> shifts) & 1
    return (bits.reshape(packed.shape[0], -1)[:, :k] * 2 - 1).to(torch.float32)


def pack_mask(m: torch.Tensor) -> torch.Tensor:
    """Pack a bool/0-1 matrix [R, K] along K (bit = m != 0)."""
    return pack_signs(torch.where(m.bool(), 1.0, -1.0))


def unpack_mask(packed: torch.Tensor, k: int) -> torch.Tensor:
    return unpack_signs(packed, k) > 0


# ----------------------------------------------------------------------------------------
# products
# ----------------------------------------------------------------------------------------
def _binary_mm_nb(a, b, k, out):  # a [M, W], b [N, W] int64 -> out int32 [M, N]
    m, w = a.shape
    n = b.shape[0]
    for i in numba.prange(m):
        for j in range(n):
            s = np.int64(0)
            for t in range(w):
                s += _popcount(a[i, t] ^ b[j, t])
            out[i, j] = k - 2 * s


_BINARY_MM_NB = parallel_and_serial(_binary_mm_nb)


@numba.njit(parallel=True, cache=True)
def _binary_mm_masked_nb(a, v, b, out):  # a, v [M, W]; b [N, W] -> out int32 [M, N]
    m, w = a.shape
    n = b.shape[0]
    for i in numba.prange(m):
        valid = np.int64(0)
        for t in range(w):
            valid += _popcount(v[i, t])
        for j in range(n):
            s = np.int64(0)
            for t in range(w):
                s += _popcount((a[i, t] ^ b[j, t]) & v[i, t])
            out[i, j] = valid - 2 * s


@numba.njit(parallel=True, cache=True)
def _ternary_mm_nb(s, v, p, q, out):  # signs s, valid v [M, W]; plus p, minus q [N, W] -> int32 [M, N]
    m, w = s.shape
    n = p.shape[0]
    for i in numba.prange(m):
        for j in range(n):
            acc = np.int64(0)
            for t in range(w):
                sv = s[i, t] & v[i, t]
                pv = p[j, t] & v[i, t]
                qv = q[j, t] & v[i, t]
                acc += 2 * _popcount(pv & sv) - _popcount(pv) - 2 * _popcount(qv & sv) + _popcount(qv)
            out[i, j] = acc


def _check_packed(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int64 or t.dim() != 2:
        raise TypeError(f"{name} must be packed int64 words [rows, words], got {t.dtype} {list(t.shape)}")


def binary_matmul_torch(a: torch.Tensor, b: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: unpack to +-1 (0 where ``valid`` is 0) and multiply exactly in float64."""
    x, y = unpack_signs(a, k).double(), unpack_signs(b, k).double()
    if valid is not None:
        x = x * unpack_mask(valid, k).double()
    return torch.round(x @ y.T).to(torch.int32)


def binary_matmul(a: torch.Tensor, b: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact integer product of packed +-1 matrices: a [M, W], b [N, W] (K = ``k`` columns each)
    -> int32 [M, N] = A @ B^T. ``valid`` [M, W]: a mask of A's entries that exist (the others
    count as 0, e.g. conv zero padding)."""
    _check_packed("a", a)
    _check_packed("b", b)
    if a.shape[1] != b.shape[1] or a.shape[1] != words_for(k):
        raise ValueError(f"packed widths {a.shape[1]} and {b.shape[1]} do not both hold k={k} columns "
                         f"({words_for(k)} words)")
    if valid is not None and valid.shape != a.shape:
        raise ValueError(f"valid must have a's shape {list(a.shape)}, got {list(valid.shape)}")
    if a.device.type != "cpu":
        return binary_matmul_torch(a, b, k, valid)
    if valid is None:
        return xor_popcount_product(a, b, k)
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32)
    if out.numel():
        _binary_mm_masked_nb(a.contiguous().numpy(), valid.contiguous().numpy(), b.contiguous().numpy(), out.numpy())
    return out


def xor_popcount_product(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """k - 2 * popcount(a_i XOR b_j) for packed rows of the same width (no width check: callers
    whose rows hold zero padding bits, e.g. channel-packed conv taps, pass the true k)."""
    if a.device.type != "cpu":
        words = a.shape[1] * WORD
        x, y = unpack_signs(a, words).double(), unpack_signs(b, words).double()
        return (k - (words - torch.round(x @ y.T)) / 2 * 2).to(torch.int32)
    if a.shape[0] >= popcount_gemm.ROWS and b.shape[0] and popcount_gemm.available():
        return popcount_gemm.popcount_gemm(a, b, k)  # fewer rows than a micro-tile: mostly padding
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32)
    if out.numel():
        _pick(_BINARY_MM_NB, out.numel() * a.shape[1])(a.contiguous().numpy(), b.contiguous().numpy(), k, out.numpy())
    return out


def _gather_taps_nb(img, c, kh, kw, sh, sw, dh, dw, ph, pw, ho, wo, out):
    """img int64 [N, H, W, Wc]: C sign bits per pixel. out int64 [N*ho*wo, ceil(kh*kw*C/64)]: for
    each output position, the C bits of each tap (kh, kw order) end to end; taps in the zero
    padding (ph, pw) stay 0 bits."""
    n, h, w, wc = img.shape
    rows = n * ho * wo
    for r in numba.prange(rows):
        b = r // (ho * wo)
        oy = (r // wo) % ho
        ox = r % wo
        for t in range(out.shape[1]):
            out[r, t] = 0
        bit = 0
        for ty in range(kh):
            for tx in range(kw):
                py = oy * sh + ty * dh - ph
                px = ox * sw + tx * dw - pw
                if py < 0 or py >= h or px < 0 or px >= w:
                    bit += c
                    continue
                if c % 64 == 0:
                    for q in range(wc):
                        out[r, bit // 64 + q] = img[b, py, px, q]
                else:  # c divides 64: the tap fits in one word at a bit offset
                    out[r, bit // 64] |= img[b, py, px, 0] << np.int64(bit % 64)
                bit += c


_GATHER_TAPS_NB = parallel_and_serial(_gather_taps_nb)


def gather_conv_taps(img: torch.Tensor, c: int, kernel_size, stride, padding, dilation, ho: int, wo: int) -> torch.Tensor:
    """Binary im2col on packed pixels: img int64 [N, H, W, ceil(C/64)] -> rows int64
    [N * ho * wo, ceil(kh * kw * C / 64)] in bit order (kh, kw, C) — the order of
    ``pack_signs(w.permute(0, 2, 3, 1).reshape(O, -1))``; taps in the zero padding get 0 bits.
    Needs C % 64 == 0 or 64 % C == 0."""
    if c % WORD and WORD % c:
        raise ValueError(f"gather_conv_taps needs C to divide 64 or be a multiple of 64, got C={c}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    out = torch.empty(img.shape[0] * ho * wo, words_for(kh * kw * c), dtype=torch.int64)
    if out.numel():
        _pick(_GATHER_TAPS_NB, out.numel())(img.contiguous().numpy(), c, kh, kw, sh, sw, dh, dw, ph, pw, ho, wo, out.numpy())
    return out


def _epilogue_nb(acc, corr, per_pos, alpha, rscale, bias, out):
    """out[r, o] = (acc[r, o] + corr[r % per_pos, o]) * alpha[o] * rscale[r] + bias[o] (float32)."""
    rows, o = acc.shape
    has_corr = corr.shape[0] > 0
    has_scale = rscale.shape[0] > 0
    for r in numba.prange(rows):
        s = rscale[r] if has_scale else np.float32(1.0)
        p = r % per_pos
        for j in range(o):
            v = np.float32(acc[r, j] + (corr[p, j] if has_corr else 0))
            out[r, j] = v * alpha[j] * s + bias[j]


_EPILOGUE_NB = parallel_and_serial(_epilogue_nb)


def scale_epilogue(acc: torch.Tensor, alpha: torch.Tensor, corr: torch.Tensor | None = None, per_pos: int = 1,
                   row_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [R, O] = (acc + corr[row % per_pos]) * alpha * row_scale + bias in one pass
    (acc int32 [R, O], corr int32 [per_pos, O], alpha/bias [O], row_scale [R])."""
    if acc.device.type != "cpu":
        y = acc.float()
        if corr is not None:
            y = (y.reshape(-1, per_pos, y.shape[1]) + corr.float()).reshape(y.shape)
        y = y * alpha
        if row_scale is not None:
            y = y * row_scale.reshape(-1, 1)
        return y if bias is None else y + bias
    o = acc.shape[1]
    out = torch.empty(acc.shape, dtype=torch.float32)
    _pick(_EPILOGUE_NB, acc.numel())(acc.contiguous().numpy(),
                 (corr if corr is not None else torch.zeros(0, o, dtype=torch.int32)).contiguous().numpy(), per_pos,
                 alpha.float().contiguous().numpy(),
                 (row_scale.reshape(-1).float() if row_scale is not None else torch.zeros(0)).contiguous().numpy(),
                 (bias.float() if bias is not None else torch.zeros(o)).contiguous().numpy(), out.numpy())
    return out


def pack_ternary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary matrix [R, K] (values compared with 0) -> (plus plane, minus plane), int64 [R, W]."""
    return pack_mask(t > 0), pack_mask(t < 0)


def ternary_matmul_torch(signs, plus, minus, k, valid=None) -> torch.Tensor:
    x = unpack_signs(signs, k).double()
    if valid is not None:
        x = x * unpack_mask(valid, k).double()
    y = unpack_mask(plus, k).double() - unpack_mask(minus, k).double()
    return torch.round(x @ y.T).to(torch.int32)


def ternary_matmul(signs: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor, k: int,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact product of packed +-1 rows [M, W] (``valid`` as in binary_matmul) with ternary rows
    given as two bit-planes [N, W]: int32 [M, N]."""
    for name, t in (("signs", signs), ("plus", plus), ("minus", minus)):
        _check_packed(name, t)
    if not (signs.shape[1] == plus.shape[1] == minus.shape[1] == words_for(k)):
        raise ValueError(f"packed widths must all be {words_for(k)} words for k={k}")
    if signs.device.type != "cpu":
        return ternary_matmul_torch(signs, plus, minus, k, valid)
    if valid is None:
        valid = torch.full_like(signs, -1)
        rem = k % WORD
        if rem:
            valid[:, -1] = (1 << rem) - 1
    out = torch.empty(signs.shape[0], plus.shape[0], dtype=torch.int32)
    if out.numel():
        _ternary_mm_nb(signs.contiguous().numpy(), valid.contiguous().numpy(), plus.contiguous().numpy(),
                       minus.contiguous().numpy(), out.numpy())
    return out
