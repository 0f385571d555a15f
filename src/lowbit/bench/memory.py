"""End-to-end memory held between forward and backward, measured as process RSS in a child.

The child runs with glibc's mmap threshold pinned low, so every large tensor lives in its own
mapping that is returned to the OS when freed: RSS then follows live tensors, and the RSS
growth over a forward pass is the memory autograd (or lowbit) holds for backward. On CUDA the
same figure comes from ``torch.cuda.max_memory_allocated``/``memory_allocated``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from lowbit.bench.common import make_compressor

_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def _trim() -> None:
    """Hand free heap pages back to the OS, so that what the next forward allocates shows in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_held_memory(model: str, method: str, bits: float | None, batch_size: int, repeats: int = 3, device: str = "cpu") -> dict:
    """Run one child process; returns {"held_bytes", "lowbit_raw_bytes", "lowbit_stored_bytes", ...}."""
    cmd = [sys.executable, "-m", "lowbit.bench.memory", "--model", model, "--method", method,
           "--batch-size", str(batch_size), "--repeats", str(repeats), "--device", device]
    if bits is not None:
        cmd += ["--bits", str(bits)]
    env = dict(os.environ, **_CHILD_ENV)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _batch(model_name: str, batch_size: int, device: str):
    from lowbit.bench.common import fortunes_corpus, image_data, reference_model

    if model_name == "gpt":
        corpus = fortunes_corpus()
        model = reference_model("gpt", vocab_size=corpus.vocab_size)
        x, y = corpus.batch(batch_size, model.block_size, torch.Generator().manual_seed(0))
        loss_fn = lambda out, t: F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))  # noqa: E731
    else:
        (x, y), _, _ = image_data(limit=batch_size, test_limit=1, notice=lambda *a: None)
        model = reference_model(model_name, image_size=x.shape[-1])
        loss_fn = F.cross_entropy
    return model.to(device), x.to(device), y.to(device), loss_fn


def _child(args) -> dict:
    torch.manual_seed(0)
    model, x, y, loss_fn = _batch(args.model, args.batch_size, args.device)
    act = make_compressor(args.method, args.bits, model)
    cuda = args.device.startswith("cuda")
    held, peak = [], []
    for r in range(args.repeats + 2):  # two warm-up steps: lazy allocations, kernel compilation
        gc.collect()
        _trim()
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = _rss()
        with act:
            loss = loss_fn(model(x), y)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            after, top = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        else:
            after = top = _rss()
        rep = act.report()
        loss.backward()
        model.zero_grad(set_to_none=False)
        act.step(lambda: loss_fn(model(x), y))  # GACT allocates its bits on the first step
        if r >= 2:
            held.append(after - before)
            peak.append(top - before)
    return {
        "model": args.model,
        "method": args.method,
        "bits": args.bits,
        "batch_size": args.batch_size,
        "device": args.device,
        "held_bytes": statistics.median(held),
        "forward_peak_bytes": statistics.median(peak),
        "lowbit_raw_bytes": rep.raw_bytes,
        "lowbit_stored_bytes": rep.stored_bytes,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet")
    p.add_argument("--method", default="none")
    p.add_argument("--bits", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.bits is not None and args.method == "uniform":
        args.bits = int(args.bits)
    print(json.dumps(_child(args)))


if __name__ == "__main__":
    main()
