"""Differentiable rounding functions: a forward that rounds and a backward that estimates.

Each function is an ``autograd.Function`` whose backward is exactly the formula of its paper, so
tests can check it against a hand-computed gradient. All work elementwise on any shape and device.
"""
from __future__ import annotations

import math

import torch


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so a binarised tensor holds exactly two values."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class SignSTE(torch.autograd.Function):
    """sign(x); backward: the straight-through estimator, d/dx = 1."""

    @staticmethod
    def forward(ctx, x):
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        return g


class SignClippedSTE(torch.autograd.Function):
    """sign(x); backward: clipped STE (QNN), d/dx = 1{|x| <= clip}."""

    @staticmethod
    def forward(ctx, x, clip: float = 1.0):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= ctx.clip).to(g.dtype), None


def fourier_sign_grad(x: torch.Tensor, omega: float, terms: int) -> torch.Tensor:
    """d/dx of the first ``terms`` sine terms of sign's Fourier series:
    (4 omega / pi) * sum_{i=0}^{terms-1} cos((2i+1) omega x)."""
    total = torch.zeros_like(x)
    for i in range(terms):
        total = total + torch.cos((2 * i + 1) * omega * x)
    return total * (4.0 * omega / math.pi)


class SignFourier(torch.autograd.Function):
    """sign(x); backward (FDA-BNN): the derivative of sign's truncated Fourier series, zero where
    |x| > clip (the reference implementation's range)."""

    @staticmethod
    def forward(ctx, x, omega: float, terms: int, clip: float):
        ctx.save_for_backward(x)
        ctx.omega, ctx.terms, ctx.clip = omega, terms, clip
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        d = fourier_sign_grad(x, ctx.omega, ctx.terms)
        if ctx.clip is not None:
            d = d * (x.abs() <= ctx.clip).to(d.dtype)
        return g * d, None, None, None


class SignTanh(torch.autograd.Function):
    """sign(x); backward (IR-Net / DIR-Net EDE/DTE): derivative of k * tanh(t x),
    i.e. k * t * (1 - tanh(t x)^2)."""

    @staticmethod
    def forward(ctx, x, t: float, k: float):
        ctx.save_for_backward(x)
        ctx.t, ctx.k = t, k
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        th = torch.tanh(ctx.t * x)
        return g * (ctx.k * ctx.t) * (1 - th * th), None, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased rounding: floor(x + u), u ~ U[0, 1)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.floor(x + u)


def quantize_gradient(g: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-bit stochastic quantization of a gradient (QNN / DoReFa): per-sample max |g| scaling onto
    2^k - 1 uniform steps of [-max, max], unbiased rounding. Returns a tensor with at most 2^k
    distinct values per sample (dim 0)."""
    if g.numel() == 0:
        return g
    levels = 2**bits - 1
    flat = g.reshape(g.shape[0], -1) if g.dim() > 1 else g.reshape(1, -1)
    m = flat.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    unit = (flat / m + 1) * 0.5 * levels  # in [0, levels]
    q = stochastic_round(unit, generator).clamp_(0, levels)
    return ((q / levels) * 2 - 1).mul_(m).reshape(g.shape)


class GradQuant(torch.autograd.Function):
    """Identity forward; backward quantizes the incoming gradient to ``bits`` bits (QNN)."""

    @staticmethod
    def forward(ctx, x, bits: int):
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return quantize_gradient(g, ctx.bits), None


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, qmin: int, qmax: int, grad_scale: float) -> torch.Tensor:
    """Learned step size quantization (Esser et al.): step * round(clamp(x / step, qmin, qmax)).

    Gradient w.r.t. x is the clipped STE; w.r.t. step it is (round(v) - v) inside the range and
    qmin/qmax outside it, times ``grad_scale`` (1 / sqrt(numel * qmax)), as in the paper.
    ``step`` broadcasts against ``x`` (a scalar or one step per output channel)."""
    s = step * grad_scale + (step - step * grad_scale).detach()  # gradient scaled, value unchanged
    v = torch.clamp(x / s, qmin, qmax)
    return round_ste(v) * s
