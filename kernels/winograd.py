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
adds per value, run a tile row at a time so that the tiles are the SIMD lanes. The tile rows of
the whole batch are cut into chunks; each chunk (transform in, 16
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


@njit(cache=True)
def input_transform(x, pt, pl, Ty, Tx, r0, V):
    """V[ξ, c, i] = (Bᵀ d B)[ξ] for the tiles of tile rows r0, r0 + 1, ... (tile row r = b·Ty + ty,
    tile i = (r − r0)·Tx + tx), where d is the 4×4 patch of x (B, Cin, H, W) whose top-left is
    (2ty − pt, 2tx − pl), zero outside x.

    A tile row at a time, so that every inner loop runs over the tiles of the row (SIMD lanes):
    the row's 4 input rows are copied zero-padded into d (4, 2·Tx + 2), Bᵀ combines them into e
    (same shape), and B then combines columns 2tx … 2tx + 3 of e into the tile's 16 values.
    """
    B, Cin, H, W = x.shape
    rows = V.shape[2] // Tx
    L = 2 * Tx + 2                                   # input columns −pl … 2Tx + 1 − pl
    d = np.zeros((4, L), np.float32)
    e = np.empty((4, L), np.float32)
    width = min(W, L - pl)
    for c in range(Cin):
        for k in range(rows):
            r = r0 + k
            b, y0, i0 = r // Ty, 2 * (r % Ty) - pt, k * Tx
            for q in range(4):
                y = y0 + q
                if 0 <= y < H:
                    for j in range(width):
                        d[q, pl + j] = x[b, c, y, j]
                else:
                    d[q, pl:pl + width] = 0.0
            for j in range(L):                       # Bᵀ d: rows combined
                e[0, j] = d[0, j] - d[2, j]
                e[1, j] = d[1, j] + d[2, j]
                e[2, j] = d[2, j] - d[1, j]
                e[3, j] = d[1, j] - d[3, j]
            for a in range(4):                       # (Bᵀ d) B: columns combined, tile by tile
                for t in range(Tx):
                    e0, e1, e2, e3 = e[a, 2 * t], e[a, 2 * t + 1], e[a, 2 * t + 2], e[a, 2 * t + 3]
                    V[4 * a + 0, c, i0 + t] = e0 - e2
                    V[4 * a + 1, c, i0 + t] = e1 + e2
                    V[4 * a + 2, c, i0 + t] = e2 - e1
                    V[4 * a + 3, c, i0 + t] = e1 - e3


@njit(cache=True)
def output_transform(M, bias, Ty, Tx, r0, out):
    """out[b, o, 2ty + u, 2tx + v] = (Aᵀ m A)[u, v] + bias[o] with m = M[:, o, i] as 4×4, for the
    tiles of tile rows r0, r0 + 1, ... (numbered as in `input_transform`); rows and columns past
    the output's edge are dropped. A tile row at a time: the row's two output rows are made in
    y (2, 2·Tx), the tiles as SIMD lanes, then copied into out."""
    B, Cout, Ho, Wo = out.shape
    rows = M.shape[2] // Tx
    y = np.empty((2, 2 * Tx), np.float32)
    for o in range(Cout):
        for k in range(rows):
            r = r0 + k
            b, y0, i0 = r // Ty, 2 * (r % Ty), k * Tx
            for t in range(Tx):
                i = i0 + t
                m = M[:, o, i]
                p0 = m[0] + m[4] + m[8]                 # Aᵀ m: row 0 (p) and row 1 (q) of 4
                p1 = m[1] + m[5] + m[9]
                p2 = m[2] + m[6] + m[10]
                p3 = m[3] + m[7] + m[11]
                q0 = m[4] - m[8] - m[12]
                q1 = m[5] - m[9] - m[13]
                q2 = m[6] - m[10] - m[14]
                q3 = m[7] - m[11] - m[15]
                y[0, 2 * t] = p0 + p1 + p2 + bias[o]    # (Aᵀ m) A
                y[0, 2 * t + 1] = p1 - p2 - p3 + bias[o]
                y[1, 2 * t] = q0 + q1 + q2 + bias[o]
                y[1, 2 * t + 1] = q1 - q2 - q3 + bias[o]
            for u in range(min(2, Ho - y0)):
                for j in range(Wo):
                    out[b, o, y0 + u, j] = y[u, j]


@njit(parallel=True, cache=True)
def conv3x3_kernel(x, U, bias, pt, pl, out, chunk):
    """x (B, Cin, H, W), U (16, Cout, Cin) from `weight_transform`, out (B, Cout, Ho, Wo):
    stride-1 3×3 convolution with padding (pt, pl) at the top and left (the bottom and right
    padding are implied by Ho, Wo). Tiles go `chunk` tile rows at a time, one chunk per prange
    task."""
    B, Cout, Ho, Wo = out.shape
    Cin = x.shape[1]
    Ty, Tx = (Ho + 1) // 2, (Wo + 1) // 2
    R = B * Ty                                       # tile rows of the whole batch
    for k in prange((R + chunk - 1) // chunk):
        r0 = k * chunk
        n = min(chunk, R - r0) * Tx
        V = np.empty((16, Cin, n), np.float32)
        M = np.empty((16, Cout, n), np.float32)
        input_transform(x, pt, pl, Ty, Tx, r0, V)
        for xi in range(16):
            gemm(U[xi], V[xi], M[xi], 1.0, 0.0, False)
        output_transform(M, bias, Ty, Tx, r0, out)
