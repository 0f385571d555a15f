import json

import pytest

from lowbit.bench import act as act_bench
from lowbit.bench.memory import measure_held_memory
from lowbit.cli import main


def test_train_command_runs_and_prints_table(capsys):
    assert main(["train", "--data", "digits", "--epochs", "1", "--limit", "256", "--batch-size", "64", "--method", "gact"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "compression ratio" in out and "median step time" in out


def test_train_rejects_unsupported_bits():
    with pytest.raises(SystemExit):
        main(["train", "--method", "uniform", "--bits", "3"])


def test_held_memory_measured_end_to_end():
    """RSS of a child process: 2-bit activations hold several times less than plain autograd."""
    none = measure_held_memory("resnet", "none", None, 64, repeats=1)
    two = measure_held_memory("resnet", "uniform", 2, 64, repeats=1)
    assert none["held_bytes"] > 0.8 * none["lowbit_raw_bytes"]  # RSS sees what autograd holds
    assert none["held_bytes"] / max(two["held_bytes"], 1) > 5


def test_act_benchmark_writes_json_table_and_plot(tmp_path):
    res = act_bench.run(models=("resnet",), methods=[("none", None), ("uniform", 4)], quick=True,
                        out=tmp_path, progress=False, log=lambda *a: None)
    data = json.loads((tmp_path / "act.json").read_text())
    assert [r["label"] for r in data["rows"]] == ["none", "uniform-4"]
    row = data["rows"][1]
    assert row["memory_ratio"] > 3 and row["grad_cosine"] > 0.97
    assert (tmp_path / "act.md").read_text().startswith("| model")
    assert (tmp_path / "act.png").exists()
    assert res["rows"][0]["metric_delta"] == 0
