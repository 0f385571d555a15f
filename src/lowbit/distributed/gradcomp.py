"""Gradient all-reduce for data-parallel replicas of a stage, optionally k-bit compressed."""
from __future__ import annotations

import torch
import torch.distributed as dist

from lowbit.codecs import UniformCodec
from lowbit.codecs.uniform import from_bytes, to_bytes
from lowbit.distributed.wire import WireCounter, comm_device


def allreduce_gradients(params: list[torch.nn.Parameter], group, group_size_ranks: int, counter: WireCounter,
                        codec: UniformCodec | None = None) -> None:
    """Sum every parameter's gradient over the data-parallel ``group``, in place.

    ``codec=None``: a plain fp32 all-reduce (counted as a ring all-reduce: each rank sends
    ``2 (n-1)/n`` times the gradient bytes). With a codec, each rank encodes its flattened gradient
    (stochastic rounding: unbiased), the codes are all-gathered (each rank sends its message to the
    ``n-1`` others) and every rank decodes and sums the same messages, so replicas stay identical.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).float()
    n = group_size_ranks
    device = comm_device()
    if codec is None:
        flat = flat.to(device)
        dist.all_reduce(flat, group=group)
        counter.add("dp", int(2 * (n - 1) / n * flat.numel() * 4))
        total = flat
    else:
        p = codec.encode(flat)
        if p.info.get("mode") != "quant":
            raise FloatingPointError("a gradient holds NaN or Inf: refusing to compress and all-reduce it")
        # (min, scale) as float32 so every rank's message has the same length; one message in the
        # codec's byte layout
        p.payload["min"], p.payload["scale"] = p.payload["min"].float(), p.payload["scale"].float()
        msg = to_bytes(p).to(device)
        bucket = [torch.empty_like(msg) for _ in range(n)]
        dist.all_gather(bucket, msg, group=group)
        counter.add("dp", (n - 1) * msg.numel())
        total = torch.zeros_like(flat)
        for buf in bucket:
            q = from_bytes(buf.to(flat.device), p.shape, p.info["bits"], p.info["group_size"], torch.float32)
            total += codec.decode(q).to(flat.device)
    offset = 0
    for prm, g in zip(params, grads):
        k = g.numel()
        chunk = total[offset : offset + k].view_as(g).to(g.device, g.dtype)
        if prm.grad is None:
            prm.grad = chunk.clone()
        else:
            prm.grad.copy_(chunk)
        offset += k
