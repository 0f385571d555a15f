"""One rank of the pipeline: its stage's layers, the channels to its neighbours, the optimizer,
the byte counters, one training step, and its checkpoint."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lowbit.checkpoints import load_checkpoint
from lowbit.codecs import UniformCodec
from lowbit.distributed.channels import ActivationChannel, GradientChannel
from lowbit.distributed.config import PipelineConfig
from lowbit.distributed.gradcomp import allreduce_gradients
from lowbit.distributed.schedule import batch_ids, cut_layers
from lowbit.distributed.task import PipelineTask
from lowbit.distributed.wire import WireCounter


class Stage:
    """One rank's share: its layers, channels to its neighbours, optimizer, counters."""

    def __init__(self, task: PipelineTask, cfg: PipelineConfig, rank: int, device: torch.device):
        self.cfg, self.rank, self.device = cfg, rank, device
        self.stage, self.replica = rank % cfg.stages, rank // cfg.stages
        self.first, self.last = self.stage == 0, self.stage == cfg.stages - 1
        self.prev, self.next = rank - 1, rank + 1
        torch.manual_seed(cfg.seed)
        self.module = cut_layers(task.layers(), cfg.stages)[self.stage].to(device)
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=cfg.lr)
        mem_dir = Path(cfg.memory_dir) / f"rank{rank}" if cfg.memory_dir else None

        def link(boundary: int, end: str) -> ActivationChannel:
            # both ends of a boundary seed their codec alike; only the sender draws from it
            return ActivationChannel(cfg.mode, cfg.bits, cfg.group_size, task.n_examples, cfg.memory, cfg.memory_dtype,
                                     mem_dir, name=f"boundary{boundary}-{end}", seed=cfg.seed * 7919 + rank)

        self.fwd_in = link(self.stage - 1, "in") if not self.first else None
        self.fwd_out = link(self.stage, "out") if not self.last else None
        self.bwd_in = GradientChannel(cfg.grad_bits, cfg.group_size, seed=cfg.seed * 104729 + rank) if not self.last else None
        self.bwd_out = GradientChannel(cfg.grad_bits, cfg.group_size, seed=cfg.seed * 104729 + rank) if not self.first else None
        self.dp_group = None
        self.dp_codec = UniformCodec(cfg.dp_bits, 256, "stochastic", cfg.seed + rank) if cfg.dp_bits else None
        self.counter = WireCounter()
        self.losses: list[float] = []
        self.step_times: list[float] = []
        self.warm: list[bool] = []  # per step: activations went in fp32 (warm-up epoch)
        self.step = 0

    def channels(self) -> dict:
        """{name: channel} of the links this stage has (the first and last have fewer)."""
        return {k: getattr(self, k) for k in ("fwd_in", "fwd_out", "bwd_in", "bwd_out") if getattr(self, k) is not None}

    def train_step(self, task: PipelineTask) -> None:
        """One step: forwards of this replica's micro-batches, their backwards, the data-parallel
        gradient exchange and the optimizer step."""
        cfg = self.cfg
        t0 = time.perf_counter()
        epoch, ids = batch_ids(task.n_examples, cfg.batch_size, self.step, cfg.seed)
        warm = epoch < cfg.warmup_epochs
        mine = ids.chunk(cfg.replicas)[self.replica]
        saved, loss_sum = [], 0.0
        for mb in mine.chunk(cfg.micro_batches):
            if self.first or self.last:
                x, y = (t.to(self.device) for t in task.batch(mb))
            if not self.first:
                x = self.fwd_in.recv(mb, self.prev, warm).to(self.device).requires_grad_()
            out = self.module(x)
            if self.last:
                out = task.loss(out, y) * (len(mb) / cfg.batch_size)  # micro-batch share of the batch mean
                loss_sum += float(out.detach())
            else:
                self.fwd_out.send(out, mb, self.next, self.counter, warm)
            saved.append((x, out))
        for x, out in saved:
            if self.last:
                out.backward()
            else:
                out.backward(self.bwd_in.recv(self.next).to(self.device))
            if not self.first:
                self.bwd_out.send(x.grad, self.prev, self.counter)
        if cfg.replicas > 1:
            allreduce_gradients(list(self.module.parameters()), self.dp_group, cfg.replicas, self.counter, self.dp_codec)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.counter.end_step()
        self.losses.append(loss_sum)
        self.step_times.append(time.perf_counter() - t0)
        self.warm.append(warm and cfg.mode != "fp32")
        self.step += 1

    # checkpoints ---------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        """This rank's checkpoint file under ``checkpoint_dir``."""
        return Path(self.cfg.checkpoint_dir) / f"rank{self.rank}.pt"

    def save(self) -> None:
        """Write this rank's state (weights, optimizer, channel references and RNG, history)."""
        path = self.checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "module": self.module.state_dict(), "opt": self.opt.state_dict(),
                 "channels": {k: c.state_dict() for k, c in self.channels().items()},
                 "dp_rng": self.dp_codec.rng_state() if self.dp_codec else None,
                 "history": self.counter.history, "losses": self.losses, "step_times": self.step_times, "warm": self.warm}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a crash mid-save never leaves a half-written checkpoint

    def load(self) -> None:
        """Restore what :meth:`save` wrote."""
        # tensors and plain containers only (weights_only): a checkpoint can not run code
        state = load_checkpoint(self.checkpoint_path())
        self.step = state["step"]
        self.module.load_state_dict(state["module"])
        self.opt.load_state_dict(state["opt"])
        for k, c in self.channels().items():
            c.load_state_dict(state["channels"][k])
        if self.dp_codec:
            self.dp_codec.set_rng_state(state["dp_rng"])
        self.counter.history, self.losses = state["history"], state["losses"]
        self.step_times, self.warm = state["step_times"], state["warm"]

    def result(self) -> dict:
        """What rank 0 gathers from this rank for :func:`~lowbit.distributed.results.merge_results`."""
        mem = {k: c.memory.checksum() for k, c in self.channels().items() if getattr(c, "memory", None) is not None}
        return {"rank": self.rank, "stage": self.stage, "replica": self.replica, "losses": self.losses if self.last else None,
                "param_checksum": float(sum(p.detach().double().abs().sum() for p in self.module.parameters())),
                "bytes": self.counter.history, "step_times": self.step_times, "warm": self.warm, "memory_checksums": mem,
                "memory_bytes": sum(getattr(c, "memory").nbytes for c in self.channels().values() if getattr(c, "memory", None) is not None)}
