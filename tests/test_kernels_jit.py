"""The LLVM popcount kernel compiles here, and a kernel that does not compile is reported, not hidden."""
import warnings

import pytest

from lowbit.kernels import popcount_gemm


def test_the_llvm_popcount_kernel_compiles_on_this_machine():
    # numba (a dependency) JITs with the same llvmlite, so a failure here is a bug in the kernel's
    # IR, not a platform limit: the numba fallback must not be what the binary tests measure
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        reason = popcount_gemm.fallback_reason()
    assert reason is None
    assert popcount_gemm.available()


def test_a_kernel_that_does_not_compile_warns_and_records_why():
    with pytest.warns(RuntimeWarning, match="did not compile on this machine .*numba kernel instead"):
        jit, reason = popcount_gemm.try_jit(popcount_gemm._module_ir().replace("ret void", "ret i64 %k", 1))
    assert jit is None and reason.startswith("RuntimeError: LLVM IR parsing error") and "\n" not in reason
