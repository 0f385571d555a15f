"""Point-to-point messages between pipeline stages over torch.distributed, every byte counted.

A message is a fixed 12-int64 header (kind, ndim, up to 6 dims, bits, group size, metadata dtype,
payload bytes) followed by one payload tensor: the float32 values, or a uniform encoding in the
codec's own byte layout (``lowbit.codecs.uniform.to_bytes``). Every tensor sent through here is
counted in :class:`WireCounter`, header included, so the byte figures are exactly what crossed
the link.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from lowbit.codecs import Packed
from lowbit.codecs.uniform import META_DTYPES, from_bytes, to_bytes

HEADER_LEN = 12
MAX_DIMS = 6
_RAW, _QUANT = 0, 1


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


def _header(kind: int, shape: torch.Size, nbytes: int, bits: int = 0, group: int = 0, meta: int = 0) -> torch.Tensor:
    if len(shape) > MAX_DIMS:
        raise ValueError(f"messages carry tensors of at most {MAX_DIMS} dims, got shape {tuple(shape)}")
    dims = list(shape) + [-1] * (MAX_DIMS - len(shape))
    return torch.tensor([kind, len(shape), *dims, bits, group, meta, nbytes], dtype=torch.int64)


def send_packed(p: Packed, dst: int, counter: WireCounter, kind: str) -> None:
    """Send a float32 tensor's encoding (``RawCodec``-like ``{"data"}`` or uniform codes) to ``dst``:
    the header, then one payload tensor."""
    mode = p.info.get("mode", "raw")
    if mode == "quant":
        payload = to_bytes(p)
        meta = META_DTYPES.index(p.payload["min"].dtype)
        head = _header(_QUANT, p.shape, payload.numel(), p.info["bits"], p.info["group_size"], meta)
    elif mode in ("raw", "empty"):
        payload = p.payload.get("data", torch.empty(p.shape)).detach().float().reshape(-1)
        head = _header(_RAW, p.shape, _nbytes(payload))
    else:
        raise ValueError(f"cannot send a Packed in mode {mode!r}")
    device = comm_device()
    for t in (head, payload):
        t = t.to(device).contiguous()
        dist.send(t, dst)
        counter.add(kind, _nbytes(t))


def recv_packed(src: int, codec_name: str) -> Packed:
    """Receive what :func:`send_packed` sent; the result decodes with the sender's codec."""
    device = comm_device()
    head = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    dist.recv(head, src)
    kind, ndim = int(head[0]), int(head[1])
    if kind not in (_RAW, _QUANT) or not 0 <= ndim <= MAX_DIMS:
        raise RuntimeError(f"corrupt message header from rank {src}: kind {kind}, {ndim} dims")
    shape = torch.Size(int(d) for d in head[2 : 2 + ndim])
    bits, group, meta, nbytes = (int(v) for v in head[2 + MAX_DIMS :])
    if kind == _RAW:
        data = torch.empty(shape, dtype=torch.float32, device=device)
        if _nbytes(data) != nbytes:
            raise RuntimeError(f"corrupt message header from rank {src}: shape {tuple(shape)} but {nbytes} bytes")
        dist.recv(data, src)
        return Packed(codec_name, shape, torch.float32, device, {"data": data}, {"mode": "raw"})
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dist.recv(buf, src)
    return from_bytes(buf, shape, bits, group, META_DTYPES[meta], codec_name)


def raw_packed(t: torch.Tensor, codec_name: str = "raw") -> Packed:
    """A float32 tensor sent as it is."""
    t = t.detach().float()
    return Packed(codec_name, t.shape, torch.float32, t.device, {"data": t}, {"mode": "raw"})
