"""GPipe-style pipeline-parallel training on torch.distributed with compressed stage traffic.

Ranks are laid out ``rank = replica * stages + stage``. Each step, every replica of the pipeline
takes its share of the batch, runs the forward of all micro-batches (activations flow stage to
stage through an :class:`ActivationChannel`), then their backwards (gradients flow back through a
:class:`GradientChannel`), all-reduces its stage's gradients with the other replicas (optionally
k-bit compressed) and steps its optimizer.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lowbit.checkpoints import load_checkpoint
from lowbit.codecs import UniformCodec
from lowbit.codecs.uniform import check_bits
from lowbit.distributed.bandwidth import parse_bandwidth, simulated_step_time
from lowbit.distributed.channels import MODES, ActivationChannel, GradientChannel
from lowbit.distributed.gradcomp import allreduce_gradients
from lowbit.distributed.task import PipelineTask
from lowbit.distributed.wire import WireCounter


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


def cut_layers(layers: list[nn.Module], stages: int) -> list[nn.Sequential]:
    """Contiguous split of ``layers`` into ``stages`` parts with the largest part (in parameters,
    +1 per layer) as small as possible."""
    if not 1 <= stages <= len(layers):
        raise ValueError(f"cannot cut {len(layers)} layers into {stages} stages")
    cost = [1 + sum(p.numel() for p in layer.parameters()) for layer in layers]
    n = len(cost)
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    # best[k][i]: smallest max part for the first i layers in k parts; arg for the cut
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    arg = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], arg[k][i] = v, j
    cuts, i = [], n
    for k in range(stages, 0, -1):
        cuts.append((arg[k][i], i))
        i = arg[k][i]
    return [nn.Sequential(*layers[a:b]) for a, b in reversed(cuts)]


def batch_ids(n_examples: int, batch_size: int, step: int, seed: int) -> tuple[int, torch.Tensor]:
    """(epoch, example ids int64 [batch_size]) of global ``step``: a seeded permutation per epoch,
    the last incomplete batch dropped. Every rank computes the same ids."""
    per_epoch = n_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {n_examples} examples")
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return epoch, perm[i * batch_size : (i + 1) * batch_size]


def total_steps(cfg: PipelineConfig, n_examples: int) -> int:
    steps = cfg.epochs * (n_examples // cfg.batch_size)
    return steps if cfg.max_steps is None else min(steps, cfg.max_steps)


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


class _Stage:
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
        return {k: getattr(self, k) for k in ("fwd_in", "fwd_out", "bwd_in", "bwd_out") if getattr(self, k) is not None}

    def train_step(self, task: PipelineTask) -> None:
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
    def _ckpt_path(self) -> Path:
        return Path(self.cfg.checkpoint_dir) / f"rank{self.rank}.pt"

    def save(self) -> None:
        path = self._ckpt_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "module": self.module.state_dict(), "opt": self.opt.state_dict(),
                 "channels": {k: c.state_dict() for k, c in self.channels().items()},
                 "dp_rng": self.dp_codec.rng_state() if self.dp_codec else None,
                 "history": self.counter.history, "losses": self.losses, "step_times": self.step_times, "warm": self.warm}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # a crash mid-save never leaves a half-written checkpoint

    def load(self) -> None:
        # tensors and plain containers only (weights_only): a checkpoint can not run code
        state = load_checkpoint(self._ckpt_path())
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
        mem = {k: c.memory.checksum() for k, c in self.channels().items() if getattr(c, "memory", None) is not None}
        return {"rank": self.rank, "stage": self.stage, "replica": self.replica, "losses": self.losses if self.last else None,
                "param_checksum": float(sum(p.detach().double().abs().sum() for p in self.module.parameters())),
                "bytes": self.counter.history, "step_times": self.step_times, "warm": self.warm, "memory_checksums": mem,
                "memory_bytes": sum(getattr(c, "memory").nbytes for c in self.channels().values() if getattr(c, "memory", None) is not None)}


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
    st = _Stage(task, cfg, rank, device)
    for s in range(cfg.stages):  # every rank creates every group, in the same order
        g = dist.new_group([r * cfg.stages + s for r in range(cfg.replicas)]) if cfg.replicas > 1 else None
        if s == st.stage:
            st.dp_group = g
    if cfg.resume:
        if not st._ckpt_path().is_file():  # resuming from nothing is a mistake, not a fresh start
            raise PipelineError(f"resume: rank {rank} has no checkpoint {st._ckpt_path()}")
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


def merge_results(per_rank: list[dict], cfg: PipelineConfig) -> dict:
    """Loss per step (summed over replicas), bytes per step by kind and per link, simulated step
    times at each bandwidth (see :func:`simulated_step_time`). ``phases["warmup"]`` and
    ``phases["steady"]`` hold each phase's step count, mean bytes per step and median simulated
    step times (None for a phase with no step); ``steady_bytes_per_step`` and
    ``simulated_step_time_s`` repeat the steady phase's (None and {} when every step was warm-up)."""
    per_rank = sorted(per_rank, key=lambda r: r["rank"])
    n_steps = len(per_rank[0]["bytes"])
    last = [r for r in per_rank if r["losses"] is not None]
    losses = [sum(r["losses"][t] for r in last) for t in range(n_steps)]
    kinds = ("forward", "backward", "dp")
    bytes_per_step = [{k: sum(r["bytes"][t].get(k, 0) for r in per_rank) for k in kinds} for t in range(n_steps)]
    # one link per (replica, boundary): forward bytes of the stage before it + backward bytes of the stage after it
    link_bytes = []
    for t in range(n_steps):
        per_replica = []
        for rep in range(cfg.replicas):
            ranks = per_rank[rep * cfg.stages : (rep + 1) * cfg.stages]
            per_replica.append([ranks[b]["bytes"][t].get("forward", 0) + ranks[b + 1]["bytes"][t].get("backward", 0)
                                for b in range(cfg.stages - 1)])
        link_bytes.append(per_replica)
    dp_bytes = [max(r["bytes"][t].get("dp", 0) for r in per_rank) for t in range(n_steps)]
    compute = [max(r["step_times"][t] for r in per_rank) for t in range(n_steps)]
    median_compute = statistics.median(compute[1:] if n_steps > 1 else compute)
    warm_steps = sum(per_rank[0]["warm"])

    def phase(steps: list[int]) -> dict | None:
        if not steps:
            return None
        return {"steps": len(steps),
                "bytes_per_step": {k: statistics.mean(bytes_per_step[t][k] for t in steps) for k in kinds},
                "simulated_step_time_s": {bw: statistics.median(simulated_step_time(compute[t], link_bytes[t], dp_bytes[t], bw)
                                                                for t in steps) for bw in cfg.bandwidths}}

    # the fp32 warm-up and the steps after it are reported apart: a run that never left the
    # warm-up has no "after" figures (None), rather than warm-up figures under that name
    phases = {"warmup": phase([t for t in range(n_steps) if per_rank[0]["warm"][t]]),
              "steady": phase([t for t in range(n_steps) if not per_rank[0]["warm"][t]])}
    steady = phases["steady"]
    return {"config": asdict(cfg), "losses": losses, "bytes_per_step": bytes_per_step, "link_bytes": link_bytes,
            "warmup_steps": warm_steps, "phases": phases,
            "steady_bytes_per_step": steady["bytes_per_step"] if steady else None,
            "total_bytes": {k: sum(b[k] for b in bytes_per_step) for k in kinds},
            "median_step_time_s": median_compute,
            "simulated_step_time_s": steady["simulated_step_time_s"] if steady else {},
            "memory_checksums": {r["rank"]: r["memory_checksums"] for r in per_rank},
            "param_checksums": {r["rank"]: r["param_checksum"] for r in per_rank},
            "memory_bytes": sum(r["memory_bytes"] for r in per_rank)}
