"""Step PEAK memory of one training step (forward + backward + optimizer-free act.step) on the
GPT-2 shape, per ActivationCompressor method: RSS high-water-mark growth in a child process.

usage: python benchmarks/act_engine/step_peak.py [--vocab 50257] [--batch 2] [--methods none uniform-2 gact-2 comet]
Writes benchmarks/results/act_engine/step_peak_v<vocab>_b<batch>.json.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(method: str, vocab: int, batch: int) -> dict:
    import torch

    from lowbit.act import ActivationCompressor
    import transformers

    from lowbit.models.hf import hf_loss

    torch.manual_seed(0)  # a small GPT-2 shape: 4 layers, d=256, 4 heads, seq 512
    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=vocab, n_positions=512,
                                  bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, vocab, (batch, 512), generator=torch.Generator().manual_seed(0))
    b = {"input_ids": ids, "labels": ids}
    name, _, bits = method.partition("-")
    act = None if name == "none" else ActivationCompressor(name, bits=(int(bits) if name == "uniform" else float(bits)) if bits else None, model=model)
    out = {}
    for r in range(2):  # a warm-up step (allocations, the adaptive methods' probe), then the measured one
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark
        before = _status("VmRSS:")
        if act is None:
            loss = hf_loss(model, b)
        else:
            with act:
                loss = hf_loss(model, b)
        loss.backward()
        model.zero_grad(set_to_none=False)
        if act is not None:
            act.step(lambda: hf_loss(model, b))
        out = {"method": method, "vocab": vocab, "batch": batch, "step_peak_mib": (_status("VmHWM:") - before) / 2**20}
        if act is not None:
            rep = act.report()
            out["held_ratio"] = rep.ratio
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["none", "uniform-2", "gact-2", "comet"])
    p.add_argument("--child", default=None)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.vocab, a.batch)))
        return
    rows = []
    for m in a.methods:
        cmd = [sys.executable, __file__, "--vocab", str(a.vocab), "--batch", str(a.batch), "--child", m]
        res = subprocess.run(cmd, env=dict(os.environ, **_ENV), capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plain = next((r["step_peak_mib"] for r in rows if r["method"] == "none"), None)
    print(f"{'method':<12} {'step peak MiB':>14} {'vs plain':>9} {'held ratio':>11}")
    for r in rows:
        rel = f"{r['step_peak_mib'] / plain:.2f}" if plain else "-"
        print(f"{r['method']:<12} {r['step_peak_mib']:>14.0f} {rel:>9} {r.get('held_ratio', 1.0):>11.1f}")
    out = Path("benchmarks/results/act_engine")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"step_peak_v{a.vocab}_b{a.batch}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
