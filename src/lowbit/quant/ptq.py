"""Post-training quantization without retraining: ``ptq(model, calib, w_bits=4, a_bits=4)``.

BatchNorm is folded into the preceding conv, weights are quantized per output channel
(symmetric) by rounding to nearest or by learned rounding (AdaRound, block-wise reconstruction in
``reconstruct.py``), and each quantized layer's input gets a fixed uniform quantizer whose range
comes from the calibration data (min/max, a percentile, or the clipping that minimises the squared
quantization error), with AQuant's learned rounding border if asked. ``w_bits`` may be a
per-layer mapping, e.g. from ``allocate_bits``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.quant.layers import quant_layer_from_float, set_submodule
from lowbit.quant.mixed import fold_batchnorm, rtn_weight, weight_layers
from lowbit.quant.quantizers import BorderQuantizer, FixedUniform
from lowbit.quant.reconstruct import (
    AdaRoundWeight,
    find_units,
    reconstruct,
    unit_inputs,
)

CALIBRATIONS = ("minmax", "percentile", "mse")


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
        batch_size: int = 256, granularity: str = "block", adaround: dict | None = None, progress: bool = False) -> nn.Module:
    """A quantized copy of a trained float ``model`` (``model`` is not modified).

    calib: a tensor of unlabeled inputs (a few hundred samples) or a DataLoader of inputs (or of
    (input, label) pairs). w_bits: one width (1..16; 1 is binary, sign(w) * mean|w| per output
    channel) for every quantized layer or {layer name: width} (layers missing from the mapping
    stay float). a_bits: width of every quantized layer's input
    (None: float inputs). calibration: "minmax", "percentile" (``percentile`` and its mirror) or
    "mse" (the clip ratio with the least squared error). First and last layers stay float
    (``keep_first_last``). method:

    - "rtn": round to nearest per output channel.
    - "adaround": learned up/down rounding of every weight by output reconstruction on the
      calibration set, unit by unit (``granularity`` "block": residual / transformer blocks, see
      ``find_units``; "layer": each layer alone), each unit seeing the quantized model's inputs.
    - "aquant": the same, with a learned border function for the rounding of each quantized
      layer's input (``BorderQuantizer``), learned per unit after the weights' rounding and kept
      where it lowers the unit's calibration error (see ``reconstruct``).

    ``adaround`` passes options to ``reconstruct`` (iters, lr, reg, batch, seed)."""
    if method not in ("rtn", "adaround", "aquant"):
        raise ValueError(f"unknown ptq method {method!r}: lowbit has 'rtn', 'adaround' and 'aquant'")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}: choose one of {CALIBRATIONS}")
    inputs = _calibration_tensor(calib)
    reference = fold_batchnorm(model)
    qmodel = copy.deepcopy(reference)
    layers = weight_layers(qmodel)
    if isinstance(w_bits, dict):
        unknown = sorted(set(w_bits) - {n for n, _ in layers})
        if unknown:
            raise ValueError(f"w_bits names layers the model does not have (after BatchNorm folding): {unknown}")
    if keep_first_last and len(layers) > 2:
        layers = layers[1:-1]
    widths = {n: (w_bits.get(n) if isinstance(w_bits, dict) else w_bits) for n, _ in layers}
    layers = [(n, m) for n, m in layers if widths[n] is not None]
    if not layers:
        raise ValueError("no layer to quantize: every Conv2d/Linear is first, last or missing from w_bits")
    ranges = _activation_ranges(reference, layers, inputs, a_bits, calibration, percentile, batch_size) if a_bits else {}
    learn = method != "rtn"
    for name, layer in layers:
        iq = None
        if a_bits is not None:
            lo, hi = ranges[name]
            if method == "aquant":
                conv = isinstance(layer, nn.Conv2d)
                iq = BorderQuantizer(a_bits, lo, hi, layer.in_channels if conv else layer.in_features, 1 if conv else -1)
            else:
                iq = FixedUniform(a_bits, lo, hi)
        wq = AdaRoundWeight(layer.weight, widths[name]) if learn else None
        q = quant_layer_from_float(layer, input_quantizer=iq, weight_quantizer=wq)
        if not learn:
            q.weight.copy_(rtn_weight(layer.weight, widths[name]))
        q.weight_bits = widths[name]
        set_submodule(qmodel, name, q)
    if learn:  # units in model order: each sees the inputs produced by the already quantized ones
        units = find_units(qmodel, [n for n, _ in layers], granularity)
        for unit, _ in tqdm(units, desc=f"ptq {method}", disable=not progress, leave=False):
            x_fp = unit_inputs(reference, unit, inputs, batch_size)
            x_q = unit_inputs(qmodel, unit, inputs, batch_size)
            reconstruct(qmodel.get_submodule(unit), reference.get_submodule(unit), x_fp, x_q, **(adaround or {}))
    qmodel.lowbit_recipe = {"name": f"ptq-{method}", "w_bits": w_bits, "a_bits": a_bits, "calibration": calibration,
                            "granularity": granularity if learn else None}
    return qmodel.eval()


def _activation_ranges(model: nn.Module, layers, inputs: torch.Tensor, bits: int, how: str, percentile: float,
                       batch_size: int) -> dict[str, tuple[float, float]]:
    """Each layer's input range from the float model on the calibration inputs."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach()))
             for n, _ in layers]
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: _range(torch.cat([t.flatten() for t in seen[n]]), bits, how, percentile) for n, _ in layers}


def adaround_weight(layer: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor, bits: int, input_quantizer=None,
                    **options) -> torch.Tensor:
    """AdaRound (Nagel et al. 2020) for one layer on its own: the layer's weights rounded up or
    down on the per-channel symmetric grid of ``bits`` so that its output on x_q (through
    ``input_quantizer``, whose border is learned too if it is a BorderQuantizer) matches the float
    layer's output on x_fp. Returns the rounded weight; options go to ``reconstruct``."""
    q = quant_layer_from_float(layer, input_quantizer=input_quantizer, weight_quantizer=AdaRoundWeight(layer.weight, bits))
    reconstruct(q, layer, x_fp, x_q, **options)
    return q.weight.detach()


def _calibration_tensor(calib) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        if calib.numel() == 0:
            raise ValueError("the calibration set is empty")
        return calib
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
    if not batches:
        raise ValueError("the calibration loader yielded no batch")
    return torch.cat(batches)
