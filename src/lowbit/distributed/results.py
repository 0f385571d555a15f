"""Rank 0's summary of a run from every rank's record: losses, bytes per step and link, and
simulated step times at the configured bandwidths."""
from __future__ import annotations

import statistics
from dataclasses import asdict

from lowbit.distributed.bandwidth import simulated_step_time
from lowbit.distributed.config import PipelineConfig


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
