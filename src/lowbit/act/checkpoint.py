"""The baseline users reach for today: activation checkpointing (``torch.utils.checkpoint``) per block."""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _blocks(module: nn.Module) -> list[nn.Module]:
    out = []
    for child in module.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and all(len(list(c.children())) > 0 for c in child):
            out += [c for c in child if any(True for _ in c.parameters())]  # a stack of blocks: each one
        elif len(list(child.children())) > 0 and any(True for _ in child.parameters()):
            out.append(child)  # a composite unit (a stem, an embedding block)
    return out


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """Recompute each block of ``model`` in backward instead of keeping its inside activations.

    Blocks: each element of a top-level container of composite modules (ResNet blocks,
    transformer blocks), and each other top-level composite child with parameters (a stem).
    Leaf layers at the top (a pooling layer, the head) are left alone. Uses non-reentrant
    checkpointing, so it composes with autograd hooks. Returns the wrapped modules; undo with
    :func:`remove_checkpoints`."""
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no composite child modules to checkpoint")
    for b in blocks:
        if "forward" in b.__dict__:
            continue  # already wrapped
        b.forward = functools.partial(checkpoint, type(b).forward.__get__(b), use_reentrant=False)
    return blocks


def remove_checkpoints(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), functools.partial):
            del m.forward
