"""A register-blocked XOR-popcount GEMM written in LLVM IR and compiled with llvmlite for this CPU.

Why not numba: on Intel CPUs LLVM's auto-vectoriser prefers 256-bit vectors, and numba has no
per-function switch for that; the binary product is bound by the vector ALU ports, so 512-bit
vectors (AVX-512 VPOPCNTDQ) double its speed. Here the micro-kernel is explicit IR with the
function attribute that lets the backend keep 512-bit vectors. On CPUs without them LLVM lowers
the same IR to whatever vectors exist, so the result is always exact; only the speed changes.

Layout: the 8 lanes of a vector are 8 *output columns*. b is interleaved once per call into
[N / 8CB, W, 8CB] (word t of the 8CB columns of a micro-tile side by side); a word of a is
broadcast to all lanes
(folded into the load). A micro-tile of RB rows x CB*8 columns keeps RB*CB accumulators in
registers while it walks all W words; each accumulator lane is one output, so the tile ends
with a vector subtract and store, with no horizontal sums. Per word pair that is one xor, one
popcount and one add: three vector uops on the two 512-bit ports, the floor of this product.

``popcount_gemm(a, b, k)``: a [M, W], b [N, W] packed int64 (lowbit.kernels.binary layout) ->
int32 [M, N] = K - 2 * popcount(a XOR b) per row pair. Row blocks are split over numba's
(OpenMP) threads; columns are walked in tiles whose slice of b stays in L2.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
from typing import NamedTuple

import torch

ROWS = 6  # rows per micro-tile; with CB = 4 that is 24 accumulators of the 32 vector registers
LANES = 8  # int64 lanes per vector
COLUMN_BLOCKS = (4, 2, 1)  # vectors of columns per micro-tile: one compiled variant each
JT_BYTES = 131072  # bytes of interleaved b per column tile (stays in L2 while every row block passes)


def _ir(cb: int) -> str:
    """LLVM IR of ``bmm{cb}(a, bt, out, w, n, k, i0, i1, jt)``: rows i0..i1 (multiples of ROWS) of
    out [*, n] (n a multiple of 8 cb), column tiles of jt."""
    v, vi = f"<{LANES} x i64>", f"<{LANES} x i32>"
    splat0 = f"<{LANES} x i32> zeroinitializer"
    name = f"bmm{cb}"
    lines = [
        f"define void @{name}(i64* noalias %a, i64* noalias %b, i32* noalias %out, i64 %w, i64 %n, i64 %k, "
        "i64 %i0, i64 %i1, i64 %jt) #0 {",
        "entry:",
        f"  %kv0 = insertelement {v} undef, i64 %k, i32 0",
        f"  %kv = shufflevector {v} %kv0, {v} undef, {splat0}",
        "  br label %jtloop",
        "jtloop:",
        "  %j0 = phi i64 [ 0, %entry ], [ %j0next, %idone ]",
        "  %jtcond = icmp slt i64 %j0, %n",
        "  br i1 %jtcond, label %ipre, label %exit",
        "ipre:",
        "  %jendraw = add i64 %j0, %jt",
        "  %jendlt = icmp slt i64 %jendraw, %n",
        "  %jend = select i1 %jendlt, i64 %jendraw, i64 %n",
        "  br label %iloop",
        "iloop:",
        "  %i = phi i64 [ %i0, %ipre ], [ %inext, %jdone ]",
        "  %icond = icmp slt i64 %i, %i1",
        "  br i1 %icond, label %jpre, label %idone",
        "jpre:",
        "  br label %jloop",
        "jloop:",
        "  %j = phi i64 [ %j0, %jpre ], [ %jnext, %tdone ]",
        "  %jcond = icmp slt i64 %j, %jend",
        "  br i1 %jcond, label %tpre, label %jdone",
        "tpre:",
    ]
    for r in range(ROWS):
        lines += [f"  %ri{r} = add i64 %i, {r}", f"  %ra{r} = mul i64 %ri{r}, %w",
                  f"  %pa{r} = getelementptr i64, i64* %a, i64 %ra{r}"]
    # columns j .. j + 8 cb - 1 start at word j * w of the interleaved b; word t of them is 8 cb
    # consecutive int64, one vector per 8 columns (one stream: no 4K-aliasing between vectors)
    lines += ["  %rb = mul i64 %j, %w", "  %pb = getelementptr i64, i64* %b, i64 %rb"]
    for c in range(cb):
        lines.append(f"  %cj{c} = add i64 %j, {LANES * c}")
    lines += ["  br label %tloop", "tloop:", "  %t = phi i64 [ 0, %tpre ], [ %tnext, %tloop ]"]
    for r in range(ROWS):
        for c in range(cb):
            lines.append(f"  %acc{r}_{c} = phi {v} [ zeroinitializer, %tpre ], [ %nacc{r}_{c}, %tloop ]")
    lines.append(f"  %tl = mul i64 %t, {LANES * cb}")
    for r in range(ROWS):
        lines += [f"  %qa{r} = getelementptr i64, i64* %pa{r}, i64 %t", f"  %sa{r} = load i64, i64* %qa{r}, align 8",
                  f"  %ia{r} = insertelement {v} undef, i64 %sa{r}, i32 0",
                  f"  %va{r} = shufflevector {v} %ia{r}, {v} undef, {splat0}"]
    for c in range(cb):
        lines += [f"  %tc{c} = add i64 %tl, {LANES * c}", f"  %qb{c} = getelementptr i64, i64* %pb, i64 %tc{c}",
                  f"  %vb{c}p = bitcast i64* %qb{c} to {v}*",
                  f"  %vb{c} = load {v}, {v}* %vb{c}p, align 8"]
    for r in range(ROWS):
        for c in range(cb):
            lines += [f"  %x{r}_{c} = xor {v} %va{r}, %vb{c}",
                      f"  %p{r}_{c} = call {v} @llvm.ctpop.v{LANES}i64({v} %x{r}_{c})",
                      f"  %nacc{r}_{c} = add {v} %acc{r}_{c}, %p{r}_{c}"]
    lines += ["  %tnext = add i64 %t, 1", "  %tcond = icmp slt i64 %tnext, %w",
              "  br i1 %tcond, label %tloop, label %tdone", "tdone:"]
    for r in range(ROWS):  # out = k - 2 * popcount, 8 columns per store
        lines.append(f"  %o{r} = mul i64 %ri{r}, %n")
        for c in range(cb):
            lines += [f"  %d{r}_{c} = add {v} %nacc{r}_{c}, %nacc{r}_{c}", f"  %e{r}_{c} = sub {v} %kv, %d{r}_{c}",
                      f"  %f{r}_{c} = trunc {v} %e{r}_{c} to {vi}", f"  %oo{r}_{c} = add i64 %o{r}, %cj{c}",
                      f"  %po{r}_{c} = getelementptr i32, i32* %out, i64 %oo{r}_{c}",
                      f"  %pv{r}_{c} = bitcast i32* %po{r}_{c} to {vi}*",
                      f"  store {vi} %f{r}_{c}, {vi}* %pv{r}_{c}, align 4"]
    lines += [f"  %jnext = add i64 %j, {LANES * cb}", "  br label %jloop", "jdone:", f"  %inext = add i64 %i, {ROWS}",
              "  br label %iloop", "idone:", "  %j0next = add i64 %j0, %jt", "  br label %jtloop",
              "exit:", "  ret void", "}"]
    return "\n".join(lines)


def _module_ir() -> str:
    v = f"<{LANES} x i64>"
    head = [f"declare {v} @llvm.ctpop.v{LANES}i64({v})"]
    tail = ['attributes #0 = { nounwind "min-legal-vector-width"="512" "prefer-vector-width"="512" }']
    return "\n".join(head + [_ir(cb) for cb in COLUMN_BLOCKS] + tail)


class Jit(NamedTuple):
    """The compiled kernel. ``call_tile(cb, a, b, out, w, n, k, i0, i1, jt)`` is a numba function
    that runs the ``cb`` variant on rows i0..i1, for numba kernels that drive the GEMM themselves;
    ``run_rows(cb, a, b, out, w, n, k, rows, chunk, jt)`` splits rows over numba's threads."""

    fns: dict
    engine: object
    call_tile: object
    run_rows: object


def _jit(ir: str) -> Jit:
    """Compile ``ir`` (the module of :func:`_module_ir`) for this CPU; raises what llvmlite or numba raise."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = llvm.Target.from_default_triple()
    tm = target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
                                      opt=3, codemodel="jitdefault")
    mod = llvm.parse_assembly(ir)
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3) if hasattr(llvm, "create_pipeline_tuning_options") else None
    if pto is not None:
        pb = llvm.create_pass_builder(tm, pto)
        pb.getModulePassManager().run(mod, pb)
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    # pointers passed as int64 (same registers in the x86-64 / AArch64 C ABI), so numba can call it
    proto = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 9)
    fns = {cb: proto(engine.get_function_address(f"bmm{cb}")) for cb in COLUMN_BLOCKS}
    call_tile = _tile_caller(fns)
    return Jit(fns, engine, call_tile, _row_runner(call_tile))


def try_jit(ir: str) -> tuple[Jit | None, str | None]:
    """(kernel, None) when ``ir`` compiles, else (None, the error) with a RuntimeWarning that says
    binary products take the slower numba kernel: results stay exact, only the speed drops, and
    the failure is seen instead of hidden."""
    try:
        return _jit(ir), None
    except Exception as e:  # llvmlite and numba raise plain RuntimeError/TypeError subclasses: any of them
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"  # one line: LLVM errors span several
        warnings.warn(f"lowbit: the LLVM popcount kernel did not compile on this machine ({reason}); binary "
                      "products use the numba kernel instead (same results, slower)", RuntimeWarning, stacklevel=2)
        return None, reason


@functools.lru_cache(maxsize=1)
def _compiled_or_reason() -> tuple[Jit | None, str | None]:
    return try_jit(_module_ir())


def _compiled() -> Jit | None:
    """The JIT-compiled kernel, or None when it did not compile here (see :func:`fallback_reason`)."""
    return _compiled_or_reason()[0]


def fallback_reason() -> str | None:
    """Why binary products fall back to the numba kernel on this machine (the compile error), or
    None when the LLVM kernel compiled. Compiles it on the first call."""
    return _compiled_or_reason()[1]


def _tile_caller(fns):
    """A numba function that calls the kernel variant for ``cb`` column blocks."""
    import numba

    f4, f2, f1 = (fns[cb] for cb in COLUMN_BLOCKS)

    @numba.njit
    def call(cb, a, b, out, w, n, k, i0, i1, jt):
        if cb == 4:
            f4(a, b, out, w, n, k, i0, i1, jt)
        elif cb == 2:
            f2(a, b, out, w, n, k, i0, i1, jt)
        else:
            f1(a, b, out, w, n, k, i0, i1, jt)

    return call


def _row_runner(call_tile):
    """A numba-parallel loop over row chunks that calls a kernel variant: it runs on numba's
    threading layer, which shares the OpenMP runtime torch uses, so the kernel's threads are
    torch's own threads instead of a second pool fighting them for the cores (spin-waiting OpenMP
    workers after every torch op would otherwise halve the kernel's speed)."""
    import numba

    @numba.njit(parallel=True)
    def run(cb, a, b, out, w, n, k, rows, chunk, jt):
        chunks = (rows + chunk - 1) // chunk
        for c in numba.prange(chunks):
            call_tile(cb, a, b, out, w, n, k, c * chunk, min(rows, (c + 1) * chunk), jt)

    return run


@contextlib.contextmanager
def numba_threads(threads: int):
    """Run numba's parallel kernels on ``threads`` threads (at most numba's pool) inside the block."""
    import numba

    prev, want = numba.get_num_threads(), min(threads, numba.config.NUMBA_NUM_THREADS)
    if want != prev:
        numba.set_num_threads(want)
    try:
        yield
    finally:
        if want != prev:
            numba.set_num_threads(prev)


def available() -> bool:
    """True when the LLVM kernel compiled here (else :func:`fallback_reason` says why not)."""
    return _compiled() is not None


def column_blocks_for(n: int) -> int:
    """Vectors of output columns per micro-tile for N columns (least padding for narrow outputs)."""
    return next(cb for cb in COLUMN_BLOCKS if n >= LANES * cb or cb == 1)


def interleave_columns(b: torch.Tensor, cb: int) -> torch.Tensor:
    """b [N, W] int64 -> [Np / 8cb, W, 8cb] with Np = N rounded up to 8cb (zero rows: discarded outputs)."""
    n, w = b.shape
    cols = LANES * cb
    np_ = -(-n // cols) * cols
    padded = torch.zeros(np_, w, dtype=torch.int64)
    padded[:n] = b
    return padded.reshape(np_ // cols, cols, w).transpose(1, 2).contiguous()


def popcount_gemm(a: torch.Tensor, b: torch.Tensor, k: int, threads: int | None = None) -> torch.Tensor:
    """int32 [M, N] with K - 2 * popcount(a_i XOR b_j); a [M, W], b [N, W] int64 on the CPU."""
    if not 0 <= k < 1 << 31:
        raise ValueError(f"popcount_gemm returns int32: k must be in [0, 2^31), got {k}")
    compiled = _compiled()
    if compiled is None:
        raise RuntimeError(f"the LLVM popcount kernel did not compile on this machine: {fallback_reason()}")
    m, w = a.shape
    n = b.shape[0]
    cb = column_blocks_for(n)
    bt = interleave_columns(b, cb)
    np_ = bt.shape[0] * bt.shape[2]
    mp = -(-m // ROWS) * ROWS
    ap = a if mp == m and a.is_contiguous() else torch.cat([a, a.new_zeros(mp - m, w)]).contiguous()
    out = torch.empty(mp, np_, dtype=torch.int32)
    if w == 0 or m == 0:
        return out[:m, :n].fill_(k)
    threads = threads or torch.get_num_threads() or os.cpu_count() or 1
    if mp * np_ * w < 1 << 20:  # small products: a thread hand-off costs more than it saves
        threads = 1
    chunk = -(-(mp // ROWS) // threads) * ROWS
    cols = LANES * cb
    jt = max(cols, min(np_, (JT_BYTES // (8 * w)) // cols * cols))
    args = (ap.data_ptr(), bt.data_ptr(), out.data_ptr(), w, np_, k)
    if threads == 1:
        compiled.fns[cb](*args, 0, mp, jt)
    else:
        with numba_threads(threads):
            compiled.run_rows(cb, *args, mp, chunk, jt)
    return out[:m, :n]
