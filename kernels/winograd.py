"""3×3 convolution (stride 1) by Winograd's minimal filtering algorithms F(2×2, 3×3) and
F(4×4, 3×3) (Lavin & Gray 2016). NumPy twin: `NumpyBackend.conv2d`.

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
adds per value, with the tiles as the SIMD lanes: the input transform a tile row at a time,
the output transform an output channel at a time over all the chunk's tiles (M[ξ, o] is a
contiguous row). Their inner loops read and write 1-D views from index 0, which LLVM vectorises
(see kernels/elementwise.py; the F(4×4) output transform, written tile row by tile row with
M[ξ, o, i0 + t], took 5× the time). The tile rows of the whole batch are cut into chunks; each
chunk (transform in, 16 GEMMs, transform out) runs on one core, the chunks in parallel
(`kernels/threads.py`), so there is one set of threads and BLAS runs single-threaded inside it
(the caller wraps the call in `blas_single_threaded()`). With few tiles and wide channels the
split goes the other way (`conv3x3_by_cout_kernel`): all tiles' V first, then blocks of output
channels in parallel. With fewer still (≤ 64, the U-Net's lower levels at batch 1) the GEMMs are
so thin that BLAS's copy of each U[ξ] into its packed layout, made on every call, costs as much
as the multiply: there (`conv3x3_dots_kernel`) blocks of 16 output channels make their U and
multiply it by `dot_products` while it is in cache. The weights are transformed on every call
(no second copy kept in memory): one pass that reads the weights and writes U once (1280×1280
channels on both cores: ~2.7 ms in F(2×2, 3×3), ~4.5 ms in F(4×4, 3×3), nearly as long over
weights already in cache, so the arithmetic and cache traffic bound it more than memory), which
pays when the tiles are many enough to amortise it; `CpuBackend.conv2d` checks before it picks
a Winograd path.

In float32 the transforms only add and halve, so the result stays within ~1e-6 of the direct
convolution's (the ±1 and ½ entries of F(2×2, 3×3) are why it is the accurate Winograd size).

F(4×4, 3×3) is the same scheme with 6×6 input tiles and 4×4 output tiles:

        Bᵀ = | 4  0 -5  0  1  0 |    G = |  1/4     0     0  |    Aᵀ = | 1  1  1  1  1  0 |
             | 0 -4 -4  1  1  0 |        | -1/6  -1/6  -1/6  |         | 0  1 -1  2 -2  0 |
             | 0  4 -4 -1  1  0 |        | -1/6   1/6  -1/6  |         | 0  1  1  4  4  0 |
             | 0 -2 -1  2  1  0 |        | 1/24  1/12   1/6  |         | 0  1 -1  8 -8  1 |
             | 0  2 -1 -2  1  0 |        | 1/24 -1/12   1/6  |
             | 0  4  0 -5  0  1 |        |  0     0      1   |

36 multiplies make 16 outputs, 2.25 per output instead of 9: 4× fewer multiply-adds than the
direct convolution, 1.8× fewer than F(2×2, 3×3), paid for with 36 GEMMs per chunk, bigger
transforms (the weights' too: 36·Cout·Cin values per call) and less accuracy: the entries 4, 5,
8 and 1/24 grow the rounding error to ~1e-6 – 2e-5 relative, still well inside the 1e-4 of the
parity tests. `CpuBackend.conv2d` takes it for the big images (VAE decoder, the U-Net's 64×64
level), where the GEMMs dominate, F(2×2, 3×3) for the middle sizes.
"""
import numpy as np
from numba import njit

from tinysd.kernels.blas import gemm

F32 = np.float32
G_F2 = np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], F32)
G_F4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], F32)


@njit(inline="always")
def _load_rows(x, b, c, y0, pl, width, d):
    """d[q, pl + j] = x[b, c, y0 + q, j] for the tile row's d.shape[0] input rows, j < width;
    rows outside x are zero (d's columns outside x stay zero from its allocation)."""
    H = x.shape[2]
    for q in range(d.shape[0]):
        y = y0 + q
        row = d[q, pl:pl + width]
        if 0 <= y < H:
            src = x[b, c, y, :width]
            for j in range(width):
                row[j] = src[j]
        else:
            for j in range(width):
                row[j] = 0.0


@njit(inline="always")
def _store_rows(y, Tx, Ty, r0, out, o):
    """out[b, o, m·ty + u, :] = y[u, m·Tx·k : m·Tx·k + Wo] for each tile row k = 0, 1, ... of y
    (tile row r = r0 + k = b·Ty + ty; y (m, m·tiles) holds the rows' m output rows side by side,
    m·Tx values per tile row), the rows that lie inside out."""
    Ho, Wo = out.shape[2], out.shape[3]
    m = y.shape[0]                                   # output tile side
    for k in range(y.shape[1] // (m * Tx)):
        r = r0 + k
        b, y0, c0 = r // Ty, m * (r % Ty), m * Tx * k
        for u in range(min(m, Ho - y0)):
            dst, src = out[b, o, y0 + u], y[u, c0:c0 + Wo]
            for j in range(Wo):
                dst[j] = src[j]


@njit(inline="always")
def _combine3(out, x0, x1, x2, a0, a1, a2):
    """out = a0·x0 + a1·x1 + a2·x2 for 1-D rows (read and written from index 0: vectorised)."""
    for c in range(out.shape[0]):
        out[c] = a0 * x0[c] + a1 * x1[c] + a2 * x2[c]


@njit(inline="always")
def _weight_transform(w, U, start, stop):
    """w (Cout, 3, 3, Cin) tap-major -> U (ξ, Cout, Cin) = G g Gᵀ for the output channels
    start … stop − 1; ξ = 16 (F(2×2, 3×3)) or 36 (F(4×4, 3×3)), as U's shape says. In two
    passes, each a combination of three rows over the input channels: t = G g (R × 3 rows,
    R = 4 or 6), then U[(i, j)] = Σ_k t[i, k] G[j, k]: one output channel reads 9 rows of w and
    writes 16 or 36 rows of U (Cin values each). One small GEMM per channel,
    (G ⊗ G) (ξ, 9) @ w[o] (9, Cin), took 12–28 % longer (640 × 1280 channels, F(2×2): 4.6 ms
    against 4.1 on one core)."""
    G = G_F2 if U.shape[0] == 16 else G_F4
    R = G.shape[0]
    t = np.empty((R, 3, w.shape[3]), np.float32)
    for o in range(start, stop):
        g = w[o]
        for i in range(R):                           # t = G g, column by column of g
            for k in range(3):
                _combine3(t[i, k], g[0, k], g[1, k], g[2, k], G[i, 0], G[i, 1], G[i, 2])
        for i in range(R):                           # U = t Gᵀ
            for j in range(R):
                _combine3(U[i * R + j, o], t[i, 0], t[i, 1], t[i, 2], G[j, 0], G[j, 1], G[j, 2])


@njit(nogil=True, error_model="numpy", cache=True)
def weight_transform(w, U, start, stop):
    """The parallel kernel of `_weight_transform`: output channels start … stop − 1."""
    _weight_transform(w, U, start, stop)


@njit(inline="always")
def input_transform_f2(x, pt, pl, Ty, Tx, r0, V, c0, c1):
    """V[ξ, c, i] = (Bᵀ d B)[ξ] for the channels c0 … c1 − 1 and the tiles of tile rows r0, r0 + 1,
    ... (tile row r = b·Ty + ty, tile i = (r − r0)·Tx + tx), where d is the 4×4 patch of x
    (B, Cin, H, W) whose top-left is (2ty − pt, 2tx − pl), zero outside x.

    A tile row at a time, so that every inner loop runs over the tiles of the row (SIMD lanes):
    the row's 4 input rows are copied zero-padded into d (4, 2·Tx + 2), Bᵀ combines them into e
    (same shape), and B then combines columns 2tx … 2tx + 3 of e into the tile's 16 values. For
    that last step each row of e is first split by column parity (ph[p, t] = e[a, 2t + p]), so
    that tile t reads ph[:, t] and ph[:, t + 1]: unit-stride loads, which LLVM vectorises, where
    the overlapping windows of e itself (stride 2) were left scalar.
    """
    B, Cin, H, W = x.shape
    rows = V.shape[2] // Tx
    L = 2 * Tx + 2                                   # input columns −pl … 2Tx + 1 − pl
    d = np.zeros((4, L), np.float32)
    e = np.empty((4, L), np.float32)
    ph = np.empty((2, Tx + 1), np.float32)
    width = min(W, L - pl)
    for c in range(c0, c1):
        for k in range(rows):
            r = r0 + k
            b, y0, i0 = r // Ty, 2 * (r % Ty) - pt, k * Tx
            _load_rows(x, b, c, y0, pl, width, d)
            for j in range(L):                       # Bᵀ d: rows combined
                e[0, j] = d[0, j] - d[2, j]
                e[1, j] = d[1, j] + d[2, j]
                e[2, j] = d[2, j] - d[1, j]
                e[3, j] = d[1, j] - d[3, j]
            for a in range(4):                       # (Bᵀ d) B: columns combined, tile by tile
                ea, p0, p1 = e[a], ph[0], ph[1]
                for t in range(Tx + 1):
                    p0[t], p1[t] = ea[2 * t], ea[2 * t + 1]
                v0, v1 = V[4 * a, c, i0:i0 + Tx], V[4 * a + 1, c, i0:i0 + Tx]
                v2, v3 = V[4 * a + 2, c, i0:i0 + Tx], V[4 * a + 3, c, i0:i0 + Tx]
                for t in range(Tx):                  # e0 … e3 = p0[t], p1[t], p0[t + 1], p1[t + 1]
                    v0[t] = p0[t] - p0[t + 1]
                    v1[t] = p1[t] + p0[t + 1]
                    v2[t] = p0[t + 1] - p1[t]
                    v3[t] = p1[t] - p1[t + 1]


@njit(inline="always")
def output_transform_f2(M, bias, Ty, Tx, r0, out):
    """out[b, o, 2ty + u, 2tx + v] = (Aᵀ m A)[u, v] + bias[o] with m = M[:, o, i] as 4×4, for the
    tiles of tile rows r0, r0 + 1, ... (numbered as in `input_transform_f2`); rows and columns past
    the output's edge are dropped. An output channel at a time, all its tiles as SIMD lanes: M's
    rows M[ξ, o] are read at unit stride, Aᵀ m goes to P (2, 4, tiles), (Aᵀ m) A + bias to y
    (2, 2·tiles): every tile row's two output rows side by side, then copied into out."""
    n = M.shape[2]                                   # tiles
    P = np.empty((2, 4, n), np.float32)              # rows p (0) and q (1) of Aᵀ m, by column s
    y = np.empty((2, 2 * n), np.float32)
    for o in range(out.shape[1]):
        for s in range(4):                           # Aᵀ m, column s: p = m0 + m1 + m2, q = m1 − m2 − m3
            m0, m1, m2, m3 = M[s, o], M[4 + s, o], M[8 + s, o], M[12 + s, o]
            p, q = P[0, s], P[1, s]
            for i in range(n):
                p[i] = m0[i] + m1[i] + m2[i]
                q[i] = m1[i] - m2[i] - m3[i]
        bo = bias[o]
        for u in range(2):                           # (Aᵀ m) A
            a0, a1, a2, a3, yu = P[u, 0], P[u, 1], P[u, 2], P[u, 3], y[u]
            for i in range(n):
                yu[2 * i] = a0[i] + a1[i] + a2[i] + bo
                yu[2 * i + 1] = a1[i] - a2[i] - a3[i] + bo
        _store_rows(y, Tx, Ty, r0, out, o)


@njit(inline="always")
def _bt6(d0, d1, d2, d3, d4, d5):
    """Bᵀ applied to one column (or row) of 6."""
    return (F32(4) * d0 - F32(5) * d2 + d4,
            -F32(4) * (d1 + d2) + d3 + d4,
            F32(4) * (d1 - d2) - d3 + d4,
            F32(2) * (d3 - d1) - d2 + d4,
            F32(2) * (d1 - d3) - d2 + d4,
            F32(4) * d1 - F32(5) * d3 + d5)


@njit(inline="always")
def input_transform_f4(x, pt, pl, Ty, Tx, r0, V, c0, c1):
    """V[ξ, c, i] = (Bᵀ d B)[ξ] for the channels c0 … c1 − 1 and the tiles of tile rows r0, r0 + 1,
    ... (tile row r = b·Ty + ty, tile i = (r − r0)·Tx + tx), d the 6×6 patch of x (B, Cin, H, W)
    at (4ty − pt, 4tx − pl), zero outside x. A tile row at a time, the tiles as SIMD lanes, as in
    `input_transform_f2`."""
    B, Cin, H, W = x.shape
    rows = V.shape[2] // Tx
    L = 4 * Tx + 2                                   # input columns −pl … 4Tx + 1 − pl
    d = np.zeros((6, L), np.float32)
    e = np.empty((6, L), np.float32)
    ph = np.empty((4, Tx + 1), np.float32)           # ph[p, t] = e[a, 4t + p] (p < 2 for t = Tx)
    width = min(W, L - pl)
    for c in range(c0, c1):
        for k in range(rows):
            r = r0 + k
            b, y0, i0 = r // Ty, 4 * (r % Ty) - pt, k * Tx
            _load_rows(x, b, c, y0, pl, width, d)
            for j in range(L):                       # Bᵀ d: rows combined
                e[0, j], e[1, j], e[2, j], e[3, j], e[4, j], e[5, j] = _bt6(
                    d[0, j], d[1, j], d[2, j], d[3, j], d[4, j], d[5, j])
            for a in range(6):                       # (Bᵀ d) B: columns combined, tile by tile
                ea, p0, p1, p2, p3 = e[a], ph[0], ph[1], ph[2], ph[3]
                for t in range(Tx):                  # split by column phase, as in input_transform_f2
                    p0[t], p1[t], p2[t], p3[t] = ea[4 * t], ea[4 * t + 1], ea[4 * t + 2], ea[4 * t + 3]
                p0[Tx], p1[Tx] = ea[4 * Tx], ea[4 * Tx + 1]
                w0, w1, w2 = V[6 * a, c, i0:i0 + Tx], V[6 * a + 1, c, i0:i0 + Tx], V[6 * a + 2, c, i0:i0 + Tx]
                w3, w4, w5 = V[6 * a + 3, c, i0:i0 + Tx], V[6 * a + 4, c, i0:i0 + Tx], V[6 * a + 5, c, i0:i0 + Tx]
                for t in range(Tx):                  # columns 4t … 4t + 5
                    w0[t], w1[t], w2[t], w3[t], w4[t], w5[t] = _bt6(p0[t], p1[t], p2[t], p3[t], p0[t + 1], p1[t + 1])


@njit(inline="always")
def _at6(m0, m1, m2, m3, m4, m5):
    """Aᵀ applied to one column (or row) of 6: 4 values."""
    return (m0 + m1 + m2 + m3 + m4,
            m1 - m2 + F32(2) * (m3 - m4),
            m1 + m2 + F32(4) * (m3 + m4),
            m1 - m2 + F32(8) * (m3 - m4) + m5)


@njit(inline="always")
def output_transform_f4(M, bias, Ty, Tx, r0, out):
    """out[b, o, 4ty + u, 4tx + v] = (Aᵀ m A)[u, v] + bias[o], m = M[:, o, i] as 6×6, for the tiles
    of tile rows r0, r0 + 1, ...; rows and columns past the output's edge are dropped. An output
    channel at a time, all its tiles as SIMD lanes, as in `output_transform_f2`: Aᵀ m into
    P (4, 6, tiles), (Aᵀ m) A + bias into y (4, 4·tiles), then copied into out."""
    n = M.shape[2]
    P = np.empty((4, 6, n), np.float32)
    y = np.empty((4, 4 * n), np.float32)
    for o in range(out.shape[1]):
        for s in range(6):                           # Aᵀ m, column s
            m0, m1, m2, m3, m4, m5 = M[s, o], M[6 + s, o], M[12 + s, o], M[18 + s, o], M[24 + s, o], M[30 + s, o]
            p0, p1, p2, p3 = P[0, s], P[1, s], P[2, s], P[3, s]
            for i in range(n):
                p0[i], p1[i], p2[i], p3[i] = _at6(m0[i], m1[i], m2[i], m3[i], m4[i], m5[i])
        bo = bias[o]
        for u in range(4):                           # (Aᵀ m) A
            a0, a1, a2, a3, a4, a5, yu = P[u, 0], P[u, 1], P[u, 2], P[u, 3], P[u, 4], P[u, 5], y[u]
            for i in range(n):
                y0u, y1u, y2u, y3u = _at6(a0[i], a1[i], a2[i], a3[i], a4[i], a5[i])
                yu[4 * i] = y0u + bo
                yu[4 * i + 1] = y1u + bo
                yu[4 * i + 2] = y2u + bo
                yu[4 * i + 3] = y3u + bo
        _store_rows(y, Tx, Ty, r0, out, o)


@njit(inline="always")
def _input_transform(x, pt, pl, Ty, Tx, r0, V, c0, c1):
    """`input_transform_f2` or `input_transform_f4`, as V's ξ (16 or 36) says."""
    if V.shape[0] == 16:
        input_transform_f2(x, pt, pl, Ty, Tx, r0, V, c0, c1)
    else:
        input_transform_f4(x, pt, pl, Ty, Tx, r0, V, c0, c1)


@njit(inline="always")
def _output_transform(M, bias, Ty, Tx, r0, out):
    """`output_transform_f2` or `output_transform_f4`, as M's ξ (16 or 36) says."""
    if M.shape[0] == 16:
        output_transform_f2(M, bias, Ty, Tx, r0, out)
    else:
        output_transform_f4(M, bias, Ty, Tx, r0, out)


@njit(inline="always")
def _multiply_and_output(U, V, bias, Ty, Tx, r0, out):
    """M[ξ] = U[ξ] @ V[ξ] for every ξ (the GEMMs), then out = Aᵀ M A + bias for the tiles of tile
    rows r0, r0 + 1, ... (`output_transform_f2` or `_f4`, as ξ says); out's channels are U's."""
    M = np.empty((U.shape[0], U.shape[1], V.shape[2]), np.float32)
    for xi in range(U.shape[0]):
        gemm(U[xi], V[xi], M[xi], 1.0, 0.0, False)
    _output_transform(M, bias, Ty, Tx, r0, out)


@njit(nogil=True, error_model="numpy", cache=True)
def conv3x3_kernel(x, U, bias, pt, pl, out, chunk, start, stop):
    """x (B, Cin, H, W), U from `weight_transform` ((16, Cout, Cin) or
    (36, Cout, Cin)), out (B, Cout, Ho, Wo): stride-1 3×3 convolution with padding (pt, pl) at the
    top and left (the bottom and right padding are implied by Ho, Wo), by F(2×2, 3×3) or
    F(4×4, 3×3) as U says. Tiles go `chunk` tile rows at a time, one chunk per task: tasks
    start … stop − 1 of the ⌈B·⌈Ho/m⌉ / chunk⌉."""
    B, Cout, Ho, Wo = out.shape
    Cin = x.shape[1]
    m = 2 if U.shape[0] == 16 else 4                 # output tile side
    Ty, Tx = (Ho + m - 1) // m, (Wo + m - 1) // m
    R = B * Ty                                       # tile rows of the whole batch
    for k in range(start, stop):
        r0 = k * chunk
        V = np.empty((U.shape[0], Cin, min(chunk, R - r0) * Tx), np.float32)
        _input_transform(x, pt, pl, Ty, Tx, r0, V, 0, Cin)
        _multiply_and_output(U, V, bias, Ty, Tx, r0, out)


@njit(nogil=True, error_model="numpy", cache=True)
def input_transform_kernel(x, pt, pl, Ty, Tx, V, start, stop):
    """V (ξ, Cin, B·Ty·Tx) for every tile of the batch (Ty × Tx tiles per image), channels
    start … stop − 1: the first half of a conv by output channels (`conv3x3_by_cout_kernel`);
    ξ = 16 for F(2×2, 3×3), 36 for F(4×4, 3×3)."""
    _input_transform(x, pt, pl, Ty, Tx, 0, V, start, stop)


@njit(nogil=True, error_model="numpy", cache=True)
def conv3x3_by_cout_kernel(w, V, bias, out, block, start, stop):
    """The second half of a Winograd conv whose input transform V (ξ, Cin, tiles) is done for the
    whole batch: task k makes output channels k·block … (k+1)·block − 1. It transforms their
    weights (U, ξ × block × Cin: 52 MB for F(2×2) with 640 × 1280 channels), multiplies U[ξ] @ V[ξ]
    for every ξ and turns the products into out[:, channels]. For convs with few tiles and many
    weights (the U-Net's 64×64 … 16×16 levels): the weights are read once, split between the
    cores, instead of the whole U once per chunk of tiles."""
    B, Cout, Ho, Wo = out.shape
    Cin = V.shape[1]
    m = 2 if V.shape[0] == 16 else 4
    Ty, Tx = (Ho + m - 1) // m, (Wo + m - 1) // m
    for k in range(start, stop):
        o0, o1 = k * block, min(Cout, (k + 1) * block)
        U = np.empty((V.shape[0], o1 - o0, Cin), np.float32)
        _weight_transform(w[o0:o1], U, 0, o1 - o0)
        _multiply_and_output(U, V, bias[o0:o1], Ty, Tx, 0, out[:, o0:o1])


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def dot_products(A, Bt, C):
    """C (m, n) = A (m, k) Btᵀ: every C[i, j] the dot product of rows A[i] and Bt[j], computed
    4 × 4 at a time so that each step along k loads 8 rows' values for 16 multiply-adds. With
    reassociation allowed (the fastmath flags) LLVM vectorises each dot product along k: 16
    vector accumulators, in registers. For thin products (n ≤ 64) whose A is made just before
    (`conv3x3_dots_kernel`): no packing of A, which BLAS would copy on every call. One core,
    operands in cache, GFLOP/s against OpenBLAS's sgemm: (16 × 1280) · (1280 × 64) 222 / 93,
    (16 × 1280) · (1280 × 16) 189 / 122, (16 × 640) · (640 × 64) 200 / 245. Blocks of 8 × 4 or
    2 × 4 ran 133 and 121 on the first; passes over k in chunks of 256 or 512 were no faster.
    Not inlined: its fastmath flags would be lost in a caller compiled without them."""
    m, k = A.shape
    n = Bt.shape[0]
    m4, n4 = m - m % 4, n - n % 4
    for i in range(0, m4, 4):
        a0, a1, a2, a3 = A[i], A[i + 1], A[i + 2], A[i + 3]
        for j in range(0, n4, 4):
            b0, b1, b2, b3 = Bt[j], Bt[j + 1], Bt[j + 2], Bt[j + 3]
            c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = F32(0)
            c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = F32(0)
            for p in range(k):
                x0, x1, x2, x3, y0, y1, y2, y3 = a0[p], a1[p], a2[p], a3[p], b0[p], b1[p], b2[p], b3[p]
                c00 += x0 * y0
                c01 += x0 * y1
                c02 += x0 * y2
                c03 += x0 * y3
                c10 += x1 * y0
                c11 += x1 * y1
                c12 += x1 * y2
                c13 += x1 * y3
                c20 += x2 * y0
                c21 += x2 * y1
                c22 += x2 * y2
                c23 += x2 * y3
                c30 += x3 * y0
                c31 += x3 * y1
                c32 += x3 * y2
                c33 += x3 * y3
            C[i, j], C[i, j + 1], C[i, j + 2], C[i, j + 3] = c00, c01, c02, c03
            C[i + 1, j], C[i + 1, j + 1], C[i + 1, j + 2], C[i + 1, j + 3] = c10, c11, c12, c13
            C[i + 2, j], C[i + 2, j + 1], C[i + 2, j + 2], C[i + 2, j + 3] = c20, c21, c22, c23
            C[i + 3, j], C[i + 3, j + 1], C[i + 3, j + 2], C[i + 3, j + 3] = c30, c31, c32, c33
    for i in range(m):                               # the last rows and columns, one dot at a time
        for j in range(n4 if i < m4 else 0, n):
            a, b = A[i], Bt[j]
            c = F32(0)
            for p in range(k):
                c += a[p] * b[p]
            C[i, j] = c


@njit(nogil=True, error_model="numpy", cache=True)
def conv3x3_dots_kernel(w, Vt, bias, out, block, start, stop):
    """The second half of a Winograd conv with few tiles (≤ 64: the U-Net's 8×8 … 32×32 levels at
    batch 1): Vt (ξ, tiles, Cin) is all tiles' input transform, turned so that each tile's
    values for one ξ are a row. Task k makes output channels k·block … (k+1)·block − 1 (block
    ~16): their U (ξ × block × Cin, 1–3 MB), M[ξ] = U[ξ] @ V[ξ] by `dot_products`, and out. The
    GEMMs of `conv3x3_by_cout_kernel` are thin here (N = tiles): BLAS copies each U[ξ] into its
    packed layout on every call, and U (~50 MB a core) goes out to memory and back; here it is
    used while it is in cache, never copied."""
    B, Cout, Ho, Wo = out.shape
    xi, tiles, Cin = Vt.shape
    m = 2 if xi == 16 else 4
    Ty, Tx = (Ho + m - 1) // m, (Wo + m - 1) // m
    for k in range(start, stop):
        o0, o1 = k * block, min(Cout, (k + 1) * block)
        U = np.empty((xi, o1 - o0, Cin), np.float32)        # contiguous: a view of a bigger
        M = np.empty((xi, o1 - o0, tiles), np.float32)      # buffer ran 8× slower, not vectorised
        _weight_transform(w[o0:o1], U, 0, o1 - o0)
        for x in range(xi):
            dot_products(U[x], Vt[x], M[x])
        _output_transform(M, bias[o0:o1], Ty, Tx, 0, out[:, o0:o1])
