"""Backward kernels of the `cpu` backend. NumPy twins: the `*_backward` methods of
`tinysd.backend.NumpyBackend`, whose docstrings derive each formula.

- Convolution: the weight gradient as one GEMM per chunk of output rows,
  ∂L/∂W (Cout, kh·kw·Cin) += ∂L/∂y (Cout, n) · colsᵀ, cols the im2col unrolling of the chunk's
  input windows (kh·kw·Cin, n), in the tap-major order of the cpu backend's weights; for
  stride > 1 the input gradient as its transpose, dcols = Wᵀ ∂L/∂y, scatter-added back into
  the image (col2im). (Stride 1 goes through the forward convolution instead: see
  `CpuBackend.conv2d_backward`.) The chunks keep the scratch at a few MB.
- Group norm (+SiLU) and layer norm: one pass for μ and σ², one that forms ĝ = γ ∂L/∂y and
  the two group sums Σĝ and Σĝx̂, one that writes ∂L/∂x; SiLU's derivative is taken in the
  same loop.
- SiLU, GELU, quick-GELU and GEGLU derivatives, elementwise.
- Attention, flash style (FlashAttention-2's backward): per (batch, head), one pass over the
  key tiles recomputes each query's log-sum-exp L, then for each query tile × key tile the
  scores are recomputed and P = e^(S − L) never exists beyond one Tq×Tk tile, so memory stays
  O(N·d) in the sequence length.
"""
import numpy as np
from numba import njit

from tinysd.kernels.attention import _exp_and_sum, _row_max
from tinysd.kernels.blas import _sgemm
from tinysd.kernels.elementwise import erf, exp, sigmoid
from tinysd.kernels.norm import _mean_rstd    # the forward's statistics, recomputed the same way

F32 = np.float32
INV_SQRT2 = F32(0.7071067811865476)
INV_SQRT_2PI = F32(0.3989422804014327)


@njit(cache=True)
def gemm_t(a, b, c, alpha, beta, trans_a, trans_b):
    """c ← α·op(a)·op(b) + β·c, row-major, op(a) = aᵀ if `trans_a`, op(b) = bᵀ if `trans_b`
    (kernels/blas.py's `gemm` has no transposed a; backward products need one: Pᵀ dO, Wᵀ dY).

    As there, Fortran BLAS is asked for cᵀ = op(b)ᵀ·op(a)ᵀ: a row-major array with row
    stride ld is a column-major matrix of its transpose with leading dimension ld, so
    op(x)ᵀ is that matrix as it is ('N') for an untransposed operand and its transpose ('T')
    for a transposed one.
    """
    M, N = c.shape
    K = a.shape[0] if trans_a else a.shape[1]
    ints = np.empty(6, np.int32)
    ints[0], ints[1], ints[2] = N, M, K
    ints[3] = b.strides[0] // 4 if b.shape[0] > 1 else max(1, b.shape[1])
    ints[4] = a.strides[0] // 4 if a.shape[0] > 1 else max(1, a.shape[1])
    ints[5] = c.strides[0] // 4 if M > 1 else max(1, N)
    scalars = np.empty(2, np.float32)
    scalars[0], scalars[1] = alpha, beta
    trans = np.empty(2, np.uint8)
    trans[0] = ord("T") if trans_b else ord("N")
    trans[1] = ord("T") if trans_a else ord("N")
    i, s, t = ints.ctypes.data, scalars.ctypes.data, trans.ctypes.data
    _sgemm(t, t + 1, i, i + 4, i + 8, s, b.ctypes.data, i + 12, a.ctypes.data, i + 16,
           s + 4, c.ctypes.data, i + 20)


@njit(cache=True)
def _im2col(x, g0, g1, kh, kw, s, pt, pl, Ho, Wo, cols):
    """cols[(i·kw + j)·Cin + c, (g − g0)·Wo + xo] = xpad[b, c, y·s + i, xo·s + j] for the global
    output rows g = b·Ho + y in [g0, g1)."""
    _, Cin, H, W = x.shape
    for tc in range(kh * kw * Cin):
        t, c = tc // Cin, tc % Cin
        i, j = t // kw, t % kw
        row = cols[tc]
        for g in range(g0, g1):
            b, y = g // Ho, g % Ho
            yy = y * s + i - pt
            base = (g - g0) * Wo
            for xo in range(Wo):
                xx = xo * s + j - pl
                row[base + xo] = x[b, c, yy, xx] if 0 <= yy < H and 0 <= xx < W else F32(0.0)


@njit(cache=True)
def _col2im_add(cols, g0, g1, kh, kw, s, pt, pl, Ho, Wo, dx):
    """The adjoint of `_im2col`: dx[b, c, y·s + i − pt, xo·s + j − pl] += cols[...], where inside."""
    _, Cin, H, W = dx.shape
    for tc in range(kh * kw * Cin):
        t, c = tc // Cin, tc % Cin
        i, j = t // kw, t % kw
        row = cols[tc]
        for g in range(g0, g1):
            b, y = g // Ho, g % Ho
            yy = y * s + i - pt
            if yy < 0 or yy >= H:
                continue
            base = (g - g0) * Wo
            for xo in range(Wo):
                xx = xo * s + j - pl
                if 0 <= xx < W:
                    dx[b, c, yy, xx] += row[base + xo]


@njit(cache=True)
def conv2d_backward_kernel(x, w, grad, s, pt, pl, dw, dx, rows_per_chunk):
    """x (B, Cin, H, W); w (Cout, kh, kw, Cin) tap-major, C-contiguous; grad (B, Cout, Ho, Wo).
    dw (Cout, kh, kw, Cin) ← ∂L/∂W unless it is empty (frozen); dx (B, Cin, H, W), zeroed by
    the caller, += ∂L/∂x unless it is empty. Output rows go in chunks of `rows_per_chunk`."""
    B, Cin = x.shape[0], x.shape[1]
    Cout, kh, kw, _ = w.shape
    Ho, Wo = grad.shape[2], grad.shape[3]
    K = kh * kw * Cin
    want_dw, want_dx = dw.size > 0, dx.size > 0
    w2 = w.reshape(Cout, K)
    dw2 = dw.reshape(Cout, K) if want_dw else dw.reshape(0, 0)
    n_max = min(rows_per_chunk, B * Ho) * Wo
    gc = np.empty((Cout, n_max), np.float32)                  # the chunk's ∂L/∂y as one matrix
    cols = np.empty((K, n_max), np.float32)
    first = True
    for g0 in range(0, B * Ho, rows_per_chunk):
        g1 = min(B * Ho, g0 + rows_per_chunk)
        n = (g1 - g0) * Wo
        for o in range(Cout):
            for g in range(g0, g1):
                b, y, base = g // Ho, g % Ho, (g - g0) * Wo
                for xo in range(Wo):                  # element loops: a slice copy per row costs
                    gc[o, base + xo] = grad[b, o, y, xo]       # more than the row at Wo = 8
        if want_dw:
            _im2col(x, g0, g1, kh, kw, s, pt, pl, Ho, Wo, cols)
            gemm_t(gc[:, :n], cols[:, :n], dw2, 1.0, 0.0 if first else 1.0, False, True)
        if want_dx:
            gemm_t(w2, gc[:, :n], cols[:, :n], 1.0, 0.0, True, False)      # dcols = Wᵀ ∂L/∂y
            _col2im_add(cols, g0, g1, kh, kw, s, pt, pl, Ho, Wo, dx)
        first = False


@njit(inline="always")
def silu_derivative(y):
    """σ(y)·(1 + y(1 − σ(y)))."""
    s = sigmoid(y)
    return s * (F32(1.0) + y * (F32(1.0) - s))


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def group_norm_backward_kernel(grad, x, weight, bias, eps, apply_silu, dx, dweight_b, dbias_b, start, stop):
    """grad, x, dx (B, G, C/G, S); weight, bias (C,); dweight_b, dbias_b (B, C) per-image sums
    (the caller adds them over B). Task bg = b·G + g is one group of one image, owning its
    channels; tasks start … stop − 1."""
    B, G, Cg, S = x.shape
    n = Cg * S
    for bg in range(start, stop):
        b, g = bg // G, bg % G
        mean, rstd = _mean_rstd(x[b, g].reshape(n), eps)
        mean32, rstd32 = F32(mean), F32(rstd)
        sum_g = 0.0                                               # Σ ĝ and Σ ĝ·x̂ of the group
        sum_gx = 0.0
        for c in range(Cg):
            gamma, beta = weight[g * Cg + c], bias[g * Cg + c]
            dw_c = F32(0.0)
            db_c = F32(0.0)
            sg = F32(0.0)
            sgx = F32(0.0)
            for s in range(S):
                xhat = (x[b, g, c, s] - mean32) * rstd32
                gy = grad[b, g, c, s]
                if apply_silu:
                    gy *= silu_derivative(xhat * gamma + beta)
                dw_c += gy * xhat
                db_c += gy
                ghat = gy * gamma
                dx[b, g, c, s] = ghat                             # kept for the last pass
                sg += ghat
                sgx += ghat * xhat
            dweight_b[b, g * Cg + c] = dw_c
            dbias_b[b, g * Cg + c] = db_c
            sum_g += sg
            sum_gx += sgx
        mean_g, mean_gx = F32(sum_g / n), F32(sum_gx / n)
        for c in range(Cg):
            for s in range(S):
                xhat = (x[b, g, c, s] - mean32) * rstd32
                dx[b, g, c, s] = rstd32 * (dx[b, g, c, s] - mean_g - xhat * mean_gx)


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def layer_norm_backward_kernel(grad, x, weight, eps, dx, dweight_p, dbias_p, start, stop):
    """grad, x, dx (M, C); dweight_p, dbias_p (P, C): the rows go in P parts, one per task,
    each summing its rows' ∂L/∂γ and ∂L/∂β (the caller adds the P parts); tasks start … stop − 1."""
    M, C = x.shape
    P = dweight_p.shape[0]
    for p in range(start, stop):
        dweight_p[p] = 0.0
        dbias_p[p] = 0.0
        for m in range(p * M // P, (p + 1) * M // P):
            mean, rstd = _mean_rstd(x[m], eps)
            mean32, rstd32 = F32(mean), F32(rstd)
            sg = F32(0.0)
            sgx = F32(0.0)
            for c in range(C):
                xhat = (x[m, c] - mean32) * rstd32
                gy = grad[m, c]
                dweight_p[p, c] += gy * xhat
                dbias_p[p, c] += gy
                ghat = gy * weight[c]
                sg += ghat
                sgx += ghat * xhat
            mean_g, mean_gx = sg / F32(C), sgx / F32(C)
            for c in range(C):
                xhat = (x[m, c] - mean32) * rstd32
                dx[m, c] = rstd32 * (grad[m, c] * weight[c] - mean_g - xhat * mean_gx)


@njit(inline="always")
def gelu_derivative(x):
    """Φ(x) + x·φ(x)."""
    return F32(0.5) * (F32(1.0) + erf(x * INV_SQRT2)) + x * exp(F32(-0.5) * x * x) * INV_SQRT_2PI


@njit(inline="always")
def quick_gelu_derivative(x):
    """σ(ax) + a·x·σ(ax)(1 − σ(ax)), a = 1.702."""
    s = sigmoid(F32(1.702) * x)
    return s + F32(1.702) * x * s * (F32(1.0) - s)


@njit(nogil=True, error_model="numpy", cache=True)
def silu_backward_kernel(grad, x, dx, start, stop):
    for i in range(start, stop):
        dx[i] = grad[i] * silu_derivative(x[i])


@njit(nogil=True, error_model="numpy", cache=True)
def gelu_backward_kernel(grad, x, dx, start, stop):
    for i in range(start, stop):
        dx[i] = grad[i] * gelu_derivative(x[i])


@njit(nogil=True, error_model="numpy", cache=True)
def quick_gelu_backward_kernel(grad, x, dx, start, stop):
    for i in range(start, stop):
        dx[i] = grad[i] * quick_gelu_derivative(x[i])


@njit(nogil=True, error_model="numpy", cache=True)
def geglu_backward_kernel(grad, x, dx, start, stop):
    """x, dx (M, 2F) = [h | gate], grad (M, F): dh = grad·GELU(gate), dgate = grad·h·GELU'(gate),
    for the rows start … stop − 1."""
    F = grad.shape[1]
    for m in range(start, stop):
        for f in range(F):
            h, gate = x[m, f], x[m, F + f]
            dx[m, f] = grad[m, f] * F32(0.5) * gate * (F32(1.0) + erf(gate * INV_SQRT2))
            dx[m, F + f] = grad[m, f] * h * gelu_derivative(gate)


@njit(fastmath=True, cache=True)
def _softmax_backward_row(p, dp, D):
    """dp ← p∘(dp − D), in place: one row of softmax's backward."""
    for j in range(p.size):
        dp[j] = p[j] * (dp[j] - D)


@njit(cache=True)
def _log_sum_exp_rows(q, k, b, c0, c1, scale, causal, tile_q, tile_k, S_buf, lse):
    """lse[i] = log Σ_j e^(S_ij) for every query of one (batch, head), S = Q Kᵀ·scale, by the
    forward's online max and sum over key tiles (the forward does not keep it)."""
    Nq, Nk = q.shape[1], k.shape[1]
    for q0 in range(0, Nq, tile_q):
        q1 = min(Nq, q0 + tile_q)
        m = np.full(q1 - q0, -np.inf, np.float32)
        l = np.zeros(q1 - q0, np.float32)
        k_end = min(Nk, q1) if causal else Nk
        for k0 in range(0, k_end, tile_k):
            k1 = min(k_end, k0 + tile_k)
            St = S_buf[:(q1 - q0) * (k1 - k0)].reshape(q1 - q0, k1 - k0)
            gemm_t(q[b, q0:q1, c0:c1], k[b, k0:k1, c0:c1], St, scale, 0.0, False, True)
            for r in range(q1 - q0):
                n = min(k1 - k0, q0 + r - k0 + 1) if causal else k1 - k0
                if n <= 0:
                    continue
                m_new = max(m[r], _row_max(St[r], n))
                total = _exp_and_sum(St[r], n, m_new)
                l[r] = l[r] * exp(m[r] - m_new) + total
                m[r] = m_new
        for r in range(q1 - q0):
            lse[q0 + r] = m[r] + np.log(l[r])


@njit(cache=True)
def _attention_backward_head(q, k, v, out, grad, b, h, d, causal, tile_q, tile_k, dq, dk, dv):
    """The gradients of one (batch, head): its d columns of dq, dk, dv (zeroed by the caller)."""
    Nq, Nk = q.shape[1], k.shape[1]
    c0, c1 = h * d, (h + 1) * d
    scale = F32(1.0 / np.sqrt(d))
    S_buf = np.empty(tile_q * tile_k, np.float32)
    dP_buf = np.empty(tile_q * tile_k, np.float32)
    lse = np.empty(Nq, np.float32)
    _log_sum_exp_rows(q, k, b, c0, c1, scale, causal, tile_q, tile_k, S_buf, lse)
    D = np.empty(Nq, np.float32)                                  # D_i = ∂L/∂O_i · O_i
    for i in range(Nq):
        acc = F32(0.0)
        for c in range(c0, c1):
            acc += grad[b, i, c] * out[b, i, c]
        D[i] = acc
    for q0 in range(0, Nq, tile_q):
        q1 = min(Nq, q0 + tile_q)
        k_end = min(Nk, q1) if causal else Nk
        for k0 in range(0, k_end, tile_k):
            k1 = min(k_end, k0 + tile_k)
            P = S_buf[:(q1 - q0) * (k1 - k0)].reshape(q1 - q0, k1 - k0)
            dS = dP_buf[:(q1 - q0) * (k1 - k0)].reshape(q1 - q0, k1 - k0)
            gemm_t(q[b, q0:q1, c0:c1], k[b, k0:k1, c0:c1], P, scale, 0.0, False, True)   # S
            for r in range(q1 - q0):
                n = max(0, min(k1 - k0, q0 + r - k0 + 1)) if causal else k1 - k0
                _exp_and_sum(P[r], n, lse[q0 + r])                               # P = e^(S − L)
                P[r, n:] = 0.0
            gemm_t(P, grad[b, q0:q1, c0:c1], dv[b, k0:k1, c0:c1], 1.0, 1.0, True, False)  # dV += Pᵀ dO
            gemm_t(grad[b, q0:q1, c0:c1], v[b, k0:k1, c0:c1], dS, 1.0, 0.0, False, True)  # dP = dO Vᵀ
            for r in range(q1 - q0):
                _softmax_backward_row(P[r], dS[r], D[q0 + r])                    # dS = P∘(dP − D)
            gemm_t(dS, k[b, k0:k1, c0:c1], dq[b, q0:q1, c0:c1], scale, 1.0, False, False)  # dQ += dS K/√d
            gemm_t(dS, q[b, q0:q1, c0:c1], dk[b, k0:k1, c0:c1], scale, 1.0, True, False)   # dK += dSᵀ Q/√d


@njit(nogil=True, error_model="numpy", cache=True)
def attention_backward_kernel(q, k, v, out, grad, heads, causal, tile_q, tile_k, dq, dk, dv, start, stop):
    """q, out, grad, dq (B, Nq, heads·d); k, v, dk, dv (B, Nk, heads·d); all C-contiguous
    float32, the gradients zeroed. Task b·heads + h is one (batch, head); tasks start … stop − 1.
    Run in parallel, the caller holds `blas_single_threaded()`; with fewer (batch, head) pairs
    than cores it runs them all on one thread and lets BLAS parallelise each product instead."""
    d = q.shape[2] // heads
    for task in range(start, stop):
        _attention_backward_head(q, k, v, out, grad, task // heads, task % heads, d, causal,
                                 tile_q, tile_k, dq, dk, dv)
