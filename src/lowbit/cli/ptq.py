"""``lowbit ptq``: post-training quantization of a trained float model (no retraining)."""
from __future__ import annotations

import argparse

from lowbit.argtypes import UsageError, comma_choices, existing_file, int_list, positive_float, positive_int
from lowbit.cli._common import (IMAGE_DATA, add_command, add_threads, fit_state_dict, image_size, image_source,
                                load_image_data, load_state_dict_arg, set_threads, usage_errors)

PTQ_METHODS = ("rtn", "adaround", "aquant")
MAX_BITS = 16


def _bits(text: str) -> int:
    v = positive_int(text)
    if v > MAX_BITS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_BITS} bits, got {v}")
    return v


_methods = comma_choices(*PTQ_METHODS)


def register(sub) -> argparse.ArgumentParser:
    pq = add_command(sub, "ptq", "post-training quantization of a trained float model (no retraining)")
    pq.add_argument("--model", default="resnet", choices=["resnet", "mlp"], help="reference model")
    pq.add_argument("--data", default="fashion-mnist", choices=IMAGE_DATA, help="images")
    pq.add_argument("--w-bits", type=_bits, default=4, help=f"weight bits, 1 to {MAX_BITS}")
    pq.add_argument("--a-bits", type=_bits, default=4, help=f"activation (layer input) bits, 1 to {MAX_BITS}")
    pq.add_argument("--method", type=_methods, default="rtn,adaround",
                    help=f"any of {', '.join(PTQ_METHODS)}, comma separated")
    pq.add_argument("--average-bits", type=positive_float, default=None,
                    help="mixed precision: per-layer weight widths (--widths) under this average instead of --w-bits")
    pq.add_argument("--sensitivity", default="kl", choices=["kl", "hessian", "loss"],
                    help="how --average-bits measures each layer (output KL; hessian underestimates 1-bit damage)")
    pq.add_argument("--widths", type=int_list, default=None,
                    help="widths --average-bits chooses from (default 1,2,3,4,8; e.g. 2,3,4,8 for no binary layers)")
    pq.add_argument("--calibration", default="mse", choices=["minmax", "percentile", "mse"],
                    help="how activation ranges are set")
    pq.add_argument("--calib", type=positive_int, default=512, help="calibration samples")
    pq.add_argument("--init", type=existing_file, default=None,
                    help="float state_dict (default: the float model is trained first)")
    pq.add_argument("--epochs", type=positive_int, default=1, help="float training epochs when there is no --init")
    pq.add_argument("--limit", type=positive_int, default=None, help="use only the first N training images")
    pq.add_argument("--iters", type=positive_int, default=None,
                    help="AdaRound/AQuant optimisation steps per block (default: the library's, 100)")
    pq.add_argument("--no-progress", action="store_true", help="no per-block progress bar")
    pq.add_argument("--export", default=None,
                    help="write the last method's integer inference model (quant.export) state_dict here")
    pq.add_argument("--seed", type=int, default=0, help="seed of the model, data order and calibration pick")
    add_threads(pq)
    pq.set_defaults(func=run)
    return pq


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from lowbit import quant
    from lowbit.models import reference_model
    from lowbit.table import markdown_table
    from lowbit.loop import evaluate_classifier

    methods = _methods(args.method) if isinstance(args.method, str) else args.method  # the default is a string
    widths = args.widths or quant.ALLOCATION_WIDTHS
    if args.widths and args.average_bits is None:
        raise UsageError("--widths only applies with --average-bits")
    if args.average_bits is not None and not min(widths) <= args.average_bits <= max(widths):
        raise UsageError(f"--average-bits {args.average_bits:g} is outside the widths it chooses from "
                         f"({min(widths)} to {max(widths)})")
    set_threads(args.threads)
    with usage_errors():
        init = load_state_dict_arg(args.init, "--init") if args.init else None
        data_name = image_source(args.data)
        model = reference_model(args.model, image_size=image_size(data_name), seed=args.seed)
        if init is not None:
            fit_state_dict(model, init, "--init", args.init)
        train, test = load_image_data(data_name, args.limit)
    if init is not None:
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
        print(f"measuring each layer's {args.sensitivity} sensitivity at widths {','.join(map(str, widths))} "
              f"({len(sizes)} layers) ...", flush=True)
        sens = quant.sensitivity(folded, (calib, train[1][pick]), bits=widths, how=args.sensitivity,
                                 layers=list(sizes))
        w_bits = quant.allocate_bits(sens, sizes, average_bits=args.average_bits)
        w_label = f"mixed {quant.average_bits(w_bits, sizes):.2f}"
        print(f"{args.sensitivity} allocation at {args.average_bits} average bits: {w_bits}")
    for method in methods:
        t0 = time.perf_counter()
        extra = {"adaround": {"iters": args.iters}} if args.iters and method != "rtn" else {}
        q = quant.ptq(model, calib, w_bits=w_bits, a_bits=args.a_bits, method=method, calibration=args.calibration,
                      progress=not args.no_progress, **extra)
        seconds = time.perf_counter() - t0
        rows.append([method, w_label, args.a_bits, round(evaluate_classifier(q, *test), 2), round(seconds, 1)])
        print(f"{method}: done in {seconds:.1f} s", flush=True)
    print(markdown_table(["method", "w bits", "a bits", "test accuracy %", "calibration s"], rows))
    if args.export:
        with usage_errors("--export: "):
            packed = quant.export(q)
        torch.save(packed.state_dict(), args.export)
        print(f"exported {methods[-1]} to {args.export}: test accuracy {evaluate_classifier(packed, *test):.2f}%")
        print(quant.summary(packed))
    return 0
