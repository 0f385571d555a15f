"""The pipeline's settings (:class:`PipelineConfig`, checked when built) and its error type."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.codecs.uniform import check_bits
from lowbit.distributed.bandwidth import parse_bandwidth
from lowbit.distributed.channels import MODES


class PipelineError(RuntimeError):
    """A stage failed, or lost contact with another stage (crash, exception or timeout)."""


@dataclass
class PipelineConfig:
    """How to train. ``mode``: ``"fp32"``, ``"quant"`` (direct ``bits``-bit activations) or
    ``"acsgd"`` (``bits``-bit changes against per-example references). ``grad_bits``: backward
    gradients in fp32 (None) or directly quantized. ``warmup_epochs``: epochs whose activations go in
    fp32 (and seed the AC-SGD references). ``memory`` / ``memory_dtype`` / ``memory_dir``: where the
    references live. ``replicas`` > 1 adds data parallelism, with ``dp_bits``-bit gradient
    all-gather (None: fp32 all-reduce). ``timeout_s`` bounds every wait on another rank."""

    stages: int = 2
    replicas: int = 1
    micro_batches: int = 4
    batch_size: int = 32
    epochs: int = 4
    max_steps: int | None = None
    lr: float = 3e-3
    mode: str = "fp32"
    bits: int = 4
    grad_bits: int | None = None
    group_size: int = 256
    warmup_epochs: int = 1
    memory: str = "memory"
    memory_dtype: str = "float32"
    memory_dir: str | None = None
    dp_bits: int | None = None
    seed: int = 0
    timeout_s: float = 120.0
    threads: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    progress: bool = False
    bandwidths: tuple[str, ...] = ("100Mbps", "1Gbps")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose one of {MODES}")
        for name in ("stages", "replicas", "micro_batches", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < self.replicas * self.micro_batches:
            raise ValueError(f"batch_size {self.batch_size} is smaller than replicas x micro_batches "
                             f"({self.replicas} x {self.micro_batches}): some micro-batch would be empty")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        for bw in self.bandwidths:
            parse_bandwidth(bw)
        check_bits(self.bits)
        for name in ("grad_bits", "dp_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name))
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume needs checkpoint_dir (the folder the checkpoints were saved to)")
        if self.memory == "disk" and not self.memory_dir:
            raise ValueError("memory='disk' needs memory_dir (the folder of the reference files)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1 (or None), got {self.threads}")

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas
