"""lowbit: train and run neural networks with fewer bits and less memory."""
from lowbit import act, codecs, data, decompose, explain, models, quant

__version__ = "0.1.0"
__all__ = ["act", "codecs", "data", "decompose", "explain", "models", "quant", "__version__"]
