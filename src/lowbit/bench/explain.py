"""`lowbit bench explain`: Shapley estimators against exact values on one model, the same
instances and seeds for every method, budgets of 8 to 128 evaluations per feature.

Setup as in the SHEAR paper: a 3-layer softplus MLP (width 64) on a tabular data set (scikit-learn's
wine, 13 features, like Adult's 13), the explained output is a class probability, the reference is
the training mean, ground truth by exact enumeration (2^13 coalitions). Outside rows: the shap
library's KernelExplainer and PermutationExplainer at the same budget (optional ``shap`` extra).

A second section explains a boosted-trees model (scikit-learn's GradientBoostingClassifier, class
``target`` one-vs-rest) as a black box, its log-odds ``decision_function`` on numpy rows: lowbit's
model-agnostic estimators and SHEAR with finite-difference interactions against shap's
KernelExplainer, PermutationExplainer and its exact interventional TreeExplainer, which reads the
trees instead of evaluating the model (the best a tree user has). The log-odds, because that is
the output TreeExplainer explains exactly: with ``model_output="probability"`` it rescales the
log-odds attributions instead (recorded as ``shap_tree_probability_max_abs_diff_vs_exact``)."""
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
from lowbit.explain.blackbox import ClassProbability
from lowbit.train import tabular_model

BUDGETS = (8, 16, 32, 64, 128)
METHODS = ("permutation", "antithetic", "kernel", "shear", "shear-uniform")
DEFAULT_INSTANCES = {"adult": 300}  # of 11,306 test rows: exact values of every row would take an hour
# "shear-uniform": SHEAR with the outside players drawn x-or-reference with probability 1/2 (the
# paper's description) instead of lowbit's unbiased Shapley law: an ablation row


def _torch_to_numpy(f):
    def f_np(a):
        with torch.no_grad():
            return f(torch.as_tensor(np.asarray(a), dtype=torch.float32)).double().numpy()

    return f_np


def _shap_rows(f_np, xs, reference, budgets, seeds, exact, log, progress=False):
    """shap's KernelExplainer and PermutationExplainer on ``f_np`` (numpy [N, M] -> [N])."""
    try:
        import shap
    except ImportError:
        log("note: the shap library is not installed (pip install 'lowbit[compare]'): no shap rows")
        return []
    m = xs.shape[1]
    rows = []
    bg = reference[None].numpy().astype(np.float64)
    def explain_one(name, xb, budget, seed):
        if name == "shap-kernel":
            ex = shap.KernelExplainer(f_np, bg)
            return ex.shap_values(xb, nsamples=budget * m, l1_reg=False, silent=True)[0]
        ex = shap.PermutationExplainer(f_np, shap.maskers.Independent(bg), seed=seed)
        return ex(xb, max_evals=max(budget * m, 2 * m + 1), silent=True).values[0]

    first = xs[:1].numpy().astype(np.float64)
    for name in ("shap-kernel", "shap-permutation"):  # warm-up, untimed: shap compiles code on first use (seconds)
        explain_one(name, first, budgets[0], 0)
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
                    est[b] = explain_one(name, xb, budget, seed)
                    per.append(time.perf_counter() - t0)
                e = torch.from_numpy(est)
                errs.append(metrics.absolute_error(e, exact))
                ranks.append(metrics.ranking_accuracy(e, exact))
                times.append(statistics.mean(per))
            rows.append(_row(name, budget, errs, ranks, times, budget * m))
            log(f"{name} budget {budget}: error {rows[-1]['abs_error']:.4f}, {rows[-1]['ms_per_instance']:.1f} ms")
    return rows


TREE_METHODS = ("permutation", "antithetic", "kernel", "shear-fd")  # shear-fd: SHEAR, finite-difference interactions


TREE_MODEL = dict(n_estimators=100, max_depth=3, subsample=0.7)


def tree_model(data, target: int, seed: int = 0):
    """scikit-learn GradientBoostingClassifier (:data:`TREE_MODEL`: stochastic gradient boosting;
    without subsampling, wine's separable classes give a two-valued model with zero attributions)
    for "class ``target`` or not" (one-vs-rest, so shap's TreeExplainer takes it; a binary set's
    own task when it has two classes). Returns (classifier, test accuracy in percent of that task)."""
    from sklearn.ensemble import GradientBoostingClassifier

    y_train = (data.y_train.numpy() == target).astype(np.int64)
    y_test = (data.y_test.numpy() == target).astype(np.int64)
    clf = GradientBoostingClassifier(random_state=seed, **TREE_MODEL)
    clf.fit(data.x_train.double().numpy(), y_train)
    return clf, 100.0 * float((clf.predict(data.x_test.double().numpy()) == y_test).mean())


def _shap_tree_row(clf, xs, reference, exact, log, output: str = "raw") -> dict | None:
    """shap's exact interventional TreeExplainer (log-odds, ``output="raw"``) against the same
    reference: it walks the trees (no model evaluations); timed over the whole batch, per instance."""
    try:
        import shap
    except ImportError:
        return None
    x = xs.double().numpy()
    ex = shap.TreeExplainer(clf, data=reference.double().numpy()[None], feature_perturbation="interventional",
                            model_output=output)
    ex.shap_values(x[:1])  # warm-up (its first call builds the tree arrays)
    t0 = time.perf_counter()
    sv = np.asarray(ex.shap_values(x))
    ms = 1e3 * (time.perf_counter() - t0) / x.shape[0]
    sv = sv[..., 1] if sv.ndim == 3 else sv  # some versions return both classes
    est = torch.from_numpy(sv)
    row = _row("shap-tree", 0, [metrics.absolute_error(est, exact)], [metrics.ranking_accuracy(est, exact)],
               [ms / 1e3], 0)
    per_row = (est - exact.double()).abs().amax(-1)
    row["max_abs_diff_vs_exact"] = float(per_row.max())
    # TreeExplainer keeps split thresholds in float32: a row whose value sits within float32 rounding
    # of a threshold takes the other branch there than scikit-learn does, so its values differ
    row["rows_over_1e-6_from_exact"] = int((per_row > 1e-6).sum())
    log(f"shap-tree (exact TreeSHAP): error {row['abs_error']:.2e}, {ms:.2f} ms")
    return row


def tree_section(tab, target: int, xs, reference, groups, budgets, seeds, with_shap: bool, log, progress: bool) -> dict:
    """The boosted-trees side by side: every method explains the same black box,
    ``clf.predict_proba(rows)[:, 1]`` on numpy arrays, against the same reference row."""
    clf, acc = tree_model(tab, target)
    f = lambda a: clf.decision_function(np.asarray(a, dtype=np.float64))  # noqa: E731 - log-odds [N]
    shapley(f, xs[:1], reference, "exact", groups=groups)  # warm-up, untimed
    t0 = time.perf_counter()
    ex = shapley(f, xs, reference, "exact", groups=groups, return_details=True)
    exact_ms = 1e3 * (time.perf_counter() - t0) / xs.shape[0]
    exact = ex.values
    log(f"boosted trees (GradientBoostingClassifier, log-odds of {tab.class_names[target]} one-vs-rest), test accuracy "
        f"{acc:.1f}%; exact (2^{len(tab.players)} coalitions): {exact_ms:.1f} ms/instance")
    rows = [_row("exact", 0, [0.0], [1.0], [exact_ms / 1e3], statistics.mean(ex.evaluations))]
    rows += _sweep(f, xs, reference, exact, TREE_METHODS, budgets, seeds, groups, "explain trees", progress,
                   lambda m: ("shear", {"interactions": "finite-difference"}) if m == "shear-fd"
                   else (m, {"interactions": "hessian"}))
    if with_shap and groups is not None and any(len(g) > 1 for g in groups):
        log("note: shap's explainers have no one-hot groups: no shap rows for the trees either")
    elif with_shap:
        rows += _shap_rows(f, xs, reference, budgets, seeds, exact, log)
        tree = _shap_tree_row(clf, xs, reference, exact, log)
        if tree is not None:
            rows.append(tree)
            prob = lambda a: clf.predict_proba(np.asarray(a, dtype=np.float64))[:, 1]  # noqa: E731
            prob_exact = shapley(prob, xs, reference, "exact")
            prob_tree = _shap_tree_row(clf, xs, reference, prob_exact, lambda *a: None, output="probability")
    out = {"model": "GradientBoostingClassifier(" + ", ".join(f"{k}={v}" for k, v in TREE_MODEL.items()) + ")",
           "model_accuracy": acc,
           "explained": f"log-odds of class {tab.class_names[target]} one-vs-rest (decision_function)",
           "exact_ms_per_instance": exact_ms, "mean_abs_phi": float(exact.abs().sum(-1).mean()), "rows": rows}
    out["claims"] = tree_claims(rows)
    if with_shap and any(r["method"] == "shap-tree" for r in rows):
        # TreeExplainer(model_output="probability") against the exact Shapley values of the probability
        out["claims"]["shap_tree_probability_max_abs_diff_vs_exact"] = prob_tree["max_abs_diff_vs_exact"]
        out["claims"]["mean_abs_phi_probability"] = float(prob_exact.abs().sum(-1).mean())
    return out


def tree_claims(rows: list[dict]) -> dict:
    """Where each tool wins on the trees: TreeExplainer's agreement with lowbit's exact values and
    its time against them; the model-agnostic estimators' time against shap's at the same budget."""
    by = {(r["method"], r["budget"]): r for r in rows}
    out = {}
    tree, exact = by.get(("shap-tree", 0)), by.get(("exact", 0))
    if tree and exact:
        out["shap_tree_max_abs_diff_vs_lowbit_exact"] = tree["max_abs_diff_vs_exact"]
        out["shap_tree_rows_over_1e-6_from_lowbit_exact"] = tree["rows_over_1e-6_from_exact"]
        out["shap_tree_speedup_vs_lowbit_exact"] = exact["ms_per_instance"] / tree["ms_per_instance"]
    for ours, theirs in (("kernel", "shap-kernel"), ("antithetic", "shap-permutation")):
        common = sorted(b for (m, b) in by if m == ours and (theirs, b) in by)
        if common:
            b = 16 if 16 in common else common[0]
            out[f"{theirs}_vs_{ours}_time_ratio_at_{b}"] = by[(theirs, b)]["ms_per_instance"] / by[(ours, b)]["ms_per_instance"]
            out[f"{theirs}_vs_{ours}_error_ratio_at_{b}"] = by[(theirs, b)]["abs_error"] / max(by[(ours, b)]["abs_error"], 1e-300)
    return out



def _sweep(f, xs, reference, exact, methods, budgets, seeds, groups, desc: str, progress: bool, options) -> list[dict]:
    """One row per (method, budget): error, ranking accuracy, time and evaluations, over ``seeds``.
    ``options(method)`` -> (estimator name, extra ``shapley`` keywords) for the row's label."""
    rows = []
    bar = tqdm(total=len(methods) * len(budgets) * len(seeds), desc=desc, disable=not progress, leave=False)
    for method in methods:
        name, extra = options(method)
        for budget in budgets:
            errs, ranks, times, evals = [], [], [], []
            for seed in seeds:
                r = shapley(f, xs, reference, name, budget=budget, seed=seed, groups=groups, return_details=True,
                            **extra)
                errs.append(metrics.absolute_error(r.values, exact))
                ranks.append(metrics.ranking_accuracy(r.values, exact))
                times.append(statistics.mean(r.seconds))
                evals.append(statistics.mean(r.evaluations))
                bar.update(1)
            rows.append(_row(method, budget, errs, ranks, times, statistics.mean(evals)))
    bar.close()
    return rows


def _row(method, budget, errs, ranks, times, evals) -> dict:
    return {"method": method, "budget": budget, "abs_error": statistics.mean(errs),
            "abs_error_sd": statistics.pstdev(errs), "ranking_accuracy": statistics.mean(ranks),
            "ms_per_instance": 1e3 * statistics.mean(times), "evaluations_per_instance": evals}


def run(budgets=BUDGETS, methods=METHODS, seeds=(0, 1, 2), instances: int | None = None, data: str = "wine",
        target: int | None = None, with_shap: bool = True, quick: bool = False, out: str | Path = "results/explain",
        progress: bool = True, log=print, trees: bool = True) -> dict:
    """Writes explain.json / explain.md / explain.png under ``out``. ``target``: the class whose
    probability is explained (default 0, or 1 — the positive class — for binary data sets).
    ``trees``: add the boosted-trees section (``results["trees"]``, see :func:`tree_section`)."""
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
    for method in ("exact", "kernel", "shear"):  # warm-up, untimed: first calls pay torch's lazy initialisation
        shapley(f, xs[:1], reference, method, groups=groups)
    t0 = time.perf_counter()
    exact = shapley(f, xs, reference, "exact", groups=groups)
    exact_ms = 1e3 * (time.perf_counter() - t0) / xs.shape[0]
    m = len(tab.players)
    log(f"{data}: {tab.x_train.shape[0]} train rows, {m} players ({xs.shape[1]} columns), MLP test accuracy {acc:.1f}%; "
        f"explaining P(class {tab.class_names[target]}) for {xs.shape[0]} instances; exact: {exact_ms:.1f} ms/instance")
    rows = _sweep(f, xs, reference, exact, methods, budgets, seeds, groups, "explain", progress,
                  lambda m: ("shear", {"shear_outside": "uniform"}) if m == "shear-uniform"
                  else (m, {"shear_outside": "shapley"}))
    if with_shap and groups is not None and any(len(g) > 1 for g in groups):
        log("note: shap's explainers have no one-hot groups: no shap rows for this data set")
    elif with_shap:
        rows += _shap_rows(_torch_to_numpy(f), xs, reference, budgets, seeds, exact, log)
    results = {"data": data, "features": m, "instances": int(xs.shape[0]), "seeds": list(seeds), "target": target,
               "model_accuracy": acc, "exact_ms_per_instance": exact_ms,
               "players": tab.players, "faithfulness_exact": metrics.faithfulness(f, xs, reference, exact, groups=groups),
               "rows": rows}
    results["claims"] = claims(rows)
    if trees:
        results["trees"] = tree_section(tab, target, xs, reference, groups, budgets, seeds, with_shap, log, progress)
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


def _rows_table(rows: list[dict]) -> str:
    cells = [[r["method"], r["budget"] or "all", round(r["abs_error"], 6 if r["abs_error"] < 1e-3 else 4),
              round(r["abs_error_sd"], 4), round(r["ranking_accuracy"], 3), round(r["ms_per_instance"], 2),
              round(r["evaluations_per_instance"])] for r in rows]
    return markdown_table(["method", "evals / feature", "abs error Σ|φ̂-φ|", "sd over seeds", "ranking acc",
                           "ms / instance", "evals / instance"], cells)


def _claims_lines(c: dict) -> str:
    return "\n".join(f"- {k}: {v if not isinstance(v, float) else round(v, 3)}" for k, v in c.items())


def table_markdown(results: dict) -> str:
    text = _rows_table(results["rows"])
    c = results.get("claims", {})
    text += ("\n\n" + _claims_lines(c) if c else "")
    t = results.get("trees")
    if t:
        text += (f"\n\nBoosted trees ({t['model']}, test accuracy {t['model_accuracy']:.1f}%), explaining {t['explained']} "
                 f"as a black box (mean Σ|φ| = {t['mean_abs_phi']:.3g}; shap-tree reads the trees: 0 model evaluations):\n\n")
        text += _rows_table(t["rows"])
        text += ("\n\n" + _claims_lines(t["claims"]) if t.get("claims") else "")
    return text


def _curves(ax_budget, ax_time, rows: list[dict], floor: float, colors: dict) -> None:
    for method in dict.fromkeys(r["method"] for r in rows):
        mrows = sorted((r for r in rows if r["method"] == method), key=lambda r: r["budget"])
        style, c = ("--" if method.startswith("shap") else "-"), colors[method]
        if mrows[0]["budget"] == 0:  # exact methods: one point in the time panel (error 0 drawn at the floor)
            r = mrows[0]
            ax_time.plot([r["ms_per_instance"]], [max(r["abs_error"], floor)], "*", color=c, markersize=12,
                         label=f"{method} (error {r['abs_error']:.2g})")
            continue
        # actual evaluations (SHEAR's finite differences included), so methods compare at equal cost
        ax_budget.plot([r["evaluations_per_instance"] for r in mrows], [r["abs_error"] for r in mrows], style,
                       marker="o", color=c, label=method)
        ax_time.plot([r["ms_per_instance"] for r in mrows], [r["abs_error"] for r in mrows], style, marker="o", color=c,
                     label=method)


def plot(results: dict, path: Path) -> None:
    """Error against budget and against wall time per method; a second row for the boosted trees."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [("softplus MLP", results["rows"])]
    if results.get("trees"):
        sections.append(("boosted trees (black box)", results["trees"]["rows"]))
    fig, axes = plt.subplots(len(sections), 2, figsize=(11, 4 * len(sections)), squeeze=False)
    methods = dict.fromkeys(r["method"] for _, rows in sections for r in rows)
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}  # one colour per method in every panel
    for (label, rows), (ax_b, ax_t) in zip(sections, axes):
        errors = [r["abs_error"] for r in rows if r["abs_error"] > 0]
        _curves(ax_b, ax_t, rows, min(errors) / 10 if errors else 1e-6, colors)
        ax_b.set_xlabel("model evaluations (coalitions) per instance")
        ax_t.set_xlabel("wall time per instance (ms)")
        for ax in (ax_b, ax_t):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylabel("absolute error Σ|φ̂ - φ| vs exact")
            ax.set_title(label, fontsize=10)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle(f"Shapley estimators on {results['data']} ({results['features']} players, {results['instances']} instances)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
