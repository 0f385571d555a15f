"""GACT: per-tensor bit widths from each saved tensor's measured gradient sensitivity.

Linearised model of the gradient error (GACT, ICML 2022): quantizing saved tensor ``l`` at
``b`` bits adds gradient variance ``c_l * S_l(b)`` with

    S_l(b) = R_l / (2**b - 1)**2,   R_l = sum over groups of numel_g * range_g**2 / 4,

the stochastic-rounding variance of the tensor, and ``c_l`` its sensitivity. Every
``interval`` steps the sensitivities are measured on one batch (:mod:`lowbit.act.probe`). The
default probe, ``probe_method="linear"``, differentiates the backward itself, block by block
(:mod:`lowbit.act.probe_linear`): double backwards of ``r . g`` (random ``r``, ``probe_draws``
of them) give every saved tensor's own effect on the gradient, so every tensor gets its own
``c_l``, with one block's graphs in memory at a time. ``probe_method=
"sampled"`` (the original scheme) runs one extra backward per probed group of tensors
(``probe_groups``) with only that group quantized at ``probe_bits`` (default: the lowest width it
may get) and gives ``c = ||g_noisy - g||**2 / sum_l S_l(b_l)`` to every member. Estimates are
smoothed over time (``momentum``).

Bits are then allocated to minimise ``sum_l c_l S_l(b_l)`` subject to
``sum_l b_l numel_l <= budget * sum_l numel_l``, greedily by variance reduction per extra bit,
above per-tensor floors: 2 bits for ReLU-like tensors (1 bit would lose their zeros) and for the
input of a BatchNorm on batch statistics (train mode; :data:`NORM_INPUT_MIN_BITS`), which the
probe also measures apart from the other tensors (see :mod:`lowbit.act.probe`).

Group sizes: the variance of a tensor at ``b`` bits scales with its groups' ranges, which finer
groups cut, at 32 bits of metadata (float16 minimum and scale) per group. With ``meta_bits`` (bits
of metadata per element on average, default 1.0) the allocator then splits the groups of the
tensors stored at 2 bits or fewer where that removes the most variance per metadata bit
(:func:`allocate_groups`); ``average_bits`` still counts code bits only. On the ResNet-18 config
in train mode (96x96 Fashion-MNIST, batch 16) this takes GACT at 2 bits from a gradient cosine of
0.90 at 12.6x to 0.95 at 9.7x (``benchmarks/act_engine/train_mode_cosine.py``).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from lowbit.act.policy import Policy, register_policy
from lowbit.codecs.uniform import SUPPORTED_BITS


# Lowest width for the input of a BatchNorm that normalises with batch statistics (train mode).
# Its backward recomputes x_hat from the saved input and multiplies it by mean(g * x_hat), so the
# input's noise, scaled by 1/std, reaches the gradient of every layer below it (up to the stem).
# Measured on the ResNet-18 config (96x96, batch 16): the stem's BatchNorm input alone moves the
# gradient by a relative squared error of 0.48 at 1 bit and 0.05 at 2 bits.
NORM_INPUT_MIN_BITS = 2

# How the probe measures sensitivities (lowbit.act.probe): "linear" differentiates the backward
# (every tensor on its own, about three training steps), "sampled" runs one backward per probe group.
PROBE_METHODS = ("linear", "sampled")


@dataclass
class TensorStat:
    numel: int
    rsq: float  # R_l: sum over groups of numel_g * range_g**2 / 4
    sensitivity: float | None = None
    min_bits: int = 1  # lowest width allowed (2 for ReLU-like tensors, whose zeros 1 bit cannot keep,
    # and for train-mode BatchNorm inputs, NORM_INPUT_MIN_BITS)
    role: str = "other"  # "norm_input" (saved by a normalisation layer, lowbit.act.probe.normalises_input) or "other"
    position: str | None = None  # place inside a repeated block ("GPT2Block.attn"), None outside blocks
    rsq_groups: dict[int, float] = field(default_factory=dict)  # R_l at each candidate group size (largest:
    # the engine's layout at 2 bits, the others split its groups; see group_candidates)


def allocate_bits(stats: dict[int, TensorStat], budget: float, choices=SUPPORTED_BITS) -> dict[int, int]:
    """Greedy bit allocation: start every tensor at its lowest allowed width (``min_bits``, rounded
    up to a width in ``choices``), then repeatedly take the upgrade with the largest variance
    reduction per extra stored bit that still fits the budget ``sum b_l numel_l <= budget * sum
    numel_l``. Tensors without a sensitivity estimate get the median sensitivity of the others.
    The floors win over the budget: when they alone exceed it, every tensor stays at its floor."""
    choices = sorted(choices)
    if budget < choices[0]:
        raise ValueError(f"average-bits budget {budget} is below the smallest width {choices[0]}")
    known = sorted(s.sensitivity for s in stats.values() if s.sensitivity is not None)
    fallback = known[len(known) // 2] if known else 1.0

    def var(i: int, b: int) -> float:
        s = stats[i]
        c = s.sensitivity if s.sensitivity is not None else fallback
        return c * s.rsq / float((1 << b) - 1) ** 2

    level = {i: next(k for k, b in enumerate(choices) if b >= s.min_bits) for i, s in stats.items()}
    total = sum(s.numel for s in stats.values())
    spent = sum(choices[level[i]] * s.numel for i, s in stats.items())
    limit = budget * total
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        k = level[i]
        if k + 1 < len(choices):
            gain = var(i, choices[k]) - var(i, choices[k + 1])
            cost = (choices[k + 1] - choices[k]) * stats[i].numel
            heapq.heappush(heap, (-gain / max(cost, 1), i))

    for i in stats:
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        k = level[i]
        cost = (choices[k + 1] - choices[k]) * stats[i].numel
        if spent + cost <= limit:
            spent += cost
            level[i] = k + 1
            push(i)
    return {i: choices[k] for i, k in level.items()}


# Bits of group metadata per group (float16 minimum and scale) that allocate_groups charges.
GROUP_META_BITS = 32


def group_candidates(default: int, finest: int = 8, count: int = 4) -> list[int]:
    """Group sizes the allocator may give a tensor whose engine layout (at 2 bits) has groups of
    ``default`` elements: ``default`` and up to ``count - 1`` finer sizes, each the largest divisor
    of ``default`` at most half the previous one and at least ``finest``, so a finer group never
    straddles two of the engine's groups (a channel plane, a token row). Largest first."""
    out = [default]
    while len(out) < count:
        target = out[-1] // 2
        d = next((d for d in range(target, finest - 1, -1) if default % d == 0), None)
        if d is None:
            break
        out.append(d)
    return out


def allocate_groups(stats: dict[int, TensorStat], bits: dict[int, int], meta_bits: float,
                    max_bits: int = 2) -> dict[int, int]:
    """Group sizes for the tensors stored at ``max_bits`` bits or fewer: greedily, the split with
    the largest variance reduction (``c_l * R_l(g) / (2**b - 1)**2``) per extra metadata bit while
    the metadata of every tensor (``GROUP_META_BITS`` per group; tensors not listed counted at
    their largest candidate) stays within ``meta_bits`` per element on average. Tensors without
    candidates or not split keep their largest candidate (the engine's layout); returns
    {index: group size} for the tensors given a finer one."""
    known = sorted(s.sensitivity for s in stats.values() if s.sensitivity is not None)
    fallback = known[len(known) // 2] if known else 1.0
    total = sum(s.numel for s in stats.values())
    limit = meta_bits * total
    choice: dict[int, int] = {}  # index -> position in its candidate list
    options: dict[int, list[int]] = {}
    spent = 0.0
    for i, s in stats.items():
        sizes = sorted(s.rsq_groups, reverse=True)
        default = sizes[0] if sizes else None
        spent += s.numel * GROUP_META_BITS / default if default else 0.0
        if sizes and len(sizes) > 1 and bits.get(i, max_bits + 1) <= max_bits:
            options[i], choice[i] = sizes, 0
    heap: list[tuple[float, int]] = []

    def var(i: int, k: int) -> float:
        s = stats[i]
        c = s.sensitivity if s.sensitivity is not None else fallback
        return c * s.rsq_groups[options[i][k]] / float((1 << bits[i]) - 1) ** 2

    def cost(i: int, k: int) -> float:
        n, sizes = stats[i].numel, options[i]
        return n * GROUP_META_BITS * (1.0 / sizes[k + 1] - 1.0 / sizes[k])

    def push(i: int) -> None:
        k = choice[i]
        if k + 1 < len(options[i]):
            heapq.heappush(heap, (-(var(i, k) - var(i, k + 1)) / max(cost(i, k), 1e-9), i))

    for i in options:
        push(i)
    while heap:
        gain, i = heapq.heappop(heap)
        k = choice[i]
        if -gain <= 0:
            break
        if spent + cost(i, k) <= limit:
            spent += cost(i, k)
            choice[i] = k + 1
            push(i)
    return {i: options[i][k] for i, k in choice.items() if k > 0}


@register_policy("gact")
class GactPolicy(Policy):
    """Adaptive per-tensor widths under an average-bits budget (``bits``, may be fractional)."""

    adaptive = True

    def __init__(
        self,
        bits: float | None = 2,
        interval: int = 100,
        probe_bits: int | None = None,
        probe_draws: int = 1,
        max_probes: int = 16,
        momentum: float = 0.5,
        probe_groups: int | None = 6,
        probe_method: str = "linear",
        meta_bits: float | None = 1.0,
    ):
        self.bits = 2.0 if bits is None else float(bits)
        if not (min(SUPPORTED_BITS) <= self.bits <= max(SUPPORTED_BITS)):
            raise ValueError(f"gact average bits must be within {SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]}, got {bits}")
        if interval < 1 or max_probes < 1 or probe_draws < 1:
            raise ValueError("interval, max_probes and probe_draws must be >= 1")
        if probe_groups is not None and (isinstance(probe_groups, bool) or not isinstance(probe_groups, int) or probe_groups < 1):
            raise ValueError(f"probe_groups must be a positive integer or None (tensor by tensor), got {probe_groups!r}")
        if probe_method not in PROBE_METHODS:
            raise ValueError(f"probe_method must be one of {PROBE_METHODS}, got {probe_method!r}")
        self.probe_method = probe_method
        if meta_bits is not None and (isinstance(meta_bits, bool) or not isinstance(meta_bits, (int, float))
                                      or meta_bits < 0):
            raise ValueError(f"meta_bits must be a number >= 0 (metadata bits per element) or None, got {meta_bits!r}")
        self.meta_bits = meta_bits
        self.groups: dict[int, int] = {}  # index -> group size finer than the engine's layout
        self.probe_groups = probe_groups
        self.interval = interval
        self.probe_bits = probe_bits
        self.probe_draws = probe_draws
        self.max_probes = max_probes
        self.momentum = momentum
        self.default_bits = max(b for b in SUPPORTED_BITS if b <= self.bits)
        self.stats: dict[int, TensorStat] = {}
        self.assigned: dict[int, int] = {}
        self.estimates = 0
        self._cursor = 0

    def bits_for(self, index: int, t: torch.Tensor) -> int | None:
        return self.assigned.get(index, self.default_bits)

    def encode(self, index: int, t: torch.Tensor, ctx):
        bits = self.bits_for(index, t)
        group = self.groups.get(index)
        if group is None or t.numel() % group or ctx.group_for(t, bits) % group:
            return super().encode(index, t, ctx)  # no finer group (or another tensor at this index): the engine's layout
        return ctx.uniform_codec.encode(t, bits=bits, group_size=group)

    def describe(self) -> str:
        return f"gact {self.bits:g}-bit avg"

    def due(self, step: int) -> bool:
        return step % self.interval == 0

    def probe_order(self, indices: list[int]) -> list[int]:
        """All indices when probing by groups or on the first estimate, then (tensor by tensor)
        ``max_probes`` of them round robin."""
        if self.probe_groups is not None or self.estimates == 0 or len(indices) <= self.max_probes:
            return indices
        start = self._cursor % len(indices)
        self._cursor += self.max_probes
        return [indices[(start + k) % len(indices)] for k in range(self.max_probes)]

    def update(self, stats: dict[int, TensorStat], measured: dict[int, float], **_) -> None:
        self.smooth(stats, measured)
        self.assigned = allocate_bits(stats, self.bits)
        self.groups = allocate_groups(stats, self.assigned, self.meta_bits) if self.meta_bits is not None else {}
        self.estimates += 1

    def smooth(self, stats: dict[int, TensorStat], measured: dict[int, float]) -> None:
        """Fold the new measurements into each tensor's sensitivity (exponential moving average);
        tensors not probed this time keep their previous estimate."""
        for i, s in stats.items():
            old = self.stats.get(i)
            c = measured.get(i)
            if c is not None and old is not None and old.sensitivity is not None:
                c = self.momentum * old.sensitivity + (1 - self.momentum) * c
            elif c is None and old is not None:
                c = old.sensitivity
            s.sensitivity = c
        self.stats = stats


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
