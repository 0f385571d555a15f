"""SmartDeal (Chen et al.): each conv / linear weight re-modelled as W ~ Ce . B.

The weight is viewed as rows of length r (a kernel row for a k x k conv, r = k; blocks of r inputs
for a linear layer): W_r [rows, r] ~ Ce [rows, r] @ B [r, r]. B is a small dense float basis. Ce
is large and cheap: whole rows of it are zero (structured sparsity: those weights are never
fetched) and its other entries are 0 or signed powers of two 2^e with e in [e_min, e_max], so
multiplying by them is a shift. Decomposition alternates (start B = scaled identity): Ce = least
squares given B, rounded to powers of two, small rows zeroed; then B = least squares given Ce.
Training keeps the row mask and the power-of-two values (straight-through to a latent Ce) and
learns B in float.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.quant.quantizers import Quantizer, straight_through
from lowbit.quant.layers import is_hf_conv1d
from lowbit.fields import check_int, check_number
from lowbit.quant.config import QuantConfig
from lowbit.quant.recipes import quantize, register_recipe


@dataclass(frozen=True, kw_only=True)
class SmartDealConfig(QuantConfig):
    """SmartDeal: W = Ce . B per layer. sparsity: fraction of Ce's rows set to zero, in [0, 1);
    e_min..e_max: the exponents of Ce's signed powers of two; iters: alternating fit rounds (>= 1);
    basis: the basis width r of a linear layer (None: 4, or 1 when in_features is not a multiple)."""

    sparsity: float = 0.5
    e_min: int = 0
    e_max: int = 5
    iters: int = 20
    basis: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "sparsity", 0.0, 1.0, high_open=True)
        check_int(self, "e_min")
        check_int(self, "e_max", low=self.e_min)
        check_int(self, "iters", low=1)
        check_int(self, "basis", low=1, allow_none=True)


def pow2_round(c: torch.Tensor, e_min: int = 0, e_max: int = 5) -> torch.Tensor:
    """Nearest value in {0} U {+-2^e : e_min <= e <= e_max} (nearest on the linear scale; values
    below 2^(e_min - 1) become 0, values above 2^e_max saturate)."""
    mag = c.abs()
    e = torch.floor(torch.log2(mag.clamp_min(2.0 ** (e_min - 2))))
    lower = torch.exp2(e)
    e = torch.where(mag - lower > 2 * lower - mag, e + 1, e)  # nearer the next power up
    value = torch.exp2(e.clamp(e_min, e_max))
    return torch.where(mag < 2.0 ** (e_min - 1), torch.zeros_like(c), torch.sign(c) * value)


def row_length(weight: torch.Tensor, basis: int | None = None) -> int:
    """r: the kernel width for a conv weight [C_out, C_in, kh, kw]; for a linear weight [out, in]
    ``basis`` (default 4, or 1 when in does not divide by 4)."""
    if weight.dim() >= 3:  # conv2d [C_out, C_in, kh, kw] or conv1d [C_out, C_in, k]: a kernel row
        return weight.shape[-1]
    r = basis or (4 if weight.shape[1] % 4 == 0 else 1)
    if weight.shape[1] % r:
        raise ValueError(f"smartdeal: in_features {weight.shape[1]} is not divisible by the basis size {r}")
    return r


def decompose(weight: torch.Tensor, sparsity: float = 0.5, e_min: int = 0, e_max: int = 5, iters: int = 20,
              basis: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Alternating decomposition of ``weight`` into (Ce [rows, r], B [r, r], row mask [rows] bool,
    relative error ||Ce B - W||_F / ||W||_F), keeping the best iterate. ``sparsity`` is the share
    of Ce's rows set to zero (those with the smallest least-squares norm)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if e_min > e_max:
        raise ValueError(f"e_min {e_min} is above e_max {e_max}")
    w = weight.detach().double()
    r = row_length(weight, basis)
    wr = w.reshape(-1, r)
    norm = wr.norm().clamp_min(1e-30)
    b = torch.eye(r, dtype=w.dtype) * wr.abs().max().clamp_min(1e-30) / 2.0**e_max  # largest |Ce| = 2^e_max
    keep = max(1, round((1 - sparsity) * len(wr)))
    best = None
    for _ in range(max(1, iters)):
        ce_ls = torch.linalg.lstsq(b.T, wr.T).solution.T  # argmin ||Ce B - W|| for this B
        mask = torch.zeros(len(wr), dtype=torch.bool)
        mask[ce_ls.norm(dim=1).topk(keep).indices] = True
        ce = pow2_round(ce_ls, e_min, e_max) * mask[:, None]
        err = float((ce @ b - wr).norm() / norm)
        if best is None or err < best[3]:
            best = (ce.clone(), b.clone(), mask.clone(), err)
        if not ce.any():
            break
        b = torch.linalg.lstsq(ce, wr).solution  # argmin ||Ce B - W|| for this Ce
    ce, b, mask, err = best
    return ce.to(weight.dtype), b.to(weight.dtype), mask, err


class SmartDealWeight(Quantizer):
    """The weight (shape of the layer's weight) as mask * pow2(Ce) @ B, parameterised on the
    scale of the weights: with u = max|W| / 2^e_max (a fixed buffer), the latent ``ce`` is Ce * u
    and ``b`` is B / u (about the identity), so a gradient step on ``ce`` is like one on the weight
    itself (Ce in integer units would move 1/u times slower and B would jump). Ce is rounded to
    powers of two in the forward with a straight-through gradient; the row mask is fixed. The
    layer's own ``weight`` is not used once this quantizer is set."""

    def __init__(self, weight: torch.Tensor, sparsity: float = 0.5, e_min: int = 0, e_max: int = 5, iters: int = 20,
                 basis: int | None = None):
        super().__init__()
        ce, b, mask, err = decompose(weight, sparsity, e_min, e_max, iters, basis)
        self.shape, self.e_min, self.e_max = tuple(weight.shape), e_min, e_max
        unit = weight.detach().abs().max().clamp_min(1e-12) / 2.0**e_max
        self.register_buffer("unit", unit)
        self.ce = nn.Parameter(ce * unit)
        self.b = nn.Parameter(b / unit)
        self.register_buffer("mask", mask)
        self.fit_error = err  # relative Frobenius error of the decomposition
        self.storage_bits = self.packed_bytes() * 8 / weight.numel()

    def effective_ce(self) -> torch.Tensor:
        """Ce as used [rows, r]: zeros and signed powers of two within [2^e_min, 2^e_max]."""
        return pow2_round(self.ce / self.unit, self.e_min, self.e_max) * self.mask[:, None]

    def basis(self) -> torch.Tensor:
        """B [r, r] such that the weight is effective_ce() @ B."""
        return self.b.detach() * self.unit

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        ce = straight_through(self.effective_ce() * self.unit, self.ce)
        return (ce @ self.b).reshape(self.shape)

    def code_bits(self) -> int:
        """Bits per stored Ce entry: a sign and an exponent code (the levels plus zero)."""
        return 1 + math.ceil(math.log2(self.e_max - self.e_min + 2))

    def packed_bytes(self) -> int:
        """Kept rows' codes + one mask bit per row + B in float32."""
        kept = int(self.mask.sum()) * self.ce.shape[1]
        return math.ceil(kept * self.code_bits() / 8) + math.ceil(len(self.mask) / 8) + 4 * self.b.numel()

    def num_scales(self, weight: torch.Tensor) -> int:
        return 0  # B is counted in packed_bytes

    def extra_repr(self) -> str:
        return (f"rows={len(self.mask)}x{self.ce.shape[1]}, kept={int(self.mask.sum())}, "
                f"exponents={self.e_min}..{self.e_max}, fit error={self.fit_error:.3f}")


@register_recipe("smartdeal", "SmartDeal: W = Ce.B, Ce row-sparse with signed power-of-two entries (shifts), "
                 "B a small float basis; float inputs", config=SmartDealConfig, weight_bits=4)
def _recipe(layer: nn.Module, c: SmartDealConfig) -> dict:
    weight = layer.weight.T if is_hf_conv1d(layer) else layer.weight  # the [out, in] layout QuantLinear keeps
    return dict(weight_quantizer=SmartDealWeight(weight, c.sparsity, c.e_min, c.e_max, c.iters, c.basis))


def smartdeal(model: nn.Module, sparsity: float = 0.5, e_min: int = 0, e_max: int = 5, iters: int = 20,
              **options) -> nn.Module:
    """A copy of ``model`` whose conv / linear layers (not the first and last, as ``quantize``)
    hold SmartDeal weights decomposed from the current ones: fine-tune it after decomposing a
    trained model, or train it from scratch after decomposing a fresh one (``train_quantized``).
    ``options`` go to ``quantize`` (``basis``, ``keep_first_last``, ``skip``)."""
    return quantize(model, "smartdeal", sparsity=sparsity, e_min=e_min, e_max=e_max, iters=iters, **options)


def report(model: nn.Module) -> list[dict]:
    """Per SmartDeal layer: the decomposition's relative error, rows of Ce kept, non-zeros of Ce,
    weights, stored bytes and float32 bytes."""
    rows = []
    for name, m in model.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if isinstance(q, SmartDealWeight):
            ce = q.effective_ce()
            rows.append({"layer": name, "fit_error": q.fit_error, "rows": len(q.mask), "rows_kept": int(q.mask.sum()),
                         "nonzeros": int((ce != 0).sum()), "weights": math.prod(q.shape), "stored_bytes": q.packed_bytes(),
                         "float32_bytes": 4 * math.prod(q.shape)})
    return rows
