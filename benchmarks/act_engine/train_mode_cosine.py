"""Train-mode gradient cosine to the exact gradient on the ResNet-18 config (hf_model("resnet18",
"small"): 96x96 inputs, batch 16) with Fashion-MNIST images (upsampled, one channel) or random
images (--random), BatchNorm on batch statistics. Also times GACT/COMET's sensitivity probe
against a plain training step, and for GACT reports the average width it chose and the lowest
width any BatchNorm input got (the probe runs in train mode, like the training step).

usage: python benchmarks/act_engine/train_mode_cosine.py [--random] [--methods uniform-2 uniform-4 gact-2 gact-3 comet]
       [--gact-options probe_method=sampled meta_bits=none]

The probe's cost is given in plain training steps: the median of three steps timed right after
each probe (the machine may be shared, so both are measured at the same time).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.act import ActivationCompressor
from lowbit.loop import parameter_gradient
from lowbit.models.hf import hf_batch, hf_loss, hf_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--random", action="store_true")
    p.add_argument("--methods", nargs="+", default=["uniform-2", "uniform-4", "gact-2", "comet"])
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--probe-reps", type=int, default=3, help="probes timed per adaptive method (median reported)")
    p.add_argument("--gact-options", nargs="*", default=[], help="key=value options for gact/comet (none -> None)")
    p.add_argument("--out", default=None, help="result file name (default train_mode_cosine_<data>.json)")
    a = p.parse_args()
    options = {}
    for kv in a.gact_options:
        k, _, v = kv.partition("=")
        options[k] = None if v.lower() == "none" else int(v) if v.isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
    torch.manual_seed(0)
    if a.random:
        model = hf_model("resnet18", "small")
        batch = hf_batch("resnet18", model, 16, size="small", generator=torch.Generator().manual_seed(0))
    else:
        from lowbit.data import load_images

        model = hf_model("resnet18", "small", num_channels=1)
        x, y = load_images("fashion-mnist", "train", 16)
        batch = {"pixel_values": F.interpolate(x.float().reshape(16, 1, 28, 28), size=96, mode="bilinear"), "labels": y}
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def grad(act=None) -> torch.Tensor:
        model.load_state_dict(state)
        return parameter_gradient(model, lambda: hf_loss(model, batch), act).double()

    def step_time(reps: int = 3) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            grad()
            times.append(time.perf_counter() - t)
        return sorted(times)[1]

    exact = grad()
    step_s = step_time()
    rows = []
    for spec in a.methods:
        name, _, bits = spec.partition("-")
        opts = options if name in ("gact", "comet") else {}

        def make() -> ActivationCompressor:
            return ActivationCompressor(name, bits=(int(bits) if name == "uniform" else float(bits)) if bits else None,
                                        model=model, **opts)

        act = make()
        probe_s = probe_in_steps = None
        if act.policy.adaptive:
            # a fresh compressor's first probe, three times, each against the plain steps timed
            # right before and after it (the machine may be shared): the median ratio
            ratios, times = [], []
            for rep in range(a.probe_reps):
                act = make()
                before = step_time()
                t = time.perf_counter()
                act.estimate(lambda: hf_loss(model, batch))
                times.append(time.perf_counter() - t)
                model.load_state_dict(state)
                ratios.append(times[-1] / ((before + step_time()) / 2))
            probe_s, probe_in_steps = sorted(times)[len(times) // 2], sorted(ratios)[len(ratios) // 2]
        cos = [float(F.cosine_similarity(grad(act), exact, dim=0)) for _ in range(a.draws)]
        row = {"method": spec, "cosine_mean": sum(cos) / len(cos), "cosines": cos, "ratio": act.report().ratio,
               "probe_s": probe_s, "probe_in_steps": probe_in_steps,
               "options": {k: v for k, v in opts.items()}}
        stats, assigned = getattr(act.policy, "stats", {}), act.bit_allocation
        if stats and assigned:  # GACT: the widths it chose
            total = sum(s.numel for s in stats.values())
            row["avg_bits"] = sum(assigned[i] * s.numel for i, s in stats.items()) / total
            norm = [assigned[i] for i, s in stats.items() if s.role == "norm_input"]
            row["norm_input_bits_min"] = min(norm) if norm else None
            row["finer_groups"] = len(getattr(act.policy, "groups", {}))
        rows.append(row)
        print(rows[-1], flush=True)
    print(f"plain step {step_s:.2f} s; data: {'random' if a.random else 'fashion-mnist'}")
    print(f"{'method':<10} {'train cos':>9} {'ratio':>6} {'probe (steps)':>13} {'avg bits':>8} {'BN-input min bits':>17}")
    for r in rows:
        ps = f"{r['probe_in_steps']:.1f}" if r["probe_in_steps"] else "-"
        avg = f"{r['avg_bits']:.2f}" if "avg_bits" in r else "-"
        bn = str(r.get("norm_input_bits_min") or "-")
        print(f"{r['method']:<10} {r['cosine_mean']:>9.3f} {r['ratio']:>6.1f} {ps:>13} {avg:>8} {bn:>17}")
    out = Path("benchmarks/results/act_engine")
    out.mkdir(parents=True, exist_ok=True)
    name = a.out or f"train_mode_cosine_{'random' if a.random else 'fmnist'}.json"
    (out / name).write_text(json.dumps({"step_s": step_s, "gact_options": options, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
