"""`lowbit bench explain`: Shapley estimators against exact values on one model, the same
instances and seeds for every method, budgets of 8 to 128 evaluations per feature.

Setup as in the SHEAR paper: a 3-layer softplus MLP (width 64) on a tabular data set (scikit-learn's
wine, 13 features, like Adult's 13), the explained output is a class probability, the reference is
the training mean, ground truth by exact enumeration (2^13 coalitions). Outside rows: the shap
library's KernelExplainer and PermutationExplainer at the same budget (optional ``shap`` extra)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lowbit.bench.common import markdown_table, save_results
from lowbit.data import load_tabular
from lowbit.explain import metrics, shapley
from lowbit.models import MLP

BUDGETS = (8, 16, 32, 64, 128)
METHODS = ("permutation", "antithetic", "kernel", "shear", "shear-uniform")
DEFAULT_INSTANCES = {"adult": 300}  # of 11,306 test rows: exact values of every row would take an hour
# "shear-uniform": SHEAR with the outside players drawn x-or-reference with probability 1/2 (the
# paper's description) instead of lowbit's unbiased Shapley law: an ablation row


def tabular_model(data, seed: int = 0, steps: int = 200, lr: float = 3e-3) -> tuple[torch.nn.Module, float]:
    """The paper's explained model: MLP(M -> 64 -> 64 -> C) with softplus; full-batch Adam.
    Returns (model in eval mode, test accuracy in percent)."""
    torch.manual_seed(seed)
    model = MLP(data.x_train.shape[1], hidden=(64, 64), out_features=len(data.class_names), activation="softplus")
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(data.x_train), data.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).double().mean()) * 100
    return model, acc


class ClassProbability(torch.nn.Module):
    """f(x) = softmax(model(x))[:, target]: [N, M] -> [N]."""

    def __init__(self, model: torch.nn.Module, target: int):
        super().__init__()
        self.model, self.target = model, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x), dim=1)[:, self.target]


def _shap_rows(f, xs, reference, budgets, seeds, exact, log):
    try:
        import shap
    except ImportError:
        log("note: the shap library is not installed (pip install 'lowbit[compare]'): no shap rows")
        return []
    m = xs.shape[1]

    def f_np(a):
        with torch.no_grad():
            return f(torch.as_tensor(np.asarray(a), dtype=torch.float32)).double().numpy()

    rows = []
    bg = reference[None].numpy().astype(np.float64)
    for budget in budgets:
        for name in ("shap-kernel", "shap-permutation"):
            errs, ranks, times = [], [], []
            for seed in seeds:
                np.random.seed(seed)
                est = np.zeros(tuple(xs.shape))
                per = []
                for b in range(xs.shape[0]):
                    xb = xs[b : b + 1].numpy().astype(np.float64)
                    t0 = time.perf_counter()
                    if name == "shap-kernel":
                        ex = shap.KernelExplainer(f_np, bg)
                        est[b] = ex.shap_values(xb, nsamples=budget * m, l1_reg=False, silent=True)[0]
                    else:
                        ex = shap.PermutationExplainer(f_np, shap.maskers.Independent(bg), seed=seed)
                        est[b] = ex(xb, max_evals=max(budget * m, 2 * m + 1), silent=True).values[0]
                    per.append(time.perf_counter() - t0)
                e = torch.from_numpy(est)
                errs.append(metrics.absolute_error(e, exact))
                ranks.append(metrics.ranking_accuracy(e, exact))
                times.append(statistics.mean(per))
            rows.append(_row(name, budget, errs, ranks, times, budget * m))
            log(f"{name} budget {budget}: error {rows[-1]['abs_error']:.4f}, {rows[-1]['ms_per_instance']:.1f} ms")
    return rows


def _row(method, budget, errs, ranks, times, evals) -> dict:
    return {"method": method, "budget": budget, "abs_error": statistics.mean(errs),
            "abs_error_sd": statistics.pstdev(errs), "ranking_accuracy": statistics.mean(ranks),
            "ms_per_instance": 1e3 * statistics.mean(times), "evaluations_per_instance": evals}


def run(budgets=BUDGETS, methods=METHODS, seeds=(0, 1, 2), instances: int | None = None, data: str = "wine",
        target: int | None = None, with_shap: bool = True, quick: bool = False, out: str | Path = "results/explain",
        progress: bool = True, log=print) -> dict:
    """Writes explain.json / explain.md / explain.png under ``out``. ``target``: the class whose
    probability is explained (default 0, or 1 — the positive class — for binary data sets)."""
    if quick:
        budgets, seeds, instances = tuple(budgets)[:2], tuple(seeds)[:1], instances or 4
    tab = load_tabular(data)
    if instances is None and data in DEFAULT_INSTANCES:
        instances = DEFAULT_INSTANCES[data]
    if target is None:
        target = 1 if len(tab.class_names) == 2 else 0
    model, acc = tabular_model(tab)
    f = ClassProbability(model, target)
    xs = tab.x_test if instances is None else tab.x_test[:instances]
    reference = tab.x_train.mean(0)
    groups = tab.groups
    t0 = time.perf_counter()
    exact = shapley(f, xs, reference, "exact", groups=groups)
    exact_ms = 1e3 * (time.perf_counter() - t0) / xs.shape[0]
    m = len(tab.players)
    log(f"{data}: {tab.x_train.shape[0]} train rows, {m} players ({xs.shape[1]} columns), MLP test accuracy {acc:.1f}%; "
        f"explaining P(class {tab.class_names[target]}) for {xs.shape[0]} instances; exact: {exact_ms:.1f} ms/instance")
    rows = []
    bar = tqdm(total=len(methods) * len(budgets) * len(seeds), desc="explain", disable=not progress, leave=False)
    for method in methods:
        for budget in budgets:
            errs, ranks, times, evals = [], [], [], []
            for seed in seeds:
                name, outside = ("shear", "uniform") if method == "shear-uniform" else (method, "shapley")
                r = shapley(f, xs, reference, name, budget=budget, seed=seed, groups=groups, shear_outside=outside,
                            return_details=True)
                errs.append(metrics.absolute_error(r.values, exact))
                ranks.append(metrics.ranking_accuracy(r.values, exact))
                times.append(statistics.mean(r.seconds))
                evals.append(statistics.mean(r.evaluations))
                bar.update(1)
            rows.append(_row(method, budget, errs, ranks, times, statistics.mean(evals)))
    bar.close()
    if with_shap and groups is not None and any(len(g) > 1 for g in groups):
        log("note: shap's explainers have no one-hot groups: no shap rows for this data set")
    elif with_shap:
        rows += _shap_rows(f, xs, reference, budgets, seeds, exact, log)
    results = {"data": data, "features": m, "instances": int(xs.shape[0]), "seeds": list(seeds), "target": target,
               "model_accuracy": acc, "exact_ms_per_instance": exact_ms,
               "players": tab.players, "faithfulness_exact": metrics.faithfulness(f, xs, reference, exact, groups=groups),
               "rows": rows}
    results["claims"] = claims(rows)
    save_results(results, out, "explain", table_markdown, plot, log)
    return results


def claims(rows: list[dict]) -> dict:
    """SHEAR at 16 evaluations per feature against antithetic sampling, and its time against
    shap's KernelExplainer at the smallest budget where KernelExplainer's error is no larger."""
    by = {(r["method"], r["budget"]): r for r in rows}
    out = {}
    if ("shear", 16) in by and ("antithetic", 16) in by:
        ratio = by[("shear", 16)]["abs_error"] / by[("antithetic", 16)]["abs_error"]
        out["shear_vs_antithetic_error_ratio_at_16"] = ratio
        out["shear_at_most_half_of_antithetic"] = ratio <= 0.5
    ahead = sorted(b for (m, b), r in by.items()
                   if m == "shear" and ("antithetic", b) in by and r["abs_error"] < by[("antithetic", b)]["abs_error"])
    if any(m == "shear" for m, _ in by):
        out["shear_below_antithetic_at_budgets"] = ahead  # evaluations per feature where SHEAR is the more accurate
    if ("shear-uniform", 16) in by and ("antithetic", 16) in by:
        out["shear_uniform_vs_antithetic_error_ratio_at_16"] = (by[("shear-uniform", 16)]["abs_error"]
                                                              / by[("antithetic", 16)]["abs_error"])
    if ("shear", 16) in by:
        s = by[("shear", 16)]
        kern = sorted((r for r in rows if r["method"] == "shap-kernel"), key=lambda r: r["budget"])
        match = next((r for r in kern if r["abs_error"] <= s["abs_error"]), None)
        if kern:
            ref = match or kern[-1]  # if never as accurate, its largest budget is a lower bound on its time
            out["shap_kernel_budget_for_equal_error"] = match["budget"] if match else None
            out["shear_speedup_vs_shap_kernel_at_equal_error"] = ref["ms_per_instance"] / s["ms_per_instance"]
            out["shear_faster_than_shap_kernel_at_equal_error"] = ref["ms_per_instance"] > s["ms_per_instance"]
    for method in dict.fromkeys(r["method"] for r in rows):  # in row order: a stable JSON
        errs = [r["abs_error"] for r in sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])]
        if len(errs) > 1:
            out[f"{method}_error_falls_with_budget"] = errs[-1] < errs[0]
    return out


def table_markdown(results: dict) -> str:
    rows = [[r["method"], r["budget"], round(r["abs_error"], 4), round(r["abs_error_sd"], 4), round(r["ranking_accuracy"], 3),
             round(r["ms_per_instance"], 2), round(r["evaluations_per_instance"])] for r in results["rows"]]
    text = markdown_table(["method", "evals / feature", "abs error Σ|φ̂-φ|", "sd over seeds", "ranking acc",
                           "ms / instance", "evals / instance"], rows)
    c = results.get("claims", {})
    lines = [f"- {k}: {v if not isinstance(v, float) else round(v, 3)}" for k, v in c.items()]
    return text + ("\n\n" + "\n".join(lines) if lines else "")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["budget"])
        style = "--" if method.startswith("shap") else "-"
        axes[0].plot([r["budget"] for r in rows], [r["abs_error"] for r in rows], style, marker="o", label=method)
        axes[1].plot([r["ms_per_instance"] for r in rows], [r["abs_error"] for r in rows], style, marker="o", label=method)
    axes[0].set_xlabel("evaluations per feature")
    axes[1].set_xlabel("wall time per instance (ms)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("absolute error Σ|φ̂ - φ| vs exact")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Shapley estimators on {results['data']} ({results['features']} players, {results['instances']} instances)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
