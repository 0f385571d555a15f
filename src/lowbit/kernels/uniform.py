"""Fused per-group k-bit quantize+pack and unpack+dequantize.

Layout shared by every implementation here: the input is a flat float32 array of ``n``
elements split into consecutive groups of ``group_size`` elements (the last group may be
short). Element ``i`` is stored in byte ``i // (8 // bits)`` at bit offset
``(i % (8 // bits)) * bits``, so ``group_size * bits`` must be a multiple of 8 for groups to
own whole bytes.

Stochastic rounding draws ``u ~ U[0, 1)`` (16-bit steps) from a counter-based hash of ``(seed, i // 2)``: the numba
kernels and the torch reference compute identical bits, which lets tests compare them exactly
and keeps the global torch RNG untouched (dropout masks stay the same with or without
compression).

CPU tensors use the numba kernels (parallel over groups); every other device uses the torch
reference, which is also what the tests compare the kernels against.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_INV16 = np.float32(1.0 / 65536.0)


# ----------------------------------------------------------------------------------------
# numba kernels (CPU)
# ----------------------------------------------------------------------------------------
@numba.njit(inline="always")
def _hash32(seed: np.uint64, i: np.uint64) -> np.uint64:
    """lowbias32 hash of a counter: 32 well-mixed bits (in a uint64)."""
    x = (i * np.uint64(_GOLDEN) + seed) & np.uint64(_MASK32)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(_M1)) & np.uint64(_MASK32)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(_M2)) & np.uint64(_MASK32)
    x ^= x >> np.uint64(16)
    return x


_HALF_MAX = 60000.0  # under float16's 65504, with room for the scale's rounding up
_HALF_TINY = 2.0**-14  # smallest normal float16; below it float16 steps are 2**-24
_MIN_LOSS = 0.05  # the float16 minimum may sit at most this fraction of the range below the true one


@numba.njit(inline="always")
def _to_half_grid(v: float, up: bool) -> float:
    """``v`` rounded down (or up) to the nearest float16 value, in float64 (finite, |v| < 65504)."""
    if v == 0.0:
        return 0.0
    if abs(v) < _HALF_TINY:
        step = 2.0**-24
        return (math.ceil(v / step) if up else math.floor(v / step)) * step
    m, e = math.frexp(v)
    m = math.ceil(m * 2048.0) if up else math.floor(m * 2048.0)
    return math.ldexp(m / 2048.0, e)


@numba.njit(inline="always")
def _group_meta(mn: float, mx: float, levels: float):
    """(min, scale, needs_float32) for one group: the minimum rounded down and the scale rounded
    up to float16 values when float16 represents them well enough, else float32 values."""
    if max(abs(mn), abs(mx)) < _HALF_MAX:
        m16 = _to_half_grid(mn, False)
        if mn - m16 <= _MIN_LOSS * (mx - mn):
            s16 = _to_half_grid((mx - m16) / levels, True)
            if s16 == 0.0 or s16 >= _HALF_TINY:
                return np.float32(m16), np.float32(s16), False
    s = np.float32((np.float32(mx) - np.float32(mn)) / np.float32(levels))
    return np.float32(mn), s, True


@numba.njit(parallel=True, cache=True, nogil=True)
def _quantize_pack_nb(x, group_size, gmin, gmax, bits, seed, stochastic, ntasks, codes, mins, scales, wide):
    # Per group: storable (min, scale), codes into a small per-task buffer (a flat loop the
    # compiler vectorises), then the dense packing. ``ntasks`` (a few per thread) balances load.
    n = x.shape[0]
    per_byte = 8 // bits
    levels = np.float32((1 << bits) - 1)
    zero = np.float32(0.0)
    half = np.float32(0.5)
    ilevels = (1 << bits) - 1
    useed = np.uint64(seed)
    ngroups = gmin.shape[0]
    chunk = (ngroups + ntasks - 1) // ntasks
    for task in numba.prange(ntasks):
        buf = np.empty(group_size + 8, np.uint8)
        for g in range(task * chunk, min(ngroups, (task + 1) * chunk)):
            s = g * group_size
            e = min(s + group_size, n)
            m, sc, w = _group_meta(np.float64(gmin[g]), np.float64(gmax[g]), np.float64(levels))
            mins[g] = m
            scales[g] = sc
            wide[g] = w
            inv = np.float32(1.0) / sc if sc > zero else zero
            if stochastic:
                # one 32-bit hash serves two elements (16 bits of dither each); groups start even
                for j in range((e - s) // 2):
                    i = s + 2 * j
                    h = _hash32(useed, np.uint64(i >> 1))
                    u0 = np.float32(h & np.uint64(0xFFFF)) * _INV16
                    u1 = np.float32(h >> np.uint64(16)) * _INV16
                    buf[2 * j] = np.uint8(min(np.int32((x[i] - m) * inv + u0), ilevels))  # >= 0: trunc is floor
                    buf[2 * j + 1] = np.uint8(min(np.int32((x[i + 1] - m) * inv + u1), ilevels))
                if (e - s) % 2:
                    h = _hash32(useed, np.uint64((e - 1) >> 1))
                    u0 = np.float32(h & np.uint64(0xFFFF)) * _INV16
                    buf[e - 1 - s] = np.uint8(min(np.int32((x[e - 1] - m) * inv + u0), ilevels))
            else:
                for i in range(s, e):
                    q = np.int32((x[i] - m) * inv + half)
                    buf[i - s] = np.uint8(min(q, ilevels))
            _pack_codes(buf, e - s, bits, codes, s // per_byte)


@numba.njit(inline="always")
def _pack_codes(buf, length, bits, out, start):
    # One branch per width so each inner loop has a constant trip count the compiler unrolls.
    nbytes = (length * bits + 7) // 8
    if length % (8 // bits):
        buf[length : length + 8 // bits] = 0  # zero the tail of a short last group
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
def _unpack_dequant_nb(packed, group_size, mins, scales, bits, out):
    n = out.shape[0]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    for g in numba.prange(mins.shape[0]):
        s = g * group_size
        e = min(s + group_size, n)
        m = mins[g]
        sc = scales[g]
        b0 = s // per_byte
        full = (e - s) // per_byte  # whole bytes of this group; a short last group ends in a partial one
        if bits == 2:
            for j in range(full):
                byte = np.int32(packed[b0 + j])
                out[s + 4 * j] = np.float32(byte & 3) * sc + m
                out[s + 4 * j + 1] = np.float32((byte >> 2) & 3) * sc + m
                out[s + 4 * j + 2] = np.float32((byte >> 4) & 3) * sc + m
                out[s + 4 * j + 3] = np.float32(byte >> 6) * sc + m
        elif bits == 4:
            for j in range(full):
                byte = np.int32(packed[b0 + j])
                out[s + 2 * j] = np.float32(byte & 15) * sc + m
                out[s + 2 * j + 1] = np.float32(byte >> 4) * sc + m
        elif bits == 8:
            for j in range(full):
                out[s + j] = np.float32(packed[b0 + j]) * sc + m
        else:
            for j in range(full):
                byte = np.int32(packed[b0 + j])
                for k in range(8):
                    out[s + 8 * j + k] = np.float32((byte >> k) & 1) * sc + m
        for i in range(s + full * per_byte, e):
            q = (np.int32(packed[i // per_byte]) >> ((i % per_byte) * bits)) & mask
            out[i] = np.float32(q) * sc + m


_PACK_CHUNK = 1 << 16  # codes per parallel task in the standalone (un)packers


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
        _pack_codes(buf, length, bits, out, s // per_byte)


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
    v64 = v.double()
    rnd = torch.ceil if up else torch.floor
    m, e = torch.frexp(v64)
    normal = torch.ldexp(rnd(m * 2048.0) / 2048.0, e.double())
    tiny = rnd(v64 / 2.0**-24) * 2.0**-24
    return torch.where(v64 == 0, v64, torch.where(v64.abs() < _HALF_TINY, tiny, normal))


def group_meta_torch(gmin: torch.Tensor, gmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of the kernels' per-group (min, scale, needs_float32)."""
    levels = float((1 << bits) - 1)
    mn, mx = gmin.double(), gmax.double()
    m16 = _to_half_grid_torch(mn, False)
    s16 = _to_half_grid_torch((mx - m16) / levels, True)
    ok = (torch.maximum(mn.abs(), mx.abs()) < _HALF_MAX) & (mn - m16 <= _MIN_LOSS * (mx - mn))
    ok &= (s16 == 0) | (s16 >= _HALF_TINY)
    s32 = (gmax - gmin) / levels
    return torch.where(ok, m16.float(), gmin), torch.where(ok, s16.float(), s32), ~ok


def quantize_pack_torch(
    x: torch.Tensor, group_size: int, gmin: torch.Tensor, gmax: torch.Tensor, bits: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.numel()
    mins, scales, wide = group_meta_torch(gmin, gmax, bits)
    g = _padded_groups(x, group_size, 0.0)
    sc = scales.unsqueeze(1)
    if stochastic:
        u = _padded_groups(uniform01_torch(seed, n, x.device), group_size, 0.0)
    else:
        u = torch.full_like(g, 0.5)
    inv = torch.where(sc > 0, 1.0 / sc, torch.zeros_like(sc))
    q = torch.floor((g - mins.unsqueeze(1)) * inv + u).clamp_(0.0, float((1 << bits) - 1))
    return pack_bits_torch(q.reshape(-1)[:n].to(torch.uint8), bits), mins, scales, wide


def unpack_dequant_torch(
    packed: torch.Tensor, n: int, group_size: int, mins: torch.Tensor, scales: torch.Tensor, bits: int
) -> torch.Tensor:
    q = unpack_bits_torch(packed, bits, n).to(torch.float32)
    g = _padded_groups(q, group_size, 0.0)
    out = g * scales.unsqueeze(1) + mins.unsqueeze(1)
    return out.reshape(-1)[:n]


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
    x: torch.Tensor, group_size: int, gmin: torch.Tensor, gmax: torch.Tensor, bits: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: flat contiguous float32 [n]; gmin/gmax: finite per-group min/max float32 [ngroups].

    Returns (codes uint8 [ceil(n*bits/8)], mins float32, scales float32, needs_float32 bool),
    the last three [ngroups]: the (min, scale) the codes were made with, which are float16
    values wherever ``needs_float32`` is False."""
    if x.device.type != "cpu":
        return quantize_pack_torch(x, group_size, gmin, gmax, bits, seed, stochastic)
    ngroups = gmin.numel()
    codes = torch.empty(math.ceil(x.numel() * bits / 8), dtype=torch.uint8)
    mins = torch.empty(ngroups, dtype=torch.float32)
    scales = torch.empty(ngroups, dtype=torch.float32)
    wide = torch.empty(ngroups, dtype=torch.bool)
    ntasks = min(4 * numba.get_num_threads(), ngroups)
    _quantize_pack_nb(
        x.numpy(), group_size, gmin.numpy(), gmax.numpy(), bits, seed, stochastic, ntasks,
        codes.numpy(), mins.numpy(), scales.numpy(), wide.numpy(),
    )
    return codes, mins, scales, wide


def unpack_dequant(
    packed: torch.Tensor, n: int, group_size: int, mins: torch.Tensor, scales: torch.Tensor, bits: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_pack` up to rounding: float32 [n]."""
    if packed.device.type != "cpu":
        return unpack_dequant_torch(packed, n, group_size, mins, scales, bits)
    out = torch.empty(n, dtype=torch.float32)
    _unpack_dequant_nb(packed.numpy(), group_size, mins.numpy(), scales.numpy(), bits, out.numpy())
    return out
