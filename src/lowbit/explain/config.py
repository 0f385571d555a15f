"""Typed configs for the Shapley estimators, and the registry from config type to estimator.

    phi = lowbit.explain.shapley(f, x, baseline, ShearConfig(budget=16))
    # the same, by the string shortcut: shapley(f, x, baseline, "shear", budget=16)

A config validates itself when built (ValueError naming ``Config.field``). ``budget`` is always
coalition evaluations per player per instance (the total is ``budget * players``), ``seed`` the
seed of the sampler. A new estimator is a config plus one function registered for it with
:func:`register_estimator`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from lowbit.explain.estimators import exact_shapley, kernel_shapley, permutation_shapley
from lowbit.explain.interactions import finite_difference_logit, shear_hessian_interactions
from lowbit.explain.shear import OUTSIDE_LAWS, finite_difference_interactions, shear_shapley
from lowbit.explain.value import Model, ValueFunction
from lowbit.fields import check_choice, check_int, integral

DEFAULT_BUDGET = 16
INTERACTIONS = ("hessian", "finite-difference")


@dataclass(frozen=True, kw_only=True)
class ShapleyConfig:
    """Base of the estimator configs (no options of its own)."""

    name: ClassVar[str] = ""  # the string shortcut, set by register_estimator


@dataclass(frozen=True, kw_only=True)
class ExactConfig(ShapleyConfig):
    """All 2^P coalitions per instance; refused past ``max_players`` players (>= 1)."""

    max_players: int = 16

    def __post_init__(self) -> None:
        check_int(self, "max_players", 1, unit="players")


@dataclass(frozen=True, kw_only=True)
class SampledConfig(ShapleyConfig):
    """``budget``: coalition evaluations per player per instance (an integer >= 2);
    ``seed``: the sampler's seed."""

    budget: int = DEFAULT_BUDGET
    seed: int = 0

    def __post_init__(self) -> None:
        integral(self, "budget")
        check_int(self, "budget", 2, unit="coalition evaluations per player")
        check_int(self, "seed")


@dataclass(frozen=True, kw_only=True)
class PermutationConfig(SampledConfig):
    """Permutation sampling: marginal contributions along random orders."""


@dataclass(frozen=True, kw_only=True)
class AntitheticConfig(SampledConfig):
    """Permutation sampling with each order paired with its reverse."""


@dataclass(frozen=True, kw_only=True)
class KernelConfig(SampledConfig):
    """KernelSHAP: paired coalition sampling, weighted least squares constrained to efficiency."""


@dataclass(frozen=True, kw_only=True)
class ShearConfig(SampledConfig):
    """SHEAR: each feature's value from a small game of its strongest cooperators.

    interactions: "hessian" (autograd second derivatives; needs a differentiable model) or
    "finite-difference" (mixed differences of the value function, P(P+1)/2 + 1 extra evaluations
    counted in the budget). outside: how players outside a feature's cooperator game are set,
    "shapley" (unbiased) or "uniform" (x or baseline with probability 1/2 each)."""

    interactions: str = "hessian"
    outside: str = "shapley"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "interactions", INTERACTIONS)
        if self.outside not in OUTSIDE_LAWS:
            raise ValueError(f"ShearConfig.outside (shear_outside= in the string form) must be one of {OUTSIDE_LAWS}, "
                             f"got {self.outside!r}")


# ---------------------------------------------------------------------------- registry
Run = Callable[[ValueFunction, Any, torch.Generator, int, Any], torch.Tensor]
Prepare = Callable[[Model, torch.Tensor, torch.Tensor, list, list, Any], tuple[Any, list[str]]]


@dataclass(frozen=True)
class Estimator:
    """``run(v, config, generator, row, prepared) -> phi`` [P] float for instance ``row``;
    ``prepare(model, xs [B, M], background [K, M], players, targets, config) -> (prepared, modes)``
    runs once for the batch before (``modes``: per instance, how interactions were found)."""

    run: Run
    prepare: Prepare | None = None


ESTIMATORS: dict[type[ShapleyConfig], Estimator] = {}
SHORTCUTS: dict[str, type[ShapleyConfig]] = {}  # method name -> config type


def register_estimator(config_type: type[ShapleyConfig], name: str | None = None, prepare: Prepare | None = None):
    """Register the decorated ``run(v, config, generator, row, prepared) -> phi`` for
    ``config_type``; ``name`` makes ``shapley(..., method=name)`` a shortcut for it."""
    if not (isinstance(config_type, type) and issubclass(config_type, ShapleyConfig)):
        raise TypeError(f"register_estimator needs a subclass of ShapleyConfig, got {config_type!r}")

    def deco(run: Run) -> Run:
        ESTIMATORS[config_type] = Estimator(run, prepare)
        if name is not None:
            config_type.name = name
            SHORTCUTS[name] = config_type
        return run

    return deco


def estimator_for(config: ShapleyConfig) -> Estimator:
    est = ESTIMATORS.get(type(config))
    if est is None:
        raise TypeError(f"no Shapley estimator is registered for {type(config).__name__}: register one with "
                        f"@lowbit.explain.register_estimator({type(config).__name__})")
    return est


def config_for(method: str, budget: int | None = None, seed: int | None = None, max_exact_players: int | None = None,
               interactions: str | None = None, shear_outside: str | None = None) -> ShapleyConfig:
    """The config the string shortcut ``shapley(..., method, budget=..., ...)`` means. Options a
    method does not have are ignored (``budget`` by "exact", as it always was)."""
    if not isinstance(method, str) or method not in SHORTCUTS:
        raise ValueError(f"unknown method {method!r}: choose one of {tuple(SHORTCUTS)}")
    cls = SHORTCUTS[method]
    given = dict(budget=budget, seed=seed, max_players=max_exact_players, interactions=interactions,
                 outside=shear_outside)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in given.items() if v is not None and k in fields})


def _check_players(config: ExactConfig, players: int) -> None:
    if players > config.max_players:
        raise ValueError(f"exact Shapley values need 2^{players} = {2**players:,} coalitions per instance; the limit "
                         f"is max_exact_players={config.max_players} (ExactConfig.max_players; raise it, or use "
                         f"method='shear' / 'kernel')")


@register_estimator(ExactConfig, "exact")
def _exact(v: ValueFunction, c: ExactConfig, gen: torch.Generator, row: int, prepared: Any) -> torch.Tensor:
    _check_players(c, v.players)
    return exact_shapley(v)


@register_estimator(PermutationConfig, "permutation")
def _permutation(v: ValueFunction, c: PermutationConfig, gen: torch.Generator, row: int, prepared: Any) -> torch.Tensor:
    return permutation_shapley(v, c.budget * v.players, gen)


@register_estimator(AntitheticConfig, "antithetic")
def _antithetic(v: ValueFunction, c: AntitheticConfig, gen: torch.Generator, row: int, prepared: Any) -> torch.Tensor:
    return permutation_shapley(v, c.budget * v.players, gen, antithetic=True)


@register_estimator(KernelConfig, "kernel")
def _kernel(v: ValueFunction, c: KernelConfig, gen: torch.Generator, row: int, prepared: Any) -> torch.Tensor:
    return kernel_shapley(v, c.budget * v.players, gen)


def _shear_prepare(model: Model, xs: torch.Tensor, background: torch.Tensor, players: list, targets: list,
                   c: ShearConfig) -> tuple[Sequence | None, list[str]]:
    """One batched Hessian for all instances (``interactions="hessian"``)."""
    if c.interactions == "hessian":
        return shear_hessian_interactions(model, xs, background, players, targets)
    return None, ["finite-difference"] * xs.shape[0]


@register_estimator(ShearConfig, "shear", prepare=_shear_prepare)
def _shear(v: ValueFunction, c: ShearConfig, gen: torch.Generator, row: int, etas: Sequence | None) -> torch.Tensor:
    if etas is None:
        eta = finite_difference_interactions(v)
    elif etas[row] is None:  # a saturated row without a usable logit Hessian
        eta = finite_difference_logit(v, row)
    else:
        eta = etas[row]
    return shear_shapley(v, eta, c.budget, gen, c.outside)
