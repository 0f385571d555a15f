"""Loading checkpoints safely: tensors and plain containers only, never arbitrary pickled objects.

``torch.load`` unpickles whatever a file holds unless ``weights_only=True`` (the default only from
torch 2.6; lowbit supports older ones), and unpickling can run code. Every file lowbit reads back
(state_dicts given on the command line, pipeline checkpoints) goes through :func:`load_checkpoint`,
which always passes ``weights_only=True`` and turns torch's long messages into one clear line.
What lowbit itself saves holds only tensors, numbers, strings, None, lists, tuples and dicts.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch


class CheckpointError(ValueError):
    """A file that is missing, is not a PyTorch checkpoint, or holds more than tensors and plain
    containers (a pickled object, refused)."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors (:class:`CheckpointError`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"(?:GLOBAL|global|class) ([\w.]+)", text)
        if "Weights only load failed" in text and found:
            raise CheckpointError(
                f"{path}: refused to load: it holds a pickled Python object ({found.group(1)}), and lowbit only "
                "loads tensors and plain containers (torch.load with weights_only=True); save a state_dict "
                "instead") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable pickle data)") from None
    except Exception as e:  # a user's file that does not parse: torch and pickle raise many kinds
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {first})" if first
                              else f"{path}: not a PyTorch checkpoint ({type(e).__name__})") from None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A module state_dict ({name: tensor}) from ``path``; :class:`CheckpointError` if the file
    holds anything else."""
    state = load_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{os.fspath(path)}: holds a {type(state).__name__}, not a state_dict "
                              "(a dict of parameter names to tensors, as module.state_dict() returns)")
    return state
