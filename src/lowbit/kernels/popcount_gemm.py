"""A register-blocked XOR-popcount GEMM written in LLVM IR and compiled with llvmlite for this CPU.

Why not numba: on Intel CPUs LLVM's auto-vectoriser prefers 256-bit vectors, and numba has no
per-function switch for that; the binary product is bound by the popcount port, so 512-bit
vectors (AVX-512 VPOPCNTDQ) double its speed. Here the micro-kernel is explicit IR: a 4 x 4 block
of outputs, 16 accumulators of <8 x i64>, the K words walked 8 at a time, with the function
attribute that lets the backend keep 512-bit vectors. On CPUs without them LLVM lowers the same
IR to whatever vectors exist, so the result is always exact; only the speed changes.

``popcount_gemm(a, b, k)``: a [M, W], b [N, W] packed int64 (lowbit.kernels.binary layout) ->
int32 [M, N] = K - 2 * popcount(a XOR b) per row pair. Row blocks are split over numba's
(OpenMP) threads.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

_RB, _CB, _VW = 4, 4, 8  # rows per block, columns per block (<= 4: 16-bit fields in one i64), int64 lanes per vector
JT_BYTES = 131072  # bytes of b per column tile


def _ir() -> str:
    v = f"<{_VW} x i64>"
    lines = [
        f"declare {v} @llvm.ctpop.v{_VW}i64({v})",
        f"declare i64 @llvm.vector.reduce.add.v{_VW}i64({v})",
        "define void @bmm(i64* noalias %a, i64* noalias %b, i32* noalias %out, i64 %w, i64 %n, i64 %k, i64 %i0, i64 %i1, i64 %jt) #0 {",
        "entry:",
        "  br label %jtloop",
        "jtloop:",  # tiles of jt columns of the output: that slice of b stays in cache for every row block
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
    for r in range(_RB):
        lines += [f"  %ri{r} = add i64 %i, {r}", f"  %ra{r} = mul i64 %ri{r}, %w", f"  %pa{r} = getelementptr i64, i64* %a, i64 %ra{r}"]
    for c in range(_CB):
        lines += [f"  %cj{c} = add i64 %j, {c}", f"  %rb{c} = mul i64 %cj{c}, %w", f"  %pb{c} = getelementptr i64, i64* %b, i64 %rb{c}"]
    lines += ["  br label %tloop", "tloop:", "  %t = phi i64 [ 0, %tpre ], [ %tnext, %tloop ]"]
    for r in range(_RB):
        for c in range(_CB):
            lines.append(f"  %acc{r}{c} = phi {v} [ zeroinitializer, %tpre ], [ %nacc{r}{c}, %tloop ]")
    for r in range(_RB):
        lines += [f"  %qa{r} = getelementptr i64, i64* %pa{r}, i64 %t", f"  %va{r}p = bitcast i64* %qa{r} to {v}*",
                  f"  %va{r} = load {v}, {v}* %va{r}p, align 8"]
    for c in range(_CB):
        lines += [f"  %qb{c} = getelementptr i64, i64* %pb{c}, i64 %t", f"  %vb{c}p = bitcast i64* %qb{c} to {v}*",
                  f"  %vb{c} = load {v}, {v}* %vb{c}p, align 8"]
    for r in range(_RB):
        for c in range(_CB):
            lines += [f"  %x{r}{c} = xor {v} %va{r}, %vb{c}", f"  %p{r}{c} = call {v} @llvm.ctpop.v{_VW}i64({v} %x{r}{c})",
                      f"  %nacc{r}{c} = add {v} %acc{r}{c}, %p{r}{c}"]
    lines += ["  %tnext = add i64 %t, " + str(_VW), "  %tcond = icmp slt i64 %tnext, %w",
              "  br i1 %tcond, label %tloop, label %tdone", "tdone:"]
    # per-lane sums are < 2^16 (k < 65536 is checked by the caller): pack the 4 column accumulators
    # of a row into 16-bit fields of one vector, so a block needs 4 horizontal sums instead of 16
    for r in range(_RB):
        prev = f"%nacc{r}0"
        for c in range(1, _CB):
            lines += [f"  %sh{r}{c} = shl {v} %nacc{r}{c}, <{', '.join(['i64 ' + str(16 * c)] * _VW)}>",
                      f"  %or{r}{c} = or {v} {prev}, %sh{r}{c}"]
            prev = f"%or{r}{c}"
        lines += [f"  %sum{r} = call i64 @llvm.vector.reduce.add.v{_VW}i64({v} {prev})",
                  f"  %o{r} = mul i64 %ri{r}, %n"]
        for c in range(_CB):
            lines += [f"  %fs{r}{c} = lshr i64 %sum{r}, {16 * c}", f"  %s{r}{c} = and i64 %fs{r}{c}, 65535",
                      f"  %d{r}{c} = shl i64 %s{r}{c}, 1", f"  %e{r}{c} = sub i64 %k, %d{r}{c}",
                      f"  %f{r}{c} = trunc i64 %e{r}{c} to i32", f"  %oo{r}{c} = add i64 %o{r}, %cj{c}",
                      f"  %po{r}{c} = getelementptr i32, i32* %out, i64 %oo{r}{c}", f"  store i32 %f{r}{c}, i32* %po{r}{c}"]
    lines += [f"  %jnext = add i64 %j, {_CB}", "  br label %jloop", "jdone:", f"  %inext = add i64 %i, {_RB}",
              "  br label %iloop", "idone:", "  %j0next = add i64 %j0, %jt", "  br label %jtloop",
              "exit:", "  ret void", "}",
              'attributes #0 = { nounwind "min-legal-vector-width"="512" "prefer-vector-width"="512" }']
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _compiled():
    """(ctypes function, execution engine) or None when llvmlite cannot JIT here."""
    try:
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        target = llvm.Target.from_default_triple()
        tm = target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(),
                                          opt=3, codemodel="jitdefault")
        mod = llvm.parse_assembly(_ir())
        mod.verify()
        pto = llvm.create_pipeline_tuning_options(speed_level=3) if hasattr(llvm, "create_pipeline_tuning_options") else None
        if pto is not None:
            pb = llvm.create_pass_builder(tm, pto)
            pb.getModulePassManager().run(mod, pb)
        engine = llvm.create_mcjit_compiler(mod, tm)
        engine.finalize_object()
        # pointers passed as int64 (same registers in the x86-64 / AArch64 C ABI), so numba can call it
        fn = ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 9)(engine.get_function_address("bmm"))
        return fn, engine, _row_runner(fn)
    except Exception:  # no JIT on this platform: callers fall back to numba
        return None


def _row_runner(fn):
    """A numba-parallel loop over row chunks that calls the kernel: it runs on numba's threading
    layer, which shares the OpenMP runtime torch uses, so the kernel's threads are torch's own
    threads instead of a second pool fighting them for the cores (spin-waiting OpenMP workers
    after every torch op would otherwise halve the kernel's speed)."""
    import numba

    @numba.njit(parallel=True)
    def run(a, b, out, w, n, k, rows, chunk, jt):
        chunks = (rows + chunk - 1) // chunk
        for c in numba.prange(chunks):
            fn(a, b, out, w, n, k, c * chunk, min(rows, (c + 1) * chunk), jt)

    return run


def available() -> bool:
    return _compiled() is not None


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    r, c = t.shape
    if r == rows and c == cols and t.is_contiguous():
        return t
    out = torch.zeros(rows, cols, dtype=t.dtype)
    out[:r, :c] = t
    return out


def popcount_gemm(a: torch.Tensor, b: torch.Tensor, k: int, threads: int | None = None) -> torch.Tensor:
    """int32 [M, N] with K - 2 * popcount(a_i XOR b_j); a [M, W], b [N, W] int64 on the CPU.
    Zero padding (rows to a multiple of 4, words to a multiple of 8) changes no popcount."""
    if k >= 1 << 16:
        raise ValueError(f"popcount_gemm packs sums into 16-bit fields: k must be < 65536, got {k}")
    compiled = _compiled()
    if compiled is None:
        raise RuntimeError("llvmlite could not JIT the popcount kernel on this platform")
    fn = compiled[0]
    m, w = a.shape
    n = b.shape[0]
    mp, np_, wp = -(-m // _RB) * _RB, -(-n // _CB) * _CB, max(-(-w // _VW) * _VW, _VW)
    ap, bp = _pad(a, mp, wp), _pad(b, np_, wp)
    out = torch.empty(mp, np_, dtype=torch.int32)
    threads = threads or torch.get_num_threads() or os.cpu_count() or 1
    if mp * np_ * wp < 1 << 21:  # small products: a thread hand-off costs more than it saves
        threads = 1
    blocks = mp // _RB
    chunk = -(-blocks // threads) * _RB
    # a tile of b of about JT_BYTES stays in L2 while every row block of a passes over it
    jt = max(_CB, min(np_, (JT_BYTES // (8 * wp)) // _CB * _CB))
    args = (ap.data_ptr(), bp.data_ptr(), out.data_ptr(), wp, np_, k)
    if threads == 1:
        fn(*args, 0, mp, jt)
    else:
        import numba

        prev = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            compiled[2](*args, mp, chunk, jt)
        finally:
            numba.set_num_threads(prev)
    return out[:m, :n]
