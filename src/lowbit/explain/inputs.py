"""What ``shapley`` accepts as rows and players: torch tensors, numpy arrays, pandas DataFrames
(or one row as a Series); groups as index lists, column-name lists or a {name: columns} dict."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch

from lowbit.explain.value import check_groups


def _is_frame(t) -> bool:
    return hasattr(t, "columns") and hasattr(t, "to_numpy")


def as_rows(name: str, t, columns: list[str] | None = None) -> tuple[torch.Tensor, list[str] | None]:
    """``t`` as a floating tensor and its column names (a DataFrame's, a Series' index, else None).
    DataFrames and numpy arrays become float64 (integer and bool columns included); a tensor keeps
    its dtype and must be floating. ``columns``: reorder a DataFrame to these names (the baseline
    to x's columns)."""
    names = None
    if _is_frame(t):
        if columns is not None:
            missing = [c for c in columns if c not in t.columns]
            if missing or len(t.columns) != len(columns):
                raise ValueError(f"{name}'s columns {list(t.columns)} are not x's columns {columns}")
            t = t[columns]
        bad = [str(c) for c, dt in t.dtypes.items() if dt.kind not in "fiub"]
        if bad:
            raise TypeError(f"{name} has non-numeric columns {bad}: one-hot encode them (e.g. pandas.get_dummies) "
                            "and pass groups= so each block is one player")
        names = [str(c) for c in t.columns]
        t = t.to_numpy(dtype=np.float64)
    elif hasattr(t, "index") and hasattr(t, "to_numpy") and getattr(t, "ndim", 0) == 1:  # a Series: one row
        names = [str(c) for c in t.index]
        t = t.to_numpy(dtype=np.float64)
    if isinstance(t, np.ndarray):
        if t.dtype.kind not in "fiub":
            raise TypeError(f"{name} must hold numbers, got a numpy array of {t.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float64 if t.dtype.kind != "f" else t.dtype))
    elif not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {list(t.shape)})")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t, names


def players(groups, feature_names: Sequence[str] | None, n_features: int) -> tuple[list[list[int]], list[str] | None]:
    """(columns of each player, player names or None).

    groups: None (one player per column), index lists, lists of column names, or a dict
    {player name: index or name list}. Names of list groups come from their columns: a single
    column's own name; a one-hot block's common prefix before "=" or "_" (``housing=own``,
    ``housing=rent`` -> ``housing``), else the names joined with "+"."""
    names = list(feature_names) if feature_names is not None else None
    if names is not None and len(names) != n_features:
        raise ValueError(f"feature_names has {len(names)} names for {n_features} features")
    given = None
    if isinstance(groups, Mapping):
        given = [str(k) for k in groups]
        groups = list(groups.values())
    if groups is not None:
        groups = [[_column(c, names) for c in ([g] if isinstance(g, (int, str)) else g)] for g in groups]
    out = check_groups(groups, n_features)
    if given is not None:
        return out, given
    if names is None:
        return out, None
    return out, [_group_name([names[i] for i in g]) for g in out]


def _column(c, names: list[str] | None) -> int:
    if isinstance(c, str):
        if names is None:
            raise ValueError(f"groups name the column {c!r} but x has no column names (pass a DataFrame or feature_names=)")
        if c not in names:
            raise ValueError(f"groups name the column {c!r}, which is not one of x's columns {names}")
        return names.index(c)
    return int(c)


def _group_name(cols: list[str]) -> str:
    if len(cols) == 1:
        return cols[0]
    common = os.path.commonprefix(cols)
    for sep in ("=", "_"):  # "housing=own" (lowbit's tabular sets), "housing_own" (pandas.get_dummies)
        cut = common.rfind(sep)
        if cut > 0:
            return common[:cut]
    return "+".join(cols)


__all__ = ["as_rows", "players"]
