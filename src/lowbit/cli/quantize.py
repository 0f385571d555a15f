"""``lowbit quantize``: train a quantized, binary or ternary reference model with a recipe."""
from __future__ import annotations

import argparse

from lowbit.argtypes import UsageError, existing_file, positive_float, positive_int
from lowbit.cli._common import (IMAGE_DATA, add_command, add_threads, fit_state_dict, image_size, image_source,
                                load_image_data, load_state_dict_arg, set_threads, usage_errors)

# shown in --help without importing the library (a test checks each is a real recipe);
# an unknown --recipe lists them all
RECIPE_EXAMPLES = ("xnor", "bnn", "dirnet", "sbnn", "ternary", "int4")


def register(sub) -> argparse.ArgumentParser:
    q = add_command(sub, "quantize", "train a quantized / binary / ternary model with a recipe")
    q.add_argument("--recipe", default="xnor",
                   help=f"float, or a lowbit.quant recipe ({', '.join(RECIPE_EXAMPLES)}, ...; an unknown name lists all)")
    q.add_argument("--model", default="resnet", choices=["resnet", "mlp"], help="reference model")
    q.add_argument("--data", default="fashion-mnist", choices=IMAGE_DATA, help="images")
    q.add_argument("--epochs", type=positive_int, default=1, help="passes over the training images")
    q.add_argument("--batch-size", type=positive_int, default=128, help="examples per step")
    q.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate")
    q.add_argument("--limit", type=positive_int, default=None, help="use only the first N training images")
    q.add_argument("--init", type=existing_file, default=None,
                   help="float state_dict to fine-tune from (also the distillation teacher of recipes that use one)")
    q.add_argument("--teacher", type=existing_file, default=None, help="float state_dict used as the distillation teacher")
    q.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="recipe option, e.g. --option sparsity=0.9 (repeatable)")
    q.add_argument("--save", default=None, help="write the trained state_dict here")
    q.add_argument("--export", default=None, help="write the bit-packed inference model's state_dict here")
    q.add_argument("--onnx", default=None, help="write an ONNX QDQ graph of the trained model here (needs lowbit[onnx])")
    q.add_argument("--seed", type=int, default=0, help="seed of the model and data order")
    add_threads(q)
    q.add_argument("-v", "--verbose", action="store_true", help="print the per-layer summary")
    q.set_defaults(func=run)
    return q


def parse_options(pairs: list[str] | None) -> dict:
    """``["sparsity=0.9", "method=hq"]`` -> {"sparsity": 0.9, "method": "hq"} (values as Python literals
    where they parse, else strings)."""
    import ast

    out = {}
    for kv in pairs or []:
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise UsageError(f"--option takes KEY=VALUE, got {kv!r}")
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def run(args: argparse.Namespace) -> int:
    overrides = parse_options(args.option)
    import torch

    from lowbit import quant
    from lowbit.models import reference_model
    from lowbit.table import markdown_table
    from lowbit.loop import evaluate_classifier

    if args.recipe != "float" and args.recipe not in quant.RECIPES:
        raise UsageError(f"unknown recipe {args.recipe!r}: choose one of float, {', '.join(sorted(quant.RECIPES))}")
    set_threads(args.threads)
    distils = args.recipe != "float" and quant.get_recipe(args.recipe).distill > 0
    with usage_errors():  # checkpoints, recipe options and export are checked before training
        init = load_state_dict_arg(args.init, "--init") if args.init else None
        teacher_path = args.teacher or (args.init if distils else None)
        teacher_state = load_state_dict_arg(teacher_path, "--teacher" if args.teacher else "--init") if teacher_path else None
        data_name = image_source(args.data)
        size = image_size(data_name)
        model = reference_model(args.model, image_size=size, seed=args.seed)
        if init is not None:
            fit_state_dict(model, init, "--init", args.init)
        teacher = None
        if teacher_state is not None:
            teacher = reference_model(args.model, image_size=size, seed=args.seed)
            fit_state_dict(teacher, teacher_state, "--teacher" if args.teacher else "--init", teacher_path)
        try:
            qmodel = model if args.recipe == "float" else quant.quantize(model, args.recipe, **overrides)
        except TypeError as e:  # an option the recipe does not take
            raise UsageError(f"--option: {e}") from None
        if args.export:
            try:
                quant.export(qmodel)  # refuse before training a model that cannot be packed
            except (ValueError, NotImplementedError, TypeError) as e:
                raise UsageError(f"--export: {e}") from None
        if args.onnx:
            try:
                import onnx  # noqa: F401
                from lowbit.quant.onnx_export import onnx_ready

                onnx_ready(qmodel)  # refuse before training a model the QDQ export cannot write
            except ImportError:
                raise UsageError("--onnx needs onnx and onnxruntime: pip install 'lowbit[onnx]'") from None
            except (ValueError, NotImplementedError, TypeError) as e:
                raise UsageError(f"--onnx: {e}") from None
        train, test = load_image_data(data_name, args.limit)
    if init is not None:
        print(f"fine-tuning from the float checkpoint {args.init}")
    if distils and teacher is None:
        print("note: no float teacher (--teacher or --init): training without representation distillation")
    print(f"lowbit quantize: {args.model} on {data_name}, recipe={args.recipe} {overrides or ''}, seed={args.seed}")
    r = quant.train_quantized(qmodel, train, test, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, teacher=teacher, desc=args.recipe)
    size_report = quant.model_size(qmodel)
    print(markdown_table(["quantity", "value"], [
        ["test accuracy (%)", round(r.metric, 2)],
        ["packed size (KiB)", round(size_report.packed_bytes / 1024, 1)],
        ["float32 size (KiB)", round(size_report.float32_bytes / 1024, 1)],
        ["compression", f"{size_report.compression:.1f}x"],
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
    if args.onnx:
        with usage_errors():
            path = quant.export_onnx(qmodel.eval(), test[0][:1], args.onnx)
        print(f"wrote the ONNX QDQ graph to {path} (onnxruntime.InferenceSession(path) runs it)")
    return 0
