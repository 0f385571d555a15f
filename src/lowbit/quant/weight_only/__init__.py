"""Weight-only low-bit quantization for language models: packed 2..8-bit Linear / Conv1D layers
with float16 per-group scale and zero, made by round-to-nearest, HQQ or GPTQ.

    qmodel = lowbit.quant.quantize_weights(model, bits=4, group_size=128, method="hqq")
    torch.save(qmodel.state_dict(), "m.pt")
    model2 = load_quantized(fresh_float_model, torch.load("m.pt", weights_only=True))
"""
from lowbit.quant.weight_only.api import (
    METHODS,
    load_quantized,
    packed_layers,
    quantize_weights,
    target_layers,
    weight_only_summary,
)
from lowbit.quant.weight_only.gptq import HessianAccumulator, gptq
from lowbit.quant.weight_only.hqq import hqq
from lowbit.quant.weight_only.layer import PackedLinear
from lowbit.quant.weight_only.rtn import rtn

__all__ = ["METHODS", "quantize_weights", "load_quantized", "packed_layers", "target_layers", "weight_only_summary",
           "PackedLinear", "rtn", "hqq", "gptq", "HessianAccumulator"]
