"""Shapley explanations: exact, permutation, antithetic, KernelSHAP and SHEAR, on any torch model.

    phi = lowbit.explain.shapley(f, x, baseline, method="shear", budget=16)
"""
from lowbit.explain import metrics
from lowbit.explain.api import METHODS, NotDifferentiable, ShapleyResult, shapley
from lowbit.explain.value import ValueFunction

__all__ = ["shapley", "ShapleyResult", "METHODS", "NotDifferentiable", "ValueFunction", "metrics"]
