"""ActivationCompressor: compress every tensor autograd saves for backward, on any model.

Built on ``torch.autograd.graph.saved_tensors_hooks``: inside ``with act:`` each tensor an op
saves goes through :meth:`ActivationCompressor._pack` and comes back through ``_unpack`` when
backward needs it. The rules, in order:

1. parameters and buffers (and their views, and autocast's casts of them) are returned as they
   are: they are kept alive anyway, compressing them would only add a copy;
2. tensors below ``min_numel`` elements (64 KiB of float32) are kept raw: they save nothing worth
   having, and they are often the most sensitive ones (a classifier's log-softmax, norm statistics);
3. each storage is encoded once, even when several ops save it (a ReLU output saved by the
   ReLU and by the next conv), or save different views of it;
4. bool tensors become 1-bit masks and integer tensors (max-pool argmax) are packed losslessly;
   floating tensors go to the policy, which picks a width (or None: keep raw);
5. the version counter of every saved tensor is tracked without keeping its memory alive, so a
   tensor modified in place before backward raises the error plain autograd would raise.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from lowbit.act.gact import TensorStat, flat_grad
from lowbit.act.policy import NonePolicy, Policy, make_policy
from lowbit.act.report import MemoryReport, ReportRow
from lowbit.codecs import IndexCodec, MaskCodec, Packed, UniformCodec
from lowbit.kernels import group_minmax

_INPLACE_ERROR = (
    "one of the tensors saved for backward inside lowbit.act.ActivationCompressor (shape {shape}, "
    "dtype {dtype}) has been modified by an inplace operation: it was at version {saved} when saved "
    "and is now at version {now}. Hint: replace the inplace operation (e.g. relu_(), +=, inplace=True) "
    "by an out-of-place one."
)


class _Entry:
    """One encoded storage (or one view of it, when the view covers only part of the storage)."""

    __slots__ = ("packed", "raw", "kind", "index", "full_storage", "pending", "decoded", "on_free", "__weakref__")

    def __init__(self, kind: str, packed: Packed | None = None, raw: torch.Tensor | None = None, index: int = -1):
        self.kind = kind
        self.packed = packed
        self.raw = raw
        self.index = index
        self.full_storage = False
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


class _Release:
    """Gives an entry's bytes back to the live counters when autograd frees it (holds the
    compressor weakly: a finished graph must not keep it alive)."""

    __slots__ = ("act", "raw", "stored")

    def __init__(self, act: "ActivationCompressor", raw: int, stored: int):
        self.act, self.raw, self.stored = weakref.ref(act), raw, stored

    def __call__(self) -> None:
        act = self.act()
        if act is not None:
            act._live_raw -= self.raw
            act._live_stored -= self.stored


class ActivationCompressor:
    """Compress what autograd saves for backward inside ``with act:``.

    Args:
        method: "none" (raw, accounted: the baseline), "uniform" (``bits`` for every tensor),
            "gact" (adaptive widths averaging ``bits``), "division", "comet", "mesa", or a
            :class:`Policy` instance (then ``bits`` and ``options`` are not used).
        bits: width for "uniform" (1, 2, 4, 8); average-bits budget for "gact".
        model: optional; its parameters and buffers are skipped by identity (without it, leaf
            tensors that require grad and their views are skipped), the report gets per-module
            rows, and GACT needs it to measure sensitivities.
        group_size: elements per quantization group (a multiple of 8).
        min_numel: tensors with fewer elements are kept raw (default 16384: 64 KiB of float32).
        seed: seed of the private generator used for stochastic rounding.
        **options: method options (gact: ``interval``, ``probe_bits``, ``probe_draws``, ``max_probes``, ``momentum``).

    Usage::

        act = ActivationCompressor("gact", bits=2, model=model)
        for x, y in loader:
            with act:
                loss = F.cross_entropy(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
            act.step(lambda: F.cross_entropy(model(x), y))   # GACT re-estimates every `interval` steps
        print(act.report())
    """

    def __init__(
        self,
        method: str | Policy = "gact",
        bits: float | None = None,
        model: nn.Module | None = None,
        group_size: int = 256,
        min_numel: int = 16384,
        seed: int = 0,
        **options,
    ):
        self.policy: Policy = method if isinstance(method, Policy) else make_policy(method, bits, **options)
        method = self.policy.name
        if getattr(self.policy, "needs_model", False) and model is None:
            raise ValueError(f"method {method!r} needs model= (to know which saved tensors belong to which module)")
        self.method = method
        self.model = model
        self.min_numel = int(min_numel)
        self._uniform = UniformCodec(bits=8, group_size=group_size, seed=seed)
        self._codecs = {"uniform": self._uniform, "mask": MaskCodec(), "index": IndexCodec(), **self.policy.codecs()}
        self._hooks: list[torch.autograd.graph.saved_tensors_hooks] = []
        self._module_stack: list[str] = []
        self._module_handles: list = []
        self._modules: dict[str, nn.Module] = {}
        self._param_ptrs: set[int] = set()
        self._cache: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self._index = 0
        self._steps = 0
        self._probe: dict | None = None  # set while GACT measures sensitivities
        self._last_report: MemoryReport | None = None
        self._reset_counts()
        self._live_raw = 0
        self._live_stored = 0
        self._peak_raw = 0
        self._peak_stored = 0
        if model is not None:
            self._watch_modules(model)

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "ActivationCompressor":
        if self.model is not None:
            self._param_ptrs = {
                t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())
            }
        self._index = 0
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
            if storage_ptr in self._param_ptrs:
                return True
        else:
            base = t._base if t._base is not None else t
            if base.is_leaf and base.requires_grad:
                return True
        return _is_param_cast(t)

    def _pack(self, t: torch.Tensor):
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
        if full and t.is_contiguous() and t.storage_offset() == 0:
            base = t  # keeps its shape: the index codec uses it
        elif full:
            base = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, (storage_numel,), (1,))
        else:
            base = t
        entry = self._encode(base.detach(), t)
        entry.full_storage = full
        entry.pending = 1
        saved.entry = entry
        self._cache[key] = (weakref.ref(t), weakref.ref(entry))
        return saved

    def _encode(self, base: torch.Tensor, t: torch.Tensor) -> _Entry:
        raw_bytes = base.numel() * base.element_size()
        if base.numel() < self.min_numel or isinstance(self.policy, NonePolicy):
            entry = _Entry("raw", raw=base)
        elif base.dtype == torch.bool:
            entry = _Entry("mask", packed=self._codecs["mask"].encode(base))
        elif not base.dtype.is_floating_point:
            entry = _Entry("index", packed=self._codecs["index"].encode(base))
        else:
            index = self._index
            self._index += 1
            if self._probe is not None:
                entry = _Entry("float", raw=base, index=index)
                self._probe_stat(index, base)
            else:
                packed = self.policy.encode(index, base, self)
                entry = _Entry("float", raw=base, index=index) if packed is None else _Entry("float", packed=packed, index=index)
        stored = entry.packed.nbytes if entry.packed is not None else raw_bytes
        bits_used = 32
        if entry.kind == "float" and entry.packed is not None:  # a codec's nominal width, else what it holds
            bits_used = entry.packed.info.get("bits", entry.packed.bits_per_element)
        self._account(entry, t, raw_bytes, stored, bits_used)
        return entry

    @property
    def uniform_codec(self) -> UniformCodec:
        """The per-group uniform codec policies share (its generator drives stochastic rounding)."""
        return self._uniform

    def current_module(self) -> tuple[str, nn.Module | None]:
        """(name, module) innermost in the forward right now (needs ``model=``; else ("-", None))."""
        if not self._module_stack:
            return "-", None
        label = self._module_stack[-1]
        return label, self._modules.get(label)

    def enclosing_modules(self) -> list[nn.Module]:
        """Every module whose forward is running right now, innermost first."""
        return [self._modules[l] for l in reversed(self._module_stack) if l in self._modules]

    def group_for(self, t: torch.Tensor) -> int:
        """Groups that follow the tensor's structure, so each gets its own range:
        - conv maps [N, C, H, W]: one channel plane (several small planes, to >= 64 elements),
          as BatchNorm's backward is sensitive to channels with a small spread;
        - (..., tokens, features) with 32..group_size features: one token row, as LayerNorm's
          backward is sensitive to rows with a small spread (e.g. a class token);
        - otherwise blocks of ``group_size``."""
        gs = self._uniform.group_size
        if t.dim() == 4 and t.is_contiguous():
            plane = t.shape[2] * t.shape[3]
            if plane >= 64:
                return plane if plane <= 16 * gs else gs
            if plane > 0:
                return plane * -(-64 // plane)
        d = t.shape[-1] if t.dim() >= 2 else 0
        if 32 <= d <= gs:
            return d
        return gs

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
        noisy = self._probe.get("noisy") if self._probe is not None else None
        if noisy is not None and entry.kind == "float" and entry.index == noisy:
            raw = entry.raw
            base = self._uniform.decode(self._uniform.encode(raw, bits=self._probe["bits"], group_size=self.group_for(raw)))
        elif noisy == "policy" and entry.kind == "float" and entry.raw is not None:
            packed = self.policy.encode(entry.index, entry.raw, self)  # every tensor as the policy would store it
            base = entry.raw if packed is None else self._codecs[packed.codec].decode(packed)
        else:
            base = entry.decode(self._codecs)
        if entry.full_storage:
            return base.as_strided(saved.size, saved.stride, saved.offset)
        return base

    # ------------------------------------------------------------------ accounting
    def _reset_counts(self) -> None:
        self._rows: dict[tuple[str, str, str], ReportRow] = {}
        self._raw_total = 0
        self._stored_total = 0

    def _account(self, entry: _Entry, t: torch.Tensor, raw: int, stored: int, bits: int) -> None:
        if self._probe is not None:
            return
        module = self._module_stack[-1] if self._module_stack else "-"
        kind = entry.kind if not (entry.kind == "float" and entry.packed is None) else "raw"
        key = (module, _producer(t), kind)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = ReportRow(*key)
        row.count += 1
        row.numel += t.numel() if not entry.full_storage else raw // max(t.element_size(), 1)
        row.raw_bytes += raw
        row.stored_bytes += stored
        if kind == "float":
            row.bit_sum += bits * (raw // max(t.element_size(), 1))
        self._raw_total += raw
        self._stored_total += stored
        self._live_raw += raw
        self._live_stored += stored
        self._peak_raw = max(self._peak_raw, self._live_raw)
        self._peak_stored = max(self._peak_stored, self._live_stored)
        entry.on_free = _Release(self, raw, stored)

    def report(self) -> MemoryReport:
        """Saved-tensor memory of the forward passes since the last :meth:`step` (right after a
        step: the step just finished)."""
        if not self._rows and self._last_report is not None:
            return self._last_report
        return MemoryReport(
            method=self.policy.describe(),
            raw_bytes=self._raw_total,
            stored_bytes=self._stored_total,
            peak_raw_bytes=self._peak_raw,
            peak_stored_bytes=self._peak_stored,
            rows=list(self._rows.values()),
        )

    @property
    def live_bytes(self) -> tuple[int, int]:
        """(raw, stored) bytes of saved tensors alive right now."""
        return self._live_raw, self._live_stored

    # ------------------------------------------------------------------ modules
    def _watch_modules(self, model: nn.Module) -> None:
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

    # ------------------------------------------------------------------ adaptation
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> None:
        """End of a training step: starts a new per-step report; adaptive methods re-estimate.

        ``closure`` recomputes the loss on a batch (forward only, no backward); GACT calls it
        every ``interval`` steps to measure per-tensor sensitivities. Without it GACT keeps its
        current widths."""
        if self.policy.adaptive and closure is not None and self.policy.due(self._steps):
            self.estimate(closure)
        self._steps += 1
        if self._rows:
            self._last_report = self.report()
        self._reset_counts()

    def estimate(self, closure: Callable[[], torch.Tensor]) -> dict[int, float]:
        """Measure per-tensor gradient sensitivities on one batch and let the adaptive policy
        (GACT: bits, COMET: error bounds) re-decide; returns {index: c_l}."""
        if not self.policy.adaptive:
            raise RuntimeError(f"method {self.method!r} has nothing to estimate")
        if self.model is None:
            raise ValueError(f"{self.method} needs model= to measure sensitivities (the gradient w.r.t. its parameters)")
        params = [p for p in self.model.parameters() if p.requires_grad]
        buffers = {k: v.clone() for k, v in self.model.state_dict().items() if not isinstance(v, nn.Parameter)}
        self._probe = {"stats": {}, "bits": None, "noisy": None}
        measured: dict[int, float] = {}
        try:
            with self:
                loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
                raise TypeError("the estimate closure must return the scalar loss of a forward pass (no backward)")
            exact = flat_grad(loss, params)
            stats: dict[int, TensorStat] = self._probe["stats"]
            draws = self.policy.probe_draws
            for i in self.policy.probe_order(sorted(stats)):
                bits = self.policy.probe_bits or stats[i].min_bits  # probe where the decision is hardest
                self._probe["noisy"], self._probe["bits"] = i, bits
                err = sum(float((flat_grad(loss, params) - exact).pow(2).sum()) for _ in range(draws)) / draws
                variance = stats[i].rsq / float((1 << bits) - 1) ** 2
                measured[i] = err / variance if variance > 0 else 0.0
            self.policy.update(stats, measured, grad_sq=float(exact.pow(2).sum()))
            if hasattr(self.policy, "calibrate"):  # closed loop: the policy checks its whole setting
                self._probe["noisy"] = "policy"

                def rel_error() -> float:
                    err = sum(float((flat_grad(loss, params) - exact).pow(2).sum()) for _ in range(draws)) / draws
                    return (err / max(float(exact.pow(2).sum()), 1e-30)) ** 0.5

                self.policy.calibrate(rel_error)
            del loss
        finally:
            self._probe = None
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    if k in buffers:
                        v.copy_(buffers[k])
        return measured

    def _probe_stat(self, index: int, base: torch.Tensor) -> None:
        gs = self.group_for(base)
        mins, maxs = group_minmax(base.detach().reshape(-1).float().contiguous(), gs)
        counts = torch.full_like(mins, float(gs))
        counts[-1] = base.numel() - gs * (len(mins) - 1)
        rsq = float((counts * (maxs - mins).pow(2)).sum()) / 4.0
        # ReLU-like tensors (groups with minimum exactly 0) lose their zeros at 1 bit: never go below 2
        min_bits = 2 if float((mins == 0).float().mean()) > 0.5 else 1
        self._probe["stats"][index] = TensorStat(numel=base.numel(), rsq=rsq, min_bits=min_bits)

    @property
    def bit_allocation(self) -> dict[int, int]:
        """GACT's current {tensor index: bits} (empty before the first estimate)."""
        return dict(getattr(self.policy, "assigned", {}))
