"""Shared helpers for benchmarks: JSON output, markdown tables, optional plots, data and models."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lowbit.table import markdown_table  # noqa: F401  (re-exported for the benchmarks)
from lowbit.data import CharCorpus, DatasetNotFound, load_fortunes, load_images
from lowbit.models import build_model

METHODS: list[tuple[str, float | None]] = [("none", None), ("uniform", 8), ("uniform", 4), ("uniform", 2), ("gact", 2)]
# `lowbit bench act --all`: every method, plus torch.utils.checkpoint, the baseline users have today
ALL_METHODS: list[tuple[str, float | None]] = [("none", None), ("checkpoint", None), ("uniform", 8), ("uniform", 4),
                                               ("uniform", 2), ("gact", 2), ("division", 2), ("comet", None), ("mesa", None)]


def make_compressor(method: str, bits: float | None, model: torch.nn.Module, seed: int = 0):
    """The ActivationCompressor for a benchmark row.

    ``"checkpoint"`` wraps every repeated block of the model in torch.utils.checkpoint (in place)
    and accounts the rest like ``"none"``; ``"checkpoint+<method>"`` (e.g. ``checkpoint+uniform``
    with ``bits=2``) checkpoints every second block and compresses what the rest saves with
    ``<method>``."""
    from lowbit.act import ActivationCompressor, checkpoint_blocks

    if method == "checkpoint":
        checkpoint_blocks(model)
        return ActivationCompressor("none", model=model, seed=seed)
    if method.startswith("checkpoint+"):
        checkpoint_blocks(model, every=2)
        method = method.split("+", 1)[1]
    if bits is not None and method in ("uniform", "division"):
        bits = int(bits)
    return ActivationCompressor(method, bits=bits, model=model, seed=seed)


def method_label(method: str, bits: float | None) -> str:
    return method if bits is None else f"{method}-{bits:g}"


def write_json(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float))
    return path


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401

        return True
    except ImportError:
        return False


def save_results(results: dict, out: str | Path, name: str, table, plot, log=print) -> str:
    """Write ``out/name.json``, the markdown table ``table(results)`` as ``out/name.md`` and, when
    matplotlib is installed, ``plot(results, out/name.png)``; log the table and return it."""
    out = Path(out)
    write_json(results, out / f"{name}.json")
    text = table(results)
    (out / f"{name}.md").write_text(text + "\n")
    if have_matplotlib():
        plot(results, out / f"{name}.png")
    log(text)
    return text


def image_data(name: str = "fashion-mnist", limit: int | None = None, test_limit: int | None = None, notice=print):
    """(train, test, name actually used): Fashion-MNIST, or digits with a notice when it is missing."""
    try:
        return load_images(name, "train", limit), load_images(name, "test", test_limit), name
    except DatasetNotFound as e:
        if name != "fashion-mnist":
            raise
        notice(f"notice: {e}\nnotice: falling back to scikit-learn digits (8x8)")
        return load_images("digits", "train", limit), load_images("digits", "test", test_limit), "digits"


def bench_images(cfg: dict, quick: bool, notice=print):
    """A benchmark's images: digits when ``quick`` (smoke test), else Fashion-MNIST; both limited
    by cfg["limit"] / cfg["test_limit"]. Returns (train, test, name actually used)."""
    name = "digits" if quick else "fashion-mnist"
    return image_data(name, limit=cfg.get("limit"), test_limit=cfg.get("test_limit"), notice=notice)


def fortunes_corpus() -> CharCorpus:
    return CharCorpus(load_fortunes())


def reference_model(name: str, image_size: int = 28, vocab_size: int = 128, seed: int = 0) -> torch.nn.Module:
    """The benchmark models with the same seeded initialisation for every method."""
    torch.manual_seed(seed)
    if name == "vit":
        return build_model("vit", image_size=image_size, patch=7 if image_size % 7 == 0 else 4)
    if name == "gpt":
        return build_model("gpt", vocab_size=vocab_size)
    if name == "mlp":
        return build_model("mlp", in_features=image_size * image_size)
    return build_model(name)


def eprint(*a) -> None:
    print(*a, file=sys.stderr)
