"""Shapley explanations: exact, permutation, antithetic, KernelSHAP and SHEAR, on torch models and
black boxes (any callable on 2-D arrays), with shap interop (``ShapleyResult.to_shap()``).

    phi = lowbit.explain.shapley(f, x, baseline, ShearConfig(budget=16))
    phi = lowbit.explain.shapley(f, x, baseline, method="shear", budget=16)   # the string shortcut
"""
from lowbit.explain import metrics
from lowbit.explain.api import METHODS, shapley
from lowbit.explain.blackbox import BlackBox, ClassProbability
from lowbit.explain.config import (
    AntitheticConfig,
    ExactConfig,
    KernelConfig,
    PermutationConfig,
    SampledConfig,
    ShapleyConfig,
    ShearConfig,
    register_estimator,
)
from lowbit.explain.interactions import SaturationWarning
from lowbit.explain.result import ShapleyResult
from lowbit.explain.shear import NotDifferentiable
from lowbit.explain.value import ValueFunction

__all__ = ["shapley", "ShapleyResult", "METHODS", "NotDifferentiable", "SaturationWarning", "BlackBox", "ClassProbability",
           "ValueFunction", "metrics", "ShapleyConfig", "SampledConfig", "ExactConfig", "PermutationConfig",
           "AntitheticConfig", "KernelConfig", "ShearConfig", "register_estimator"]
