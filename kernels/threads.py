"""A kernel's tasks on all cores, with Python threads.

Each parallel kernel is a plain `@njit(nogil=True)` function whose last two arguments say which
of its tasks to run: `kernel(..., start, stop)` runs tasks start … stop − 1, whatever its outer
loop walks (output tiles, rows, groups). `parallel_for(kernel, n, *args)` cuts range(n) into
one contiguous share per thread (the static schedule a `prange` loop gets) and runs the shares at
once; the kernels release the GIL, so they run on separate cores. The calling thread runs the
first share itself.

Why not Numba's own `parallel=True` and `prange`: Numba turns a prange loop into a separate
function (a gufunc) and LLVM optimises and compiles the loop's body, and every function it calls,
once more in each module that links it. A prange kernel took 2–4× the time of the same loop
without it to compile (the Winograd conv 3.1 s instead of 0.9 s), and every kernel compiles once
on a fresh install: 15 s of the shipped model's first picture. Running the same code here took
the same time per call (51 ms for a 320-channel 3×3 conv at 64×64, batch 2, both ways).

Small work runs on the calling thread alone (`min_work`): handing a share to another thread and
waiting for it costs ~50 µs, more than the whole op for the shipped model's 8×8 latents.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba

min_work = 1 << 15          # below this many values read or written, one thread (see above)

_threads = numba.config.NUMBA_NUM_THREADS     # the cores, or NUMBA_NUM_THREADS where set
_pool = (0, None)           # (helper threads, their ThreadPoolExecutor)
_pool_lock = threading.Lock()


def num_threads() -> int:
    """How many threads the kernels run on (NUMBA_NUM_THREADS, else the number of cores)."""
    return _threads


def set_num_threads(n: int) -> None:
    """Run the kernels on n threads from now on (n ≥ 1)."""
    global _threads
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: need an int ≥ 1, got {n!r}")
    _threads = n


def _executor(workers):
    """The pool of `workers` helper threads, made on first use (and again if the count changed)."""
    global _pool
    with _pool_lock:
        if _pool[0] != workers:
            if _pool[1] is not None:
                _pool[1].shutdown(wait=False)
            _pool = (workers, ThreadPoolExecutor(workers, thread_name_prefix="tinysd-kernel"))
        return _pool[1]


def parallel_for(kernel, n, *args, work=None):
    """Run kernel(*args, start, stop) over tasks 0 … n − 1, in one share per thread.

    work: about how many values the whole call reads and writes; below `min_work` (or with a
    single task or thread) everything runs on the calling thread.
    """
    shares = min(n, _threads)
    if shares <= 1 or (work is not None and work < min_work):
        kernel(*args, 0, n)
        return
    bounds = [n * i // shares for i in range(shares + 1)]
    pool = _executor(shares - 1)
    others = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, shares)]
    try:
        kernel(*args, bounds[0], bounds[1])
    finally:
        for share in others:
            share.result()           # waits; re-raises a share's exception
