"""GPipe-style pipeline-parallel training on torch.distributed with compressed stage traffic.

Ranks are laid out ``rank = replica * stages + stage``. Each step, every replica of the pipeline
takes its share of the batch, runs the forward of all micro-batches (activations flow stage to
stage through an :class:`ActivationChannel`), then their backwards (gradients flow back through a
:class:`GradientChannel`), all-reduces its stage's gradients with the other replicas (optionally
k-bit compressed) and steps its optimizer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lowbit.distributed.config import PipelineConfig, PipelineError
from lowbit.distributed.results import merge_results
from lowbit.distributed.schedule import batch_ids, cut_layers, total_steps
from lowbit.distributed.stage import Stage
from lowbit.distributed.task import PipelineTask

__all__ = ["PipelineConfig", "PipelineError", "Stage", "batch_ids", "cut_layers", "merge_results", "total_steps",
           "train_pipeline", "train_single"]


def train_single(task: PipelineTask, cfg: PipelineConfig, device: str | torch.device = "cpu") -> list[float]:
    """The same model, data order and optimizer in one process, whole batches: the reference the
    fp32 pipeline must match. Returns the loss per step."""
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(*task.layers()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(total_steps(cfg, task.n_examples)):
        _, ids = batch_ids(task.n_examples, cfg.batch_size, step, cfg.seed)
        x, y = (t.to(device) for t in task.batch(ids))
        loss = task.loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _numba_threads(n: int) -> None:
    """The codecs' numba kernels run their own thread pool: keep it to this rank's share of the cores."""
    try:
        import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    except (ImportError, ValueError):
        pass


def _world_agrees(value: int, what: str) -> None:
    lo, hi = torch.tensor([value]), torch.tensor([-value])
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MIN)
    if int(lo) != -int(hi):
        raise PipelineError(f"ranks disagree on {what}: from {int(lo)} to {-int(hi)}")


def train_pipeline(task: PipelineTask, cfg: PipelineConfig, device: torch.device | None = None) -> dict | None:
    """Run this rank's stage (the process group must be initialised with ``cfg.world_size`` ranks).
    Returns the merged results of every rank on rank 0, None elsewhere."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.world_size:
        raise PipelineError(f"the process group has {world} ranks, the config needs stages x replicas = {cfg.world_size}")
    device = device or torch.device("cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        _numba_threads(cfg.threads)
    st = Stage(task, cfg, rank, device)
    for s in range(cfg.stages):  # every rank creates every group, in the same order
        g = dist.new_group([r * cfg.stages + s for r in range(cfg.replicas)]) if cfg.replicas > 1 else None
        if s == st.stage:
            st.dp_group = g
    if cfg.resume:
        if not st.checkpoint_path().is_file():  # resuming from nothing is a mistake, not a fresh start
            raise PipelineError(f"resume: rank {rank} has no checkpoint {st.checkpoint_path()}")
        st.load()
    _world_agrees(st.step, "the step to resume from (a checkpoint file is missing or stale)")
    steps = total_steps(cfg, task.n_examples)
    bar = None
    if cfg.progress and st.last and st.replica == 0:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=st.step, desc=f"pipeline {cfg.mode} x{cfg.stages}", leave=False)
    while st.step < steps:
        st.train_step(task)
        if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
            st.save()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{st.losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(st.result(), gathered, dst=0)
    return merge_results(gathered, cfg) if rank == 0 else None
