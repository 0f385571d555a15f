"""One block finder for every family: the repeated blocks of a model, wherever they are nested.

A *block* is an entry of a stack: an ``nn.ModuleList`` or ``nn.Sequential`` holding two or more
composite modules (modules with children and parameters) of one type: GPT-2's ``GPT2Block``\\s,
BERT's ``BertLayer``\\s, Llama's ``LlamaDecoderLayer``\\s, a ResNet stage's residual blocks.
Activation checkpointing wraps each block, post-training quantization reconstructs block by
block, and reports group their rows by block.

Stacks of stacks (a ResNet's ``stages`` whose entries each hold a stack of residual blocks) are
opened, so the blocks are the residual blocks and not the four stages; a block's own inner stack
of single layer units (a residual block's two conv-norm-act units) does not split it further.
"""
from __future__ import annotations

from torch import nn

__all__ = ["repeated_blocks", "block_of"]


def _composite(m: nn.Module) -> bool:
    return next(m.children(), None) is not None and next(m.parameters(), None) is not None


def _repeated_entries(container: nn.Module) -> list[tuple[str, nn.Module]]:
    """The composite entries of ``container`` whose type occurs at least twice (in order)."""
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return []
    entries = [(n, c) for n, c in container.named_children() if _composite(c)]
    counts: dict[type, int] = {}
    for _, c in entries:
        counts[type(c)] = counts.get(type(c), 0) + 1
    return [(n, c) for n, c in entries if counts[type(c)] >= 2]


def _height(m: nn.Module) -> int:
    return max((1 + _height(c) for c in m.children()), default=0)


def _holds_blocks(m: nn.Module) -> bool:
    """Whether ``m`` nests a stack of real blocks (entries of height >= 2, not single
    conv-norm-act units): then ``m`` is a stage to open, not a block."""
    for child in m.children():
        entries = _repeated_entries(child)
        if any(_height(c) >= 2 for _, c in entries) or _holds_blocks(child):
            return True
    return False


def repeated_blocks(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model`` in model order, as ``[(qualified name, module)]``.

    Works on any nesting: ``model.transformer.h.*`` (GPT-2), ``model.bert.encoder.layer.*``
    (BERT), ``model.model.layers.*`` (Llama), ``resnet.encoder.stages.*.layers.*`` (ResNet),
    torchvision's ``layer1..layer4``. Returns an empty list when the model repeats no block."""
    found: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        qual = f"{prefix}{name}"
        entries = _repeated_entries(child)
        if entries:
            for n, c in entries:
                if _holds_blocks(c):  # a stage of blocks: its blocks are the blocks
                    found += repeated_blocks(c, f"{qual}.{n}.")
                else:
                    found.append((f"{qual}.{n}", c))
        else:
            found += repeated_blocks(child, f"{qual}.")
    return found


def block_of(name: str, blocks: list[str]) -> str | None:
    """The block (one of ``blocks``' qualified names) that module ``name`` lies in, or None."""
    for b in blocks:
        if name == b or name.startswith(b + "."):
            return b
    return None
