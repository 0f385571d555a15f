"""ACT on a ResNet-18-class model trained on Fashion-MNIST, in train mode (BatchNorm on batch
statistics): plain autograd against compressed activations, with the same seed, data, order and
schedule for every row.

The model is the real-model matrix's ResNet-18 (``lowbit.models.hf.hf_model("resnet18")``:
transformers' ``ResNetForImageClassification``, basic blocks, depths [2, 2, 2, 2]) with trimmed
widths and one input channel; images are padded from 28x28 to 32x32.

Per method: test accuracy after training and its difference to plain (points), the memory held
between forward and backward and the step's peak (RSS growth in a child process, ratios to
plain), lowbit's byte ratio, the train-mode gradient cosine to the exact gradient on a fixed
batch at the initial weights (GACT's sensitivities probed on another batch; mean over rounding
draws) and the median step time. Writes ``<out>/act-resnet-fmnist.json``, ``.md`` and ``.png``.

    python -m lowbit.bench.act_resnet_fmnist [--quick] [--out DIR] [--methods none gact-2 uniform-2]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.act import ActivationCompressor
from lowbit.bench.common import image_data, markdown_table, method_label, save_results, write_json
from lowbit.loop import parameter_gradient

NAME = "act-resnet-fmnist"
OUT = "benchmarks/results/act-resnet-fmnist"
METHODS: list[tuple[str, float | None]] = [("none", None), ("gact", 2), ("uniform", 2)]
ACCURACY_TARGET_POINTS = 0.5  # gact's test accuracy within this many points of plain
# Budget: 200 steps of 64 images (one pass over 12800), the same for every row: about 15 minutes
# for the three default rows on two busy CPU cores (torch on one thread, see _set_threads).
DEFAULTS = {"widths": [16, 32, 64, 128], "limit": 12800, "test_limit": 10000, "epochs": 1, "batch_size": 64,
            "lr": 3e-3, "cos_batch": 64, "draws": 2, "memory_repeats": 2, "threads": 1}
QUICK = {"widths": [8, 16, 32, 64], "limit": 512, "test_limit": 256, "epochs": 1, "batch_size": 64,
         "lr": 3e-3, "cos_batch": 32, "draws": 2, "memory_repeats": 1, "threads": 1}
SIDE = 32  # 28x28 images zero-padded (in standardised units: the background value) to 32x32


class ResNetClassifier(nn.Module):
    """``hf_model("resnet18")`` with one input channel and ``widths`` per stage, called on an image
    tensor [N, 1, H, W] and returning logits [N, 10] (what lowbit.train's loops expect)."""

    def __init__(self, widths: list[int]):
        super().__init__()
        from lowbit.models.hf import hf_model

        self.net = hf_model("resnet18", "tiny", num_channels=1, hidden_sizes=list(widths), embedding_size=widths[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def build_model(widths: list[int], seed: int = 0) -> ResNetClassifier:
    """The benchmark's model with the same seeded initialisation for every row."""
    torch.manual_seed(seed)
    return ResNetClassifier(widths)


def _pad(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, 28, 28] standardised images -> [N, 1, 32, 32], padded with the background value."""
    background = float(x.amin())
    p = (SIDE - x.shape[-1]) // 2
    return F.pad(x, (p, SIDE - x.shape[-1] - p, p, SIDE - x.shape[-2] - p), value=background) if p > 0 else x


def load_data(cfg: dict, quick: bool, log=print):
    """((x_train, y_train), (x_test, y_test), data name): Fashion-MNIST padded to 32x32."""
    train, test, name = image_data("fashion-mnist", limit=cfg["limit"], test_limit=cfg["test_limit"],
                                   notice=log)
    return (_pad(train[0]), train[1]), (_pad(test[0]), test[1]), name


def make_act(method: str, bits: float | None, model: nn.Module, seed: int = 0) -> ActivationCompressor:
    if bits is not None and method == "uniform":
        bits = int(bits)
    return ActivationCompressor(method, bits=bits, model=model, seed=seed)


def train_mode_cosine(method: str, bits: float | None, cfg: dict, data, seed: int = 0) -> dict:
    """Cosine of the compressed parameter gradient to the exact one, model in train mode (BatchNorm
    on batch statistics), at the initial weights, on the first ``cos_batch`` training images;
    adaptive methods probe on the next ``cos_batch`` images first. Mean over ``draws`` draws."""
    (x, y), _ = data
    n = cfg["cos_batch"]
    xb, yb = x[:n], y[:n]
    model = build_model(cfg["widths"], seed)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def grad(act: ActivationCompressor | None) -> torch.Tensor:
        model.load_state_dict(state)  # BatchNorm's running statistics too
        return parameter_gradient(model, lambda: F.cross_entropy(model(xb), yb), act).double()

    exact = grad(None)
    act = make_act(method, bits, model, seed)
    if act.policy.adaptive:
        xp, yp = x[n : 2 * n], y[n : 2 * n]
        act.estimate(lambda: F.cross_entropy(model(xp), yp))
        model.load_state_dict(state)
    cos, err = [], []
    for _ in range(cfg["draws"]):
        g = grad(act)
        cos.append(float(F.cosine_similarity(g, exact, dim=0)))
        err.append(float((g - exact).pow(2).sum() / exact.pow(2).sum()))
    rep = act.report()
    act.close()
    out = {"grad_cosine": statistics.fmean(cos), "grad_cosines": cos, "grad_rel_sq_error": statistics.fmean(err),
           "lowbit_ratio": rep.ratio}
    if getattr(act.policy, "stats", None):  # GACT: the widths it chose, by role
        stats, assigned = act.policy.stats, act.bit_allocation
        total = sum(s.numel for s in stats.values())
        out["avg_bits"] = sum(assigned.get(i, 0) * s.numel for i, s in stats.items()) / max(total, 1)
        norm = [assigned[i] for i, s in stats.items() if s.role == "norm_input" and i in assigned]
        out["norm_input_min_bits"] = min(norm) if norm else None
    return out


def measure_memory(method: str, bits: float | None, cfg: dict, seed: int = 0, timeout: float = 600) -> dict:
    """Held and step-peak RSS growth of one training step, in a child process (see
    :mod:`lowbit.bench.memory` for the method)."""
    import os
    import subprocess

    from lowbit.bench.memory import CHILD_ENV

    cmd = [sys.executable, "-m", "lowbit.bench.act_resnet_fmnist", "--memory-child", "--method", method,
           "--cfg", json.dumps(cfg), "--seed", str(seed)]
    if bits is not None:
        cmd += ["--bits", str(bits)]
    out = subprocess.run(cmd, env=dict(os.environ, **CHILD_ENV), capture_output=True, text=True, check=False,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child(method: str, bits: float | None, cfg: dict, seed: int) -> dict:
    from lowbit.bench.memory import peak_rss_bytes, reset_peak_rss, rss_bytes, trim_heap

    _set_threads(cfg.get("threads"))
    (x, y), _, _ = load_data({**cfg, "limit": cfg["batch_size"], "test_limit": 1}, quick=False, log=lambda *a: None)
    model = build_model(cfg["widths"], seed)
    model.train()
    act = make_act(method, bits, model, seed)
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    held, step_peak = [], []
    can_peak = True
    for r in range(cfg["memory_repeats"] + 2):  # two warm-up steps: lazy allocations, gradients, GACT's widths
        gc.collect()
        trim_heap()
        before = rss_bytes()
        can_peak = reset_peak_rss() and can_peak
        with act:
            loss = closure()
        gc.collect()
        after = rss_bytes()
        loss.backward()
        top = peak_rss_bytes() if can_peak else float("nan")
        del loss
        model.zero_grad(set_to_none=False)
        rep = act.report()
        act.step(closure)
        if r >= 2:
            held.append(after - before)
            step_peak.append(top - before)
    return {"held_bytes": statistics.median(held), "step_peak_bytes": statistics.median(step_peak),
            "lowbit_raw_bytes": rep.raw_bytes, "lowbit_stored_bytes": rep.stored_bytes}


def run(quick: bool = False, out: str | Path = OUT, methods=METHODS, memory: bool = True, seed: int = 0,
        log=print) -> dict:
    """Train the ResNet-18-class model with each of ``methods`` ([(method, bits)], the first is the
    baseline, normally ``("none", None)``) on the same data and schedule; write the JSON, markdown
    table and plot to ``out``; return the results."""
    cfg = dict(QUICK if quick else DEFAULTS)
    restore = _set_threads(cfg.get("threads"))
    try:
        return _run(cfg, quick, out, methods, memory, seed, log)
    finally:
        restore()


def _set_threads(n: int | None):
    """Run torch on ``n`` threads (on a shared machine a second thread mostly waits); returns the
    undo. The codec kernels' own (numba) threads are left alone: changing their count before torch
    has run made torch's steps 20x slower here."""
    if not n:
        return lambda: None
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return lambda: torch.set_num_threads(before)


def _run(cfg: dict, quick: bool, out, methods, memory: bool, seed: int, log) -> dict:
    from lowbit.train import train_classifier

    data = load_data(cfg, quick, log)
    train, test, name = data
    results: dict = {"quick": quick, "seed": seed, "data": name, "side": SIDE, "threads": torch.get_num_threads(),
                     "train_mode": True, "config": cfg, "rows": []}
    base = None
    for method, bits in methods:
        label = method_label(method, bits)
        row: dict = {"label": label, "method": method, "bits": bits}
        row.update(train_mode_cosine(method, bits, cfg, (train, test), seed))
        model = build_model(cfg["widths"], seed)
        act = make_act(method, bits, model, seed)
        t0 = time.perf_counter()
        res = train_classifier(model, train, test, act, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                               lr=cfg["lr"], seed=seed, desc=f"{NAME} {label}")
        act.close()
        row.update(test_accuracy=res.metric, train_seconds=time.perf_counter() - t0, steps=len(res.step_times),
                   median_step_s=res.median_step_time, estimate_seconds=sum(res.estimate_times),
                   final_train_loss=statistics.fmean(res.train_losses[-20:]), train_losses=res.train_losses)
        if memory:
            row.update(measure_memory(method, bits, cfg, seed))
        if base is None:
            base = row
        row["accuracy_delta"] = row["test_accuracy"] - base["test_accuracy"]
        row["step_time_ratio"] = row["median_step_s"] / base["median_step_s"]
        if memory:
            row["held_ratio"] = base["held_bytes"] / max(row["held_bytes"], 1)
            row["peak_ratio"] = base["step_peak_bytes"] / max(row["step_peak_bytes"], 1)
        results["rows"].append(row)
        write_json(results, Path(out) / f"{NAME}.json")  # a long run can be stopped with what it has
        log(f"{label}: test accuracy {row['test_accuracy']:.2f}% ({row['accuracy_delta']:+.2f} points), "
            f"train-mode grad cos {row['grad_cosine']:.4f}, lowbit ratio {row['lowbit_ratio']:.1f}x, "
            f"held ÷{row.get('held_ratio', float('nan')):.1f}, peak ÷{row.get('peak_ratio', float('nan')):.2f}, "
            f"{row['train_seconds']:.0f} s")
    gact = next((r for r in results["rows"] if r["method"] == "gact"), None)
    if gact is not None and base is not None and base["method"] == "none":
        results["target"] = {"gact_within_points": ACCURACY_TARGET_POINTS, "gact_delta": gact["accuracy_delta"],
                             "met": abs(gact["accuracy_delta"]) <= ACCURACY_TARGET_POINTS}
    save_results(results, out, NAME, table, plot, log)
    return results


def table(results: dict) -> str:
    headers = ["method", "test acc %", "Δ points", "held MiB", "held ÷", "step peak MiB", "peak ÷", "lowbit ratio",
               "grad cos (train)", "step × plain"]
    rows = []
    for r in results["rows"]:
        held, peak = r.get("held_bytes"), r.get("step_peak_bytes")
        rows.append([r["label"], round(r["test_accuracy"], 2), f"{r['accuracy_delta']:+.2f}",
                     "-" if held is None else round(held / 2**20, 1), round(r.get("held_ratio", float("nan")), 1),
                     "-" if peak is None else round(peak / 2**20, 1), round(r.get("peak_ratio", float("nan")), 2),
                     round(r["lowbit_ratio"], 1), round(r["grad_cosine"], 4), round(r["step_time_ratio"], 2)])
    cfg = results["config"]
    text = (f"ResNet-18-class (widths {cfg['widths']}), {results['data']} {cfg['limit']} train / "
            f"{cfg['test_limit']} test images at {results['side']}x{results['side']}, {cfg['epochs']} epoch(s), "
            f"batch {cfg['batch_size']}, seed {results['seed']}, train mode\n\n")
    text += markdown_table(headers, rows)
    t = results.get("target")
    if t:
        text += (f"\n\ngact within {t['gact_within_points']} points of plain: "
                 f"{'met' if t['met'] else 'NOT met'} ({t['gact_delta']:+.2f})")
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results["rows"]:
        losses = r["train_losses"]
        k = max(1, len(losses) // 50)
        smooth = [statistics.fmean(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
        a1.plot(smooth, label=f"{r['label']} ({r['test_accuracy']:.1f}%)")
        a2.scatter(r.get("peak_ratio", r["lowbit_ratio"]), r["grad_cosine"], s=36)
        a2.annotate(r["label"], (r.get("peak_ratio", r["lowbit_ratio"]), r["grad_cosine"]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a1.set_title("Fashion-MNIST, ResNet-18-class, train mode")
    a1.legend(fontsize=8)
    a2.set_xlabel("step peak reduction vs plain (x, RSS)")
    a2.set_ylabel("gradient cosine (train mode)")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _method(text: str) -> tuple[str, float | None]:
    name, _, b = text.partition("-")
    return name, (float(b) if b else None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=OUT)
    p.add_argument("--methods", nargs="+", type=_method, default=None, help="e.g. none gact-2 uniform-2")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="none", help=argparse.SUPPRESS)
    p.add_argument("--bits", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.memory_child:
        print(json.dumps(_memory_child(a.method, a.bits, json.loads(a.cfg), a.seed)))
        return
    run(quick=a.quick, out=a.out, methods=a.methods or METHODS, memory=not a.no_memory, seed=a.seed)


if __name__ == "__main__":
    main()
