"""Byte accounting of saved tensors: what plain autograd would hold vs what lowbit holds.

The hook engine (:mod:`lowbit.act.compressor`) calls :meth:`Ledger.add` once per encoded storage;
the ledger keeps the per-(module, op, kind) rows of the current step, the step's totals, and the
bytes alive right now (an entry gives its bytes back when autograd frees it, through the
callback ``add`` returns) with their peak over the ledger's lifetime. All sizes are in bytes.
"""
from __future__ import annotations

import weakref
from typing import Callable

from lowbit.act.report import MemoryReport, ReportRow


class _Release:
    """Gives an entry's bytes back to the live counters when autograd frees it (holds the ledger
    weakly: a finished graph must not keep it alive)."""

    __slots__ = ("ledger", "raw", "stored")

    def __init__(self, ledger: "Ledger", raw: int, stored: int):
        self.ledger, self.raw, self.stored = weakref.ref(ledger), raw, stored

    def __call__(self) -> None:
        ledger = self.ledger()
        if ledger is not None:
            ledger.live_raw -= self.raw
            ledger.live_stored -= self.stored


class Ledger:
    """Saved-tensor bytes of one compressor: per-step rows and totals, live bytes and their peak."""

    def __init__(self) -> None:
        self.live_raw = 0
        self.live_stored = 0
        self.peak_raw = 0
        self.peak_stored = 0
        self.last: MemoryReport | None = None  # the report of the last finished step
        self.reset()

    def reset(self) -> None:
        """Start a new step's rows and totals (live bytes and peaks carry over)."""
        self.seen_bytes = 0  # raw bytes saved since the last step (for the small-tensor floor)
        self.small_raw_bytes = 0  # of which small tensors kept raw
        self.rows: dict[tuple[str, str, str], ReportRow] = {}
        self.raw_total = 0
        self.stored_total = 0

    def add(self, module: str, op: str, kind: str, numel: int, raw: int, stored: int,
            bit_sum: float = 0.0) -> Callable[[], None]:
        """Account one encoded storage saved as a tensor of ``numel`` elements: ``raw`` bytes as
        autograd would hold it, ``stored`` bytes as held; ``bit_sum``: bits per element times the
        elements encoded, for lossy ("float") entries (the report's mean width). Returns the
        callback that gives the bytes back when the entry is freed."""
        key = (module, op, kind)
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = ReportRow(*key)
        row.count += 1
        row.numel += numel
        row.raw_bytes += raw
        row.stored_bytes += stored
        if kind == "float":
            row.bit_sum += bit_sum
        self.raw_total += raw
        self.stored_total += stored
        self.live_raw += raw
        self.live_stored += stored
        self.peak_raw = max(self.peak_raw, self.live_raw)
        self.peak_stored = max(self.peak_stored, self.live_stored)
        return _Release(self, raw, stored)

    def report(self, method: str) -> MemoryReport:
        """The current step's report (right after a step: the step just finished)."""
        if not self.rows and self.last is not None:
            return self.last
        return MemoryReport(method=method, raw_bytes=self.raw_total, stored_bytes=self.stored_total,
                            peak_raw_bytes=self.peak_raw, peak_stored_bytes=self.peak_stored,
                            rows=list(self.rows.values()))

    def end_step(self, method: str) -> None:
        """Keep the finished step's report (when it saved anything) and start a new step."""
        if self.rows:
            self.last = self.report(method)
        self.reset()
