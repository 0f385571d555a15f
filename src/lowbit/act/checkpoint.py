"""Activation checkpointing per block (``torch.utils.checkpoint``), on any model, alone or mixed
with activation compression.

A checkpointed block keeps only its inputs during the forward pass and recomputes its inside in
backward, one block at a time, so the step's peak holds one block's activations instead of all of
them. The blocks are the model's repeated layers wherever they are nested
(:func:`lowbit.blocks.repeated_blocks`: GPT-2's ``transformer.h.*``, BERT's
``bert.encoder.layer.*``, Llama's ``model.layers.*``, a ResNet's residual blocks), or the ones
the caller names.

Mixing with :class:`~lowbit.act.ActivationCompressor`: run the whole forward inside ``with act:``.
Tensors saved inside a checkpointed block never reach the compressor (non-reentrant checkpointing
installs its own saved-tensor hooks for the block, which take precedence, and stores nothing), and
the recomputation in backward runs under checkpointing's own hooks too, so nothing is compressed
twice; every tensor saved outside the checkpointed blocks is compressed as usual. The inputs a
checkpointed block keeps are held exactly by default (``compress_inputs=True`` hands them to the
compressor), so the recomputation replays the block on its true inputs.
"""
from __future__ import annotations

import inspect
import re
import warnings
from typing import Callable, Iterable, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit.blocks import repeated_blocks

__all__ = ["checkpoint_blocks", "remove_checkpoints", "checkpointed_blocks"]

BlockChoice = Union[None, Iterable[str], str, Callable[[str, nn.Module], bool]]

# keyword arguments through which transformers layers read and write a key/value cache: a
# recomputed layer would append its keys and values a second time, so training runs without it
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class _CheckpointedForward:
    """Instance-level ``forward`` of a checkpointed module: non-reentrant checkpointing while
    gradients are recorded, the plain forward otherwise (inference, generation with a cache)."""

    def __init__(self, module: nn.Module, name: str, warned: list[bool], compress_inputs: bool = False):
        self.forward = type(module).forward.__get__(module)  # the class's forward, bound
        self.name = name
        self.compress_inputs = compress_inputs
        self._warned = warned  # shared by the blocks of one checkpoint_blocks call: one warning, not one per layer
        # a cache may come positionally (GPT-2 passes it second): bind to find it by name
        self._sig = cache_signature(self.forward)

    def _without_cache(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, list[str]]:
        return without_cache(self._sig, args, kwargs)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        args, kwargs, dropped = self._without_cache(args, dict(kwargs))
        if dropped and not self._warned[0]:
            self._warned[0] = True
            warnings.warn(f"checkpointed blocks ({self.name!r}, ...): a key/value cache cannot be recomputed, so the "
                          f"training forward runs without it ({', '.join(dropped)} dropped); set "
                          "model.config.use_cache=False to silence this", UserWarning, stacklevel=3)
        if self.compress_inputs:
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)
        # checkpointing saves the block's inputs through the saved-tensor hooks active around it;
        # an identity pair keeps them exact (the recomputation then replays the block on its true
        # inputs) instead of letting an enclosing ActivationCompressor quantize them
        with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def cache_signature(forward) -> inspect.Signature | None:
    """``forward``'s signature when it takes a key/value cache (then :func:`without_cache` binds
    the arguments to find it by name, also when it comes positionally), else None."""
    try:
        sig = inspect.signature(forward)
    except (TypeError, ValueError):
        return None
    return sig if any(k in sig.parameters for k in _CACHE_KWARGS) else None


def without_cache(sig: inspect.Signature | None, args: tuple, kwargs: dict) -> tuple[tuple, dict, list[str]]:
    """(args, kwargs, names dropped): a block's call with its key/value cache set to None and
    ``use_cache`` off, so that running it again does not read what the first run cached."""
    dropped = []
    if sig is not None:
        try:
            bound = sig.bind_partial(*args, **kwargs)
        except TypeError:
            bound = None
        if bound is not None:
            for k in _CACHE_KWARGS:
                if bound.arguments.get(k) is not None:
                    bound.arguments[k] = None
                    dropped.append(k)
            args, kwargs = bound.args, dict(bound.kwargs)  # **kwargs parameters come back flattened
    kwargs = dict(kwargs)
    for k in _CACHE_KWARGS:
        if kwargs.get(k) is not None:
            kwargs[k] = None
            dropped.append(k)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
        dropped.append("use_cache")
    return args, kwargs, dropped


def _keep(t):
    return t


def _choose(model: nn.Module, blocks: BlockChoice) -> list[tuple[str, nn.Module]]:
    found = repeated_blocks(model)
    if blocks is None:
        if not found:
            raise ValueError(f"{type(model).__name__} has no repeated blocks (a ModuleList/Sequential of two or more "
                             "composite modules of one type) to checkpoint; name the modules with blocks=[...]")
        return found
    if isinstance(blocks, str):  # a regular expression over qualified module names
        pattern = re.compile(blocks)
        chosen = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
        if not chosen:
            raise ValueError(f"no module of {type(model).__name__} matches {blocks!r}")
        return chosen
    if callable(blocks):
        if not found:
            raise ValueError(f"{type(model).__name__} has no repeated blocks for the predicate to choose from; "
                             "name the modules with blocks=[...]")
        return [(n, m) for n, m in found if blocks(n, m)]
    names = list(blocks)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or not n]
    if missing:
        known = ", ".join(n for n, _ in found[:4]) or "none"
        raise ValueError(f"{type(model).__name__} has no submodule(s) {missing} (its repeated blocks: {known}, ...)")
    return [(n, modules[n]) for n in names]


def checkpoint_blocks(model: nn.Module, blocks: BlockChoice = None, every: int = 1,
                      compress_inputs: bool = False) -> list[nn.Module]:
    """Recompute the chosen blocks of ``model`` in backward instead of keeping their activations.

    Args:
        model: any module.
        blocks: which modules to checkpoint. None: every repeated block
            (:func:`lowbit.blocks.repeated_blocks`, e.g. each ``GPT2Block``); a list of qualified
            module names (any submodules, e.g. ``["transformer.h.0", "transformer.h.2"]``); a
            string, a regular expression matched against whole qualified names
            (``r"transformer\\.h\\.[0-2]"``); or a predicate ``(name, module) -> bool`` choosing
            among the repeated blocks.
        every: keep every ``every``-th of the chosen blocks (the 1st, the ``every+1``-th, ...):
            ``every=2`` checkpoints half the blocks, and the others can be compressed with an
            :class:`~lowbit.act.ActivationCompressor` instead.
        compress_inputs: let an enclosing ActivationCompressor compress the inputs each
            checkpointed block keeps (default False: they stay exact and the recomputation
            replays the block on its true inputs; the compressor's report does not count them).

    Uses non-reentrant checkpointing, which composes with saved-tensor hooks (see the module
    doc); RNG state is restored for the recomputation, so dropout draws the same masks. A
    transformers layer called with a key/value cache runs without it while gradients are
    recorded (as transformers' own gradient checkpointing does), with a warning. Modules already
    checkpointed are left as they are. Returns the checkpointed modules; undo with
    :func:`remove_checkpoints`."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    chosen = _choose(model, blocks)[::every]
    if not chosen:
        raise ValueError(f"no block of {type(model).__name__} was chosen to checkpoint")
    names = [n for n, _ in chosen]
    nested = [n for n in names if any(n != o and n.startswith(o + ".") for o in names)]
    if nested:
        raise ValueError(f"{nested} lie inside other chosen modules; checkpoint either the outer or the inner ones")
    warned = [False]
    for name, module in chosen:
        if not isinstance(module.__dict__.get("forward"), _CheckpointedForward):
            module.forward = _CheckpointedForward(module, name, warned, compress_inputs)
    return [m for _, m in chosen]


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that :func:`checkpoint_blocks` wrapped."""
    return [n for n, m in model.named_modules() if isinstance(m.__dict__.get("forward"), _CheckpointedForward)]


def remove_checkpoints(model: nn.Module) -> None:
    """Undo :func:`checkpoint_blocks` on every module of ``model``."""
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), _CheckpointedForward):
            del m.forward
