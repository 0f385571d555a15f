"""Training loop for quantized models: the same optimizer and schedule as lowbit.train, plus what
the recipes need — the progress signal (DIR-Net's estimator, HQ's pruning), the methods' loss
terms (PTQ) and representation distillation from a float teacher (DIR-Net's RBD)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.quant.layers import penalty, quant_layers, set_progress
from lowbit.loop import TrainResult, epoch_batches, evaluate_classifier, make_optimizer, total_steps


@contextmanager
def _capture(model: nn.Module, names: list[str]):
    """Record the outputs of the named submodules during the forward passes inside the block."""
    out: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in names]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def distillation_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the squared distance between per-sample L2-normalised representations
    (scale-free, so the binary student's scale does not have to match the teacher's)."""
    terms = []
    for n, s in student.items():
        t = teacher[n]
        terms.append((F.normalize(s.flatten(1), dim=1) - F.normalize(t.flatten(1), dim=1)).pow(2).sum(1).mean())
    return torch.stack(terms).mean()


def train_quantized(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    teacher: nn.Module | None = None,
    distill: float | None = None,
    progress: bool = True,
    desc: str = "train",
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train a (quantized or float) classifier on images [N, C, H, W] / labels [N]; returns the
    test accuracy in percent. ``distill`` defaults to the recipe's weight (DIR-Net: 1.0) and is
    used only when a ``teacher`` is given; the teacher is frozen and kept in eval mode.
    ``loss_fn(model, x, y)`` replaces the cross-entropy of model(x) (e.g. once-QAT's loss over
    every width, ``vertical.once_loss``)."""
    x, y = train
    total = total_steps(len(x), epochs, batch_size)
    opt, sched = make_optimizer(model, lr, total)
    if distill is None:
        distill = float(getattr(model, "lowbit_recipe", {}).get("distill", 0.0))
    names = [n for n, _ in quant_layers(model)] if (teacher is not None and distill > 0) else []
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    result = TrainResult("accuracy", float("nan"))
    model.train()
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for step, idx in enumerate(epoch_batches(len(x), epochs, batch_size, seed, total)):
            xb, yb = x[idx], y[idx]
            t0 = time.perf_counter()
            set_progress(model, step / max(total - 1, 1))
            with _capture(model, names) as s_out:
                loss = F.cross_entropy(model(xb), yb) if loss_fn is None else loss_fn(model, xb, yb)
            if names:
                with torch.no_grad(), _capture(teacher, names) as t_out:
                    teacher(xb)
                loss = loss + distill * distillation_loss(s_out, t_out)
            extra = penalty(model)
            if extra is not None:
                loss = loss + extra
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            result.step_times.append(time.perf_counter() - t0)
            result.train_losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{result.train_losses[-1]:.3f}")
    set_progress(model, 1.0)
    result.metric = evaluate_classifier(model, *test)
    return result
