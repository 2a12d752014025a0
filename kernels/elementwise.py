"""Elementwise kernels: SiLU, GELU, CLIP's quick GELU, GEGLU (alone and fused with the linear
before it), ReLU (TAESD), nearest 2× up-sampling, the image <-> tokens transpose. Each runs
tasks start … stop − 1 of its outer loop; `kernels/threads.py` spreads them over the cores.

Their NumPy twins are the methods of `tinysd.backend.NumpyBackend`. Numba calls libm's scalar
`expf`/`erff` (no SVML here), ~10× slower than a vector loop, so `exp` and `erf` below are
written as range reduction + polynomial in plain float32 arithmetic, which LLVM vectorises.

Inner loops index from 0 (a view `x[start:stop]`, then `xs[i]` for i in range(n)), never as
`x[start + i]`: Numba wraps negative indices around, and where it cannot see that an index is
≥ 0 each access carries that check, which keeps LLVM from vectorising the loop (ReLU 0.53 →
0.04 ns per value, GELU 1.0 → 0.21, in L2, one core). The views are 1-D rows: a loop over a
2-D slice `out[r0:r1, f0:f1]` was not vectorised either (linear + GEGLU 42 → 34 ms per call
with a row view `out[r0 + i, f0:f1]`). kernels/winograd.py follows the same rule.
"""
import numpy as np
from numba import njit

from tinysd.kernels.blas import gemm

F32 = np.float32
LOG2E = F32(1.4426950408889634)
LN2_HI, LN2_LO = F32(0.693359375), F32(-2.12194440e-4)   # ln 2 = hi + lo, hi exact in 9 bits


@njit(inline="always")
def exp(x):
    """eˣ in float32 to ~1 ulp (Cephes expf): x = n·ln2 + r, |r| ≤ ln2/2, eˣ = 2ⁿ·P(r).

    Clamped to [−87.3, 88.3] so 2ⁿ stays a normal float: below, eˣ ≈ 1e−38 instead of 0.
    """
    x = min(max(x, F32(-87.3)), F32(88.3))
    n = np.floor(x * LOG2E + F32(0.5))
    r = x - n * LN2_HI - n * LN2_LO
    p = F32(1.9875691500e-4)
    p = p * r + F32(1.3981999507e-3)
    p = p * r + F32(8.3334519073e-3)
    p = p * r + F32(4.1665795894e-2)
    p = p * r + F32(1.6666665459e-1)
    p = p * r + F32(5.0000001201e-1)
    p = p * r * r + r + F32(1.0)
    two_n = np.int32((np.int32(n) + 127) << 23).view(np.float32)   # 2ⁿ from its exponent bits
    return p * two_n


@njit(inline="always")
def erf(x):
    """erf(x) in float32 (Eigen's rational approximation, a few ulp): odd P(x)/Q(x²) on [−4, 4];
    outside that range erf is ±1 in float32."""
    x = min(max(x, F32(-4.0)), F32(4.0))
    x2 = x * x
    p = F32(-2.72614225801306e-10)
    p = p * x2 + F32(2.77068142495902e-08)
    p = p * x2 + F32(-2.10102402082508e-06)
    p = p * x2 + F32(-5.69250639462346e-05)
    p = p * x2 + F32(-7.34990630326855e-04)
    p = p * x2 + F32(-2.95459980854025e-03)
    p = p * x2 + F32(-1.60960333262415e-02)
    q = F32(-1.45660718464996e-05)
    q = q * x2 + F32(-2.13374055278905e-04)
    q = q * x2 + F32(-1.68282697438203e-03)
    q = q * x2 + F32(-7.37332916720468e-03)
    q = q * x2 + F32(-1.42647390514189e-02)
    return x * p / q


@njit(inline="always")
def sigmoid(x):
    return F32(1.0) / (F32(1.0) + exp(-x))


@njit(inline="always")
def silu(x):
    """x·σ(x)."""
    return x * sigmoid(x)


@njit(inline="always")
def gelu(x):
    """½x(1 + erf(x/√2))."""
    return F32(0.5) * x * (F32(1.0) + erf(x * F32(0.7071067811865476)))


@njit(inline="always")
def quick_gelu(x):
    """x·σ(1.702x)."""
    return x * sigmoid(F32(1.702) * x)


@njit(nogil=True, error_model="numpy", cache=True)
def silu_kernel(x, out, start, stop):
    """out[i] = silu(x[i]) for i in start … stop − 1 of the flat x, out."""
    xs, outs = x[start:stop], out[start:stop]
    for i in range(xs.size):
        outs[i] = silu(xs[i])


@njit(nogil=True, error_model="numpy", cache=True)
def gelu_kernel(x, out, start, stop):
    xs, outs = x[start:stop], out[start:stop]
    for i in range(xs.size):
        outs[i] = gelu(xs[i])


@njit(nogil=True, error_model="numpy", cache=True)
def quick_gelu_kernel(x, out, start, stop):
    xs, outs = x[start:stop], out[start:stop]
    for i in range(xs.size):
        outs[i] = quick_gelu(xs[i])


@njit(nogil=True, error_model="numpy", cache=True)
def geglu_kernel(x, out, start, stop):
    """x (M, 2F) -> out (M, F) = h·GELU(gate), h = x[:, :F], gate = x[:, F:]; rows start … stop − 1."""
    F = out.shape[1]
    for m in range(start, stop):
        h, gate, o = x[m, :F], x[m, F:], out[m]
        for f in range(F):
            o[f] = h[f] * gelu(gate[f])


@njit(nogil=True, error_model="numpy", cache=True)
def linear_geglu_kernel(x, w, bias, out, tile, start, stop):
    """out (N, F) = h·GELU(gate) with [h | gate] = x wᵀ + bias, x (N, K), w (2F, K): the GEGLU
    feed-forward's first half. The output goes in tiles of tile × tile, tasks start … stop − 1
    of them in row-major order; each makes its h and gate blocks by two single-threaded sgemm
    into scratch that stays in L2, so the (N, 2F) projection (84 MB in the U-Net's 64×64 blocks)
    is never written out and read back. The caller holds `blas_single_threaded()`."""
    N, F = out.shape
    n_f = (F + tile - 1) // tile
    for task in range(start, stop):
        r0, f0 = (task // n_f) * tile, (task % n_f) * tile
        r1, f1 = min(N, r0 + tile), min(F, f0 + tile)
        h = np.empty((r1 - r0, f1 - f0), np.float32)
        gate = np.empty((r1 - r0, f1 - f0), np.float32)
        bias_h, bias_gate = bias[f0:f1], bias[F + f0:F + f1]
        for i in range(r1 - r0):
            for j in range(f1 - f0):
                h[i, j] = bias_h[j]
                gate[i, j] = bias_gate[j]
        gemm(x[r0:r1], w[f0:f1], h, 1.0, 1.0, True)
        gemm(x[r0:r1], w[F + f0:F + f1], gate, 1.0, 1.0, True)
        for i in range(r1 - r0):
            o = out[r0 + i, f0:f1]
            for j in range(f1 - f0):
                o[j] = h[i, j] * gelu(gate[i, j])


@njit(nogil=True, error_model="numpy", cache=True)
def relu_kernel(x, out, start, stop):
    xs, outs = x[start:stop], out[start:stop]
    for i in range(xs.size):
        outs[i] = max(xs[i], F32(0.0))


@njit(nogil=True, error_model="numpy", cache=True)
def upsample_nearest2x_kernel(x, out, start, stop):
    """x (P, H, W) planes -> out (P, 2H, 2W), out[p, y, x] = x[p, y//2, x//2]; planes start … stop − 1."""
    P, H, W = x.shape
    for p in range(start, stop):
        for y in range(H):
            for j in range(W):
                v = x[p, y, j]
                out[p, 2 * y, 2 * j] = v
                out[p, 2 * y, 2 * j + 1] = v
                out[p, 2 * y + 1, 2 * j] = v
                out[p, 2 * y + 1, 2 * j + 1] = v


@njit(nogil=True, error_model="numpy", cache=True)
def transpose_kernel(x, out, start, stop):
    """out[b] = x[b]ᵀ for x (B, R, C), out (B, C, R), in 32×32 blocks so that both the reads and
    the writes stay within a few cache lines (a plain strided copy misses on every element).
    Task t = b·⌈R/32⌉ + (row block); tasks start … stop − 1."""
    B, R, C = x.shape
    nr, nc = (R + 31) // 32, (C + 31) // 32
    for task in range(start, stop):
        b, r0 = task // nr, (task % nr) * 32
        for cb in range(nc):
            c0 = cb * 32
            for c in range(c0, min(C, c0 + 32)):
                for r in range(r0, min(R, r0 + 32)):
                    out[b, c, r] = x[b, r, c]
