"""The `lowbit` command as a user meets it: the real entry point, run in a subprocess.

Bad input ends in one `lowbit <command>: error: ...` line and exit status 2, before any work;
--help does not import torch and shows defaults; checkpoints load with weights_only=True."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.argtypes import HelpFormatter
from lowbit.checkpoints import CheckpointError, load_checkpoint, load_state_dict_file

SCRIPT = Path(sys.executable).parent / "lowbit"  # the console script pip installed (lowbit.cli:main)
LOWBIT = [sys.executable, str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "lowbit.cli"]


def lowbit(*args: str, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*LOWBIT, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


class Pickled:
    """Not a tensor: a checkpoint holding one must be refused."""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("ckpt")
    (d / "corrupt.pt").write_bytes(b"this is not a checkpoint" * 8)
    torch.save({"w": torch.ones(2), "obj": Pickled()}, d / "pickled.pt")
    (d / "empty_dir").mkdir()
    return {"corrupt": str(d / "corrupt.pt"), "pickled": str(d / "pickled.pt"), "empty_dir": str(d / "empty_dir")}


# (argv, extra environment, text the one error line must contain). Each must exit 2 with one line
# on stderr, no traceback, and nothing on stdout (no work started).
BAD_INPUT = {
    "train-epochs-0": (["train", "--epochs", "0"], {}, "--epochs: must be a positive integer, got 0"),
    "train-epochs-neg": (["train", "--epochs", "-1"], {}, "--epochs: must be a positive integer, got -1"),
    "train-limit-0": (["train", "--limit", "0"], {}, "--limit: must be a positive integer"),
    "train-batch-0": (["train", "--batch-size", "0"], {}, "--batch-size: must be a positive integer"),
    "train-bits-0": (["train", "--bits", "0"], {}, "--bits: must be a positive number"),
    "train-bits-text": (["train", "--bits", "two"], {}, "--bits: expected a positive number, got 'two'"),
    "train-uniform-3": (["train", "--method", "uniform", "--bits", "3"], {}, "--bits 3 is not supported by uniform"),
    "train-bad-env": (["train"], {"LOWBIT_FASHION_MNIST": "/no/such/folder"},
                      "LOWBIT_FASHION_MNIST=/no/such/folder holds no Fashion-MNIST"),
    "quantize-missing": (["quantize", "--init", "missing.pt"], {}, "--init: no such file: missing.pt"),
    "quantize-corrupt": (["quantize", "--init", "{corrupt}"], {}, "not a PyTorch checkpoint"),
    "quantize-pickled": (["quantize", "--data", "digits", "--init", "{pickled}"], {},
                         "refused to load: it holds a pickled Python object"),
    "quantize-recipe": (["quantize", "--recipe", "nope"], {}, "unknown recipe 'nope': choose one of float, "),
    "ptq-corrupt": (["ptq", "--init", "{corrupt}"], {}, "not a PyTorch checkpoint"),
    "ptq-widths": (["ptq", "--average-bits", "3", "--widths", "2,x"], {}, "--widths: expected comma-separated"),
    "ptq-method": (["ptq", "--method", "rtn,best"], {}, "--method: expected some of rtn, adaround, aquant"),
    "dist-stages-0": (["dist-train", "--stages", "0"], {}, "--stages: must be a positive integer"),
    "dist-resume-typo": (["dist-train", "--resume", "--checkpoint-dir", "{empty_dir}"], {},
                         "--resume: {empty_dir} lacks rank0.pt, rank1.pt"),
    "dist-resume-nodir": (["dist-train", "--resume"], {}, "--resume needs --checkpoint-dir"),
    "dist-bits": (["dist-train", "--bits", "3"], {}, "--bits: must be one of 1, 2, 4, 8"),
    "dist-bandwidth": (["dist-train", "--bandwidth", "fast"], {}, "cannot read bandwidth 'fast'"),
    "explain-rows": (["explain", "--rows", "-2"], {}, "--rows: must be a positive integer, got -2"),
    "explain-target": (["explain", "--target", "7"], {}, "--target 7: wine has 3 classes"),
    "bench-methods": (["bench", "act", "--methods", "uniform-3"], {}, "uniform takes 1, 2, 4 or 8 bits"),
    "bench-instances": (["bench", "explain", "--instances", "0"], {}, "--instances: must be a positive integer"),
}


@pytest.fixture(scope="module")
def bad_input_runs(files) -> dict[str, tuple[int, str, str]]:
    """Every bad-input case, four at a time (those checked after importing torch take seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        argv, env, _ = item
        r = lowbit(*[a.format(**files) for a in argv], env=env)
        return r.returncode, r.stdout, r.stderr

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(BAD_INPUT, pool.map(one, BAD_INPUT.values())))


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_before_any_work(case, bad_input_runs, files):
    rc, stdout, stderr = bad_input_runs[case]
    argv, _, expected = BAD_INPUT[case]
    command = " ".join(a for a in argv[:2] if not a.startswith("-")) if argv[0] == "bench" else argv[0]
    lines = stderr.strip().splitlines()
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"lowbit {command}: error: "), lines[0]
    assert expected.format(**files) in lines[0], lines[0]
    assert stdout == "", stdout  # nothing ran: no header, no progress


def test_help_does_not_import_torch_and_every_option_shows_its_default():
    code = ("import sys\nfrom lowbit.cli import build_parser, COMMANDS\n"
            "for argv in [['--help']] + [[c, '--help'] for c in ('train', 'quantize', 'ptq', 'explain', 'dist-train',"
            " 'bench')] + [['bench', b, '--help'] for b in ('act', 'quant', 'ptq', 'explain', 'codec', 'acsgd')]:\n"
            "    try:\n        build_parser().parse_args(argv)\n    except SystemExit:\n        pass\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'sklearn', 'lowbit.act', 'lowbit.quant') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout[-300:]
    assert "usage: lowbit train" in r.stdout and "(default: 128)" in r.stdout
    # the installed entry point itself: `lowbit --help` imports no torch (python -X importtime lists every import)
    r = subprocess.run([sys.executable, "-X", "importtime", *LOWBIT[1:], "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage: lowbit" in r.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line]
    assert "lowbit.cli" in imported and not any(m == "torch" or m.startswith("torch.") for m in imported)

    from lowbit.cli import build_parser

    def parsers(p: argparse.ArgumentParser):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)

    missing = []
    for p in parsers(build_parser()):
        fmt = HelpFormatter(p.prog)
        for a in p._actions:
            shown = a.default is not None and a.default is not False and a.default != argparse.SUPPRESS
            if a.option_strings and shown and "default" not in fmt._get_help_string(a):
                missing.append(f"{p.prog} {a.option_strings[0]}")
    assert not missing, missing


def test_python_m_lowbit_distributed_checks_its_options_without_the_cli():
    """What torchrun starts: the same options as `lowbit dist-train`, parsed without lowbit.cli."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "lowbit.distributed", "--stages", "0"],
                       capture_output=True, text=True, timeout=120)
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line]
    errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    assert r.returncode == 2 and errors == [
        "python -m lowbit.distributed: error: argument --stages: must be a positive integer, got 0 "
        "(see `python -m lowbit.distributed --help`)"], r.stderr[-500:]
    assert "lowbit.distributed.command" in imported
    assert not any(m.startswith("lowbit.cli") or m == "torch" for m in imported)


def test_recipe_names_in_the_help_are_real_recipes():
    from lowbit.cli.quantize import RECIPE_EXAMPLES
    from lowbit.quant import RECIPES

    assert set(RECIPE_EXAMPLES) <= set(RECIPES)


def test_checkpoints_load_tensors_only(tmp_path):
    good = {"w": torch.randn(3), "n": 1, "t": (1, 2), "s": "x", "none": None, "l": [{"k": 1.5}]}
    torch.save(good, tmp_path / "good.pt")
    back = load_checkpoint(tmp_path / "good.pt")
    assert torch.equal(back["w"], good["w"]) and back["t"] == (1, 2) and back["l"] == [{"k": 1.5}]
    torch.save({"w": torch.ones(1), "obj": Pickled()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"refused to load: it holds a pickled Python object \(.*Pickled\)"):
        load_checkpoint(tmp_path / "pickled.pt")
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state_dict"):
        torch.save([torch.ones(1)], tmp_path / "list.pt")
        load_state_dict_file(tmp_path / "list.pt")


def test_a_state_dict_of_another_model_is_a_usage_error(tmp_path):
    from lowbit.argtypes import UsageError
    from lowbit.cli._common import fit_state_dict, load_state_dict_arg

    torch.save({"w": torch.ones(2)}, tmp_path / "other.pt")
    state = load_state_dict_arg(str(tmp_path / "other.pt"), "--init")
    with pytest.raises(UsageError, match=r"--init .*other.pt does not fit this model .*Missing key"):
        fit_state_dict(torch.nn.Linear(2, 2), state, "--init", str(tmp_path / "other.pt"))
    torch.save({"w": torch.ones(1), "obj": Pickled()}, tmp_path / "pickled.pt")
    with pytest.raises(UsageError, match="^--init .*pickled.pt: refused to load"):
        load_state_dict_arg(str(tmp_path / "pickled.pt"), "--init")


def test_train_says_steps_and_time_first_and_explains_a_low_ratio():
    """--quick caps the run at 100 steps; the header comes before training; batches of 4 8x8 digits
    (and the epoch's partial last batch of 2: 198 = 49 x 4 + 2) leave much of the saved bytes in
    tensors too small to compress, and it says so."""
    r = lowbit("train", "--data", "digits", "--method", "uniform", "--bits", "2", "--limit", "198",
               "--batch-size", "4", "--epochs", "3", "--quick", "--threads", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    header = out.index("100 steps (3 epoch(s) of 198 images, batch 4, capped): expected about ")
    assert header < out.index("| accuracy |")
    assert "activation memory raw (MiB, last step: batch of 2)" in out
    assert "note: the compression ratio is only" in out and "under 16384 elements" in out
    assert "partial batch of 2" in out
    assert "train:" in r.stderr  # the progress bar


@pytest.mark.slow  # long end-to-end run: CI's `pytest -m slow` line
def test_quantize_trains_saves_exports_and_fine_tunes(tmp_path):
    path, packed, float_path = tmp_path / "q.pt", tmp_path / "packed.pt", tmp_path / "float.pt"
    r = lowbit("quantize", "--recipe", "sbnn", "--data", "digits", "--limit", "256", "--batch-size", "64",
               "--option", "sparsity=0.9", "--save", str(path), "-v", "--export", str(packed))
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and "compression" in r.stdout and "sparsity=0.9" in r.stdout
    assert "exported the packed model" in r.stdout and packed.exists()
    from lowbit import quant
    from lowbit.bench.common import reference_model

    q = quant.quantize(reference_model("resnet", image_size=8), "sbnn", sparsity=0.9)
    q.load_state_dict(load_state_dict_file(path))  # what lowbit saves loads with weights_only=True
    quant.export(q).load_state_dict(load_state_dict_file(packed))
    assert lowbit("quantize", "--recipe", "float", "--data", "digits", "--limit", "256",
                  "--save", str(float_path)).returncode == 0
    r = lowbit("quantize", "--recipe", "dirnet", "--data", "digits", "--limit", "256", "--init", str(float_path))
    assert r.returncode == 0, r.stderr
    assert "fine-tuning from the float checkpoint" in r.stdout  # fine-tunes from it and distils from it


@pytest.fixture(scope="module")
def float_digits(tmp_path_factory) -> str:
    """A float ResNet trained on 400 digits, saved as a state_dict."""
    path = tmp_path_factory.mktemp("float") / "float.pt"
    r = lowbit("quantize", "--recipe", "float", "--data", "digits", "--limit", "400", "--save", str(path))
    assert r.returncode == 0, r.stderr
    return str(path)


@pytest.mark.slow  # long end-to-end run: CI's `pytest -m slow` line
def test_ptq_command_uniform_and_mixed_precision(float_digits):
    r = lowbit("ptq", "--data", "digits", "--limit", "400", "--init", float_digits, "--w-bits", "4", "--a-bits", "8",
               "--calib", "64", "--method", "rtn")
    assert r.returncode == 0, r.stderr
    assert "| rtn | 4 | 8 |" in r.stdout and "float32" in r.stdout
    r = lowbit("ptq", "--data", "digits", "--limit", "400", "--init", float_digits, "--average-bits", "3",
               "--widths", "2,4", "--a-bits", "8", "--calib", "64", "--method", "rtn")
    assert r.returncode == 0, r.stderr
    assert "kl allocation at 3.0 average bits" in r.stdout and "| rtn | mixed " in r.stdout
    import ast

    plan = r.stdout.split("average bits: ")[1].split("\n")[0]
    assert set(ast.literal_eval(plan).values()) <= {2, 4}


@pytest.mark.slow
def test_ptq_shows_progress_while_calibrating(float_digits):
    r = lowbit("ptq", "--data", "digits", "--limit", "400", "--init", float_digits, "--a-bits", "8", "--calib", "64",
               "--method", "adaround", timeout=1200)
    assert r.returncode == 0, r.stderr
    assert "| adaround | 4 | 8 |" in r.stdout
    assert "ptq adaround" in r.stderr and "adaround: done in" in r.stdout  # the bar over its units, then the time


def test_explain_command():
    r = lowbit("explain", "--rows", "1", "--budget", "8")
    assert r.returncode == 0, r.stderr
    assert "exact φ" in r.stdout and "shear" in r.stdout and "kernel" in r.stdout


def test_dist_train_reports_the_warm_up_apart(tmp_path):
    """4 steps of an 8-step epoch never leave the fp32 warm-up: no "fewer bytes" claim, a note why."""
    r = lowbit("dist-train", "--steps", "2", "--examples", "64", "--batch-size", "8", "--micro-batches", "2",
               "--block", "16", "--timeout", "60", "--out", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "steps (fp32 warm-up + after it) | 2 (2 + 0)" in out
    assert "bytes / step, fp32 warm-up: forward" in out and "after warm-up: forward" not in out
    assert "none yet: every step was warm-up" in out and "x fewer" not in out
    assert "note: all 2 steps were in the fp32 warm-up" in out
