"""Point-to-point messages between pipeline stages over torch.distributed, every byte counted.

A message is a fixed 12-int64 header followed by the payload tensors it announces. Every tensor
sent through here is counted in :class:`WireCounter`, header included, so the byte figures are
exactly what crossed the link.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from lowbit.codecs import Packed

HEADER_LEN = 12
MAX_DIMS = 5
_RAW, _QUANT = 0, 1
_META_DTYPES = (torch.float16, torch.float32)


class WireCounter:
    """Bytes sent by this rank, per kind of traffic ("forward", "backward", "dp"), per step."""

    def __init__(self) -> None:
        self.step_bytes: dict[str, int] = defaultdict(int)
        self.history: list[dict[str, int]] = []

    def add(self, kind: str, nbytes: int) -> None:
        self.step_bytes[kind] += nbytes

    def end_step(self) -> dict[str, int]:
        done = dict(self.step_bytes)
        self.history.append(done)
        self.step_bytes = defaultdict(int)
        return done


def comm_device() -> torch.device:
    """Where tensors must be for the process group's backend: CUDA for NCCL, host otherwise."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _header(kind: int, shape: torch.Size, bits: int = 0, group: int = 0, n_codes: int = 0, n_groups: int = 0, meta: int = 0) -> torch.Tensor:
    if len(shape) > MAX_DIMS:
        raise ValueError(f"messages carry tensors of at most {MAX_DIMS} dims, got shape {tuple(shape)}")
    dims = list(shape) + [-1] * (MAX_DIMS - len(shape))
    return torch.tensor([kind, len(shape), *dims, bits, group, n_codes, n_groups, meta], dtype=torch.int64)


def send_packed(p: Packed, dst: int, counter: WireCounter, kind: str) -> None:
    """Send a float32 tensor's encoding (``RawCodec``-like ``{"data"}`` or uniform codes) to ``dst``."""
    mode = p.info.get("mode", "raw")
    if mode == "quant":
        pl = p.payload
        meta = _META_DTYPES.index(pl["min"].dtype)
        head = _header(_QUANT, p.shape, p.info["bits"], p.info["group_size"], pl["codes"].numel(), pl["min"].numel(), meta)
        tensors = [head, pl["codes"], pl["min"], pl["scale"]]
    elif mode in ("raw", "empty"):
        data = p.payload.get("data", torch.empty(p.shape))
        tensors = [_header(_RAW, p.shape), data.detach().float().contiguous()]
    else:
        raise ValueError(f"cannot send a Packed in mode {mode!r}")
    device = comm_device()
    for t in tensors:
        t = t.to(device).contiguous()
        dist.send(t, dst)
        counter.add(kind, _nbytes(t))


def recv_packed(src: int, codec_name: str) -> Packed:
    """Receive what :func:`send_packed` sent; the result decodes with the sender's codec."""
    device = comm_device()
    head = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    dist.recv(head, src)
    kind, ndim = int(head[0]), int(head[1])
    shape = torch.Size(int(d) for d in head[2 : 2 + ndim])
    bits, group, n_codes, n_groups, meta = (int(v) for v in head[2 + MAX_DIMS :])
    if kind == _RAW:
        data = torch.empty(shape, dtype=torch.float32, device=device)
        dist.recv(data, src)
        return Packed(codec_name, shape, torch.float32, device, {"data": data}, {"mode": "raw"})
    if kind != _QUANT:
        raise RuntimeError(f"corrupt message header from rank {src}: kind {kind}")
    codes = torch.empty(n_codes, dtype=torch.uint8, device=device)
    mins = torch.empty(n_groups, dtype=_META_DTYPES[meta], device=device)
    scales = torch.empty(n_groups, dtype=_META_DTYPES[meta], device=device)
    for t in (codes, mins, scales):
        dist.recv(t, src)
    info = {"mode": "quant", "bits": bits, "group_size": group}
    return Packed(codec_name, shape, torch.float32, device, {"codes": codes, "min": mins, "scale": scales}, info)


def raw_packed(t: torch.Tensor, codec_name: str = "raw") -> Packed:
    """A float32 tensor sent as it is."""
    t = t.detach().float()
    return Packed(codec_name, t.shape, torch.float32, t.device, {"data": t}, {"mode": "raw"})
