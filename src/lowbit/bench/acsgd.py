"""`lowbit bench acsgd`: the character GPT on fortunes trained pipeline-parallel on 2 and 4 stages
(local gloo ranks) with fp32, direct k-bit and AC-SGD k-bit activations between stages, over the
same steps and data order: loss curves, bytes per step, and simulated step time on slow links.
The 2-stage fp32 pipeline is also compared with single-process training of the same model."""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from lowbit.bench.common import markdown_table, save_results
from lowbit.distributed import CharLMTask, PipelineConfig, spawn_local, train_single

# (label, mode, forward bits); compressed rows send 4-bit gradients backward
ROWS = {
    2: [("fp32", "fp32", None), ("direct 4-bit", "quant", 4), ("AC-SGD 4-bit", "acsgd", 4),
        ("direct 2-bit", "quant", 2), ("AC-SGD 2-bit", "acsgd", 2)],
    4: [("fp32", "fp32", None), ("direct 4-bit", "quant", 4), ("AC-SGD 4-bit", "acsgd", 4), ("AC-SGD 2-bit", "acsgd", 2)],
}
DEFAULTS = {"examples": 1024, "epochs": 4, "batch_size": 32, "micro_batches": 4, "grad_bits": 4, "warmup_epochs": 1,
            "lr": 3e-3, "tail": 16}
QUICK = {"examples": 128, "epochs": 2, "batch_size": 16, "micro_batches": 2, "grad_bits": 4, "warmup_epochs": 1,
         "lr": 3e-3, "tail": 4}
BANDWIDTHS = ("100Mbps", "1Gbps")


def run(stages=(2, 4), quick: bool = False, out: str | Path = "results/acsgd", seed: int = 0, log=print) -> dict:
    c = QUICK if quick else DEFAULTS
    task = CharLMTask(n_examples=c["examples"], seed=seed, **({"dim": 32, "depth": 4, "heads": 2, "block": 16} if quick else {}))
    results = {"quick": quick, "seed": seed, "config": dict(c), "bandwidths": list(BANDWIDTHS), "runs": [],
               "model": {"dim": task.dim, "depth": task.depth, "heads": task.heads, "block": task.block}}
    for n in stages:
        threads = max(1, (os.cpu_count() or 1) // n)
        for label, mode, bits in ROWS[n]:
            cfg = PipelineConfig(stages=n, micro_batches=c["micro_batches"], batch_size=c["batch_size"], epochs=c["epochs"],
                                 lr=c["lr"], mode=mode, bits=bits or 4, grad_bits=None if mode == "fp32" else c["grad_bits"],
                                 warmup_epochs=c["warmup_epochs"], seed=seed, threads=threads, progress=True,
                                 bandwidths=BANDWIDTHS)
            log(f"{n} stages, {label} ...")
            res = spawn_local(task, cfg)
            tail = statistics.mean(res["losses"][-c["tail"]:])
            results["runs"].append({"stages": n, "label": label, "mode": mode, "bits": bits, "grad_bits": cfg.grad_bits,
                                    "losses": res["losses"], "final_loss": tail, "warmup_steps": res["warmup_steps"],
                                    "steady_bytes_per_step": res["steady_bytes_per_step"], "total_bytes": res["total_bytes"],
                                    "median_step_time_s": res["median_step_time_s"],
                                    "simulated_step_time_s": res["simulated_step_time_s"], "memory_bytes": res["memory_bytes"]})
            log(f"  final loss {tail:.4f}, {res['steady_bytes_per_step']}")
            if n == 2 and mode == "fp32":
                single = train_single(task, cfg)
                results["single_process_losses"] = single
                results["fp32_vs_single_max_abs_diff"] = max(abs(a - b) for a, b in zip(single, res["losses"]))
    _derive(results)
    save_results(results, out, "acsgd", table_markdown, plot, log)
    return results


def _derive(results: dict) -> None:
    """Ratios against the fp32 run with the same number of stages."""
    for r in results["runs"]:
        base = next(b for b in results["runs"] if b["stages"] == r["stages"] and b["mode"] == "fp32")
        wire = lambda x: x["steady_bytes_per_step"]["forward"] + x["steady_bytes_per_step"]["backward"]  # noqa: E731
        r["loss_vs_fp32_pct"] = 100 * (r["final_loss"] - base["final_loss"]) / base["final_loss"]
        r["bytes_ratio"] = wire(base) / wire(r)
        r["forward_bytes_ratio"] = base["steady_bytes_per_step"]["forward"] / r["steady_bytes_per_step"]["forward"]
        r["run_bytes_ratio"] = sum(base["total_bytes"].values()) / sum(r["total_bytes"].values())
        r["speedup"] = {bw: base["simulated_step_time_s"][bw] / r["simulated_step_time_s"][bw] for bw in results["bandwidths"]}


def table_markdown(results: dict) -> str:
    bws = results["bandwidths"]
    rows = []
    for r in results["runs"]:
        rows.append([r["stages"], r["label"], f"{r['final_loss']:.4f}", f"{r['loss_vs_fp32_pct']:+.2f}%",
                     f"{(r['steady_bytes_per_step']['forward'] + r['steady_bytes_per_step']['backward']) / 1024:.0f}",
                     f"{r['bytes_ratio']:.1f}x", f"{r['forward_bytes_ratio']:.1f}x", f"{r['run_bytes_ratio']:.1f}x",
                     *[f"{r['simulated_step_time_s'][bw]:.3f} ({r['speedup'][bw]:.2f}x)" for bw in bws]])
    c = results["config"]
    text = markdown_table(["stages", "activations", "final loss", "vs fp32", "KiB / step", "fewer bytes",
                           "fewer fwd bytes", "fewer bytes, whole run", *[f"step s @ {bw} (speed-up)" for bw in bws]], rows)
    m = results["model"]
    text += (f"\n\nCharGPT (dim {m['dim']}, {m['depth']} blocks) on {c['examples']} fortunes windows of {m['block']} characters, {c['epochs']} epochs "
             f"of batch {c['batch_size']} in {c['micro_batches']} micro-batches; the first {c['warmup_epochs']} epoch(s) "
             f"send fp32 activations (AC-SGD's warm-up; the direct rows get the same). Compressed rows send "
             f"{c['grad_bits']}-bit gradients backward. Final loss: mean training loss of the last {c['tail']} steps. "
             "Bytes per step: after the warm-up, both directions, every link, headers included. Step time: measured "
             "compute on loopback plus every link's bytes at the given bandwidth, no overlap (conservative).")
    if "fp32_vs_single_max_abs_diff" in results:
        text += (f" The 2-stage fp32 pipeline's loss curve differs from single-process training of the same model by at "
                 f"most {results['fp32_vs_single_max_abs_diff']:.2e} per step.")
    return text


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted({r["stages"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(stages), figsize=(6.2 * len(stages), 4.2), squeeze=False)
    k = max(1, results["config"]["tail"] // 2)
    for ax, n in zip(axes[0], stages):
        for r in (r for r in results["runs"] if r["stages"] == n):
            ls = r["losses"]
            smooth = [statistics.mean(ls[max(0, i - k + 1) : i + 1]) for i in range(len(ls))]
            ax.plot(smooth, label=r["label"], ls="-" if r["mode"] != "quant" else "--")
        warm = next(r["warmup_steps"] for r in results["runs"] if r["stages"] == n and r["mode"] != "fp32")
        ax.axvline(warm, color="k", lw=0.8, ls=":")
        ax.set_title(f"{n} pipeline stages (dotted: end of fp32 warm-up)")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean of {k} steps)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.6))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
