"""`lowbit bench act`: none / uniform 8-4-2 / gact (``--all``: also torch.utils.checkpoint,
DIVISION, COMET and Mesa) on the ResNet, ViT (Fashion-MNIST) and the character GPT (fortunes),
with the same seed, data order and schedule for every method.

Per (model, method): final test accuracy or validation loss and its difference to none, the
median step time of the training run, the step-time ratios to none and to hook-free autograd
measured in rotating steps (plain, none, method, ...: load drift on a shared machine hits all
alike), lowbit's byte accounting, the memory
held between forward and backward measured end to end (child-process RSS on CPU), and the
gradient quality on a fixed batch (cosine to the exact gradient, relative squared error,
averaged over several stochastic-rounding draws).
"""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.bench.common import (
    METHODS,
    make_compressor,
    fortunes_corpus,
    image_data,
    markdown_table,
    method_label,
    write_json,
    reference_model,
    save_results,
)
from lowbit.act import ActivationCompressor
from lowbit.act.policy import Policy
from lowbit.bench.memory import measure_held_memory
from lowbit.codecs import FrequencySplitCodec, Packed, RawCodec
from lowbit.loop import parameter_gradient
from lowbit.train import train_classifier, train_lm

DEFAULTS = {
    "resnet": {"epochs": 2, "batch_size": 128, "lr": 3e-3},
    "vit": {"epochs": 2, "batch_size": 128, "lr": 3e-3},
    "gpt": {"steps": 600, "batch_size": 32, "lr": 3e-3},
}
QUICK = {
    "resnet": {"epochs": 1, "batch_size": 64, "lr": 3e-3, "limit": 2000},
    "vit": {"epochs": 1, "batch_size": 64, "lr": 3e-3, "limit": 2000},
    "gpt": {"steps": 40, "batch_size": 16, "lr": 3e-3},
}


def gradient_quality(model_name: str, method: str, bits, batch, loss_fn, draws: int = 8, seed: int = 0) -> dict:
    """Compressed vs exact parameter gradient on one batch, from the same initial weights."""
    model = reference_model(model_name, **batch["model_kwargs"])
    model.eval()  # dropout off: the only difference is the compression
    x, y = batch["x"], batch["y"]

    def grad(act):
        return parameter_gradient(model, lambda: loss_fn(model(x), y), act)

    exact = grad(None)
    act = make_compressor(method, bits, model, seed)
    if act.policy.adaptive:
        act.estimate(lambda: loss_fn(model(x), y))
    cos, rel = [], []
    for _ in range(draws):
        g = grad(act)
        cos.append(float(F.cosine_similarity(g, exact, dim=0)))
        rel.append(float((g - exact).pow(2).sum() / exact.pow(2).sum()))
    return {"grad_cosine": statistics.mean(cos), "grad_rel_sq_error": statistics.mean(rel)}


def _timed_step(act, loss_closure, opt) -> float:
    """Seconds of one training step (forward under ``act`` when given, backward, update)."""
    t0 = time.perf_counter()
    with act if act is not None else contextlib.nullcontext():
        loss = loss_closure()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def paired_step_ratio(model_name: str, method: str, bits, batch, loss_fn, seed: int = 0, pairs: int = 20,
                      warmup: int = 3) -> dict:
    """Step time (forward, backward, optimizer step; seconds) of ``method`` against none and against
    hook-free autograd, in rotating steps (plain, none, method, plain, ...) on one batch with three
    identically initialised models, so that drift in the machine's load hits all alike. Each ratio
    is the median over the ``pairs`` rounds; adaptive methods estimate once first (their estimates
    are not part of a step, as in training). *none* is autograd with lowbit's hooks and accounting
    (raw storage): ``paired_time_ratio`` is the cost of compressing, ``paired_plain_ratio`` the
    whole cost of using lowbit."""
    x, y = batch["x"], batch["y"]
    runs = []
    for m, b in (("plain", None), ("none", None), (method, bits)):
        model = reference_model(model_name, **batch["model_kwargs"], seed=seed)
        act = None if m == "plain" else make_compressor(m, b, model, seed)
        if act is not None and act.policy.adaptive:
            act.estimate(lambda: loss_fn(model(x), y))
        runs.append((model, act, torch.optim.AdamW(model.parameters(), lr=1e-4)))

    def step(model, act, opt) -> float:
        return _timed_step(act, lambda: loss_fn(model(x), y), opt)

    for _ in range(warmup):
        for r in runs:
            step(*r)
    plain, none, comp = [], [], []
    for _ in range(pairs):
        for t, r in zip((plain, none, comp), runs):
            t.append(step(*r))
    return {"paired_time_ratio": statistics.median(c / n for n, c in zip(none, comp)),
            "paired_plain_ratio": statistics.median(c / p for p, c in zip(plain, comp)),
            "paired_step_time_s": statistics.median(comp), "paired_base_step_time_s": statistics.median(none),
            "paired_plain_step_time_s": statistics.median(plain)}


def _model_data(model_name: str, cfg: dict, log=print):
    """(fixed batch {"x", "y", "model_kwargs"}, loss function, data name, training data: the
    corpus for the GPT, (train, test) for the image models)."""
    if model_name == "gpt":
        corpus = fortunes_corpus()
        model_kwargs = {"vocab_size": corpus.vocab_size}
        bx, by = corpus.batch(cfg["batch_size"], 64, torch.Generator().manual_seed(99))
        return {"x": bx, "y": by, "model_kwargs": model_kwargs}, _lm_loss, "fortunes", corpus
    train, test, data_name = image_data(limit=cfg.get("limit"), test_limit=cfg.get("limit"), notice=log)
    model_kwargs = {"image_size": train[0].shape[-1]}
    batch = {"x": train[0][: cfg["batch_size"]], "y": train[1][: cfg["batch_size"]], "model_kwargs": model_kwargs}
    return batch, F.cross_entropy, data_name, (train, test)


def step_times(models=("resnet", "vit", "gpt"), methods=METHODS, quick: bool = False, out: str | Path = "results/act-time",
               pairs: int | None = None, seed: int = 0, log=print) -> dict:
    """`lowbit bench act --time-only`: only each method's step-time ratios to none and to hook-free
    autograd (:func:`paired_step_ratio`) at the benchmark's batch sizes, no training: a few seconds per row."""
    cfgs = QUICK if quick else DEFAULTS
    pairs = pairs or (4 if quick else 30)
    results: dict = {"quick": quick, "seed": seed, "threads": torch.get_num_threads(), "pairs": pairs, "rows": []}
    for model_name in models:
        batch, loss_fn, _, _ = _model_data(model_name, cfgs[model_name], log)
        for method, bits in methods:
            if method == "none":
                continue
            row = {"model": model_name, "label": method_label(method, bits), "batch_size": cfgs[model_name]["batch_size"],
                   **paired_step_ratio(model_name, method, bits, batch, loss_fn, seed, pairs=pairs)}
            results["rows"].append(row)
            log(f"{model_name}/{row['label']}: step x{row['paired_time_ratio']:.2f} of none, "
                f"x{row['paired_plain_ratio']:.2f} of plain autograd ({row['paired_step_time_s'] * 1e3:.1f} vs "
                f"{row['paired_base_step_time_s'] * 1e3:.1f} / {row['paired_plain_step_time_s'] * 1e3:.1f} ms)")
    save_results(results, out, "act-time", _time_table, _time_plot, log)
    return results


def _time_table(results: dict) -> str:
    rows = [[r["model"], r["label"], r["batch_size"], round(r["paired_plain_step_time_s"] * 1e3, 1),
             round(r["paired_base_step_time_s"] * 1e3, 1), round(r["paired_step_time_s"] * 1e3, 1),
             round(r["paired_time_ratio"], 2), round(r["paired_plain_ratio"], 2)] for r in results["rows"]]
    return markdown_table(["model", "method", "batch", "plain autograd ms", "none ms", "method ms", "× none",
                           "× plain autograd"], rows)


def _time_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows)), 3.2))
    ax.bar([i - 0.2 for i in range(len(rows))], [r["paired_time_ratio"] for r in rows], 0.4, label="vs none (hooks, raw)")
    ax.bar([i + 0.2 for i in range(len(rows))], [r["paired_plain_ratio"] for r in rows], 0.4, label="vs plain autograd")
    ax.legend(fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{r['model']}\n{r['label']}" for r in rows], fontsize=7)
    ax.set_ylabel("step time ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lm_loss(out, t):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))


def run(models=("resnet", "vit", "gpt"), methods=METHODS, quick: bool = False, out: str | Path = "results/act",
        memory: bool = True, seed: int = 0, progress: bool = True, log=print) -> dict:
    cfgs = QUICK if quick else DEFAULTS
    results: dict = {"quick": quick, "seed": seed, "threads": torch.get_num_threads(), "rows": []}
    for model_name in models:
        cfg = cfgs[model_name]
        batch, loss_fn, data_name, data = _model_data(model_name, cfg, log)
        model_kwargs = batch["model_kwargs"]
        base = None
        for method, bits in methods:
            label = method_label(method, bits)
            model = reference_model(model_name, **model_kwargs, seed=seed)
            act = make_compressor(method, bits, model, seed)
            desc = f"{model_name}/{label}"
            t0 = time.perf_counter()
            if model_name == "gpt":
                r = train_lm(model, data, act, steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, progress=progress, desc=desc)
            else:
                r = train_classifier(model, *data, act, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], seed=seed, progress=progress, desc=desc)
            wall = time.perf_counter() - t0
            row = {
                "model": model_name, "data": data_name, "method": method, "bits": bits, "label": label,
                "metric_name": r.metric_name, "metric": r.metric, "step_time_s": r.median_step_time,
                "estimate_time_s": sum(r.estimate_times), "wall_s": wall,
                "lowbit_raw_bytes": r.report.get("raw_bytes"), "lowbit_stored_bytes": r.report.get("stored_bytes"),
                "lowbit_ratio": r.report.get("ratio"), "loss_curve": r.train_losses[:: max(1, len(r.train_losses) // 100)],
            }
            if method == "comet":  # the adaptive bounds: per saved tensor, after each estimate
                row["comet_bounds"] = [{str(k): v for k, v in h.items()} for h in act.policy.history]
                row["comet_measured_error"] = act.policy.measured_error
            row.update(gradient_quality(model_name, method, bits, batch, loss_fn, draws=2 if quick else 8, seed=seed))
            if memory:
                mem = measure_held_memory(model_name, method, bits, cfg["batch_size"])
                row["held_bytes"] = mem["held_bytes"]
            if base is None:
                base = row
            row["metric_delta"] = row["metric"] - base["metric"]
            row["train_time_ratio"] = row["step_time_s"] / base["step_time_s"]  # separate runs, minutes apart
            if row is base:
                row["time_ratio"] = 1.0
            else:
                row.update(paired_step_ratio(model_name, method, bits, batch, loss_fn, seed, pairs=4 if quick else 20))
                row["time_ratio"] = row["paired_time_ratio"]
            if memory:
                row["memory_ratio"] = base["held_bytes"] / max(row["held_bytes"], 1)
            results["rows"].append(row)
            log(f"{desc}: {r.metric_name}={r.metric:.4g} (delta {row['metric_delta']:+.3g}), step x{row['time_ratio']:.2f}, "
                f"memory x{row.get('memory_ratio', float('nan')):.1f}, grad cos {row['grad_cosine']:.4f}")
    if "resnet" in models and any(m == "division" for m, _ in methods):
        results["division_observation"] = division_observation(quick=quick, seed=seed)
    save_results(results, out, "act", table_markdown, plot, log)
    return results


class _SplitOnly(Policy):
    """Backward sees only the low- (or only the high-) frequency part of every saved float tensor
    (exact zeros kept, as the DIVISION codec keeps them)."""

    name = "split-only"

    def __init__(self, part: str):
        self.part, self.split = part, FrequencySplitCodec()

    def encode(self, index, t, act):
        low, high = self.split.low_high(t)
        kept = (low if self.part == "low" else high) * (t != 0)
        return Packed("raw", t.shape, t.dtype, t.device, {"data": kept.to(t.dtype)})

    def codecs(self):
        return {"raw": RawCodec()}


def division_observation(quick: bool = False, seed: int = 0, batches: int = 4) -> dict:
    """DIVISION's motivating measurement on the ResNet: parameter-gradient error when backward sees
    only the LFC (8x8 block means) or only the HFC (the residual) of the activations."""
    (x, y), _, data_name = image_data(limit=64 * batches, test_limit=1, notice=lambda *a: None)
    model = reference_model("resnet", image_size=x.shape[-1], seed=seed)
    model.eval()
    out = {"data": data_name, "low": {"cos": [], "rel": []}, "high": {"cos": [], "rel": []}}
    for xb, yb in zip(x.split(64), y.split(64)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        exact = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        for part in ("low", "high"):
            act = ActivationCompressor(_SplitOnly(part), model=model)
            model.zero_grad(set_to_none=True)
            with act:
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            act.close()
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            out[part]["cos"].append(float(F.cosine_similarity(g, exact, dim=0)))
            out[part]["rel"].append(float((g - exact).pow(2).sum() / exact.pow(2).sum()))
    for part in ("low", "high"):
        out[part] = {k: statistics.mean(v) for k, v in out[part].items()}
    return out


def table_markdown(results: dict) -> str:
    headers = ["model", "method", "metric", "value", "Δ vs none", "held MiB (RSS)", "memory ÷", "lowbit ratio",
               "grad cos", "step × none (paired)", "step × plain autograd (paired)", "step × none (runs)"]
    rows = []
    for r in results["rows"]:
        held = r.get("held_bytes")
        new_format = "train_time_ratio" in r  # older results hold only the ratio of the training runs, as time_ratio
        paired = r.get("paired_time_ratio", 1.0 if new_format else None)
        plain = r.get("paired_plain_ratio")
        rows.append([
            r["model"], r["label"], r["metric_name"], round(r["metric"], 3), round(r["metric_delta"], 3),
            round(held / 2**20, 2) if held is not None else "-", round(r.get("memory_ratio", float("nan")), 1),
            round(r["lowbit_ratio"], 1), round(r["grad_cosine"], 4), "-" if paired is None else round(paired, 2),
            "-" if plain is None else round(plain, 2), round(r.get("train_time_ratio", r["time_ratio"]), 2),
        ])
    text = markdown_table(headers, rows)
    obs = results.get("division_observation")
    if obs:
        text += (f"\n\nDIVISION's observation (ResNet, {obs['data']}, untrained weights, 4 batches): backward with only "
                 f"the low-frequency part gives gradient cosine {obs['low']['cos']:.4f} (relative squared error "
                 f"{obs['low']['rel']:.3f}); with only the high-frequency part {obs['high']['cos']:.4f} "
                 f"({obs['high']['rel']:.3f}).")
    for r in results["rows"]:
        if r.get("comet_bounds"):
            h = r["comet_bounds"]
            first, last = h[0], h[-1]
            keys = sorted(first, key=int)
            ratio = [last[k] / first[k] for k in keys if k in last and first[k] > 0]
            text += (f"\n\nCOMET on {r['model']}: {len(h)} estimates; error bounds per saved tensor range "
                     f"{min(first.values()):.2e}..{max(first.values()):.2e} at the first and "
                     f"{min(last.values()):.2e}..{max(last.values()):.2e} at the last; last/first per tensor "
                     f"{min(ratio):.2f}..{max(ratio):.2f}; measured relative gradient error at the last estimate "
                     f"{r['comet_measured_error']:.3f}.")
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = [r for r in results["rows"] if r["model"] == m]
        for r in rows:
            ax.scatter(r.get("memory_ratio", r["lowbit_ratio"]), r["metric"], s=40)
            ax.annotate(r["label"], (r.get("memory_ratio", r["lowbit_ratio"]), r["metric"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("activation memory reduction vs none (x, RSS)")
        ax.set_ylabel(rows[0]["metric_name"])
        ax.set_title(f"{m} ({rows[0]['data']})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the real-model matrix: transformers' GPT-2, BERT and ResNet-18 (`lowbit bench act --models hf`)
# ---------------------------------------------------------------------------------------------
HF_CONFIGS: dict[str, dict] = {
    # size "small" of lowbit.models.hf: 4 layers, d=256, vocab 1000 / ResNet-18 widths 64..512 on 96x96
    "gpt2": {"batch": 4, "seq": 256},
    "bert": {"batch": 4, "seq": 256},
    "llama": {"batch": 4, "seq": 256},
    "resnet18": {"batch": 8},
}
HF_METHODS: list[tuple[str, float | None]] = [("none", None), ("checkpoint", None), ("checkpoint+uniform", 4),
                                              ("uniform", 4), ("uniform", 2), ("gact", 2), ("division", 2),
                                              ("mesa", None)]
# step-peak targets: GPT-2 at sequence 512 where held activations dominate (vocab 1000, batch 8)
# and where the logits do (vocab 50257, batch 2)
PEAK_TARGETS: list[dict] = [
    {"model": "gpt2", "batch": 8, "seq": 512, "vocab": 1000,
     "methods": [("none", None), ("checkpoint", None), ("uniform", 2)]},
    {"model": "gpt2", "batch": 2, "seq": 512, "vocab": 50257,
     "methods": [("none", None), ("checkpoint", None), ("division", 2)]},
]


def _hf_grads(name: str, method: str, bits, cfg: dict, draws: int, seed: int) -> dict:
    """Train-mode gradient fidelity: dropout draws the same masks (same seed before every forward)
    and BatchNorm normalises with batch statistics, as in training."""
    from lowbit.bench.memory import hf_setup

    model, _, loss_fn = hf_setup(name, "small", cfg["batch"], cfg.get("seq"), cfg.get("vocab"), seed)
    model.train()

    def grad(act) -> torch.Tensor:
        torch.manual_seed(seed + 7)  # the same dropout masks in every forward
        return parameter_gradient(model, loss_fn, act)

    exact = grad(None)
    act = make_compressor(method, bits, model, seed)
    t0 = time.perf_counter()
    if act.policy.adaptive:
        torch.manual_seed(seed + 7)
        act.estimate(loss_fn)
    estimate_s = time.perf_counter() - t0
    cos, rel = [], []
    for _ in range(draws):
        g = grad(act).double()
        cos.append(float(F.cosine_similarity(g, exact.double(), dim=0)))
        rel.append(float((g - exact).pow(2).sum() / exact.double().pow(2).sum()))
    rep = act.report()
    act.close()
    return {"grad_cosine": statistics.mean(cos), "grad_rel_sq_error": statistics.mean(rel),
            "lowbit_ratio": rep.ratio, "report_method": rep.method, "estimate_s": estimate_s}


def _hf_paired_time(name: str, method: str, bits, cfg: dict, pairs: int, seed: int, warmup: int = 1) -> dict:
    """Step time (forward, backward, AdamW step) of ``method`` against plain autograd, in
    alternating steps on identically initialised models; the ratio is the median over ``pairs``."""
    from lowbit.bench.memory import hf_setup

    runs = []
    for m, b in (("plain", None), (method, bits)):
        model, _, loss_fn = hf_setup(name, "small", cfg["batch"], cfg.get("seq"), cfg.get("vocab"), seed)
        model.train()
        act = None if m == "plain" else make_compressor(m, b, model, seed)
        if act is not None and act.policy.adaptive:
            act.estimate(loss_fn)
        runs.append((model, act, loss_fn, torch.optim.AdamW(model.parameters(), lr=1e-4)))

    def step(model, act, loss_fn, opt) -> float:
        return _timed_step(act, loss_fn, opt)

    for _ in range(warmup):
        for r in runs:
            step(*r)
    plain, comp = [], []
    for _ in range(pairs):
        plain.append(step(*runs[0]))
        comp.append(step(*runs[1]))
    return {"paired_plain_ratio": statistics.median(c / p for p, c in zip(plain, comp)),
            "paired_step_time_s": statistics.median(comp), "paired_plain_step_time_s": statistics.median(plain)}


def hf_rows(models=("gpt2", "bert", "llama", "resnet18"), methods=HF_METHODS, quick: bool = False, memory: bool = True,
            targets: bool = True, pairs: int | None = None, draws: int | None = None, seed: int = 0,
            out: str | Path = "benchmarks/results/act-hf", log=print) -> dict:
    """`lowbit bench act --models hf`: ACT on transformers' GPT-2, BERT, Llama and a ResNet-18,
    built from configs (:mod:`lowbit.models.hf`, size "small", random weights and data).

    Per (model, method), all in train mode: the memory held between forward and backward and the
    step's PEAK (RSS growth of forward + backward, measured in a child process; ratios to
    ``none``), lowbit's byte ratio, the gradient cosine to the exact gradient (same dropout
    masks, BatchNorm on batch statistics; mean over ``draws`` rounding draws) and the step time
    against plain autograd (alternating steps, median over ``pairs``). ``targets`` adds the
    step-peak checks of :data:`PEAK_TARGETS` (GPT-2 at sequence 512). Writes
    ``out/act-hf.json``, ``.md`` and a plot; returns the results."""
    from lowbit.bench.memory import measure_held_memory

    pairs = pairs or (3 if quick else 8)
    draws = draws or (2 if quick else 4)
    results: dict = {"quick": quick, "seed": seed, "threads": torch.get_num_threads(), "pairs": pairs, "draws": draws,
                     "size": "small", "train_mode": True, "rows": [], "targets": []}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if targets and memory:
        for t in PEAK_TARGETS:
            for method, bits in t["methods"]:
                mem = measure_held_memory(f"hf-{t['model']}", method, bits, t["batch"], repeats=1 if quick else 2,
                                          size="small", seq=t["seq"], vocab=t["vocab"], train=True)
                entry = {"model": t["model"], "batch": t["batch"], "seq": t["seq"], "vocab": t["vocab"],
                         "label": method_label(method, bits), "held_bytes": mem["held_bytes"],
                         "step_peak_bytes": mem["step_peak_bytes"]}
                plain = next((p for p in results["targets"] if p["label"] == "none" and p["vocab"] == t["vocab"]
                              and p["batch"] == t["batch"]), entry)
                entry["peak_of_plain"] = entry["step_peak_bytes"] / max(plain["step_peak_bytes"], 1)
                results["targets"].append(entry)
                log(f"target {t['model']} seq {t['seq']} vocab {t['vocab']} batch {t['batch']} {entry['label']}: "
                    f"held {entry['held_bytes'] / 2**20:.0f} MiB, step peak {entry['step_peak_bytes'] / 2**20:.0f} MiB "
                    f"({entry['peak_of_plain']:.2f} of plain)")
                write_json(results, Path(out) / "act-hf.json")
    jobs = [(m, meth, b) for m in models for meth, b in methods if not (meth == "mesa" and m == "resnet18")]
    bar = tqdm(jobs, desc="bench act hf", disable=tqdm is None) if tqdm else jobs
    base: dict[str, dict] = {}
    for name, method, bits in bar:
        cfg = HF_CONFIGS[name]
        row = {"model": name, "label": method_label(method, bits), "method": method, "bits": bits, **cfg}
        if memory:
            mem = measure_held_memory(f"hf-{name}", method, bits, cfg["batch"], repeats=1 if quick else 2,
                                      size="small", seq=cfg.get("seq"), vocab=cfg.get("vocab"), train=True)
            row.update(held_bytes=mem["held_bytes"], step_peak_bytes=mem["step_peak_bytes"])
        row.update(_hf_grads(name, method, bits, cfg, draws, seed))
        if method != "none":
            row.update(_hf_paired_time(name, method, bits, cfg, pairs, seed))
        else:
            row.update(paired_plain_ratio=1.0)
        if method == "none":
            base[name] = row
        b = base.get(name)
        if memory and b is not None:
            row["held_ratio"] = b["held_bytes"] / max(row["held_bytes"], 1)
            row["peak_ratio"] = b["step_peak_bytes"] / max(row["step_peak_bytes"], 1)
        results["rows"].append(row)
        write_json(results, Path(out) / "act-hf.json")  # a long run can be stopped with what it has
        log(f"{name}/{row['label']}: held {row.get('held_bytes', float('nan')) / 2**20:.1f} MiB "
            f"(÷{row.get('held_ratio', float('nan')):.1f}), step peak {row.get('step_peak_bytes', float('nan')) / 2**20:.1f} MiB "
            f"(÷{row.get('peak_ratio', float('nan')):.2f}), grad cos {row['grad_cosine']:.4f}, "
            f"step ×{row['paired_plain_ratio']:.2f}")
    save_results(results, out, "act-hf", hf_table, hf_plot, log)
    return results


def hf_table(results: dict) -> str:
    headers = ["model", "method", "held MiB", "held ÷", "step peak MiB", "peak ÷", "lowbit ratio",
               "grad cos (train)", "step × plain"]
    rows = []
    for r in results["rows"]:
        held, peak = r.get("held_bytes"), r.get("step_peak_bytes")
        rows.append([r["model"], r["label"], "-" if held is None else round(held / 2**20, 1),
                     round(r.get("held_ratio", float("nan")), 1), "-" if peak is None else round(peak / 2**20, 1),
                     round(r.get("peak_ratio", float("nan")), 2), round(r["lowbit_ratio"], 1),
                     round(r["grad_cosine"], 4), round(r["paired_plain_ratio"], 2)])
    text = markdown_table(headers, rows)
    if results.get("targets"):
        trows = [[f"gpt2 seq {t['seq']} vocab {t['vocab']} batch {t['batch']}", t["label"],
                  round(t["held_bytes"] / 2**20), round(t["step_peak_bytes"] / 2**20), round(t["peak_of_plain"], 2)]
                 for t in results["targets"]]
        text += "\n\nStep peak of the GPT-2 shapes where logits or held activations dominate (train mode):\n\n" + markdown_table(
            ["config", "method", "held MiB", "step peak MiB", "peak / plain"], trows)
    return text


def hf_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        for r in (r for r in results["rows"] if r["model"] == m and "peak_ratio" in r):
            ax.scatter(r["peak_ratio"], r["grad_cosine"], s=36)
            ax.annotate(r["label"], (r["peak_ratio"], r["grad_cosine"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("step peak reduction vs none (x, RSS)")
        ax.set_ylabel("gradient cosine (train mode)")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
