"""Weight-only low-bit matrix-vector products: packed 2..8-bit weight codes times float activations.

Layout (shared by the packer, the torch reference and the numba kernels). A weight ``W`` of shape
[N, K] (out features x in features) is stored as

- ``qweight``: uint8 [ceil(N / 64), ceil(K / 8) * bits, 64]: tiles of 64 output rows, each tile
  K-major (byte ``j`` of all 64 rows next to each other, so a kernel streams a tile from memory
  once and vectorises along its rows). Within a row, each run of 8 consecutive weights is one
  ``bits``-byte chunk; weight ``8c + i`` is bits ``i * bits .. i * bits + bits - 1`` of chunk
  ``c`` read as a little-endian integer. At 4 bits that is two codes per byte (the even weight in
  the low nibble), at 2 bits four per byte, at 3 bits 8 codes in 3 bytes. Rows past N and weights
  past K (when K is not a multiple of 8) are zero codes: padding, never read as weights.
- ``scales``, ``zeros``: float16 [N, G] with ``G = ceil(K / group_size)``; group ``g`` of a row
  covers weights ``g * group_size .. min((g + 1) * group_size, K) - 1`` (the last group of a row
  may be shorter: a "ragged tail") and dequantizes as ``w = (code - zero) * scale``.
  ``group_size`` is a multiple of 8, so every group starts on a chunk boundary at any width.

``packed_linear(x, ...)`` computes ``x @ W.T`` without building ``W``: on CPU float32 inputs the
numba kernels (parallel over tiles of output rows, dequantization fused into the dot product as
``sum_g scale_g * (sum_k code_k x_k - zero_g * sum_k x_k)``); anywhere else the torch reference
:func:`packed_linear_torch`, which dequantizes and calls ``F.linear`` and is also what the tests
compare the kernels against.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import prange

_CHUNK = 8  # weights per chunk: 8 codes of any width 2..8 fill whole bytes
TILE = 64  # output rows per tile (a compile-time constant of the kernels)
_SIXTEENTH = np.float32(1.0 / 16.0)
_SIXTEEN32 = np.float32(16.0)


def row_bytes(k: int, bits: int) -> int:
    """Bytes one packed row of ``k`` weights takes at ``bits`` bits."""
    return -(-k // _CHUNK) * bits


def packed_shape(n: int, k: int, bits: int) -> tuple[int, int, int]:
    """Shape of ``qweight`` for an [n, k] weight at ``bits`` bits."""
    return (-(-n // TILE), row_bytes(k, bits), TILE)


def check_layout(bits: int, group_size: int) -> None:
    """Raise ValueError unless ``bits`` is 2..8 and ``group_size`` a positive multiple of 8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % _CHUNK:
        raise ValueError(f"group_size must be a positive multiple of {_CHUNK} (groups start on whole bytes at "
                         f"every width), got {group_size!r}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [N, K] in 0..2**bits-1 -> uint8 ``qweight`` (see the module doc for the layout)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in 0..{(1 << bits) - 1} for {bits} bits")
    tiles, nb, _ = packed_shape(n, k, bits)
    c = nb // bits
    padded = torch.zeros(tiles * TILE, c * _CHUNK, dtype=torch.uint8, device=codes.device)
    padded[:n, :k] = codes.to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    # bit j of code i sits at bit i * bits + j of the chunk, read little-endian
    bitplanes = (padded.view(-1, c, _CHUNK, 1) >> shifts) & 1  # [rows, c, 8, bits]
    bitplanes = bitplanes.reshape(-1, c, bits, 8)  # stream position p = 8 * byte + bit
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    rows = (bitplanes * weights).sum(-1, dtype=torch.int32).to(torch.uint8).reshape(tiles, TILE, nb)
    return rows.transpose(1, 2).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """``qweight`` -> codes uint8 [N, K] (the inverse of :func:`pack_codes`)."""
    if tuple(qweight.shape) != packed_shape(n, k, bits):
        raise ValueError(f"qweight has shape {tuple(qweight.shape)}; a [{n}, {k}] weight at {bits} bits packs to "
                         f"{packed_shape(n, k, bits)}")
    tiles, nb, _ = qweight.shape
    c = nb // bits
    if 8 % bits == 0:  # 2, 4, 8 bits: whole codes per byte, consecutive weights from the low bits up
        rows = qweight.transpose(1, 2).reshape(tiles * TILE, nb, 1)
        shifts = torch.arange(0, 8, bits, device=qweight.device, dtype=torch.uint8)
        codes = (rows >> shifts) & ((1 << bits) - 1)
        return codes.reshape(tiles * TILE, c * _CHUNK)[:n, :k]
    rows = qweight.transpose(1, 2).reshape(tiles * TILE, c, bits, 1)
    shifts = torch.arange(8, device=qweight.device, dtype=torch.uint8)
    stream = ((rows >> shifts) & 1).reshape(-1, c, _CHUNK, bits)
    weights = (1 << torch.arange(bits, device=qweight.device, dtype=torch.int32)).to(torch.uint8)
    codes = (stream * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    return codes.reshape(tiles * TILE, c * _CHUNK)[:n, :k]


def _expand_groups(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, G] per-group values -> [N, K] per-weight values (the last group may be short)."""
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                      group_size: int, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] = (code - zero) * scale, computed in float32 and cast to ``dtype``."""
    codes = unpack_codes(qweight, bits, scales.shape[0], k).to(torch.float32)
    s = _expand_groups(scales.to(torch.float32), group_size, k)
    z = _expand_groups(zeros.to(torch.float32), group_size, k)
    return ((codes - z) * s).to(dtype)


def packed_linear_torch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        bits: int, group_size: int, k: int, bias: torch.Tensor | None = None,
                        chunk_rows: int = 2048) -> torch.Tensor:
    """Reference ``x @ W.T + bias`` for x [..., K] -> [..., N]: dequantizes ``chunk_rows`` output
    rows at a time (so at most that many float rows of the weight exist at once)."""
    n = scales.shape[0]
    if n <= chunk_rows:
        return F.linear(x, dequantize_packed(qweight, scales, zeros, bits, group_size, k, x.dtype), bias)
    chunk_rows = max(TILE, chunk_rows // TILE * TILE)  # whole tiles
    outs = [F.linear(x, dequantize_packed(qweight[i // TILE:(i + chunk_rows) // TILE], scales[i:i + chunk_rows],
                                          zeros[i:i + chunk_rows], bits, group_size, k, x.dtype))
            for i in range(0, n, chunk_rows)]
    y = torch.cat(outs, dim=-1)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------
# numba kernels (CPU). Parallel over tiles of TILE output rows; inside a tile the loops run along
# the tile's 64 rows (contiguous bytes, no horizontal sums), so LLVM vectorises them; indices are
# unsigned so numba emits no negative-index wraparound (which blocks vectorisation). fastmath
# reassociates float sums: equal to the reference within float32 rounding, bit-equal when every
# product and partial sum is exact (the exactness tests use such inputs).
# ----------------------------------------------------------------------------------------
# Pieces every kernel shares, inlined into each at numba's IR level (no call in the hot loop).
@numba.njit(inline="always", cache=True)
def _fold_group(tot, acc, s, sz, g, n0, um, xs):  # pragma: no cover - compiled
    """tot[m] += scale_g * (sum_k code_k x_k) - scale_g * zero_g * (sum_k x_k), along a tile."""
    for i in range(TILE):
        u = np.uint64(i)
        tot[um, u] += s[g, n0 + u] * acc[um, u] - sz[g, n0 + u] * xs


@numba.njit(inline="always", cache=True)
def _store_tile(out, tot, n0):  # pragma: no cover - compiled
    for m in range(tot.shape[0]):
        for i in range(TILE):
            out[m, n0 + np.uint64(i)] = tot[m, i]


@numba.njit(inline="always", cache=True)
def _multiply_chunk(acc, codes, x, k0):  # pragma: no cover - compiled
    """acc[m] += sum over the chunk's 8 weights of codes[kk] * x[m, k0 + kk], for every row m."""
    for m in range(acc.shape[0]):
        um = np.uint64(m)
        for kk in range(8):
            xk = x[um, k0 + np.uint64(kk)]
            for i in range(TILE):
                u = np.uint64(i)
                acc[um, u] += codes[kk, u] * xk


@numba.njit(parallel=True, fastmath=True, cache=True)
def _gemv4_nb(x, qw, s, sz, group_size, out):  # pragma: no cover - compiled
    """4 bits. x float32 [M, K8] zero-padded to a multiple of 8; qw uint8 [tiles, K8 / 2, TILE];
    s, sz = scale * zero float32 [G, tiles * TILE]; out float32 [M, tiles * TILE].

    A byte b = lo + 16 hi holds weights 2j (lo) and 2j + 1 (hi) and contributes
    lo * x_2j + hi * x_2j+1 = b * x_2j + hi * (x_2j+1 - 16 x_2j), so only the high nibble is split
    out (in float arithmetic, exact on integers < 256: numba widens integer ops to int64 lanes,
    which vectorise 4x narrower). Two bytes per pass halve the accumulator's loads and stores,
    which otherwise cost as much as the arithmetic. The activation terms and per-group sums are
    formed here rather than by torch: at batch 1 a handful of small torch ops cost a tenth of the
    whole product."""
    m_rows, k8 = x.shape
    nb = k8 // 2
    group_bytes = group_size // 2
    g_count = s.shape[0]
    one = np.uint64(1)
    for t in prange(qw.shape[0]):
        n0 = np.uint64(t * TILE)
        acc = np.empty((m_rows, TILE), np.float32)
        tot = np.zeros((m_rows, TILE), np.float32)
        for g in range(g_count):
            acc[:] = 0
            j0 = g * group_bytes
            j1 = min(j0 + group_bytes, nb)
            # bytes in pairs: a group (group_size / 2 bytes) and a row (K8 / 2 bytes) both hold a
            # multiple of 4 bytes, so no group ends on an odd byte
            for j in range(j0, j1, 2):
                uj = np.uint64(j)
                k0 = np.uint64(2 * j)
                for m in range(m_rows):
                    um = np.uint64(m)
                    a0, a1 = x[um, k0], x[um, k0 + np.uint64(2)]
                    d0 = x[um, k0 + one] - _SIXTEEN32 * a0
                    d1 = x[um, k0 + np.uint64(3)] - _SIXTEEN32 * a1
                    for i in range(TILE):
                        u = np.uint64(i)
                        b0 = np.float32(qw[t, uj, u])
                        b1 = np.float32(qw[t, uj + one, u])
                        acc[um, u] += ((b0 * a0 + np.floor(b0 * _SIXTEENTH) * d0)
                                       + (b1 * a1 + np.floor(b1 * _SIXTEENTH) * d1))
            for m in range(m_rows):
                um = np.uint64(m)
                xs = np.float32(0.0)  # the group's activation sum: the zero term of every row
                for kk in range(2 * j0, 2 * j1):
                    xs += x[um, np.uint64(kk)]
                _fold_group(tot, acc, s, sz, g, n0, um, xs)
        _store_tile(out, tot, n0)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _gemv_narrow_nb(x, xsum, qw, s, sz, bits, group_size, out):  # pragma: no cover - compiled
    """2 or 3 bits. x [M, K8] zero-padded to a multiple of 8. A chunk (``bits`` bytes, 8 codes) is
    read as one integer v < 2**24, exact in float32; h_r = floor(v / 2**(bits * r)) is exact too,
    and code r = h_r - 2**bits * h_(r+1). All float arithmetic on small integers: no int64 lanes."""
    m_rows, k8 = x.shape
    g_count = s.shape[0]
    chunks = k8 // 8
    group_chunks = group_size // 8
    lev = np.float32(1 << bits)
    i1 = np.float32(1.0) / lev
    i2, i3, i4, i5, i6, i7 = i1 * i1, i1 ** 3, i1 ** 4, i1 ** 5, i1 ** 6, i1 ** 7
    w2 = np.float32(65536.0) if bits == 3 else np.float32(0.0)  # the third byte of a 3-bit chunk
    step2 = np.uint64(2 if bits == 3 else 1)
    one = np.uint64(1)
    for t in prange(qw.shape[0]):
        n0 = np.uint64(t * TILE)
        acc = np.empty((m_rows, TILE), np.float32)
        tot = np.zeros((m_rows, TILE), np.float32)
        codes = np.empty((8, TILE), np.float32)
        for g in range(g_count):
            acc[:] = 0
            c0 = g * group_chunks
            for c in range(c0, min(c0 + group_chunks, chunks)):
                r0 = np.uint64(c * bits)
                k0 = np.uint64(c * 8)
                if m_rows == 1:  # decode and multiply in one pass
                    x0, x1, x2, x3 = x[0, k0], x[0, k0 + one], x[0, k0 + np.uint64(2)], x[0, k0 + np.uint64(3)]
                    x4, x5 = x[0, k0 + np.uint64(4)], x[0, k0 + np.uint64(5)]
                    x6, x7 = x[0, k0 + np.uint64(6)], x[0, k0 + np.uint64(7)]
                    for i in range(TILE):
                        u = np.uint64(i)
                        v = (np.float32(qw[t, r0, u]) + np.float32(256.0) * np.float32(qw[t, r0 + one, u])
                             + w2 * np.float32(qw[t, r0 + step2, u]))
                        h1, h2, h3 = np.floor(v * i1), np.floor(v * i2), np.floor(v * i3)
                        h4, h5, h6, h7 = np.floor(v * i4), np.floor(v * i5), np.floor(v * i6), np.floor(v * i7)
                        acc[0, u] += (((v - lev * h1) * x0 + (h1 - lev * h2) * x1)
                                      + ((h2 - lev * h3) * x2 + (h3 - lev * h4) * x3)) + \
                                     (((h4 - lev * h5) * x4 + (h5 - lev * h6) * x5)
                                      + ((h6 - lev * h7) * x6 + h7 * x7))
                    continue
                for i in range(TILE):  # several rows: decode the chunk once, use it M times
                    u = np.uint64(i)
                    v = (np.float32(qw[t, r0, u]) + np.float32(256.0) * np.float32(qw[t, r0 + one, u])
                         + w2 * np.float32(qw[t, r0 + step2, u]))
                    h1, h2, h3 = np.floor(v * i1), np.floor(v * i2), np.floor(v * i3)
                    h4, h5, h6, h7 = np.floor(v * i4), np.floor(v * i5), np.floor(v * i6), np.floor(v * i7)
                    codes[0, u], codes[1, u], codes[2, u] = v - lev * h1, h1 - lev * h2, h2 - lev * h3
                    codes[3, u], codes[4, u], codes[5, u] = h3 - lev * h4, h4 - lev * h5, h5 - lev * h6
                    codes[6, u], codes[7, u] = h6 - lev * h7, h7
                _multiply_chunk(acc, codes, x, k0)
            for m in range(m_rows):
                um = np.uint64(m)
                _fold_group(tot, acc, s, sz, g, n0, um, xsum[um, np.uint64(g)])
        _store_tile(out, tot, n0)


@numba.njit(parallel=True, fastmath=True, cache=True)
def _gemv_any_nb(x, xsum, qw, s, sz, bits, group_size, out):  # pragma: no cover - compiled
    """Any width 2..8 (used for 5..8 bits). x [M, K8] zero-padded to a multiple of 8; each 8-weight chunk of a tile is
    decoded once into float codes [8, TILE] and used by all M activation rows."""
    m_rows, k8 = x.shape
    g_count = s.shape[0]
    chunks = k8 // 8
    group_chunks = group_size // 8
    mask = (1 << bits) - 1
    for t in prange(qw.shape[0]):
        n0 = np.uint64(t * TILE)
        v = np.empty(TILE, np.int64)
        codes = np.empty((8, TILE), np.float32)
        acc = np.empty((m_rows, TILE), np.float32)
        tot = np.zeros((m_rows, TILE), np.float32)
        for g in range(g_count):
            acc[:] = 0
            c0 = g * group_chunks
            for c in range(c0, min(c0 + group_chunks, chunks)):
                v[:] = 0
                for tb in range(bits):
                    r = np.uint64(c * bits + tb)
                    for i in range(TILE):
                        u = np.uint64(i)
                        v[u] |= np.int64(qw[t, r, u]) << (8 * tb)
                for k in range(8):
                    for i in range(TILE):
                        u = np.uint64(i)
                        codes[k, u] = np.float32((v[u] >> (bits * k)) & mask)
                _multiply_chunk(acc, codes, x, np.uint64(c * 8))
            for m in range(m_rows):
                um = np.uint64(m)
                _fold_group(tot, acc, s, sz, g, n0, um, xsum[um, np.uint64(g)])
        _store_tile(out, tot, n0)


def kernel_params(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 (scale, scale * zero) pair the CPU kernels read (numba has no float16), transposed
    to [G, tiles * TILE] (rows past N are zero) so a tile's values are contiguous."""
    n, g = scales.shape
    n_pad = -(-n // TILE) * TILE
    s = torch.zeros(g, n_pad, dtype=torch.float32)
    sz = torch.zeros(g, n_pad, dtype=torch.float32)
    s[:, :n] = scales.t().to(torch.float32)
    sz[:, :n] = s[:, :n] * zeros.t().to(torch.float32)
    return s, sz


def _kernel_threads(work_bytes: int) -> int:
    """Threads for one kernel call: torch's setting, but one for small layers (waking a second
    thread costs more than the whole product there)."""
    return 1 if work_bytes < (1 << 18) else max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def packed_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, s32: torch.Tensor, sz32: torch.Tensor, bits: int,
                      group_size: int, n: int, k: int, bias: torch.Tensor | None = None,
                      threads: int | None = None) -> torch.Tensor:
    """The numba path: x float32 [M, K] on CPU -> float32 [M, N]; ``s32, sz32`` from
    :func:`kernel_params`; ``threads`` numba threads (default: torch's, one for small layers)."""
    m = x.shape[0]
    g = s32.shape[0]
    k8 = -(-k // _CHUNK) * _CHUNK
    x = x.contiguous()
    xp = F.pad(x, (0, k8 - k)) if k8 != k else x
    out = torch.empty(m, s32.shape[1], dtype=torch.float32)
    old = numba.get_num_threads()
    want = threads or _kernel_threads(qweight.numel())
    if want != old:  # each change costs a call into the thread pool: skip it when already set
        numba.set_num_threads(want)
    try:
        if bits == 4:
            _gemv4_nb(xp.numpy(), qweight.numpy(), s32.numpy(), sz32.numpy(), group_size, out.numpy())
        else:
            # per-group activation sums: the zero term of every output row, computed once per call
            xg = F.pad(x, (0, g * group_size - k)) if g * group_size != k else x
            xsum = xg.view(m, g, group_size).sum(-1)
            kernel = _gemv_narrow_nb if bits <= 3 else _gemv_any_nb
            kernel(xp.numpy(), xsum.numpy(), qweight.numpy(), s32.numpy(), sz32.numpy(), bits, group_size, out.numpy())
    finally:
        if want != old:
            numba.set_num_threads(old)
    out = out[:, :n] if out.shape[1] != n else out
    return out if bias is None else out + bias


def packed_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group_size: int, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` from the packed weight, x [..., K] -> [..., N]. CPU float32 without
    autograd: the numba kernel (no float copy of W); otherwise the torch reference."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad):
        s32, sz32 = kernel_params(scales, zeros)
        lead = x.shape[:-1]
        y = packed_linear_cpu(x.reshape(-1, k), qweight, s32, sz32, bits, group_size, scales.shape[0], k, bias)
        return y.reshape(*lead, y.shape[-1])
    return packed_linear_torch(x, qweight, scales, zeros, bits, group_size, k, bias)
