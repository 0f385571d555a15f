"""The pipeline-training command, shared by ``lowbit dist-train`` and ``python -m lowbit.distributed``
(what torchrun starts): its options, their checks, and the results table.

Torch is imported inside :func:`run` only, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from lowbit.argtypes import UsageError, int_in, nonnegative_int, positive_float, positive_int

BITS = (1, 2, 4, 8)


def _bandwidths(text: str) -> tuple[str, ...]:
    from lowbit.distributed.bandwidth import parse_bandwidth

    names = tuple(b.strip() for b in text.split(",") if b.strip())
    try:
        for b in names:
            parse_bandwidth(b)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError("expected at least one bandwidth, e.g. 100Mbps")
    return names


def add_arguments(d: argparse.ArgumentParser) -> None:
    """The options of ``lowbit dist-train`` / ``python -m lowbit.distributed``."""
    d.add_argument("--stages", type=positive_int, default=2, help="pipeline stages (one rank each)")
    d.add_argument("--replicas", type=positive_int, default=1, help="data-parallel copies of the pipeline")
    d.add_argument("--mode", default="acsgd", choices=["fp32", "quant", "acsgd"],
                   help="activations between stages: fp32, directly quantized (quant), or quantized changes "
                        "against per-example references (acsgd)")
    d.add_argument("--bits", type=int_in(*BITS), default=4, help="forward activation (change) bits: 1, 2, 4 or 8")
    d.add_argument("--grad-bits", type=int_in(0, *BITS), default=4, help="backward gradient bits (0: fp32)")
    d.add_argument("--dp-bits", type=int_in(0, *BITS), default=0, help="data-parallel gradient bits (0: fp32 all-reduce)")
    d.add_argument("--group-size", type=positive_int, default=256, help="elements per (min, scale) pair")
    d.add_argument("--warmup-epochs", type=nonnegative_int, default=1,
                   help="first epochs whose activations go in fp32 (they seed the AC-SGD references)")
    d.add_argument("--memory", default="memory", choices=["memory", "disk"], help="where AC-SGD keeps its references")
    d.add_argument("--memory-dtype", default="float32", choices=["float32", "float16"], help="dtype of the references")
    d.add_argument("--memory-dir", default=None, help="folder of the reference files (needed by --memory disk)")
    d.add_argument("--examples", type=positive_int, default=2048, help="training windows of fortunes")
    d.add_argument("--block", type=positive_int, default=64, help="characters per window")
    d.add_argument("--micro-batches", type=positive_int, default=4, help="micro-batches per step (GPipe)")
    d.add_argument("--batch-size", type=positive_int, default=32, help="windows per step, all replicas together")
    d.add_argument("--epochs", type=positive_int, default=4, help="passes over the windows")
    d.add_argument("--steps", type=positive_int, default=None, help="stop after this many steps (default: all epochs)")
    d.add_argument("--lr", type=positive_float, default=3e-3, help="learning rate (AdamW)")
    d.add_argument("--bandwidth", type=_bandwidths, default="100Mbps,1Gbps", help="links to simulate, comma separated")
    d.add_argument("--timeout", type=positive_float, default=120.0, help="seconds any rank waits for another")
    d.add_argument("--checkpoint-dir", default=None, help="folder of the per-rank checkpoints")
    d.add_argument("--checkpoint-every", type=nonnegative_int, default=0, help="save every N steps (0: never)")
    d.add_argument("--resume", action="store_true", help="continue from the checkpoints in --checkpoint-dir")
    d.add_argument("--seed", type=int, default=0, help="seed of the model, data order and rounding")
    d.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads per rank (default: the cores divided among the local ranks)")
    d.add_argument("--out", default=None, help="write the results JSON here")


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_resume(checkpoint_dir: str | None, ranks: list[int]) -> None:
    """--resume needs every listed rank's checkpoint in ``checkpoint_dir``: anything missing is an
    error (a mistyped folder must not quietly train from scratch)."""
    if not checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir (the folder the checkpoints were saved to)")
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise UsageError(f"--resume: no checkpoint folder {checkpoint_dir}")
    missing = [f"rank{r}.pt" for r in ranks if not (folder / f"rank{r}.pt").is_file()]
    if missing:
        raise UsageError(f"--resume: {checkpoint_dir} lacks {', '.join(missing)} (saved with --checkpoint-every "
                         "and the same --stages and --replicas?)")


def build(args: argparse.Namespace):
    """(task, config) from the parsed options; :class:`UsageError` for settings that cannot run."""
    if args.batch_size > args.examples:
        raise UsageError(f"--batch-size {args.batch_size} exceeds --examples {args.examples}")
    if args.memory == "disk" and not args.memory_dir:
        raise UsageError("--memory disk needs --memory-dir (the folder of the reference files)")
    if args.checkpoint_every and not args.checkpoint_dir:
        raise UsageError("--checkpoint-every needs --checkpoint-dir")
    if args.resume:
        check_resume(args.checkpoint_dir, [int(os.environ["RANK"])] if _under_torchrun()
                     else list(range(args.stages * args.replicas)))
    from lowbit.distributed.config import PipelineConfig  # torch: only after the checks above
    from lowbit.distributed.task import CharLMTask

    try:
        cfg = PipelineConfig(stages=args.stages, replicas=args.replicas, micro_batches=args.micro_batches,
                             batch_size=args.batch_size, epochs=args.epochs, max_steps=args.steps, lr=args.lr,
                             mode=args.mode, bits=args.bits, grad_bits=args.grad_bits or None,
                             group_size=args.group_size, warmup_epochs=args.warmup_epochs, memory=args.memory,
                             memory_dtype=args.memory_dtype, memory_dir=args.memory_dir, dp_bits=args.dp_bits or None,
                             seed=args.seed, timeout_s=args.timeout, threads=args.threads,
                             checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                             resume=args.resume, progress=True, bandwidths=tuple(args.bandwidth))
        task = CharLMTask(n_examples=args.examples, block=args.block, seed=args.seed)
        n_layers = len(task.layers())  # also loads the text now, once, rather than in every rank
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(" ".join(str(e).split())) from None
    if cfg.stages > n_layers:
        raise UsageError(f"--stages {cfg.stages}: the model has only {n_layers} layers to cut into stages")
    return task, cfg


def run(args: argparse.Namespace) -> int:
    """Train (spawning local ranks, or as one rank under torchrun) and print rank 0's table."""
    import json

    from lowbit.distributed.launch import init_from_env, spawn_local

    task, cfg = build(args)
    res = init_from_env(task, cfg) if _under_torchrun() else spawn_local(task, cfg)
    if res is None:  # not rank 0
        return 0
    print(f"lowbit dist-train: CharGPT on fortunes, {cfg.stages} stages x {cfg.replicas} replica(s), mode={cfg.mode}"
          + (f" {cfg.bits}-bit" if cfg.mode != "fp32" else "") + f", gradients {cfg.grad_bits or 32}-bit")
    print(results_table(res, cfg, task))
    note = warmup_note(res, cfg, task)
    if note:
        print(note)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")
    return 0


def results_table(res: dict, cfg, task) -> str:
    """Loss, steps, and bytes per step of each phase separately: the fp32 warm-up and the steps
    after it. The "fewer bytes" ratio is over the steps after the warm-up only."""
    from lowbit.table import markdown_table

    phases = res["phases"]
    warm, steady = phases["warmup"], phases["steady"]
    fp32_step = 2 * (cfg.stages - 1) * cfg.batch_size * task.block * task.dim * 4  # activations + gradients
    rows = [["final training loss", round(res["losses"][-1], 4)],
            ["steps (fp32 warm-up + after it)",
             f"{len(res['losses'])} ({warm['steps'] if warm else 0} + {steady['steps'] if steady else 0})"]]
    for label, ph in (("fp32 warm-up", warm), ("after warm-up" if cfg.mode != "fp32" else "fp32", steady)):
        if ph is None:
            continue
        b = ph["bytes_per_step"]
        rows += [[f"bytes / step, {label}: forward", f"{b['forward']:,.0f}"],
                 [f"bytes / step, {label}: backward", f"{b['backward']:,.0f}"],
                 [f"bytes / step, {label}: data parallel", f"{b['dp']:,.0f}"]]
    if steady is not None:
        sent = steady["bytes_per_step"]["forward"] + steady["bytes_per_step"]["backward"]
        rows.append(["pipeline bytes after warm-up vs fp32 activations+gradients", f"{fp32_step / max(sent, 1):.1f}x fewer"])
    else:
        rows.append(["pipeline bytes after warm-up vs fp32 activations+gradients", "none yet: every step was warm-up"])
    rows += [["AC-SGD reference memory (MiB, all ranks)", round(res["memory_bytes"] / 2**20, 1)],
             ["median step time on loopback (s)", round(res["median_step_time_s"], 4)]]
    for label, ph in (("warm-up", warm), ("after warm-up", steady)):
        if ph is not None and cfg.mode != "fp32":
            rows += [[f"simulated step time at {bw}, {label} (s)", round(t, 4)] for bw, t in ph["simulated_step_time_s"].items()]
    if cfg.mode == "fp32" and steady is not None:
        rows += [[f"simulated step time at {bw} (s)", round(t, 4)] for bw, t in steady["simulated_step_time_s"].items()]
    return markdown_table(["quantity", "value"], rows)


def warmup_note(res: dict, cfg, task) -> str | None:
    """When the run never left the fp32 warm-up, say so and how to get past it."""
    if cfg.mode == "fp32" or res["phases"]["steady"] is not None:
        return None
    per_epoch = task.n_examples // cfg.batch_size
    return (f"note: all {len(res['losses'])} steps were in the fp32 warm-up (--warmup-epochs {cfg.warmup_epochs}: "
            f"{cfg.warmup_epochs * per_epoch} steps at {per_epoch} per epoch), so nothing was sent compressed yet: "
            "run more steps, or set --warmup-epochs 0 to compress from the first step")
