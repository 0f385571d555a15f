"""Weight re-modelling: SmartDeal (W = Ce . B, Ce sparse powers of two, B a small float basis).

    sd = lowbit.decompose.smartdeal(trained_model, sparsity=0.5)   # = lowbit.quant.quantize(trained_model, "smartdeal", ...)
    lowbit.quant.train_quantized(sd, train, test)                  # fine-tune keeping the structure
"""
from lowbit.decompose.smartdeal import (
    SmartDealConfig,
    SmartDealWeight,
    decompose,
    pow2_round,
    report,
    smartdeal,
)

__all__ = ["SmartDealConfig", "SmartDealWeight", "decompose", "pow2_round", "report", "smartdeal"]
