"""Quantizers: small modules that map a float tensor to the values a method allows.

A weight quantizer takes the latent float weight [C_out, ...] and returns the tensor the layer's
forward uses; an input quantizer takes the layer input. Both may hold parameters (LSQ steps, the
FDA noise-adaptation module), follow the training progress (DIR-Net's tanh schedule, HQ's pruning
schedule) and add a loss term (PTQ). ``storage_bits`` / ``num_scales`` say what the weight needs
when packed, so ``model_size`` can count it.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.functions import (
    GradQuant,
    SignClippedSTE,
    SignFourier,
    SignSTE,
    SignTanh,
    lsq_quantize,
    round_ste,
)

ESTIMATORS = ("ste", "clipped", "fourier", "tanh")


def _channel_dims(w: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, w.dim()))


class Quantizer(nn.Module):
    """Base class. ``progress`` in [0, 1] is the fraction of training done (saved in state_dict)."""

    storage_bits: float = 32.0

    def __init__(self):
        super().__init__()
        self.register_buffer("progress", torch.zeros(()), persistent=True)

    def set_progress(self, fraction: float, weight: nn.Parameter | None = None) -> None:
        self.progress.fill_(float(min(max(fraction, 0.0), 1.0)))

    def penalty(self, weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """Extra training loss term (None when the method has none)."""
        return None

    def num_scales(self, weight: torch.Tensor) -> int:
        """How many float32 scales the packed weight needs."""
        return 0

    def _set_bits(self, bits: int, lowest: int, what: str) -> None:
        """Check a width is in lowest..16 (naming ``what`` in the error) and store it."""
        if not lowest <= bits <= 16:
            raise ValueError(f"{what} bits must be in {lowest}..16, got {bits}")
        self.bits, self.storage_bits = bits, float(bits)

    def extra_repr(self) -> str:
        return f"bits={self.storage_bits:g}"


class SignQuantizer(Quantizer):
    """sign(x) with a chosen backward estimator.

    estimator: "ste" (identity), "clipped" (1{|x|<=1}, QNN), "fourier" (FDA-BNN: ``omega``,
    ``terms``), "tanh" (DIR-Net/IR-Net: k*tanh(t x) with t going from ``t_min`` to ``t_max``
    geometrically over training and k = max(1/t, 1): first a wide gradient, then close to sign).
    """

    storage_bits = 1.0

    def __init__(self, estimator: str = "clipped", omega: float = 0.1, terms: int = 10, clip: float | None = 1.0,
                 t_min: float = 0.1, t_max: float = 10.0):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown sign estimator {estimator!r}: choose one of {ESTIMATORS}")
        if terms < 1 or omega <= 0:
            raise ValueError(f"fourier estimator needs terms >= 1 and omega > 0, got terms={terms}, omega={omega}")
        self.estimator, self.omega, self.terms, self.clip = estimator, omega, terms, clip
        self.t_min, self.t_max = t_min, t_max

    def tanh_schedule(self) -> tuple[float, float]:
        """(t, k) of the DTE estimator at the current progress."""
        p = float(self.progress)
        t = self.t_min * 10 ** (p * math.log10(self.t_max / self.t_min))
        return t, max(1.0 / t, 1.0)

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        if self.estimator == "ste":
            return SignSTE.apply(x)
        if self.estimator == "clipped":
            return SignClippedSTE.apply(x, 1.0 if self.clip is None else self.clip)
        if self.estimator == "fourier":
            return SignFourier.apply(x, self.omega, self.terms, self.clip)
        t, k = self.tanh_schedule()
        return SignTanh.apply(x, t, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.binarize(x)

    def extra_repr(self) -> str:
        return f"estimator={self.estimator}"


class BinaryWeight(SignQuantizer):
    """Binary weights alpha_c * sign(w) (two values per output channel).

    scale: "none" (QNN/BNN, +-1), "mean" (BWN/XNOR-Net: alpha_c = mean |w_c|, gradient through
    alpha as in the paper), "pow2" (DIR-Net: 2^round(log2 mean |w_c|)). ``standardize`` is
    DIR-Net's information-maximizing binarization: w is centred and divided by its std per channel
    first, so half the weights are +1 (maximum entropy) and the scale stays well conditioned."""

    def __init__(self, scale: str = "mean", standardize: bool = False, **kw):
        super().__init__(**kw)
        if scale not in ("none", "mean", "pow2"):
            raise ValueError(f"unknown binary weight scale {scale!r}: choose 'none', 'mean' or 'pow2'")
        self.scale, self.standardize = scale, standardize

    def factors(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(signs b [shape of w], per-channel scale alpha [C_out, 1, ...] or None): w_q = b * alpha.
        Layers multiply by b and scale the output by alpha, so a binary product is an exact
        integer in float, as in the packed XOR-popcount kernels (bit-identical outputs)."""
        dims = _channel_dims(w)
        if self.standardize:
            w = (w - w.mean(dims, keepdim=True)) / (w.std(dims, keepdim=True) + 1e-8)
        b = self.binarize(w)
        if self.scale == "none":
            return b, None
        alpha = w.abs().mean(dims, keepdim=True)
        if self.scale == "pow2":
            alpha = torch.exp2(torch.round(torch.log2(alpha.detach().clamp_min(1e-12))))
        return b, alpha

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        b, alpha = self.factors(w)
        return b if alpha is None else b * alpha

    def num_scales(self, w: torch.Tensor) -> int:
        return 0 if self.scale == "none" else w.shape[0]

    def extra_repr(self) -> str:
        return f"estimator={self.estimator}, scale={self.scale}, standardize={self.standardize}"


class NoiseAdaptation(nn.Module):
    """FDA-BNN's noise adaptation module: a small residual path e(x) = W2 relu(W1 x) over channels
    (1x1 convs for [N, C, H, W], linears for [N, F]) that absorbs the error between sign and its
    truncated Fourier series during training. lowbit's reading: it is added to the binarised value
    in training with a weight (1 - progress), so it fades out and inference uses sign alone."""

    def __init__(self, channels: int, conv: bool, reduction: int = 4):
        super().__init__()
        hidden = max(channels // reduction, 1)
        if conv:
            self.net = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False))
        else:
            self.net = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, channels, bias=False))
        nn.init.zeros_(self.net[2].weight)  # starts as the plain Fourier estimator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and isinstance(self.net[0], nn.Conv2d):  # a Conv1d's input [N, C, L]
            return self.net(x.unsqueeze(-2)).squeeze(-2)
        return self.net(x)


class BinaryActivation(SignQuantizer):
    """Binary inputs sign(x). ``xnor_scale``: XNOR-Net's input scaling — the layer output is
    multiplied by K, the box-filtered mean over channels of |x| (one beta per output position).
    ``noise_channels``: add FDA's noise adaptation module for inputs with that many channels."""

    binary_input = True  # the layer's input is exactly +-1 (noise adaptation is training-only)

    def __init__(self, xnor_scale: bool = False, noise_channels: int | None = None, noise_conv: bool = True, **kw):
        super().__init__(**kw)
        self.xnor_scale = xnor_scale
        self.noise = NoiseAdaptation(noise_channels, noise_conv) if noise_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.binarize(x)
        if self.noise is not None and self.training:
            b = b + (1.0 - float(self.progress)) * self.noise(x)
        return b

    def output_scale(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor | None:
        """XNOR-Net's K for the layer's output ([N, 1, H', W'] for conv, [N, 1] for linear)."""
        if not self.xnor_scale:
            return None
        a = x.abs().mean(1, keepdim=True)
        if isinstance(layer, nn.Conv2d):
            return F.avg_pool2d(a, layer.kernel_size, layer.stride, layer.padding, count_include_pad=True)
        if isinstance(layer, nn.Conv1d):
            return F.avg_pool1d(a, layer.kernel_size, layer.stride, layer.padding, count_include_pad=True)
        return x.abs().mean(-1, keepdim=True)

    def extra_repr(self) -> str:
        return f"estimator={self.estimator}, xnor_scale={self.xnor_scale}, noise_adaptation={self.noise is not None}"


class UniformWeight(Quantizer):
    """DoReFa / QNN k-bit weights: w' = tanh(w) / max|tanh(w)| in [-1, 1], rounded onto 2^k uniform
    levels (STE). k = 1 is sign(w) * mean|w|."""

    def __init__(self, bits: int = 2):
        super().__init__()
        self._set_bits(bits, 1, "UniformWeight")

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:
            return SignSTE.apply(w) * w.abs().mean()
        t = torch.tanh(w)
        t = t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5  # [0, 1]
        n = 2**self.bits - 1
        return 2 * (round_ste(t * n) / n) - 1

    def num_scales(self, w: torch.Tensor) -> int:
        return 1


class UniformActivation(Quantizer):
    """QNN / DoReFa k-bit activations: clip to [0, 1], round onto 2^k - 1 steps; backward is the
    clipped STE (zero outside [0, 1])."""

    def __init__(self, bits: int = 2):
        super().__init__()
        self._set_bits(bits, 1, "UniformActivation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        return round_ste(torch.clamp(x, 0, 1) * n) / n


class LSQ(Quantizer):
    """Learned step size quantization: step * round(clamp(x / step, qmin, qmax)).

    ``signed=None`` decides on the first batch (unsigned when it has no negative value, as for ReLU
    outputs). ``per_channel``: one step per output channel (weights). The step is initialised
    from the first tensor seen, 2 * mean|x| / sqrt(qmax), and then learned."""

    def __init__(self, bits: int = 8, signed: bool | None = True, per_channel: bool = False, channels: int = 1):
        super().__init__()
        self._set_bits(bits, 2, "LSQ")
        self.per_channel = per_channel
        self.step = nn.Parameter(torch.ones(channels if per_channel else 1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.tensor(-1 if signed is None else int(signed)))

    def _range(self) -> tuple[int, int]:
        if int(self.signed) == 1:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                if int(self.signed) == -1:
                    self.signed.fill_(int(bool((x < 0).any())))
                qmax = self._range()[1]
                dims = _channel_dims(x) if self.per_channel else tuple(range(x.dim()))
                init = 2 * x.detach().abs().mean(dims) / math.sqrt(qmax)
                self.step.copy_(init.reshape(self.step.shape).clamp_min(1e-8))
                self.initialized.fill_(True)
        qmin, qmax = self._range()
        step = self.step.reshape(-1, *([1] * (x.dim() - 1))) if self.per_channel else self.step
        per_step = x.numel() / self.step.numel()
        return lsq_quantize(x, step.abs() + 1e-12, qmin, qmax, 1.0 / math.sqrt(per_step * qmax))

    def num_scales(self, w: torch.Tensor) -> int:
        return self.step.numel()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


def straight_through(value: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """``value`` exactly in the forward, identity gradient to ``latent`` (value + (w - w) is exact,
    unlike w + (value - w))."""
    return value.detach() + (latent - latent.detach())


def _keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for the (1 - sparsity) share of entries with the largest score (exact count)."""
    n = score.numel()
    k = int(round(sparsity * n))
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(score, dtype=torch.bool)
    idx = torch.topk(score.reshape(-1), n - k, sorted=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=score.device)
    mask[idx] = True
    return mask.reshape(score.shape)


def _ternary(w: torch.Tensor, keep: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """alpha * sign(w) on kept entries, 0 elsewhere; alpha = mean |w| over kept (per channel or
    per tensor). Straight-through: the gradient reaches every latent weight."""
    dims = _channel_dims(w) if per_channel else tuple(range(w.dim()))
    keepf = keep.to(w.dtype)
    alpha = (w.abs() * keepf).sum(dims, keepdim=True) / keepf.sum(dims, keepdim=True).clamp_min(1)
    t = torch.sign(w) * keepf * alpha
    return straight_through(t, w)


def _unit_channels(w: torch.Tensor) -> torch.Tensor:
    """w [C_out, ...] with each output channel scaled to unit L2 norm (on the hypersphere)."""
    return w / w.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *([1] * (w.dim() - 1)))


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


class _TernaryFactory(type):
    """Lets ``TernaryWeight("hq", sparsity=0.5)`` build the class of that method (a shortcut kept
    for recipes and users); the method classes themselves are built as usual."""

    def __call__(cls, *args, **kwargs):
        if cls is TernaryWeight:
            return ternary_weight(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class TernaryWeight(Quantizer, metaclass=_TernaryFactory):
    """Ternary weights alpha * {-1, 0, +1}: the base of the three methods below, each its own class.

    ``TernaryWeight(method, **options)`` is a shortcut for the method's class:
    "twn" -> :class:`ThresholdTernaryWeight`, "hq" -> :class:`HypersphericalTernaryWeight`,
    "ptq" -> :class:`PrunedTernaryWeight` (see :func:`ternary_weight`).
    """

    storage_bits = 2.0
    method: str = ""  # the shortcut's name of each method
    sparsity: float | None = None  # share of weights set to zero (None: set by a threshold)

    def num_scales(self, w: torch.Tensor) -> int:
        return w.shape[0]  # one alpha per output channel

    def extra_repr(self) -> str:
        return f"method={self.method}, sparsity={self.sparsity}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state_dicts written when one class held every method carry HQ's re-initialisation flag
        # for all three: a method without it ignores the flag instead of refusing the checkpoint
        if "reinitialized" not in self._buffers:
            state_dict.pop(prefix + "reinitialized", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ThresholdTernaryWeight(TernaryWeight):
    """TWN, the naive baseline: weights under 0.7 * mean|w_c| of their output channel c are set to
    zero, the rest to alpha_c * sign(w) with alpha_c the mean of the kept |w| (per channel)."""

    method = "twn"

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        keep = w.abs() > 0.7 * w.abs().mean(_channel_dims(w), keepdim=True)
        return _ternary(w, keep, per_channel=True)


class HypersphericalTernaryWeight(TernaryWeight):
    """HQ (hyperspherical quantization): weights L2-normalised per output channel, magnitude-pruned
    to ``sparsity`` with a cubic ramp during the first ``float_phase`` of training (a fraction of
    it, in [0, 1]) while they stay float, then re-initialised once (pruned entries set to zero,
    kept ones renormalised) and ternarised with alpha_c per channel."""

    method = "hq"

    def __init__(self, sparsity: float = 0.5, float_phase: float = 0.25):
        super().__init__()
        if isinstance(float_phase, bool) or not isinstance(float_phase, (int, float)) or not 0.0 <= float_phase <= 1.0:
            raise ValueError(f"float_phase must be a fraction of training in [0, 1], got {float_phase!r}")
        self.sparsity, self.float_phase = _check_sparsity(sparsity), float(float_phase)
        self.register_buffer("reinitialized", torch.zeros((), dtype=torch.bool))

    def _float_phase(self) -> bool:
        return float(self.progress) < self.float_phase

    def current_sparsity(self) -> float:
        """The pruned share now: ramps up as sparsity * (1 - (1 - r)^3), r the float phase done."""
        if self._float_phase():
            r = float(self.progress) / self.float_phase
            return self.sparsity * (1 - (1 - r) ** 3)
        return self.sparsity

    def set_progress(self, fraction: float, weight: nn.Parameter | None = None) -> None:
        super().set_progress(fraction, weight)
        if weight is not None and fraction >= self.float_phase and not bool(self.reinitialized):
            with torch.no_grad():  # HQ re-initialisation at the switch to ternary
                wn = _unit_channels(weight)
                weight.copy_(_unit_channels(wn * _keep_mask(wn.abs(), self.sparsity)))
            self.reinitialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wn = _unit_channels(w)
        keep = _keep_mask(wn.detach().abs(), self.current_sparsity())
        if self._float_phase():
            return wn * keep.to(w.dtype)  # float phase on the hypersphere, pruned
        return _ternary(wn, keep, per_channel=True)


class PrunedTernaryWeight(TernaryWeight):
    """PTQ (pruning ternary quantization): weights L2-normalised per output channel, pruned to
    ``sparsity`` by magnitude, symmetric ternary with one alpha per layer, plus a weight-decay
    term ``decay * sum((|w_hat| - alpha)^2 kept + w_hat^2 pruned)`` (:meth:`penalty`) that
    shrinks the float/ternary gap."""

    method = "ptq"

    def __init__(self, sparsity: float = 0.5, decay: float = 1e-3):
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
            raise ValueError(f"decay must be a number >= 0, got {decay!r}")
        self.sparsity, self.decay = _check_sparsity(sparsity), float(decay)

    def _kept(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wn = _unit_channels(w)
        return wn, _keep_mask(wn.detach().abs(), self.sparsity)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _ternary(*self._kept(w), per_channel=False)

    def penalty(self, w: torch.Tensor | None = None) -> torch.Tensor | None:
        if w is None or self.decay == 0:
            return None
        wn, keep = self._kept(w)
        keep = keep.to(w.dtype)
        alpha = ((wn.abs() * keep).sum() / keep.sum().clamp_min(1)).detach()
        return self.decay * (((wn.abs() - alpha) ** 2) * keep + wn**2 * (1 - keep)).sum()

    def num_scales(self, w: torch.Tensor) -> int:
        return 1  # one alpha per layer


TERNARY_METHODS: dict[str, type[TernaryWeight]] = {
    c.method: c for c in (ThresholdTernaryWeight, HypersphericalTernaryWeight, PrunedTernaryWeight)}


def ternary_weight(method: str = "twn", sparsity: float | None = None, float_phase: float | None = None,
                   decay: float | None = None) -> TernaryWeight:
    """The ternary quantizer of ``method`` ("twn", "hq" or "ptq"); options left as None take the
    method's default. An option the method does not take is an error, not silently ignored."""
    if method not in TERNARY_METHODS:
        raise ValueError(f"unknown ternary method {method!r}: choose one of {', '.join(map(repr, TERNARY_METHODS))}")
    cls = TERNARY_METHODS[method]
    given = {k: v for k, v in dict(sparsity=sparsity, float_phase=float_phase, decay=decay).items() if v is not None}
    takes = set(inspect.signature(cls.__init__).parameters) - {"self"}
    extra = sorted(set(given) - takes)
    if extra:
        raise ValueError(f"ternary method {method!r} ({cls.__name__}) takes no {', '.join(extra)}; "
                         f"its options: {', '.join(sorted(takes)) or 'none'}")
    return cls(**given)


class SparseBinaryWeight(Quantizer):
    """SBNN: binary weights where a ``sparsity`` share of each layer sits on the "sparse" value.

    The largest (1 - sparsity) share of the latent weights of a layer (by value) gets the bit 1.
    domain "01" (the SBNN paper): weights {0, alpha_c}, exactly ``sparsity`` of them zero.
    domain "general" (default; the authors' follow-up binary-domain generalisation): weights
    {beta_c, alpha_c} with alpha_c / beta_c the means of the latent weights holding bit 1 / bit 0.
    W = beta_c + (alpha_c - beta_c) * M with M the sparse 0/1 mask, so W x needs one shared sum of
    x per output position plus the sparse part: the compute and storage of a sparse binary net.
    It fixes what {0, 1} weights lose on +-1 inputs: every output then carries the same
    sum-of-inputs term, which BatchNorm cannot remove per sample (on 1000 digits, 3 epochs: 30%
    with "01" vs 73% with "general"). Straight-through backward."""

    storage_bits = 1.0

    def __init__(self, sparsity: float = 0.75, domain: str = "general"):
        super().__init__()
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        if domain not in ("general", "01"):
            raise ValueError(f"unknown sparse binary domain {domain!r}: choose 'general' or '01'")
        self.sparsity, self.domain = sparsity, domain

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        """The 0/1 pattern (float, shape of w) with exactly ``sparsity`` zeros."""
        return _keep_mask(w.detach(), self.sparsity).to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        m = self.mask(w)
        dims = _channel_dims(w)
        alpha = (w * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True).clamp_min(1)
        if self.domain == "01":
            return straight_through(m * alpha, w)
        beta = (w * (1 - m)).sum(dims, keepdim=True) / (1 - m).sum(dims, keepdim=True).clamp_min(1)
        return straight_through(beta + (alpha - beta) * m, w)

    def num_scales(self, w: torch.Tensor) -> int:
        return w.shape[0] * (1 if self.domain == "01" else 2)

    def extra_repr(self) -> str:
        return f"sparsity={self.sparsity}, domain={self.domain}"


class GradientQuantizer(Quantizer):
    """Identity forward; the gradient flowing back through it is quantized to ``bits`` bits
    (QNN / DoReFa stochastic rounding, per-sample max scaling)."""

    def __init__(self, bits: int = 6):
        super().__init__()
        self._set_bits(bits, 1, "gradient")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return GradQuant.apply(x, self.bits) if torch.is_grad_enabled() and x.requires_grad else x


__all__ = [
    "Quantizer", "SignQuantizer", "BinaryWeight", "BinaryActivation", "NoiseAdaptation", "UniformWeight",
    "UniformActivation", "LSQ", "TernaryWeight", "SparseBinaryWeight", "GradientQuantizer", "ESTIMATORS",
]


class FixedUniform(Quantizer):
    """Uniform quantization of x onto 2^bits levels of [lo, hi] (asymmetric; unsigned ranges keep 0
    exact); straight-through backward inside the range. lo/hi are buffers set by calibration."""

    def __init__(self, bits: int, lo: float = 0.0, hi: float = 1.0):
        super().__init__()
        self._set_bits(bits, 2, "activation")
        self.register_buffer("lo", torch.tensor(float(lo)))
        self.register_buffer("hi", torch.tensor(float(hi)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        scale = (self.hi - self.lo).clamp_min(1e-12) / n
        q = round_ste((torch.clamp(x, self.lo, self.hi) - self.lo) / scale)
        return q * scale + self.lo

    def num_scales(self, weight: torch.Tensor) -> int:
        return 2  # lo and hi

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{float(self.lo):.4g}, {float(self.hi):.4g}]"


class BorderQuantizer(FixedUniform):
    """AQuant-style activation rounding: the border between rounding down and up is a learned,
    cheap element-wise function of the input instead of the fixed 0.5:

        v = (clamp(x, lo, hi) - lo) / scale,   q = floor(v) + 1[frac(v) >= border(x)],
        border_c(x) = clamp(0.5 + a_c u + b_c u^2, 0.01, 0.99),   u = (x - lo) / (hi - lo) - 0.5,

    with a, b per channel (``channel_dim`` 1 for conv inputs, -1 for linear ones), zero at the start
    (plain rounding). Values stay on the grid and move by at most one level against rounding to
    nearest. While ``soft`` is set (learning), the step is a sigmoid of (frac - border) / tau;
    otherwise it is hard with a straight-through gradient."""

    def __init__(self, bits: int, lo: float = 0.0, hi: float = 1.0, channels: int = 1, channel_dim: int = 1):
        super().__init__(bits, lo, hi)
        self.a = nn.Parameter(torch.zeros(channels))
        self.b = nn.Parameter(torch.zeros(channels))
        self.channel_dim = channel_dim
        self.soft, self.tau = False, 0.1

    def border(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        u = (torch.clamp(x, self.lo, self.hi) - self.lo) / (self.hi - self.lo).clamp_min(1e-12) - 0.5
        return torch.clamp(0.5 + self.a.reshape(shape) * u + self.b.reshape(shape) * u * u, 0.01, 0.99)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        scale = (self.hi - self.lo).clamp_min(1e-12) / n
        v = (torch.clamp(x, self.lo, self.hi) - self.lo) / scale
        low = torch.floor(v).detach()
        frac = v - low
        if self.soft:
            step = torch.sigmoid((frac - self.border(x)) / self.tau)
            q = torch.clamp(low + step, 0, n)
        else:  # hard, with a straight-through gradient (as FixedUniform) for the layers before it
            q = torch.clamp(low + (frac >= self.border(x)).to(x.dtype), 0, n)
            q = q + (v - v.detach())  # exactly q in value, gradient 1 in v
        return q * scale + self.lo

    def num_scales(self, weight: torch.Tensor) -> int:
        return 2 + 2 * self.a.numel()
