"""``quantize_weights``: a copy of a model whose Linear / Conv1D layers are packed weight-only layers."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lowbit.kernels.int4_gemv import check_layout
from lowbit.quant.weight_only.gptq import HessianAccumulator, gptq
from lowbit.quant.weight_only.hqq import hqq
from lowbit.quant.weight_only.layer import FORMAT, PackedLinear
from lowbit.quant.weight_only.rtn import rtn

METHODS = ("rtn", "hqq", "gptq")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional: without it there are no Conv1D layers to find
        return None
    return Conv1D


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out_features, in_features] (Conv1D stores it transposed)."""
    conv1d = _conv1d_type()
    w = module.weight.detach()
    return w.t() if conv1d is not None and isinstance(module, conv1d) else w


def target_layers(model: nn.Module, skip: Iterable[str] = (), quantize_tied: bool = False
                  ) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """(layers to pack, {skipped name: reason}). Targets are nn.Linear and transformers Conv1D.
    A layer whose weight is also another module's parameter (an output head tied to the input
    embedding) is skipped unless ``quantize_tied``: packing it would keep the float embedding and
    add a packed copy."""
    conv1d = _conv1d_type()
    kinds = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    skip = set(skip)
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    layers, skipped = [], {}
    for name, mod in model.named_modules():
        if not isinstance(mod, kinds):
            continue
        if name in skip:
            skipped[name] = "in skip"
            continue
        others = [o for o in owners.get(id(mod.weight), []) if o != name]
        if others and not quantize_tied:
            skipped[name] = f"weight tied to {others[0]}"
            continue
        layers.append((name, mod))
    return layers, skipped


def _check_layer(name: str, module: nn.Module, group_size: int, allow_ragged: bool) -> None:
    w = module.weight
    if not w.is_floating_point():
        raise TypeError(f"layer {name!r} has a {w.dtype} weight; weight-only quantization needs a float weight")
    k = _float_weight(module).shape[1]
    if k % group_size and not allow_ragged:
        divisors = [g for g in range(8, k + 1, 8) if k % g == 0]
        raise ValueError(f"group_size {group_size} does not divide layer {name!r}'s {k} input features; choose one "
                         f"of {divisors[-6:] or 'none (K is not a multiple of 8)'} or pass allow_ragged=True "
                         f"(the last group of each row is then shorter)")


def _run(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _pack(module: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
          group_size: int) -> PackedLinear:
    bias = getattr(module, "bias", None)
    return PackedLinear.from_codes(codes, scales, zeros, bits, group_size,
                                   None if bias is None else bias.detach().float())


def _stages(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """GPTQ's sequential order: the layers of each repeated block (in model order) together, then
    the layers outside blocks."""
    from lowbit.blocks import block_of, repeated_blocks

    names = [n for n, _ in repeated_blocks(model)]
    stages: dict[str | None, list] = {}
    for name, mod in layers:
        stages.setdefault(block_of(name, names), []).append((name, mod))
    order = [b for b in names if b in stages] + ([None] if None in stages else [])
    return [stages[b] for b in order]


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: int = 4, group_size: int = 128, method: str = "rtn",
                     calibration: Iterable[Any] | None = None, skip: Iterable[str] = (),
                     allow_ragged: bool = False, quantize_tied: bool = False, progress: bool = False,
                     **method_kwargs: Any) -> nn.Module:
    """A copy of ``model`` whose nn.Linear and transformers Conv1D layers are :class:`PackedLinear`:
    ``bits``-bit codes (2..8) packed into bytes, float16 scale and zero per ``group_size``
    consecutive input weights of a row, no float weight (``model`` is not modified).

    method: "rtn" (round to nearest, min-max range), "hqq" (half-quadratic zero optimisation,
    calibration-free) or "gptq" (Hessian-weighted error feedback; needs ``calibration``: an
    iterable of model inputs, each a tensor such as token ids [B, T], a tuple of positional
    arguments or a dict of keyword arguments). group_size: a multiple of 8 that divides every
    layer's in_features, unless ``allow_ragged`` (the last group of a row is then shorter).
    skip: qualified names of layers to keep in float. quantize_tied: also pack output heads
    whose weight is tied to an embedding (kept in float by default). method_kwargs go to the
    method (hqq: iters, p, beta, kappa; gptq: damp, block)."""
    check_layout(bits, group_size)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {METHODS}")
    if method == "gptq":
        if calibration is None:
            raise ValueError("method='gptq' needs calibration inputs: calibration=[batch, ...]")
        calibration = list(calibration)
        if not calibration:
            raise ValueError("calibration is empty: GPTQ needs at least one batch")
    qmodel = copy.deepcopy(model)
    was_training = qmodel.training
    qmodel.eval()
    layers, _ = target_layers(qmodel, skip, quantize_tied)
    if not layers:
        raise ValueError("the model has no nn.Linear or Conv1D layer to quantize")
    for name, mod in layers:
        _check_layer(name, mod, group_size, allow_ragged)
    bar = _progress(len(layers), progress, f"{method} {bits}-bit")
    if method == "gptq":
        for stage in _stages(qmodel, layers):
            acc = {name: HessianAccumulator(_float_weight(mod).shape[1]) for name, mod in stage}
            hooks = [mod.register_forward_hook(lambda m, inp, out, a=acc[name]: a.add(inp[0]))
                     for name, mod in stage]
            try:
                for batch in calibration:
                    _run(qmodel, batch)
            finally:
                for h in hooks:
                    h.remove()
            for name, mod in stage:
                codes, scales, zeros = gptq(_float_weight(mod).float().cpu(), acc[name].h, bits, group_size,
                                            **method_kwargs)
                _set_module(qmodel, name, _pack(mod, codes, scales, zeros, bits, group_size).to(mod.weight.device))
                bar(1)
    else:
        fn: Callable = rtn if method == "rtn" else hqq
        for name, mod in layers:
            codes, scales, zeros = fn(_float_weight(mod).float(), bits, group_size, **method_kwargs)
            _set_module(qmodel, name, _pack(mod, codes, scales, zeros, bits, group_size))
            bar(1)
    qmodel.train(was_training)
    return qmodel


def _progress(total: int, show: bool, desc: str) -> Callable[[int], None]:
    if not show:
        return lambda n: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    return bar.update


def packed_layers(model: nn.Module) -> list[tuple[str, PackedLinear]]:
    """The model's packed weight-only layers, by qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]


def load_quantized(model: nn.Module, state_dict: dict[str, Any]) -> nn.Module:
    """Load a state_dict saved from a ``quantize_weights`` model into ``model`` (the same
    architecture, float): every layer with a packed entry (``<name>.qweight``) is replaced by an
    empty :class:`PackedLinear` of the saved layout, then ``load_state_dict(strict=True)``.
    Modifies and returns ``model``. Works with ``torch.load(path, weights_only=True)``."""
    for key, state in state_dict.items():
        if not key.endswith("._extra_state") or not isinstance(state, dict) or state.get("format") != FORMAT:
            continue
        name = key[: -len("._extra_state")]
        old = model.get_submodule(name)
        layer = PackedLinear(state["in_features"], state["out_features"], state["bits"], state["group_size"],
                             bias=f"{name}.bias" in state_dict)
        if hasattr(old, "weight"):
            layer = layer.to(old.weight.device)
        _set_module(model, name, layer)
    model.load_state_dict(state_dict, strict=True)
    return model


def weight_only_summary(model: nn.Module) -> dict[str, Any]:
    """Bytes of the packed layers against the float32 weights they replace, and the layer count."""
    packed = packed_layers(model)
    float_bytes = sum(4 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
                      for _, m in packed)
    packed_bytes = sum(m.nbytes() for _, m in packed)
    return {"layers": len(packed), "float32_bytes": float_bytes, "packed_bytes": packed_bytes,
            "compression": float_bytes / max(packed_bytes, 1)}
