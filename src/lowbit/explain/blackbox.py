"""Models that take and return arrays (scikit-learn's ``predict_proba``, XGBoost, LightGBM, any
numpy function) as the torch-in, torch-out callables the value function calls.

``as_model`` decides once, with one probe row, whether a callable is a torch model (it returns a
``torch.Tensor``) or a black box (it returns a numpy array, a list or a pandas object)."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch


class BlackBox:
    """Wraps ``fn``: array [N, M] -> array [N] or [N, C] as a torch callable [N, M] -> [N] / [N, C].

    The value function already hands the model whole chunks of coalitions (``batch_size`` rows a
    call), so a black box is called a few times per instance, not once per coalition.
    ``columns``: when given, ``fn`` receives a ``pandas.DataFrame`` with these column names (a
    model fitted on a DataFrame then sees the names it was fitted with). No autograd: SHEAR's
    Hessian interactions refuse it (``differentiable`` is False)."""

    differentiable = False

    def __init__(self, fn: Callable, columns: Sequence[str] | None = None, dtype=np.float64):
        if not callable(fn):
            raise TypeError(f"the model must be callable, got {type(fn).__name__}")
        self.fn, self.columns, self.dtype = fn, list(columns) if columns is not None else None, dtype
        self.calls = 0  # model calls (each with a chunk of rows)

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", None) or type(self.fn).__name__

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        a = z.detach().cpu().numpy().astype(self.dtype, copy=False)
        if self.columns is not None:
            import pandas as pd

            a = pd.DataFrame(a, columns=self.columns)
        self.calls += 1
        return _to_tensor(self.fn(a), self.name)

    def __repr__(self) -> str:
        return f"BlackBox({self.name})"


class ClassProbability(torch.nn.Module):
    """One class's probability as the explained output: f(x) = softmax(model(x))[:, target].

    ``model``: a classifier [N, M] -> logits [N, C]; ``target``: the class, 0 to C-1. [N, M] -> [N]."""

    def __init__(self, model: torch.nn.Module, target: int):
        super().__init__()
        if not isinstance(target, int) or target < 0:
            raise ValueError(f"target must be a class index (an int >= 0), got {target!r}")
        self.model, self.target = model, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if logits.ndim != 2 or self.target >= logits.shape[1]:
            raise ValueError(f"target class {self.target} does not exist in the model's output of shape "
                             f"{tuple(logits.shape)} (expected [N, C] with C > {self.target})")
        return torch.softmax(logits, dim=1)[:, self.target]


def _to_tensor(out, name: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if hasattr(out, "to_numpy"):  # pandas Series / DataFrame
        out = out.to_numpy()
    arr = np.asarray(out)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"the model {name} returned {arr.dtype} values; Shapley values need numbers")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))


def _array_like(out) -> bool:
    return isinstance(out, (np.ndarray, list, tuple, np.generic)) or hasattr(out, "to_numpy")


def as_model(model: Callable, probe: torch.Tensor, columns: Sequence[str] | None = None) -> Callable:
    """``model`` as a torch callable: torch modules and callables that return tensors as they
    are; a callable that returns arrays (or only accepts them) wrapped in :class:`BlackBox`.
    ``probe``: one input row [1, M] to call it with. ``columns``: the DataFrame's column names when
    x came as one (a black box then gets DataFrames with them)."""
    if isinstance(model, (torch.nn.Module, BlackBox)):
        return model
    if not callable(model):
        raise TypeError(f"the model must be callable (a torch module, or a function such as clf.predict_proba), "
                        f"got {type(model).__name__}")
    errors = []
    try:  # a torch model returns a tensor (warnings muted: a model fitted on a DataFrame warns about names)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(probe)
        if isinstance(out, torch.Tensor):
            return model
        if not _array_like(out):
            errors.append(f"with a tensor it returned {type(out).__name__}")
    except Exception as e:  # noqa: BLE001 - any failure: try it as an array model, then report all
        errors.append(f"with a tensor: {type(e).__name__}: {e}")
    for cols in ([columns] if columns is not None else []) + [None]:
        box = BlackBox(model, cols)
        try:
            box(probe)
            return box
        except Exception as e:  # noqa: BLE001
            errors.append(f"with a {'DataFrame' if cols is not None else 'numpy array'}: {type(e).__name__}: {e}")
    raise TypeError("the model could not be called on one row of x [1, M] " + "; ".join(errors))


__all__ = ["BlackBox", "as_model"]
