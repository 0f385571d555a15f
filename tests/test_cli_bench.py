"""The benchmarks (library calls; the `lowbit` command itself is tested in test_cli.py)."""
import json

import pytest

from lowbit.bench import act as act_bench
from lowbit.bench.memory import measure_held_memory
from lowbit.cli import main


def test_held_memory_measured_end_to_end():
    """RSS of a child process: 2-bit activations hold several times less than plain autograd."""
    none = measure_held_memory("resnet", "none", None, 64, repeats=1)
    two = measure_held_memory("resnet", "uniform", 2, 64, repeats=1)
    assert none["held_bytes"] > 0.8 * none["lowbit_raw_bytes"]  # RSS sees what autograd holds
    assert none["held_bytes"] / max(two["held_bytes"], 1) > 5


@pytest.mark.slow  # long end-to-end run: CI's `pytest -m slow` line
def test_act_benchmark_writes_json_table_and_plot(tmp_path):
    res = act_bench.run(models=("resnet",), methods=[("none", None), ("uniform", 4)], quick=True,
                        out=tmp_path, progress=False, log=lambda *a: None)
    data = json.loads((tmp_path / "act.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["none", "uniform-4"]
    row = data["rows"][1]
    assert row["memory_ratio"] > 3 and row["grad_cosine"] > 0.97
    assert row["time_ratio"] == row["paired_time_ratio"] > 0 and row["train_time_ratio"] > 0
    assert (tmp_path / "act.md").read_text().startswith("| model") and "(paired)" in (tmp_path / "act.md").read_text()
    assert (tmp_path / "act.png").exists()
    assert res["rows"][0]["metric_delta"] == 0


def test_act_time_only_writes_paired_ratios(tmp_path):
    out = tmp_path / "t"
    assert main(["bench", "act", "--time-only", "--quick", "--models", "resnet", "--methods", "none,uniform-2",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "act-time.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["uniform-2"]  # none is the reference, not a row
    assert rows[0]["paired_time_ratio"] > 0 and rows[0]["paired_plain_ratio"] > 0
    assert rows[0]["paired_base_step_time_s"] > 0 and rows[0]["paired_plain_step_time_s"] > 0
    assert "× plain autograd" in (out / "act-time.md").read_text()


@pytest.mark.slow  # long end-to-end run: CI's `pytest -m slow` line
def test_quant_benchmark_writes_json_table_and_plot(tmp_path):
    from lowbit.bench import quant as quant_bench

    rows = [("float32", "float", {}), ("xnor", "xnor", {}), ("ternary", "ternary", {}), ("int4", "int4", {})]
    res = quant_bench.run(rows=rows, quick=True, out=tmp_path, progress=False, log=lambda *a: None)
    data = json.loads((tmp_path / "quant.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["float32", "xnor", "ternary", "int4"]
    by = {r["label"]: r for r in data["rows"]}
    assert by["xnor"]["compression"] > 15 and 8 < by["ternary"]["compression"] < by["xnor"]["compression"]
    assert by["float32"]["accuracy"] > 50 and "target_met" in by["int4"]
    assert (tmp_path / "quant.png").exists() and "| recipe" in (tmp_path / "quant.md").read_text()
    assert res["rows"][0]["accuracy_delta"] == 0


def test_explain_benchmark(tmp_path):
    from lowbit.bench import explain as explain_bench

    res = explain_bench.run(quick=True, out=tmp_path, progress=False, log=lambda *a: None, with_shap=False)
    data = json.loads((tmp_path / "explain.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert methods == {"permutation", "antithetic", "kernel", "shear", "shear-uniform"}
    assert all(r["abs_error"] > 0 and r["ms_per_instance"] > 0 for r in data["rows"])
    assert "shear_vs_antithetic_error_ratio_at_16" in res["claims"]
    assert "shear_uniform_vs_antithetic_error_ratio_at_16" in res["claims"]
    by = {(r["method"], r["budget"]): r["abs_error"] for r in data["rows"]}
    assert res["claims"]["shear_below_antithetic_at_budgets"] == sorted(
        b for (m, b), e in by.items() if m == "shear" and e < by[("antithetic", b)])
    assert (tmp_path / "explain.png").exists()


def test_kernel_benchmark_writes_json(tmp_path):
    from lowbit.bench import kernels as kernel_bench

    res = kernel_bench.run(quick=True, out=tmp_path, log=lambda *a: None)
    data = json.loads((tmp_path / "kernels.json").read_text())
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"square", "resnet-gemm", "conv", "end-to-end"}
    assert all(r["float_ms"] > 0 and r["binary_ms"] > 0 for r in data["rows"])
    assert res["model_size"]["compression"] > 20
    assert res["export_max_abs_diff_vs_fake_quant"] < 1e-4
    assert res["export_top1_agreement"] > 0.9  # BatchNorm folded: rounding may flip a near-tie, rarely
    assert sum(r["kind"] == "end-to-end" for r in data["rows"]) == 4  # 2 batches x 2 float baselines
    assert (tmp_path / "kernels.png").exists()
    if data["int_export"]:  # with the hf extra: both models, both configs, exported == fake-quantized
        assert {(r["model"].split()[0], r["config"]) for r in data["int_export"]} == {
            (m, c) for m in ("resnet18", "bert") for c in ("W8A8", "W4A8")}
        # float summation order may move an activation across a rounding boundary: one 8-bit step at most
        assert all(r["max_abs_diff_vs_fake_quant"] <= 1e-2 * max(1.0, r["output_max_abs"]) for r in data["int_export"])
    assert data["weight_only"]["kernel_rows"] and "weight-only kernels" in (tmp_path / "kernels.md").read_text()


@pytest.mark.slow  # long end-to-end run: CI's `pytest -m slow` line
def test_ptq_benchmark_writes_json_table_and_plot(tmp_path):
    from lowbit.bench import ptq as ptq_bench

    res = ptq_bench.run(models=("resnet",), quick=True, out=tmp_path, configs=[(8, 8), (2, 2)], budgets=(3.0,),
                        progress=False, log=lambda *a: None)
    data = json.loads((tmp_path / "ptq.json").read_text())["models"]["resnet"]
    assert {(r["w_bits"], r["a_bits"], r["method"]) for r in data["rows"]} == \
        {(w, a, m) for w, a in ((8, 8), (2, 2)) for m in ("rtn", "adaround", "aquant")}
    kinds = {(r["allocation"], r["sensitivity"], r["method"]) for r in data["mixed"]}
    assert kinds == {(k, s, m) for k, s in (("mixed", "hessian"), ("mixed", "kl"), ("random", ""), ("uniform", ""))
                     for m in ("rtn", "adaround")}
    assert all(r["average_bits"] <= 3.0 + 1e-9 for r in data["mixed"])
    uniform = [r for r in data["mixed"] if r["allocation"] == "uniform"][0]
    for how in ("hessian", "kl"):  # each allocation is optimal for its own objective
        mixed = [r for r in data["mixed"] if r["allocation"] == "mixed" and r["sensitivity"] == how][0]
        assert mixed["sum_sensitivity"][how] <= uniform["sum_sensitivity"][how] + 1e-12
    assert "w8a8_ok" in res["models"]["resnet"]["checks"]
    assert (tmp_path / "ptq.png").exists() and "| W8A8 |" in (tmp_path / "ptq.md").read_text()
    mixed_only = {**res, "models": {"resnet": {**data, "rows": []}}}  # `--parts mixed`: no methods table
    ptq_bench.plot(mixed_only, tmp_path / "mixed.png")
    assert "| W8A8 |" not in ptq_bench.table_markdown(mixed_only) and (tmp_path / "mixed.png").exists()
    # results of older runs kept HAWQ's summed sensitivity (a number) where the name now is
    old = [{**r, "sensitivity": 0.5} for r in data["mixed"] if r["sensitivity"] in ("hessian", "")]
    old_md = ptq_bench.table_markdown({**res, "models": {"resnet": {**data, "rows": [], "mixed": old}}})
    assert "mixed (hessian)" in old_md and "(0.5)" not in old_md


def test_random_allocation_stays_within_budget():
    from lowbit.bench.ptq import random_allocation

    sizes = {"a": 100, "b": 1000, "c": 50, "d": 400}
    for seed in range(20):
        plan = random_allocation(sizes, (2, 3, 4, 8), 3.0, seed=seed)
        used = sum(sizes[n] * b for n, b in plan.items()) / sum(sizes.values())
        assert used <= 3.0 and set(plan.values()) <= {2, 3, 4, 8}


@pytest.mark.slow  # long end-to-end run: CI's `pytest -m slow` line
def test_onceqat_benchmark_writes_json_table_and_plot(tmp_path):
    from lowbit.bench import onceqat

    res = onceqat.run(widths=(8, 4, 2), quick=True, out=tmp_path, progress=False, log=lambda *a: None)
    data = json.loads((tmp_path / "onceqat.json").read_text())
    assert [r["bits"] for r in data["rows"]] == [8, 4, 2]
    assert all(r["once_accuracy"] > 10 and r["dedicated_accuracy"] > 10 for r in data["rows"])
    # one 8-bit store against one model per width: 8 + 4 + 2 bits of weights, so more than 1.5x
    assert res["storage_ratio"] > 1.5 and data["rows"][2]["dedicated_bytes"] < data["rows"][0]["dedicated_bytes"]
    assert (tmp_path / "onceqat.png").exists() and "once-QAT acc" in (tmp_path / "onceqat.md").read_text()


def test_smartdeal_benchmark_writes_json_table_and_plot(tmp_path):
    from lowbit.bench import smartdeal

    res = smartdeal.run(quick=True, out=tmp_path, progress=False, log=lambda *a: None)
    rows = {r["label"]: r for r in json.loads((tmp_path / "smartdeal.json").read_text())["rows"]}
    assert set(rows) == {"float32", "pruning", "int8", "smartdeal", "smartdeal (from scratch)"}
    sd = rows["smartdeal"]
    assert sd["ce_on_grid"] and rows["smartdeal (from scratch)"]["ce_on_grid"]
    assert sd["storage_reduction"] > 8 and sd["shift_add"] > 0 and sd["weights_fetched"] < rows["float32"]["weights_fetched"]
    assert rows["int8"]["storage_reduction"] > 3.5 and rows["pruning"]["fp32_mac"] < rows["float32"]["fp32_mac"]
    assert all(r["accuracy"] > 10 for r in rows.values()) and "Horowitz" in res["energy_source"]
    assert (tmp_path / "smartdeal.png").exists() and "shift-adds" in (tmp_path / "smartdeal.md").read_text()
