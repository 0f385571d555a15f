"""Shared helpers for benchmarks: JSON output, markdown tables, optional plots, data. The models,
compressors and corpus they share come from the core (lowbit.models, lowbit.train)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


from lowbit.table import markdown_table  # noqa: F401  (re-exported for the benchmarks)
from lowbit.data import DatasetNotFound, load_images
from lowbit.models import reference_model  # noqa: F401  (re-exported for the benchmarks)
from lowbit.train import fortunes_corpus, make_compressor  # noqa: F401  (re-exported for the benchmarks)

METHODS: list[tuple[str, float | None]] = [("none", None), ("uniform", 8), ("uniform", 4), ("uniform", 2), ("gact", 2)]
# `lowbit bench act --all`: every method, plus torch.utils.checkpoint, the baseline users have today
ALL_METHODS: list[tuple[str, float | None]] = [("none", None), ("checkpoint", None), ("uniform", 8), ("uniform", 4),
                                               ("uniform", 2), ("gact", 2), ("division", 2), ("comet", None), ("mesa", None)]


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


def eprint(*a) -> None:
    print(*a, file=sys.stderr)
