"""Per-group uniform k-bit quantization with stochastic (unbiased) or nearest rounding."""
from __future__ import annotations

import warnings

import torch

from lowbit.codecs.base import Packed, check_packed, decode_stored_as_is
from lowbit.kernels import quantize_pack, unpack_dequant
from lowbit.kernels.uniform import packed_nbytes

SUPPORTED_BITS = (1, 2, 4, 8)
META_DTYPES = (torch.float16, torch.float32)  # what a "quant" encoding stores group minima and scales in
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits!r}: choose one of {SUPPORTED_BITS}")
    return bits


class UniformCodec:
    """Float tensor -> per-group ``bits``-bit codes plus a (min, scale) pair per group.

    The tensor is flattened and cut into groups of ``group_size`` consecutive elements. Each
    element is stored as ``q = floor((x - min) / scale + u)`` with ``scale = (max - min) /
    (2**bits - 1)``, ``u ~ U[0, 1)`` (``rounding="stochastic"``: unbiased, per-element variance
    at most ``scale**2 / 4``) or ``u = 1/2`` (``"nearest"``: error at most ``scale / 2``).
    Codes are packed densely into uint8 (``8 // bits`` per byte, each group in whole bytes). Group minimum and scale are
    stored in float16 when that is exact enough (the minimum rounded down and the scale rounded
    up, and the encoder uses those very values, so rounding stays unbiased), else float32.

    Non-finite inputs are detected from the group statistics and stored exactly, with a warning.
    ``seed`` seeds a private generator: the global torch RNG is never consumed.
    """

    name = "uniform"

    def __init__(self, bits: int = 2, group_size: int = 256, rounding: str = "stochastic", seed: int = 0):
        self.bits = check_bits(bits)
        _check_group(group_size)
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
        self.group_size = group_size
        self.rounding = rounding
        self._gen = torch.Generator().manual_seed(seed)

    def __repr__(self) -> str:
        return f"UniformCodec(bits={self.bits}, group_size={self.group_size}, rounding={self.rounding!r})"

    def rng_state(self) -> torch.Tensor:
        """The private generator's state (for checkpoints)."""
        return self._gen.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._gen.set_state(state)

    def next_seed(self) -> int:
        return int(torch.randint(0, 2**32, (1,), generator=self._gen))

    def encode(self, t: torch.Tensor, bits: int | None = None, group_size: int | None = None) -> Packed:
        """t: any shape, floating dtype, any strides. ``bits`` and ``group_size`` override the
        codec's own for this call."""
        bits = self.bits if bits is None else check_bits(bits)
        group_size = self.group_size if group_size is None else _check_group(group_size)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"UniformCodec takes floating tensors {FLOAT_DTYPES}, got {t.dtype}")
        t = t.detach()
        if t.numel() == 0:
            return Packed(self.name, t.shape, t.dtype, t.device, {}, {"mode": "empty"})
        x = _flat_float32(t)
        quantized = quantize_pack(x, group_size, bits, self.next_seed(), self.rounding == "stochastic")
        if quantized is None:
            warnings.warn(
                f"tensor of shape {tuple(t.shape)} holds NaN or Inf: stored exactly, not compressed",
                RuntimeWarning,
                stacklevel=2,
            )
            return Packed(self.name, t.shape, t.dtype, t.device, {"data": t}, {"mode": "raw"})
        codes, mins, scales, wide = quantized
        if not (wide.numpy().any() if wide.device.type == "cpu" else bool(wide.any())):
            # every (min, scale) is a float16 value: store them as such, exactly
            mins, scales = mins.half(), scales.half()
        info = {"mode": "quant", "bits": bits, "group_size": group_size}
        return Packed(self.name, t.shape, t.dtype, t.device, {"codes": codes, "min": mins, "scale": scales}, info)

    def decode(self, p: Packed) -> torch.Tensor:
        check_packed(p, self.name)
        as_is = decode_stored_as_is(p)
        if as_is is not None:
            return as_is
        pl = p.payload
        out = unpack_dequant(
            pl["codes"], p.numel, p.info["group_size"], pl["min"].float(), pl["scale"].float(), p.info["bits"]
        )
        return out.view(p.shape).to(p.dtype)


def quant_nbytes(numel: int, bits: int, group_size: int, meta_dtype: torch.dtype) -> int:
    """Bytes of a ``"quant"`` encoding of ``numel`` elements (codes plus one (min, scale) pair per
    group in ``meta_dtype``): the length of :func:`to_bytes`'s buffer and of ``Packed.nbytes``."""
    if meta_dtype not in META_DTYPES:
        raise ValueError(f"group metadata is stored in one of {META_DTYPES}, got {meta_dtype}")
    groups = -(-numel // _check_group(group_size))
    return 2 * groups * torch.empty((), dtype=meta_dtype).element_size() + packed_nbytes(numel, group_size, check_bits(bits))


def to_bytes(p: Packed) -> torch.Tensor:
    """A ``"quant"`` encoding of :class:`UniformCodec` as one flat uint8 tensor, the layout that
    :func:`from_bytes` reads: group minima, group scales (native byte order), then the codes.
    The metadata comes first so that reading it back needs no copy to align it."""
    if p.info.get("mode") != "quant":
        raise ValueError(f"to_bytes takes a quantized encoding, got mode {p.info.get('mode')!r}")
    pl = p.payload
    return torch.cat([pl["min"].contiguous().view(torch.uint8), pl["scale"].contiguous().view(torch.uint8),
                      pl["codes"].reshape(-1)])


def from_bytes(buf: torch.Tensor, shape: torch.Size, bits: int, group_size: int, meta_dtype: torch.dtype,
               codec: str = "uniform", dtype: torch.dtype = torch.float32) -> Packed:
    """The encoding :func:`to_bytes` wrote, as a Packed of ``codec`` (``"uniform"``, or ``"delta"``
    for its change) that decodes to ``shape`` in ``dtype``. ``buf``: flat uint8, viewed, not copied."""
    numel = 1
    for s in shape:
        numel *= s
    want = quant_nbytes(numel, bits, group_size, meta_dtype)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != want:
        raise ValueError(f"a {bits}-bit encoding of shape {tuple(shape)} in groups of {group_size} is {want} bytes "
                         f"of uint8, got {buf.numel()} of {buf.dtype} ({buf.dim()}-D)")
    meta = want - packed_nbytes(numel, group_size, bits)  # minima and scales, in bytes
    mins, scales = buf[:meta].view(meta_dtype).chunk(2)
    info = {"mode": "quant", "bits": bits, "group_size": group_size}
    return Packed(codec, torch.Size(shape), dtype, buf.device, {"codes": buf[meta:], "min": mins, "scale": scales}, info)


def layout_group(t: torch.Tensor, group_size: int = 256, bits: int | None = None) -> int:
    """Elements per group that follow a tensor's structure, so each group gets its own range:

    - conv maps [N, C, H, W]: groups inside one channel plane, as BatchNorm's backward is
      sensitive to channels with a small spread; at 2 bits and below, blocks of 32-64 elements
      of the plane (a whole plane's range is set by its brightest pixels, and at 3 levels the
      flat rest of the plane would lose its detail), else the whole plane; planes under 64
      elements are taken several at a time (to >= 64 elements);
    - (..., tokens, features) with 32..group_size features: one token row, as LayerNorm's
      backward is sensitive to rows with a small spread (e.g. a class token);
    - otherwise blocks of ``group_size``."""
    gs = group_size
    if t.dim() == 4 and t.is_contiguous():
        plane = t.shape[2] * t.shape[3]
        if plane >= 64:
            if bits is not None and bits <= 2:
                fine = next((d for d in range(64, 31, -1) if plane % d == 0), None)
                if fine is not None:
                    return fine
            return plane if plane <= 16 * gs else gs
        if plane > 0:
            return plane * -(-64 // plane)
    d = t.shape[-1] if t.dim() >= 2 else 0
    if 32 <= d <= gs:
        return d
    return gs


def _check_group(group_size: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    return group_size


def _flat_float32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).to(torch.float32).contiguous()
