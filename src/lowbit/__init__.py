"""lowbit: train and run neural networks with fewer bits and less memory.

The subpackages (``lowbit.act``, ``lowbit.quant``, ...) are imported on first use (PEP 562), so
``import lowbit`` and ``lowbit --help`` do not pay for importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
_SUBPACKAGES = ("act", "codecs", "data", "decompose", "explain", "models", "quant")
__all__ = [*_SUBPACKAGES, "__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"lowbit.{name}")  # the import also sets it as an attribute of lowbit
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
