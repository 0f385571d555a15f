"""COMET (Jin et al., VLDB 2022): error-bounded lossy compression of activations, with an error
bound per saved tensor that adapts during training to what the gradient can tolerate.

Adaptive scheme: the compressor's sensitivity probe (shared with GACT) measures, per saved tensor
``l``, ``c_l``: the parameter-gradient squared error per unit of the tensor's stochastic-rounding
variance. An error-bounded codec's error is uniform in ``[-eb, eb]`` (nearest rounding to a grid of
``2 eb``), which against the probe's variance bound adds about ``c_l * numel_l * eb_l**2 / 2`` to
the squared gradient error. Each tensor gets an equal share of the budget
``tolerance**2 * ||g||**2``:

    eb_l = sqrt(2 * tolerance**2 * ||g||**2 / (L * c_l * numel_l)),

capped at half the tensor's typical value range (beyond that it would store nothing). Rounding to
the nearest grid point is not unbiased, so errors of neighbouring elements can add up coherently
and the linear model can be off: the bounds are then checked in closed loop, measuring the
gradient error with every tensor compressed at its bound on the probe batch and scaling all bounds
by ``tolerance / measured`` (up to ``calibration_rounds`` times). Before the first estimate,
``eb = init_eb * (max - min)`` per tensor.
"""
from __future__ import annotations

import math

import torch

from lowbit.act.gact import GactPolicy, TensorStat
from lowbit.act.policy import register_policy
from lowbit.codecs import Packed
from lowbit.codecs.error_bounded import ErrorBoundedCodec


@register_policy("comet")
class CometPolicy(GactPolicy):
    """``bits`` is unused (COMET sets error bounds, not widths); ``tolerance`` is the relative
    gradient error (root of the summed squared error over ``||g||**2``) the bounds aim at."""

    def __init__(self, bits: float | None = None, tolerance: float = 0.2, init_eb: float = 0.01, interval: int = 100,
                 probe_bits: int | None = 4, probe_draws: int = 1, max_probes: int = 16, momentum: float = 0.5,
                 level: int = 1, calibration_rounds: int = 4, probe_groups: int | None = 6,
                 probe_method: str = "linear"):
        super().__init__(2, interval=interval, probe_bits=probe_bits, probe_draws=probe_draws, max_probes=max_probes,
                         momentum=momentum, probe_groups=probe_groups, probe_method=probe_method)
        if not 0 < tolerance < 1:
            raise ValueError(f"tolerance (relative gradient error) must lie in (0, 1), got {tolerance}")
        if not 0 < init_eb < 0.5:
            raise ValueError(f"init_eb (fraction of each tensor's range) must lie in (0, 0.5), got {init_eb}")
        self.bits = None
        self.tolerance, self.init_eb, self.calibration_rounds = tolerance, init_eb, calibration_rounds
        self.measured_error: float | None = None  # relative gradient error at the final bounds
        self.codec = ErrorBoundedCodec(level=level)
        self.error_bounds: dict[int, float] = {}
        self.history: list[dict[int, float]] = []  # the bounds after each estimate

    def encode(self, index: int, t: torch.Tensor, ctx) -> Packed | None:
        eb = self.error_bounds.get(index)
        if eb is None:
            span = float(t.max() - t.min()) if t.numel() else 0.0
            if not math.isfinite(span) or span == 0:
                return None  # constant or non-finite: keep exact
            eb = self.init_eb * span
        return self.codec.encode(t, eb=eb)

    def codecs(self) -> dict:
        return {self.codec.name: self.codec}

    def update(self, stats: dict[int, TensorStat], measured: dict[int, float], grad_sq: float = 0.0, **_) -> None:
        self.smooth(stats, measured)
        budget = self.tolerance**2 * grad_sq / max(len(stats), 1)
        bounds = {}
        for i, s in stats.items():
            typical_range = math.sqrt(4 * s.rsq / s.numel) if s.numel else 0.0
            cap = 0.5 * typical_range
            c = s.sensitivity or 0.0
            eb = math.sqrt(2 * budget / (c * s.numel)) if c > 0 and budget > 0 else cap
            if cap > 0:
                bounds[i] = min(eb, cap)
        self.error_bounds = bounds
        self._caps = {i: 0.5 * math.sqrt(4 * s.rsq / s.numel) for i, s in stats.items() if s.numel}
        self.estimates += 1

    def calibrate(self, relative_error) -> None:
        """``relative_error()``: the measured relative gradient error at the current bounds."""
        for _ in range(self.calibration_rounds):
            err = relative_error()
            self.measured_error = err
            if err <= 0 or 0.7 * self.tolerance <= err <= self.tolerance:
                break
            factor = min(max(self.tolerance * 0.85 / err, 0.1), 4.0)
            self.error_bounds = {i: min(eb * factor, self._caps.get(i, eb)) for i, eb in self.error_bounds.items()}
        self.history.append(dict(self.error_bounds))

    def describe(self) -> str:
        return f"comet (tolerance {self.tolerance:g})"
