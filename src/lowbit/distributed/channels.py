"""What crosses a pipeline boundary: activations forward (fp32, direct k-bit or AC-SGD delta)
and their gradients backward (fp32 or direct k-bit)."""
from __future__ import annotations

from pathlib import Path

import torch

from lowbit.codecs import DeltaCodec, UniformCodec
from lowbit.distributed.memory import ExampleMemory
from lowbit.distributed.wire import WireCounter, raw_packed, recv_packed, send_packed

MODES = ("fp32", "quant", "acsgd")


class ActivationChannel:
    """One pipeline boundary's forward traffic; the sending and the receiving stage each build one
    with the same arguments.

    mode: ``"fp32"`` sends activations as they are; ``"quant"`` sends ``Q(a)`` (per-group
    ``bits``-bit stochastic rounding); ``"acsgd"`` sends ``Q(a - m(x))`` for each example ``x``
    and both ends set ``m(x) <- m(x) + decoded change`` (:class:`ExampleMemory`). During warm-up
    (``warm=True`` in :meth:`send`/:meth:`recv`) activations go in fp32, and in ``"acsgd"`` mode
    also become the references.
    """

    def __init__(self, mode: str = "fp32", bits: int = 4, group_size: int = 128, n_examples: int = 0,
                 memory: str = "memory", memory_dtype: str = "float32", memory_dir: str | Path | None = None,
                 name: str = "link", seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown activation mode {mode!r}: choose one of {MODES}")
        self.mode = mode
        self.codec = UniformCodec(bits, group_size, "stochastic", seed) if mode != "fp32" else None
        self.delta = DeltaCodec(self.codec) if mode == "acsgd" else None
        self.memory = None
        if mode == "acsgd":
            if n_examples <= 0:
                raise ValueError("mode 'acsgd' needs n_examples: the memory keeps one reference per example")
            self.memory = ExampleMemory(n_examples, memory, memory_dtype, memory_dir, name)

    def send(self, a: torch.Tensor, ids: torch.Tensor, dst: int, counter: WireCounter, warm: bool = False) -> None:
        """a: [n, ...] float activations of examples ``ids`` (int64 [n])."""
        if self.mode == "fp32" or warm:
            send_packed(raw_packed(a), dst, counter, "forward")
            if self.memory is not None:
                self.memory.put(ids, a)
        elif self.mode == "quant":
            send_packed(self.codec.encode(a), dst, counter, "forward")
        else:
            ref = self.memory.get(ids, a)
            p = self.delta.encode(a, ref)
            send_packed(p, dst, counter, "forward")
            self.memory.put(ids, self.delta.decode(p, ref))

    def recv(self, ids: torch.Tensor, src: int, warm: bool = False) -> torch.Tensor:
        """The activations the next stage computes on (what the sender's link carried, decoded)."""
        if self.mode == "fp32" or warm:
            a = recv_packed(src, "raw").payload["data"]
            if self.memory is not None:
                self.memory.put(ids, a)
            return a
        if self.mode == "quant":
            return self.codec.decode(recv_packed(src, "uniform"))
        p = recv_packed(src, "delta")
        ref = self.memory.get(ids, torch.empty((len(ids), *p.shape[1:]), device=p.device))
        return self.memory.put(ids, self.delta.decode(p, ref))

    def state_dict(self) -> dict:
        return {"rng": self.codec.rng_state() if self.codec else None,
                "memory": self.memory.state_dict() if self.memory is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.codec is not None:
            self.codec.set_rng_state(state["rng"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])


class GradientChannel:
    """A boundary's backward traffic: the gradient w.r.t. the activations, fp32 (``bits=None``)
    or directly quantized to ``bits`` with per-group stochastic rounding (unbiased)."""

    def __init__(self, bits: int | None = None, group_size: int = 128, seed: int = 0):
        self.codec = UniformCodec(bits, group_size, "stochastic", seed) if bits is not None else None

    def send(self, g: torch.Tensor, dst: int, counter: WireCounter) -> None:
        p = raw_packed(g) if self.codec is None else self.codec.encode(g)
        send_packed(p, dst, counter, "backward")

    def recv(self, src: int) -> torch.Tensor:
        if self.codec is None:
            return recv_packed(src, "raw").payload["data"]
        return self.codec.decode(recv_packed(src, "uniform"))

    def state_dict(self) -> dict:
        return {"rng": self.codec.rng_state() if self.codec else None}

    def load_state_dict(self, state: dict) -> None:
        if self.codec is not None:
            self.codec.set_rng_state(state["rng"])
