"""Per-example activation references for AC-SGD, in host memory or in a file on disk."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ExampleMemory:
    """``m(example)``: the last decoded activation sent for each training example.

    Both ends of a pipeline link hold one and update it with the same decoded values, so they stay
    bit-identical. ``n_examples`` rows, each of the per-example activation shape, zero until first
    written (a never-seen example therefore gets plain quantization of its activation).

    where: ``"memory"`` (a host tensor) or ``"disk"`` (a ``numpy.memmap`` file in ``directory``,
    for data sets whose references do not fit in RAM). dtype: ``"float32"`` or ``"float16"``
    (halves the storage; both sides round the same way). Storage is allocated on the first write,
    when the per-example shape is known; ``nbytes`` is its size.
    """

    def __init__(self, n_examples: int, where: str = "memory", dtype: str = "float32",
                 directory: str | Path | None = None, name: str = "memory"):
        if n_examples <= 0:
            raise ValueError(f"n_examples must be positive, got {n_examples}")
        if where not in ("memory", "disk"):
            raise ValueError(f"where must be 'memory' or 'disk', got {where!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if where == "disk" and directory is None:
            raise ValueError("where='disk' needs a directory for the memory file")
        self.n_examples, self.where, self.dtype = n_examples, where, _DTYPES[dtype]
        self.path = Path(directory) / f"{name}.bin" if where == "disk" else None
        self._store: torch.Tensor | None = None
        self._mmap: np.memmap | None = None

    def __repr__(self) -> str:
        return f"ExampleMemory({self.n_examples} examples, {self.where}, {self.dtype}, {self.nbytes / 2**20:.1f} MiB)"

    @property
    def nbytes(self) -> int:
        return 0 if self._store is None else self._store.numel() * self._store.element_size()

    def _allocate(self, row_shape: torch.Size) -> None:
        shape = (self.n_examples, *row_shape)
        if self.where == "memory":
            self._store = torch.zeros(shape, dtype=self.dtype)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
            self._mmap = np.memmap(self.path, dtype=np_dtype, mode="w+", shape=shape)  # zero-filled
            self._store = torch.from_numpy(self._mmap)

    def get(self, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ids: int64 [n] -> references [n, *row_shape] in ``like``'s dtype and device."""
        if self._store is None:
            self._allocate(like.shape[1:])
        self._check(ids, like)
        return self._store[ids.cpu()].to(like.device, like.dtype)

    def put(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Store ``values`` [n, *row_shape] for ``ids``; returns them as stored (rounded to the dtype)."""
        if self._store is None:
            self._allocate(values.shape[1:])
        self._check(ids, values)
        stored = values.detach().to("cpu", self.dtype)
        self._store[ids.cpu()] = stored
        return stored.to(values.device, values.dtype)

    def _check(self, ids: torch.Tensor, t: torch.Tensor) -> None:
        if ids.dtype != torch.int64 or ids.dim() != 1 or ids.numel() != t.shape[0]:
            raise ValueError(f"ids must be int64 [{t.shape[0]}], got {ids.dtype} {tuple(ids.shape)}")
        if tuple(t.shape[1:]) != tuple(self._store.shape[1:]):
            raise ValueError(f"activation rows have shape {tuple(t.shape[1:])}, the memory holds {tuple(self._store.shape[1:])}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_examples):
            raise IndexError(f"example ids must lie in [0, {self.n_examples})")

    def state_dict(self) -> dict:
        """For checkpoints. A disk memory is snapshotted to a sibling file, since training goes
        on writing the live one."""
        if self._mmap is not None:
            self._mmap.flush()
            snapshot = self.path.with_suffix(".ckpt.bin")
            shutil.copyfile(self.path, snapshot)
            return {"where": "disk", "snapshot": str(snapshot), "shape": tuple(self._store.shape)}
        return {"where": "memory", "store": None if self._store is None else self._store.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["where"] != self.where:
            raise ValueError(f"checkpoint holds a {state['where']} memory, this one is {self.where}")
        if state["where"] == "memory":
            self._store = state["store"]
            return
        if not os.path.exists(state["snapshot"]):
            raise FileNotFoundError(f"the example-memory snapshot {state['snapshot']} of this checkpoint is gone")
        shutil.copyfile(state["snapshot"], self.path)
        np_dtype = np.float16 if self.dtype == torch.float16 else np.float32
        self._mmap = np.memmap(self.path, dtype=np_dtype, mode="r+", shape=tuple(state["shape"]))
        self._store = torch.from_numpy(self._mmap)

    def checksum(self) -> float:
        """A cheap fingerprint, for checking that both ends of a link agree."""
        return 0.0 if self._store is None else float(self._store.double().abs().sum() + self._store.double()[:, ..., 0].sum())
