"""`lowbit bench codec`: encode+decode throughput of UniformCodec against tensor.clone()."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from lowbit.bench.common import markdown_table, write_json
from lowbit.codecs import UniformCodec


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(numel: int = 1 << 25, bits=(1, 2, 4, 8), repeats: int = 7, out: str | Path = "results/codec", log=print) -> dict:
    """Times on one float32 tensor of ``numel`` elements (default 32 Mi = 128 MiB)."""
    x = torch.randn(numel)
    clone = _median_time(lambda: x.clone(), repeats)
    rows = []
    for b in bits:
        codec = UniformCodec(bits=b)
        packed = codec.encode(x)
        enc = _median_time(lambda: codec.encode(x), repeats)
        dec = _median_time(lambda: codec.decode(packed), repeats)
        rows.append({"bits": b, "encode_s": enc, "decode_s": dec, "clone_s": clone,
                     "ratio_to_clone": (enc + dec) / clone, "compression": x.numel() * 4 / packed.nbytes,
                     "encode_GBps": x.numel() * 4 / enc / 1e9, "decode_GBps": x.numel() * 4 / dec / 1e9})
    result = {"numel": numel, "threads": torch.get_num_threads(), "rows": rows}
    write_json(result, Path(out) / "codec.json")
    log(markdown_table(["bits", "encode ms", "decode ms", "clone ms", "(enc+dec)/clone", "compression x"],
                       [[r["bits"], r["encode_s"] * 1e3, r["decode_s"] * 1e3, r["clone_s"] * 1e3, r["ratio_to_clone"],
                         r["compression"]] for r in rows]))
    return result
