"""Output reconstruction for post-training quantization (AdaRound / BRECQ style).

A *unit* is a part of the model (one layer or a whole block such as a residual block or a
transformer block) whose quantized layers learn together: each weight's rounding direction
(``AdaRoundWeight``) and, for AQuant, each input's rounding border (``BorderQuantizer``), so that
the quantized unit's output on the inputs coming from the already quantized part of the model
matches the float unit's output on float inputs. Matching the quantized-model inputs to the float
target is what accounts for the error propagated from earlier units.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.quant.quantizers import BorderQuantizer, Quantizer

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1
BORDER_LR_RATIO = 0.1  # the border moves rounding decisions of every input: a gentler step than the weights'


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


class AdaRoundWeight(Quantizer):
    """Learned up/down rounding of a weight on its per-output-channel grid of ``bits``:
    w_q = s * clamp(floor((w - o) / s) + h(v), lo, hi) + o, h a stretched sigmoid of a learned v
    per weight, initialised so that h(v) equals the fractional part (the soft weight starts at
    the float weight; the hard one at round-to-nearest). bits >= 2: the symmetric grid
    s * {-qmax..qmax} (o = 0, s = max|w| / qmax); bits = 1: the two levels -a, +a with
    a = mean|w| (s = 2a, o = -a, {lo, hi} = {0, 1}), the binary weights of ``rtn_weight``, where
    learning the rounding means learning each weight's sign. ``soft`` selects h(v) (learning) or
    the step h(v) >= 0.5 (the final rounding). The weight argument of forward is ignored: the
    grid and the floor are fixed at construction."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self._set_bits(bits, 1, "weight")
        w = weight.detach()
        dims = tuple(range(1, w.dim()))
        if bits == 1:
            alpha = w.abs().mean(dims, keepdim=True).clamp_min(1e-12)
            scale, offset, self.lo, self.hi = 2 * alpha, -alpha, 0, 1
        else:
            qmax = 2 ** (bits - 1) - 1
            scale = w.abs().amax(dims, keepdim=True).clamp_min(1e-12) / qmax
            offset, self.lo, self.hi = torch.zeros_like(scale), -qmax, qmax
        base = torch.floor((w - offset) / scale)
        frac = ((w - offset) / scale - base).clamp(0.01, 0.99)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("base", base)
        self.v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1))
        self.soft = False

    def rounding(self) -> torch.Tensor:
        """The amount added to floor(w / s): soft in [0, 1], or hard 0/1."""
        h = _h(self.v)
        return h if self.soft else (h >= 0.5).to(h.dtype)

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * torch.clamp(self.base + self.rounding(), self.lo, self.hi) + self.offset

    def regulariser(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every h is exactly 0 or 1."""
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()

    def num_scales(self, weight: torch.Tensor) -> int:
        return weight.shape[0]


def find_units(model: nn.Module, layer_names: list[str], granularity: str = "block") -> list[tuple[str, list[str]]]:
    """Group the layers to quantize into reconstruction units, in model order.

    granularity "layer": every layer alone. "block": the outermost module on the layer's path that
    is an entry of an nn.Sequential (and not itself a Sequential), e.g. a ResNet BasicBlock in
    ``layers`` or a transformer Block in ``blocks``; a layer with no such ancestor is its own unit.
    Returns [(unit module name, [layer names in it])]."""
    if granularity not in ("block", "layer"):
        raise ValueError(f"unknown reconstruction granularity {granularity!r}: choose 'block' or 'layer'")
    units: dict[str, list[str]] = {}
    for name in layer_names:
        unit = name
        if granularity == "block":
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                parent = model.get_submodule(".".join(parts[: i - 1]))
                if isinstance(parent, nn.Sequential) and not isinstance(model.get_submodule(prefix), nn.Sequential):
                    unit = prefix
                    break
        units.setdefault(unit, []).append(name)
    return list(units.items())


class _Captured(Exception):
    pass


@torch.no_grad()
def unit_inputs(model: nn.Module, unit: str, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The first positional input of submodule ``unit`` when ``model`` runs on ``inputs`` (batched;
    the forward stops at the unit, so later parts cost nothing)."""
    got: list[torch.Tensor] = []

    def hook(mod, args):
        got.append(args[0].detach())
        raise _Captured

    handle = model.get_submodule(unit).register_forward_pre_hook(hook)
    try:
        for i in range(0, len(inputs), batch_size):
            try:
                model(inputs[i : i + batch_size])
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(got) * batch_size < len(inputs):
        raise RuntimeError(f"{unit!r} did not run on every calibration batch: it cannot be reconstructed on its own")
    return torch.cat(got)


def reconstruct(unit_q: nn.Module, unit_fp: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor, iters: int = 500,
                lr: float = 1e-2, reg: float = 0.01, batch: int = 64, seed: int = 0) -> float:
    """Learn the rounding of every ``AdaRoundWeight`` and the border of every ``BorderQuantizer``
    inside ``unit_q`` so that unit_q(x_q) matches unit_fp(x_fp) (squared error summed per sample,
    averaged over a batch of ``batch`` calibration rows).

    1. Weights: ``iters`` steps of the error plus reg * the rounding regulariser, beta annealed
       from 20 to 2 after a 20% warm-up, which drives every h to 0 or 1; the activations are
       rounded hard (borders at plain rounding, straight-through gradient), as at inference. Then
       every weight is baked: its AdaRoundWeight is removed and ``weight`` holds the hard-rounded
       values on the grid. Without borders this is AdaRound (BRECQ for whole blocks).
    2. Borders (AQuant), the weights fixed: ``iters`` steps with a soft border that sharpens
       (temperature 0.2 -> 0.01), then frozen hard. Learning borders and weights together would
       fit the weights to the soft rounding, not to the hard one they meet at inference (it cost
       up to a point of accuracy at W2A4). Guard: the borders are kept only if they lower the
       error on the calibration rows against plain rounding, so the result is never worse there
       than stage 1 alone.
    Returns the final reconstruction error (hard rounding, a batch of calibration rows)."""
    if len(x_fp) != len(x_q) or len(x_fp) == 0:
        raise ValueError(f"x_fp and x_q must hold the same, non-zero number of rows, got {len(x_fp)} and {len(x_q)}")
    layers = [m for m in unit_q.modules() if isinstance(getattr(m, "weight_quantizer", None), AdaRoundWeight)]
    borders = [m for m in unit_q.modules() if isinstance(m, BorderQuantizer)]
    unit_fp.eval()
    unit_q.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = min(batch, len(x_fp))

    def error(idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = unit_fp(x_fp[idx])
        return (unit_q(x_q[idx]) - target).pow(2).flatten(1).sum(1).mean()

    if layers:
        warm = int(0.2 * iters)
        with torch.enable_grad():
            opt = torch.optim.Adam([m.weight_quantizer.v for m in layers], lr=lr)
            for m in layers:
                m.weight_quantizer.soft = True
            for it in range(iters):
                loss = error(torch.randint(0, len(x_fp), (rows,), generator=gen))
                if it >= warm:
                    beta = 20 - (20 - 2) * (it - warm) / max(iters - warm, 1)
                    loss = loss + reg * sum(m.weight_quantizer.regulariser(beta) for m in layers)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            for m in layers:
                m.weight_quantizer.soft = False
                m.weight.copy_(m.weight_quantizer())
                m.weight_quantizer = None
    if borders:
        _learn_borders(borders, error, len(x_fp), iters, lr * BORDER_LR_RATIO, rows, gen)
    with torch.no_grad():
        return float(error(torch.randint(0, len(x_fp), (rows,), generator=gen)))


def _learn_borders(borders: list, error, n: int, iters: int, lr: float, rows: int, gen: torch.Generator) -> None:
    params = [p for b in borders for p in (b.a, b.b)]
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        for it in range(iters):
            for b in borders:
                b.soft, b.tau = True, 0.2 * (0.05 ** (it / max(iters - 1, 1)))
            loss = error(torch.randint(0, n, (rows,), generator=gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        for b in borders:
            b.soft = False
        for p in params:
            p.requires_grad_(False)
        check = torch.arange(min(n, 512))
        learned = float(error(check))
        kept = [(p, p.clone()) for p in params]
        for p in params:
            p.zero_()
        if learned < float(error(check)):
            for p, v in kept:
                p.copy_(v)
