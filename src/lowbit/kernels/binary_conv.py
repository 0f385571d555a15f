"""A whole binary conv2d in one call on the CPU: sign packing, bit im2col, XOR-popcount GEMM and
the scaling epilogue, fused per block of output rows so that nothing but the input and the output
travels through memory.

Why fuse: a binary conv's GEMM is 20-60x cheaper than the float one, so the steps around it
(packing the input, gathering taps, XNOR-Net's input scale K, scaling, a Python call per step)
decide its speed. Run separately at batch 64 on the reference ResNet's first binary layer they
cost 6x the GEMM itself.

``binary_conv2d_nhwc(x, plan_conv(...))``: x float32 [N, H, W, C] (NHWC) -> float32 [N * ho * wo, O] =
    (K_bits - 2 popcount(row XOR w_o) + corr[pos, o]) * alpha[o] * s[row] + bias[o]
where a row is the (kh, kw, C) sign bits of one output position (C must divide 64 or be a
multiple of it, so taps pack end to end), taps in the zero padding hold 0 bits (``corr`` adds
back what they miscount; it may have 0 rows), and s is XNOR-Net's input scale (mean over
channels of |x|, box-filtered over the taps with the padding counted) when geom[12] is 1, else 1.
The GEMM step is the register-blocked LLVM micro-kernel of ``popcount_gemm`` called from numba.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from lowbit.kernels import popcount_gemm
from lowbit.kernels.binary import parallel_and_serial

GEOMETRY = ("c", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "ho", "wo", "k", "xnor")  # geom's int64 fields
CHUNK_ROWS = 96  # output rows per block: their gathered words and int32 sums stay in L1/L2


@dataclass(frozen=True)
class ConvPlan:
    """Everything one binary conv needs except its input, for one input size (built once).

    weights: int64 [O' / 8cb, Wk, 8cb], the GEMM's interleaved layout; cb its column blocks;
    geom: int64 fields ``GEOMETRY``; alpha, bias: float32 [O]; corr: int32 [ho * wo, O] or [0, O]."""

    weights: np.ndarray
    cb: int
    geom: np.ndarray
    alpha: np.ndarray
    corr: np.ndarray
    bias: np.ndarray
    ho: int = field(init=False)  # geom's output size as Python ints, read on every call
    wo: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "ho", int(self.geom[9]))
        object.__setattr__(self, "wo", int(self.geom[10]))


def plan_conv(taps: torch.Tensor, c: int, kernel_size, stride, padding, dilation, ho: int, wo: int, k: int,
              xnor: bool, alpha: torch.Tensor, corr: torch.Tensor | None, bias: torch.Tensor | None) -> ConvPlan:
    """taps: the weights' signs packed in (kh, kw, C) bit order, int64 [O, ceil(kh kw C / 64)] (C must
    divide 64 or be a multiple of it); k = C kh kw; alpha/bias [O]; corr [ho * wo, O] or None."""
    if c % 64 and 64 % c:
        raise ValueError(f"the fused binary conv needs C to divide 64 or be a multiple of it, got C={c}")
    o = taps.shape[0]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    geom = np.array([c, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo, k, int(xnor)], dtype=np.int64)
    cb = popcount_gemm.column_blocks_for(o)
    weights = popcount_gemm.interleave_columns(taps.contiguous(), cb).numpy()
    return ConvPlan(weights, cb, geom, alpha.detach().float().contiguous().numpy(),
                    np.zeros((0, o), np.int32) if corr is None else corr.to(torch.int32).contiguous().numpy(),
                    np.zeros(o, np.float32) if bias is None else bias.detach().float().contiguous().numpy())


def available() -> bool:
    return popcount_gemm.available()


@functools.lru_cache(maxsize=1)
def _runners():
    """(parallel, serial) builds of the numba kernel, each compiled on its first call (it calls the
    JIT-compiled GEMM by address, so it cannot be cached on disk); the serial one skips the thread
    hand-off that would dominate a batch-1 conv."""
    import numba

    call_tile = popcount_gemm._compiled().call_tile
    rows_per_tile = popcount_gemm.ROWS

    def run(x, bt, cb, geom, corr, alpha, bias, out, lines_per_block):
        c, kh, kw, sh, sw, ph, pw = geom[0], geom[1], geom[2], geom[3], geom[4], geom[5], geom[6]
        dh, dw, ho, wo, k, xnor = geom[7], geom[8], geom[9], geom[10], geom[11], geom[12] == 1
        n, h, w, _ = x.shape
        wc = (c + 63) // 64
        hp, wp = h + 2 * ph, w + 2 * pw
        # 1. each input pixel once, into a zero-bordered image (the padding: 0 bits, |x| = 0) so
        #    that gathering taps needs no bounds tests: its C sign bits (1 where x >= 0) and mean |x|
        pix = np.zeros((n * hp * wp, wc), np.int64)
        absmean = np.zeros(n * hp * wp, np.float32)
        for line in numba.prange(n * h):
            b, yy = line // h, line % h
            for xx in range(w):
                qp = (b * hp + yy + ph) * wp + xx + pw
                tot = np.float32(0.0)
                for word in range(wc):
                    bits = np.int64(0)
                    for bit in range(min(64, c - word * 64)):
                        v = x[b, yy, xx, word * 64 + bit]
                        tot += abs(v)
                        bits |= np.int64(v >= 0) << np.int64(bit)
                    pix[qp, word] = bits
                absmean[qp] = tot / c
        pix0 = pix[:, 0]
        taps = np.empty(kh * kw, np.int64)  # offset of each tap from a window's first pixel
        for ty in range(kh):
            for tx in range(kw):
                taps[ty * kw + tx] = ty * dh * wp + tx * dw
        # 2. blocks of output lines: gather taps, GEMM into a block of sums, epilogue
        wk, o, np_ = bt.shape[1], out.shape[1], bt.shape[0] * bt.shape[2]
        lines = n * ho
        has_corr = corr.shape[0] > 0
        for blk in numba.prange((lines + lines_per_block - 1) // lines_per_block):
            l0 = blk * lines_per_block
            l1 = min(lines, l0 + lines_per_block)
            m = (l1 - l0) * wo
            mp = (m + rows_per_tile - 1) // rows_per_tile * rows_per_tile
            buf = np.empty((mp, wk), np.int64)  # rows past m hold garbage: their sums are discarded
            acc = np.empty((mp, np_), np.int32)
            scale = np.ones(m, np.float32)
            i = 0
            for line in range(l0, l1):
                b, oy = line // ho, line % ho
                for ox in range(wo):
                    base = (b * hp + oy * sh) * wp + ox * sw
                    ksum = np.float32(0.0)
                    word, filled, t = np.int64(0), 0, 0  # the word being filled stays in a register
                    for tap in range(kh * kw):
                        q = base + taps[tap]
                        ksum += absmean[q]
                        if c % 64 == 0:  # whole words per tap
                            for u in range(wc):
                                buf[i, t] = pix[q, u]
                                t += 1
                        else:  # c divides 64: taps fill words end to end
                            word |= pix0[q] << np.int64(filled)
                            filled += c
                            if filled == 64:
                                buf[i, t] = word
                                t += 1
                                word, filled = np.int64(0), 0
                    if filled:
                        buf[i, t] = word
                    if xnor:
                        scale[i] = ksum / np.float32(kh * kw)
                    i += 1
            call_tile(cb, buf.ctypes.data, bt.ctypes.data, acc.ctypes.data, wk, np_, k, 0, mp, np_)
            r0 = l0 * wo
            for i in range(m):
                s = scale[i]
                if has_corr:
                    pos = ((l0 + i // wo) % ho) * wo + i % wo
                    for j in range(o):
                        out[r0 + i, j] = np.float32(acc[i, j] + corr[pos, j]) * alpha[j] * s + bias[j]
                else:
                    for j in range(o):
                        out[r0 + i, j] = np.float32(acc[i, j]) * alpha[j] * s + bias[j]

    return parallel_and_serial(run, cache=False, fastmath=True)


def binary_conv2d_nhwc(x: torch.Tensor, plan: ConvPlan, threads: int | None = None) -> torch.Tensor:
    """x float [N, H, W, C] (NHWC) on the CPU -> float32 [N * ho * wo, O] (see the module docstring).
    threads: None picks torch's thread count, or one thread for small work."""
    import numba

    n, ho, wo = x.shape[0], plan.ho, plan.wo
    out = torch.empty(n * ho * wo, plan.alpha.shape[0], dtype=torch.float32)
    if n == 0:
        return out
    if x.dtype != torch.float32 or x.requires_grad:
        x = x.detach().float()
    per_block = max(1, CHUNK_ROWS // wo)  # blocks of whole output lines, about CHUNK_ROWS rows
    args = (x.contiguous().numpy(), plan.weights, plan.cb, plan.geom, plan.corr, plan.alpha, plan.bias, out.numpy())
    parallel, serial = _runners()
    if threads is None:
        if out.shape[0] * plan.weights.size < 1 << 17:  # microseconds of work: a hand-off costs more
            serial(*args, per_block)
            return out
        threads = torch.get_num_threads()
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    per_block = max(1, min(per_block, -(-n * ho // threads)))  # at least one block per thread
    if threads == 1:
        serial(*args, per_block)
        return out
    with popcount_gemm.numba_threads(threads):
        parallel(*args, per_block)
    return out
