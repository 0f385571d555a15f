"""Packed compute: the few hot loops vectorised torch cannot do well (numba on CPU), each with a
plain torch reference that is also the path on other devices."""
from lowbit.kernels.uniform import (
    group_minmax,
    pack_bits,
    pack_bits_torch,
    quantize_pack,
    unpack_bits,
    unpack_bits_torch,
    unpack_dequant,
)

__all__ = ["group_minmax", "pack_bits", "unpack_bits", "quantize_pack", "unpack_dequant", "pack_bits_torch", "unpack_bits_torch"]
