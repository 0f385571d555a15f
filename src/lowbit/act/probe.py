"""Sensitivity probe for adaptive policies (GACT, COMET): how much each saved tensor's
quantization noise moves the parameter gradient, measured on one batch.

One forward keeps every saved tensor exact (the probe records each one's group-range statistic
``R_l``), one backward gives the exact gradient, then one extra backward (the graph is retained,
so no extra forward) per probed *group* of saved tensors, with only that group quantized:
``c = ||g_noisy - g||**2 / sum_l S_l(b_l)`` is the group's sensitivity, given to each member.
Groups are runs of consecutive tensors in forward order (roughly a layer or block each) of about
equal size, at most ``probe_groups`` of them, so a probe costs ``1 + probe_groups * probe_draws``
backwards whatever the depth of the net; ``probe_groups=None`` probes tensor by tensor (at most
``max_probes`` per estimate after the first, round robin), the original, costlier scheme.
A progress bar shows when a probe runs longer than a couple of seconds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lowbit.act.gact import TensorStat, flat_grad
from lowbit.kernels import group_minmax

if TYPE_CHECKING:
    from lowbit.act.compressor import ActivationCompressor

_BAR_DELAY_S = 2.0  # show progress only for probes longer than this


class ProbeState:
    """What the hooks consult while a probe runs: which saved tensors to perturb and how."""

    def __init__(self) -> None:
        self.stats: dict[int, TensorStat] = {}
        self.noisy: frozenset[int] | str | None = None  # indices quantized in this backward, or "policy"
        self.bits: dict[int, int] = {}

    def record(self, index: int, base: torch.Tensor, group_size: int) -> None:
        """R_l (sum over groups of numel_g * range_g**2 / 4) and the lowest sensible width."""
        gs = group_size
        mins, maxs = group_minmax(base.detach().reshape(-1).float().contiguous(), gs)
        counts = torch.full_like(mins, float(gs))
        counts[-1] = base.numel() - gs * (len(mins) - 1)
        rsq = float((counts * (maxs - mins).pow(2)).sum()) / 4.0
        # ReLU-like tensors (groups with minimum exactly 0) lose their zeros at 1 bit: never go below 2
        min_bits = 2 if float((mins == 0).float().mean()) > 0.5 else 1
        self.stats[index] = TensorStat(numel=base.numel(), rsq=rsq, min_bits=min_bits)


def probe_groups(indices: list[int], stats: dict[int, TensorStat], groups: int | None) -> list[list[int]]:
    """Split ``indices`` (in forward order) into at most ``groups`` runs of about equal element
    count; ``None``: one group per tensor."""
    if groups is None or len(indices) <= groups:
        return [[i] for i in indices]
    total = sum(stats[i].numel for i in indices)
    out: list[list[int]] = [[]]
    acc = 0
    for i in indices:
        if out[-1] and acc >= total * len(out) / groups and len(out) < groups:
            out.append([])
        out[-1].append(i)
        acc += stats[i].numel
    return out


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, delay=_BAR_DELAY_S, leave=False)


def estimate(act: "ActivationCompressor", closure: Callable[[], torch.Tensor]) -> dict[int, float]:
    """Measure sensitivities on one batch (``closure`` runs a forward and returns the loss) and let
    ``act.policy`` re-decide; returns {index: c_l}. Buffers (BatchNorm running statistics) are
    put back afterwards, so the probe's forward does not count as a training step."""
    policy, model = act.policy, act.model
    if not policy.adaptive:
        raise RuntimeError(f"method {act.method!r} has nothing to estimate")
    if model is None:
        raise ValueError(f"{act.method} needs model= to measure sensitivities (the gradient w.r.t. its parameters)")
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not isinstance(v, nn.Parameter)}
    state = ProbeState()
    act._probe = state
    measured: dict[int, float] = {}
    draws = policy.probe_draws
    try:
        with act:
            loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise TypeError("the estimate closure must return the scalar loss of a forward pass (no backward)")
        exact = flat_grad(loss, params)
        grad_sq = float(exact.pow(2).sum())

        def error() -> float:
            return sum(float((flat_grad(loss, params) - exact).pow(2).sum()) for _ in range(draws)) / draws

        stats = state.stats
        order = policy.probe_order(sorted(stats))
        groups = probe_groups(order, stats, getattr(policy, "probe_groups", None))
        rounds = getattr(policy, "calibration_rounds", 0) if hasattr(policy, "calibrate") else 0
        with _progress(len(groups) + rounds, f"lowbit {act.method}: probing sensitivities") as bar:
            for group in groups:
                # probe where the decision is hardest: each tensor at its lowest allowed width
                state.bits = {i: policy.probe_bits or stats[i].min_bits for i in group}
                state.noisy = frozenset(group)
                variance = sum(stats[i].rsq / float((1 << state.bits[i]) - 1) ** 2 for i in group)
                c = error() / variance if variance > 0 else 0.0
                for i in group:
                    measured[i] = c
                bar.update(1)
            policy.update(stats, measured, grad_sq=grad_sq)
            if rounds:  # closed loop: the policy checks its whole setting
                state.noisy = "policy"

                def rel_error() -> float:
                    bar.update(1)
                    return (error() / max(grad_sq, 1e-30)) ** 0.5

                policy.calibrate(rel_error)
        del loss
    finally:
        act._probe = None
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in buffers:
                    v.copy_(buffers[k])
    return measured
