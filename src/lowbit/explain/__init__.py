"""Shapley explanations: exact, permutation, antithetic, KernelSHAP and SHEAR, on torch models and
black boxes (any callable on 2-D arrays), with shap interop (``ShapleyResult.to_shap()``).

    phi = lowbit.explain.shapley(f, x, baseline, method="shear", budget=16)
"""
from lowbit.explain import metrics
from lowbit.explain.api import METHODS, shapley
from lowbit.explain.blackbox import BlackBox
from lowbit.explain.interactions import SaturationWarning
from lowbit.explain.result import ShapleyResult
from lowbit.explain.shear import NotDifferentiable
from lowbit.explain.value import ValueFunction

__all__ = ["shapley", "ShapleyResult", "METHODS", "NotDifferentiable", "SaturationWarning", "BlackBox",
           "ValueFunction", "metrics"]
