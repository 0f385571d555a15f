"""The packed weight-only layer: low-bit codes plus float16 per-group scale and zero, no float weight.

Replaces ``nn.Linear`` and transformers' ``Conv1D`` (whose weight is stored transposed, [in, out]);
either way the packed weight is [out_features, in_features] in the layout of
:mod:`lowbit.kernels.int4_gemv`."""
from __future__ import annotations

import torch
from torch import nn

from lowbit.kernels import int4_gemv as kern

FORMAT = "lowbit-weight-only-1"


class PackedLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` held as ``bits``-bit codes (``qweight``) and float16
    ``scales``/``zeros`` [out_features, ceil(in_features / group_size)]: ``w = (code - zero) * scale``.

    Forward: float32 CPU inputs of at most ``kernel_max_rows`` rows (decode, small batches) run the
    numba kernel on the packed bytes; larger batches, other dtypes/devices and inputs that need a
    gradient use the torch reference (dequantizes a few thousand rows at a time, then ``F.linear``).
    Buffers only, so ``state_dict`` holds exactly the packed form (plus the layout as extra state)."""

    kernel_max_rows = 16  # up to here the fused kernel beat float32 F.linear itself (docs/weight-only.md)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = True,
                 device: torch.device | str | None = None):
        super().__init__()
        kern.check_layout(bits, group_size)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size = bits, group_size
        groups = -(-self.in_features // group_size)
        self.register_buffer("qweight", torch.zeros(kern.packed_shape(out_features, in_features, bits),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._kernel_cache: tuple | None = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                   bias: torch.Tensor | None) -> "PackedLinear":
        """A layer from integer codes [N, K] and float16 scales/zeros [N, G]."""
        n, k = codes.shape
        layer = cls(k, n, bits, group_size, bias=bias is not None, device=codes.device)
        layer.qweight.copy_(kern.pack_codes(codes, bits))
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out_features, in_features] these codes stand for (a new tensor)."""
        return kern.dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                      self.in_features, dtype)

    def _kernel_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.scales.data_ptr(), self.scales._version, self.zeros.data_ptr(), self.zeros._version)
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            self._kernel_cache = (key, *kern.kernel_params(self.scales, self.zeros))
        return self._kernel_cache[1], self._kernel_cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        rows = x.numel() // self.in_features
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if (x.device.type == "cpu" and x.dtype == torch.float32 and rows <= self.kernel_max_rows
                and not (torch.is_grad_enabled() and x.requires_grad)):
            s32, sz32 = self._kernel_params()
            y = kern.packed_linear_cpu(x.reshape(rows, self.in_features), self.qweight, s32, sz32, self.bits,
                                       self.group_size, self.out_features, self.in_features, bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return kern.packed_linear_torch(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                        self.in_features, bias)

    def get_extra_state(self) -> dict:
        return {"format": FORMAT, "bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"packed layer state {state} does not match this layer {mine}")

    def nbytes(self) -> int:
        """Bytes of the packed form (codes, scales, zeros, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
