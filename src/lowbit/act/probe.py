"""Sensitivity probe for adaptive policies (GACT, COMET): how much each saved tensor's
quantization noise moves the parameter gradient, measured on one batch.

One forward records every saved tensor's group-range statistic ``R_l`` (at the engine's layout
and at the finer group sizes GACT may choose) and stores the tensor at 8 bits, so that the
probe holds a quarter of what plain autograd holds; the gradient of that forward is the
reference the errors are measured against. Then, by ``probe_method``:

- "linear" (default, :mod:`lowbit.act.probe_linear`): the derivative of the gradient with respect
  to each saved tensor, by a double backward walked segment by segment (the repeated blocks),
  every tensor inside or below the blocks on its own, one block's graphs in memory at a time;
  the few tensors above the blocks (a head, the loss) are sampled. A model without repeated
  blocks is one segment (its whole backward differentiated at once). A model whose blocks do not
  form a chain, or whose backward cannot be differentiated, is sampled with a warning.
- "sampled": one backward gives the exact gradient, then one extra backward (the graph is
  retained, so no extra forward) per probed *group* of saved tensors, with only that group
  quantized: ``c = ||g_noisy - g||**2 / sum_l S_l(b_l)`` is the group's sensitivity, given to each
  member. Groups: tensors saved at the same place of a repeated block (the input of every
  GPT2Block's ``ln_2``, every ResNet basic layer's first convolution, ...) form one group, shared
  by every copy of the block, so a probe costs ``1 + (places per block + outside groups) *
  probe_draws`` backwards whatever the depth of the net (16 groups on a Llama). Tensors outside
  repeated blocks are cut into at most ``probe_groups`` runs of consecutive tensors of about
  equal size per role. ``probe_groups=None`` probes tensor by tensor (at most ``max_probes`` per
  estimate after the first, round robin).

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

from lowbit.act.gact import NORM_INPUT_MIN_BITS, TensorStat, group_candidates
from lowbit.act.norms import normalises_input, uses_batch_statistics
from lowbit.act.probe_linear import (ChainError, LinearProbe, SegmentRecorder, probe_segments, rounding_variance,
                                     warn_sampling)
from lowbit.blocks import repeated_blocks
from lowbit.codecs import Packed, UniformCodec
from lowbit.kernels import group_minmax

__all__ = ["ProbeState", "estimate", "probe_groups", "block_positions", "normalises_input", "uses_batch_statistics",
           "rounding_variance"]

if TYPE_CHECKING:
    from lowbit.act.compressor import ActivationCompressor
    from lowbit.act.context import PolicyContext

_BAR_DELAY_S = 2.0  # show progress only for probes longer than this


class ProbeState:
    """What the compressor's hooks consult while a probe runs: how to store the saved tensors,
    which ones to perturb and how, and which numbers the saves inside each block get."""

    STORE_BITS = 8

    def __init__(self, context: "PolicyContext | None" = None,
                 position: Callable[[str], str | None] | None = None, recorder: SegmentRecorder | None = None) -> None:
        self.stats: dict[int, TensorStat] = {}
        self.noisy: frozenset[int] | str | None = None  # indices quantized in this backward, "policy" or "values"
        self.bits: dict[int, int] = {}
        self.context = context  # which module is running (needs the compressor's model=)
        self.position = position  # module name -> its place inside a repeated block (block_positions)
        self.recorder = recorder  # the linear probe's segment hooks
        self.values: list[tuple[int, torch.Tensor]] = []  # ("values" mode) the saved tensors handed out
        self.codec = UniformCodec(bits=self.STORE_BITS, rounding="nearest")  # deterministic: no random state used

    def note_pack(self, index: int | None, t: torch.Tensor) -> None:
        """The compressor numbered the save of ``t`` ``index`` (None: not a float tensor it encodes)."""
        if self.recorder is not None:
            self.recorder.note_pack(index, t)

    def store(self, base: torch.Tensor, context: "PolicyContext") -> Packed:
        """``base`` as the probe holds it until its backwards are done (8 bits, nearest rounding)."""
        return self.codec.encode(base, bits=self.STORE_BITS, group_size=context.group_for(base, self.STORE_BITS))

    def record(self, index: int, base: torch.Tensor, group_size: int) -> None:
        """R_l (sum over groups of numel_g * range_g**2 / 4), the role and the lowest sensible width."""
        gs = group_size
        flat = base.detach().reshape(-1).float().contiguous()
        sizes = group_candidates(gs) if flat.numel() % gs == 0 else [gs]
        rsq_groups, zero_min = _group_rsq(flat, sizes)
        rsq = rsq_groups[gs]
        # ReLU-like tensors (groups with minimum exactly 0) lose their zeros at 1 bit: never go below 2
        min_bits = 2 if zero_min > 0.5 else 1
        role, position = "other", None
        if self.context is not None:
            name, module = self.context.current_module()
            if normalises_input(module):
                role = "norm_input"  # the only large tensor a normalisation layer saves is its input
                min_bits = max(min_bits, NORM_INPUT_MIN_BITS)
            position = self.position(name) if self.position is not None else None
        self.stats[index] = TensorStat(numel=base.numel(), rsq=rsq, min_bits=min_bits, role=role, position=position,
                                       rsq_groups=rsq_groups)


_RSQ_CHUNK = 1 << 22  # elements per pass: the statistics of a logits-sized tensor in bounded workspace


def _group_rsq(flat: torch.Tensor, sizes: list[int]) -> tuple[dict[int, float], float]:
    """({g: R at groups of g elements} for each of ``sizes``, the fraction of the groups of
    ``sizes[0]`` whose minimum is 0). ``flat``: float32, 1-D. Sizes that all divide ``flat``'s
    length and are multiples of the smallest share one pass over the data, in chunks; otherwise
    each is a pass (the last group may be short)."""
    out = dict.fromkeys(sizes, 0.0)
    finest, first = sizes[-1], sizes[0]
    zeros = 0
    if flat.numel() % first == 0 and all(g % finest == 0 for g in sizes):
        step = max(_RSQ_CHUNK // max(sizes) * max(sizes), max(sizes))
        for s in range(0, flat.numel(), step):
            lo, hi = torch.aminmax(flat[s:s + step].view(-1, finest), dim=1)
            for g in sizes:
                k = g // finest
                gl, gh = (lo, hi) if k == 1 else (lo.view(-1, k).amin(1), hi.view(-1, k).amax(1))
                out[g] += float(g * (gh - gl).pow(2).sum()) / 4.0
                if g == first:
                    zeros += int((gl == 0).sum())
        return out, zeros / (flat.numel() // first)
    for g in sizes:
        gl, gh = group_minmax(flat, g)
        counts = torch.full_like(gl, float(g))
        counts[-1] = flat.numel() - g * (len(gl) - 1)
        out[g] = float((counts * (gh - gl).pow(2)).sum()) / 4.0
        if g == first:
            zeros = float((gl == 0).float().mean())
    return out, zeros


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


class _Resample(Exception):
    """The walk over the blocks failed after the probe's graph was released: sample afresh."""


def estimate(act: "ActivationCompressor", closure: Callable[[], torch.Tensor], sampled: bool = False) -> dict[int, float]:
    """Measure sensitivities on one batch (``closure`` runs a forward and returns the loss) and let
    ``act.policy`` re-decide; returns {index: c_l}. ``policy.probe_method`` picks how: "linear"
    (the double backward segment by segment, :mod:`lowbit.act.probe_linear`; the tensors above the
    blocks, and every tensor of a model it cannot walk, are sampled) or "sampled" (one backward
    per probe group with the group quantized). Buffers (BatchNorm running statistics) are put back
    afterwards, so the probe's forward does not count as a training step."""
    policy, model = act.policy, act.model
    if not policy.adaptive:
        raise RuntimeError(f"method {act.method!r} has nothing to estimate")
    if model is None:
        raise ValueError(f"{act.method} needs model= to measure sensitivities (the gradient w.r.t. its parameters)")
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = [(b, b.clone()) for b in model.buffers()]  # BatchNorm's running statistics (not the parameters)
    linear = getattr(policy, "probe_method", "sampled") == "linear" and not sampled
    recorder = SegmentRecorder(probe_segments(model)).attach(model) if linear else None
    state = ProbeState(act.context, block_positions(model), recorder)
    act._probe = state
    measured: dict[int, float] = {}
    draws = policy.probe_draws
    try:
        with act:
            loss = closure()
        if recorder is not None:
            recorder.detach()
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise TypeError("the estimate closure must return the scalar loss of a forward pass (no backward)")
        stats = state.stats
        rounds = getattr(policy, "calibration_rounds", 0) if hasattr(policy, "calibrate") else 0
        linear = None
        with _progress(1, f"lowbit {act.method}: probing sensitivities") as bar:
            reference = _Reference(loss, params, state.codec)  # the graph stays for the probes below
            bar.update(1)
            if recorder is not None:
                linear = _linear_start(act, recorder, params, draws)
        grad_sq = reference.sq

        def error() -> float:
            return sum(reference.error(loss, params) for _ in range(draws)) / draws

        reached = linear.reached if linear is not None else set()
        order = policy.probe_order([i for i in sorted(stats) if i not in reached])
        groups = probe_groups(order, stats, getattr(policy, "probe_groups", None))
        segments = len(recorder.segments) if linear is not None else 0
        with _progress(len(groups) + segments + rounds, f"lowbit {act.method}: probing sensitivities") as bar:
            for group in groups:
                # probe where the decision is hardest: each tensor at its lowest allowed width
                state.bits = {i: policy.probe_bits or stats[i].min_bits for i in group}
                state.noisy = frozenset(group)
                variance = sum(stats[i].rsq / float((1 << state.bits[i]) - 1) ** 2 for i in group)
                c = error() / variance if variance > 0 else 0.0
                for i in group:
                    measured[i] = c
                bar.update(1)
            state.noisy = None
            if linear is not None:
                if not rounds:  # nothing needs the probe's graph or the reference any more: the replays run without them
                    del loss, reference
                measured.update(_linear_finish(act, linear, bar))
            policy.update(stats, measured, grad_sq=grad_sq)
            if rounds:  # closed loop: the policy checks its whole setting
                state.noisy = "policy"

                def rel_error() -> float:
                    bar.update(1)
                    return (error() / max(grad_sq, 1e-30)) ** 0.5

                policy.calibrate(rel_error)
        loss = reference = None
    except _Resample:
        resample = True
    else:
        resample = False
    finally:
        act._probe = None
        if recorder is not None:
            recorder.release()
        with torch.no_grad():
            for b, kept in buffers:
                b.copy_(kept)
    if resample:  # another forward, every tensor sampled
        return estimate(act, closure, sampled=True)
    return measured


def _stream(loss: torch.Tensor, params: list[torch.Tensor], consume: Callable[[int, torch.Tensor], None]) -> None:
    """One backward of ``loss`` (graph kept) handing ``consume(i, g)`` each parameter's gradient as
    soon as it is complete; nothing is accumulated into ``.grad`` and no gradient outlives its
    call, so the backward holds less than a plain one (which keeps every parameter's gradient)."""
    handles = []

    def hook(i: int):
        def take(grads: tuple) -> tuple:
            if grads[0] is not None:
                consume(i, grads[0])
            return (None,)  # an undefined gradient: AccumulateGrad leaves .grad alone

        return take

    for i, p in enumerate(params):
        handles.append(torch.autograd.graph.get_gradient_edge(p).node.register_prehook(hook(i)))
    try:
        torch.autograd.backward(loss, inputs=params, retain_graph=True)
    finally:
        for h in handles:
            h.remove()


class _Reference:
    """The probe's reference gradient, held at 8 bits per group of 256 (a quarter of a float
    copy). :meth:`error` streams a probed backward's gradients against it: ``||g - reference||**2``
    less the storage's own known error, which estimates the error against the float reference
    without bias (their cross term has zero mean)."""

    _RAW_BELOW = 4096  # small parameters (biases, norms' weights) are kept in float

    def __init__(self, loss: torch.Tensor, params: list[torch.Tensor], codec: UniformCodec) -> None:
        self.codec = codec
        self.sq = 0.0
        self.own_error = 0.0
        self.stored: list = [None] * len(params)  # None: no gradient reaches the parameter
        _stream(loss, params, self._keep)

    def _keep(self, i: int, g: torch.Tensor) -> None:
        self.sq += float(torch.linalg.vector_norm(g)) ** 2
        if g.numel() < self._RAW_BELOW or not g.dtype.is_floating_point:
            self.stored[i] = g.detach().clone()
            return
        packed = self.codec.encode(g, bits=8, group_size=256)
        self.own_error += float(torch.linalg.vector_norm(self.codec.decode(packed).sub_(g))) ** 2
        self.stored[i] = packed

    def _value(self, i: int) -> torch.Tensor:
        ref = self.stored[i]
        return ref if isinstance(ref, torch.Tensor) else self.codec.decode(ref)

    def error(self, loss: torch.Tensor, params: list[torch.Tensor]) -> float:
        """``||g - g_ref||**2`` for the gradient ``g`` of a backward of ``loss`` as it is now set up."""
        total, seen = 0.0, set()

        def compare(i: int, g: torch.Tensor) -> None:
            nonlocal total
            seen.add(i)
            ref = self._value(i) if self.stored[i] is not None else torch.zeros_like(g)
            total += float(torch.linalg.vector_norm(g - ref)) ** 2  # not in place: a gradient may be shared

        _stream(loss, params, compare)
        total += sum(float(torch.linalg.vector_norm(self._value(i))) ** 2
                     for i, ref in enumerate(self.stored) if ref is not None and i not in seen)
        return max(total - self.own_error, 0.0)


def _linear_start(act: "ActivationCompressor", recorder: SegmentRecorder, params: list[torch.Tensor],
                  draws: int) -> LinearProbe | None:
    """The linear probe, its part below the blocks done; None (with a warning) when it cannot walk
    the model, so that every tensor is sampled."""
    seed = act.config.seed * 1009 + getattr(act.policy, "estimates", 0)
    try:
        probe = LinearProbe(act, recorder, params, draws, seed)
        probe.below()
        return probe
    except (ChainError, RuntimeError) as err:
        _fallback(act, err)
        return None
    finally:
        act._probe.noisy = None


def _linear_finish(act: "ActivationCompressor", probe: LinearProbe, bar) -> dict[int, float]:
    """{index: c_l} from the walk over the blocks (raises :class:`_Resample`, with a warning, when
    it fails: the estimate is then made again by sampling)."""
    policy, stats = act.policy, act._probe.stats
    try:
        errors = probe.sweep(bar)
    except (ChainError, RuntimeError) as err:  # the graph is gone: the estimate starts again, sampling
        _fallback(act, err)
        raise _Resample from err
    out: dict[int, float] = {}
    for i, err in errors.items():
        bits = policy.probe_bits or stats[i].min_bits
        bound = stats[i].rsq / float((1 << bits) - 1) ** 2
        out[i] = err / bound if bound > 0 else 0.0
    return out


def _fallback(act: "ActivationCompressor", err: Exception) -> None:
    if isinstance(err, ChainError):
        warn_sampling(act.method, str(err))
    elif any(w in str(err) for w in ("derivative", "differentiat", "not implemented")):  # no double backward
        warn_sampling(act.method, f"its backward cannot be differentiated: {err}")
    else:
        raise err


