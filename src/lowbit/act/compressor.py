"""ActivationCompressor: compress every tensor autograd saves for backward, on any model.

Built on ``torch.autograd.graph.saved_tensors_hooks``: inside ``with act:`` each tensor an op
saves goes through :meth:`ActivationCompressor._pack` and comes back through ``_unpack`` when
backward needs it. The rules, in order:

1. parameters and buffers (and their views, and autocast's casts of them), and with ``model=``
   the tensors passed to the model's forward (the batch), are returned as they are: they are
   kept alive anyway, compressing them would only add a copy;
2. tensors below ``min_numel`` elements (64 KiB of float32) are kept raw while they add up to at
   most ``small_fraction`` of the step's saved bytes: a few of them save nothing worth having,
   and they are often the most sensitive ones (a classifier's log-softmax, norm statistics); a
   net that saves mostly small tensors (a GRU's per-timestep gates) gets them compressed;
3. each storage is encoded once, even when several ops save it (a ReLU output saved by the
   ReLU and by the next conv), or save different views of it;
4. bool tensors become 1-bit masks and integer tensors (max-pool argmax) are packed losslessly;
   floating tensors go to the policy, which picks a width (or None: keep raw);
5. the version counter of every saved tensor is tracked without keeping its memory alive, so a
   tensor modified in place before backward raises the error plain autograd would raise;
6. backward gets each tensor back with the size, stride and storage offset it was saved with
   (compiled backward graphs check them), see :mod:`lowbit.act.layout`.

Policies see a :class:`~lowbit.act.context.PolicyContext`, sensitivities are measured by
:mod:`lowbit.act.probe`, and bytes are accounted by :class:`~lowbit.act.accounting.Ledger`.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from lowbit.act import probe
from lowbit.act.accounting import Ledger
from lowbit.act.config import ActConfig, build_policy, config_for
from lowbit.act.context import PolicyContext
from lowbit.act.layout import restore_layout, span_of
from lowbit.act.probe import ProbeState
from lowbit.act.policy import NonePolicy, Policy
from lowbit.act.report import MemoryReport
from lowbit.codecs import IndexCodec, MaskCodec, Packed, UniformCodec

_INPLACE_ERROR = (
    "one of the tensors saved for backward inside lowbit.act.ActivationCompressor (shape {shape}, "
    "dtype {dtype}) has been modified by an inplace operation: it was at version {saved} when saved "
    "and is now at version {now}. Hint: replace the inplace operation (e.g. relu_(), +=, inplace=True) "
    "by an out-of-place one."
)


class _Entry:
    """One encoded storage (or one view of it, when the view covers only part of the storage)."""

    __slots__ = ("packed", "raw", "kind", "index", "full_storage", "span", "pending", "decoded", "on_free",
                 "__weakref__")

    def __init__(self, kind: str, packed: Packed | None = None, raw: torch.Tensor | None = None, index: int = -1):
        self.kind = kind
        self.packed = packed
        self.raw = raw
        self.index = index
        self.full_storage = False
        self.span = False  # the encoding holds the storage span under a partial view (see layout.py)
        self.pending = 0  # saves of this entry not yet unpacked
        self.decoded: torch.Tensor | None = None
        self.on_free: Callable[[], None] | None = None  # called once autograd drops the entry (live-bytes accounting)

    def __del__(self) -> None:  # cheaper than a weakref.finalize per entry
        if self.on_free is not None:
            self.on_free()

    def decode(self, codecs: dict) -> torch.Tensor:
        """Decoded storage. When several saves share the entry, the first decode is kept until the
        last of them is unpacked (they sit next to each other in backward), so it is done once."""
        if self.raw is not None:
            return self.raw
        out = self.decoded if self.decoded is not None else codecs[self.packed.codec].decode(self.packed)
        self.pending -= 1
        self.decoded = out if self.pending > 0 else None
        return out


class _Saved:
    """What autograd holds instead of the tensor."""

    __slots__ = ("entry", "size", "stride", "offset", "tracker", "version")

    def __init__(self, entry: _Entry | None, size: torch.Size, stride: tuple, offset: int,
                 tracker: torch.Tensor | None, version: int):
        self.entry, self.size, self.stride, self.offset = entry, size, stride, offset
        self.tracker, self.version = tracker, version


def _version_tracker(t: torch.Tensor) -> torch.Tensor | None:
    """A 0-element tensor sharing ``t``'s version counter but not its memory."""
    try:
        version = t._version
        tracker = t.detach()  # shares the version counter
        tracker.set_()  # drops the memory; bumps the counter, which is put back below
        torch._C._autograd._unsafe_set_version_counter((t,), (version,))  # what the public context manager does, at 1/3 the cost
        return tracker
    except (RuntimeError, AttributeError, TypeError):  # exotic tensor types: no check
        return None


def _symbolic(t: torch.Tensor) -> bool:
    """True for the fake / meta / functional tensors torch.compile traces with (no data to encode)."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return True
    return is_fake(t) or torch._is_functional_tensor(t)


def _is_param_cast(t: torch.Tensor) -> bool:
    """True for autocast's / .to()'s copy of a leaf parameter (cached by autocast, kept anyway)."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    nxt = fn.next_functions
    return bool(nxt) and nxt[0][0] is not None and type(nxt[0][0]).__name__ == "AccumulateGrad"


def _producer(t: torch.Tensor) -> str:
    fn = t.grad_fn
    if fn is None:
        return "input"
    name = type(fn).__name__
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class ActivationCompressor:
    """Compress what autograd saves for backward inside ``with act:``.

    Args:
        method: a config (:class:`~lowbit.act.config.UniformConfig`, ``GactConfig``,
            ``DivisionConfig``, ``CometConfig``, ``MesaConfig``, ``NoneConfig`` or any registered
            one), its string shortcut ("none", "uniform", "gact", "division", "comet", "mesa";
            then ``bits``, the engine options and ``**options`` build the config), or a
            :class:`Policy` instance (then ``bits`` and ``options`` are not used).
        bits (shortcut only): the config field it means for the method: "uniform" ``bits`` (1, 2,
            4, 8), "gact" ``average_bits``, "division" ``hfc_bits``; not used by "comet", 8 only
            for "mesa".
        model: optional; its parameters and buffers are skipped by identity (without it, leaf
            tensors that require grad and their views are skipped), the report gets per-module
            rows, and GACT needs it to measure sensitivities.
        group_size, min_numel, small_fraction, floor_numel, seed (shortcut and Policy only; a
            config carries them): see :class:`~lowbit.act.config.ActConfig` (defaults 256, 16384,
            0.05, 1024, 0).
        **options (shortcut only): the method config's other fields (gact: ``interval``,
            ``probe_bits``, ``probe_draws``, ``max_probes``, ``momentum``, ``probe_groups``).

    Usage::

        act = lowbit.act.compress(model, GactConfig(average_bits=2))  # = ActivationCompressor("gact", bits=2, model=model)
        for x, y in loader:
            with act:
                loss = F.cross_entropy(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
            act.step(lambda: F.cross_entropy(model(x), y))   # GACT re-estimates every `interval` steps
        print(act.report())
    """

    def __init__(
        self,
        method: str | ActConfig | Policy = "gact",
        bits: float | None = None,
        model: nn.Module | None = None,
        group_size: int | None = None,
        min_numel: int | None = None,
        seed: int | None = None,
        small_fraction: float | None = None,
        floor_numel: int | None = None,
        **options,
    ):
        engine = {k: v for k, v in dict(group_size=group_size, min_numel=min_numel, seed=seed,
                                          small_fraction=small_fraction, floor_numel=floor_numel).items() if v is not None}
        if isinstance(method, ActConfig):
            extra = sorted([*engine, *options] + (["bits"] if bits is not None else []))
            if extra:
                raise TypeError(f"ActivationCompressor({type(method).__name__}(...)) takes its options from the config; "
                                f"set {extra} there instead")
            config, policy = method, build_policy(method)
        elif isinstance(method, Policy):
            config, policy = ActConfig(**engine), method
        elif isinstance(method, str):
            config = config_for(method, bits, **engine, **options)
            policy = build_policy(config)
        else:
            raise TypeError(f"method must be a config (e.g. GactConfig(average_bits=2)), a method name or a Policy, "
                            f"got {type(method).__name__}")
        self.config: ActConfig = config
        self.policy: Policy = policy
        method = config.name or policy.name
        if getattr(self.policy, "needs_model", False) and model is None:
            raise ValueError(f"method {method!r} needs model= (to know which saved tensors belong to which module)")
        self.method = method
        self.model = model
        if model is not None:
            self.policy.bind(model)
        self.min_numel = config.min_numel
        self.small_fraction = float(config.small_fraction)
        self.floor_numel = min(config.floor_numel, self.min_numel)
        self._uniform = UniformCodec(bits=8, group_size=config.group_size, seed=config.seed)
        self._codecs = {"uniform": self._uniform, "mask": MaskCodec(), "index": IndexCodec(), **self.policy.codecs()}
        self._hooks: list[torch.autograd.graph.saved_tensors_hooks] = []
        self._module_stack: list[str] = []
        self._module_handles: list = []
        self._modules: dict[str, nn.Module] = {}
        self.context = PolicyContext(self._uniform, self._module_stack, self._modules)
        self._param_ptrs: set[int] = set()
        self._input_ptrs: set[int] = set()  # storages of the model's inputs in this `with` block
        self._cache: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self._index = 0
        self._steps = 0
        self._probe: ProbeState | None = None  # set while GACT/COMET measure sensitivities
        self.ledger = Ledger()  # bytes raw vs stored, per step, live and peak
        if model is not None:
            self._watch_modules(model)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "ActivationCompressor":
        if self.model is not None:
            self._param_ptrs = {
                t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())
            }
        self._index = 0
        self._input_ptrs.clear()
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        self._hooks.append(hooks)
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.pop().__exit__(*exc)
        self._cache.clear()

    # ------------------------------------------------------------------ hooks
    def _skip(self, t: torch.Tensor, storage_ptr: int) -> bool:
        if t.is_leaf and isinstance(t, nn.Parameter):  # activations are not leaves: skip the slow metaclass check
            return True
        if self.model is not None:
            if storage_ptr in self._param_ptrs or storage_ptr in self._input_ptrs:
                return True
        else:
            base = t._base if t._base is not None else t
            if base.is_leaf and base.requires_grad:
                return True
        return _is_param_cast(t)

    @torch.compiler.disable  # runs eagerly on real tensors, also when called from a compiled graph
    def _pack(self, t: torch.Tensor):
        saved = self._save(t)
        if self._probe is not None:  # the probe replays blocks and maps their saves to these numbers
            entry = saved.entry if isinstance(saved, _Saved) else None
            self._probe.note_pack(entry.index if entry is not None and entry.kind == "float" else None, t)
        return saved

    def _save(self, t: torch.Tensor):
        if _symbolic(t):  # torch.compile tracing its graph: what it saves is compressed when the graph runs
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if self._skip(t, ptr):
            return t
        tracker = _version_tracker(t)
        saved = _Saved(None, t.size(), t.stride(), t.storage_offset(), tracker, t._version)
        itemsize = t.element_size()
        storage_numel = storage.nbytes() // itemsize if itemsize else 0
        full = t.numel() == storage_numel and t.numel() > 0
        key = (ptr, t.dtype) if full else (ptr, t.dtype, t.storage_offset(), t.size(), t.stride())
        hit = self._cache.get(key)
        if hit is not None:
            owner, entry_ref = hit
            entry = entry_ref()
            if owner() is not None and entry is not None:
                entry.pending += 1
                saved.entry = entry
                return saved
        span = False
        if full and t.is_contiguous() and t.storage_offset() == 0:
            base = t  # keeps its shape: the index codec uses it
        elif full:
            base = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, (storage_numel,), (1,))
        else:  # part of a storage: the dense span under it, or its values (restored into its strides)
            dense = span_of(t) if not t.is_contiguous() else None
            span = dense is not None
            base = dense if span else t
        entry = self._encode(base.detach(), t)
        entry.full_storage = full
        entry.span = span
        entry.pending = 1
        saved.entry = entry
        self._cache[key] = (weakref.ref(t), weakref.ref(entry))
        return saved

    def _encode(self, base: torch.Tensor, t: torch.Tensor) -> _Entry:
        raw_bytes = base.numel() * base.element_size()
        if isinstance(self.policy, NonePolicy) or self._keep_small(base, raw_bytes):
            entry = _Entry("raw", raw=base)
        elif base.dtype == torch.bool:
            entry = _Entry("mask", packed=self._codecs["mask"].encode(base))
        elif not base.dtype.is_floating_point:
            entry = _Entry("index", packed=self._codecs["index"].encode(base))
        else:
            index = self._index
            self._index += 1
            if self._probe is not None:  # statistics of the exact tensor; 8-bit storage keeps the probe's memory down
                self._probe.record(index, base, self.context.group_for(base, 2))
                entry = _Entry("float", packed=self._probe.store(base, self.context), index=index)
            else:
                packed = self.policy.encode(index, base, self.context)
                entry = _Entry("float", raw=base, index=index) if packed is None else _Entry("float", packed=packed, index=index)
        stored = entry.packed.nbytes if entry.packed is not None else raw_bytes
        bits_used = 32
        if entry.kind == "float" and entry.packed is not None:  # a codec's nominal width, else what it holds
            bits_used = entry.packed.info.get("bits", entry.packed.bits_per_element)
        self._account(entry, t, raw_bytes, stored, bits_used)
        return entry

    def _keep_small(self, base: torch.Tensor, raw_bytes: int) -> bool:
        """Whether a tensor is kept raw for being small. Below ``floor_numel`` always; below
        ``min_numel`` while the small tensors kept raw stay within ``small_fraction`` of the bytes
        saved so far in this step. A few small tensors (norm statistics, a classifier's
        log-softmax) stay exact, but a net that saves almost only small tensors (a GRU's
        per-timestep gates) gets them compressed."""
        ledger = self.ledger
        ledger.seen_bytes += raw_bytes
        n = base.numel()
        if n >= self.min_numel:
            return False
        if n < self.floor_numel or not base.dtype.is_floating_point:
            return True
        if ledger.small_raw_bytes + raw_bytes <= self.small_fraction * ledger.seen_bytes:
            ledger.small_raw_bytes += raw_bytes
            return True
        return False

    @property
    def uniform_codec(self) -> UniformCodec:
        """The per-group uniform codec policies share (its generator drives stochastic rounding)."""
        return self._uniform

    def current_module(self) -> tuple[str, nn.Module | None]:
        """(name, module) innermost in the forward right now (needs ``model=``; else ("-", None))."""
        return self.context.current_module()

    def enclosing_modules(self) -> list[nn.Module]:
        """Every module whose forward is running right now, innermost first."""
        return self.context.enclosing_modules()

    def group_for(self, t: torch.Tensor, bits: int | None = None) -> int:
        """Elements per quantization group for ``t`` (see :func:`lowbit.codecs.uniform.layout_group`)."""
        return self.context.group_for(t, bits)

    @torch.compiler.disable
    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        if saved.tracker is not None and saved.tracker._version != saved.version:
            raise RuntimeError(
                _INPLACE_ERROR.format(
                    shape=tuple(saved.size), dtype=saved.tracker.dtype, saved=saved.version, now=saved.tracker._version
                )
            )
        entry = saved.entry
        noisy = self._probe.noisy if self._probe is not None else None
        if noisy is not None and entry.kind == "float":
            base = self._probe_unpack(entry, noisy)
        else:
            base = entry.decode(self._codecs)
        if entry.full_storage:
            out = base.as_strided(saved.size, saved.stride, saved.offset)
        else:
            out = restore_layout(base, saved.size, saved.stride, saved.offset, entry.span)
        if noisy == "values" and entry.kind == "float":
            self._probe.values.append((entry.index, out))
        return out

    def _probe_unpack(self, entry: _Entry, noisy) -> torch.Tensor:
        """A saved float tensor as a running probe wants it back (see :mod:`lowbit.act.probe`):
        quantized at the probe width (a probed group), as the policy would store it ("policy"),
        or decoded (the others; "values": reported to the probe with the view it restores)."""
        state = self._probe
        if isinstance(noisy, frozenset) and entry.index in noisy:
            src, bits = self._exact(entry), state.bits[entry.index]
            packed = self._uniform.encode(src, bits=bits, group_size=self.context.group_for(src, bits))
            del src  # one float copy at a time: the probe's peak stays that of a compressed step
            return self._uniform.decode(packed)
        if noisy == "policy":
            src = self._exact(entry)
            packed = self.policy.encode(entry.index, src, self.context)  # every tensor as the policy would store it
            if packed is None:
                return src
            del src
            return self._codecs[packed.codec].decode(packed)
        return self._exact(entry)

    def _exact(self, entry: _Entry) -> torch.Tensor:
        """The probe's copy of a saved float tensor (decoded each time: the graph is retained)."""
        return entry.raw if entry.raw is not None else self._codecs[entry.packed.codec].decode(entry.packed)

    # ------------------------------------------------------------------ accounting
    def _account(self, entry: _Entry, t: torch.Tensor, raw: int, stored: int, bits: float) -> None:
        if self._probe is not None:
            return
        module = self._module_stack[-1] if self._module_stack else "-"
        kind = entry.kind if not (entry.kind == "float" and entry.packed is None) else "raw"
        elems = raw // max(t.element_size(), 1)  # elements of the encoded storage
        numel = t.numel() if not entry.full_storage else elems
        entry.on_free = self.ledger.add(module, _producer(t), kind, numel, raw, stored, bits * elems)

    def report(self) -> MemoryReport:
        """Saved-tensor memory of the forward passes since the last :meth:`step` (right after a
        step: the step just finished)."""
        return self.ledger.report(self.policy.describe())

    @property
    def live_bytes(self) -> tuple[int, int]:
        """(raw, stored) bytes of saved tensors alive right now."""
        return self.ledger.live_raw, self.ledger.live_stored

    # ------------------------------------------------------------------ modules
    def _watch_modules(self, model: nn.Module) -> None:
        def inputs(_m, args, kwargs):
            # the caller holds the model's inputs (the batch) through backward anyway: compressing
            # them would add a copy and save nothing, and a quantized image costs the stem's
            # weight gradient most of its accuracy
            for v in list(args) + list(kwargs.values()):
                if isinstance(v, torch.Tensor) and v.grad_fn is None and not _symbolic(v):
                    self._input_ptrs.add(v.untyped_storage().data_ptr())

        self._module_handles.append(model.register_forward_pre_hook(inputs, with_kwargs=True))
        for name, mod in model.named_modules():
            label = name or type(model).__name__
            self._modules[label] = mod

            def pre(_m, _inp, label=label):
                self._module_stack.append(label)

            def post(_m, _inp, _out):
                if self._module_stack:
                    self._module_stack.pop()

            self._module_handles.append(mod.register_forward_pre_hook(pre))
            self._module_handles.append(mod.register_forward_hook(post, always_call=True))

    def close(self) -> None:
        """Remove the module hooks this compressor installed."""
        for h in self._module_handles:
            h.remove()
        self._module_handles.clear()
        self.policy.close()

    # ------------------------------------------------------------------ adaptation
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """End of a training step: starts a new per-step report; adaptive methods re-estimate.

        ``closure`` recomputes the loss on a batch (forward only, no backward); GACT calls it
        every ``interval`` steps to measure per-tensor sensitivities. Without it GACT keeps its
        current widths."""
        if self.policy.adaptive and closure is not None and self.policy.due(self._steps):
            self.estimate(closure)
        self._steps += 1
        self.ledger.end_step(self.policy.describe())

    def estimate(self, closure: Callable[[], torch.Tensor]) -> dict[int, float]:
        """Measure per-tensor gradient sensitivities on one batch and let the adaptive policy
        (GACT: bits, COMET: error bounds) re-decide; returns {index: c_l}. See :mod:`lowbit.act.probe`."""
        return probe.estimate(self, closure)

    @property
    def bit_allocation(self) -> dict[int, int]:
        """GACT's current {tensor index: bits} (empty before the first estimate)."""
        return dict(getattr(self.policy, "assigned", {}))


def compress(model: nn.Module | None, config: ActConfig) -> ActivationCompressor:
    """The compressor for ``config`` on ``model`` (the entry point of the family)::

        act = lowbit.act.compress(model, GactConfig(average_bits=2))
        with act:
            loss = F.cross_entropy(model(x), y)
        loss.backward(); act.step()

    ``model`` may be None for methods that do not need it (every method but Mesa and GACT's /
    COMET's estimates); the report then has no per-module rows."""
    if not isinstance(config, ActConfig):
        raise TypeError(f"compress(model, config) needs a config such as GactConfig(average_bits=2), got "
                        f"{type(config).__name__} (the string form is ActivationCompressor({config!r}, ...))")
    return ActivationCompressor(config, model=model)
