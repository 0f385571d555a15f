"""`lowbit bench smartdeal`: SmartDeal against float32, magnitude pruning and int8 on the reference
ResNet and Fashion-MNIST. One float model is trained; each method starts from it and is fine-tuned
with the same schedule. Reported: test accuracy, stored weight bytes of the compressed layers, and
an inference energy estimate for one 28x28 image from a per-operation energy table.

Energy table (45 nm, 0.9 V; M. Horowitz, "Computing's energy problem (and what we can do about
it)", ISSCC 2014), in pJ: 32-bit float multiply 3.7, add 0.9; 8-bit int multiply 0.2; 32-bit int
add 0.1; 32-bit DRAM read 640 (160 per byte). lowbit's assumption: a multiplication by a signed
power of two costs a 32-bit integer add (an exponent add or a shift)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

from lowbit import decompose, quant
from lowbit.bench.common import (
    bench_images,
    markdown_table,
    reference_model,
    save_results,
)
from lowbit.train import evaluate_classifier

ENERGY_PJ = {"fp32_mul": 3.7, "fp32_add": 0.9, "int8_mul": 0.2, "int32_add": 0.1, "shift": 0.1, "dram_byte": 160.0}
ENERGY_SOURCE = "Horowitz, ISSCC 2014 (45 nm); shift = 32-bit int add (lowbit's assumption)"
DEFAULTS = {"epochs": 3, "finetune_epochs": 2, "limit": 20000, "test_limit": None, "batch_size": 128, "lr": 3e-3,
            "finetune_lr": 1e-3, "sparsity": 0.5}
QUICK = {"epochs": 1, "finetune_epochs": 1, "limit": 500, "test_limit": 300, "batch_size": 64, "lr": 5e-3,
         "finetune_lr": 2e-3, "sparsity": 0.5}


def _compressed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv / linear layers the methods compress: all but the first and the last."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][1:-1]


def _positions(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, int]:
    """Output positions (pixels, or 1 for a linear layer) of each named layer on input x [1, ...]."""
    out: dict[str, int] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: out.__setitem__(n, o[0, 0].numel())) for n in names]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return out


def cost(model: nn.Module, method: str, x: torch.Tensor) -> dict:
    """Operations, fetched weight bytes and energy (pJ) of the compressed layers for one image."""
    layers = _compressed_layers(model)
    pos = _positions(model, [n for n, _ in layers], x)
    ops = {"fp32_mac": 0, "int8_mac": 0, "shift_add": 0, "weights_fetched": 0, "weights": 0}
    stored = 0
    for name, m in layers:
        n, p = m.weight.numel(), pos[name]
        ops["weights"] += n
        if method == "smartdeal":
            q = m.weight_quantizer
            ce = q.effective_ce()
            r = ce.shape[1]
            # z = input patches times B (dense, shared by every output channel), then Ce's shifts
            dense = (m.in_channels * m.kernel_size[0] * m.kernel_size[1] * r) if isinstance(m, nn.Conv2d) else m.in_features * r
            ops["fp32_mac"] += dense * p
            ops["shift_add"] += int((ce != 0).sum()) * p
            ops["weights_fetched"] += int((ce != 0).sum())
            stored += q.packed_bytes()
        elif method == "pruning":
            nnz = int((m.weight != 0).sum())
            ops["fp32_mac"] += nnz * p
            ops["weights_fetched"] += nnz
            stored += 4 * nnz + math.ceil(n / 8)  # values and a bitmask
        elif method == "int8":
            ops["int8_mac"] += n * p
            ops["weights_fetched"] += n
            stored += n + 4 * m.weight.shape[0]
        else:
            ops["fp32_mac"] += n * p
            ops["weights_fetched"] += n
            stored += 4 * n
    e = ENERGY_PJ
    compute = (ops["fp32_mac"] * (e["fp32_mul"] + e["fp32_add"]) + ops["int8_mac"] * (e["int8_mul"] + e["int32_add"])
               + ops["shift_add"] * (e["shift"] + e["fp32_add"]))
    memory = stored * e["dram_byte"]  # every stored weight byte is fetched once
    return {**ops, "stored_bytes": stored, "float32_bytes": 4 * ops["weights"], "compute_pj": compute,
            "memory_pj": memory, "energy_pj": compute + memory}


def _prune(model: nn.Module, amount: float) -> nn.Module:
    """Magnitude (L1, unstructured) pruning of the compressed layers, mask kept while fine-tuning."""
    pruned = copy.deepcopy(model)
    for _, m in _compressed_layers(pruned):
        prune.l1_unstructured(m, "weight", amount=amount)
    return pruned


def run(quick: bool = False, out: str | Path = "results/smartdeal", seed: int = 0, progress: bool = True, log=print) -> dict:
    cfg = QUICK if quick else DEFAULTS
    train, test, data_name = bench_images(cfg, quick, log)
    size = train[0].shape[-1]
    fit = dict(batch_size=cfg["batch_size"], seed=seed, progress=progress)
    tune = dict(epochs=cfg["finetune_epochs"], lr=cfg["finetune_lr"], **fit)
    results = {"quick": quick, "seed": seed, "data": data_name, "model": "resnet", "config": dict(cfg),
               "energy_table_pj": ENERGY_PJ, "energy_source": ENERGY_SOURCE, "threads": torch.get_num_threads(), "rows": []}
    model = reference_model("resnet", image_size=size, seed=seed)
    float_acc = quant.train_quantized(model, train, test, epochs=cfg["epochs"], lr=cfg["lr"], desc="float32", **fit).metric
    x1 = test[0][:1]
    sd = decompose.smartdeal(model, sparsity=cfg["sparsity"])
    decomposed_acc = evaluate_classifier(sd, *test)  # as decomposed, before fine-tuning
    variants = [("float32", model, None), ("pruning", _prune(model, cfg["sparsity"]), None),
                ("int8", quant.quantize(model, "int8"), None), ("smartdeal", sd, decomposed_acc)]
    scratch = decompose.smartdeal(reference_model("resnet", image_size=size, seed=seed), sparsity=cfg["sparsity"])
    for label, m, before in variants + [("smartdeal (from scratch)", scratch, None)]:
        if label == "float32":
            acc = float_acc
        elif label.endswith("(from scratch)"):
            acc = quant.train_quantized(m, train, test, epochs=cfg["epochs"], lr=cfg["lr"], desc=label, **fit).metric
        else:
            acc = quant.train_quantized(m, train, test, desc=label, **tune).metric
        method = label.split(" ")[0]
        row = {"label": label, "accuracy": acc, "delta": acc - float_acc, **cost(m, method, x1)}
        if before is not None:
            row["accuracy_before_finetune"] = before
        if method == "smartdeal":
            row["layers"] = decompose.report(m)
            row["ce_on_grid"] = _ce_on_grid(m)
        results["rows"].append(row)
        log(f"{label}: {acc:.2f}% ({acc - float_acc:+.2f}), weights {row['stored_bytes'] / 1024:.1f} KiB")
    base = results["rows"][0]
    for row in results["rows"]:
        row["storage_reduction"] = base["stored_bytes"] / row["stored_bytes"]
        row["energy_reduction"] = base["energy_pj"] / row["energy_pj"]
    save_results(results, out, "smartdeal", table_markdown, plot, log)
    return results


def _ce_on_grid(model: nn.Module) -> bool:
    """Every effective Ce entry is 0 or a signed power of two within the layer's exponent bound."""
    for m in model.modules():
        q = getattr(m, "weight_quantizer", None)
        if isinstance(q, decompose.SmartDealWeight):
            ce = q.effective_ce()
            nz = ce[ce != 0].abs()
            e = torch.log2(nz)
            if not (torch.equal(e, e.round()) and bool((e >= q.e_min).all()) and bool((e <= q.e_max).all())):
                return False
    return True


def table_markdown(results: dict) -> str:
    rows = [[r["label"], round(r["accuracy"], 2), round(r["delta"], 2), round(r["stored_bytes"] / 1024, 1),
             round(r["storage_reduction"], 1), f"{r['fp32_mac'] + r['int8_mac']:,}", f"{r['shift_add']:,}",
             f"{r['weights_fetched']:,}", round(r["energy_pj"] / 1e6, 2), round(r["energy_reduction"], 2)]
            for r in results["rows"]]
    text = markdown_table(["method", "test acc %", "Δ vs float32", "weights KiB", "storage ×", "multiplies", "shift-adds",
                           "weights fetched", "energy µJ", "energy ×"], rows)
    return text + f"\n\nCompressed layers only (first and last stay float32), one image. Energy per operation: {ENERGY_SOURCE}."


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results["rows"]:
        for ax, key in zip(axes, ("storage_reduction", "energy_reduction")):
            ax.scatter(r[key], r["accuracy"], s=40)
            ax.annotate(r["label"], (r[key], r["accuracy"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    axes[0].set_xlabel("weight storage reduction vs float32 (x)")
    axes[1].set_xlabel("estimated inference energy reduction vs float32 (x)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"SmartDeal vs pruning and int8, ResNet on {results['data']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
