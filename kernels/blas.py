"""BLAS sgemm, callable from Numba code on strided views.

`np.dot` inside `@njit` reaches the same sgemm but only for contiguous operands, always with
β = 0 and a fresh output. The conv and attention kernels need more: operands that are views
into a bigger array (a row stride, unit inner stride), an output that is a view (e.g. one
head's columns of a (B, N, C) tensor) and accumulation C += A·B (β = 1). So we call the
Fortran `sgemm` that SciPy exports for Cython, the same OpenBLAS, multi-threaded.
"""
import contextlib
import ctypes
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np
import scipy
from numba import njit, types


_CYTHON_BLAS = "scipy.linalg.cython_blas"


def _cython_blas():
    """SciPy's `scipy.linalg.cython_blas` extension module, loaded from its file without importing
    the `scipy.linalg` package around it: that package's import sets up SciPy's array-API layer
    (which imports numpy.f2py and numpy.testing), 0.1–0.4 s of every start that tinysd does not use.
    The module (and the sgemm it exports) is the one `import scipy.linalg.cython_blas` gives;
    loading it puts it in sys.modules (see the end of this file)."""
    if _CYTHON_BLAS in sys.modules:
        return sys.modules[_CYTHON_BLAS]
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = Path(scipy.__file__).parent / "linalg" / f"cython_blas{suffix}"
        if path.is_file():
            spec = importlib.util.spec_from_file_location(_CYTHON_BLAS, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    return importlib.import_module(_CYTHON_BLAS)         # another layout: the ordinary import


_loaded_here = _CYTHON_BLAS not in sys.modules

# After a multi-threaded GEMM, OpenBLAS's helper threads spin for 2^28 cycles (~0.1 s) before they
# sleep, waiting for the next one. Between GEMMs tinysd runs its own kernels on its own threads
# (attention, Winograd, norms: kernels/threads.py), and a spinning helper holds one of their cores:
# the U-Net step took 5.7 s instead of 4.8 (CFG), 3.0 instead of 2.5 (batch 1) on 2 cores. 2^4
# cycles makes them sleep at once; waking them costs microseconds, against GEMMs of milliseconds.
# OpenBLAS reads it from the environment when it loads: set for that moment only (further down
# it is taken out again), and a value the user set is kept.
THREAD_TIMEOUT = "4"
_timeout_set_here = "OPENBLAS_THREAD_TIMEOUT" not in os.environ
if _timeout_set_here:
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = THREAD_TIMEOUT


def _capsule_address(capsule):
    """The function pointer inside a Cython `__pyx_capi__` capsule."""
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))


_blas_module = _cython_blas()

# void sgemm(char *transa, char *transb, int *m, int *n, int *k, float *alpha, float *a,
#            int *lda, float *b, int *ldb, float *beta, float *c, int *ldc)   (all by pointer)
# Bound by symbol name rather than as a ctypes pointer, so the kernels that call it can be
# cached on disk (`cache=True`): the address is looked up again at every import.
llvm.add_symbol("tinysd_sgemm", _capsule_address(_blas_module.__pyx_capi__["sgemm"]))
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
    lib = ctypes.CDLL(_blas_module.__file__)                   # dlsym also searches its dependencies
    for name in names:
        try:
            return getattr(lib, name)
        except AttributeError:
            pass
    return None


_get_threads = _openblas("scipy_openblas_get_num_threads", "openblas_get_num_threads")
_set_threads = _openblas("scipy_openblas_set_num_threads", "openblas_set_num_threads")


def _apply_thread_timeout():
    """If SciPy's OpenBLAS was loaded before tinysd (the user imported scipy.linalg first), it read
    its settings without OPENBLAS_THREAD_TIMEOUT: have it read them again and restart its threads,
    which take the timeout when they start."""
    timeout, read_env, shutdown = (_openblas(name) for name in (
        "openblas_thread_timeout", "openblas_read_env", "blas_thread_shutdown_"))
    if None in (timeout, read_env, shutdown) or str(timeout()) == os.environ["OPENBLAS_THREAD_TIMEOUT"]:
        return
    read_env()
    shutdown()                      # the next multi-threaded GEMM starts them again


_apply_thread_timeout()
if _timeout_set_here:
    del os.environ["OPENBLAS_THREAD_TIMEOUT"]


@contextlib.contextmanager
def blas_single_threaded():
    """Run the block with OpenBLAS on one thread, then give it back its thread count.

    For kernels that call sgemm from every core at once (attention tiles, one per thread): each call
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


# gemm's explicit signature made Numba compile it (or read it from the cache) above, and Numba's
# first compile in a process loads its library of array functions, which imports
# scipy.linalg.cython_blas: found in sys.modules, so still without the scipy.linalg package. Now
# take it out again, so that a later `import scipy.linalg.cython_blas` (the user's, or Numba's for
# np.dot) goes through scipy.linalg and sets its attribute there, as it normally does.
if _loaded_here:
    sys.modules.pop(_CYTHON_BLAS, None)
