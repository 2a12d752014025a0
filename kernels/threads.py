"""A kernel's tasks on all cores, with Python threads.

Each parallel kernel is a plain `@njit(nogil=True, error_model="numpy")` function whose last two
arguments say which of its tasks to run: `kernel(..., start, stop)` runs tasks start … stop − 1,
whatever its outer loop walks (output tiles, rows, groups). `parallel_for(kernel, n, *args)` cuts range(n) into
one contiguous share per thread (the static schedule of a `prange` loop), which the calling
thread and the helper threads claim one at a time until none is left; the kernels release the
GIL, so the shares run on separate cores. Claiming, rather than handing each helper its share,
matters on a busy machine: a helper that wakes late finds its share already done by the caller,
instead of holding the whole op up until it gets a core.

Why not Numba's own `parallel=True` and `prange`: Numba turns a prange loop into a separate
function (a gufunc) and LLVM optimises and compiles the loop's body, and every function it calls,
once more in each module that links it. A prange kernel took 2–4× the time of the same loop
without it to compile (the Winograd conv 3.1 s instead of 0.9 s), and every kernel compiles once
on a fresh install: 15 s of the shipped model's first picture. Running the same code here took
the same time per call (51 ms for a 320-channel 3×3 conv at 64×64, batch 2, both ways), given
`error_model="numpy"`, which Numba sets for a prange body: a division by zero gives inf or NaN, as
in NumPy, instead of raising ZeroDivisionError, so a loop with a division carries no check and
LLVM vectorises it (without it, group norm + SiLU, whose σ(x) = 1/(1 + e^(−x)) divides, took
3× the time: 9.9 ms instead of 3.3 ms for 2×320×64×64 values on one core).

Small work runs on the calling thread alone (`min_work`): handing a share to another thread and
waiting for it costs ~8 µs (median; 25 µs at the 90th percentile, load average 10 on these 2
cores), and a SiLU of 32K values gains only 15% from a second thread; most of the shipped model's
ops are smaller than that.
"""
from __future__ import annotations

import itertools
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
    """Run kernel(*args, start, stop) over tasks 0 … n − 1, spread over the threads.

    work: about how many values the whole call reads and writes; below `min_work` (or with a
    single task or thread) everything runs on the calling thread.
    """
    threads = min(n, _threads)
    if threads <= 1 or (work is not None and work < min_work):
        kernel(*args, 0, n)
        return
    job = _Job(kernel, args, n, threads)
    pool = _executor(threads - 1)
    for _ in range(threads - 1):
        pool.submit(job.run)
    job.run()
    job.wait()


class _Job:
    """One parallel_for call: one contiguous share of the tasks per thread, each claimed by
    whichever thread asks first. The calling thread claims too, so if a helper thread is slow to
    wake (a busy machine), the caller runs that share as well instead of waiting for the helper."""

    def __init__(self, kernel, args, n, shares):
        self.kernel, self.args, self.shares = kernel, args, shares
        self.bounds = [n * i // shares for i in range(shares + 1)]
        self.claimed, self.finished = itertools.count(), itertools.count(1)   # next() is atomic
        self.all_done, self.error = threading.Event(), None

    def run(self):
        while (i := next(self.claimed)) < self.shares:
            try:
                self.kernel(*self.args, self.bounds[i], self.bounds[i + 1])
            except Exception as e:                   # noqa: BLE001  re-raised in the caller
                self.error = self.error or e
            if next(self.finished) == self.shares:
                self.all_done.set()

    def wait(self):
        self.all_done.wait()
        if self.error is not None:
            raise self.error
