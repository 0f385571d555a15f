"""Quantized, binary and ternary networks: quantizers (forward rounding + backward estimator),
QuantConv2d / QuantLinear, recipes that turn a float model into a quantized one, packed size.

    qmodel = lowbit.quant.quantize(model, XnorConfig()) # model itself is not modified
    qmodel = lowbit.quant.quantize(model, "xnor")      # the string shortcut for the same
    lowbit.quant.train_quantized(qmodel, train, test)  # schedules, penalties, distillation
    print(lowbit.quant.summary(qmodel))                # per-layer bits and packed bytes
"""
from lowbit.quant import functions, vertical
from lowbit.quant.export import export, storage_bytes
from lowbit.quant.onnx_export import export_onnx
from lowbit.quant.attention import SplitMultiheadAttention
from lowbit.quant.layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, penalty, quant_layers, set_progress
from lowbit.quant.mixed import ALLOCATION_WIDTHS, allocate_bits, average_bits, fold_batchnorm, hutchinson_trace, rtn_weight, sensitivity, weight_counts
from lowbit.quant.ptq import ptq
from lowbit.quant.reconstruct import AdaRoundWeight, find_units, reconstruct
from lowbit.quant.quantizers import (
    LSQ,
    BinaryActivation,
    BinaryWeight,
    BorderQuantizer,
    FixedUniform,
    GradientQuantizer,
    NoiseAdaptation,
    Quantizer,
    SignQuantizer,
    SparseBinaryWeight,
    TernaryWeight,
    ThresholdTernaryWeight,
    HypersphericalTernaryWeight,
    PrunedTernaryWeight,
    ternary_weight,
    UniformActivation,
    UniformWeight,
)
from lowbit.quant.config import (
    BnnConfig,
    BwnConfig,
    DirNetConfig,
    FdaConfig,
    HqConfig,
    Int4Config,
    Int8Config,
    LsqConfig,
    QnnConfig,
    QuantConfig,
    SbnnConfig,
    TernaryPtqConfig,
    TwnConfig,
    VerticalConfig,
    XnorConfig,
)
from lowbit.quant.recipes import CONFIGS, RECIPES, Recipe, get_recipe, quantize, recipe_for, register_recipe
from lowbit.quant.size import ModelSize, model_size, summary
from lowbit.quant.train import distillation_loss, train_quantized

__all__ = [
    "functions", "vertical", "QuantConv2d", "QuantConv1d", "QuantLinear", "QuantEmbedding", "SplitMultiheadAttention", "penalty", "quant_layers", "set_progress", "LSQ", "BinaryActivation",
    "BinaryWeight", "GradientQuantizer", "NoiseAdaptation", "Quantizer", "SignQuantizer", "SparseBinaryWeight",
    "TernaryWeight", "ThresholdTernaryWeight", "HypersphericalTernaryWeight", "PrunedTernaryWeight", "ternary_weight", "UniformActivation", "UniformWeight", "RECIPES", "Recipe", "get_recipe", "quantize",
    "register_recipe", "ModelSize", "model_size", "summary", "distillation_loss", "train_quantized", "export",
    "storage_bytes", "ALLOCATION_WIDTHS", "allocate_bits", "average_bits", "fold_batchnorm", "hutchinson_trace", "rtn_weight", "sensitivity", "weight_counts",
    "ptq", "export_onnx", "FixedUniform", "BorderQuantizer", "AdaRoundWeight", "find_units", "reconstruct",
    "CONFIGS", "recipe_for", "QuantConfig", "BnnConfig", "QnnConfig", "BwnConfig", "XnorConfig", "FdaConfig",
    "DirNetConfig", "SbnnConfig", "TwnConfig", "HqConfig", "TernaryPtqConfig", "VerticalConfig", "LsqConfig",
    "Int8Config", "Int4Config",
]
from lowbit.quant.weight_only import quantize_weights; __all__ += ["quantize_weights"]  # noqa: E402, E702
