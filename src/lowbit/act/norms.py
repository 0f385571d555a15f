"""Which layers normalise their input, and which do so over the batch: the probe treats their
inputs apart (their backward divides by statistics of the input) and cannot split such a layer's
batch."""
from __future__ import annotations

from torch import nn

__all__ = ["normalises_input", "uses_batch_statistics"]


def normalises_input(module: nn.Module | None) -> bool:
    """True for a layer whose backward divides by statistics of its own input: a BatchNorm on batch
    statistics (:func:`uses_batch_statistics`), LayerNorm, GroupNorm, RMSNorm (torch's, or a
    ``transformers`` ``*RMSNorm`` / ``*LayerNorm`` class such as ``LlamaRMSNorm``)."""
    if module is None:
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return uses_batch_statistics(module)
    norms = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    return isinstance(module, norms) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def uses_batch_statistics(module: nn.Module | None) -> bool:
    """True for a BatchNorm (1d/2d/3d, SyncBatchNorm, lazy) that normalises with the statistics of
    the batch: in train mode, or without running statistics."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return module.training or module.running_mean is None
