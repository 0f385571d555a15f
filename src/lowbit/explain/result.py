"""``ShapleyResult``: Shapley values with what is needed to show them (base value, the explained
rows, player names) and their conversion to a ``shap.Explanation``."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ShapleyResult:
    values: torch.Tensor  # [P] or [B, P]: one per player (feature, or group of features)
    base_value: torch.Tensor  # v(empty): mean model output over the baseline rows, [] or [B]
    full_value: torch.Tensor  # v(all) = f(x), [] or [B]
    evaluations: list[int] = field(default_factory=list)  # coalitions evaluated per instance
    seconds: list[float] = field(default_factory=list)  # wall time per instance
    data: torch.Tensor | None = None  # the explained rows, feature level: [M] or [B, M]
    feature_names: list[str] | None = None  # one per player (group names when groups are given)
    column_names: list[str] | None = None  # one per feature (column of x)
    groups: list[list[int]] | None = None  # columns of each player
    interactions: list[str] = field(default_factory=list)  # SHEAR: how each instance's cooperators were ranked
    saturated: list[int] = field(default_factory=list)  # SHEAR: instances whose output was saturated

    def player_data(self, data=None) -> tuple[np.ndarray, np.ndarray | None]:
        """(numeric [.., P], display strings [.., P] or None) for the players: a feature's value,
        or for a multi-column group (a one-hot block) the position of its largest column, shown
        as that column's name without the group prefix (``housing=own`` -> ``own``). ``data``:
        the rows to show instead of ``self.data`` (same shape; e.g. un-standardised values)."""
        d = self.data if data is None else data
        if d is None:
            return None, None
        d = np.asarray(d.detach().cpu() if isinstance(d, torch.Tensor) else d, dtype=np.float64)
        if self.data is not None and d.shape != tuple(self.data.shape):
            raise ValueError(f"data has shape {list(d.shape)}, the explained rows {list(self.data.shape)}")
        groups = self.groups or [[i] for i in range(d.shape[-1])]
        if all(len(g) == 1 for g in groups):
            return d[..., [g[0] for g in groups]], None
        rows = d.reshape(-1, d.shape[-1])
        num = np.zeros((rows.shape[0], len(groups)))
        shown = np.empty((rows.shape[0], len(groups)), dtype=object)
        for p, g in enumerate(groups):
            if len(g) == 1:
                num[:, p] = rows[:, g[0]]
                shown[:, p] = [f"{v:.4g}" for v in rows[:, g[0]]]
                continue
            active = rows[:, g].argmax(1)
            num[:, p] = active
            shown[:, p] = [self._level(p, g[a]) for a in active]
        shape = d.shape[:-1] + (len(groups),)
        return num.reshape(shape), shown.reshape(shape)

    def _level(self, player: int, column: int) -> str:
        if not self.column_names:
            return f"column {column}"
        name = self.column_names[column]
        group = self.feature_names[player] if self.feature_names else None
        for sep in ("=", "_"):
            if group and name.startswith(group + sep):
                return name[len(group) + 1 :]
        return name

    def to_shap(self, data=None):
        """The result as a ``shap.Explanation`` (values, base_values, data, feature_names; for
        one-hot groups also display_data with the active level), so ``shap.plots.waterfall``
        (one row: ``exp[i]``), ``beeswarm`` and ``bar`` draw it unchanged. ``data``: rows to show
        instead of the explained ones (e.g. un-standardised), feature level, same shape."""
        try:
            import shap
        except ImportError:
            raise ImportError("to_shap() needs the shap library: pip install 'lowbit[compare]' (or pip install shap)") from None
        num, shown = self.player_data(data)
        values = self.values.detach().cpu().double().numpy()
        base = self.base_value.detach().cpu().double().numpy()
        base = float(base) if base.ndim == 0 else base
        names = list(self.feature_names) if self.feature_names else [f"feature {i}" for i in range(values.shape[-1])]
        return shap.Explanation(values, base_values=base, data=num, display_data=shown, feature_names=names)


__all__ = ["ShapleyResult"]
