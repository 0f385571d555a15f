"""Byte accounting for activation-compressed training: what autograd would hold vs what lowbit holds."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ReportRow:
    """One (module, producing op, kind) bucket of saved tensors."""

    module: str
    op: str
    kind: str  # "float" (lossy), "mask", "index" (lossless), "raw" (kept as is)
    count: int = 0
    numel: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    bit_sum: float = 0.0  # sum of bits * numel over lossy entries, for the mean width

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    @property
    def mean_bits(self) -> float | None:
        return self.bit_sum / self.numel if self.kind == "float" and self.numel else None


@dataclass
class MemoryReport:
    """Saved-tensor memory of the forward passes since the last ``step()``.

    ``raw_bytes`` is what plain autograd would hold (each storage once, parameters and buffers
    excluded since they are kept anyway); ``stored_bytes`` what lowbit holds, metadata included.
    ``peak_*`` are the largest amounts alive at once, over the compressor's lifetime.
    """

    method: str
    raw_bytes: int = 0
    stored_bytes: int = 0
    peak_raw_bytes: int = 0
    peak_stored_bytes: int = 0
    rows: list[ReportRow] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d

    def __str__(self) -> str:
        head = f"{'module':<28} {'op':<22} {'kind':<6} {'n':>4} {'raw MiB':>9} {'stored MiB':>10} {'ratio':>7} {'bits':>5}"
        lines = [f"activation memory ({self.method})", head, "-" * len(head)]
        small = [r for r in self.rows if r.kind == "raw" and r.raw_bytes < 2**14]
        big = [r for r in self.rows if r not in small]
        if small:  # fold the many tiny tensors kept raw (BatchNorm statistics, ...) into one line
            big.append(ReportRow("(small tensors)", "various", "raw", sum(r.count for r in small),
                                 sum(r.numel for r in small), sum(r.raw_bytes for r in small),
                                 sum(r.stored_bytes for r in small)))
        for r in sorted(big, key=lambda r: -r.raw_bytes):
            bits = f"{r.mean_bits:.2f}" if r.mean_bits is not None else "-"
            lines.append(
                f"{r.module[:28]:<28} {r.op[:22]:<22} {r.kind:<6} {r.count:>4} {r.raw_bytes / 2**20:>9.3f} "
                f"{r.stored_bytes / 2**20:>10.3f} {r.ratio:>7.1f} {bits:>5}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<28} {'':<22} {'':<6} {sum(r.count for r in self.rows):>4} {self.raw_bytes / 2**20:>9.3f} "
            f"{self.stored_bytes / 2**20:>10.3f} {self.ratio:>7.1f}"
        )
        lines.append(
            f"peak alive: raw {self.peak_raw_bytes / 2**20:.3f} MiB, stored {self.peak_stored_bytes / 2**20:.3f} MiB"
        )
        return "\n".join(lines)
