"""Training loops shared by the CLI and the benchmarks: same seed, data order and schedule for
every compression method, so differences come from the method alone."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.act import ActivationCompressor, checkpoint_blocks
from lowbit.loop import TrainResult, epoch_batches, evaluate_classifier, make_optimizer, total_steps  # noqa: F401  (re-exported)
from lowbit.data import CharCorpus, load_fortunes
from lowbit.models import MLP


def make_compressor(method: str, bits: float | None, model: nn.Module, seed: int = 0) -> ActivationCompressor:
    """The ActivationCompressor for one training run of ``model``.

    ``"checkpoint"`` wraps every repeated block of the model in torch.utils.checkpoint (in place)
    and accounts the rest like ``"none"``; ``"checkpoint+<method>"`` (e.g. ``checkpoint+uniform``
    with ``bits=2``) checkpoints every second block and compresses what the rest saves with
    ``<method>``. ``bits``: stored bits per element (uniform, division: a whole number; gact: an
    average), None for methods that choose their own."""
    if method == "checkpoint":
        checkpoint_blocks(model)
        return ActivationCompressor("none", model=model, seed=seed)
    if method.startswith("checkpoint+"):
        checkpoint_blocks(model, every=2)
        method = method.split("+", 1)[1]
    if bits is not None and method in ("uniform", "division"):
        bits = int(bits)
    return ActivationCompressor(method, bits=bits, model=model, seed=seed)


def fortunes_corpus() -> CharCorpus:
    """The fortunes text as a character corpus (the gpt reference model's training data)."""
    return CharCorpus(load_fortunes())


def tabular_model(data, seed: int = 0, steps: int = 200, lr: float = 3e-3) -> tuple[nn.Module, float]:
    """A softplus MLP(M -> 64 -> 64 -> C) trained full-batch with Adam on a tabular set
    (``lowbit.data.Tabular``: x_train [N, M] standardised floats, y_train [N] class ids), the
    model SHEAR's paper explains. Returns (model in eval mode, test accuracy in percent)."""
    torch.manual_seed(seed)
    model = MLP(data.x_train.shape[1], hidden=(64, 64), out_features=len(data.class_names), activation="softplus")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        loss = F.cross_entropy(model(data.x_train), data.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).double().mean()) * 100
    return model, acc


def _train_step(model, act, opt, sched, loss_fn, xb, yb, result: TrainResult) -> None:
    t0 = time.perf_counter()
    with act:
        loss = loss_fn(model(xb), yb)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    t1 = time.perf_counter()
    result.step_times.append(t1 - t0)
    result.train_losses.append(float(loss.detach()))
    report = act.report()
    result.report = report.to_dict()
    act.step(lambda: loss_fn(model(xb), yb))
    dt = time.perf_counter() - t1
    if dt > 1e-3:
        result.estimate_times.append(dt)


def train_classifier(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    act: ActivationCompressor,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    max_steps: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train on (images [N, C, H, W], labels [N]); returns test accuracy and per-step records."""
    x, y = train
    total = total_steps(len(x), epochs, batch_size, max_steps)
    opt, sched = make_optimizer(model, lr, total)
    result = TrainResult("accuracy", float("nan"))
    model.train()
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for idx in epoch_batches(len(x), epochs, batch_size, seed, total):
            _train_step(model, act, opt, sched, F.cross_entropy, x[idx], y[idx], result)
            bar.update(1)
            bar.set_postfix(loss=f"{result.train_losses[-1]:.3f}")
    result.metric = evaluate_classifier(model, *test)
    return result


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate_lm(model: nn.Module, corpus: CharCorpus, batch_size: int, block: int, batches: int = 20, seed: int = 1234) -> float:
    """Mean validation cross-entropy (nats per character) over fixed random windows."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    losses = [float(_lm_loss(model(x), y)) for x, y in (corpus.batch(batch_size, block, gen, "val") for _ in range(batches))]
    model.train()
    return sum(losses) / len(losses)


def train_lm(
    model: nn.Module,
    corpus: CharCorpus,
    act: ActivationCompressor,
    steps: int = 300,
    batch_size: int = 32,
    block: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Next-character training on random windows; returns the validation loss."""
    opt, sched = make_optimizer(model, lr, steps)
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult("val_loss", float("nan"))
    model.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        xb, yb = corpus.batch(batch_size, block, gen)
        _train_step(model, act, opt, sched, _lm_loss, xb, yb, result)
    result.metric = evaluate_lm(model, corpus, batch_size, block)
    return result
