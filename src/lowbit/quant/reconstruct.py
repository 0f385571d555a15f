"""Output reconstruction for post-training quantization (AdaRound / BRECQ style).

A *unit* is a part of the model (one layer or a whole block such as a residual block or a
transformer block) whose quantized layers learn together: each weight's rounding direction
(``AdaRoundWeight``) and, for AQuant, each input's rounding border (``BorderQuantizer``), so that
the quantized unit's output on the inputs coming from the already quantized part of the model
matches the float unit's output on float inputs. Matching the quantized-model inputs to the float
target is what accounts for the error propagated from earlier units.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lowbit.blocks import block_of, repeated_blocks
from lowbit.quant.quantizers import BorderQuantizer, Quantizer

_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1
BORDER_LR_RATIO = 0.1
DEFAULT_ITERS = 60  # most optimisation steps per unit (AQuant's borders: half as many more)
DEFAULT_PATIENCE = 2  # stop a stage after this many checks without a better hard-rounded error
CHECK_EVERY = 10  # steps between two early-stopping checks


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


class AdaRoundWeight(Quantizer):
    """Learned up/down rounding of a weight on its per-output-channel grid of ``bits``:
    w_q = s * clamp(floor((w - o) / s) + h(v), lo, hi) + o, h a stretched sigmoid of a learned v
    per weight, initialised so that h(v) equals the fractional part (the soft weight starts at
    the float weight; the hard one at round-to-nearest). bits >= 2: the symmetric grid
    s * {-qmax..qmax} (o = 0, s = max|w| / qmax); bits = 1: the two levels -a, +a with
    a = mean|w| (s = 2a, o = -a, {lo, hi} = {0, 1}), the binary weights of ``rtn_weight``, where
    learning the rounding means learning each weight's sign. ``soft`` selects h(v) (learning) or
    the step h(v) >= 0.5 (the final rounding). The weight argument of forward is ignored: the
    grid and the floor are fixed at construction."""

    def __init__(self, weight: torch.Tensor, bits: int):
        super().__init__()
        self._set_bits(bits, 1, "weight")
        w = weight.detach()
        dims = tuple(range(1, w.dim()))
        if bits == 1:
            alpha = w.abs().mean(dims, keepdim=True).clamp_min(1e-12)
            scale, offset, self.lo, self.hi = 2 * alpha, -alpha, 0, 1
        else:
            qmax = 2 ** (bits - 1) - 1
            scale = w.abs().amax(dims, keepdim=True).clamp_min(1e-12) / qmax
            offset, self.lo, self.hi = torch.zeros_like(scale), -qmax, qmax
        base = torch.floor((w - offset) / scale)
        frac = ((w - offset) / scale - base).clamp(0.01, 0.99)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("base", base)
        self.v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1))
        self.soft = False

    def rounding(self) -> torch.Tensor:
        """The amount added to floor(w / s): soft in [0, 1], or hard 0/1."""
        h = _h(self.v)
        return h if self.soft else (h >= 0.5).to(h.dtype)

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * torch.clamp(self.base + self.rounding(), self.lo, self.hi) + self.offset

    def regulariser(self, beta: float) -> torch.Tensor:
        """sum(1 - |2h - 1|^beta): zero only when every h is exactly 0 or 1."""
        return (1 - (2 * _h(self.v) - 1).abs().pow(beta)).sum()

    def num_scales(self, weight: torch.Tensor) -> int:
        return weight.shape[0]


def find_units(model: nn.Module, layer_names: list[str], granularity: str = "block") -> list[tuple[str, list[str]]]:
    """Group the layers to quantize into reconstruction units, in model order.

    granularity "layer": every layer alone. "block": the repeated block the layer lies in
    (``lowbit.blocks.repeated_blocks``: a ResNet's residual blocks, GPT-2's ``h.*``, BERT's
    ``encoder.layer.*``, Llama's ``layers.*``, wherever they are nested); a layer in no block is
    its own unit. Returns [(unit module name, [layer names in it])]."""
    if granularity not in ("block", "layer"):
        raise ValueError(f"unknown reconstruction granularity {granularity!r}: choose 'block' or 'layer'")
    blocks = [b for b, _ in repeated_blocks(model)] if granularity == "block" else []
    units: dict[str, list[str]] = {}
    for name in layer_names:
        units.setdefault(block_of(name, blocks) or name, []).append(name)
    return list(units.items())


class _Captured(Exception):
    pass


def _is_cache(v) -> bool:
    """A transformers KV cache object: not passed again when a block is re-run on its own."""
    return type(v).__name__.endswith("Cache")


def _merge(values: list, sizes: list[int]):
    """One argument's values over the calibration batches: per-sample tensors (first dim = the
    batch's rows) concatenated, anything else (masks broadcast over the batch, flags) shared."""
    first = values[0]
    if torch.is_tensor(first):
        if all(torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n for v, n in zip(values, sizes)):
            return _PerSample(torch.cat(values))
        return first
    if isinstance(first, tuple) and all(isinstance(v, tuple) and len(v) == len(first) for v in values):
        return tuple(_merge([v[i] for v in values], sizes) for i in range(len(first)))
    return None if _is_cache(first) else first


class _PerSample:
    def __init__(self, t: torch.Tensor):
        self.t = t


def _select(v, idx: torch.Tensor):
    if isinstance(v, _PerSample):
        return v.t[idx]
    if isinstance(v, tuple):
        return tuple(_select(x, idx) for x in v)
    return v


class UnitInputs:
    """Everything a unit was called with on the calibration set (positional and keyword
    arguments: GPT-2's causal mask, Llama's rotary embeddings, ...), per-sample tensors stacked,
    so the unit can be re-run alone on any subset of rows (``call(unit, idx)``). KV caches are
    dropped and ``use_cache`` is off: a re-run must not grow a cache."""

    def __init__(self, args: list[tuple], kwargs: list[dict]):
        sizes = [a[0].shape[0] for a in args]
        self.rows = sum(sizes)
        self.args = tuple(_merge([a[i] for a in args], sizes) for i in range(len(args[0])))
        self.kwargs = {k: _merge([kw[k] for kw in kwargs], sizes) for k in kwargs[0]}
        if "use_cache" in self.kwargs:
            self.kwargs["use_cache"] = False
        self.output: torch.Tensor | None = None  # the unit's own output on these rows, where recorded

    def __len__(self) -> int:
        return self.rows

    @property
    def x(self) -> torch.Tensor:
        """The first positional input [rows, ...] (the hidden states / feature map)."""
        return self.args[0].t

    def call(self, unit: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        """unit's output on rows ``idx`` (the first element when the unit returns a tuple)."""
        out = unit(*(_select(a, idx) for a in self.args), **{k: _select(v, idx) for k, v in self.kwargs.items()})
        return out[0] if isinstance(out, (tuple, list)) else out


def _no_cache(model: nn.Module):
    """Turn a transformers model's ``config.use_cache`` off while calibrating (restored after)."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "use_cache", None)
    if old is not None:
        cfg.use_cache = False
    return lambda: setattr(cfg, "use_cache", old) if old is not None else None


@torch.no_grad()
def capture_unit_inputs(model: nn.Module, unit: str, inputs: torch.Tensor, batch_size: int = 256) -> UnitInputs:
    """The arguments submodule ``unit`` receives when ``model`` runs on ``inputs`` (batched; the
    forward stops at the unit, so later parts cost nothing)."""
    args: list[tuple] = []
    kwargs: list[dict] = []

    def hook(mod, a, kw):
        args.append(tuple(x.detach() if torch.is_tensor(x) else x for x in a))
        kwargs.append(dict(kw))
        raise _Captured

    handle = model.get_submodule(unit).register_forward_pre_hook(hook, with_kwargs=True)
    restore = _no_cache(model)
    try:
        for i in range(0, len(inputs), batch_size):
            try:
                model(inputs[i : i + batch_size])
            except _Captured:
                pass
    finally:
        handle.remove()
        restore()
    if len(args) * batch_size < len(inputs) or not args or not torch.is_tensor(args[0][0] if args[0] else None):
        raise RuntimeError(f"{unit!r} did not run on every calibration batch with a tensor input: "
                           f"it cannot be reconstructed on its own")
    return UnitInputs(args, kwargs)


@torch.no_grad()
def capture_all_unit_inputs(model: nn.Module, units: list[str], inputs: torch.Tensor,
                            batch_size: int = 256) -> dict[str, tuple[UnitInputs, bool]]:
    """``capture_unit_inputs`` for every unit in one pass over the calibration set, with, per
    unit, whether its first input is the previous unit's output itself (the blocks of a stack
    feed each other directly), so the quantized model's inputs can be carried forward block to
    block instead of re-running the model's prefix for every unit. Each unit's own float output
    (the first element of a tuple) is kept as ``UnitInputs.output``, the reconstruction target,
    so no unit is run again for it (a chained unit's output is the next unit's input: stored once)."""
    got: dict[str, tuple[list, list]] = {u: ([], []) for u in units}
    outs: dict[str, list[torch.Tensor]] = {u: [] for u in units}
    chained = {u: i > 0 for i, u in enumerate(units)}
    last: dict[str, object] = {}

    def pre(u: str, i: int):
        def hook(mod, a, kw):
            got[u][0].append(tuple(x.detach() if torch.is_tensor(x) else x for x in a))
            got[u][1].append(dict(kw))
            if i > 0 and not (a and a[0] is last.get(units[i - 1])):
                chained[u] = False
        return hook

    def post(u: str):
        def hook(mod, a, kw, out):
            last[u] = out[0] if isinstance(out, (tuple, list)) else out
            outs[u].append(last[u].detach() if torch.is_tensor(last[u]) else None)
        return hook

    handles = []
    for i, u in enumerate(units):
        m = model.get_submodule(u)
        handles += [m.register_forward_pre_hook(pre(u, i), with_kwargs=True),
                    m.register_forward_hook(post(u), with_kwargs=True)]
    restore = _no_cache(model)
    try:
        for i in range(0, len(inputs), batch_size):
            model(inputs[i : i + batch_size])
            last.clear()
    finally:
        for h in handles:
            h.remove()
        restore()
    out = {}
    for u in units:
        a, kw = got[u]
        if len(a) * batch_size < len(inputs) or not a or not a[0] or not torch.is_tensor(a[0][0]):
            raise RuntimeError(f"{u!r} did not run on every calibration batch with a tensor input: "
                               f"it cannot be reconstructed on its own")
        out[u] = (UnitInputs(a, kw), chained[u])
    for i, u in enumerate(units):
        nxt = units[i + 1] if i + 1 < len(units) else None
        if nxt is not None and chained[nxt]:
            out[u][0].output = out[nxt][0].x
        elif outs[u] and all(torch.is_tensor(o) and o.dim() > 0 for o in outs[u]) \
                and sum(o.shape[0] for o in outs[u]) == len(out[u][0]):
            out[u][0].output = torch.cat(outs[u])
        outs[u] = []
    return out


def _with_first(x: UnitInputs, first: torch.Tensor) -> UnitInputs:
    """A copy of ``x`` whose first positional input is ``first`` [rows, ...]."""
    y = object.__new__(UnitInputs)
    y.rows, y.kwargs, y.output = x.rows, x.kwargs, None
    y.args = (_PerSample(first),) + x.args[1:]
    return y


@torch.no_grad()
def carry_forward(unit: nn.Module, x: UnitInputs, next_inputs: UnitInputs, chunk: int = 64) -> UnitInputs:
    """The next unit's inputs when it reads ``unit``'s output directly: ``next_inputs`` (its other
    arguments) with the first input replaced by unit(x), computed in chunks of rows."""
    out = torch.cat([x.call(unit, torch.arange(i, min(i + chunk, len(x)))) for i in range(0, len(x), chunk)])
    return _with_first(next_inputs, out)


def unit_inputs(model: nn.Module, unit: str, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The first positional input of submodule ``unit`` when ``model`` runs on ``inputs``."""
    return capture_unit_inputs(model, unit, inputs, batch_size).x


def _as_inputs(x) -> UnitInputs:
    if isinstance(x, UnitInputs):
        return x
    if not torch.is_tensor(x):
        raise TypeError(f"unit inputs must be a tensor or UnitInputs, got {type(x).__name__}")
    return UnitInputs([(x,)], [{}])


def default_rows(x: UnitInputs, positions: int = 512, most: int = 64, least: int = 8) -> int:
    """Calibration rows per reconstruction step: about ``positions`` output positions (tokens of
    a [rows, seq, hidden] input, pixels of a [rows, C, H, W] one) per step, between ``least`` and
    ``most`` rows (a 128-token transformer block: the floor of 8 rows; 28 x 28 images: 8), so
    a step on a transformer block costs about what one on a small image block does."""
    t = x.x
    per_row = t.shape[2] * t.shape[3] if t.dim() == 4 else (t.shape[1] if t.dim() == 3 else 1)
    return int(min(most, max(least, positions // max(per_row, 1))))


def reconstruct(unit_q: nn.Module, unit_fp: nn.Module, x_fp: torch.Tensor | UnitInputs, x_q: torch.Tensor | UnitInputs,
                iters: int = DEFAULT_ITERS, lr: float = 1e-2, reg: float = 0.01, batch: int | None = None, seed: int = 0,
                on_step: Callable[[], None] | None = None, border_iters: int | None = None,
                patience: int = DEFAULT_PATIENCE, target: torch.Tensor | None = None) -> float:
    """Learn the rounding of every ``AdaRoundWeight`` and the border of every ``BorderQuantizer``
    inside ``unit_q`` so that unit_q(x_q) matches unit_fp(x_fp) (squared error summed per sample,
    averaged over a batch of ``batch`` calibration rows; None: ``default_rows``, about 512
    positions per step and at least 8 rows). x_fp / x_q: the unit's first input [rows, ...] or everything it was
    called with (``capture_unit_inputs``: masks, rotary embeddings). ``target``: unit_fp's output
    on x_fp [rows, ...] when the caller already has it (``capture_all_unit_inputs`` records it);
    otherwise it is computed once. ``on_step`` is called after every optimisation step (progress
    bars). Only the rounding variables and borders take gradients: every other parameter of the
    unit is frozen while it learns (restored after).

    1. Weights: at most ``iters`` steps of the error plus reg * the rounding regulariser, beta
       annealed from 20 to 2 after a 20% warm-up, which drives every h to 0 or 1; the activations
       are rounded hard (borders at plain rounding, straight-through gradient), as at inference.
       Then every weight is baked: its AdaRoundWeight is removed and ``weight`` holds the
       hard-rounded values on the grid. Without borders this is AdaRound (BRECQ for whole blocks).
    2. Borders (AQuant), the weights fixed: at most ``border_iters`` steps (None: ``iters // 2``)
       with a soft border that sharpens (temperature 0.2 -> 0.01), then frozen hard. Learning
       borders and weights together would fit the weights to the soft rounding, not to the hard
       one they meet at inference (it cost up to a point of accuracy at W2A4).

    Both stages keep the best of their start (round to nearest; plain rounding) and what they
    learned, judged by the error with *hard* rounding (what inference sees) on fixed check rows,
    so the result is never worse there than round to nearest. The border stage also stops early:
    every ``CHECK_EVERY`` steps it measures that error, keeps the best borders seen, and ends once
    ``patience`` checks in a row bring no improvement (``patience=0``: never stop early). The
    weights' stage runs in full: its hard error only falls once the annealed regulariser has
    pushed the rounding to 0 / 1, in its last steps.
    Returns the final reconstruction error (hard rounding, a batch of calibration rows)."""
    x_fp, x_q = _as_inputs(x_fp), _as_inputs(x_q)
    if len(x_fp) != len(x_q) or len(x_fp) == 0:
        raise ValueError(f"x_fp and x_q must hold the same, non-zero number of rows, got {len(x_fp)} and {len(x_q)}")
    if iters < 0 or patience < 0 or (border_iters is not None and border_iters < 0):
        raise ValueError(f"iters, border_iters and patience must be >= 0, got {iters}, {border_iters}, {patience}")
    layers = [m for m in unit_q.modules() if isinstance(getattr(m, "weight_quantizer", None), AdaRoundWeight)]
    borders = [m for m in unit_q.modules() if isinstance(m, BorderQuantizer)]
    unit_fp.eval()
    unit_q.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = min(batch or default_rows(x_q), len(x_fp))
    if target is None:
        with torch.no_grad():
            chunk = 64
            target = torch.cat([x_fp.call(unit_fp, torch.arange(i, min(i + chunk, len(x_fp))))
                                for i in range(0, len(x_fp), chunk)])
    elif target.shape[0] != len(x_fp):
        raise ValueError(f"target holds {target.shape[0]} rows, the inputs {len(x_fp)}")
    target_all = target.detach()
    check = torch.randperm(len(x_fp), generator=gen)[: max(rows, min(len(x_fp), 2 * rows))]

    def error(idx: torch.Tensor) -> torch.Tensor:
        return (x_q.call(unit_q, idx) - target_all[idx]).pow(2).flatten(1).sum(1).mean()

    learned = {id(q.v) for q in (m.weight_quantizer for m in layers)} | {id(p) for b in borders for p in (b.a, b.b)}
    frozen = [p for p in unit_q.parameters() if p.requires_grad and id(p) not in learned]
    for p in frozen:  # no gradient for weights, biases, norms: only the rounding variables learn
        p.requires_grad_(False)
    try:
        if layers:
            _learn_rounding(layers, error, len(x_fp), iters, lr, reg, rows, gen, check, on_step)
        if borders:
            b_iters = iters // 2 if border_iters is None else border_iters
            _learn_borders(borders, error, len(x_fp), b_iters, lr * BORDER_LR_RATIO, rows, gen, check, patience, on_step)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        return float(error(torch.randint(0, len(x_fp), (rows,), generator=gen)))


class _Best:
    """Early stopping on the hard-rounded error of the check rows: remembers the best state of
    ``params`` and counts the checks since it last improved."""

    def __init__(self, params: list[torch.Tensor], error: Callable[[], float]):
        self.params, self.error = params, error
        self.best, self.state, self.stale = float("inf"), None, 0
        self.update()

    @torch.no_grad()
    def update(self) -> None:
        e = self.error()
        if e < self.best * (1 - 1e-4):
            self.best, self.state, self.stale = e, [p.detach().clone() for p in self.params], 0
        else:
            self.stale += 1

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in zip(self.params, self.state):
            p.copy_(v)


def _learn_rounding(layers: list, error, n: int, iters: int, lr: float, reg: float, rows: int, gen: torch.Generator,
                    check: torch.Tensor, on_step: Callable[[], None] | None) -> None:
    """Stage 1 of ``reconstruct``: AdaRound's rounding variables, then baked into the weights.
    The hard-rounded error only falls once the annealed regulariser has pushed h to 0 / 1 (the
    last steps), so this stage runs its ``iters`` in full; the learned rounding is kept if it
    beats round to nearest (the start) on the check rows."""
    quantizers = [m.weight_quantizer for m in layers]
    params = [q.v for q in quantizers]

    def hard_error() -> float:
        for q in quantizers:
            q.soft = False
        return float(error(check))

    warm = int(0.2 * iters)
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        best = _Best(params, hard_error)
        for q in quantizers:
            q.soft = True
        for it in range(iters):
            loss = error(torch.randint(0, n, (rows,), generator=gen))
            if it >= warm:
                beta = 20 - (20 - 2) * (it - warm) / max(iters - warm, 1)
                loss = loss + reg * sum(q.regulariser(beta) for q in quantizers)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()
    with torch.no_grad():
        best.update()
        best.restore()
        for m in layers:
            m.weight_quantizer.soft = False
            m.weight.copy_(m.weight_quantizer())
            m.weight_quantizer = None


def _skip(on_step: Callable[[], None] | None, steps: int) -> None:
    """Advance a progress bar over the steps an early stop saved."""
    if on_step is not None:
        for _ in range(steps):
            on_step()


def _learn_borders(borders: list, error, n: int, iters: int, lr: float, rows: int, gen: torch.Generator,
                   check: torch.Tensor, patience: int = 0, on_step: Callable[[], None] | None = None) -> None:
    """Stage 2 of ``reconstruct``: AQuant's border functions (the weights fixed)."""
    params = [p for b in borders for p in (b.a, b.b)]

    def hard_error() -> float:
        for b in borders:
            b.soft = False
        return float(error(check))

    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        best = _Best(params, hard_error)  # zero borders: plain rounding
        for it in range(iters):
            for b in borders:
                b.soft, b.tau = True, 0.2 * (0.05 ** (it / max(iters - 1, 1)))
            loss = error(torch.randint(0, n, (rows,), generator=gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()
            if (it + 1) % CHECK_EVERY == 0 or it == iters - 1:
                best.update()
                if patience and best.stale >= patience and it < iters - 1:
                    _skip(on_step, iters - it - 1)
                    break
    with torch.no_grad():
        for b in borders:
            b.soft = False
        for p in params:
            p.requires_grad_(False)
        best.restore()
        # guard on more rows than the check: keep the borders only where they beat plain rounding
        wide = torch.arange(min(n, 8 * rows))
        learned = float(error(wide))
        kept = [(p, p.clone()) for p in params]
        for p in params:
            p.zero_()
        if learned < float(error(wide)):
            for p, v in kept:
                p.copy_(v)
