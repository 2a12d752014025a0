"""Reading checkpoint files without torch: the two formats SD weights come in.

- safetensors (`safetensors_file.read_safetensors`): 8 bytes little-endian header length N, N
  bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the raw
  little-endian data; each tensor is a view into one `np.memmap` of the file.
- .ckpt, .pt, .bin (`torch_file.read_ckpt`): a PyTorch zip archive, `<top>/data.pkl` (the pickled
  object) and `<top>/data/<key>` (each storage's raw bytes). The pickle is run by a small
  unpickler of our own that knows the opcodes torch.save writes and resolves only the handful of
  globals that checkpoints, embeddings and LoRA files need, so no code from the file ever runs.

Every rule of each format is one check, and a file that breaks one raises one CheckpointError
naming the file and the rule: no other exception, no crash (scripts/fuzz_readers.py and
tests/test_fuzz_readers.py load mutated files by the hundred thousand to keep it so).
Finding a model and mapping its keys onto tinysd's modules is `tinysd.weights`' work.
"""
from __future__ import annotations

import math
import mmap
import reprlib

import numpy as np

MAX_DIMS = 64                          # NumPy's limit on an array's number of dimensions
MAX_BYTES = 1 << 62                    # no array, not even an empty or a broadcast one, claims more


def release_file_pages(x):
    """If x is a view of a read-only np.memmap (a tensor these readers returned), tell the OS this
    process no longer needs its pages (madvise DONTNEED): reading x to make a copy (the cpu
    backend's tap-major convs, a LoRA-patched weight) faulted them in, and they would otherwise
    count in the resident set next to the copy for as long as the file stays mapped. Nothing is
    lost: the pages are re-read from the file if x is touched again."""
    root = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    mm = getattr(root, "_mmap", None)
    if not isinstance(root, np.memmap) or mm is None or root.flags.writeable or not x.flags.c_contiguous:
        return
    start = x.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    start += root.offset % mmap.ALLOCATIONGRANULARITY           # the map starts at a granule
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE           # whole pages inside x only
    last = (start + x.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


class CheckpointError(ValueError):
    """A checkpoint file that is malformed, truncated, or asks for something not allowed."""


class _Malformed(Exception):
    """A broken rule, raised deep inside a reader; the reader's entry point adds the file's name
    and turns it into CheckpointError."""


def _short(value, limit=80):
    """A name, value or message from a file, shortened to one line for an error message (reprlib
    bounds the work on deeply nested values)."""
    text = value if isinstance(value, str) else str(value) if isinstance(value, BaseException) else reprlib.repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _claimed_bytes(shape, itemsize):
    """The bytes NumPy reserves room for: the product of the dimensions (zeros counted as ones)."""
    return math.prod(max(n, 1) for n in shape) * itemsize


def _bf16_to_f32(bits):
    """bfloat16 is the top half of a float32: shift the 16 bits up (exact). In place on the copy,
    so a 0-d array stays an array."""
    widened = bits.astype(np.uint32)
    widened <<= 16
    return widened.view(np.float32)


from tinysd.readers.safetensors_file import read_safetensors  # noqa: E402
from tinysd.readers.torch_file import read_ckpt  # noqa: E402

__all__ = ["CheckpointError", "read_safetensors", "read_ckpt"]
