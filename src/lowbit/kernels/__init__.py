"""Packed compute: the few hot loops vectorised torch cannot do well (numba on CPU), each with a
plain torch reference that is also the path on other devices."""
from lowbit.kernels.binary import (
    binary_matmul,
    pack_mask,
    pack_signs,
    pack_ternary,
    ternary_matmul,
    unpack_mask,
    unpack_signs,
)
from lowbit.kernels.uniform import (
    group_minmax,
    pack_bits,
    pack_bits_torch,
    quantize_pack,
    unpack_bits,
    unpack_bits_torch,
    unpack_dequant,
)

__all__ = ["binary_matmul", "pack_signs", "unpack_signs", "pack_mask", "unpack_mask", "pack_ternary", "ternary_matmul",
           "group_minmax", "pack_bits", "unpack_bits", "quantize_pack", "unpack_dequant", "pack_bits_torch", "unpack_bits_torch"]
