"""Small tabular data sets bundled with scikit-learn, standardised, with a fixed train/test split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TABULAR = ("wine", "breast_cancer")


@dataclass
class Tabular:
    x_train: torch.Tensor  # float32 [N, M], standardised with the train split's mean and std
    y_train: torch.Tensor  # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]
    class_names: list[str]


def load_tabular(name: str = "wine", test_fraction: float = 0.25, seed: int = 0) -> Tabular:
    """scikit-learn's ``load_wine`` (178 x 13, 3 classes) or ``load_breast_cancer`` (569 x 30, 2)."""
    from sklearn import datasets

    if name not in TABULAR:
        raise ValueError(f"unknown tabular data set {name!r}: choose one of {TABULAR}")
    d = getattr(datasets, f"load_{name}")()
    order = np.random.default_rng(seed).permutation(len(d.data))
    cut = int(len(order) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    mean, std = d.data[tr].mean(0), d.data[tr].std(0) + 1e-12
    x = torch.from_numpy(((d.data - mean) / std).astype(np.float32))
    y = torch.from_numpy(d.target.astype(np.int64))
    return Tabular(x[tr], y[tr], x[te], y[te], list(d.feature_names), [str(c) for c in d.target_names])
