"""Fused per-group k-bit quantize+pack and unpack+dequantize.

Layout shared by every implementation here: the input is a flat float32 array of ``n``
elements split into consecutive groups of ``group_size`` elements (the last group may be
short). Each group owns ``ceil(group_size * bits / 8)`` whole bytes (group ``g`` starts at byte
``g * that``); element ``k`` of a group sits in the group's byte ``k // (8 // bits)`` at bit
offset ``(k % (8 // bits)) * bits``. Any group size works; multiples of ``8 // bits`` waste no bits.

Stochastic rounding draws ``u ~ U[0, 1)`` (16-bit steps) from a counter-based hash of
``(seed, i // 2)`` (element ``i`` takes the low or high half by its parity): the numba
kernels and the torch reference compute identical bits, which lets tests compare them exactly
and keeps the global torch RNG untouched (dropout masks stay the same with or without
compression).

CPU tensors use the numba kernels (parallel over groups); every other device uses the torch
reference, which is also what the tests compare the kernels against. The CPU quantizer finds
each group's range itself, as the integer min/max of order keys of the float bits (which also
shows NaN and Inf), so the tensor is read from memory once; groups that start at an even
element write their 2/4/8-bit stochastic codes straight into their bytes (no code buffer, no
second packing pass), hashing in 32-bit integer lanes (:func:`_dither_pair`)."""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_INV16 = np.float32(1.0 / 65536.0)


# ----------------------------------------------------------------------------------------
# numba kernels (CPU)
# ----------------------------------------------------------------------------------------
@intrinsic
def _dither_pair(typingctx, seed, pair):
    """The dithers of elements ``2 * pair`` and ``2 * pair + 1``: the low and high 16 bits of the
    lowbias32 hash of ``pair * _GOLDEN + seed`` (mod 2**32) as float32 in [0, 1), the bits
    :func:`uniform01_torch` computes. Written as LLVM IR in 32-bit integer lanes: numba widens
    integer arithmetic to 64 bits, and 64-bit vector multiplies cost several times more."""
    sig = types.UniTuple(types.float32, 2)(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i32, f32 = ir.IntType(32), ir.FloatType()
        k = lambda v: ir.Constant(i32, v)  # noqa: E731
        x = builder.add(builder.mul(builder.trunc(args[1], i32), k(_GOLDEN)), builder.trunc(args[0], i32))
        x = builder.xor(x, builder.lshr(x, k(16)))
        x = builder.mul(x, k(_M1))
        x = builder.xor(x, builder.lshr(x, k(15)))
        x = builder.mul(x, k(_M2))
        x = builder.xor(x, builder.lshr(x, k(16)))
        scale = ir.Constant(f32, float(_INV16))
        lo = builder.fmul(builder.uitofp(builder.and_(x, k(0xFFFF)), f32), scale)
        hi = builder.fmul(builder.uitofp(builder.lshr(x, k(16)), f32), scale)
        return context.make_tuple(builder, signature.return_type, [lo, hi])

    return sig, codegen


_POS_TINY = np.float32(2.0**-24)  # what a positive that rounded to the bottom decodes to (> 0 in fp16 too)
_HALF_MAX = 60000.0  # under float16's 65504, with room for the scale's rounding up
_HALF_TINY = 2.0**-14  # smallest normal float16; below it float16 steps are 2**-24
_MIN_LOSS = 0.05  # the float16 minimum may sit at most this fraction of the range below the true one


@numba.njit(inline="always")
def _to_half_grid(v, up, f32, u32):
    """float32 ``v`` rounded down (or up) to a float16 value (|v| < 65504), by clearing the 13
    mantissa bits float16 lacks; ``f32``/``u32`` are a 1-element scratch and its uint32 view."""
    a = abs(v)
    if a == np.float32(0.0):
        return np.float32(0.0)
    if a < np.float32(_HALF_TINY):  # float16 subnormals: multiples of 2**-24
        k = v * np.float32(16777216.0)
        k = np.ceil(k) if up else np.floor(k)
        return k * np.float32(1.0 / 16777216.0)
    f32[0] = v
    bits = u32[0]
    low = bits & np.uint32(0x1FFF)
    bits = bits & np.uint32(0xFFFFE000)  # toward zero
    if low != np.uint32(0) and ((v > np.float32(0.0)) == up):
        bits = bits + np.uint32(0x2000)  # away from zero (a carry bumps the exponent, as it should)
    u32[0] = bits
    return f32[0]


@numba.njit(inline="always")
def _group_meta(mn, mx, levels, f32, u32):
    """(min, scale, needs_float32) for one group: the minimum rounded down and the scale rounded
    up to float16 values when float16 represents them well enough, else float32 values."""
    if max(abs(mn), abs(mx)) < np.float32(_HALF_MAX):
        m16 = _to_half_grid(mn, False, f32, u32)
        if mn - m16 <= np.float32(_MIN_LOSS) * (mx - mn):
            s16 = _to_half_grid((mx - m16) / levels, True, f32, u32)
            if s16 == np.float32(0.0) or s16 >= np.float32(_HALF_TINY):
                return m16, s16, False
    return mn + np.float32(0.0), (mx - mn) / levels, True  # -0.0 -> +0.0: a stored -0.0 marks zero-preserving groups


_KEY_NEG_INF = np.int32(-2139095041)  # _order_key of -inf (0xFF800000); NaNs with the sign bit sort below it
_KEY_POS_INF = np.int32(0x7F800000)  # _order_key of +inf; NaNs without the sign bit sort above it


@numba.njit(inline="always")
def _order_key(b):
    """float32 bits (as int32) -> an int32 that orders like the float (-0.0 just below +0.0). An
    involution: applying it to a key gives the bits back."""
    return np.int32(b ^ (np.int32(b >> np.int32(31)) & np.int32(0x7FFFFFFF)))  # int32 casts: numba widens to int64


@numba.njit(inline="always")
def _key_range(bs):
    """(min, max) order keys of a group's float32 bits: integer min/max, which the compiler
    vectorises (float min/max with NaN semantics it does not), and NaN/Inf show at the ends."""
    mn = np.int32(0x7FFFFFFF)
    mx = np.int32(-0x80000000)
    for i in range(bs.shape[0]):
        k = _order_key(bs[i])
        mn = np.int32(min(mn, k))  # int32 lanes: twice as many per vector as numba's default int64
        mx = np.int32(max(mx, k))
    return mn, mx


@numba.njit(parallel=True, cache=True, nogil=True)
def _quantize_pack_nb(x, group_size, bits, seed, stochastic, ntasks, codes, meta, flags):
    # ``ntasks`` (a few per thread) balances the load over the cores
    ngroups = meta.shape[1]
    chunk = (ngroups + ntasks - 1) // ntasks
    for task in numba.prange(ntasks):
        _quantize_groups(x, group_size, bits, seed, stochastic, codes, meta, flags,
                         task * chunk, min(ngroups, (task + 1) * chunk))


@numba.njit(cache=True, nogil=True)
def _quantize_pack_serial_nb(x, group_size, bits, seed, stochastic, codes, meta, flags):
    # small tensors: waking the worker threads costs more than it saves
    _quantize_groups(x, group_size, bits, seed, stochastic, codes, meta, flags, 0, meta.shape[1])


@numba.njit(nogil=True)
def _quantize_groups(x, group_size, bits, seed, stochastic, codes, meta, flags, g0, g1):
    # Per group (read from memory once, then from L1): range and finiteness from the order keys of
    # its bits, storable (min, scale), then the codes, packed. ``meta`` float32 [2, ngroups] gets
    # (min, scale), ``flags`` bool [2, ngroups] (needs float32, holds NaN/Inf): a non-finite group
    # is only flagged (the caller then stores the tensor exactly). Two arrays, not four: each
    # argument costs the dispatcher a type check on every call.
    xb = x.view(np.int32)
    mins, scales, wide, bad = meta[0], meta[1], flags[0], flags[1]
    n = x.shape[0]
    levels = np.float32((1 << bits) - 1)
    zero = np.float32(0.0)
    ilevels = (1 << bits) - 1
    group_bytes = (group_size * bits + 7) // 8
    if g1 > g0:
        buf = np.empty(group_size + 8, np.uint8)
        f32 = np.empty(1, np.float32)
        u32 = f32.view(np.uint32)
        i32 = f32.view(np.int32)
        for g in range(g0, g1):
            s = g * group_size
            e = min(s + group_size, n)
            kmin, kmax = _key_range(xb[s:e])
            if kmin <= _KEY_NEG_INF or kmax >= _KEY_POS_INF:
                bad[g] = True
                continue
            i32[0] = _order_key(kmin)
            gmin = f32[0]
            i32[0] = _order_key(kmax)
            gmax = f32[0]
            zp = bits > 1 and gmin == zero and gmax > zero
            if zp:  # zero-preserving group: code 0 is exact zero, positives take codes 1..levels
                m, sc, w = _group_meta(zero, gmax, levels - np.float32(1.0), f32, u32)
                m, top, off, cut = np.float32(-0.0), np.int32(ilevels - 1), np.int32(1), zero
            else:
                m, sc, w = _group_meta(gmin, gmax, levels, f32, u32)
                top, off, cut = np.int32(ilevels), np.int32(0), np.float32(-np.inf)
            mins[g] = m
            scales[g] = sc
            wide[g] = w
            inv = np.float32(1.0) / sc if sc > zero else zero
            if stochastic and s % 2 == 0 and bits != 1:  # pairs aligned: codes straight into their bytes
                _dither_pack(x[s:e], codes[g * group_bytes : (g + 1) * group_bytes], s >> 1, seed, bits,
                             m, inv, top, off, cut)
                continue
            if stochastic:
                # one 32-bit hash serves an aligned pair of elements (16 bits of dither each)
                first = s
                if s % 2:  # odd start: this element takes the high half of its pair's hash
                    buf[0] = _code(x[s], m, inv, _dither_pair(seed, s >> 1)[1], top, off, cut)
                    first = s + 1
                _dither_codes(x[first:e], buf[first - s : e - s], first >> 1, seed, m, inv, top, off, cut)
                if (e - first) % 2:
                    buf[e - 1 - s] = _code(x[e - 1], m, inv, _dither_pair(seed, (e - 1) >> 1)[0], top, off, cut)
            else:
                _nearest_codes(x[s:e], buf, m, inv, top, off, cut)
            pack_codes_into(buf, e - s, bits, codes, g * group_bytes)


@numba.njit(inline="always")
def _log2_bits(bits):
    """log2 of a width in 1, 2, 4, 8 by shifts: ``8 // bits`` is ``8 >> _log2_bits(bits)`` without
    the integer division (tens of cycles), which per group showed in small groups' time."""
    return (bits >> 1) - (bits >> 3)


@numba.njit(inline="always")
def _dequant_group(p, o, m, sc, bits):
    # zero-based slices let the compiler vectorise (see _dither_codes)
    log_bits = _log2_bits(bits)
    per_byte = 8 >> log_bits
    mask = (1 << bits) - 1
    full = o.shape[0] >> (3 - log_bits)  # whole bytes; a short last group ends in a partial one
    if bits == 2:
        for j in range(full):
            byte = np.int32(p[j])
            o[4 * j] = np.float32(byte & 3) * sc + m
            o[4 * j + 1] = np.float32((byte >> 2) & 3) * sc + m
            o[4 * j + 2] = np.float32((byte >> 4) & 3) * sc + m
            o[4 * j + 3] = np.float32(byte >> 6) * sc + m
    elif bits == 4:
        for j in range(full):
            byte = np.int32(p[j])
            o[2 * j] = np.float32(byte & 15) * sc + m
            o[2 * j + 1] = np.float32(byte >> 4) * sc + m
    elif bits == 8:
        for j in range(full):
            o[j] = np.float32(p[j]) * sc + m
    else:
        for j in range(full):
            byte = np.int32(p[j])
            for k in range(8):
                o[8 * j + k] = np.float32((byte >> k) & 1) * sc + m
    for k in range(full * per_byte, o.shape[0]):
        q = (np.int32(p[k >> (3 - log_bits)]) >> ((k & (per_byte - 1)) * bits)) & mask
        o[k] = np.float32(q) * sc + m


@numba.njit(inline="always")
def _decode_offset(m, sc):
    """(offset, zero_preserving) of a group stored as (min ``m``, scale ``sc``): a -0.0 minimum
    marks a zero-preserving group, whose codes 0, 1, q decode with offset -sc to -sc, 0, (q-1)*sc
    (then fixed to 0, tiny, (q-1)*sc by :func:`_fix_zero_preserving`)."""
    zp = m == np.float32(0.0) and math.copysign(1.0, m) < 0.0
    return (-sc if zp else m), zp


@numba.njit(inline="always")
def _scale_group(o, m, sc):
    """Code values -> values in place, as :func:`_dequant_group` computes them (same rounding)."""
    off, zp = _decode_offset(m, sc)
    for i in range(o.shape[0]):
        o[i] = o[i] * sc + off
    if zp:
        _fix_zero_preserving(o)


@numba.njit(inline="always")
def _fix_zero_preserving(o):
    # codes 0 / 1 decoded to -scale / 0: make them 0 / tiny positive, branch-free
    for i in range(o.shape[0]):
        v = o[i]
        o[i] = max(v, np.float32(0.0)) + _POS_TINY * np.float32(v == np.float32(0.0))


@numba.njit(inline="always")
def _dither_codes(xs, bs, pair0, seed, m, inv, top, off, cut):
    # Zero-based slices (not offsets into the whole tensor) let the compiler prove the index
    # arithmetic and vectorise the loop, hash included: 3-4x faster than indexing x[s + 2j].
    for j in range(xs.shape[0] // 2):
        u0, u1 = _dither_pair(seed, pair0 + j)
        bs[2 * j] = _code(xs[2 * j], m, inv, u0, top, off, cut)
        bs[2 * j + 1] = _code(xs[2 * j + 1], m, inv, u1, top, off, cut)


@numba.njit(inline="always")
def _dither_pack(xs, out, pair0, seed, bits, m, inv, top, off, cut):
    """Stochastic codes of a group that starts at element ``2 * pair0``, packed as they are made
    (2, 4 or 8 bits): one pass, no code buffer. The last byte of a group whose length is not a
    multiple of ``8 // bits`` is assembled element by element."""
    n = xs.shape[0]
    if bits == 8:
        for j in range(n // 2):
            u0, u1 = _dither_pair(seed, pair0 + j)
            out[2 * j] = _code(xs[2 * j], m, inv, u0, top, off, cut)
            out[2 * j + 1] = _code(xs[2 * j + 1], m, inv, u1, top, off, cut)
        whole = n - n % 2
    elif bits == 4:
        for j in range(n // 2):
            u0, u1 = _dither_pair(seed, pair0 + j)
            c0 = np.int32(_code(xs[2 * j], m, inv, u0, top, off, cut))
            c1 = np.int32(_code(xs[2 * j + 1], m, inv, u1, top, off, cut))
            out[j] = np.uint8(c0 | (c1 << np.int32(4)))
        whole = n - n % 2
    else:
        for q in range(n // 4):
            u0, u1 = _dither_pair(seed, pair0 + 2 * q)
            u2, u3 = _dither_pair(seed, pair0 + 2 * q + 1)
            c0 = np.int32(_code(xs[4 * q], m, inv, u0, top, off, cut))
            c1 = np.int32(_code(xs[4 * q + 1], m, inv, u1, top, off, cut))
            c2 = np.int32(_code(xs[4 * q + 2], m, inv, u2, top, off, cut))
            c3 = np.int32(_code(xs[4 * q + 3], m, inv, u3, top, off, cut))
            out[q] = np.uint8(c0 | (c1 << np.int32(2)) | (c2 << np.int32(4)) | (c3 << np.int32(6)))
        whole = n - n % 4
    if whole < n:
        last = np.int32(0)
        for i in range(whole, n):
            c = np.int32(_code(xs[i], m, inv, _dither_pair(seed, pair0 + (i >> 1))[i & 1], top, off, cut))
            last |= c << np.int32((i - whole) * bits)
        out[whole >> (3 - _log2_bits(bits))] = np.uint8(last)


@numba.njit(inline="always")
def _nearest_codes(xs, bs, m, inv, top, off, cut):
    for i in range(xs.shape[0]):
        bs[i] = _code(xs[i], m, inv, np.float32(0.5), top, off, cut)


@numba.njit(inline="always")
def _code(v, m, inv, u, top, off, cut):
    """Code of one element: floor((v - m) * inv + u) clipped to ``top`` (v >= m, so truncation is
    floor), shifted by ``off``; elements not above ``cut`` (exact zeros of a zero-preserving
    group) take code 0."""
    c = np.int32(min(np.int32((v - m) * inv + u), top) + off)  # int32 throughout: it vectorises
    return np.uint8(c * np.int32(v > cut))  # branch-free


@numba.njit(inline="always")
def pack_codes_into(buf, length, bits, out, start):
    # One branch per width so each inner loop has a constant trip count the compiler unrolls.
    nbytes = (length * bits + 7) >> 3
    per_byte = 8 >> _log2_bits(bits)
    if length & (per_byte - 1):
        buf[length : length + per_byte] = 0  # zero the tail of a short last group
    if bits == 8:
        for j in range(nbytes):
            out[start + j] = buf[j]
    elif bits == 4:
        for j in range(nbytes):
            out[start + j] = buf[2 * j] | (buf[2 * j + 1] << 4)
    elif bits == 2:
        for j in range(nbytes):
            out[start + j] = buf[4 * j] | (buf[4 * j + 1] << 2) | (buf[4 * j + 2] << 4) | (buf[4 * j + 3] << 6)
    else:
        for j in range(nbytes):
            b = 0
            for k in range(8):
                b |= buf[8 * j + k] << k
            out[start + j] = b


@numba.njit(parallel=True, cache=True, nogil=True)
def _unpack_dequant_nb(packed, group_size, mins, scales, bits, ntasks, out):
    ngroups = mins.shape[0]
    chunk = (ngroups + ntasks - 1) // ntasks
    for task in numba.prange(ntasks):
        _dequant_groups(packed, group_size, mins, scales, bits, out, task * chunk, min(ngroups, (task + 1) * chunk))


@numba.njit(cache=True, nogil=True)
def _unpack_dequant_serial_nb(packed, group_size, mins, scales, bits, out):
    _dequant_groups(packed, group_size, mins, scales, bits, out, 0, mins.shape[0])


_FLAT_BLOCK = 4096  # elements per block of the small-group dequantizer (16 KiB of float32: stays in L1)


@numba.njit(nogil=True)
def _dequant_groups(packed, group_size, mins, scales, bits, out, g0, g1):
    n = out.shape[0]
    group_bytes = (group_size * bits + 7) // 8
    if group_bytes < 32 and group_size % (8 >> _log2_bits(bits)) == 0:
        # Small groups (e.g. 64 features at 2 bits: 16 bytes) are too short for the vectorised byte
        # loop, which then runs scalar (4x slower). Their bytes lie back to back, so a block of
        # groups is unpacked to code values in one long loop, then each group is scaled in place.
        per_block = max(1, _FLAT_BLOCK // group_size)
        for b0 in range(g0, g1, per_block):
            b1 = min(b0 + per_block, g1)
            _dequant_group(packed[b0 * group_bytes : b1 * group_bytes], out[b0 * group_size : min(b1 * group_size, n)],
                           np.float32(0.0), np.float32(1.0), bits)
            for g in range(b0, b1):
                _scale_group(out[g * group_size : min((g + 1) * group_size, n)], mins[g], scales[g])
        return
    for g in range(g0, g1):
        s = g * group_size
        e = min(s + group_size, n)
        sc = scales[g]
        off, zp = _decode_offset(mins[g], sc)
        _dequant_group(packed[g * group_bytes : (g + 1) * group_bytes], out[s:e], off, sc, bits)
        if zp:
            _fix_zero_preserving(out[s:e])


_PACK_CHUNK = 1 << 16  # codes per parallel task in the standalone (un)packers
_PARALLEL_MIN = 1 << 16  # elements below which a kernel runs on the calling thread alone


@numba.njit(parallel=True, cache=True, nogil=True)
def _pack_codes_nb(codes, bits, out):
    n = codes.shape[0]
    per_byte = 8 // bits
    ntasks = (n + _PACK_CHUNK - 1) // _PACK_CHUNK
    for task in numba.prange(ntasks):
        s = task * _PACK_CHUNK
        length = min(_PACK_CHUNK, n - s)
        buf = np.empty(_PACK_CHUNK + 8, np.uint8)
        buf[:length] = codes[s : s + length]
        pack_codes_into(buf, length, bits, out, s // per_byte)


@numba.njit(parallel=True, cache=True, nogil=True)
def _unpack_codes_nb(packed, bits, out):
    n = out.shape[0]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    ntasks = (n + _PACK_CHUNK - 1) // _PACK_CHUNK
    for task in numba.prange(ntasks):
        s = task * _PACK_CHUNK
        e = min(s + _PACK_CHUNK, n)
        for i in range(s, e):
            out[i] = (packed[i // per_byte] >> ((i % per_byte) * bits)) & mask


# ----------------------------------------------------------------------------------------
# torch reference (any device)
# ----------------------------------------------------------------------------------------
def uniform01_torch(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernels' dither for element indices ``0..n-1``: float32 [n] in [0, 1), 16-bit steps.
    Element ``i`` takes the low (even i) or high (odd i) half of the hash of ``i // 2``."""
    m = _MASK32
    x = (torch.arange((n + 1) // 2, dtype=torch.int64, device=device) * _GOLDEN + seed) & m
    x = x ^ (x >> 16)
    x = (x * _M1) & m
    x = x ^ (x >> 15)
    x = (x * _M2) & m
    x = x ^ (x >> 16)
    halves = torch.stack([x & 0xFFFF, x >> 16], dim=1).reshape(-1)[:n]
    return halves.to(torch.float32) * float(_INV16)


def _padded_groups(x: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    n = x.numel()
    ngroups = math.ceil(n / group_size)
    pad = ngroups * group_size - n
    if pad:
        x = torch.cat([x, x.new_full((pad,), fill)])
    return x.view(ngroups, group_size)


def group_minmax(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max (float32 [ceil(n / group_size)]) of a flat float32 tensor, n > 0.
    NaN propagates and Inf shows, so non-finite groups are visible in the result."""
    n = x.numel()
    full = n // group_size
    head = x[: full * group_size].view(full, group_size)
    mins, maxs = head.amin(dim=1), head.amax(dim=1)
    if full * group_size < n:
        tail = x[full * group_size :]
        mins = torch.cat([mins, tail.amin().reshape(1)])
        maxs = torch.cat([maxs, tail.amax().reshape(1)])
    return mins, maxs


def _to_half_grid_torch(v: torch.Tensor, up: bool) -> torch.Tensor:
    """Reference of the kernels' float32 -> float16-grid rounding (down, or up)."""
    bits = v.view(torch.int32)
    low = bits & 0x1FFF
    trunc = bits & ~0x1FFF
    away = (low != 0) & ((v > 0) == up)
    normal = torch.where(away, trunc + 0x2000, trunc).view(torch.float32)
    k = v * 16777216.0
    tiny = (torch.ceil(k) if up else torch.floor(k)) * (1.0 / 16777216.0)
    return torch.where(v == 0, torch.zeros_like(v), torch.where(v.abs() < _HALF_TINY, tiny, normal))


def group_meta_torch(gmin: torch.Tensor, gmax: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of the kernels' per-group (min, scale, needs_float32) for ``levels`` steps."""
    levels = float(levels)
    m16 = _to_half_grid_torch(gmin, False)
    s16 = _to_half_grid_torch((gmax - m16) / levels, True)
    ok = (torch.maximum(gmin.abs(), gmax.abs()) < _HALF_MAX) & (gmin - m16 <= _MIN_LOSS * (gmax - gmin))
    ok &= (s16 == 0) | (s16 >= _HALF_TINY)
    # + 0.0: a -0.0 minimum is stored as +0.0 (a stored -0.0 marks zero-preserving groups)
    return torch.where(ok, m16, gmin + 0.0), torch.where(ok, s16, (gmax - gmin) / levels), ~ok


def quantize_pack_torch(
    x: torch.Tensor, group_size: int, gmin: torch.Tensor, gmax: torch.Tensor, bits: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.numel()
    levels = (1 << bits) - 1
    zp = (gmin == 0) & (gmax > 0) & (bits > 1)
    mins, scales, wide = group_meta_torch(gmin, gmax, levels)
    zmins, zscales, zwide = group_meta_torch(torch.zeros_like(gmin), gmax, levels - 1)
    mins = torch.where(zp, torch.full_like(mins, -0.0), mins)
    scales, wide = torch.where(zp, zscales, scales), torch.where(zp, zwide, wide)
    g = _padded_groups(x, group_size, 0.0)
    sc = scales.unsqueeze(1)
    if stochastic:
        u = _padded_groups(uniform01_torch(seed, n, x.device), group_size, 0.0)
    else:
        u = torch.full_like(g, 0.5)
    inv = torch.where(sc > 0, 1.0 / sc, torch.zeros_like(sc))
    top = torch.where(zp, levels - 1, levels).unsqueeze(1).float()
    q = torch.minimum(torch.floor((g - mins.unsqueeze(1)) * inv + u), top) + zp.unsqueeze(1).float()
    q = torch.where(zp.unsqueeze(1) & (g <= 0), torch.zeros_like(q), q).to(torch.uint8)
    q.view(-1)[n:] = 0  # the short last group's padding packs as zero bits
    per_byte = 8 // bits
    q = torch.cat([q, q.new_zeros(len(q), (-group_size) % per_byte)], dim=1)  # each group: whole bytes
    packed = pack_bits_torch(q.reshape(-1), bits)
    return packed[: packed_nbytes(n, group_size, bits)], mins, scales, wide


def unpack_dequant_torch(
    packed: torch.Tensor, n: int, group_size: int, mins: torch.Tensor, scales: torch.Tensor, bits: int
) -> torch.Tensor:
    ngroups = mins.numel()
    bpg = (group_size * bits + 7) // 8
    full = torch.cat([packed, packed.new_zeros(ngroups * bpg - packed.numel())])
    q = unpack_bits_torch(full, bits, ngroups * bpg * (8 // bits)).view(ngroups, -1)[:, :group_size]
    out = q.to(torch.float32) * scales.unsqueeze(1) + mins.unsqueeze(1)
    zp = ((mins == 0) & torch.signbit(mins)).unsqueeze(1)
    zero_pres = torch.where(q > 1, (q.to(torch.float32) - 1) * scales.unsqueeze(1), torch.where(q == 1, float(_POS_TINY), 0.0))
    out = torch.where(zp, zero_pres, out)
    return out.reshape(-1)[:n]


def packed_nbytes(n: int, group_size: int, bits: int) -> int:
    """Bytes of the codes of ``n`` elements in groups of ``group_size`` (each group byte-aligned)."""
    full, last = divmod(n, group_size)
    return full * ((group_size * bits + 7) // 8) + (last * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits (flat, [n]) densely into uint8 [ceil(n * bits / 8)]."""
    if codes.device.type != "cpu" or bits == 8:
        return pack_bits_torch(codes, bits)
    out = torch.empty(math.ceil(codes.numel() * bits / 8), dtype=torch.uint8)
    if codes.numel():
        _pack_codes_nb(codes.contiguous().numpy(), bits, out.numpy())
    return out


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 [n]."""
    if packed.device.type != "cpu" or bits == 8:
        return unpack_bits_torch(packed, bits, n)
    out = torch.empty(n, dtype=torch.uint8)
    if n:
        _unpack_codes_nb(packed.numpy(), bits, out.numpy())
    return out


def pack_bits_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits (flat, [n]) densely into uint8 [ceil(n * bits / 8)]."""
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    n = codes.numel()
    pad = (-n) % per_byte
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    c = codes.view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(dim=1).to(torch.uint8)


def unpack_bits_torch(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits_torch`: uint8 [n]."""
    if bits == 8:
        return packed[:n]
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    q = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(-1)[:n].to(torch.uint8)


# ----------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------
def quantize_pack(
    x: torch.Tensor, group_size: int, bits: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """x: flat contiguous float32 [n], n > 0. Group ranges are found in the same pass (one read of
    ``x`` on CPU).

    Returns (codes uint8 [packed_nbytes(n, group_size, bits)], mins float32, scales float32, needs_float32 bool),
    the last three [ngroups]: the (min, scale) the codes were made with, which are float16
    values wherever ``needs_float32`` is False. None when ``x`` holds NaN or Inf."""
    if x.device.type != "cpu":
        gmin, gmax = group_minmax(x, group_size)
        if not bool(torch.isfinite(gmin).all() & torch.isfinite(gmax).all()):
            return None
        return quantize_pack_torch(x, group_size, gmin, gmax, bits, seed, stochastic)
    ngroups = -(-x.numel() // group_size)
    codes = np.empty(packed_nbytes(x.numel(), group_size, bits), np.uint8)  # numpy: cheaper than torch + .numpy()
    meta = np.empty((2, ngroups), np.float32)
    flags = np.zeros((2, ngroups), np.bool_)
    if x.numel() < _PARALLEL_MIN:
        _quantize_pack_serial_nb(x.numpy(), group_size, bits, seed, stochastic, codes, meta, flags)
    else:
        ntasks = min(4 * numba.get_num_threads(), ngroups)
        _quantize_pack_nb(x.numpy(), group_size, bits, seed, stochastic, ntasks, codes, meta, flags)
    if flags[1].any():
        return None
    return torch.from_numpy(codes), torch.from_numpy(meta[0]), torch.from_numpy(meta[1]), torch.from_numpy(flags[0])


def unpack_dequant(
    packed: torch.Tensor, n: int, group_size: int, mins: torch.Tensor, scales: torch.Tensor, bits: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_pack` up to rounding: float32 [n]."""
    if packed.device.type != "cpu":
        return unpack_dequant_torch(packed, n, group_size, mins, scales, bits)
    out = torch.empty(n, dtype=torch.float32)
    if n < _PARALLEL_MIN:
        _unpack_dequant_serial_nb(packed.numpy(), group_size, mins.numpy(), scales.numpy(), bits, out.numpy())
    else:
        ntasks = min(4 * numba.get_num_threads(), mins.numel())
        _unpack_dequant_nb(packed.numpy(), group_size, mins.numpy(), scales.numpy(), bits, ntasks, out.numpy())
    return out
