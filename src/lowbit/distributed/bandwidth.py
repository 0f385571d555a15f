"""Turn bytes on the wire into transfer time on a link of a given bandwidth."""
from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bandwidth(text: str | float) -> float:
    """``"100Mbps"``, ``"1Gbps"``, ``"1.5 gbit/s"`` or a number of bits per second -> bits per second."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)\s*(bps|bit/s|b/s)?\s*", text.lower())
        if not m:
            raise ValueError(f"cannot read bandwidth {text!r}: write it like '100Mbps' or '1Gbps'")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if value <= 0:
        raise ValueError(f"bandwidth must be positive, got {text!r}")
    return value


def transfer_time(nbytes: float, bandwidth: str | float) -> float:
    """Seconds to move ``nbytes`` over one link (latency ignored)."""
    return 8.0 * nbytes / parse_bandwidth(bandwidth)


def simulated_step_time(compute_s: float, link_bytes: list[list[int]], dp_bytes: int, bandwidth: str | float) -> float:
    """Step time on a network of ``bandwidth`` per link: measured compute plus every pipeline link's
    traffic in turn plus the data-parallel exchange, with no overlap of communication and compute
    (a conservative model: GPipe can hide part of it).

    link_bytes: per replica, per stage boundary, bytes both ways in the step (replicas run in
    parallel, so the slowest counts). dp_bytes: the most one rank sent in the gradient exchange.
    """
    pipeline = max((sum(r) for r in link_bytes), default=0)
    return compute_s + transfer_time(pipeline, bandwidth) + transfer_time(dp_bytes, bandwidth)
