"""`lowbit bench kernels`: packed binary compute against torch float32, side by side in one run.

1. binary_matmul (packed +-1, exact int32) against ``a @ b.T`` in float32, square sizes 256..4096
   and the GEMM shapes of the reference ResNet's binary convs at batch 64 (M = N * H' * W',
   N = out channels, K = C * 9). Packing of the operands is not timed: weights are packed once at
   export, and the activation packing is part of the conv rows below.
2. the exported binary conv layers (BatchNorm folded in) against nn.Conv2d (float32) at batch 1 and 64.
3. end to end: the exported XNOR ResNet against the float one at batch 1 and 64, both as trained
   and as fast as plain torch runs it (BatchNorm folded, channels-last), and sizes.
4. integer inference: a ResNet-18-class CNN (96 x 96 images) and a BERT (seq 128)
   (``transformers`` configs, "small"; "tiny" with ``quick``) post-training quantized to W8A8 and
   W4A8 (round to nearest) and exported to integer layers (int8 GEMM through ``torch._int_mm``,
   int8 im2col for convs), against the float32 model at batch 1 and 8; the largest difference of
   the exported model's output from the fake-quantized one's.
5. weight-only kernels: ``lowbit.bench.weight_only.kernel_rows_passive`` (the packed 2-4-bit
   kernel on float32 activations against ``F.linear`` and torch's int4 kernel), its own table.
Best of repeated runs after a warm-up, float and packed calls alternating; ratios are float
time / packed time.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from lowbit import quant
from lowbit.bench.common import markdown_table, save_results
from lowbit.kernels.binary import binary_matmul, pack_signs
from lowbit.models import ResNet
from lowbit.quant.packed_binary import PackedBinaryLayer

SIZES = (256, 512, 1024, 2048, 4096)


def _paired_times(*fns, repeats: int) -> list[float]:
    """Best time of each function, the calls alternating so that drift on a shared machine hits
    all alike (median-of-best over the repeats would mix in the drift)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def _repeats(work: float) -> int:
    return max(3, min(50, int(2e9 / max(work, 1))))


def _binary_layers(model: torch.nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedBinaryLayer)]


def run(sizes=SIZES, quick: bool = False, out: str | Path = "results/kernels", log=print) -> dict:
    if quick:
        sizes = tuple(s for s in sizes if s <= 512)
    torch.manual_seed(0)
    rows = []
    for s in sizes:
        a, b = torch.randn(s, s), torch.randn(s, s)
        pa, pb = pack_signs(a), pack_signs(b)
        reps = _repeats(s**3)
        t_float, t_bin = _paired_times(lambda: a @ b.T, lambda: binary_matmul(pa, pb, s), repeats=reps)
        rows.append({"kind": "square", "shape": f"{s}x{s}x{s}", "m": s, "n": s, "k": s,
                     "float_ms": 1e3 * t_float, "binary_ms": 1e3 * t_bin, "speedup": t_float / t_bin})
        log(f"matmul {s}^3: float {1e3 * t_float:.2f} ms, binary {1e3 * t_bin:.2f} ms, x{t_float / t_bin:.1f}")
    float_model = ResNet().eval()
    qmodel = quant.quantize(float_model, "xnor")
    with torch.no_grad():
        qmodel(torch.randn(32, 1, 28, 28))  # BatchNorm statistics, so activations are realistic
    qmodel.eval()
    packed = quant.export(qmodel)
    shapes, hooks = {}, []
    for name, layer in _binary_layers(packed):
        hooks.append(layer.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, i[0].shape)))
    batch = 8 if quick else 64
    with torch.no_grad():
        packed(torch.randn(batch, 1, 28, 28))
    for h in hooks:
        h.remove()
    for name, layer in _binary_layers(packed):
        n_, c, h, w = shapes[name]
        conv = dict(packed.named_modules())[name]
        fl = float_model.get_submodule(name)
        out_hw = fl(torch.zeros(1, c, h, w)).shape[-2:]
        m = n_ * out_hw[0] * out_hw[1]
        k, o = conv.k, conv.out_features
        a, b = torch.randn(m, k), torch.randn(o, k)
        pa, pb = pack_signs(a), pack_signs(b)
        reps = _repeats(m * o * k)
        t_float, t_bin = _paired_times(lambda: a @ b.T, lambda: binary_matmul(pa, pb, k), repeats=reps)
        rows.append({"kind": "resnet-gemm", "shape": f"{name}: {m}x{o}x{k}", "m": m, "n": o, "k": k,
                     "float_ms": 1e3 * t_float, "binary_ms": 1e3 * t_bin, "speedup": t_float / t_bin})
        for bs in (1, batch):
            x = torch.randn(bs, c, h, w)
            with torch.no_grad():
                t_f, t_b = _paired_times(lambda: fl(x), lambda: conv(x), repeats=_repeats(bs * c * h * w * o * 9))
            rows.append({"kind": "conv", "shape": f"{name} batch {bs}: {c}->{o} at {h}x{w}", "m": bs, "n": o, "k": k,
                         "float_ms": 1e3 * t_f, "binary_ms": 1e3 * t_b, "speedup": t_f / t_b})
    sizes_row = {"float32_bytes": quant.storage_bytes(float_model), "packed_bytes": quant.storage_bytes(packed)}
    sizes_row["compression"] = sizes_row["float32_bytes"] / sizes_row["packed_bytes"]
    # the float model as trained, and as fast as plain torch runs it: BatchNorm folded, channels-last
    float_fast = quant.fold_batchnorm(float_model).to(memory_format=torch.channels_last)
    for bs in (1, batch):
        x = torch.randn(bs, 1, 28, 28)
        with torch.no_grad():
            t_f, t_ff, t_b = _paired_times(lambda: float_model(x), lambda: float_fast(x), lambda: packed(x),
                                           repeats=50 if bs == 1 else 15)
        for label, t in (("", t_f), (" (float32 BN-folded, channels-last)", t_ff)):
            rows.append({"kind": "end-to-end", "shape": f"ResNet batch {bs}{label}", "m": bs, "n": 10, "k": 0,
                         "float_ms": 1e3 * t, "binary_ms": 1e3 * t_b, "speedup": t / t_b})
        log(f"end to end batch {bs}: float {1e3 * t_f:.2f} ms (BN-folded channels-last {1e3 * t_ff:.2f} ms), "
            f"exported xnor {1e3 * t_b:.2f} ms, x{t_f / t_b:.2f} (x{t_ff / t_b:.2f})")
    unfolded = quant.export(qmodel, fold_batchnorm=False)
    max_diff = _layerwise_difference(qmodel, unfolded, torch.randn(4, 1, 28, 28))
    agree = _top1_agreement(unfolded, packed, torch.randn(256, 1, 28, 28))
    from lowbit.bench.weight_only import cpu_info, kernel_rows_passive

    int_rows = int_export_rows(quick, log)
    wo_rows, policy = kernel_rows_passive(quick=quick, log=log)
    results = {"quick": quick, "threads": torch.get_num_threads(), "cpu": cpu_info(), "rows": rows,
               "model_size": sizes_row, "export_max_abs_diff_vs_fake_quant": max_diff, "export_top1_agreement": agree,
               "int_export": int_rows, "weight_only": {"omp_wait_policy": policy, "kernel_rows": wo_rows}}
    save_results(results, out, "kernels", table_markdown, plot, log)
    return results


INT_BATCHES = (1, 8)


@torch.no_grad()
def int_export_rows(quick: bool = False, log=print) -> list[dict]:
    """Float32 against the integer export (W8A8, W4A8 RTN) for a ResNet-18-class CNN (96 x 96
    images) and a BERT (seq 128), "small" configs, at batch 1 and 8 ("tiny", batch 2 with
    ``quick``); [] with a note when ``transformers`` is missing."""
    try:
        from lowbit.models.hf import hf_batch, hf_model
    except ImportError:  # pragma: no cover - needs the hf extra
        log("integer export rows skipped: needs `transformers` (pip install 'lowbit[hf]')")
        return []
    size = "tiny" if quick else "small"
    batches = (2,) if quick else INT_BATCHES
    rows = []
    for name, seq in (("resnet18", None), ("bert", 32 if quick else 128)):
        torch.manual_seed(0)
        model = hf_model(name, size).eval()
        gen = torch.Generator().manual_seed(0)
        calib = next(iter(hf_batch(name, model, 32, seq, size, gen).values()))
        xs = {b: next(iter(hf_batch(name, model, b, seq, size, gen).values())) for b in batches}
        for wb, ab in ((8, 8), (4, 8)):
            q = quant.ptq(model, calib, w_bits=wb, a_bits=ab, progress=False)
            e = quant.export(q)
            for batch, x in xs.items():
                diff = float((e(x).logits - q(x).logits).abs().max())
                scale = float(q(x).logits.abs().max())
                t_f, t_i = _paired_times(lambda: model(x), lambda: e(x), repeats=3 if quick else 7)
                shape = f"{tuple(x.shape[1:])}"
                rows.append({"model": f"{name} ({size})", "input": shape, "config": f"W{wb}A{ab}", "batch": batch,
                             "float_ms": 1e3 * t_f, "int_ms": 1e3 * t_i, "speedup": t_f / t_i,
                             "max_abs_diff_vs_fake_quant": diff, "output_max_abs": scale,
                             "float32_bytes": quant.storage_bytes(model), "exported_bytes": quant.storage_bytes(e)})
                log(f"{name} W{wb}A{ab} batch {batch}: float32 {1e3 * t_f:.1f} ms, integer export {1e3 * t_i:.1f} ms "
                    f"(x{t_f / t_i:.2f}), max |export - fake quant| {diff:.1e} (outputs up to {scale:.2g})")
    return rows


@torch.no_grad()
def _layerwise_difference(qmodel, packed, x) -> float:
    """Largest |packed layer - fake-quantized layer| over the binary layers, each fed the input the
    fake-quantized model gives it (end to end, a float rounding that flips a later sign would
    dominate the comparison without saying anything about the layers)."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, (i[0], o)))
             for n, m in quant.quant_layers(qmodel)]
    qmodel(x)
    for h in hooks:
        h.remove()
    return max(float((packed.get_submodule(n)(xi) - yi).abs().max()) for n, (xi, yi) in inputs.items())


@torch.no_grad()
def _top1_agreement(unfolded, packed, x) -> float:
    """Fraction of inputs on which the exported model with BatchNorm folded predicts the class of
    the export without folding (what folding changes; end to end against the fake-quantized model
    an untrained binary net's near-ties flip under any change of float summation order)."""
    return float((unfolded(x).argmax(1) == packed(x).argmax(1)).float().mean())


def table_markdown(results: dict) -> str:
    rows = [[r["kind"], r["shape"], round(r["float_ms"], 3), round(r["binary_ms"], 3), round(r["speedup"], 2)]
            for r in results["rows"]]
    s = results["model_size"]
    return (markdown_table(["kind", "shape", "float32 ms", "binary ms", "speedup ×"], rows)
            + f"\n\nexported XNOR ResNet: {s['packed_bytes']:,} bytes vs {s['float32_bytes']:,} float32 "
              f"({s['compression']:.1f}x smaller); largest |packed layer - fake-quantized layer| on the same "
              f"input: {results['export_max_abs_diff_vs_fake_quant']:.1e} (BatchNorm unfolded); BatchNorm folded: "
              f"same top-1 class as unfolded on {100 * results.get('export_top1_agreement', float('nan')):.1f}% of random inputs"
            + _int_table(results.get("int_export", [])) + _weight_only_table(results))


def _weight_only_table(results: dict) -> str:
    wo = results.get("weight_only")
    if not wo or not wo.get("kernel_rows"):
        return ""
    from lowbit.bench.weight_only import cpu_info, kernel_table_markdown

    return ("\n\nweight-only kernels (packed 2-4-bit weights, float32 activations) against float32 F.linear:\n\n"
            + kernel_table_markdown({"cpu": results.get("cpu") or cpu_info(), "kernel_rows": wo["kernel_rows"],
                                     "omp_wait_policy": wo.get("omp_wait_policy")}))


def _int_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    body = [[r["model"] + (f" {r['input']}" if "input" in r else ""), r["config"], r["batch"], round(r["float_ms"], 2), round(r["int_ms"], 2), round(r["speedup"], 2),
             f"{r['max_abs_diff_vs_fake_quant']:.1e}", f"{r['float32_bytes'] / r['exported_bytes']:.1f}x"] for r in rows]
    return "\n\ninteger export (post-training RTN, int8 GEMM) against float32 (speedup = float32 / integer):\n\n" + markdown_table(
        ["model", "config", "batch", "float32 ms", "integer ms", "speedup ×", "max |export - fake quant|", "smaller"], body)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("square", "o"), ("resnet-gemm", "s")):
        rs = [r for r in results["rows"] if r["kind"] == kind]
        ax.scatter([r["m"] * r["n"] * r["k"] for r in rs], [r["speedup"] for r in rs], marker=marker, label=kind)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("M x N x K (multiply-adds)")
    ax.set_ylabel("speedup of binary_matmul over float32 matmul (x)")
    ax.set_title(f"XOR-popcount GEMM vs torch float32 ({results['threads']} threads)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
