"""Mixed precision: per-layer sensitivity to weight quantization, and the bit allocation that
minimises total sensitivity under a size budget (HAWQ-style). Also BatchNorm folding for
post-training quantization.

    s = sensitivity(model, (x, y), bits=(2, 4, 8))          # {layer: {bits: sensitivity}}
    plan = allocate_bits(s, sizes=weight_counts(model), average_bits=3)   # {layer: bits}
"""
from __future__ import annotations

import copy
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.layers import set_submodule

ALLOCATION_WIDTHS = (1, 2, 3, 4, 8)  # the widths a mixed plan chooses from by default; 1 = binary weights


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every nn.Conv2d / nn.Conv1d / nn.Linear / transformers Conv1D, in module order."""
    from lowbit.quant.layers import is_hf_conv1d

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)) or is_hf_conv1d(m)]


def weight_counts(model: nn.Module, inner_only: bool = False) -> dict[str, int]:
    """Weights per nn.Conv2d / nn.Linear layer; ``inner_only``: all but the first and the last,
    the layers ``ptq`` quantizes by default (``keep_first_last``)."""
    layers = weight_layers(model)
    if inner_only:
        layers = layers[1:-1]
    return {n: m.weight.numel() for n, m in layers}


def rtn_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel round-to-nearest onto 2^(bits-1) - 1 levels each side
    (bits >= 2; 1 bit is sign(w) * mean|w| per channel)."""
    dims = tuple(range(1, w.dim()))
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dims, keepdim=True)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dims, keepdim=True).clamp_min(1e-12) / qmax
    return torch.round(w / scale).clamp(-qmax, qmax) * scale


def _loss(model: nn.Module, data) -> torch.Tensor:
    x, y = data
    return F.cross_entropy(model(x), y)


def hutchinson_trace(model: nn.Module, data, params: Iterable[nn.Parameter], samples: int = 32,
                     seed: int = 0) -> list[float]:
    """Trace of the loss Hessian block of each parameter, by Hutchinson's estimator
    E[v^T H v] with Rademacher v (one Hessian-vector product per sample, shared graph)."""
    params = list(params)
    gen = torch.Generator().manual_seed(seed)
    loss = _loss(model, data)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    traces = [0.0] * len(params)
    for _ in range(samples):
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        for i, (h, v) in enumerate(zip(hv, vs)):
            traces[i] += float((h * v).sum()) / samples
    return traces


def sensitivity(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], bits=(2, 3, 4, 8), how: str = "hessian",
                samples: int = 32, layers: list[str] | None = None) -> dict[str, dict[int, float]]:
    """Per-layer sensitivity to quantizing its weights to each width in ``bits``.

    how="hessian": (trace(H_l) / n_l) * ||Q_b(W_l) - W_l||^2 (HAWQ-v2), Hutchinson trace over
    ``samples`` Rademacher vectors: a second-order model, faithful for small perturbations; it
    underestimates 1- and 2-bit weights (the benchmark ResNet's 4-bit Hessian plan binarises its
    largest conv and loses 0.8 points to uniform 4 bits): prefer "kl" when 1 bit is allowed.
    how="loss": the loss increase on ``data`` when layer l alone is quantized to b bits (round to
    nearest, per channel). how="kl": the mean KL divergence of the output distribution from the
    float model's when layer l alone is quantized (ZeroQ's measure: never negative, needs no
    labels, and measures large perturbations such as 2-bit weights as they are). data: (inputs,
    integer labels); the model is evaluated in eval mode and left unchanged."""
    if how not in ("hessian", "loss", "kl"):
        raise ValueError(f"unknown sensitivity {how!r}: choose 'hessian', 'loss' or 'kl'")
    if not bits:
        raise ValueError("bits must list at least one width")
    bad = [b for b in bits if not isinstance(b, int) or not 1 <= b <= 16]
    if bad:
        raise ValueError(f"weight widths must be integers in 1..16, got {bad}")
    model_was_training = model.training
    model.eval()
    chosen = [(n, m) for n, m in weight_layers(model) if layers is None or n in layers]
    if not chosen:
        raise ValueError("the model has no nn.Conv2d / nn.Linear layer to measure")
    out: dict[str, dict[int, float]] = {}
    try:
        if how == "hessian":
            traces = hutchinson_trace(model, data, [m.weight for _, m in chosen], samples)
            for (name, m), tr in zip(chosen, traces):
                w = m.weight.detach()
                out[name] = {b: tr / w.numel() * float((rtn_weight(w, b) - w).pow(2).sum()) for b in bits}
        else:
            with torch.no_grad():
                if how == "loss":
                    base = float(_loss(model, data))
                    measure = lambda: float(_loss(model, data)) - base  # noqa: E731
                else:
                    ref = F.log_softmax(model(data[0]), dim=-1)
                    measure = lambda: float(F.kl_div(F.log_softmax(model(data[0]), dim=-1), ref,  # noqa: E731
                                                     reduction="batchmean", log_target=True))
                for name, m in chosen:
                    w = m.weight.detach().clone()
                    out[name] = {}
                    for b in bits:
                        m.weight.copy_(rtn_weight(w, b))
                        out[name][b] = measure()
                    m.weight.copy_(w)
    finally:
        model.train(model_was_training)
    return out


def average_bits(plan: dict[str, int], sizes: dict[str, int]) -> float:
    """Average width of a per-layer plan {layer: bits}, weighted by ``sizes`` {layer: weights}."""
    return sum(sizes[n] * b for n, b in plan.items()) / sum(sizes[n] for n in plan)


def allocate_bits(sens: dict[str, dict[int, float]], sizes: dict[str, int], average_bits: float | None = None,
                  budget_bytes: float | None = None) -> dict[str, int]:
    """Per-layer widths minimising sum_l sens[l][b_l] subject to sum_l sizes[l] * b_l <= budget,
    solved exactly as a mixed-integer program (scipy's HiGHS). The budget is ``average_bits``
    (over all weights) or ``budget_bytes`` (packed weight bytes). Raises ValueError if even the
    smallest widths do not fit."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if (average_bits is None) == (budget_bytes is None):
        raise ValueError("give exactly one of average_bits= or budget_bytes=")
    names = list(sens)
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"sizes has no entry for {missing}")
    total_bits = average_bits * sum(sizes[n] for n in names) if average_bits is not None else 8 * budget_bytes
    choices = [(li, b) for li, n in enumerate(names) for b in sorted(sens[n])]
    cost = np.array([sens[names[li]][b] for li, b in choices], dtype=float)
    pick = np.zeros((len(names), len(choices)))
    for k, (li, _) in enumerate(choices):
        pick[li, k] = 1
    size_row = np.array([[sizes[names[li]] * b for li, b in choices]], dtype=float)
    cheapest = sum(sizes[n] * min(sens[n]) for n in names)
    if cheapest > total_bits + 1e-9:
        raise ValueError(f"budget of {total_bits:.0f} bits is below the smallest allocation ({cheapest} bits)")
    res = milp(cost, constraints=[LinearConstraint(pick, 1, 1), LinearConstraint(size_row, -np.inf, total_bits)],
               integrality=np.ones(len(choices)), bounds=Bounds(0, 1))
    if not res.success:
        raise RuntimeError(f"the bit allocation did not solve: {res.message}")
    return {names[li]: b for (li, b), x in zip(choices, res.x) if x > 0.5}


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) for every Conv2d whose only user is a BatchNorm2d that is used
    once, found by tracing the model with torch.fx (quantized layers are kept as leaves). Raises
    torch.fx's error when the model cannot be traced."""
    from torch import fx

    from lowbit.quant.layers import QuantMixin

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, QuantMixin) or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.users) != 1 or calls[node.target] != 1:
            continue
        user = next(iter(node.users))
        if user.op != "call_module" or calls[user.target] != 1:
            continue
        if isinstance(model.get_submodule(node.target), nn.Conv2d) and isinstance(model.get_submodule(user.target), nn.BatchNorm2d):
            pairs.append((node.target, user.target))
    return pairs


def foldable_conv_bn_pairs(model: nn.Module, who: str) -> list[tuple[str, str]]:
    """``conv_bn_pairs`` whose BatchNorm keeps running statistics (so it can be folded); a model
    torch.fx cannot trace gives no pairs and a warning naming ``who``."""
    import warnings

    try:
        pairs = conv_bn_pairs(model)
    except Exception as err:  # data-dependent control flow and the like
        warnings.warn(f"{who}: BatchNorm not folded, the model could not be traced ({err})")
        return []
    return [(conv, bn) for conv, bn in pairs if model.get_submodule(bn).track_running_stats]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every Conv2d -> BatchNorm2d pair folded into the conv and the
    BatchNorm replaced by nn.Identity (the input model is not modified).

    torch.fx traces the model only to find the pairs (``conv_bn_pairs``); the copy keeps the
    model's own classes and forward, so its blocks can still be hooked and run on their own. A
    model fx cannot trace is returned unfolded with a warning."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    if not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()):
        return folded
    for conv, bn in foldable_conv_bn_pairs(folded, "fold_batchnorm"):
        set_submodule(folded, conv, fuse_conv_bn_eval(folded.get_submodule(conv), folded.get_submodule(bn)))
        set_submodule(folded, bn, nn.Identity())
    return folded
