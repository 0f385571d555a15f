"""Starting the ranks: under torchrun (``init_from_env``) or as local processes (``spawn_local``).

Whatever goes wrong on one rank ends every rank: the failing rank reports and exits at once, which
closes its connections, so its neighbours' waits fail within moments, and they exit in turn. A
rank that hangs without exiting is caught by the ``timeout_s`` every wait carries.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import queue
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist

from lowbit.distributed.config import PipelineConfig, PipelineError
from lowbit.distributed.pipeline import train_pipeline
from lowbit.distributed.task import PipelineTask

_PEER_LOST = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "Broken pipe", "Connection refused")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_threads(cfg: PipelineConfig, local_ranks: int) -> PipelineConfig:
    """``cfg`` with ``threads`` set to this machine's cores divided among its ``local_ranks`` when
    it is None: every rank using every core (torch's default) oversubscribes the CPU, and a
    pipeline then runs many times slower than with one thread per rank."""
    if cfg.threads is not None:
        return cfg
    return dataclasses.replace(cfg, threads=max(1, (os.cpu_count() or 1) // max(1, local_ranks)))


def describe_failure(rank: int, cfg: PipelineConfig, exc: BaseException) -> str:
    stage = rank % cfg.stages
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, RuntimeError) and any(k in str(exc) for k in _PEER_LOST):
        return (f"rank {rank} (stage {stage}) lost contact with another rank: it crashed, raised, or did not answer "
                f"within timeout_s={cfg.timeout_s:g} s ({text.splitlines()[0]})")
    return f"rank {rank} (stage {stage}) failed: {text}\n{traceback.format_exc()}"


def run_rank(task: PipelineTask, cfg: PipelineConfig, rank: int, world: int, init_method: str,
             backend: str | None = None) -> dict | None:
    """Initialise the process group, train this rank's stage, tear down. Returns rank 0's merged results."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))
    try:
        return train_pipeline(task, cfg, device)
    finally:
        dist.destroy_process_group()


def _child(rank: int, world: int, port: int, task: PipelineTask, cfg: PipelineConfig, results) -> None:
    try:
        out = run_rank(task, cfg, rank, world, f"tcp://127.0.0.1:{port}", backend="gloo")
        results.put(("ok", rank, out))
    except BaseException as exc:  # report, then leave at once so the others' waits fail fast
        results.put(("error", rank, describe_failure(rank, cfg, exc)))
        results.close()
        results.join_thread()  # the report must be through the pipe before the hard exit
        sys.stderr.flush()
        os._exit(1)


def spawn_local(task: PipelineTask, cfg: PipelineConfig, deadline_s: float | None = None) -> dict:
    """Run the pipeline as ``cfg.world_size`` local processes on loopback (gloo); return rank 0's
    merged results. ``cfg.threads=None`` shares the cores out among the ranks. Raises
    :class:`PipelineError` naming every failed rank if any fails, and kills all of them if
    ``deadline_s`` passes. The processes are spawned: in a script, call this under
    ``if __name__ == "__main__":``."""
    import torch.multiprocessing as mp

    cfg = local_threads(cfg, cfg.world_size)
    world = cfg.world_size
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, task, cfg, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    start, outcome = time.monotonic(), {}
    while len(outcome) < world:
        try:
            status, rank, payload = results.get(timeout=0.2)
            outcome[rank] = (status, payload)
            continue
        except queue.Empty:
            pass
        if all(not p.is_alive() for p in procs):
            time.sleep(0.5)  # let queued reports arrive
            while True:
                try:
                    status, rank, payload = results.get_nowait()
                    outcome[rank] = (status, payload)
                except queue.Empty:
                    break
            for r in range(world):
                outcome.setdefault(r, ("error", f"rank {r} exited with code {procs[r].exitcode} without a report"))
            break
        if deadline_s is not None and time.monotonic() - start > deadline_s:
            for p in procs:
                p.kill()
            raise PipelineError(f"the pipeline did not finish within deadline_s={deadline_s:g} s; all ranks killed")
    for p in procs:
        p.join(timeout=10)
    errors = [f"  {payload}" for r, (status, payload) in sorted(outcome.items()) if status == "error"]
    if errors:
        raise PipelineError("pipeline training failed:\n" + "\n".join(errors))
    return outcome[0][1]


def init_from_env(task: PipelineTask, cfg: PipelineConfig) -> dict | None:
    """Entry for ``torchrun``: rank and world from the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT). On failure the rank prints what happened and exits with status 1."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = local_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    try:
        return run_rank(task, cfg, rank, world, "env://")
    except BaseException as exc:
        print(describe_failure(rank, cfg, exc), file=sys.stderr, flush=True)
        os._exit(1)
