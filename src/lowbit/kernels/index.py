"""Fused CPU passes of ``lowbit.codecs.IndexCodec`` for integer tensors such as max-pool argmax
positions (int64, one per output element: the largest exact tensor a CNN saves).

An index tensor is viewed as rows x [P] (P = H * W positions for >= 3-d tensors, else 1) with a
reference ``base[P]``; the codec stores ``code(x - base - rmin)`` packed at 1/2/4/8 bits, where
``code`` maps the few offsets that occur to 0..K-1 (a lookup table ``lut``) and ``values`` maps back.
The torch version takes ~7 full passes over the int64 data; these take three to encode (range,
presence, codes) and one to decode. Codes use ``pack_bits``' layout: element i in byte
i // (8 / bits) at bit (i % (8 / bits)) * bits.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from lowbit.kernels.uniform import pack_codes_into

_CHUNK = 1 << 16  # elements per parallel task (a multiple of 8: tasks own whole bytes)


@numba.njit(parallel=True, cache=True, nogil=True)
def _range_nb(x, base):  # x int64 [R, P], base int64 [P] -> (min, max) of x - base
    r, p = x.shape
    lo = np.int64(np.iinfo(np.int64).max)
    hi = np.int64(np.iinfo(np.int64).min)
    for i in numba.prange(r):
        for j in range(p):
            v = x[i, j] - base[j]
            lo = min(lo, v)
            hi = max(hi, v)
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _presence_nb(x, base, rmin, present):  # present uint8 [size]: 1 where an offset x - base - rmin occurs
    r, p = x.shape
    for i in range(r):
        for j in range(p):
            present[x[i, j] - base[j] - rmin] = 1


@numba.njit(parallel=True, cache=True, nogil=True)
def _encode_nb(flat, base, rmin, lut, bits, out):  # flat int64 [n] (rows of P = base.shape[0])
    n, p = flat.shape[0], base.shape[0]
    per_byte = 8 // bits
    for task in numba.prange((n + _CHUNK - 1) // _CHUNK):
        s = task * _CHUNK
        length = min(_CHUNK, n - s)
        buf = np.empty(_CHUNK + 8, np.uint8)
        k, j = 0, s % p
        if p == 1:  # one reference for the whole tensor
            for q in range(length):
                buf[q] = lut[flat[s + q] - base[0] - rmin]
            k = length
        while k < length:  # runs of one row: a branch-free inner loop
            seg = min(p - j, length - k)
            for q in range(seg):
                buf[k + q] = lut[flat[s + k + q] - base[j + q] - rmin]
            k += seg
            j = 0
        pack_codes_into(buf, length, bits, out, s // per_byte)


@numba.njit(parallel=True, cache=True, nogil=True)
def _decode_nb(packed, bits, values, base, out):  # out int64 [n] = values[code] + base[i % P]
    n, p = out.shape[0], base.shape[0]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    for task in numba.prange((n + _CHUNK - 1) // _CHUNK):
        s = task * _CHUNK
        length = min(_CHUNK, n - s)
        buf = np.empty(_CHUNK + 8, np.uint8)
        first = s // per_byte
        for byte in range((length + per_byte - 1) // per_byte):  # unpack: constant trip count per width
            v = packed[first + byte]
            for q in range(per_byte):
                buf[byte * per_byte + q] = (v >> (q * bits)) & mask
        k, j = 0, s % p
        if p == 1:
            for q in range(length):
                out[s + q] = values[buf[q]] + base[0]
            k = length
        while k < length:
            seg = min(p - j, length - k)
            for q in range(seg):
                out[s + k + q] = values[buf[k + q]] + base[j + q]
            k += seg
            j = 0


def offset_range(x: torch.Tensor, base: torch.Tensor) -> tuple[int, int]:
    """min and max of ``x - base`` for x int64 [R, P] (contiguous) and base int64 [P]."""
    lo, hi = _range_nb(x.numpy(), base.contiguous().numpy())
    return int(lo), int(hi)


def offset_presence(x: torch.Tensor, base: torch.Tensor, rmin: int, size: int) -> torch.Tensor:
    """bool [size]: which offsets ``x - base - rmin`` (all in [0, size)) occur."""
    present = np.zeros(size, np.uint8)
    _presence_nb(x.numpy(), base.contiguous().numpy(), rmin, present)
    return torch.from_numpy(present).bool()


def encode_offsets(x: torch.Tensor, base: torch.Tensor, rmin: int, lut: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [ceil(n * bits / 8)]: ``lut[x - base - rmin]`` packed (x int64 [R, P], lut uint8)."""
    n = x.numel()
    out = torch.empty(-(-n * bits // 8), dtype=torch.uint8)
    if n:
        _encode_nb(x.reshape(-1).numpy(), base.contiguous().numpy(), rmin, lut.contiguous().numpy(), bits, out.numpy())
    return out


def decode_offsets(packed: torch.Tensor, bits: int, n: int, values: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """int64 [n] = values[code_i] + base[i % P] (the inverse of ``encode_offsets`` with base + rmin)."""
    out = torch.empty(n, dtype=torch.int64)
    if n:
        _decode_nb(packed.numpy(), bits, values.to(torch.int64).contiguous().numpy(),
                   base.to(torch.int64).contiguous().numpy(), out.numpy())
    return out
