"""`lowbit bench quant`: every recipe on the reference ResNet and Fashion-MNIST, one run, the same
initialisation, data order and schedule: test accuracy and its difference to float32, packed
size and compression, step time against float. Then the papers' claims (DIR-Net > XNOR > BNN,
FDA > STE, HQ/PTQ > naive ternary) and the expected accuracy gaps checked on these numbers."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lowbit import quant
from lowbit.bench.common import image_data, markdown_table, reference_model, save_results

# (label, recipe or "float", overrides)
ROWS: list[tuple[str, str, dict]] = [
    ("float32", "float", {}),
    ("bnn", "bnn", {}),
    ("bwn", "bwn", {}),
    ("xnor", "xnor", {}),
    ("fda", "fda", {}),
    ("fda-ste", "fda", {"estimator": "ste", "noise_adaptation": False}),
    ("dirnet", "dirnet", {}),
    ("sbnn", "sbnn", {}),
    ("sbnn-01", "sbnn", {"domain": "01"}),
    ("ternary", "ternary", {}),
    ("ternary-hq", "ternary-hq", {}),
    ("ternary-ptq", "ternary-ptq", {}),
    ("qnn-w2a2g6", "qnn", {}),
    ("int8", "int8", {}),
    ("int4", "int4", {}),
]
CLAIMS = [  # (better, worse, source)
    ("dirnet", "xnor", "DIR-Net"), ("xnor", "bnn", "XNOR-Net"), ("fda", "fda-ste", "FDA-BNN"),
    ("ternary-hq", "ternary", "HQ"), ("ternary-ptq", "ternary", "PTQ"), ("sbnn", "sbnn-01", "lowbit: SBNN domain"),
]
# accuracy drop expected at most against float32: 1-bit 8 points, ternary 4, int4 1
TARGETS = {"1-bit": 8.0, "ternary": 4.0, "int4": 1.0}
DEFAULTS = {"epochs": 2, "batch_size": 128, "lr": 3e-3}
QUICK = {"epochs": 1, "batch_size": 64, "lr": 5e-3, "limit": 1000}


def _target(recipe: str) -> str | None:
    if recipe.startswith("ternary"):
        return "ternary"
    if recipe == "int4":
        return "int4"
    if quant.RECIPES.get(recipe) is not None and quant.RECIPES[recipe].weight_bits == 1:
        return "1-bit"
    return None


def run(rows: list[tuple[str, str, dict]] | None = None, quick: bool = False, out: str | Path = "results/quant",
        seed: int = 0, progress: bool = True, log=print) -> dict:
    rows = ROWS if rows is None else rows
    cfg = QUICK if quick else DEFAULTS
    if quick:
        train, test, data_name = image_data("digits", limit=cfg["limit"], test_limit=cfg["limit"], notice=log)
    else:
        train, test, data_name = image_data(notice=log)
    size = train[0].shape[-1]
    results = {"quick": quick, "seed": seed, "data": data_name, "model": "resnet", "threads": torch.get_num_threads(),
               "config": {k: v for k, v in cfg.items()}, "rows": []}
    fit = dict(epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, progress=progress)
    teacher, base = None, None
    need_float = [("float32", "float", {})] if not any(r == "float" for _, r, _ in rows) else []
    for label, recipe, overrides in need_float + list(rows):
        model = reference_model("resnet", image_size=size, seed=seed)
        if recipe != "float":
            model = quant.quantize(model, recipe, **overrides)
        t0 = time.perf_counter()
        use_teacher = teacher if recipe != "float" and quant.get_recipe(recipe).distill > 0 else None
        r = quant.train_quantized(model, train, test, teacher=use_teacher, desc=label, **fit)
        wall = time.perf_counter() - t0
        sz = quant.model_size(model)
        row = {"label": label, "recipe": recipe, "overrides": overrides, "accuracy": r.metric,
               "packed_bytes": sz.packed_bytes, "float32_bytes": sz.float32_bytes, "compression": sz.compression,
               "step_time_s": r.median_step_time, "wall_s": wall, "distilled": use_teacher is not None,
               "loss_curve": r.train_losses[:: max(1, len(r.train_losses) // 100)]}
        if recipe == "float":
            teacher, base = model, row
        row["accuracy_delta"] = row["accuracy"] - base["accuracy"]
        row["time_ratio"] = row["step_time_s"] / base["step_time_s"]
        kind = _target(recipe)
        if kind:
            row["target"] = f"{kind}: within {TARGETS[kind]:g}"
            row["target_met"] = -row["accuracy_delta"] <= TARGETS[kind]
        results["rows"].append(row)
        log(f"{label}: accuracy {r.metric:.2f} ({row['accuracy_delta']:+.2f}), {sz.packed_bytes / 1024:.1f} KiB "
            f"(x{sz.compression:.1f}), step x{row['time_ratio']:.2f}, {wall:.0f} s")
    by = {r["label"]: r for r in results["rows"]}
    results["claims"] = [{"better": a, "worse": b, "source": src, "margin": by[a]["accuracy"] - by[b]["accuracy"],
                          "holds": by[a]["accuracy"] > by[b]["accuracy"]}
                         for a, b, src in CLAIMS if a in by and b in by]
    save_results(results, out, "quant", table_markdown, plot, log)
    return results


def table_markdown(results: dict) -> str:
    rows = [[r["label"], round(r["accuracy"], 2), round(r["accuracy_delta"], 2), round(r["packed_bytes"] / 1024, 1),
             round(r["compression"], 1), round(r["time_ratio"], 2),
             r.get("target", "-") + ("" if "target_met" not in r else (" ✓" if r["target_met"] else " ✗"))]
            for r in results["rows"]]
    text = markdown_table(["recipe", "test acc %", "Δ vs float32", "packed KiB", "compression ×", "step time ×",
                           "expected gap (points)"], rows)
    if results.get("claims"):
        claims = [[f"{c['better']} > {c['worse']}", c["source"], round(c["margin"], 2), "holds" if c["holds"] else "does not hold"]
                  for c in results["claims"]]
        text += "\n\n" + markdown_table(["claim", "from", "margin (points)", "here"], claims)
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results["rows"]:
        ax.scatter(r["packed_bytes"] / 1024, r["accuracy"], s=40)
        ax.annotate(r["label"], (r["packed_bytes"] / 1024, r["accuracy"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("packed model size (KiB, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"quantized ResNet on {results['data']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
