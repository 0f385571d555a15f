"""`lowbit bench ptq`: post-training quantization of a float ResNet and ViT trained once on
Fashion-MNIST, the same calibration samples for every row.

Part 1, methods: W8A8 ... W2A2 for rtn, adaround and aquant: test accuracy, difference to float,
calibration time; then the checks (W8A8 within 0.5 points; AQuant >= AdaRound per cell).
Part 2, mixed precision: per-layer widths allocated under an average-bits budget from two
sensitivities, HAWQ's Hessian trace x perturbation and ZeroQ's output KL divergence, against
uniform widths and a random allocation of the same budget (weights only, 8-bit activations), with
round-to-nearest and with AdaRound weights. ``parts`` runs either part alone."""
from __future__ import annotations

import math
import random
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
from lowbit.train import evaluate_classifier

CONFIGS = [(8, 8), (4, 8), (4, 4), (2, 4), (4, 2), (2, 2)]
METHODS = ("rtn", "adaround", "aquant")
BUDGETS = (4.0, 3.0, 2.5, 2.0)  # average weight bits of the quantized layers (4, 3, 2: uniform plans of the same size exist)
WIDTHS = quant.ALLOCATION_WIDTHS  # widths the allocation chooses from (1: binary weights)
MIXED_METHODS = ("rtn", "adaround")
SENSITIVITIES = ("hessian", "kl")  # how the mixed-precision allocation measures each layer
PARTS = ("methods", "mixed")
DEFAULTS = {"epochs": 2, "calib": 512, "limit": None, "test_limit": None, "iters": 500}
QUICK = {"epochs": 1, "calib": 64, "limit": 600, "test_limit": 300, "iters": 20}
W8A8_TOLERANCE = 0.5  # points of accuracy


def random_allocation(sizes: dict[str, int], widths, average_bits: float, seed: int = 0) -> dict[str, int]:
    """Random per-layer widths whose average (weighted by layer size) is at most ``average_bits``:
    draw widths at random, then lower a random layer until the budget holds, then raise random
    layers while it still holds (so the random plan uses about the same size)."""
    rng = random.Random(seed)
    widths = sorted(widths)
    budget = average_bits * sum(sizes.values())
    plan = {n: rng.choice(widths) for n in sizes}

    def used() -> float:
        return sum(sizes[n] * b for n, b in plan.items())

    while used() > budget:
        n = rng.choice([n for n, b in plan.items() if b > widths[0]])
        plan[n] = widths[widths.index(plan[n]) - 1]
    for n in rng.sample(list(plan), len(plan)):
        while plan[n] < widths[-1]:
            up = widths[widths.index(plan[n]) + 1]
            if used() + sizes[n] * (up - plan[n]) > budget:
                break
            plan[n] = up
    return plan


def run(models=("resnet", "vit"), quick: bool = False, out: str | Path = "results/ptq", seed: int = 0,
        configs=CONFIGS, methods=METHODS, budgets=BUDGETS, parts=PARTS, progress: bool = True, log=print) -> dict:
    cfg = QUICK if quick else DEFAULTS
    train, test, data_name = bench_images(cfg, quick, log)
    pick = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(seed))[: cfg["calib"]]
    calib, calib_labels = train[0][pick], train[1][pick]
    results = {"quick": quick, "seed": seed, "data": data_name, "threads": torch.get_num_threads(), "config": dict(cfg),
               "models": {}}
    options = {"iters": cfg["iters"]}
    for name in models:
        model = reference_model(name, image_size=train[0].shape[-1], seed=seed)
        t0 = time.perf_counter()
        quant.train_quantized(model, train, test, epochs=cfg["epochs"], seed=seed, progress=progress, desc=f"float {name}")
        model.eval()
        float_acc = evaluate_classifier(model, *test)
        log(f"{name}: float32 {float_acc:.2f}% ({time.perf_counter() - t0:.0f} s training)")
        res = {"float_accuracy": float_acc, "rows": [], "mixed": []}
        for wb, ab in configs if "methods" in parts else ():
            for method in methods:
                t0 = time.perf_counter()
                q = quant.ptq(model, calib, w_bits=wb, a_bits=ab, method=method, adaround=options, progress=progress)
                seconds = time.perf_counter() - t0
                acc = evaluate_classifier(q, *test)
                res["rows"].append({"w_bits": wb, "a_bits": ab, "method": method, "accuracy": acc,
                                    "delta": acc - float_acc, "seconds": seconds})
                log(f"{name} W{wb}A{ab} {method}: {acc:.2f}% ({acc - float_acc:+.2f}), {seconds:.1f} s")
        if "mixed" in parts:
            res["mixed"] = _mixed_precision(model, calib, calib_labels, test, budgets, options, float_acc, progress, log,
                                            name)
        res["checks"] = _checks(res)
        results["models"][name] = res
        save_results(results, out, "ptq", table_markdown, plot, log)  # after each model: an hour-long run keeps its part
    return results


def _mixed_precision(model, calib, labels, test, budgets, options, float_acc, progress, log, name) -> list[dict]:
    folded = quant.fold_batchnorm(model)
    sizes = quant.weight_counts(folded, inner_only=True)  # first/last stay float
    names = list(sizes)
    plans, measured = [], {}
    for how in SENSITIVITIES:
        t0 = time.perf_counter()
        measured[how] = quant.sensitivity(folded, (calib, labels), bits=WIDTHS, how=how, layers=names)
        log(f"{name}: {how} sensitivities of {len(names)} layers in {time.perf_counter() - t0:.1f} s")
        plans += [("mixed", how, avg, quant.allocate_bits(measured[how], sizes, average_bits=avg)) for avg in budgets]
    for avg in budgets:
        plans.append(("random", "", avg, random_allocation(sizes, WIDTHS, avg, seed=0)))
    # uniform widths at and around the budgets (2.5 bits has no uniform plan of the same size)
    for b in sorted({w for a in budgets for w in (math.floor(a), math.ceil(a))} & set(WIDTHS)):
        plans.append(("uniform", "", float(b), {n: b for n in names}))
    rows = []
    for kind, how, avg, plan in plans:
        bits_used = quant.average_bits(plan, sizes)
        # every plan's objective under every measure: a mixed plan must be optimal for its own
        totals = {h: sum(sens[n][plan[n]] for n in names) for h, sens in measured.items()}
        for method in MIXED_METHODS:
            q = quant.ptq(model, calib, w_bits=plan, a_bits=8, method=method, adaround=options, progress=progress)
            acc = evaluate_classifier(q, *test)
            rows.append({"allocation": kind, "sensitivity": how, "budget_bits": avg, "average_bits": bits_used,
                         "method": method, "accuracy": acc, "delta": acc - float_acc, "plan": plan,
                         "sum_sensitivity": totals})
            log(f"{name} {kind} {how} {bits_used:.2f} bits ({method}): {acc:.2f}%")
    return rows


def _checks(res: dict) -> dict:
    cells = {(r["w_bits"], r["a_bits"], r["method"]): r["accuracy"] for r in res["rows"]}
    w8a8 = {m: res["float_accuracy"] - a for (w, b, m), a in cells.items() if (w, b) == (8, 8)}
    vs = [{"w_bits": w, "a_bits": b, "margin": a - cells[(w, b, "adaround")]}
          for (w, b, m), a in cells.items() if m == "aquant" and (w, b, "adaround") in cells]
    mixed = {(r["allocation"], _sensitivity_name(r), r["budget_bits"], r["method"]): r["accuracy"] for r in res["mixed"]}
    beats = [{"budget_bits": avg, "sensitivity": how, "method": m, "mixed": acc,
              "uniform": mixed.get(("uniform", "", avg, m)), "random": mixed.get(("random", "", avg, m))}
             for (kind, how, avg, m), acc in mixed.items() if kind == "mixed"]
    return {"w8a8_drop": w8a8, "w8a8_ok": all(d <= W8A8_TOLERANCE for d in w8a8.values()),
            "aquant_vs_adaround": vs, "mixed_vs_uniform_random": beats}


def _sensitivity_name(row: dict) -> str:
    """How a mixed row's widths were allocated ("kl", "hessian"); "" for uniform and random rows.
    Rows of older runs have no name there (or HAWQ's summed sensitivity, a number): Hessian."""
    if row["allocation"] != "mixed":
        return ""
    how = row.get("sensitivity")
    return how if isinstance(how, str) else "hessian"


def _allocation_label(row: dict) -> str:
    """"mixed (kl)", "mixed (hessian)", "uniform", "random"."""
    return f"mixed ({_sensitivity_name(row)})" if row["allocation"] == "mixed" else row["allocation"]


def table_markdown(results: dict) -> str:
    parts = []
    for name, res in results["models"].items():
        if res["rows"]:
            cells = {(r["w_bits"], r["a_bits"], r["method"]): r for r in res["rows"]}
            methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
            configs = list(dict.fromkeys((r["w_bits"], r["a_bits"]) for r in res["rows"]))
            rows = [[f"W{w}A{a}"] + [f"{cells[(w, a, m)]['accuracy']:.2f} ({cells[(w, a, m)]['delta']:+.2f})"
                                     for m in methods] + [round(cells[(w, a, methods[-1])]["seconds"], 1)]
                    for w, a in configs]
            parts.append(f"**{name}** on {results['data']}, float32 {res['float_accuracy']:.2f}%: test accuracy % "
                         f"(Δ vs float32)\n\n" + markdown_table(["bits"] + list(methods) + [f"{methods[-1]} s"], rows))
        if res["mixed"]:
            mrows = [[_allocation_label(r), r["budget_bits"], round(r["average_bits"], 2), r["method"],
                      round(r["accuracy"], 2), round(r["delta"], 2)] for r in res["mixed"]]
            parts.append(f"**{name}** mixed precision (weights; 8-bit activations)\n\n" + markdown_table(
                ["allocation", "budget bits", "average bits", "weights", "test acc %", "Δ vs float32"], mrows))
    return "\n\n".join(parts)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    with_methods = any(results["models"][n]["rows"] for n in names)
    panels = int(with_methods) + int(any(results["models"][n]["mixed"] for n in names))
    fig, axes = plt.subplots(max(panels, 1), len(names), figsize=(6 * len(names), 4 * max(panels, 1)), squeeze=False)
    for col, name in enumerate(names):
        res = results["models"][name]
        ax = axes[0][col]
        if with_methods and not res["rows"]:
            ax.axis("off")
        elif res["rows"]:  # (a mixed-precision-only run has no methods panel)
            methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
            configs = list(dict.fromkeys((r["w_bits"], r["a_bits"]) for r in res["rows"]))
            width = 0.8 / len(methods)
            for i, m in enumerate(methods):
                acc = {(r["w_bits"], r["a_bits"]): r["accuracy"] for r in res["rows"] if r["method"] == m}
                ax.bar([k + i * width for k in range(len(configs))], [acc[c] for c in configs], width, label=m)
            ax.axhline(res["float_accuracy"], color="k", lw=1, ls="--", label="float32")
            ax.set_xticks([k + width * (len(methods) - 1) / 2 for k in range(len(configs))], [f"W{w}A{a}" for w, a in configs])
            ax.set_ylabel("test accuracy (%)")
            ax.set_ylim(max(0, min((r["accuracy"] for r in res["rows"]), default=5) - 5), 100)
            ax.set_title(f"{name}: post-training quantization")
            ax.legend(fontsize=8)
        if not res["mixed"]:
            continue
        ax = axes[int(with_methods)][col]
        kinds = list(dict.fromkeys(_allocation_label(r) for r in res["mixed"]))
        for kind, marker in zip(kinds, "os^xdv"):
            for m, ls in zip(MIXED_METHODS, ("-", ":")):
                pts = sorted((r["average_bits"], r["accuracy"]) for r in res["mixed"]
                             if _allocation_label(r) == kind and r["method"] == m)
                if pts:
                    ax.plot(*zip(*pts), marker=marker, ls=ls, label=f"{kind}, {m} weights")
        ax.set_xlabel("average weight bits")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: mixed precision vs uniform")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
