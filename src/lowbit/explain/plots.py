"""Waterfall plots of a :class:`ShapleyResult`, one per explained row (matplotlib only; shap's own
plots take ``result.to_shap()``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lowbit.explain.result import ShapleyResult

POSITIVE, NEGATIVE = "#ff0051", "#008bfb"  # the colours shap uses for pushing up / down


def _row(t, row: int, batched: bool) -> np.ndarray:
    a = np.asarray(t.detach().cpu().double() if hasattr(t, "detach") else t, dtype=np.float64)
    return a[row] if batched else a


def waterfall(result: ShapleyResult, row: int = 0, max_display: int = 10, data=None, title: str | None = None):
    """One row's explanation as a waterfall: from E[f] (the base value) to f(x), one bar per
    player (largest |phi| on top), the ``max_display - 1``-th and smaller ones summed into one
    bar. ``data``: rows to print beside the names instead of the explained ones (same shape as
    ``result.data``, e.g. un-standardised). Returns a matplotlib ``Figure`` (made without pyplot)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: draws headless whatever the backend
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'lowbit[plot]'") from None
    batched = result.values.dim() == 2
    n_rows = result.values.shape[0] if batched else 1
    if not 0 <= row < n_rows:
        raise IndexError(f"row {row} is out of range: the result explains {n_rows} row(s)")
    if max_display < 2:
        raise ValueError(f"max_display must be >= 2, got {max_display}")
    phi = _row(result.values, row, batched)
    base = float(_row(result.base_value, row, batched))
    names = list(result.feature_names or [f"feature {i}" for i in range(len(phi))])
    num, shown = result.player_data(data)
    labels = names
    if num is not None:
        vals = shown[row] if (shown is not None and batched) else shown
        if vals is None:
            vals = [f"{v:.4g}" for v in (num[row] if batched else num)]
        labels = [f"{v} = {n}" for v, n in zip(vals, names)]
    order = np.argsort(-np.abs(phi), kind="stable")
    keep = order if len(order) <= max_display else order[: max_display - 1]
    bars = [(labels[i], float(phi[i])) for i in keep]
    if len(order) > len(keep):
        rest = order[len(keep):]
        bars.append((f"{len(rest)} other features", float(phi[rest].sum())))
    fig = Figure(figsize=(8, 0.45 * len(bars) + 1.6))
    ax = fig.add_subplot()
    start = base + sum(v for _, v in bars)  # f(x) at the top, walking down to E[f]
    left = base
    span = max(abs(v) for _, v in bars) or 1.0
    for k, (label, v) in enumerate(reversed(bars)):  # bottom bar first, starting at E[f]
        ax.barh(k, v, left=left, color=POSITIVE if v >= 0 else NEGATIVE, height=0.7)
        # the number right of the bar's right end, where its row is empty
        ax.text(max(left, left + v) + 0.01 * span, k, f"{v:+.3g}", va="center", ha="left", fontsize=8)
        left += v
    ax.margins(x=0.12)
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([label for label, _ in reversed(bars)], fontsize=9)
    ax.axvline(base, color="#888", lw=0.8, ls="--")
    ax.axvline(start, color="#333", lw=0.8, ls="--")
    ax.set_xlabel(f"model output: E[f(X)] = {base:.4g} -> f(x) = {start:.4g}")
    ax.set_title(title or f"row {row}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def save_waterfalls(result: ShapleyResult, folder: str | Path, prefix: str = "waterfall", max_display: int = 10,
                    data=None, titles: list[str] | None = None, dpi: int = 110) -> list[Path]:
    """``folder/{prefix}-{row}.png``, one waterfall per explained row; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_rows = result.values.shape[0] if result.values.dim() == 2 else 1
    if titles is not None and len(titles) != n_rows:
        raise ValueError(f"titles has {len(titles)} entries for {n_rows} rows")
    paths = []
    for row in range(n_rows):
        fig = waterfall(result, row, max_display, data, titles[row] if titles else None)
        path = folder / f"{prefix}-{row}.png"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


__all__ = ["waterfall", "save_waterfalls"]
