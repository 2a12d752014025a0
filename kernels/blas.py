"""BLAS sgemm, callable from Numba code on strided views.

`np.dot` inside `@njit` reaches the same sgemm but only for contiguous operands, always with
β = 0 and a fresh output. The conv and attention kernels need more: operands that are views
into a bigger array (a row stride, unit inner stride), an output that is a view (e.g. one
head's columns of a (B, N, C) tensor) and accumulation C += A·B (β = 1). So we call the
Fortran `sgemm` that SciPy exports for Cython, the same OpenBLAS, multi-threaded.
"""
import contextlib
import ctypes

import llvmlite.binding as llvm
import numpy as np
import scipy.linalg.cython_blas
from numba import njit, types
from numba.extending import get_cython_function_address

# void sgemm(char *transa, char *transb, int *m, int *n, int *k, float *alpha, float *a,
#            int *lda, float *b, int *ldb, float *beta, float *c, int *ldc)   (all by pointer)
# Bound by symbol name rather than as a ctypes pointer, so the kernels that call it can be
# cached on disk (`cache=True`): the address is looked up again at every import.
llvm.add_symbol("tinysd_sgemm", get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
_sgemm = types.ExternalFunction("tinysd_sgemm", types.void(*[types.intp] * 13))


# One signature for every caller: any 2-D float32 views (layout 'A'; a and b read-only, which
# writable arrays convert to), so gemm compiles once, not once per layout a kernel passes.
_matrix_in = types.Array(types.float32, 2, "A", readonly=True)
_matrix_out = types.Array(types.float32, 2, "A")


@njit(types.void(_matrix_in, _matrix_in, _matrix_out, types.float64, types.float64, types.boolean), cache=True)
def gemm(a, b, c, alpha, beta, trans_b):
    """c ← α·a·op(b) + β·c, row-major, op(b) = bᵀ if `trans_b`.

    a (M, K), b (K, N) or (N, K) with `trans_b`, c (M, N): float32 2-D arrays (or views) whose
    last axis has unit stride. Fortran BLAS is column-major, so we ask it for
    cᵀ = op(b)ᵀ·aᵀ: a row-major (M, K) with row stride lda is exactly a column-major K×M.
    """
    M, K = a.shape
    N = c.shape[1]
    ints = np.empty(6, np.int32)           # m, n, k, lda, ldb, ldc in BLAS's (transposed) terms
    ints[0], ints[1], ints[2] = N, M, K
    # Leading dimensions: the row strides, in floats (a one-row view's stride can be anything).
    ints[3] = b.strides[0] // 4 if b.shape[0] > 1 else max(1, b.shape[1])
    ints[4] = a.strides[0] // 4 if M > 1 else max(1, K)
    ints[5] = c.strides[0] // 4 if M > 1 else max(1, N)
    scalars = np.empty(2, np.float32)
    scalars[0], scalars[1] = alpha, beta
    trans = np.empty(2, np.uint8)
    trans[0], trans[1] = ord("T") if trans_b else ord("N"), ord("N")
    i, s, t = ints.ctypes.data, scalars.ctypes.data, trans.ctypes.data   # addresses; int32 = 4 B
    _sgemm(t, t + 1, i, i + 4, i + 8, s, b.ctypes.data, i + 12, a.ctypes.data, i + 16,
           s + 4, c.ctypes.data, i + 20)


def _openblas(*names):
    """The first of `names` exported by the OpenBLAS behind SciPy's BLAS, or None (SciPy's wheels
    prefix OpenBLAS's own functions with `scipy_`; other builds do not)."""
    lib = ctypes.CDLL(scipy.linalg.cython_blas.__file__)       # dlsym also searches its dependencies
    for name in names:
        try:
            return getattr(lib, name)
        except AttributeError:
            pass
    return None


_get_threads = _openblas("scipy_openblas_get_num_threads", "openblas_get_num_threads")
_set_threads = _openblas("scipy_openblas_set_num_threads", "openblas_set_num_threads")


@contextlib.contextmanager
def blas_single_threaded():
    """Run the block with OpenBLAS on one thread, then give it back its thread count.

    For kernels that call sgemm from every core at once (attention tiles in a prange): each call
    should stay on its own core. Set around the whole parallel region, from one thread: OpenBLAS's
    thread count is one global, and `openblas_set_num_threads_local` set and restored per task
    races between the cores and can leave every later GEMM on a single thread.
    """
    if _get_threads is None or _set_threads is None:
        yield
        return
    threads = _get_threads()
    _set_threads(1)
    try:
        yield
    finally:
        _set_threads(threads)


def blas_threads():
    """OpenBLAS's current thread count (None if this BLAS does not say)."""
    return None if _get_threads is None else int(_get_threads())
