"""3×3 convolution (stride 1) by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2016).
NumPy twin: `NumpyBackend.conv2d`.

A 3×3 filter g slid over a 4×4 input tile d gives a 2×2 output tile; written with small fixed
matrices,

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

        Bᵀ = | 1  0 -1  0 |    G = | 1    0    0   |    Aᵀ = | 1  1  1  0 |
             | 0  1  1  0 |        | 1/2  1/2  1/2 |         | 0  1 -1 -1 |
             | 0 -1  1  0 |        | 1/2 -1/2  1/2 |
             | 0  1  0 -1 |        | 0    0    1   |

so 16 multiplies make 4 outputs instead of 36: 2.25× fewer multiply-adds. Over channels the
elementwise product becomes 16 matrix products, one per position ξ of the 4×4 tile:

    M[ξ] (Cout, tiles) = U[ξ] (Cout, Cin) @ V[ξ] (Cin, tiles),   U = G g Gᵀ,  V = Bᵀ d B

Those 16 GEMMs are where the time goes (BLAS sgemm); the transforms around them are a few
adds per value. The tiles of the whole batch are cut into chunks; each chunk (transform in, 16
GEMMs, transform out) runs on one core, the chunks in parallel (prange), so there is one thread
pool and BLAS runs single-threaded inside it (the caller wraps the call in
`blas_single_threaded()`). The weights are transformed on every call (no second copy kept in
memory): worth it only when the tiles outnumber the output channels by far, which
`CpuBackend.conv2d` checks before it picks this path.

In float32 the transforms only add and halve, so the result stays within ~1e-6 of the direct
convolution's (the ±1 and ½ entries of F(2×2, 3×3) are why it is the accurate Winograd size).
"""
import numpy as np
from numba import njit, prange

from tinysd.kernels.blas import gemm


@njit(parallel=True, cache=True)
def weight_transform(w, U):
    """w (Cout, 3, 3, Cin) tap-major -> U (16, Cout, Cin), U[4a + b] = (G g Gᵀ)[a, b]."""
    Cout, _, _, Cin = w.shape
    for o in prange(Cout):
        for c in range(Cin):
            t = np.empty((4, 3), np.float32)                 # G g: 4 rows of 3
            for j in range(3):
                g0, g1, g2 = w[o, 0, j, c], w[o, 1, j, c], w[o, 2, j, c]
                t[0, j] = g0
                t[1, j] = 0.5 * (g0 + g1 + g2)
                t[2, j] = 0.5 * (g0 - g1 + g2)
                t[3, j] = g2
            for a in range(4):                               # (G g) Gᵀ
                g0, g1, g2 = t[a, 0], t[a, 1], t[a, 2]
                U[4 * a + 0, o, c] = g0
                U[4 * a + 1, o, c] = 0.5 * (g0 + g1 + g2)
                U[4 * a + 2, o, c] = 0.5 * (g0 - g1 + g2)
                U[4 * a + 3, o, c] = g2


@njit(inline="always")
def _bt(d0, d1, d2, d3):
    """Bᵀ applied to one column (or row) of 4."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(cache=True)
def input_transform(x, pt, pl, Ty, Tx, t0, V):
    """V[ξ, c, i] = (Bᵀ d B)[ξ] for tiles t0 + i, tile t = (b·Ty + ty)·Tx + tx, where d is the
    4×4 patch of x (B, Cin, H, W) whose top-left is (2ty − pt, 2tx − pl), zero outside x."""
    B, Cin, H, W = x.shape
    n = V.shape[2]
    d = np.empty((4, 4), np.float32)
    for c in range(Cin):
        for i in range(n):
            t = t0 + i
            b, ty, tx = t // (Ty * Tx), (t // Tx) % Ty, t % Tx
            y0, x0 = 2 * ty - pt, 2 * tx - pl
            if 0 <= y0 and y0 + 4 <= H and 0 <= x0 and x0 + 4 <= W:
                for r in range(4):
                    for s in range(4):
                        d[r, s] = x[b, c, y0 + r, x0 + s]
            else:
                for r in range(4):
                    for s in range(4):
                        y, xx = y0 + r, x0 + s
                        d[r, s] = x[b, c, y, xx] if 0 <= y < H and 0 <= xx < W else 0.0
            for s in range(4):                               # Bᵀ d, column by column
                d[0, s], d[1, s], d[2, s], d[3, s] = _bt(d[0, s], d[1, s], d[2, s], d[3, s])
            for r in range(4):                               # (Bᵀ d) B, row by row
                v0, v1, v2, v3 = _bt(d[r, 0], d[r, 1], d[r, 2], d[r, 3])
                V[4 * r + 0, c, i] = v0
                V[4 * r + 1, c, i] = v1
                V[4 * r + 2, c, i] = v2
                V[4 * r + 3, c, i] = v3


@njit(cache=True)
def output_transform(M, bias, Ty, Tx, t0, out):
    """out[b, o, 2ty + u, 2tx + v] = (Aᵀ m A)[u, v] + bias[o] with m = M[:, o, i] as 4×4, for
    tiles t0 + i; rows and columns past the output's edge are dropped."""
    B, Cout, Ho, Wo = out.shape
    n = M.shape[2]
    for o in range(Cout):
        for i in range(n):
            t = t0 + i
            b, ty, tx = t // (Ty * Tx), (t // Tx) % Ty, t % Tx
            y, xx = 2 * ty, 2 * tx
            q = np.empty(8, np.float32)                      # Aᵀ m: 2 rows of 4
            for s in range(4):
                m0, m1, m2, m3 = M[s, o, i], M[4 + s, o, i], M[8 + s, o, i], M[12 + s, o, i]
                q[s] = m0 + m1 + m2
                q[4 + s] = m1 - m2 - m3
            for u in range(2):
                if y + u < Ho:
                    r0, r1, r2, r3 = q[4 * u], q[4 * u + 1], q[4 * u + 2], q[4 * u + 3]
                    out[b, o, y + u, xx] = r0 + r1 + r2 + bias[o]
                    if xx + 1 < Wo:
                        out[b, o, y + u, xx + 1] = r1 - r2 - r3 + bias[o]


@njit(parallel=True, cache=True)
def conv3x3_kernel(x, U, bias, pt, pl, out, chunk):
    """x (B, Cin, H, W), U (16, Cout, Cin) from `weight_transform`, out (B, Cout, Ho, Wo):
    stride-1 3×3 convolution with padding (pt, pl) at the top and left (the bottom and right
    padding are implied by Ho, Wo). Tiles go `chunk` at a time, one chunk per prange task."""
    B, Cout, Ho, Wo = out.shape
    Cin = x.shape[1]
    Ty, Tx = (Ho + 1) // 2, (Wo + 1) // 2
    T = B * Ty * Tx
    for k in prange((T + chunk - 1) // chunk):
        t0 = k * chunk
        n = min(chunk, T - t0)
        V = np.empty((16, Cin, n), np.float32)
        M = np.empty((16, Cout, n), np.float32)
        input_transform(x, pt, pl, Ty, Tx, t0, V)
        for xi in range(16):
            gemm(U[xi], V[xi], M[xi], 1.0, 0.0, False)
        output_transform(M, bias, Ty, Tx, t0, out)
