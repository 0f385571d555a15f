"""Post-training quantization without retraining: ``ptq(model, calib, w_bits=4, a_bits=4)``.

BatchNorm is folded into the preceding conv, weights are rounded to nearest per output channel
(symmetric), and each quantized layer's input gets a fixed uniform quantizer whose range comes
from the calibration data (min/max, a percentile, or the clipping that minimises the squared
quantization error). ``w_bits`` may be a per-layer mapping, e.g. from ``allocate_bits``.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.quant.functions import round_ste
from lowbit.quant.layers import QuantConv2d, QuantLinear
from lowbit.quant.mixed import fold_batchnorm, rtn_weight, weight_layers
from lowbit.quant.quantizers import Quantizer

CALIBRATIONS = ("minmax", "percentile", "mse")


class FixedUniform(Quantizer):
    """Uniform quantization of x onto 2^bits levels of [lo, hi] (asymmetric; unsigned ranges keep 0
    exact); straight-through backward inside the range. lo/hi are buffers set by calibration."""

    def __init__(self, bits: int, lo: float = 0.0, hi: float = 1.0):
        super().__init__()
        self._set_bits(bits, 2, "activation")
        self.register_buffer("lo", torch.tensor(float(lo)))
        self.register_buffer("hi", torch.tensor(float(hi)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        scale = (self.hi - self.lo).clamp_min(1e-12) / n
        q = round_ste((torch.clamp(x, self.lo, self.hi) - self.lo) / scale)
        return q * scale + self.lo

    def num_scales(self, weight: torch.Tensor) -> int:
        return 2  # lo and hi

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{float(self.lo):.4g}, {float(self.hi):.4g}]"


class BorderQuantizer(FixedUniform):
    """AQuant-style activation rounding: the border between rounding down and up is a learned,
    cheap element-wise function of the input instead of the fixed 0.5:

        v = (clamp(x, lo, hi) - lo) / scale,   q = floor(v) + 1[frac(v) >= border(x)],
        border_c(x) = clamp(0.5 + a_c u + b_c u^2, 0.01, 0.99),   u = (x - lo) / (hi - lo) - 0.5,

    with a, b per channel (``channel_dim`` 1 for conv inputs, -1 for linear ones), zero at the start
    (plain rounding). Values stay on the grid and move by at most one level against rounding to
    nearest. While ``soft`` is set (learning), the step is a sigmoid of (frac - border) / tau."""

    def __init__(self, bits: int, lo: float = 0.0, hi: float = 1.0, channels: int = 1, channel_dim: int = 1):
        super().__init__(bits, lo, hi)
        self.a = nn.Parameter(torch.zeros(channels))
        self.b = nn.Parameter(torch.zeros(channels))
        self.channel_dim = channel_dim
        self.soft, self.tau = False, 0.1

    def border(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        u = (torch.clamp(x, self.lo, self.hi) - self.lo) / (self.hi - self.lo).clamp_min(1e-12) - 0.5
        return torch.clamp(0.5 + self.a.reshape(shape) * u + self.b.reshape(shape) * u * u, 0.01, 0.99)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        scale = (self.hi - self.lo).clamp_min(1e-12) / n
        v = (torch.clamp(x, self.lo, self.hi) - self.lo) / scale
        low = torch.floor(v).detach()
        frac = v - low
        if self.soft:
            step = torch.sigmoid((frac - self.border(x)) / self.tau)
        else:
            step = (frac >= self.border(x)).to(x.dtype)
        return torch.clamp(low + step, 0, n) * scale + self.lo

    def num_scales(self, weight: torch.Tensor) -> int:
        return 2 + 2 * self.a.numel()


def _range(x: torch.Tensor, bits: int, how: str, percentile: float) -> tuple[float, float]:
    lo, hi = float(x.min()), float(x.max())
    if how == "minmax":
        return lo, hi
    flat = x.flatten()
    if flat.numel() > 1 << 20:  # quantiles of a sample are enough and keep torch.quantile in range
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 20]]
    if how == "percentile":
        qs = torch.tensor([1 - percentile / 100, percentile / 100], dtype=flat.dtype)
        plo, phi = torch.quantile(flat, qs).tolist()
        return (0.0 if lo >= 0 else plo), phi
    best, best_err = (lo, hi), float("inf")
    for r in torch.linspace(0.3, 1.0, 36).tolist():  # clip ratio search (MSE)
        clo, chi = (lo * r if lo < 0 else lo), hi * r
        q = FixedUniform(bits, clo, chi)(flat)
        err = float((q - flat).pow(2).mean())
        if err < best_err:
            best, best_err = (clo, chi), err
    return best


@torch.no_grad()
def ptq(model: nn.Module, calib: torch.Tensor, w_bits: int | dict[str, int] = 4, a_bits: int | None = 4,
        method: str = "rtn", calibration: str = "mse", percentile: float = 99.99, keep_first_last: bool = True,
        batch_size: int = 256, adaround: dict | None = None) -> nn.Module:
    """A quantized copy of a trained float ``model`` (``model`` is not modified).

    calib: a tensor of unlabeled inputs (a few hundred samples) or a DataLoader of inputs (or of
    (input, label) pairs). w_bits: one width for every quantized layer or {layer name: width}
    (layers missing from the mapping stay float). a_bits: width of every quantized layer's input
    (None: float inputs). calibration: "minmax", "percentile" (``percentile`` and its mirror) or
    "mse" (the clip ratio with the least squared error). First and last layers stay float
    (``keep_first_last``). method: "rtn" (round to nearest), "adaround" (learned up/down
    rounding per weight by layer-output reconstruction on the calibration set, options in
    ``adaround``: iters, lr, reg, batch) or "aquant" (AdaRound weights learned jointly with a
    border function for the rounding of each layer's input activations, BorderQuantizer)."""
    if method not in ("rtn", "adaround", "aquant"):
        raise ValueError(f"unknown ptq method {method!r}: lowbit has 'rtn', 'adaround' and 'aquant'")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}: choose one of {CALIBRATIONS}")
    inputs = _calibration_tensor(calib)
    qmodel = fold_batchnorm(model)
    layers = weight_layers(qmodel)
    if keep_first_last and len(layers) > 2:
        layers = layers[1:-1]
    widths = {n: (w_bits.get(n) if isinstance(w_bits, dict) else w_bits) for n, _ in layers}
    layers = [(n, m) for n, m in layers if widths[n] is not None]
    if isinstance(w_bits, dict):
        unknown = sorted(set(w_bits) - {n for n, _ in weight_layers(qmodel)})
        if unknown:
            raise ValueError(f"w_bits names layers the model does not have (after BatchNorm folding): {unknown}")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach())) for n, m in layers]
    for i in range(0, len(inputs), batch_size):
        qmodel(inputs[i : i + batch_size])
    for h in hooks:
        h.remove()
    reference = fold_batchnorm(model) if method != "rtn" else None
    for name, layer in layers:
        iq = None
        if a_bits is not None:
            lo, hi = _range(torch.cat([t.flatten() for t in seen[name]]), a_bits, calibration, percentile)
            if method == "aquant":
                conv = isinstance(layer, nn.Conv2d)
                iq = BorderQuantizer(a_bits, lo, hi, layer.in_channels if conv else layer.in_features, 1 if conv else -1)
            else:
                iq = FixedUniform(a_bits, lo, hi)
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        q = cls.from_float(layer, input_quantizer=iq)
        if method != "rtn":  # layers in order: each sees the inputs of the already quantized ones
            x_fp = _layer_input(reference, name, inputs, batch_size)
            x_q = _layer_input(qmodel, name, inputs, batch_size)
            q.weight.copy_(adaround_weight(layer, x_fp, x_q, widths[name], iq, **(adaround or {})))
        else:
            q.weight.copy_(rtn_weight(layer.weight, widths[name]))
        q.weight_bits = widths[name]
        parent, _, attr = name.rpartition(".")
        setattr(qmodel.get_submodule(parent) if parent else qmodel, attr, q)
    qmodel.lowbit_recipe = {"name": f"ptq-{method}", "w_bits": w_bits, "a_bits": a_bits, "calibration": calibration}
    return qmodel.eval()


def _layer_input(model: nn.Module, name: str, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    got: list[torch.Tensor] = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda mod, args: got.append(args[0].detach()))
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i : i + batch_size])
    finally:
        h.remove()
    return torch.cat(got)


BORDER_LR_RATIO = 0.1
_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def adaround_weight(layer: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor, bits: int, input_quantizer=None,
                    iters: int = 500, lr: float = 1e-2, reg: float = 0.01, batch: int = 64, seed: int = 0) -> torch.Tensor:
    """AdaRound (Nagel et al. 2020) for one layer: weights s * clip(floor(W / s) + h(V)) with a
    learned rounding variable V per weight (h a stretched sigmoid), trained so the layer's output
    on the quantized model's inputs x_q matches the float layer's output on float inputs x_fp,
    plus the regulariser reg * sum(1 - |2h - 1|^beta) with beta going from 20 to 2, which pushes
    every h to 0 or 1. Returns the rounded weights (on the per-channel symmetric grid of ``bits``)."""
    with torch.enable_grad():
        w = layer.weight.detach()
        dims = tuple(range(1, w.dim()))
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dims, keepdim=True).clamp_min(1e-12) / qmax
        base = torch.floor(w / scale)
        frac = (w / scale - base).clamp(0.01, 0.99)
        v = torch.nn.Parameter(-torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1))  # h(v) = frac at the start
        border = isinstance(input_quantizer, BorderQuantizer)
        groups = [{"params": [v], "lr": lr}]
        if border:  # the border moves rounding decisions of every input: a gentler step than the weights'
            groups.append({"params": [input_quantizer.a, input_quantizer.b], "lr": lr * BORDER_LR_RATIO})
        opt = torch.optim.Adam(groups)
        gen = torch.Generator().manual_seed(seed)
        fwd = (lambda a, ww: torch.nn.functional.conv2d(a, ww, layer.bias, layer.stride, layer.padding, layer.dilation,
                                                          layer.groups)) if isinstance(layer, nn.Conv2d) else \
            (lambda a, ww: torch.nn.functional.linear(a, ww, layer.bias))
        warm = int(0.2 * iters)
        for it in range(iters):
            idx = torch.randint(0, len(x_fp), (min(batch, len(x_fp)),), generator=gen)
            with torch.no_grad():
                target = fwd(x_fp[idx], w)
            if border:  # the activation border learns with the weights' rounding (soft, then hard)
                input_quantizer.soft, input_quantizer.tau = True, 0.2 * (0.05 ** (it / max(iters - 1, 1)))
                xin = input_quantizer(x_q[idx])
            else:
                with torch.no_grad():
                    xin = x_q[idx] if input_quantizer is None else input_quantizer(x_q[idx])
            wq = scale * torch.clamp(base + _h(v), -qmax, qmax)
            loss = (fwd(xin, wq) - target).pow(2).flatten(1).sum(1).mean()
            if it >= warm:
                beta = 20 - (20 - 2) * (it - warm) / max(iters - warm, 1)
                loss = loss + reg * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if border:
            input_quantizer.soft = False
            input_quantizer.a.requires_grad_(False)
            input_quantizer.b.requires_grad_(False)
        return (scale * torch.clamp(base + (_h(v) >= 0.5).to(w.dtype), -qmax, qmax)).detach()


def _calibration_tensor(calib) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        if calib.numel() == 0:
            raise ValueError("the calibration set is empty")
        return calib
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
    if not batches:
        raise ValueError("the calibration loader yielded no batch")
    return torch.cat(batches)
