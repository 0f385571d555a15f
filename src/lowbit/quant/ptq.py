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

from lowbit.quant.layers import in_features_of, is_hf_conv1d, quant_layer_from_float, set_submodule
from lowbit.quant.mixed import fold_batchnorm, rtn_weight, weight_layers
from lowbit.quant.quantizers import BorderQuantizer, FixedUniform
from lowbit.quant.reconstruct import (
    DEFAULT_ITERS,
    AdaRoundWeight,
    _no_cache,
    capture_all_unit_inputs,
    capture_unit_inputs,
    carry_forward,
    find_units,
    reconstruct,
)

CALIBRATIONS = ("minmax", "percentile", "mse")


def _range(x: torch.Tensor | None, bits: int, how: str, percentile: float, lo: float | None = None,
           hi: float | None = None) -> tuple[float, float]:
    """The input range [lo, hi] to quantize over: the observed min and max ("minmax"; ``x``'s
    own when lo / hi are not given), the percentile and its mirror of the sample ``x``, or the
    clip ratio of [lo, hi] with the least squared error on ``x`` ("mse")."""
    if lo is None or hi is None:
        lo, hi = float(x.min()), float(x.max())
    if how == "minmax":
        return lo, hi
    flat = x.flatten()
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
        batch_size: int = 256, granularity: str = "block", adaround: dict | None = None, progress: bool = True) -> nn.Module:
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

    ``adaround`` passes options to ``reconstruct`` (iters, border_iters, patience, lr, reg, batch, seed). ``progress``:
    a tqdm bar over the reconstruction steps of every unit (AdaRound / AQuant).

    Works on transformers models (GPT-2's Conv1D becomes a QuantLinear; calib holds token ids
    [N, seq]): each block is re-run alone with the arguments it received (masks, rotary
    embeddings), its KV cache off."""
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
                conv = isinstance(layer, (nn.Conv1d, nn.Conv2d))
                iq = BorderQuantizer(a_bits, lo, hi, in_features_of(layer), 1 if conv else -1)
            else:
                iq = FixedUniform(a_bits, lo, hi)
        wq = AdaRoundWeight(_out_in(layer), widths[name]) if learn else None
        q = quant_layer_from_float(layer, input_quantizer=iq, weight_quantizer=wq)
        if not learn:
            q.weight.copy_(rtn_weight(q.weight, widths[name]))
        q.weight_bits = widths[name]
        q.register_buffer("weight_scale", _grid_scale(q.weight if learn else _out_in(layer), widths[name]))
        set_submodule(qmodel, name, q)
    if learn:  # units in model order: each sees the inputs produced by the already quantized ones
        units = find_units(qmodel, [n for n, _ in layers], granularity)
        iters = (adaround or {}).get("iters", DEFAULT_ITERS)
        b_iters = (adaround or {}).get("border_iters")
        steps = len(units) * (iters + ((iters // 2 if b_iters is None else b_iters) if method == "aquant" else 0))
        with tqdm(total=steps, desc=f"ptq {method} ({len(units)} units)", unit="step", disable=not progress,
                  leave=False) as bar:
            fp = capture_all_unit_inputs(reference, [u for u, _ in units], inputs, batch_size)  # one float pass
            prev = None
            for unit, _ in units:
                bar.set_postfix_str(unit)
                x_fp, chained = fp.pop(unit)
                if chained and prev is not None:  # the previous (now quantized) block feeds this one directly
                    x_q = carry_forward(qmodel.get_submodule(prev[0]), prev[1], x_fp)
                else:
                    x_q = capture_unit_inputs(qmodel, unit, inputs, batch_size)
                reconstruct(qmodel.get_submodule(unit), reference.get_submodule(unit), x_fp, x_q,
                            on_step=bar.update, target=x_fp.output, **(adaround or {}))
                prev = (unit, x_q)
    qmodel.lowbit_recipe = {"name": f"ptq-{method}", "w_bits": w_bits, "a_bits": a_bits, "calibration": calibration,
                            "granularity": granularity if learn else None}
    return qmodel.eval()


_SAMPLE = 1 << 18  # input values kept per layer for the percentile / MSE range search


def _activation_ranges(model: nn.Module, layers, inputs: torch.Tensor, bits: int, how: str, percentile: float,
                       batch_size: int) -> dict[str, tuple[float, float]]:
    """Each layer's input range from the float model on the calibration inputs: the exact min and
    max, and (percentile / mse) a uniform random sample of at most ``_SAMPLE`` values, drawn per
    batch so that no layer's inputs are ever held whole (a BERT's FFN input is rows x seq x 4H)."""
    batches = max(1, -(-len(inputs) // batch_size))
    per_batch = _SAMPLE // batches
    gen = torch.Generator().manual_seed(0)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    lo_hi: dict[str, list[float]] = {n: [float("inf"), float("-inf")] for n, _ in layers}

    def record(n: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        lo_hi[n][0] = min(lo_hi[n][0], float(flat.min()))
        lo_hi[n][1] = max(lo_hi[n][1], float(flat.max()))
        if how != "minmax":
            seen[n].append(flat[torch.randint(0, flat.numel(), (per_batch,), generator=gen)] if flat.numel() > per_batch
                           else flat.clone())

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda mod, args, n=n: record(n, args[0])) for n, _ in layers]
    restore = _no_cache(model)
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
        restore()
    return {n: _range(torch.cat(seen[n]) if seen[n] else None, bits, how, percentile, *lo_hi[n]) for n, _ in layers}


def adaround_weight(layer: nn.Module, x_fp: torch.Tensor, x_q: torch.Tensor, bits: int, input_quantizer=None,
                    **options) -> torch.Tensor:
    """AdaRound (Nagel et al. 2020) for one layer on its own: the layer's weights rounded up or
    down on the per-channel symmetric grid of ``bits`` so that its output on x_q (through
    ``input_quantizer``, whose border is learned too if it is a BorderQuantizer) matches the float
    layer's output on x_fp. Returns the rounded weight; options go to ``reconstruct``."""
    q = quant_layer_from_float(layer, input_quantizer=input_quantizer, weight_quantizer=AdaRoundWeight(_out_in(layer), bits))
    reconstruct(q, layer, x_fp, x_q, **options)
    return q.weight.detach()


def _grid_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel step [O] of ``rtn_weight``'s / AdaRound's grid (1 bit: mean |w|), so
    export can turn the baked weights back into integer codes."""
    w = w.detach().flatten(1)
    if bits == 1:
        return w.abs().mean(1)
    return w.abs().amax(1).clamp_min(1e-12) / (2 ** (bits - 1) - 1)


def _out_in(layer: nn.Module) -> torch.Tensor:
    """The weight as [out, in, ...] (transformers' Conv1D stores it [in, out])."""
    return layer.weight.T if is_hf_conv1d(layer) else layer.weight


def _calibration_tensor(calib) -> torch.Tensor:
    if isinstance(calib, torch.Tensor):
        if calib.numel() == 0:
            raise ValueError("the calibration set is empty")
        return calib
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
    if not batches:
        raise ValueError("the calibration loader yielded no batch")
    return torch.cat(batches)
