"""`lowbit bench onceqat`: one vertical-layered ResNet trained once for every width 8..2 against a
dedicated QAT model per width (same quantizers, initialisation, data order, schedule, and the same
number of training steps per width), on Fashion-MNIST: test accuracy per width, storage of the one
8-bit store against the sum of the dedicated models."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lowbit import quant
from lowbit.bench.common import (
    bench_images,
    markdown_table,
    reference_model,
    save_results,
)
from lowbit.quant import vertical
from lowbit.loop import evaluate_classifier

DEFAULTS = {"epochs": 3, "limit": 10000, "test_limit": None, "batch_size": 128, "lr": 3e-3}
QUICK = {"epochs": 1, "limit": 500, "test_limit": 300, "batch_size": 64, "lr": 5e-3}
TARGETS = {b: (3.0 if b == 2 else 1.0) for b in vertical.WIDTHS}  # points below the dedicated model, expected at most


def _stored_bytes(model: torch.nn.Module, bits: int) -> int:
    """Packed bytes of the model if its vertical weights were stored at ``bits`` each."""
    weights = [m for m in model.modules() if isinstance(m, vertical.VerticalWeight)]
    for q in weights:
        q.storage_bits = float(bits)
    try:
        return quant.model_size(model).packed_bytes
    finally:
        for q in weights:
            q.storage_bits = float(vertical.STORE_BITS)


def run(widths=vertical.WIDTHS, objective: str = "sum", quick: bool = False, out: str | Path = "results/onceqat",
        seed: int = 0, progress: bool = True, log=print) -> dict:
    cfg = QUICK if quick else DEFAULTS
    train, test, data_name = bench_images(cfg, quick, log)
    size = train[0].shape[-1]
    fit = dict(epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, progress=progress)
    results = {"quick": quick, "seed": seed, "data": data_name, "model": "resnet", "objective": objective,
               "threads": torch.get_num_threads(), "config": dict(cfg), "rows": []}
    model = reference_model("resnet", image_size=size, seed=seed)
    r = quant.train_quantized(model, train, test, desc="float32", **fit)
    results["float_accuracy"] = r.metric
    log(f"float32: {r.metric:.2f}%")
    once = quant.quantize(reference_model("resnet", image_size=size, seed=seed), "vertical")
    t0 = time.perf_counter()
    quant.train_quantized(once, train, test, desc=f"once-QAT ({objective})",
                          loss_fn=vertical.once_loss(widths, objective, seed=seed), **fit)
    results["once_seconds"] = time.perf_counter() - t0
    results["once_bytes"] = _stored_bytes(once, vertical.STORE_BITS)
    dedicated_seconds, dedicated_bytes = 0.0, 0
    for b in widths:
        with vertical.use_bits(once, b):
            once_acc = evaluate_classifier(once, *test)
        ded = quant.quantize(reference_model("resnet", image_size=size, seed=seed), "vertical", bits=b)
        t0 = time.perf_counter()
        r = quant.train_quantized(ded, train, test, desc=f"dedicated {b}-bit", **fit)
        dedicated_seconds += time.perf_counter() - t0
        stored = _stored_bytes(ded, b)
        dedicated_bytes += stored
        gap = r.metric - once_acc
        results["rows"].append({"bits": b, "once_accuracy": once_acc, "dedicated_accuracy": r.metric, "gap": gap,
                                "target": TARGETS[b], "target_met": gap <= TARGETS[b], "dedicated_bytes": stored})
        log(f"{b}-bit: once {once_acc:.2f}%, dedicated {r.metric:.2f}% (gap {gap:+.2f})")
    results["dedicated_seconds"], results["dedicated_bytes_total"] = dedicated_seconds, dedicated_bytes
    results["storage_ratio"] = dedicated_bytes / results["once_bytes"]
    save_results(results, out, "onceqat", table_markdown, plot, log)
    return results


def table_markdown(results: dict) -> str:
    rows = [[f"{r['bits']}", round(r["once_accuracy"], 2), round(r["dedicated_accuracy"], 2), round(r["gap"], 2),
             f"≤ {r['target']:g} " + ("✓" if r["target_met"] else "✗"), round(r["dedicated_bytes"] / 1024, 1)]
            for r in results["rows"]]
    text = markdown_table(["bits", "once-QAT acc %", "dedicated acc %", "dedicated − once", "expected gap", "dedicated KiB"], rows)
    text += (f"\n\nfloat32 {results['float_accuracy']:.2f}%. Storage: one 8-bit store "
             f"{results['once_bytes'] / 1024:.1f} KiB serves every width; the dedicated models together take "
             f"{results['dedicated_bytes_total'] / 1024:.1f} KiB ({results['storage_ratio']:.1f}x). Training: once-QAT "
             f"{results['once_seconds']:.0f} s, dedicated models {results['dedicated_seconds']:.0f} s in all.")
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [r["bits"] for r in results["rows"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(bits, [r["once_accuracy"] for r in results["rows"]], "o-", label="once-QAT (one model)")
    ax.plot(bits, [r["dedicated_accuracy"] for r in results["rows"]], "s--", label="dedicated model per width")
    ax.axhline(results["float_accuracy"], color="k", lw=1, ls=":", label="float32")
    ax.set_xlabel("bits (weights and inputs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"vertical-layered once-QAT, ResNet on {results['data']}")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
