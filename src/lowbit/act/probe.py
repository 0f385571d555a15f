"""Sensitivity probe for adaptive policies (GACT, COMET): how much each saved tensor's
quantization noise moves the parameter gradient, measured on one batch.

One forward keeps every saved tensor exact (the probe records each one's group-range statistic
``R_l``), one backward gives the exact gradient, then one extra backward (the graph is retained,
so no extra forward) per probed *group* of saved tensors, with only that group quantized:
``c = ||g_noisy - g||**2 / sum_l S_l(b_l)`` is the group's sensitivity, given to each member.
Groups: tensors saved at the same place of a repeated block (the input of every GPT2Block's
``ln_2``, every ResNet basic layer's first convolution, ...) form one group, shared by every copy
of the block, so a probe costs ``1 + (places per block + outside groups) * probe_draws``
backwards whatever the depth of the net (16 groups on a Llama). Tensors outside repeated
blocks are cut into at most ``probe_groups`` runs of consecutive tensors of about equal size per
role. ``probe_groups=None`` probes tensor by tensor (at most ``max_probes`` per estimate after the
first, round robin), the original, costlier scheme.

Roles: the input of a normalisation layer (BatchNorm on batch statistics, LayerNorm, GroupNorm,
RMSNorm: :func:`normalises_input`) is probed apart from every other tensor. Its sensitivity per
unit of quantization variance is orders of magnitude above a ReLU output's (its backward divides
by the statistics of that input), so a group mixing both would hand one averaged sensitivity to
both and under-protect the norm inputs. Such inputs also get a width floor
(:data:`lowbit.act.gact.NORM_INPUT_MIN_BITS`). The probe runs in the mode the model is in when
it is called: probe a model that trains in train mode in train mode (``act.step`` right after
the training step does).

A progress bar shows when a probe runs longer than a couple of seconds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lowbit.act.gact import NORM_INPUT_MIN_BITS, TensorStat, flat_grad
from lowbit.blocks import repeated_blocks
from lowbit.kernels import group_minmax

if TYPE_CHECKING:
    from lowbit.act.compressor import ActivationCompressor
    from lowbit.act.context import PolicyContext

_BAR_DELAY_S = 2.0  # show progress only for probes longer than this


class ProbeState:
    """What the hooks consult while a probe runs: which saved tensors to perturb and how."""

    def __init__(self, context: "PolicyContext | None" = None,
                 position: Callable[[str], str | None] | None = None) -> None:
        self.stats: dict[int, TensorStat] = {}
        self.noisy: frozenset[int] | str | None = None  # indices quantized in this backward, or "policy"
        self.bits: dict[int, int] = {}
        self.context = context  # which module is running (needs the compressor's model=)
        self.position = position  # module name -> its place inside a repeated block (block_positions)

    def record(self, index: int, base: torch.Tensor, group_size: int) -> None:
        """R_l (sum over groups of numel_g * range_g**2 / 4), the role and the lowest sensible width."""
        gs = group_size
        mins, maxs = group_minmax(base.detach().reshape(-1).float().contiguous(), gs)
        counts = torch.full_like(mins, float(gs))
        counts[-1] = base.numel() - gs * (len(mins) - 1)
        rsq = float((counts * (maxs - mins).pow(2)).sum()) / 4.0
        # ReLU-like tensors (groups with minimum exactly 0) lose their zeros at 1 bit: never go below 2
        min_bits = 2 if float((mins == 0).float().mean()) > 0.5 else 1
        role, position = "other", None
        if self.context is not None:
            name, module = self.context.current_module()
            if normalises_input(module):
                role = "norm_input"  # the only large tensor a normalisation layer saves is its input
                min_bits = max(min_bits, NORM_INPUT_MIN_BITS)
            position = self.position(name) if self.position is not None else None
        self.stats[index] = TensorStat(numel=base.numel(), rsq=rsq, min_bits=min_bits, role=role, position=position)


def block_positions(model: nn.Module) -> Callable[[str], str | None]:
    """``name -> position``: for a module inside one of ``model``'s repeated blocks
    (:func:`lowbit.blocks.repeated_blocks`), the block's class and the path inside it
    ("LlamaDecoderLayer.self_attn"), the same in every copy of the block; None elsewhere."""
    blocks = [(name, type(block).__name__) for name, block in repeated_blocks(model)]

    def position(name: str) -> str | None:
        for prefix, kind in blocks:
            if name == prefix or name.startswith(prefix + "."):
                return kind + name[len(prefix):]
        return None

    return position


def normalises_input(module: nn.Module | None) -> bool:
    """True for a layer whose backward divides by statistics of its own input: a BatchNorm on batch
    statistics (:func:`uses_batch_statistics`), LayerNorm, GroupNorm, RMSNorm (torch's, or a
    ``transformers`` ``*RMSNorm`` / ``*LayerNorm`` class such as ``LlamaRMSNorm``)."""
    if module is None:
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return uses_batch_statistics(module)
    norms = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    return isinstance(module, norms) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def uses_batch_statistics(module: nn.Module | None) -> bool:
    """True for a BatchNorm (1d/2d/3d, SyncBatchNorm, lazy) that normalises with the statistics of
    the batch: in train mode, or without running statistics."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return module.training or module.running_mean is None


def probe_groups(indices: list[int], stats: dict[int, TensorStat], groups: int | None) -> list[list[int]]:
    """Probe groups, in forward order of first appearance; ``None``: one group per tensor.

    Tensors saved at the same place of a repeated block (``TensorStat.position``, e.g. the input
    of every LlamaDecoderLayer's post-attention norm) and of the same role form one group: they
    share a sensitivity per unit of noise far better than neighbours of different kinds do.
    Tensors outside repeated blocks are split by role (``TensorStat.role``) into at most
    ``groups`` runs of about equal element count each. A group never mixes roles."""
    if groups is None:
        return [[i] for i in indices]
    keys: dict[tuple[str, str | None], list[int]] = {}
    for i in indices:
        keys.setdefault((stats[i].role, stats[i].position), []).append(i)
    return [g for (_, position), members in keys.items()
            for g in ([members] if position is not None else _runs(members, stats, groups))]


def _runs(indices: list[int], stats: dict[int, TensorStat], groups: int) -> list[list[int]]:
    """``indices`` cut into at most ``groups`` runs of consecutive tensors of about equal element count."""
    if len(indices) <= groups:
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
    state = ProbeState(act.context, block_positions(model))
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
