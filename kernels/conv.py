"""2-D convolution as shifted GEMMs over a flattened, zero-padded input. NumPy twin:
`NumpyBackend.conv2d`.

A kh×kw convolution is the sum over its taps (i, j) of 1×1 convolutions of the shifted input:
out[:, y, x] = Σ_ij W[:, :, i, j] · xpad[:, y+i, x+j]. Flatten each padded channel row-major
(row width Wp): then the tap (i, j) reads xpad_flat[:, y·Wp + x + (i·Wp + j)], so for all
outputs at once it is one contiguous window of xpad_flat shifted by i·Wp + j. Each tap is a
single BLAS product (Cout, Cin) @ (Cin, window) accumulated with β = 1; no im2col buffer is
ever built. The price: the product also computes the kw−1 columns per row that wrap around
the padding (3 % at 64×64, 0.4 % at 512×512), dropped when the bias is added.

Stride s: split the padded input into its s² phases xpad[:, p::s, q::s]; tap (i, j) is then
a stride-1 shift by (i//s, j//s) of phase (i%s, j%s). Small images: the batch is laid
end to end in one flat row so each weight matrix is read once, not once per image.
Large images: output rows go in chunks, so the scratch stays a few MB (VAE decode at 512²).

Tiny images (the U-Net's 8×8 level): the shifted windows waste a large share of the
product on wrap-around columns (28 % at 8×8) and each tap's product is too thin for BLAS to run
fast. There the taps are unrolled once into an im2col matrix (kh·kw·Cin, B·Ho·Wo) and the whole
convolution is a single GEMM with K = kh·kw·Cin (`im2col_conv2d_kernel`).

The copies around the products (padding, bias and crop) run on one thread: they are a few
percent of the work, and a Numba thread pool waking up between BLAS calls only fights
OpenBLAS's own threads for the cores.
"""
import numpy as np
from numba import njit

from tinysd.kernels.blas import gemm

@njit(cache=True)
def pad_phases(x, pt, pl, s, Hq, Wq, tail):
    """x (B, Cin, H, W) -> xq (s², Cin, B·Hq·Wq + tail): phase (p, q) of the zero-padded image
    at [p·s + q, c, (b·Hq + u)·Wq + v] = xpad[b, c, u·s + p, v·s + q]."""
    B, Cin, H, W = x.shape
    xq = np.empty((s * s, Cin, B * Hq * Wq + tail), np.float32)
    for pc in range(s * s * Cin):
        ph, c = pc // Cin, pc % Cin
        p, q = ph // s, ph % s
        row = xq[ph, c]
        row[:] = 0.0
        for b in range(B):
            for u in range(Hq):
                y = u * s + p - pt                   # source row in the unpadded image
                if 0 <= y < H:
                    base = (b * Hq + u) * Wq
                    for v in range(Wq):
                        xx = v * s + q - pl
                        if 0 <= xx < W:
                            row[base + v] = x[b, c, y, xx]
    return xq


@njit(cache=True)
def add_bias_crop(acc, bias, out, g0, g1, Hq, Wq):
    """Scatter the flat products acc (Cout, (g1−g0)·Wq) of global rows g0..g1 (row g = b·Hq + y)
    into out (B, Cout, Ho, Wo), adding the bias and dropping wrap-around rows and columns."""
    B, Cout, Ho, Wo = out.shape
    for o in range(Cout):
        for g in range(g0, g1):
            b, y = g // Hq, g % Hq
            if y < Ho:
                src = acc[o, (g - g0) * Wq:(g - g0) * Wq + Wo]
                dst = out[b, o, y]
                for j in range(Wo):
                    dst[j] = src[j] + bias[o]


@njit(cache=True)
def conv2d_kernel(x, w, bias, s, pt, pb, pl, pr, out, chunk_bytes):
    """x (B, Cin, H, W); w (Cout, kh, kw, Cin) C-contiguous (taps outermost within a row, so
    each tap's (Cout, Cin) block is a strided 2-D view); out (B, Cout, Ho, Wo). Output rows go
    in chunks whose scratch (Cout × rows × Wq floats) is about `chunk_bytes`."""
    B, Cin, H, W = x.shape
    Cout, kh, kw, _ = w.shape
    Ho = out.shape[2]
    Hq = (H + pt + pb + s - 1) // s                      # phase image size
    Wq = (W + pl + pr + s - 1) // s
    n_rows = (B - 1) * Hq + Ho                           # global rows g = b·Hq + y that matter
    max_shift = ((kh - 1) // s) * Wq + (kw - 1) // s
    tail = max(0, n_rows * Wq + max_shift - B * Hq * Wq)
    xq = pad_phases(x, pt, pl, s, Hq, Wq, tail)
    w2 = w.reshape(Cout, kh * kw * Cin)
    rows = max(1, chunk_bytes // (4 * Cout * Wq))
    acc = np.empty((Cout, min(rows, n_rows) * Wq), np.float32)
    for g0 in range(0, n_rows, rows):
        g1 = min(n_rows, g0 + rows)
        a = acc[:, :(g1 - g0) * Wq]
        for i in range(kh):
            for j in range(kw):
                t = i * kw + j
                shift = g0 * Wq + (i // s) * Wq + j // s
                gemm(w2[:, t * Cin:(t + 1) * Cin], xq[(i % s) * s + j % s, :, shift:shift + a.shape[1]],
                     a, 1.0, 0.0 if t == 0 else 1.0, False)
        add_bias_crop(a, bias, out, g0, g1, Hq, Wq)


@njit(cache=True)
def im2col_conv2d_kernel(x, w, bias, s, pt, pl, out):
    """As `conv2d_kernel`, by one GEMM: out (Cout, B·Ho·Wo) = w (Cout, kh·kw·Cin) @ cols, where
    cols[(i·kw + j)·Cin + c, (b·Ho + y)·Wo + x] = xpad[b, c, y·s + i, x·s + j] (the row order of
    the tap-major weights)."""
    B, Cin, H, W = x.shape
    Cout, kh, kw, _ = w.shape
    Ho, Wo = out.shape[2], out.shape[3]
    P = Ho * Wo
    cols = np.zeros((kh * kw * Cin, B * P), np.float32)
    for tc in range(kh * kw * Cin):
        t, c = tc // Cin, tc % Cin
        i, j = t // kw, t % kw
        for b in range(B):
            for y in range(Ho):
                yy = y * s + i - pt
                if 0 <= yy < H:
                    for xo in range(Wo):
                        xx = xo * s + j - pl
                        if 0 <= xx < W:
                            cols[tc, b * P + y * Wo + xo] = x[b, c, yy, xx]
    acc = np.empty((Cout, B * P), np.float32)
    gemm(w.reshape(Cout, kh * kw * Cin), cols, acc, 1.0, 0.0, False)
    for b in range(B):
        for o in range(Cout):
            dst = out[b, o].reshape(P)
            for p in range(P):
                dst[p] = acc[o, b * P + p] + bias[o]


@njit(cache=True)
def conv1x1_kernel(x, w, bias, out):
    """1×1 convolution: out[b] = w (Cout, Cin) @ x[b] (Cin, H·W) + bias, one GEMM per image."""
    B, Cin = x.shape[0], x.shape[1]
    Cout = w.shape[0]
    for b in range(B):
        ob = out[b].reshape(Cout, -1)
        for o in range(Cout):
            ob[o, :] = bias[o]
        gemm(w, x[b].reshape(Cin, -1), ob, 1.0, 1.0, False)
