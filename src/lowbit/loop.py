"""The training-loop pieces every loop in lowbit shares (ACT, quantized training, the CLI and the
benchmarks): a result record, the optimizer and schedule, the seeded batch order, accuracy.
Nothing here knows about compression, so any family can use it without importing another."""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TrainResult:
    metric_name: str  # "accuracy" (percent) or "val_loss"
    metric: float
    train_losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)  # seconds per step, excluding GACT estimates
    estimate_times: list[float] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    @property
    def median_step_time(self) -> float:
        warm = self.step_times[min(5, len(self.step_times) - 1) :] if self.step_times else [float("nan")]
        return statistics.median(warm)


def make_optimizer(model: nn.Module, lr: float, total_steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total_steps, 1), pct_start=0.15)
    return opt, sched


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    model.train()
    return 100.0 * correct / max(len(x), 1)


def total_steps(n: int, epochs: int, batch_size: int, max_steps: int | None = None) -> int:
    """Optimizer steps of ``epochs`` passes over ``n`` samples (capped at ``max_steps``)."""
    total = epochs * ((n + batch_size - 1) // batch_size)
    return total if max_steps is None else min(max_steps, total)


def epoch_batches(n: int, epochs: int, batch_size: int, seed: int, total: int):
    """Index tensors of the training batches: a seeded reshuffle per epoch, at most ``total``
    batches. The same seed gives the same data order for every method."""
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            if step >= total:
                return
            yield order[i : i + batch_size]
            step += 1


def parameter_gradient(model: nn.Module, loss_fn, act=None) -> torch.Tensor:
    """The gradient of ``loss_fn()`` (a scalar loss from one forward of ``model``) with respect to
    ``model``'s parameters, flattened into one vector (parameters without a gradient left out).
    ``act``: a context manager the forward runs inside (an activation compressor), or None."""
    model.zero_grad(set_to_none=True)
    with act if act is not None else contextlib.nullcontext():
        loss = loss_fn()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
