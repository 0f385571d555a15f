"""``lowbit train``: a reference model trained with compressed activations, then the memory report."""
from __future__ import annotations

import argparse

from lowbit.argtypes import UsageError, positive_float, positive_int
from lowbit.cli._common import (IMAGE_DATA, add_command, add_threads, image_size, image_source, load_image_data,
                                minutes, set_threads, usage_errors)

METHODS = ["none", "checkpoint", "uniform", "gact", "division", "comet", "mesa"]
FIXED_WIDTHS = (1, 2, 4, 8)  # what "uniform" and "division" store
QUICK_STEPS = 100
GPT_STEPS = 300
GPT_BLOCK = 64  # characters per training window (train_lm's default)


def register(sub) -> argparse.ArgumentParser:
    t = add_command(sub, "train", "train a reference model with compressed activations",
                    "Train a reference model with every tensor autograd saves compressed, then print the "
                    "accuracy, the activation memory (raw vs stored) and the step time. It says how many "
                    "steps it will run and about how long before it starts; --quick is a one-minute first look.")
    t.add_argument("--model", default="resnet", choices=["resnet", "vit", "gpt", "mlp"],
                   help="reference model (gpt: character GPT on the fortunes text)")
    t.add_argument("--data", default="fashion-mnist", choices=IMAGE_DATA,
                   help="images (digits: scikit-learn's bundled 8x8 set; used when Fashion-MNIST is not installed)")
    t.add_argument("--method", default="gact", choices=METHODS, help="how saved activations are stored")
    t.add_argument("--bits", type=positive_float, default=2,
                   help="uniform, division: 1, 2, 4 or 8 bits; gact: average bits, 1 to 8; others ignore it")
    t.add_argument("--epochs", type=positive_int, default=1, help="passes over the training images")
    t.add_argument("--steps", type=positive_int, default=None,
                   help=f"stop after this many optimizer steps (default: every step of --epochs; gpt: {GPT_STEPS})")
    t.add_argument("--quick", action="store_true",
                   help=f"a first look: at most {QUICK_STEPS} steps (about a minute on 2 cores)")
    t.add_argument("--batch-size", type=positive_int, default=128, help="examples per step")
    t.add_argument("--lr", type=positive_float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    t.add_argument("--limit", type=positive_int, default=None, help="use only the first N training images")
    t.add_argument("--seed", type=int, default=0, help="seed of the model, data order and rounding")
    add_threads(t)
    t.add_argument("-v", "--verbose", action="store_true", help="also print the per-module memory report")
    t.set_defaults(func=run)
    return t


def run(args: argparse.Namespace) -> int:
    if args.method in ("uniform", "division") and args.bits not in FIXED_WIDTHS:
        raise UsageError(f"--bits {args.bits:g} is not supported by {args.method}: choose 1, 2, 4 or 8")
    import copy

    import torch

    from lowbit.models import reference_model
    from lowbit.train import fortunes_corpus, make_compressor, total_steps, train_classifier, train_lm

    set_threads(args.threads)
    cap = min(args.steps or QUICK_STEPS, QUICK_STEPS) if args.quick else args.steps
    bits = {"uniform": int(args.bits), "division": int(args.bits), "gact": args.bits}.get(args.method)
    with usage_errors():  # everything the user chose is checked here, before the first step
        if args.model == "gpt":
            corpus = fortunes_corpus()
            data_name = "fortunes"
            model = reference_model("gpt", vocab_size=corpus.vocab_size, seed=args.seed)
        else:
            data_name = image_source(args.data)
            model = reference_model(args.model, image_size=image_size(data_name), seed=args.seed)
        timing_copy = copy.deepcopy(model)  # before make_compressor: "checkpoint" rewraps the model in place
        act = make_compressor(args.method, bits, model, args.seed)
        if args.model != "gpt":
            train, test = load_image_data(data_name, args.limit)
    print(f"lowbit train: {args.model} on {data_name}, method={act.policy.describe()}, seed={args.seed}")
    if args.model == "gpt":
        steps = cap or GPT_STEPS
        xb, yb = corpus.batch(args.batch_size, GPT_BLOCK, torch.Generator().manual_seed(args.seed))
        what = f"{steps} steps (batch {args.batch_size} windows of {GPT_BLOCK} characters)"
    else:
        steps = total_steps(len(train[0]), args.epochs, args.batch_size, cap)
        xb, yb = train[0][: args.batch_size], train[1][: args.batch_size]
        what = (f"{steps} steps ({args.epochs} epoch(s) of {len(train[0])} images, batch {args.batch_size}"
                + (", capped" if cap is not None and steps == cap else "") + ")")
    seconds, detail = expected_seconds(timing_copy, args.method, bits, args.seed, xb, yb, steps)
    del timing_copy
    hint = "" if args.quick or steps <= QUICK_STEPS else f"; --quick stops after {QUICK_STEPS}"
    print(f"{what}: expected about {minutes(seconds)} on this machine ({detail}){hint}", flush=True)
    if args.model == "gpt":
        r = train_lm(model, corpus, act, steps=steps, batch_size=args.batch_size, block=GPT_BLOCK, lr=args.lr,
                     seed=args.seed)
    else:
        r = train_classifier(model, train, test, act, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, max_steps=cap)
    last = last_batch(len(train[0]), args.batch_size, steps) if args.model != "gpt" else args.batch_size
    print(results_table(r, act, last))
    note = small_tensor_note(r.report, act.min_numel, args.method, data_name, last, args.batch_size)
    if note:
        print(note)
    if args.verbose:
        from lowbit.act.report import MemoryReport, ReportRow

        rep = r.report
        print(MemoryReport(method=rep["method"], raw_bytes=rep["raw_bytes"], stored_bytes=rep["stored_bytes"],
                           peak_raw_bytes=rep["peak_raw_bytes"], peak_stored_bytes=rep["peak_stored_bytes"],
                           rows=[ReportRow(**row) for row in rep["rows"]]))
    return 0


def _loss(out, y):
    import torch.nn.functional as F

    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def expected_seconds(model, method: str, bits, seed: int, xb, yb, steps: int, timed: int = 4) -> tuple[float, str]:
    """(seconds, how it was found) for ``steps`` training steps: ``timed`` steps on ``model`` (a
    throw-away copy) with the same compressor, the first as warm-up, the global RNG untouched.
    Adaptive methods (gact, comet) add their sensitivity estimates: every ``interval`` steps one
    backward pass per probed tensor and draw, counted at half a step each (no forward, no update)."""
    import statistics
    import time

    import torch

    from lowbit.train import make_compressor

    with torch.random.fork_rng(devices=[]):
        act = make_compressor(method, bits, model, seed)
        times, floats = [], 0
        for _ in range(timed):
            t0 = time.perf_counter()
            with act:
                loss = _loss(model(xb), yb)
            loss.backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            floats = sum(row.count for row in act.report().rows if row.kind == "float")
            act.step()
    step_s = statistics.median(times[1:])
    seconds, detail = steps * step_s, f"{step_s:.2f} s per step over {timed - 1} timed steps"
    policy = act.policy
    interval = getattr(policy, "interval", None)
    if getattr(policy, "adaptive", False) and interval and floats:
        estimates = -(-steps // interval)  # due at step 0, interval, 2 interval, ...
        draws = getattr(policy, "probe_draws", 1)
        groups = getattr(policy, "probe_groups", None)  # tensors probed together: one backward per group
        per_estimate = min(groups, floats) if groups else floats
        later = min(getattr(policy, "max_probes", per_estimate), per_estimate)
        probes = draws * ((1 + per_estimate) + (estimates - 1) * (1 + later))
        seconds += probes * step_s / 2
        detail += f", plus {estimates} sensitivity estimate(s) of {method}"
    return seconds, detail


def last_batch(n: int, batch_size: int, steps: int) -> int:
    """Examples in the last of ``steps`` steps over ``n`` examples (the last batch of an epoch is partial)."""
    per_epoch = -(-n // batch_size)
    i = (steps - 1) % per_epoch
    return min(batch_size, n - i * batch_size)


def results_table(r, act, last: int) -> str:
    """The end-of-run table: metric, the last step's activation bytes, peaks, times."""
    import resource

    from lowbit.table import markdown_table

    rep = r.report
    if not rep:
        raise RuntimeError("training ran no step: nothing to report")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    rows = [
        [r.metric_name, round(r.metric, 3)],
        [f"activation memory raw (MiB, last step: batch of {last})", round(rep["raw_bytes"] / 2**20, 2)],
        [f"activation memory stored (MiB, last step: batch of {last})", round(rep["stored_bytes"] / 2**20, 2)],
        ["compression ratio", round(rep["ratio"], 2)],
    ]
    small = kept_small_share(rep)
    if act.method not in ("none",):
        rows.append([f"share of raw bytes in tensors under {act.min_numel} elements (kept raw)", f"{small:.0%}"])
    rows += [
        ["peak saved-tensor memory (MiB)", round(rep["peak_stored_bytes"] / 2**20, 2)],
        ["peak process RSS (MiB)", round(peak_rss, 1)],
        ["median step time (ms)", round(r.median_step_time * 1e3, 1)],
        ["sensitivity estimation time (s, total; gact, comet)", round(sum(r.estimate_times), 2)],
    ]
    return markdown_table(["quantity", "value"], rows)


def kept_small_share(rep: dict) -> float:
    """Fraction of the step's raw saved bytes the compressor kept as they are because the tensor
    is below ``min_numel`` (the report's "raw" rows; with method "none" every row is raw)."""
    small = sum(row["raw_bytes"] for row in rep.get("rows", []) if row["kind"] == "raw")
    return small / rep["raw_bytes"] if rep.get("raw_bytes") else 0.0


def small_tensor_note(rep: dict, min_numel: int, method: str, data_name: str, last: int, batch_size: int) -> str | None:
    """Why the compression ratio is low, when it is because most saved bytes sit in tensors too
    small to compress (8x8 digits, small or partial batches)."""
    if method in ("none", "checkpoint"):
        return None
    share = kept_small_share(rep)
    if share < 0.25:
        return None
    rows = rep.get("rows", [])
    big_raw = sum(row["raw_bytes"] for row in rows if row["kind"] != "raw")
    big_stored = sum(row["stored_bytes"] for row in rows if row["kind"] != "raw")
    inner = f"; the tensors it does compress shrink {big_raw / big_stored:.1f}x" if big_stored else ""
    why = ("8x8 digits make small activations" if data_name == "digits"
           else "small inputs or a small --batch-size make small activations")
    if last < batch_size:
        why += f", and the step reported is the epoch's last, a partial batch of {last}"
    return (f"note: the compression ratio is only {rep['ratio']:.1f}x because {share:.0%} of the saved bytes are in "
            f"tensors under {min_numel} elements, which lowbit keeps uncompressed (too small to be worth it, and "
            f"often the most sensitive){inner}. {why[0].upper() + why[1:]}; Fashion-MNIST (28x28) or a larger "
            "--batch-size compresses far more.")
