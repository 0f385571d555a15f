"""GACT's linear sensitivity probe, segment by segment, in bounded memory.

What it measures: the gradient error that stochastic rounding of one saved tensor ``l`` causes,
linearised. ``g`` (the parameter gradient) is a function of the saved tensors backward reads;
``J_l`` is its derivative with respect to tensor ``l``. Rounding adds independent zero-mean noise
of variance ``v_i`` to element ``i``, so ``E||e_l||**2 = sum_i v_i ||J_l[:, i]||**2``, and for
``r ~ N(0, I)`` in parameter space ``E[(J_l^T r)_i**2] = ||J_l[:, i]||**2`` (Hutchinson):
``J_l^T r`` for every ``l`` at once is the derivative of ``r . g`` with respect to each saved
tensor, a second-order (double) backward.

Differentiating the whole backward at once holds the whole backward's graph (3-4.5 times a
plain step's peak on the small HF configs). Here the network is cut into a chain of *segments*
(its repeated blocks, :func:`lowbit.blocks.repeated_blocks`, else the entries of an
``nn.Sequential``, else the whole model), and ``r . g`` is split by where each part of ``g`` is
computed:

- *below* the first segment: its parameter gradients are a linear map of the gradient ``u_1``
  reaching the first segment's input. Embeddings: one differentiable backward of that region
  (through the probe's retained graph) gives its saved tensors' terms and the adjoint
  ``a_1 = d(r . g_below)/d u_1``. A *stem* that normalises over the batch (a CNN's conv-BN stem,
  whose double backward would hold several copies of the net's largest maps): ``a_1 = J r`` by
  a central difference of two replays of the stem without gradients, and its own tensors are
  sampled;
- *segment j*, first to last: the segment is run again from its recorded input (same random
  state) and a differentiable backward from the gradient ``u_j`` recorded at its output gives
  its parameter gradient ``g_j`` and input gradient ``d_j``; ``d(r_j . g_j + a_j . d_j)`` gives
  its saved tensors' terms and ``a_{j+1}``, the adjoint of ``u_j`` (= of the next segment's
  input gradient: the segments form a chain). A segment without batch statistics is replayed a
  quarter of the batch at a time (its graphs are per sample; dropout then draws other masks
  than the probe's forward did, the same in distribution);
- *above* the last segment (a language model's head and loss) nothing is differentiated: its few
  tensors are probed by sampling (one backward each group with the group quantized).

Memory: the probe's forward stores every saved tensor at 8 bits and the reference gradient is
kept at 8 bits too (its own rounding error is subtracted from the sampled errors); one slice of
one segment's graphs is alive at a time. Figures against a plain step: docs/act-engine.md.

Requirements, checked while the forward runs (otherwise the probe samples instead): each segment
runs once, takes its predecessor's output as its input, and receives no other tensor that
requires grad; its replay saves the same tensors in the same order.
"""
from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from lowbit.act.checkpoint import _CheckpointedForward, cache_signature, without_cache
from lowbit.act.norms import uses_batch_statistics
from lowbit.blocks import repeated_blocks

if TYPE_CHECKING:
    from lowbit.act.compressor import ActivationCompressor


class ChainError(RuntimeError):
    """The model cannot be probed segment by segment (the reason says why)."""


def probe_segments(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The chain the linear probe walks: the repeated blocks, else the entries of a top-level
    ``nn.Sequential``, else the whole model as one segment (a small net without blocks: its
    whole backward is differentiated at once)."""
    blocks = repeated_blocks(model)
    if blocks:
        return blocks
    if isinstance(model, nn.Sequential) and len(model) > 1:
        return list(model.named_children())
    return [("model", model)]


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):  # a ModelOutput
        first = next(iter(out.values()), None)
        return first if isinstance(first, torch.Tensor) else None
    return None


class _Segment:
    __slots__ = ("name", "module", "args", "kwargs", "hidden", "hidden_grad", "rng", "packs", "grad_out", "output", "calls")

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module = name, module
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.hidden: tuple[str, int | str] | None = None  # where the chained input sits: ("arg", i) / ("kw", k)
        self.hidden_grad = False  # whether that input needs a gradient (a net's first layer's does not)
        self.rng: tuple = ()
        self.packs: list[int | None] = []  # the compressor's number of each save inside the segment (None: not float)
        self.grad_out: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.calls = 0


class SegmentRecorder:
    """Forward hooks on the segments while the probe's forward runs: each segment's inputs and
    random state, the numbers of the tensors saved inside it, and (during the first backward) the
    gradient at its output and at the first segment's input."""

    def __init__(self, segments: list[tuple[str, nn.Module]]) -> None:
        self.segments = [_Segment(n, m) for n, m in segments]
        self.current: _Segment | None = None
        self.error: str | None = None
        self.first_input: torch.Tensor | None = None  # the first segment's input, as the forward made it
        self.first_grad: torch.Tensor | None = None
        self.below: list[tuple[int, object]] = []  # (number, gradient edge) of the float saves before the first segment
        self._started = False
        self._handles: list = []
        # the stem: a module outside the segments computing the first segment's input from inputs
        # without gradients (a CNN's embedder); candidates are kept until the first segment starts
        self.stem: _Segment | None = None
        self._stem_candidates: list[tuple[_Segment, object]] = []

    def attach(self, model: nn.Module | None = None) -> "SegmentRecorder":
        for seg in self.segments:
            self._handles.append(seg.module.register_forward_pre_hook(self._enter(seg), with_kwargs=True))
            self._handles.append(seg.module.register_forward_hook(self._leave(seg), with_kwargs=True))
        if model is not None:
            inside = {id(m) for seg in self.segments for m in seg.module.modules()}
            for name, m in model.named_modules():
                if m is not model and id(m) not in inside and any(p.requires_grad for p in m.parameters()):
                    cand = _Segment(name, m)
                    self._handles.append(m.register_forward_pre_hook(self._stem_enter(cand), with_kwargs=True))
                    self._handles.append(m.register_forward_hook(self._stem_leave(cand), with_kwargs=True))
        return self

    def _stem_enter(self, cand: _Segment):
        def hook(module, args, kwargs):
            if self._started:
                return None
            tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
            if tensors and not any(t.requires_grad for t in tensors):
                cand.args, cand.kwargs = tuple(args), dict(kwargs)
                cand.rng = _rng_state(tensors[0].device)
                cand.calls += 1
            return None

        return hook

    def _stem_leave(self, cand: _Segment):
        def hook(module, args, kwargs, out):
            y = _first_tensor(out)
            if not self._started and cand.calls == 1 and y is not None and y.requires_grad:
                self._stem_candidates.append((cand, weakref.ref(y)))
            return None

        return hook

    def detach(self) -> None:
        """Remove the hooks (the forward is over); the gradient hooks on the outputs stay."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for seg in self.segments:
            seg.output = None

    def note_pack(self, index: int | None, t: torch.Tensor) -> None:
        if self.current is not None:
            self.current.packs.append(index)
        elif not self._started and index is not None and t.requires_grad:
            self.below.append((index, torch.autograd.graph.get_gradient_edge(t)))

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def _enter(self, seg: _Segment):
        def hook(module, args, kwargs):
            seg.calls += 1
            self._started = True
            if seg.calls > 1:
                self._fail(f"{seg.name} runs more than once per forward")
            if self.current is not None:
                self._fail(f"{seg.name} runs inside {self.current.name}")
            where = [("arg", i) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            where += [("kw", k) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            hidden = where[0] if where else None
            if hidden is None:
                self._fail(f"{seg.name} receives no tensor")
                return None
            x = args[hidden[1]] if hidden[0] == "arg" else kwargs[hidden[1]]
            for kind, key in where[1:]:
                v = args[key] if kind == "arg" else kwargs[key]
                if v.requires_grad:
                    self._fail(f"{seg.name} receives a second input that needs a gradient ({key!r})")
            j = self.segments.index(seg)
            if j == 0:
                self.first_input = x
                for cand, ref in self._stem_candidates:  # outermost last
                    if ref() is x:
                        self.stem = cand
                self._stem_candidates.clear()
                if x.requires_grad:
                    x.register_hook(self._store_first)
            elif self.segments[j - 1].output is not x:
                self._fail(f"{seg.name}'s input is not the output of {self.segments[j - 1].name}")
            if j > 0:
                self.segments[j - 1].output = None  # checked: holding it would keep the graph below it
            seg.args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            seg.kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            seg.hidden, seg.hidden_grad = hidden, x.requires_grad
            seg.rng = _rng_state(x.device)
            self.current = seg
            return None

        return hook

    def _store_first(self, g: torch.Tensor) -> None:
        self.first_grad = g.detach()

    def _leave(self, seg: _Segment):
        def hook(module, args, kwargs, out):
            self.current = None
            y = _first_tensor(out)
            if y is None or not y.requires_grad:
                self._fail(f"{seg.name} returns no tensor that needs a gradient")
                return None
            seg.output = y

            def store(g: torch.Tensor) -> None:
                seg.grad_out = g.detach()

            y.register_hook(store)
            return None

        return hook

    def release(self) -> None:
        """Drop every recorded tensor (the probe is over)."""
        self.detach()
        for seg in self.segments:
            seg.args, seg.kwargs, seg.grad_out, seg.output = (), {}, None, None
        self.first_input = self.first_grad = None
        self.below.clear()
        self.stem = None
        self._stem_candidates.clear()


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def _replaying(state: tuple, device: torch.device):
    """Run with the random state ``state`` (from :func:`_rng_state`), the caller's restored after."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def _batch_norms(module: nn.Module) -> list[nn.Module]:
    """The layers of ``module`` that normalise over the batch (their result couples the samples)."""
    return [m for m in module.modules() if uses_batch_statistics(m)]


class _Captures:
    """Accumulates ``sum_i v_i (J_l^T r)_i**2`` per saved tensor over the draws."""

    def __init__(self, act: "ActivationCompressor", draws: int) -> None:
        self.act, self.draws = act, draws
        self.err: dict[int, float] = {}
        self._var: dict[int, torch.Tensor] = {}

    def add(self, targets: list[tuple[int, torch.Tensor]], grads) -> None:
        """``targets``: (number, value as saved) pairs; ``grads``: d(r . g)/d target (None: unused)."""
        policy, stats = self.act.policy, self.act._probe.stats
        for k, ((index, value), g) in enumerate(zip(targets, grads)):
            self.err.setdefault(index, 0.0)
            if g is None:
                continue
            var = self._var.get(k)
            if var is None:
                bits = policy.probe_bits or stats[index].min_bits
                var = rounding_variance(value, bits, self.act.context.group_for(value, bits))
                if self.draws > 1:
                    self._var[k] = var
            self.err[index] += float((var * g.detach().float().reshape(-1).pow(2)).sum()) / self.draws

    def clear_cache(self) -> None:
        self._var.clear()


def _double_backward(outputs: list[torch.Tensor], weights: list[torch.Tensor], roots: list[torch.Tensor],
                     inputs: list, retain: bool):
    """``d(sum_k weights_k . outputs_k) / d inputs`` (the weights enter as the incoming gradients,
    so no product of parameter size is formed), with the forward graph under ``roots`` stopped at
    every computing node, so what reaches a saved tensor's edge comes from its own uses in
    backward (and views of it), not from tensors computed from it."""
    handles = [node.register_prehook(_stop) for node in _forward_nodes(roots) if not _is_view(node)]
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs=[w.to(o.dtype) for o, w in zip(outputs, weights)],
                                   retain_graph=retain, allow_unused=True)
    finally:
        for h in handles:
            h.remove()


def _forward_nodes(roots: list[torch.Tensor]) -> list:
    """Every node of the autograd graph under ``roots`` (leaves' accumulators left out)."""
    seen, stack, out = set(), [r.grad_fn for r in roots], []
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


def _replay_hooks(seg: _Segment, targets: list, checkpointed: bool):
    """Saved-tensor hooks for a segment's replay: the k-th save is the segment's k-th save in the
    probe's forward; a float one is recorded (number, tensor) as a target of the double backward.
    A checkpointed block saved nothing through the compressor: its replay only carries the adjoint."""
    count = [0]

    def pack(t: torch.Tensor):
        k = count[0]
        count[0] += 1
        if checkpointed:
            return t
        if k >= len(seg.packs):
            raise ChainError(f"{seg.name} saves more tensors when replayed than in the probe's forward")
        if seg.packs[k] is not None and t.requires_grad:
            targets.append((seg.packs[k], t))
        return t

    return pack, (lambda t: t), count


def _stem_tangent(stem: _Segment, seeds_for: Callable, draw: int) -> torch.Tensor:
    """``J r``: the change of the stem's output along the random parameter direction of ``draw``,
    by a central difference of two replays of the stem (recorded inputs and random state) without
    gradients: a forward-mode pass would hold each map with its tangent and BatchNorm's
    forward-mode temporaries (about twice the peak on the ResNet-18 config's stem)."""
    from torch.func import functional_call

    named = [(n, p) for n, p in stem.module.named_parameters() if p.requires_grad]
    rs = _param_r([p for _, p in named], seeds_for([p for _, p in named], draw))
    norm_p = sum(float(p.detach().float().pow(2).sum()) for _, p in named) ** 0.5
    norm_r = sum(float(r.pow(2).sum()) for r in rs) ** 0.5
    eps = 1e-4 * max(norm_p, 1e-3) / max(norm_r, 1e-12)  # a step of 1e-4 of the parameters' size

    device = named[0][1].device
    # the replays normalise with the batch's statistics, as the forward did, without updating the running ones
    norms = _batch_norms(stem.module)
    kept = [(m.running_mean, m.running_var, m.num_batches_tracked) for m in norms]
    outs = []
    try:
        for m in norms:
            m.running_mean = m.running_var = m.num_batches_tracked = None
        for sign in (1.0, -1.0):
            moved = {n: p.detach() + (sign * eps) * r for (n, p), r in zip(named, rs)}
            with _replaying(stem.rng, device), torch.no_grad():
                outs.append(_first_tensor(functional_call(stem.module, moved, stem.args, stem.kwargs)).float())
            del moved
    finally:
        for m, (mean, var, count) in zip(norms, kept):
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
    plus, minus = outs
    return plus.sub_(minus).div_(2 * eps)


def _param_r(params: list[torch.Tensor], seeds: list[int]) -> list[torch.Tensor]:
    out = []
    for p, s in zip(params, seeds):
        gen = torch.Generator(device=p.device).manual_seed(s)
        out.append(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype))
    return out


class LinearProbe:
    """The walk, in two parts around the probe's sampling:

    - :meth:`below` (needs the probe's retained graph): the adjoint the first segment gets from
      the parameters below it, and those tensors' terms;
    - :meth:`sweep` (does not: the graph and the reference gradient may be released first, so the
      replays run on top of little more than the recorded block inputs): a batch-normalising
      stem's adjoint, then every segment.

    ``reached``: every number saved below or inside the segments; saves among them that the walk
    cannot differentiate by (constants such as a dropout's noise: no graph) get no estimate, as
    under the whole-graph derivative (the allocator gives them the median). Raises
    :class:`ChainError` when the model is not a chain of segments as the forward ran."""

    def __init__(self, act: "ActivationCompressor", recorder: SegmentRecorder, params: list[torch.Tensor],
                 draws: int, seed: int) -> None:
        if recorder.error is not None:
            raise ChainError(recorder.error)
        for seg in recorder.segments:
            if seg.calls != 1 or seg.grad_out is None:
                raise ChainError(f"{seg.name} did not run once with a gradient at its output")
        self.act, self.recorder, self.params, self.draws = act, recorder, params, draws
        seg_params = {id(p) for seg in recorder.segments for p in seg.module.parameters()}
        self.below_params = [p for p in params if id(p) not in seg_params]
        position = {id(p): i for i, p in enumerate(params)}
        base_seed = seed * 1_000_003
        self.seeds_for = lambda ps, d: [base_seed + 7919 * d + position[id(p)] for p in ps]
        self.caps = _Captures(act, draws)
        self.adj: list[torch.Tensor | None] = [None] * draws  # the next segment's input adjoint, per draw
        self.reached = {i for seg in recorder.segments for i in seg.packs if i is not None}
        stem = recorder.stem
        # a stem normalising over the batch (a CNN's conv-BN stem): its double backward would hold
        # several copies of the net's largest maps, so its adjoint comes from replays
        # (d(r . g_stem)/du = J r, J the stem's Jacobian in its parameters) and its tensors are sampled
        self.stem = stem if stem is not None and _batch_norms(stem.module) else None
        x1, u1 = recorder.first_input, recorder.first_grad
        self._below = (self.stem is None and x1 is not None and x1.grad_fn is not None and u1 is not None
                       and bool(self.below_params))
        if self._below:
            self.reached |= {i for i, _ in recorder.below}

    def below(self) -> None:
        """Embeddings and other layers below the first segment, through the retained graph."""
        if not self._below:
            return
        recorder, state, draws = self.recorder, self.act._probe, self.draws
        x1, below = recorder.first_input, self.below_params
        u = recorder.first_grad.detach().requires_grad_()
        state.values, state.noisy = [], "values"  # the compressor reports each tensor it hands out
        try:
            grads = torch.autograd.grad(x1, below, grad_outputs=u, create_graph=True, allow_unused=True)
        finally:
            state.noisy = None
        values, state.values = state.values, []
        targets, edges = [], []
        for index, edge in recorder.below:
            value = next((v for i, v in values if i == index), None)
            if value is not None:
                targets.append((index, value))
                edges.append(edge)
        live = [(p, g) for p, g in zip(below, grads) if g is not None and g.requires_grad]
        for d in range(draws):
            if not live:
                break
            rs = _param_r([p for p, _ in live], self.seeds_for([p for p, _ in live], d))
            out = _double_backward([g for _, g in live], rs, [x1], [u] + edges, retain=True)  # the graph stays
            self.adj[d] = out[0]
            self.caps.add(targets, out[1:])
        self.caps.clear_cache()

    def sweep(self, bar=None) -> dict[int, float]:
        """Every segment, first to last; returns {number: E||e_l||**2 at the probe width}."""
        self.recorder.first_input = None  # it holds the graph below it
        if self.stem is not None:
            for d in range(self.draws):
                self.adj[d] = _stem_tangent(self.stem, self.seeds_for, d)
        for seg in self.recorder.segments:
            _segment(self.act, seg, self.adj, self.caps, self.seeds_for, self.draws)
            self.caps.clear_cache()
            if bar is not None:
                bar.update(1)
        return self.caps.err


SLICES = 4  # a block without batch statistics is replayed in this many slices of the batch


def _batch_slices(seg: _Segment, batch: int) -> list[slice]:
    """Slices of the batch to replay ``seg`` in: the replay's graphs are per sample, so a quarter
    of the batch at a time holds a quarter of the memory. One slice for a block whose result
    couples the samples (BatchNorm on batch statistics) or a batch too small to split."""
    if batch < 2 or _batch_norms(seg.module):
        return [slice(0, batch)]
    step = -(-batch // SLICES)
    return [slice(s, min(s + step, batch)) for s in range(0, batch, step)]


def _take(v, batch: int, rows: slice):
    """``v`` with the batch rows ``rows`` (tensors whose first dimension is the batch; tuples and
    lists of them, such as rotary (cos, sin)); anything else as it is."""
    if isinstance(v, torch.Tensor):
        return v[rows] if v.dim() > 0 and v.shape[0] == batch else v
    if isinstance(v, (tuple, list)):
        return type(v)(_take(e, batch, rows) for e in v)
    return v


def _segment(act, seg: _Segment, adj: list, caps: _Captures, seeds_for: Callable, draws: int) -> None:
    """One segment of the sweep: replay it slice by slice of the batch, differentiate its
    backward, replace the adjoints in ``adj`` by the next segment's."""
    x_saved = seg.args[seg.hidden[1]] if seg.hidden[0] == "arg" else seg.kwargs[seg.hidden[1]]
    batch = x_saved.shape[0] if x_saved.dim() > 0 else 1
    if seg.grad_out.dim() == 0 or seg.grad_out.shape[0] != batch:
        rows = [slice(0, batch)] if x_saved.dim() > 0 else [slice(None)]
        batch = -1  # the output is not batch-major: replay whole
    else:
        rows = _batch_slices(seg, batch)
    pieces: list[list[torch.Tensor | None]] = [[] for _ in range(draws)]
    for r in rows:
        whole = batch < 0 or (r.start == 0 and r.stop == batch)
        take = (lambda v: v) if whole else (lambda v, r=r: _take(v, batch, r))
        out = _replay(act, seg, take, [take(a) if a is not None else None for a in adj], caps, seeds_for, draws)
        for d in range(draws):
            pieces[d].append(out[d])
        caps.clear_cache()
    for d in range(draws):
        got = pieces[d]
        adj[d] = None if any(g is None for g in got) else (got[0] if len(got) == 1 else torch.cat(got))


def _replay(act, seg: _Segment, take: Callable, adj: list, caps: _Captures, seeds_for: Callable,
            draws: int) -> list:
    """Replay ``seg`` on the rows ``take`` picks; returns the adjoint of its output per draw."""
    args, kwargs = [take(a) for a in seg.args], {k: take(v) for k, v in seg.kwargs.items()}
    where = seg.hidden[1]
    x = (args[where] if seg.hidden[0] == "arg" else kwargs[where]).detach().requires_grad_(seg.hidden_grad)
    if seg.hidden[0] == "arg":  # as in the forward: the same tensors get saved
        args[where] = x
    else:
        kwargs[where] = x
    forward = type(seg.module).forward.__get__(seg.module)  # the class's forward: not a checkpoint wrapper
    args, kwargs, _ = without_cache(cache_signature(forward), tuple(args), kwargs)  # the cache holds this block's keys
    targets: list[tuple[int, torch.Tensor]] = []
    checkpointed = isinstance(seg.module.__dict__.get("forward"), _CheckpointedForward)
    pack, unpack, count = _replay_hooks(seg, targets, checkpointed)
    device = x.device
    with _replaying(seg.rng, device), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = forward(*args, **kwargs)
    if count[0] != len(seg.packs) and not checkpointed:
        raise ChainError(f"{seg.name} saves {count[0]} tensors when replayed, {len(seg.packs)} in the probe's forward")
    y = _first_tensor(out)
    u = take(seg.grad_out).detach().requires_grad_()
    if y is None or y.shape != u.shape:
        raise ChainError(f"{seg.name}'s replay returns another output")
    own = [p for p in seg.module.parameters() if p.requires_grad]
    inputs = ([x] if x.requires_grad else []) + own
    grads = torch.autograd.grad(y, inputs, grad_outputs=u, create_graph=True, allow_unused=True)
    roots = [y]
    del out
    d_in, g_own = (grads[0], grads[1:]) if x.requires_grad else (None, grads)
    live = [(p, g) for p, g in zip(own, g_own) if g is not None and g.requires_grad]
    inputs = [u] + [t for _, t in targets]
    result: list[torch.Tensor | None] = [None] * draws
    for d in range(draws):
        outputs = [g for _, g in live]
        weights = _param_r([p for p, _ in live], seeds_for([p for p, _ in live], d))
        if adj[d] is not None and d_in is not None and d_in.requires_grad:
            outputs.append(d_in)
            weights.append(adj[d])
        if not outputs:
            continue
        grads_d = _double_backward(outputs, weights, roots, inputs, retain=d < draws - 1)
        del outputs, weights
        result[d] = grads_d[0]
        caps.add(targets, grads_d[1:])
    return result


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


def warn_sampling(method: str, reason: str) -> None:
    warnings.warn(f"lowbit {method}: the linear probe cannot walk this model ({reason}); sensitivities are "
                  "sampled instead (slower)", RuntimeWarning, stacklevel=5)
