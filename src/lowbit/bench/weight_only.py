"""`lowbit bench weight-only`: weight-only low-bit quantization of a language model, two parts.

1. kernels (:func:`kernel_rows`): the packed CPU kernel (``PackedLinear`` on float32 activations)
   against float32 ``F.linear`` and torch's own int4 CPU kernel
   ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (what torchao's int4 weight-only uses on CPU),
   fed the same codes, on 4096x4096 at batch 1..16, at 1 thread and at all threads (torch and
   numba set alike). Best of repeated calls after a warm-up, the calls alternating so drift on a
   shared machine hits all alike; ratios are float32 time / packed time. The CPU's name and SIMD
   flags from /proc/cpuinfo go next to the figures.
2. quality (:func:`quality_rows`): a GPT-2-config character model trained here on the fortunes
   text (a few minutes; the trained weights are cached outside the repository), then validation
   perplexity for float32, RTN, HQQ and GPTQ at 4 and 3 bits, group 128 and 64, and the installed
   ``hqq`` package's own quantizer on the same layers as a side-by-side row.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numba
import torch
import torch.nn.functional as F

from lowbit.bench.common import fortunes_corpus, markdown_table, save_results
from lowbit.kernels import int4_gemv as kern
from lowbit.quant.weight_only import PackedLinear, quantize_weights, target_layers, weight_only_summary
from lowbit.quant.weight_only.rtn import rtn

KERNEL_SHAPE = (4096, 4096)
KERNEL_BATCHES = (1, 2, 4, 8, 16)
KERNEL_BITS = (4, 3, 2)
GROUP = 128

# quality: the character model and its training (about 3 minutes on 2 cores)
MODEL = {"n_layer": 4, "n_embd": 128, "n_head": 4, "block": 64}
TRAIN = {"steps": 250, "batch": 32, "lr": 3e-3, "seed": 0}
QUICK_TRAIN = {"steps": 40, "batch": 16, "lr": 3e-3, "seed": 0}
EVAL = {"windows": 256, "calib_windows": 64}
QUALITY_BITS = (4, 3)
QUALITY_GROUPS = (128, 64)
QUALITY_METHODS = ("rtn", "hqq", "gptq", "hqq-package")
TARGET = 0.02  # HQQ / GPTQ at 4 bits: perplexity within 2% of float32


# ----------------------------------------------------------------------------------------
# part 1: kernels
# ----------------------------------------------------------------------------------------
def cpu_info() -> dict[str, Any]:
    """The CPU's model name and the SIMD flags that matter here, from /proc/cpuinfo."""
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
    return {"model": name, "flags": [f for f in wanted if f in flags], "cpus": os.cpu_count()}


def aten_int4_pack(layer: PackedLinear, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The same 4-bit codes, scales and zeros in the operands of
    ``torch.ops.aten._weight_int4pack_mm_for_cpu``: int32 codes [N, K] packed by
    ``_convert_weight_to_int4pack_for_cpu``, and scale/zero [G, N, 2] in ``dtype`` for its
    ``w = (code - 8) * scale + zero'`` form (so ``zero' = (8 - zero) * scale``)."""
    if layer.bits != 4 or layer.in_features % layer.group_size:
        raise ValueError("torch's int4 kernel takes 4-bit codes whose groups divide K")
    codes = kern.unpack_codes(layer.qweight, 4, layer.out_features, layer.in_features).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    s = layer.scales.float()
    z = (8 - layer.zeros.float()) * s
    return packed, torch.stack([s, z], -1).transpose(0, 1).contiguous().to(dtype)


def _paired_best(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Best time of each function over ``repeats`` rounds, the calls alternating."""
    for fn in fns:
        fn()
    times = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i] = min(times[i], time.perf_counter() - t0)
    return times


def _random_layer(n: int, k: int, bits: int, group_size: int, seed: int = 0) -> tuple[PackedLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    codes, scales, zeros = rtn(w, bits, group_size)
    layer = PackedLinear.from_codes(codes, scales, zeros, bits, group_size, None)
    return layer, layer.dequantize()


@torch.no_grad()
def kernel_rows(shape: tuple[int, int] = KERNEL_SHAPE, batches=KERNEL_BATCHES, bits=KERNEL_BITS,
                group_size: int = GROUP, threads: tuple[int, ...] | None = None, quick: bool = False,
                log=print) -> list[dict]:
    """One row per (bits, threads, batch): milliseconds of float32 ``F.linear``, the packed kernel
    and (4 bits) torch's int4 CPU kernel with float32 and bfloat16 activations, all on the same
    [N, K] = ``shape`` weight (float32 = the dequantized codes) in the same run."""
    n, k = shape
    if quick:
        n, k, batches, bits = 1024, 1024, (1, 4), (4,)
    all_threads = torch.get_num_threads()
    threads = threads or tuple(sorted({1, all_threads}))
    old_numba = numba.get_num_threads()
    rows = []
    try:
        for b in bits:
            layer, w = _random_layer(n, k, b, group_size)
            s32, sz32 = kern.kernel_params(layer.scales, layer.zeros)
            aten = aten_int4_pack(layer) if b == 4 else None
            aten_bf16 = aten_int4_pack(layer, torch.bfloat16) if b == 4 else None
            for th in threads:
                torch.set_num_threads(th)
                for m in batches:
                    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
                    xb = x.to(torch.bfloat16)
                    fns = [lambda: F.linear(x, w),
                           lambda: kern.packed_linear_cpu(x, layer.qweight, s32, sz32, b, group_size, n, k, threads=th)]
                    if aten is not None:
                        fns += [lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, aten[0], group_size, aten[1]),
                                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, aten_bf16[0], group_size,
                                                                                   aten_bf16[1])]
                    ref = F.linear(x.double(), w.double())
                    err = float((fns[1]() - ref).abs().max() / ref.abs().max())
                    t = _paired_best(fns, repeats=6 if quick else 25)
                    row = {"bits": b, "threads": th, "batch": m, "n": n, "k": k, "group_size": group_size,
                           "float32_ms": 1e3 * t[0], "packed_ms": 1e3 * t[1], "speedup": t[0] / t[1],
                           "packed_rel_err": err,
                           "float32_bytes": 4 * n * k, "packed_bytes": layer.nbytes()}
                    if aten is not None:
                        row |= {"aten_int4_ms": 1e3 * t[2], "aten_int4_speedup": t[0] / t[2],
                                "aten_int4_bf16_ms": 1e3 * t[3], "aten_int4_bf16_speedup": t[0] / t[3]}
                    rows.append(row)
                    extra = (f", aten int4 {row['aten_int4_ms']:.2f} ms (x{row['aten_int4_speedup']:.2f}), "
                             f"bf16 {row['aten_int4_bf16_ms']:.2f} ms (x{row['aten_int4_bf16_speedup']:.2f})"
                             if aten is not None else "")
                    log(f"{n}x{k} {b}-bit, {th} thread(s), batch {m}: float32 {row['float32_ms']:.2f} ms, "
                        f"packed {row['packed_ms']:.2f} ms (x{row['speedup']:.2f}){extra}")
    finally:
        torch.set_num_threads(all_threads)
        numba.set_num_threads(old_numba)
    return rows


def kernel_rows_passive(quick: bool = False, log=print, **kwargs: Any) -> tuple[list[dict], str]:
    """:func:`kernel_rows` with OpenMP's passive wait policy: in a child process with
    ``OMP_WAIT_POLICY=PASSIVE`` unless this process already has it. torch and numba each keep an
    OpenMP thread pool whose idle workers busy-wait by default; alternating the two pools on a
    small (or shared) machine then starves whichever runs next, which measures the scheduler,
    not the kernels. Returns (rows, the wait policy they were measured under)."""
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return kernel_rows(quick=quick, log=log, **kwargs), "PASSIVE"
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        code = ("import json, sys; from lowbit.bench.weight_only import kernel_rows; "
                "a = json.loads(sys.argv[1]); "
                "rows = kernel_rows(log=lambda s: print(s, flush=True), **a['kwargs']); "
                "open(a['out'], 'w').write(json.dumps(rows))")
        args = json.dumps({"out": str(out), "kwargs": dict(kwargs, quick=quick)})
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        proc = subprocess.Popen([sys.executable, "-c", code, args], env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            log(line.rstrip())
        if proc.wait() != 0:
            raise RuntimeError(f"the kernel benchmark's child process failed (exit code {proc.returncode})")
        return json.loads(out.read_text()), "PASSIVE"


def run_kernels(quick: bool = False, out: str | Path = "results/weight-only-kernels", log=print) -> dict:
    """Part 1 alone: ``kernel_rows`` plus the CPU description, saved as ``weight-only-kernels``."""
    rows, policy = kernel_rows_passive(quick=quick, log=log)
    results = {"quick": quick, "cpu": cpu_info(), "omp_wait_policy": policy, "kernel_rows": rows}
    save_results(results, out, "weight-only-kernels", kernel_table_markdown, _plot_kernels, log)
    return results


def kernel_table_markdown(results: dict) -> str:
    cpu = results["cpu"]
    def f(r, key, digits):
        return f"{r[key]:.{digits}f}" if key in r else "-"

    rows = [[r["bits"], r["threads"], r["batch"], f(r, "float32_ms", 2), f(r, "packed_ms", 2), f(r, "speedup", 2),
             f(r, "aten_int4_ms", 2), f(r, "aten_int4_speedup", 2), f(r, "aten_int4_bf16_ms", 2),
             f(r, "aten_int4_bf16_speedup", 2)] for r in results["kernel_rows"]]
    r0 = results["kernel_rows"][0]
    return (markdown_table(["bits", "threads", "batch", "float32 ms", "packed ms", "speedup x", "aten int4 ms",
                            "aten x", "aten int4 bf16-act ms", "aten bf16 x"], rows)
            + f"\n\n{r0['n']}x{r0['k']} weight, group {r0['group_size']}; CPU: {cpu['model']}, "
              f"{cpu['cpus']} CPUs, flags {' '.join(cpu['flags'])}; OMP_WAIT_POLICY="
              f"{results.get('omp_wait_policy', 'default')}; speedups are float32 F.linear time / kernel time in "
              f"the same run (best of repeated alternating calls)")


def _plot_kernels(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results["kernel_rows"]
    for b in sorted({r["bits"] for r in rows}):
        for th in sorted({r["threads"] for r in rows}):
            rs = [r for r in rows if r["bits"] == b and r["threads"] == th]
            ax.plot([r["batch"] for r in rs], [r["speedup"] for r in rs], marker="o", label=f"lowbit {b}-bit, {th} thr")
            if b == 4:
                ax.plot([r["batch"] for r in rs], [r["aten_int4_bf16_speedup"] for r in rs], ls="--", marker="s",
                        label=f"aten int4 (bf16 act), {th} thr")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (rows of x)")
    ax.set_ylabel("speedup over float32 F.linear (x)")
    ax.set_title("weight-only packed GEMV vs float32, same run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# part 2: quality on a trained character GPT-2
# ----------------------------------------------------------------------------------------
def char_gpt2(vocab_size: int, n_layer: int, n_embd: int, n_head: int, block: int) -> torch.nn.Module:
    """A GPT-2-config (transformers) character model: Conv1D projections, tied embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg)


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "weight-only"


def trained_model(corpus, model_cfg: dict, train_cfg: dict, progress: bool = True, log=print
                  ) -> tuple[torch.nn.Module, dict]:
    """The character model trained on ``corpus`` (AdamW, cosine schedule), from the cache when a
    run with the same settings and text already trained it. Returns (model in eval mode, info)."""
    key = hashlib.sha256(json.dumps([model_cfg, train_cfg, corpus.vocab_size, len(corpus.train)],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = _cache_dir() / f"char-gpt2-{key}.pt"
    torch.manual_seed(train_cfg["seed"])
    model = char_gpt2(corpus.vocab_size, **model_cfg)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"trained model from cache {path}")
        return model.eval(), {"cached": True, "path": str(path), "train_seconds": None}
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train_cfg["lr"], total_steps=train_cfg["steps"],
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(train_cfg["seed"])
    model.train()
    t0 = time.perf_counter()
    for _ in tqdm(range(train_cfg["steps"]), desc="train char gpt2", disable=not progress, leave=False):
        x, y = corpus.batch(train_cfg["batch"], model_cfg["block"], gen)
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    log(f"trained {train_cfg['steps']} steps in {seconds:.0f} s (last loss {loss.item():.3f})")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval(), {"cached": False, "path": str(path), "train_seconds": seconds}


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: tuple[torch.Tensor, torch.Tensor], batch: int = 32) -> float:
    """exp(mean next-character cross-entropy) over validation windows (inputs, targets) [W, T]."""
    x, y = windows
    total, count = 0.0, 0
    for i in range(0, len(x), batch):
        logits = model(input_ids=x[i:i + batch]).logits
        total += float(F.cross_entropy(logits.flatten(0, 1), y[i:i + batch].flatten(), reduction="sum"))
        count += y[i:i + batch].numel()
    return math.exp(total / count)


def hqq_package_model(model: torch.nn.Module, bits: int, group_size: int) -> torch.nn.Module:
    """The installed ``hqq`` package's quantizer (its defaults: optimize=True, axis=1 = groups along
    a row's input features, like lowbit's) on the same layers, run on CPU; its dequantized weights
    are put back in a float copy (fake quantization: the package's quality, not its kernels)."""
    from hqq.core.quantize import Quantizer
    from transformers.pytorch_utils import Conv1D

    qmodel = copy.deepcopy(model)
    layers, _ = target_layers(qmodel)
    for _, mod in layers:
        conv = isinstance(mod, Conv1D)
        w = mod.weight.detach().t() if conv else mod.weight.detach()
        wq, meta = Quantizer.quantize(w.float().contiguous(), nbits=bits, group_size=group_size, optimize=True,
                                      axis=1, bitpack=False, device="cpu", compute_dtype=torch.float32)
        deq = Quantizer.dequantize(wq, meta).reshape(w.shape).float()
        mod.weight.data.copy_(deq.t() if conv else deq)
    return qmodel


@torch.no_grad()
def quality_rows(quick: bool = False, progress: bool = True, log=print) -> dict:
    """Train (or load) the character model and measure every (bits, group, method) row."""
    corpus = fortunes_corpus()
    train_cfg = QUICK_TRAIN if quick else TRAIN
    with torch.enable_grad():
        model, info = trained_model(corpus, MODEL, train_cfg, progress=progress, log=log)
    n_val = 32 if quick else EVAL["windows"]
    val = corpus.batch(n_val, MODEL["block"], torch.Generator().manual_seed(1), split="val")
    calib_x, _ = corpus.batch(8 if quick else EVAL["calib_windows"], MODEL["block"],
                              torch.Generator().manual_seed(2))
    calibration = [calib_x[i:i + 8] for i in range(0, len(calib_x), 8)]
    float_ppl = perplexity(model, val)
    log(f"float32 perplexity {float_ppl:.4f}")
    rows = [{"method": "float32", "bits": 32, "group_size": None, "perplexity": float_ppl, "delta_pct": 0.0,
             "seconds": 0.0, "compression": 1.0}]
    bits_list, groups = ((4,), (64,)) if quick else (QUALITY_BITS, QUALITY_GROUPS)
    for bits in bits_list:
        for g in groups:
            for method in QUALITY_METHODS:
                t0 = time.perf_counter()
                if method == "hqq-package":
                    qmodel, compression = hqq_package_model(model, bits, g), None
                else:
                    qmodel = quantize_weights(model, bits=bits, group_size=g, method=method,
                                              calibration=calibration if method == "gptq" else None)
                    compression = weight_only_summary(qmodel)["compression"]
                seconds = time.perf_counter() - t0
                ppl = perplexity(qmodel, val)
                delta = 100 * (ppl / float_ppl - 1)
                rows.append({"method": method, "bits": bits, "group_size": g, "perplexity": ppl, "delta_pct": delta,
                             "seconds": seconds, "compression": compression})
                log(f"{method} {bits}-bit g{g}: perplexity {ppl:.4f} ({delta:+.2f}%), {seconds:.1f} s")
    params = sum(p.numel() for p in model.parameters())
    return {"model": dict(MODEL, vocab=corpus.vocab_size, parameters=params), "train": dict(train_cfg, **info),
            "val_windows": n_val, "calib_windows": len(calib_x), "rows": rows, "checks": _checks(rows)}


def _checks(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if r["bits"] == 4 and r["method"] in ("hqq", "gptq"):
            name = f"{r['method']}-4bit-g{r['group_size']} within {100 * TARGET:g}% of float"
            out[name] = r["delta_pct"] <= 100 * TARGET
    return out


def quality_table_markdown(results: dict) -> str:
    q = results["quality"]
    rows = [[r["method"], r["bits"], r["group_size"] or "-", f"{r['perplexity']:.4f}", f"{r['delta_pct']:+.2f}",
             f"{r['compression']:.2f}" if r["compression"] else "-", f"{r['seconds']:.1f}"] for r in q["rows"]]
    m = q["model"]
    checks = "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in q["checks"].items())
    return (markdown_table(["method", "bits", "group", "val perplexity", "vs float %", "layer compression x",
                            "quantize s"], rows)
            + f"\n\nGPT-2-config character model ({m['n_layer']} layers, width {m['n_embd']}, vocab {m['vocab']}, "
              f"{m['parameters']:,} parameters) trained {q['train']['steps']} steps on fortunes; perplexity over "
              f"{q['val_windows']} validation windows of {m['block']} characters; GPTQ calibrated on "
              f"{q['calib_windows']} training windows. {checks}")


def table_markdown(results: dict) -> str:
    parts = []
    if "kernel_rows" in results:
        parts.append(kernel_table_markdown(results))
    if "quality" in results:
        parts.append(quality_table_markdown(results))
    return "\n\n".join(parts)


def plot(results: dict, path: Path) -> None:
    if "kernel_rows" in results:
        _plot_kernels(results, path)


def run(quick: bool = False, out: str | Path = "results/weight-only", parts=("kernels", "quality"),
        progress: bool = True, log=print) -> dict:
    """The whole benchmark (``parts``: "kernels", "quality"); writes weight-only.json/.md/.png."""
    results: dict[str, Any] = {"quick": quick, "cpu": cpu_info(), "threads": torch.get_num_threads()}
    if "kernels" in parts:
        results["kernel_rows"], results["omp_wait_policy"] = kernel_rows_passive(quick=quick, log=log)
    if "quality" in parts:
        results["quality"] = quality_rows(quick=quick, progress=progress, log=log)
    save_results(results, out, "weight-only", table_markdown, plot, log)
    return results


if __name__ == "__main__":  # python -m lowbit.bench.weight_only [--quick] [--out DIR] [--parts kernels,quality]
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/weight-only")
    ap.add_argument("--parts", default="kernels,quality")
    a = ap.parse_args()
    run(quick=a.quick, out=a.out, parts=tuple(a.parts.split(",")))
