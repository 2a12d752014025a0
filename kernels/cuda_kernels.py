"""numba.cuda kernels of the `cuda` backend, each the GPU twin of a `NumpyBackend` method.

Imported only by `CudaBackend()` (after the GPU check), so importing `tinysd.kernels` never
touches the CUDA driver. Every kernel also runs in numba's CUDA simulator
(`NUMBA_ENABLE_CUDASIM=1`): no warp shuffles, only shared memory and `syncthreads`.

numba.cuda has no tensor-core access, so the matmul-shaped work (linear, conv, attention) is
fp32 SIMT and its speed comes from tiling: a block stages a BM×BK slice of A and a BK×BN slice
of B in shared memory, and each thread keeps a TM×TN patch of C in registers, so every value
read from shared memory feeds TM (or TN) multiply-adds.

All arrays are C-contiguous float32 on the device; the launchers at the bottom take numba
device arrays and pick grids and tile shapes.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from numba import cuda, float32

F0, F1, HALF = np.float32(0.0), np.float32(1.0), np.float32(0.5)
INV_SQRT2, QUICK = np.float32(1.0 / math.sqrt(2.0)), np.float32(1.702)
NEG_INF = np.float32(-np.inf)
THREADS = 256           # threads per block of the 1-D kernels (a power of two for the tree sums)


def _blocks(n, threads=THREADS):
    return max(1, min((n + threads - 1) // threads, 65535))


# -- elementwise ---------------------------------------------------------------------------------
SILU, GELU, QUICK_GELU = 0, 1, 2
ADD, SUB, MUL, DIV = 0, 1, 2, 3


@cuda.jit(device=True)
def _sigmoid(x):
    return F1 / (F1 + math.exp(-x))


@cuda.jit(device=True)
def _gelu(x):
    """x·Φ(x) = ½x(1 + erf(x/√2)), as NumpyBackend.gelu."""
    return HALF * x * (F1 + math.erf(x * INV_SQRT2))


@cuda.jit(device=True)
def _activation(op, x):
    if op == SILU:
        return x * _sigmoid(x)
    if op == GELU:
        return _gelu(x)
    return x * _sigmoid(QUICK * x)


@cuda.jit
def activation_kernel(op, x, out):
    """out = act(x) elementwise on flat arrays; act ∈ {SiLU, GELU, quick GELU}."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        out[i] = _activation(op, x[i])


@cuda.jit(device=True)
def _binary(op, a, b):
    if op == ADD:
        return a + b
    if op == SUB:
        return a - b
    if op == MUL:
        return a * b
    return a / b


@cuda.jit
def binary_kernel(op, a, b, out, shape, sa, sb):
    """out = a ∘ b with NumPy broadcasting over 4 axes.

    a, b, out are flat; `shape` is out's shape padded to 4 axes, `sa`/`sb` the element strides of
    a and b in that shape, 0 along an axis they broadcast over (a (B,C,H,W) + b (B,C,1,1)).
    """
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        r = i
        ia, ib = 0, 0
        for ax in range(3, -1, -1):
            idx = r % shape[ax]
            r //= shape[ax]
            ia += idx * sa[ax]
            ib += idx * sb[ax]
        out[i] = _binary(op, a[ia], b[ib])


@cuda.jit
def scalar_kernel(op, a, s, reverse, out):
    """out = a ∘ s (or s ∘ a when `reverse`) for a float32 scalar s."""
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = _binary(op, s, a[i]) if reverse else _binary(op, a[i], s)


@cuda.jit
def geglu_kernel(x, out):
    """GEGLU, as NumpyBackend.geglu: x (M, 2F) = [h | gate] -> out (M, F) = h·GELU(gate)."""
    F = out.shape[1]
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        m, f = i // F, i % F
        out[m, f] = x[m, f] * _gelu(x[m, F + f])


# -- normalisation -------------------------------------------------------------------------------
@cuda.jit(device=True)
def _block_sum(buf, v):
    """Sum of `v` over the block's THREADS threads: a tree in shared memory (no warp shuffles)."""
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    s = THREADS // 2
    while s > 0:
        if t < s:
            buf[t] += buf[t + s]
        cuda.syncthreads()
        s //= 2
    total = buf[0]
    cuda.syncthreads()      # everyone has read buf[0] before the next sum overwrites it
    return total


@cuda.jit
def norm_kernel(x, gamma, beta, groups, hw, eps, silu, out):
    """Normalise each row of x (R, L), then affine (and SiLU): one block per row.

    Group norm: a row is one (batch, group): L = (C/G)·H·W contiguous values, element i has
    channel c = (row mod G)·(C/G) + i // (H·W). Layer norm: groups = 1, hw = 1, so c = i.
    y = (x − μ) / √(σ² + eps) · γ_c + β_c, with σ² from a second pass over (x − μ)² (exact, no
    cancellation as in E[x²] − μ²).
    """
    buf = cuda.shared.array(THREADS, float32)
    row, t = cuda.blockIdx.x, cuda.threadIdx.x
    L = x.shape[1]
    s = F0
    for i in range(t, L, THREADS):
        s += x[row, i]
    mean = _block_sum(buf, s) / float32(L)
    s = F0
    for i in range(t, L, THREADS):
        d = x[row, i] - mean
        s += d * d
    rstd = F1 / math.sqrt(_block_sum(buf, s) / float32(L) + eps)
    c0 = (row % groups) * (L // hw)
    for i in range(t, L, THREADS):
        c = c0 + i // hw
        y = (x[row, i] - mean) * rstd * gamma[c] + beta[c]
        out[row, i] = y * _sigmoid(y) if silu else y


# -- tiled GEMM: linear and implicit-GEMM convolution ----------------------------------------------
@lru_cache(maxsize=None)
def gemm_kernels(BM, BN, BK, TM, TN):
    """Compile-time tile shapes -> (linear_kernel, conv2d_kernel), both with (BM/TM)·(BN/TN) threads.

    Thread (ty, tx) owns C rows ty + i·(BM/TM) and columns tx + j·(BN/TN): strided rather than
    blocked, so the threads of a warp read consecutive shared-memory words (no bank conflicts)
    and write consecutive columns of C (coalesced).
    """
    NTX, NTY = BN // TN, BM // TM
    NT = NTX * NTY
    assert BM % TM == 0 and BN % TN == 0 and NT % BK == 0 and NT % BN == 0, "bad GEMM tile"

    @cuda.jit(device=True)
    def multiply_tiles(As, Bs, acc, ty, tx):
        """acc (TM, TN) += As[:, rows]ᵀ · Bs[:, cols]: the inner product over one BK slice."""
        a = cuda.local.array(TM, float32)
        b = cuda.local.array(TN, float32)
        for kk in range(BK):
            for i in range(TM):
                a[i] = As[kk, ty + i * NTY]
            for j in range(TN):
                b[j] = Bs[kk, tx + j * NTX]
            for i in range(TM):
                for j in range(TN):
                    acc[i, j] += a[i] * b[j]

    @cuda.jit
    def linear_kernel(A, W, bias, has_bias, C):
        """C (M, N) = A (M, K) · Wᵀ + b, W (N, K) as torch.nn.Linear stores it (NumpyBackend.linear)."""
        As = cuda.shared.array((BK, BM), float32)     # As[k, m] = A[m0 + m, k0 + k]
        Bs = cuda.shared.array((BK, BN), float32)     # Bs[k, n] = W[n0 + n, k0 + k]
        acc = cuda.local.array((TM, TN), float32)
        M, K = A.shape
        N = W.shape[0]
        t = cuda.threadIdx.x
        ty, tx = t // NTX, t % NTX
        m0, n0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = F0
        kk, r0 = t % BK, t // BK          # this thread loads column kk, rows r0, r0 + NT/BK, ...
        for k0 in range(0, K, BK):
            k = k0 + kk
            for r in range(r0, BM, NT // BK):
                m = m0 + r
                As[kk, r] = A[m, k] if m < M and k < K else F0
            for r in range(r0, BN, NT // BK):
                n = n0 + r
                Bs[kk, r] = W[n, k] if n < N and k < K else F0
            cuda.syncthreads()
            multiply_tiles(As, Bs, acc, ty, tx)
            cuda.syncthreads()
        for i in range(TM):
            m = m0 + ty + i * NTY
            for j in range(TN):
                n = n0 + tx + j * NTX
                if m < M and n < N:
                    C[m, n] = acc[i, j] + bias[n] if has_bias else acc[i, j]

    @cuda.jit
    def conv2d_kernel(x, Wf, bias, has_bias, kh, kw, stride, pt, pl, Wo, out):
        """Convolution as an implicit GEMM (NumpyBackend.conv2d), no im2col buffer in memory.

        out[b, co, p] = Σ_k Wf[co, k] · X[k, (b, p)] + bias[co], with Wf = weight.reshape(Cout,
        Cin·kh·kw), k = (ci, i, j), p = oy·Wo + ox, and X[k, (b, p)] = x[b, ci, oy·s + i − pt,
        ox·s + j − pl] (zero outside x): M = Cout, N = B·Ho·Wo, K = Cin·kh·kw. out is
        (B, Cout, Ho·Wo), the output image with its pixels flattened.
        """
        As = cuda.shared.array((BK, BM), float32)
        Bs = cuda.shared.array((BK, BN), float32)
        acc = cuda.local.array((TM, TN), float32)
        B, Cin, H, W = x.shape
        _, Cout, P = out.shape
        M, K = Cout, Wf.shape[1]
        N = B * P
        t = cuda.threadIdx.x
        ty, tx = t // NTX, t % NTX
        m0, n0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = F0
        ka, ra = t % BK, t // BK          # A loads: column ka, rows ra, ra + NT/BK, ...
        nb, kb = t % BN, t // BN          # B loads: column nb (fixed pixel), rows kb, kb + NT/BN, ...
        n = n0 + nb
        b, p = n // P, n % P
        iy0 = (p // Wo) * stride - pt     # top-left input pixel of this output pixel's window
        ix0 = (p % Wo) * stride - pl
        taps = kh * kw
        for k0 in range(0, K, BK):
            k = k0 + ka
            for r in range(ra, BM, NT // BK):
                m = m0 + r
                As[ka, r] = Wf[m, k] if m < M and k < K else F0
            for r in range(kb, BK, NT // BN):
                k = k0 + r
                v = F0
                if n < N and k < K:
                    ci, tap = k // taps, k % taps
                    iy, ix = iy0 + tap // kw, ix0 + tap % kw
                    if 0 <= iy < H and 0 <= ix < W:
                        v = x[b, ci, iy, ix]
                Bs[r, nb] = v
            cuda.syncthreads()
            multiply_tiles(As, Bs, acc, ty, tx)
            cuda.syncthreads()
        for i in range(TM):
            m = m0 + ty + i * NTY
            for j in range(TN):
                n = n0 + tx + j * NTX
                if m < M and n < N:
                    b, p = n // P, n % P
                    out[b, m, p] = acc[i, j] + bias[m] if has_bias else acc[i, j]

    return linear_kernel, conv2d_kernel


# Big tiles (8×8 outputs per thread) where there are enough of them to fill the GPU, 4×4 else.
GEMM_BIG = (128, 128, 8, 8, 8)
GEMM_SMALL = (64, 64, 8, 4, 4)
GEMM_BIG_MIN_BLOCKS = 256     # ≈ 2 blocks per SM on an H100 (132 SMs)


def pick_gemm_tile(M, N):
    big = -(-M // GEMM_BIG[0]) * -(-N // GEMM_BIG[1])
    return GEMM_BIG if big >= GEMM_BIG_MIN_BLOCKS else GEMM_SMALL


def _gemm_launch(tile, M, N):
    BM, BN, _, TM, TN = tile
    return (-(-N // BN), -(-M // BM)), (BM // TM) * (BN // TN)


def linear(a, w, bias, out, tile=None):
    """out (M, N) = a (M, K) · wᵀ (+ bias (N,)), all device arrays."""
    M, N = out.shape
    tile = tile or pick_gemm_tile(M, N)
    grid, threads = _gemm_launch(tile, M, N)
    kernel = gemm_kernels(*tile)[0]
    kernel[grid, threads](a, w, w if bias is None else bias, bias is not None, out)


def conv2d(x, weight, bias, stride, pt, pl, out, tile=None):
    """out (B, Cout, Ho, Wo) = conv(x (B, Cin, H, W), weight (Cout, Cin, kh, kw)) + bias."""
    Cout, Cin, kh, kw = weight.shape
    B, _, Ho, Wo = out.shape
    M, N = Cout, B * Ho * Wo
    tile = tile or pick_gemm_tile(M, N)
    grid, threads = _gemm_launch(tile, M, N)
    kernel = gemm_kernels(*tile)[1]
    wf = weight.reshape(Cout, Cin * kh * kw)
    kernel[grid, threads](x, wf, wf if bias is None else bias, bias is not None,
                          kh, kw, stride, pt, pl, Wo, out.reshape(B, Cout, Ho * Wo))


@cuda.jit(device=True)
def _fmax(a, b):
    """max of two floats (the builtin max does not compile for numba 0.68's CUDA target)."""
    return a if a > b else b


# -- fused attention (flash attention: online softmax, one pass over K/V tiles) --------------------
@lru_cache(maxsize=None)
def attention_kernel(D, BQ, BK, TX):
    """Compile-time (head dim D, BQ queries per block, BK keys per tile, TX threads per query row).

    A block holds BQ query rows of one (batch, head) and walks the keys in tiles of BK. Thread
    (qy, tx) scores keys tx, tx+TX, ... of the tile for query qy, and owns output dims tx, tx+TX,
    ... of that row. The softmax runs online (Milakov & Gimelshein 2018; FlashAttention): with the
    running max m and sum l of a row, a new tile of scores s gives
        m' = max(m, max s),  p = exp(s − m'),  l' = l·exp(m − m') + Σp,  o' = o·exp(m − m') + p·V
    and the output is o / l: the (Nq, Nk) score matrix never exists.
    """
    NT = BQ * TX
    SK = -(-BK // TX)                 # scores per thread per tile
    E = -(-D // TX)                   # output dims per thread

    @cuda.jit(device=True)
    def row_reduce(red, qy, tx, v, is_max):
        """Max or sum of `v` over the TX threads of query row qy (shared memory, no shuffles)."""
        red[qy, tx] = v
        cuda.syncthreads()
        r = red[qy, 0]
        for i in range(1, TX):
            r = _fmax(r, red[qy, i]) if is_max else r + red[qy, i]
        cuda.syncthreads()
        return r

    @cuda.jit
    def kernel(q, k, v, heads, scale, causal, out):
        """q (B, Nq, heads·D), k and v (B, Nk, heads·D) -> out (B, Nq, heads·D), as
        NumpyBackend.attention. Grid: (query tiles, B·heads)."""
        Qs = cuda.shared.array((BQ, D), float32)
        KVs = cuda.shared.array((BK, D), float32)       # the K tile, then the V tile
        Ps = cuda.shared.array((BQ, BK), float32)       # exp(s − m') of this tile
        red = cuda.shared.array((BQ, TX), float32)
        s = cuda.local.array(SK, float32)
        o = cuda.local.array(E, float32)
        Nq, Nk = q.shape[1], k.shape[1]
        bh = cuda.blockIdx.y
        b, c0 = bh // heads, (bh % heads) * D
        q0 = cuda.blockIdx.x * BQ
        t = cuda.threadIdx.x
        qy, tx = t // TX, t % TX
        qi = q0 + qy
        for i in range(t, BQ * D, NT):                 # Q tile, pre-scaled by 1/√D
            r, d = i // D, i % D
            Qs[r, d] = q[b, q0 + r, c0 + d] * scale if q0 + r < Nq else F0
        for e in range(E):
            o[e] = F0
        m, l = NEG_INF, F0
        k_end = Nk
        if causal and q0 + BQ < Nk:                    # later keys are masked for every row
            k_end = q0 + BQ
        for k0 in range(0, k_end, BK):
            for i in range(t, BK * D, NT):
                r, d = i // D, i % D
                KVs[r, d] = k[b, k0 + r, c0 + d] if k0 + r < Nk else F0
            cuda.syncthreads()
            s_max = NEG_INF
            for j in range(SK):
                c = tx + j * TX
                kj = k0 + c
                sc = NEG_INF
                if c < BK and kj < Nk and not (causal and kj > qi):
                    sc = F0
                    for d in range(D):
                        sc += Qs[qy, d] * KVs[c, d]
                s[j] = sc
                s_max = _fmax(s_max, sc)
            m_new = _fmax(m, row_reduce(red, qy, tx, s_max, True))
            alpha = F1 if m_new == NEG_INF else math.exp(m - m_new)
            p_sum = F0
            for j in range(SK):
                c = tx + j * TX
                if c < BK:
                    p = F0 if s[j] == NEG_INF else math.exp(s[j] - m_new)
                    Ps[qy, c] = p
                    p_sum += p
            l = l * alpha + row_reduce(red, qy, tx, p_sum, False)
            m = m_new
            for i in range(t, BK * D, NT):             # row_reduce synced: K is no longer read
                r, d = i // D, i % D
                KVs[r, d] = v[b, k0 + r, c0 + d] if k0 + r < Nk else F0
            cuda.syncthreads()
            for e in range(E):
                d = tx + e * TX
                if d < D:
                    acc = o[e] * alpha
                    for c in range(BK):
                        acc += Ps[qy, c] * KVs[c, d]
                    o[e] = acc
            cuda.syncthreads()
        if qi < Nq:
            for e in range(E):
                d = tx + e * TX
                if d < D:
                    out[b, qi, c0 + d] = o[e] / l

    return kernel


def pick_attention_tile(D):
    """(BQ, BK, TX) for head dim D: static shared memory (BQ + BK)·D floats must stay under 48 KiB.

    SD v1 uses D = 40, 80, 160 (U-Net, 8 heads), 64 (CLIP), 512 (VAE mid-block, one head).
    """
    if D <= 64:
        return 32, 32, 8
    if D <= 160:
        return 16, 32, 16
    if D <= 512:
        return 4, 16, 32
    raise ValueError(f"cuda attention: head dim {D} > 512 does not fit the kernel's shared memory")


def attention(q, k, v, heads, causal, out, tile=None):
    B, Nq, C = q.shape
    D = C // heads
    BQ, BK, TX = tile or pick_attention_tile(D)
    kernel = attention_kernel(D, BQ, BK, TX)
    kernel[(-(-Nq // BQ), B * heads), BQ * TX](q, k, v, heads, np.float32(1.0 / math.sqrt(D)),
                                               causal, out)


# -- data movement -------------------------------------------------------------------------------
@cuda.jit
def upsample_nearest2x_kernel(x, out):
    """out (R, 2H, 2W) from x (R, H, W), R = B·C: out[r, y, x] = x[r, y // 2, x // 2]."""
    _, H2, W2 = out.shape
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        r, yx = i // (H2 * W2), i % (H2 * W2)
        out[r, yx // W2, yx % W2] = x[r, yx // W2 // 2, yx % W2 // 2]


@cuda.jit
def copy_columns_kernel(src, dst, offset):
    """dst[o, offset + j] = src[o, j]: one input of a concatenation viewed as (outer, inner)."""
    n = src.shape[1]
    for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        dst[i // n, offset + i % n] = src[i // n, i % n]


@cuda.jit
def copy_4d_kernel(src, dst):
    """dst = src for a strided 4-D view src (a crop) into the contiguous dst of the same shape."""
    _, C, H, W = dst.shape
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        b, chw = i // (C * H * W), i % (C * H * W)
        dst[b, chw // (H * W), chw % (H * W) // W, chw % W] = src[b, chw // (H * W), chw % (H * W) // W, chw % W]


TILE, TILE_PADDED = 32, 33


@cuda.jit
def transpose_kernel(x, out):
    """out (B, C, R) = x (B, R, C) transposed per batch, through a 32×33 shared tile so that both
    the read and the write are coalesced (the extra column avoids bank conflicts). Block 32×8."""
    tile = cuda.shared.array((TILE, TILE_PADDED), float32)
    b = cuda.blockIdx.z
    R, C = x.shape[1], x.shape[2]
    r0, c0 = cuda.blockIdx.y * TILE, cuda.blockIdx.x * TILE
    tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
    for dy in range(ty, TILE, 8):
        if r0 + dy < R and c0 + tx < C:
            tile[dy, tx] = x[b, r0 + dy, c0 + tx]
    cuda.syncthreads()
    for dy in range(ty, TILE, 8):
        if c0 + dy < C and r0 + tx < R:
            out[b, c0 + dy, r0 + tx] = tile[tx, dy]


def transpose(x, out):
    B, R, C = x.shape
    grid = (-(-C // TILE), -(-R // TILE), B)
    transpose_kernel[grid, (TILE, 8)](x, out)


@cuda.jit
def take_kernel(table, ids, out):
    """out (M, C) = table[ids] for ids (M,): the embedding lookup."""
    C = out.shape[1]
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i // C, i % C] = table[ids[i // C], i % C]


def launch_1d(kernel, n, *args):
    kernel[_blocks(n), THREADS](*args)
