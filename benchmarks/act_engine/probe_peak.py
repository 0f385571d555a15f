"""Peak memory of one GACT sensitivity probe (``act.estimate``) against one plain training step
(forward + backward) on the real-model rows: RSS high-water-mark growth, each row in a child
process whose allocator hands freed memory back (the settings of ``lowbit bench act``'s step-peak
column), the second call of each measured (the first compiles kernels and warms the allocator).
On CUDA, ``torch.cuda.max_memory_allocated`` growth instead.

usage: python benchmarks/act_engine/probe_peak.py [--rows llama:8 bert:8 gpt2:8:512:1000 gpt2:2:512:50257 resnet18:16]
       [--methods plain linear sampled] [--device cpu]
Writes benchmarks/results/act_engine/probe_peak.json; prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lowbit.bench.memory import CHILD_ENV, peak_rss_bytes, start_peak

ROWS = ["llama:8", "bert:8", "gpt2:8:512:1000", "gpt2:2:512:50257", "resnet18:16"]


def _row(spec: str) -> tuple[str, int, int | None, int | None]:
    name, batch, *rest = spec.split(":")
    seq = int(rest[0]) if rest else None
    vocab = int(rest[1]) if len(rest) > 1 else None
    return name, int(batch), seq, vocab


def _child(spec: str, method: str, device: str) -> dict:
    import torch

    from lowbit.act import ActivationCompressor
    from lowbit.bench.memory import hf_setup

    name, batch, seq, vocab = _row(spec)
    model, data, _ = hf_setup(name, "small", batch, seq, vocab, 0)
    model = model.to(device).train()
    data = {k: v.to(device) for k, v in data.items()}
    loss_fn = lambda: model(**data).loss  # noqa: E731
    cuda = device.startswith("cuda")

    def once() -> None:
        if method == "plain":
            loss_fn().backward()
            model.zero_grad(set_to_none=True)
        else:
            act = ActivationCompressor("gact", bits=2, model=model, probe_method=method)
            act.estimate(loss_fn)
            act.close()

    once()  # warm-up: kernels compiled, allocator warm
    before, can_peak = start_peak(cuda)
    if not can_peak:
        raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    start = time.perf_counter()
    once()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    top = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"row": spec, "method": method, "device": device, "peak_growth_bytes": top - before, "seconds": seconds}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=ROWS, help="name:batch[:seq:vocab], name in gpt2 bert llama resnet18")
    p.add_argument("--methods", nargs="+", default=["plain", "linear", "sampled"],
                   help="plain (one training step) or a GACT probe_method")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/act_engine/probe_peak.json")
    p.add_argument("--child", nargs=2, metavar=("ROW", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child, args.device)))
        return
    from tqdm.auto import tqdm

    results = []
    env = {**os.environ, **CHILD_ENV}
    jobs = [(row, m) for row in args.rows for m in args.methods]
    for row, method in tqdm(jobs, desc="probe peak"):
        cmd = [sys.executable, __file__, "--child", row, method, "--device", args.device]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain = {r["row"]: r for r in results if r["method"] == "plain"}
    print(f"{'row':22s} {'method':8s} {'peak MiB':>9s} {'x plain':>8s} {'seconds':>8s} {'x plain':>8s}")
    for r in results:
        base = plain.get(r["row"])
        mem = r["peak_growth_bytes"] / base["peak_growth_bytes"] if base else float("nan")
        sec = r["seconds"] / base["seconds"] if base else float("nan")
        print(f"{r['row']:22s} {r['method']:8s} {r['peak_growth_bytes'] / 2**20:9.1f} {mem:8.2f} "
              f"{r['seconds']:8.2f} {sec:8.1f}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"allocator_env": CHILD_ENV, "rows": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
