"""Sensitivity probe for adaptive policies (GACT, COMET): how much each saved tensor's
quantization noise moves the parameter gradient, measured on one batch.

One forward keeps every saved tensor exact (the probe records each one's group-range statistic
``R_l``, at the engine's layout and at the finer group sizes GACT may choose). Then, by
``probe_method``:

- "linear" (default, :func:`linear_sensitivities`): one backward with ``create_graph`` (its value
  is the exact gradient) and ``probe_draws`` double backwards give every saved tensor's own
  ``c_l`` from the linearised error, about three training steps in all whatever the depth (on
  the ResNet-18 and small GPT-2 / BERT / Llama configs). A model whose backward cannot be
  differentiated falls back to "sampled" with a warning.
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

import warnings
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lowbit.act.gact import NORM_INPUT_MIN_BITS, TensorStat, flat_grad, group_candidates
from lowbit.blocks import repeated_blocks
from lowbit.kernels import group_minmax

if TYPE_CHECKING:
    from lowbit.act.compressor import ActivationCompressor
    from lowbit.act.context import PolicyContext

_BAR_DELAY_S = 2.0  # show progress only for probes longer than this


class ProbeState:
    """What the hooks consult while a probe runs: which saved tensors to perturb and how."""

    def __init__(self, context: "PolicyContext | None" = None,
                 position: Callable[[str], str | None] | None = None, keeps_tensors: bool = False) -> None:
        self.stats: dict[int, TensorStat] = {}
        self.noisy: frozenset[int] | str | None = None  # indices quantized in this backward, or "policy"
        self.bits: dict[int, int] = {}
        self.context = context  # which module is running (needs the compressor's model=)
        self.position = position  # module name -> its place inside a repeated block (block_positions)
        self.saved: dict[int, torch.Tensor] = {}  # index -> the tensor autograd saved (with its graph)
        self.keeps_tensors = keeps_tensors  # the linear probe differentiates through the saved tensors
        self._held: set[int] = set()  # ids of the tensors in ``saved`` (alive while held there)

    def release(self) -> None:
        """Drop the saved tensors kept for the linear probe."""
        self.saved.clear()
        self._held.clear()

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is one of the saved tensors this probe keeps (one reference to it)."""
        return id(t) in self._held

    def record(self, index: int, base: torch.Tensor, group_size: int, saved: torch.Tensor | None = None) -> None:
        """R_l (sum over groups of numel_g * range_g**2 / 4), the role and the lowest sensible width.
        ``saved``: the tensor the op saved (``base`` is its storage), kept for the linear probe."""
        if self.keeps_tensors and saved is not None and saved.grad_fn is not None:
            self.saved[index] = saved
            self._held.add(id(saved))
        gs = group_size
        flat = base.detach().reshape(-1).float().contiguous()
        sizes = group_candidates(gs) if flat.numel() % gs == 0 else [gs]
        rsq_groups, mins = _group_rsq(flat, sizes)
        rsq = rsq_groups[gs]
        # ReLU-like tensors (groups with minimum exactly 0) lose their zeros at 1 bit: never go below 2
        min_bits = 2 if float((mins == 0).float().mean()) > 0.5 else 1
        role, position = "other", None
        if self.context is not None:
            name, module = self.context.current_module()
            if normalises_input(module):
                role = "norm_input"  # the only large tensor a normalisation layer saves is its input
                min_bits = max(min_bits, NORM_INPUT_MIN_BITS)
            position = self.position(name) if self.position is not None else None
        self.stats[index] = TensorStat(numel=base.numel(), rsq=rsq, min_bits=min_bits, role=role, position=position,
                                       rsq_groups=rsq_groups)


def _group_rsq(flat: torch.Tensor, sizes: list[int]) -> tuple[dict[int, float], torch.Tensor]:
    """({g: R at groups of g elements} for each of ``sizes``, the group minima at ``sizes[0]``).
    ``flat``: float32, 1-D. Sizes that all divide ``flat``'s length and are multiples of the
    smallest share one pass over the data; otherwise each is a pass (the last group may be short)."""
    out: dict[int, float] = {}
    finest = sizes[-1]
    if flat.numel() % sizes[0] == 0 and all(g % finest == 0 for g in sizes):
        lo, hi = torch.aminmax(flat.view(-1, finest), dim=1)
        for g in sizes:
            k = g // finest
            gl, gh = (lo, hi) if k == 1 else (lo.view(-1, k).amin(1), hi.view(-1, k).amax(1))
            out[g] = float(g * (gh - gl).pow(2).sum()) / 4.0
            if g == sizes[0]:
                mins = gl
        return out, mins
    for g in sizes:
        gl, gh = group_minmax(flat, g)
        counts = torch.full_like(gl, float(g))
        counts[-1] = flat.numel() - g * (len(gl) - 1)
        out[g] = float((counts * (gh - gl).pow(2)).sum()) / 4.0
        if g == sizes[0]:
            mins = gl
    return out, mins


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
    ``act.policy`` re-decide; returns {index: c_l}. ``policy.probe_method`` picks how: "linear"
    (one differentiable backward plus ``probe_draws`` double backwards, every tensor on its own,
    see :func:`linear_sensitivities`; falls back to "sampled" on a model whose backward cannot be
    differentiated) or "sampled" (one backward per probe group with the group quantized).
    Buffers (BatchNorm running statistics) are put back afterwards, so the probe's forward does
    not count as a training step."""
    policy, model = act.policy, act.model
    if not policy.adaptive:
        raise RuntimeError(f"method {act.method!r} has nothing to estimate")
    if model is None:
        raise ValueError(f"{act.method} needs model= to measure sensitivities (the gradient w.r.t. its parameters)")
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not isinstance(v, nn.Parameter)}
    method = getattr(policy, "probe_method", "sampled")
    state = ProbeState(act.context, block_positions(model), keeps_tensors=method == "linear")
    act._probe = state
    measured: dict[int, float] = {}
    draws = policy.probe_draws
    try:
        with act:
            loss = closure()
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise TypeError("the estimate closure must return the scalar loss of a forward pass (no backward)")
        stats = state.stats
        rounds = getattr(policy, "calibration_rounds", 0) if hasattr(policy, "calibrate") else 0
        exact = None
        if method == "linear":
            with _progress(1 + draws, f"lowbit {act.method}: probing sensitivities") as bar:
                try:
                    exact, measured = linear_sensitivities(act, loss, params, draws, bar)
                except RuntimeError as err:  # an op without a double backward: measure by sampling
                    if not any(w in str(err) for w in ("derivative", "differentiat", "not implemented")):
                        raise
                    warnings.warn(f"lowbit {act.method}: the backward of this model cannot be differentiated "
                                  f"({err}); sensitivities are sampled instead (slower)", RuntimeWarning, stacklevel=3)
                    state.noisy = None
        if exact is None:
            exact = flat_grad(loss, params)
        grad_sq = float(exact.pow(2).sum())

        def error() -> float:
            return sum(float((flat_grad(loss, params) - exact).pow(2).sum()) for _ in range(draws)) / draws

        groups = []
        if not measured:
            order = policy.probe_order(sorted(stats))
            groups = probe_groups(order, stats, getattr(policy, "probe_groups", None))
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


def linear_sensitivities(act: "ActivationCompressor", loss: torch.Tensor, params: list[torch.Tensor], draws: int,
                         bar=None) -> tuple[torch.Tensor, dict[int, float]]:
    """(exact flat gradient, {index: c_l}) from the linearised gradient error, for every saved
    tensor at once, at the cost of one differentiable backward and ``draws`` double backwards.

    The exact gradient ``g`` is computed with ``create_graph``, so it is a function of the saved
    copies backward read. ``J_l``, the derivative of ``g`` with respect to the saved copy of
    tensor ``l`` alone, is how its quantization noise moves the gradient (through every use of it
    in backward, including what that use propagates to the layers below). Stochastic rounding adds
    independent zero-mean noise of variance ``v_i`` to element ``i``, so ``E||e_l||**2 = sum_i v_i
    ||J_l[:, i]||**2``; for ``r ~ N(0, I)`` in parameter space ``E[(J_l^T r)_i**2] =
    ||J_l[:, i]||**2`` (Hutchinson), and ``J_l^T r`` for every ``l`` is one backward of ``r . g``,
    captured where it reaches each saved tensor. A saved copy's graph edge leads into the forward
    graph, where the derivative would pick up the other saved tensors computed from it; a hook on
    each saved tensor's node stops the flow there, so each capture holds its direct uses only.
    ``v_i`` is the exact stochastic-rounding variance at the width the tensor is probed at
    (``probe_bits`` or its lowest allowed width); ``c_l = E||e_l||**2 / S_l(b)``.

    Where it differs from sampling (measured on the ResNet-18 config and small nets): a threshold
    whose mask is read from a saved tensor (ReLU's backward) has no derivative, so positives
    rounded to zero are not seen (ReLU outputs come out at about 0.45 of the sampled value at 2
    bits; the width floor of 2 bits covers them); torch's double backward of a normalisation
    moves its statistics with the input while the compressor keeps them exact (norm inputs
    within about 0.6-4x of the sampled value, so rather over-protected); at 2 bits curvature
    (GELU) adds to the sampled error. A backward written without a graph (``once_differentiable``)
    contributes nothing. Tensors without a graph (saved constants) get no estimate (the allocator
    gives them the median)."""
    state, policy = act._probe, act.policy
    stats = state.stats
    indices = [i for i in sorted(state.saved) if i in stats]
    targets = [state.saved[i] for i in indices]
    state.release()  # the probe's own references go; ``targets`` holds them until the end
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    if bar is not None:
        bar.update(1)
    exact = torch.cat([(g.detach() if g is not None else torch.zeros_like(p)).reshape(-1)
                       for g, p in zip(grads, params)])
    live = [g for g in grads if g is not None and g.requires_grad]
    # stop the double backward at every computing node of the forward graph, so what reaches a
    # saved tensor comes from its own uses (and views of it), not from tensors computed from it
    handles = [node.register_prehook(_stop) for node in _forward_nodes(loss) if not _is_view(node)]
    weights: dict[int, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(act.config.seed * 1009 + getattr(policy, "estimates", 0))
    try:
        for _ in range(draws):
            if live and targets:
                dot = sum((g * torch.randn(g.shape, generator=gen, dtype=g.dtype)).sum() for g in live)
                caps = torch.autograd.grad(dot, targets, retain_graph=True, allow_unused=True)
                for i, j in zip(indices, caps):
                    if j is not None:
                        w = j.detach().float().pow(2) / draws
                        weights[i] = weights[i] + w if i in weights else w
            if bar is not None:
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
    del grads, live
    measured: dict[int, float] = {}
    for i, t in zip(indices, targets):
        bits = policy.probe_bits or stats[i].min_bits
        var = rounding_variance(t, bits, act.context.group_for(t, bits))
        w = weights.get(i)
        bound = stats[i].rsq / float((1 << bits) - 1) ** 2
        err = float((var * w.reshape(-1)).sum()) if w is not None else 0.0  # no gradient reads it: no error
        measured[i] = err / bound if bound > 0 else 0.0
    return exact, measured


def _forward_nodes(loss: torch.Tensor) -> list:
    """Every node of ``loss``'s autograd graph (leaves' accumulators left out)."""
    seen, stack, out = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ != "AccumulateGrad":
            out.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return out


_VIEW_NODES = ("View", "UnsafeView", "AsStrided", "Transpose", "Permute", "Expand", "Slice", "Select", "Unsqueeze",
               "Squeeze", "T", "ReshapeAlias", "Alias", "Split", "SplitWithSizes", "Unbind", "Narrow", "Diagonal",
               "Unfold", "Clone", "ToCopy", "Contiguous")


def _is_view(node) -> bool:
    """A node that only moves or casts values (a view, a copy): its input is the same tensor."""
    name = type(node).__name__
    base = name.rstrip("0123456789")
    base = base[: -len("Backward")] if base.endswith("Backward") else base
    return base in _VIEW_NODES


def _stop(grad_outputs: tuple) -> tuple:
    # undefined gradients: autograd's formulas skip a node whose incoming gradients are all
    # undefined, so the forward graph costs nothing in the double backward
    return tuple(None for _ in grad_outputs)


def rounding_variance(t: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per-element variance (flat float32, ``t.numel()``) of stochastic rounding of ``t`` to the
    per-group ``bits``-bit grid of :class:`lowbit.codecs.uniform.UniformCodec`: ``s**2 f (1 - f)``
    with ``s`` the group's step and ``f`` the element's fractional position between grid points."""
    x = t.detach().reshape(-1).float()
    n = x.numel()
    pad = -n % group_size
    if pad:  # the last group is short: pad it with its own first element (changes no min or max)
        x = torch.cat([x, x[n - (n % group_size)].expand(pad)])
    g = x.view(-1, group_size)
    lo, hi = torch.aminmax(g, dim=1, keepdim=True)
    step = (hi - lo) / float((1 << bits) - 1)
    f = (g - lo).div_(step.clamp_min(1e-30))
    f.sub_(f.floor())
    f.mul_(1 - f).mul_(step * step)  # in place: the probe runs this on every saved tensor
    return f.reshape(-1)[:n]
