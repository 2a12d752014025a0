"""glibc malloc settings for the cpu backend: keep freed memory for the next op instead of giving
it back to the kernel.

Every op returns a fresh array and drops its inputs (a conv's output at the U-Net's 64×64 level is
10 MB, at the VAE decoder's 512×512 up to 268 MB). With glibc's defaults a block over
M_MMAP_THRESHOLD (128 KB, adjusted up to 32 MB) gets its own mmap, unmapped when freed, and memory
freed at the top of the heap beyond M_TRIM_THRESHOLD goes back to the kernel: the next op's arrays
are then new pages that the kernel zeroes on first touch (numpy asks for huge pages for big
arrays; here each fault cost ~60 µs). One VAE decode at 512×512 touched 2.9 GB of new pages
(25,000 faults): 1.5 s of system time, the decode 4.7–5.3 s; one U-Net step
(CFG) 0.3 s. With no mmap'd blocks (M_MMAP_MAX = 0) and no trimming below 2 GB, the heap keeps
what it has for the next op: system time 0.02 s, the decode 3.8–3.9 s, the U-Net step 4.05 → 3.85 s;
peak RSS +3 % (4.93 GB instead of 4.77 for a process that ran both). The price: the process keeps
the heap at its peak until it exits, as PyTorch's and other caching allocators do.

Set once, when the first CpuBackend is made; only on glibc, and not where the user chose malloc
settings (`MALLOC_*_` variables, `GLIBC_TUNABLES`) or another allocator (LD_PRELOAD): theirs win.
`GLIBC_TUNABLES=glibc.malloc.perturb=0` (glibc's default value) keeps glibc's behaviour. Where
image sizes change within a run the kept heap costs peak memory: a 512→1024 hires fix peaked
at 8.0 GB instead of 7.2.
"""
import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4             # mallopt parameters, <malloc.h>
TRIM_THRESHOLD = 2**31 - 1    # freed memory at the heap's top kept up to this (the largest int)
MMAP_MAX = 0                  # blocks of any size come from the heap

_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                  "GLIBC_TUNABLES", "LD_PRELOAD")
_done = None


def glibc():
    """The process's libc as a ctypes library if it is glibc, else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError, AttributeError):
        return None
    return ctypes.CDLL(None)


def keep_freed_memory():
    """Apply MMAP_MAX and TRIM_THRESHOLD (once per process). True if they were set here."""
    global _done
    if _done is None:
        libc = None if any(os.environ.get(name) for name in _USER_SETTINGS) else glibc()
        _done = bool(libc) and all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1
                                   for param, value in ((M_MMAP_MAX, MMAP_MAX),
                                                        (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _done
