"""Gradient helpers the activation-compression tests share."""
import torch.nn.functional as F

from lowbit.loop import parameter_gradient as grad  # noqa: F401  (flattened parameter gradient, inside an optional act)


def cos(a, b) -> float:
    return float(F.cosine_similarity(a, b, dim=0))
