"""Fused multi-head attention, flash style. NumPy twin: `NumpyBackend.attention`.

softmax(Q Kᵀ/√d) V for every (batch, head), computed per tile of Tq queries, walking the keys
in tiles of Tk with the online softmax of FlashAttention (Dao et al. 2022): keep per query the
running max m, the running sum l of e^(s − m) and the unnormalised output O; for each key tile

    S = Q Kᵀ/√d,  m' = max(m, max_j S_j),  P = e^(S − m'),
    l ← l·e^(m − m') + Σ_j P_j,   O ← O·e^(m − m') + P V,   m ← m'

and at the end O/l. Only one Tq×Tk score tile per thread exists at a time, never a full
Nq×Nk matrix. The two products of a tile are BLAS sgemm calls on strided views of the
(B, N, heads·d) tensors: no head is ever copied out. The tasks (batch × heads × query tiles)
run in parallel over the cores (`kernels/threads.py`); each calls sgemm on its own core, so
the caller runs the kernel inside `blas_single_threaded()`.
"""
import numpy as np
from numba import njit

from tinysd.kernels.blas import gemm
from tinysd.kernels.elementwise import exp

F32 = np.float32


@njit(fastmath=True, cache=True)
def _row_max(row, n):
    """max(row[:n]) to within an ulp, n ≥ 1, scores finite. The shift m only has to be near the
    max (it cancels in O/l), and this form, unlike max(m, x), lets LLVM vectorise the loop (8×
    faster). Not inlined: its fastmath flags would be lost in a caller compiled without them."""
    m = row[0]
    for j in range(1, n):
        x = row[j]
        m = m + (x - m) * (x > m)
    return m


UNDERFLOW = F32(-60.0)       # e^(s − m) below e^−60 ≈ 1e−26 is taken as 0 (see _exp_and_sum)


@njit(fastmath=True, cache=True)
def _exp_and_sum(row, n, m):
    """row[:n] ← e^(row[:n] − m), returns their sum.

    Weights below e^−60 are set to 0: next to the largest weight, 1, they change neither the sum
    nor P V in float32, but a weight near the smallest normal float (1e−38) times a value of V
    is a subnormal number, and the FMA units take many times longer on those: a peaked softmax
    (scores spread over ±30, as in the U-Net's 64×64 self-attention) ran at half speed."""
    total = F32(0.0)
    for j in range(n):
        x = row[j] - m
        p = exp(x) * (x > UNDERFLOW)
        row[j] = p
        total += p
    return total


@njit(inline="always")
def _softmax_tile(S, m, l, O, q0, k0, causal):
    """Turn the score tile S (Tq, Tk) into P = e^(S − m') in place and rescale l and O by
    e^(m − m'), as above. With `causal`, query q0+r sees keys ≤ q0+r: P is 0 past that."""
    Tq, Tk = S.shape
    for r in range(Tq):
        n = min(Tk, q0 + r - k0 + 1) if causal else Tk         # keys this query may see
        row = S[r]
        if n <= 0:
            row[:] = 0.0
            continue
        m_new = max(m[r], _row_max(row, n))                     # m[r] = −inf on the first tile
        total = _exp_and_sum(row, n, m_new)
        row[n:] = 0.0
        correction = exp(m[r] - m_new) * (m[r] - m_new > UNDERFLOW)     # 0 on the first tile
        l[r] = l[r] * correction + total
        m[r] = m_new
        for c in range(O.shape[1]):
            O[r, c] *= correction


@njit(nogil=True, error_model="numpy", cache=True)
def attention_kernel(q, k, v, heads, causal, out, tile_q, tile_k, start, stop):
    """q, out (B, Nq, heads·d); k, v (B, Nk, heads·d), all C-contiguous float32. Task
    (b·heads + h)·⌈Nq/tile_q⌉ + i is query tile i of head h of image b; tasks start … stop − 1."""
    B, Nq, C = q.shape
    Nk = k.shape[1]
    d = C // heads
    scale = 1.0 / np.sqrt(d)
    n_qt = (Nq + tile_q - 1) // tile_q
    for task in range(start, stop):
        b = task // (heads * n_qt)
        h = (task // n_qt) % heads
        q0 = (task % n_qt) * tile_q
        q1 = min(Nq, q0 + tile_q)
        c0, c1 = h * d, (h + 1) * d                              # this head's channels
        S_buf = np.empty((q1 - q0) * tile_k, np.float32)
        O = np.zeros((q1 - q0, d), np.float32)
        m = np.full(q1 - q0, -np.inf, np.float32)
        l = np.zeros(q1 - q0, np.float32)
        k_end = min(Nk, q1) if causal else Nk
        for k0 in range(0, k_end, tile_k):
            k1 = min(k_end, k0 + tile_k)
            St = S_buf[:(q1 - q0) * (k1 - k0)].reshape(q1 - q0, k1 - k0)   # contiguous: rows vectorise
            gemm(q[b, q0:q1, c0:c1], k[b, k0:k1, c0:c1], St, scale, 0.0, True)   # Q Kᵀ/√d
            _softmax_tile(St, m, l, O, q0, k0, causal)
            gemm(St, v[b, k0:k1, c0:c1], O, 1.0, 1.0, False)                     # O += P V
        for r in range(q1 - q0):
            for c in range(d):
                out[b, q0 + r, c0 + c] = O[r, c] / l[r]
