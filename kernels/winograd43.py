"""3×3 convolution (stride 1) by Winograd F(4×4, 3×3) (Lavin & Gray 2016): `winograd.py`'s
scheme with 6×6 input tiles and 4×4 output tiles. NumPy twin: `NumpyBackend.conv2d`.

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

        Bᵀ = | 4  0 -5  0  1  0 |    G = |  1/4     0     0  |    Aᵀ = | 1  1  1  1  1  0 |
             | 0 -4 -4  1  1  0 |        | -1/6  -1/6  -1/6  |         | 0  1 -1  2 -2  0 |
             | 0  4 -4 -1  1  0 |        | -1/6   1/6  -1/6  |         | 0  1  1  4  4  0 |
             | 0 -2 -1  2  1  0 |        | 1/24  1/12   1/6  |         | 0  1 -1  8 -8  1 |
             | 0  2 -1 -2  1  0 |        | 1/24 -1/12   1/6  |
             | 0  4  0 -5  0  1 |        |  0     0      1   |

36 multiplies make 16 outputs, 2.25 per output instead of 9: 4× fewer multiply-adds than the
direct convolution, 1.8× fewer than F(2×2, 3×3), paid for with 36 GEMMs per chunk, bigger
transforms (weights too: 36·Cout·Cin per call) and less accuracy: the entries 4, 5, 8 and 1/24
grow the rounding error to ~1e-6 – 1e-5 relative, still far inside the 1e-4 of the parity tests.
`CpuBackend.conv2d` takes it for the big images (VAE decoder, U-Net's 64×64 level), where the
GEMMs dominate.
"""
import numpy as np
from numba import njit, prange

from tinysd.kernels.blas import gemm

F32 = np.float32


@njit(inline="always")
def _g(g0, g1, g2):
    """G applied to one column (or row) of 3: 6 values."""
    return (F32(0.25) * g0,
            F32(-1 / 6) * (g0 + g1 + g2),
            F32(-1 / 6) * (g0 - g1 + g2),
            F32(1 / 24) * g0 + F32(1 / 12) * g1 + F32(1 / 6) * g2,
            F32(1 / 24) * g0 - F32(1 / 12) * g1 + F32(1 / 6) * g2,
            g2)


@njit(parallel=True, cache=True)
def weight_transform(w, U):
    """w (Cout, 3, 3, Cin) tap-major -> U (36, Cout, Cin), U[6a + b] = (G g Gᵀ)[a, b]."""
    Cout, _, _, Cin = w.shape
    for o in prange(Cout):
        t = np.empty((6, 3), np.float32)                     # G g: 6 rows of 3
        for c in range(Cin):
            for j in range(3):
                t[0, j], t[1, j], t[2, j], t[3, j], t[4, j], t[5, j] = _g(w[o, 0, j, c], w[o, 1, j, c], w[o, 2, j, c])
            for a in range(6):                               # (G g) Gᵀ
                u0, u1, u2, u3, u4, u5 = _g(t[a, 0], t[a, 1], t[a, 2])
                U[6 * a + 0, o, c] = u0
                U[6 * a + 1, o, c] = u1
                U[6 * a + 2, o, c] = u2
                U[6 * a + 3, o, c] = u3
                U[6 * a + 4, o, c] = u4
                U[6 * a + 5, o, c] = u5


@njit(inline="always")
def _bt(d0, d1, d2, d3, d4, d5):
    """Bᵀ applied to one column (or row) of 6."""
    return (F32(4) * d0 - F32(5) * d2 + d4,
            -F32(4) * (d1 + d2) + d3 + d4,
            F32(4) * (d1 - d2) - d3 + d4,
            F32(2) * (d3 - d1) - d2 + d4,
            F32(2) * (d1 - d3) - d2 + d4,
            F32(4) * d1 - F32(5) * d3 + d5)


@njit(cache=True)
def input_transform(x, pt, pl, Ty, Tx, r0, V):
    """V[ξ, c, i] = (Bᵀ d B)[ξ] for the tiles of tile rows r0, r0 + 1, ... (tile row r = b·Ty + ty,
    tile i = (r − r0)·Tx + tx), d the 6×6 patch of x (B, Cin, H, W) at (4ty − pt, 4tx − pl), zero
    outside x. A tile row at a time, the tiles as SIMD lanes, as in `winograd.input_transform`."""
    B, Cin, H, W = x.shape
    rows = V.shape[2] // Tx
    L = 4 * Tx + 2                                   # input columns −pl … 4Tx + 1 − pl
    d = np.zeros((6, L), np.float32)
    e = np.empty((6, L), np.float32)
    width = min(W, L - pl)
    for c in range(Cin):
        for k in range(rows):
            r = r0 + k
            b, y0, i0 = r // Ty, 4 * (r % Ty) - pt, k * Tx
            for q in range(6):
                y = y0 + q
                if 0 <= y < H:
                    for j in range(width):
                        d[q, pl + j] = x[b, c, y, j]
                else:
                    d[q, pl:pl + width] = 0.0
            for j in range(L):                       # Bᵀ d: rows combined
                e[0, j], e[1, j], e[2, j], e[3, j], e[4, j], e[5, j] = _bt(
                    d[0, j], d[1, j], d[2, j], d[3, j], d[4, j], d[5, j])
            for a in range(6):                       # (Bᵀ d) B: columns combined, tile by tile
                for t in range(Tx):
                    s = 4 * t
                    v0, v1, v2, v3, v4, v5 = _bt(e[a, s], e[a, s + 1], e[a, s + 2], e[a, s + 3], e[a, s + 4], e[a, s + 5])
                    V[6 * a + 0, c, i0 + t] = v0
                    V[6 * a + 1, c, i0 + t] = v1
                    V[6 * a + 2, c, i0 + t] = v2
                    V[6 * a + 3, c, i0 + t] = v3
                    V[6 * a + 4, c, i0 + t] = v4
                    V[6 * a + 5, c, i0 + t] = v5


@njit(inline="always")
def _at(m0, m1, m2, m3, m4, m5):
    """Aᵀ applied to one column (or row) of 6: 4 values."""
    return (m0 + m1 + m2 + m3 + m4,
            m1 - m2 + F32(2) * (m3 - m4),
            m1 + m2 + F32(4) * (m3 + m4),
            m1 - m2 + F32(8) * (m3 - m4) + m5)


@njit(cache=True)
def output_transform(M, bias, Ty, Tx, r0, out):
    """out[b, o, 4ty + u, 4tx + v] = (Aᵀ m A)[u, v] + bias[o], m = M[:, o, i] as 6×6, for the tiles
    of tile rows r0, r0 + 1, ...; rows and columns past the output's edge are dropped. The row's
    four output rows are made in y (4, 4·Tx), the tiles as SIMD lanes, then copied into out."""
    B, Cout, Ho, Wo = out.shape
    rows = M.shape[2] // Tx
    y = np.empty((4, 4 * Tx), np.float32)
    p = np.empty((4, 6), np.float32)
    for o in range(Cout):
        for k in range(rows):
            r = r0 + k
            b, y0, i0 = r // Ty, 4 * (r % Ty), k * Tx
            for t in range(Tx):
                i = i0 + t
                for s in range(6):                   # Aᵀ m: 4 rows of 6
                    p[0, s], p[1, s], p[2, s], p[3, s] = _at(M[s, o, i], M[6 + s, o, i], M[12 + s, o, i],
                                                             M[18 + s, o, i], M[24 + s, o, i], M[30 + s, o, i])
                for u in range(4):                   # (Aᵀ m) A
                    y0u, y1u, y2u, y3u = _at(p[u, 0], p[u, 1], p[u, 2], p[u, 3], p[u, 4], p[u, 5])
                    y[u, 4 * t] = y0u + bias[o]
                    y[u, 4 * t + 1] = y1u + bias[o]
                    y[u, 4 * t + 2] = y2u + bias[o]
                    y[u, 4 * t + 3] = y3u + bias[o]
            for u in range(min(4, Ho - y0)):
                for j in range(Wo):
                    out[b, o, y0 + u, j] = y[u, j]


@njit(parallel=True, cache=True)
def conv3x3_kernel(x, U, bias, pt, pl, out, chunk):
    """As `winograd.conv3x3_kernel`, with U (36, Cout, Cin) from this file's `weight_transform`
    and tile rows of 4×4 output tiles."""
    B, Cout, Ho, Wo = out.shape
    Cin = x.shape[1]
    Ty, Tx = (Ho + 3) // 4, (Wo + 3) // 4
    R = B * Ty
    for k in prange((R + chunk - 1) // chunk):
        r0 = k * chunk
        n = min(chunk, R - r0) * Tx
        V = np.empty((36, Cin, n), np.float32)
        M = np.empty((36, Cout, n), np.float32)
        input_transform(x, pt, pl, Ty, Tx, r0, V)
        for xi in range(36):
            gemm(U[xi], V[xi], M[xi], 1.0, 0.0, False)
        output_transform(M, bias, Ty, Tx, r0, out)
