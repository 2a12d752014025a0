"""The `cpu` backend: NumpyBackend with its hot ops replaced by Numba kernels.

Each override computes what the NumpyBackend method of the same name computes (tests/
test_kernels_cpu.py checks them against each other). GEMM-shaped work goes to BLAS sgemm
(kernels/blas.py), except products too thin for sgemm's packing to pay, which run as dot
products: the Winograd convs with few tiles (kernels/winograd.py) and linears of a few rows
(kernels/matvec.py). Numba fuses what surrounds them, and kernels/threads.py runs it on all cores.

Every kernel compiles once (and is cached on disk, `cache=True`): its array arguments are
normalised to read-only C-contiguous float32 inputs and fresh float32 outputs, so it sees one
type signature whether a weight is a view of a read-only memory-mapped file or an array in
memory, and whatever layout or dtype the caller passed.
"""
import contextlib

import numpy as np

from tinysd.backend import NumpyBackend, conv_output_size
from tinysd.kernels import attention as _attention
from tinysd.kernels import conv as _conv
from tinysd.kernels import elementwise as _el
from tinysd.kernels import malloc as _malloc
from tinysd.kernels import matvec as _matvec
from tinysd.kernels import norm as _norm
from tinysd.kernels import winograd as _winograd
from tinysd.kernels.blas import blas_single_threaded, gemm
from tinysd.kernels.threads import num_threads, parallel_for
from tinysd.readers import release_file_pages


def _f32(x):
    """x as a read-only C-contiguous float32 array: a kernel's input (see the module docstring)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.flags.writeable:
        x = x.view()
        x.flags.writeable = False
    return x


def _unary(kernel, x):
    x = _f32(x)
    out = np.empty(x.shape, np.float32)
    parallel_for(kernel, x.size, x.reshape(-1), out.reshape(-1), work=2 * x.size)
    return out


class CpuBackend(NumpyBackend):
    name = "cpu"
    attention_tiles = (256, 512)    # (queries, keys) per tile: the score tile is 512 KB, in L2
    conv_chunk_bytes = 16 << 20     # conv scratch per chunk of output rows (fits L3)
    # 3×3 stride-1 convs go by Winograd (the weights are transformed per call: one pass over
    # them, ~2.7 ms (F(2×2)) or ~4.5 ms (F(4×4)) for 1280×1280 channels). F(4×4, 3×3) (4× fewer multiplies, but bigger
    # transforms and 36 GEMMs) takes those with at least `winograd_f4_min_tiles` 4×4 tiles: the
    # U-Net's 64×64 and 32×32 levels, every VAE and TAESD conv (and wide ones with fewer, see
    # `winograd_f4_min_tiles_wide`). F(2×2, 3×3) (2.25×) the others with at least
    # `winograd_f2_min_tiles` 2×2 tiles, and the wide ones below that. Measured per conv, ms
    # (benchmarks/conv_routes.py, AMD Zen 5, 2 threads, OpenBLAS's AVX-512 kernels), best split
    # of each before the dot-product split (below); CFG batch 2: 320 channels at 64×64: F4 15.8,
    # F2 22.1; 640 at 32×32: F4 16.7, F2 21.9; 1280 at 16×16: F4 29.3, F2 25.8, shifted GEMMs
    # 44.3, im2col 41.4; 1280 at 8×8: F2 14.0, im2col 11.6. Batch 1: 640 at 32×32: F4 12.1, F2
    # 13.1. VAE, 128 channels at 512×512: F4 74.5, F2 117; TAESD's 64 at 512×512: F4 19.8, F2 40.6.
    winograd_f4_min_tiles = 64
    winograd_f2_min_tiles = 64
    winograd_chunk_tiles = 128      # tiles per task (whole tile rows): 16 or 36 GEMMs with N = 128
    # With at most this many tiles (batch included) the tasks split the output channels instead,
    # each transforming its own weights (see winograd.py): one block of channels per thread, or
    # as many per thread as keep each block's U under `winograd_u_block_bytes`. Fewer, larger
    # blocks pack each V[ξ] fewer times (OpenBLAS packs it on every GEMM): 640 channels at 32×32,
    # batch 1, 14.8 → 11.9 ms with 1 block per thread instead of 128 channels a block; 1280 at
    # 16×16, batch 2, 29.4 → 25.8. But with 2560 input channels one block's U would be 105 MB
    # and the conv ran 88 ms instead of 50 with two blocks per thread. Up to 1024 tiles this
    # split wins (the U-Net's 64×64 level at batch 2: 20.8 → 19.7 ms; the VAE's 512 channels at
    # 128×128: 84 → 75 ms); with more (VAE at 256×256) the chunks of tiles do (193 against 210).
    # And only with wide channels, where the weights are the bigger read: 64 channels at 64×64
    # (TAESD) took 0.9 ms by output channels and 0.6 by tiles; 4 → 512 (VAE conv_in) 1.2 against 0.9.
    winograd_by_cout_max_tiles = 1024
    winograd_by_cout_min_channels = 256     # min(Cin, Cout)
    winograd_u_block_bytes = 64 << 20
    # With at most `winograd_dots_max_tiles` tiles, and each ξ's V for all of them (tiles × Cin
    # floats, which every block reads from L2) within `winograd_dots_max_bytes`, the blocks of
    # output channels are small (`winograd_dots_block`) and multiply by dot products while their U
    # is in cache (winograd.conv3x3_dots_kernel); wide convs then take F(4×4) from
    # `winograd_f4_min_tiles_wide` 4×4 tiles (the 16×16 level), F(2×2) below (the 8×8 level,
    # instead of one im2col GEMM). Milliseconds per conv, batch 1: 1280 channels at 16×16 17.1 (F2
    # by cout) → 12.5; 640 at 32×32 10.6 → 7.7; 1280 at 8×8 6.8 (im2col) → 5.9 (F2); batch 2: 1280
    # at 16×16 24.6 → 19.2, at 8×8 11.3 → 8.9. Past the limits BLAS wins again: 320 at 64×64,
    # batch 1 (256 tiles), 11.3 against 8.4; 1920 → 640 at 32×32, batch 1 (V[ξ] 480 KB), 36.2
    # against 30.5. Blocks of 8, 16, 32 channels: U-Net step at batch 1 1.88, 1.88, 1.92 s.
    winograd_dots_max_tiles = 64
    winograd_dots_max_bytes = 384 << 10
    winograd_dots_block = 16
    winograd_f4_min_tiles_wide = 16
    # Other convs with at most this many output pixels (batch included) go as one im2col GEMM:
    # narrow 3×3 convs on small images and the stride-2 convs down to the U-Net's 8×8 level,
    # where the shifted GEMMs are thin and wasted on wrap-around columns (28 % at 8×8; 1280
    # channels, 3×3 stride 1: 34 → 26 ms). The rest (bigger stride-2 convs, 1×1-wide images) by
    # shifted GEMMs.
    im2col_max_pixels = 256
    # linear + GEGLU fused when their (N, 2F) projection would take at least this much memory
    # (the U-Net's 64×64 blocks: 84 MB, 117 → 94 ms); smaller ones run faster as one GEMM.
    linear_geglu_min_bytes = 64 << 20
    linear_geglu_tile = 256         # output rows × features per task: h and gate scratch 512 KB
    # A GEMM below this many multiply-adds runs on one BLAS thread (~0.3 ms of one core's work):
    # waking OpenBLAS's other threads saves little on it, and where the cores are busy each such
    # GEMM waits for a helper thread to get one: the shipped model's picture took 80 s instead of
    # 1.7 s on this machine with other jobs running (load average 15).
    blas_parallel_min_macs = 1 << 24
    # A linear of at most this many rows (the time embedding's: 1, or 2 with CFG) runs as dot
    # products of W's rows with x (kernels/matvec.py): 1280 × 1280 weights, 1 row 0.41 → 0.10 ms,
    # 2 rows 0.46 → 0.12, 8 rows 0.52 → 0.30; with 16 rows sgemm wins (0.40 against 0.58).
    linear_rows_max = 8

    def __init__(self, dtype=np.float32):
        super().__init__(dtype)
        _malloc.keep_freed_memory()                  # reuse freed memory, not fresh zeroed pages

    def asarray(self, x):
        """As NumpyBackend. 4-D arrays (conv weights (Cout, Cin, kh, kw)) keep their shape and
        values but are stored tap-major, as (Cout, kh, kw, Cin) in memory: the layout the conv
        kernel reads each tap's (Cout, Cin) matrix from without a copy. Other weights stay views
        of the memory-mapped checkpoint, as with the numpy backend."""
        x = np.asarray(x)
        if x.ndim != 4:
            return np.ascontiguousarray(x, dtype=np.float32)
        tap_major = np.empty((x.shape[0], x.shape[2], x.shape[3], x.shape[1]), np.float32)
        tap_major[:] = x.transpose(0, 2, 3, 1)
        release_file_pages(x)
        return tap_major.transpose(0, 3, 1, 2)

    def linear(self, x, weight, bias=None):
        x = _f32(x)
        *lead, n_in = x.shape
        n_out = weight.shape[0]
        x2 = x.reshape(-1, n_in)
        y = np.empty((x2.shape[0], n_out), np.float32)
        if x2.shape[0] <= self.linear_rows_max:
            bias = np.zeros(n_out, np.float32) if bias is None else _f32(bias)
            parallel_for(_matvec.linear_rows_kernel, n_out, x2, _f32(weight), bias, y, work=weight.size)
            return y.reshape(*lead, n_out)
        if bias is not None:
            y[:] = bias                                   # y = x Wᵀ + b as one GEMM with β = 1
        with self._blas_threads(y.size * n_in):
            gemm(x2, _f32(weight), y, 1.0, 0.0 if bias is None else 1.0, True)
        return y.reshape(*lead, n_out)

    def _blas_threads(self, macs):
        """One BLAS thread for a GEMM (or a conv's GEMMs) of fewer than `blas_parallel_min_macs`."""
        return blas_single_threaded() if macs < self.blas_parallel_min_macs else contextlib.nullcontext()

    def conv2d(self, x, weight, bias=None, stride=1, padding=0):
        x = _f32(x)
        B, Cin = x.shape[:2]
        Cout, _, kh, kw = weight.shape
        (pt, pb, pl, pr), Ho, Wo = conv_output_size(x.shape, weight.shape, stride, padding)
        bias = _f32(np.zeros(Cout, np.float32) if bias is None else bias)
        out = np.empty((B, Cout, Ho, Wo), np.float32)
        if kh == kw == 1 and stride == 1 and not (pt or pb or pl or pr):
            with self._blas_threads(out.size * Cin):
                _conv.conv1x1_kernel(x, _f32(weight.reshape(Cout, Cin)), bias, out)
            return out
        w = _f32(weight.transpose(0, 2, 3, 1))            # (Cout, kh, kw, Cin); no copy for weights from asarray
        winograd = kh == kw == 3 and stride == 1
        wide = min(Cin, Cout) >= self.winograd_by_cout_min_channels
        tiles4 = B * -(-Ho // 4) * -(-Wo // 4)
        if winograd and (tiles4 >= self.winograd_f4_min_tiles or wide and tiles4 >= self.winograd_f4_min_tiles_wide):
            self._conv3x3_winograd(4, x, w, bias, pt, pl, out, wide)
        elif winograd and (B * -(-Ho // 2) * -(-Wo // 2) >= self.winograd_f2_min_tiles or wide):
            self._conv3x3_winograd(2, x, w, bias, pt, pl, out, wide)
        elif B * Ho * Wo <= self.im2col_max_pixels:
            with self._blas_threads(out.size * Cin * kh * kw):
                _conv.im2col_conv2d_kernel(x, w, bias, int(stride), int(pt), int(pl), out)
        else:
            with self._blas_threads(out.size * Cin * kh * kw):
                _conv.conv2d_kernel(x, w, bias, int(stride), int(pt), int(pb), int(pl), int(pr), out,
                                    int(self.conv_chunk_bytes))
        return out

    def _conv3x3_winograd(self, m, x, w, bias, pt, pl, out, wide):
        """Winograd F(m×m, 3×3), m = 2 or 4 (kernels/winograd.py): by chunks of tiles, or, for
        `wide` convs (min(Cin, Cout) ≥ `winograd_by_cout_min_channels`, as conv2d found) with few
        tiles, by blocks of output channels."""
        B, Cin, Cout = x.shape[0], x.shape[1], out.shape[1]
        Ty, Tx = -(-out.shape[2] // m), -(-out.shape[3] // m)               # tiles per image
        if wide:
            if B * Ty * Tx <= self.winograd_dots_max_tiles and B * Ty * Tx * Cin * 4 <= self.winograd_dots_max_bytes:
                return self._conv3x3_winograd_dots(m, x, w, bias, pt, pl, out, Ty, Tx)
            if B * Ty * Tx <= self.winograd_by_cout_max_tiles:
                return self._conv3x3_winograd_by_cout(m, x, w, bias, pt, pl, out, Ty, Tx)
        U = np.empty(((m + 2) ** 2, Cout, Cin), np.float32)      # one (Cout, Cin) matrix per ξ
        with blas_single_threaded():
            parallel_for(_winograd.weight_transform, Cout, w, U, work=U.size)
        rows = B * Ty                                           # tile rows in the batch
        per_task = max(1, round(self.winograd_chunk_tiles / Tx))            # in tile rows,
        per_task = min(per_task, -(-rows // (2 * num_threads())))           # 2+ tasks per core
        with blas_single_threaded():                        # one GEMM per core, chunks in parallel
            parallel_for(_winograd.conv3x3_kernel, -(-rows // per_task), x, _f32(U), bias, int(pt), int(pl), out,
                         per_task)

    def _input_transform(self, m, x, pt, pl, Ty, Tx):
        """V (ξ, Cin, tiles) for all tiles of the batch, in parallel over input channels."""
        V = np.empty(((m + 2) ** 2, x.shape[1], x.shape[0] * Ty * Tx), np.float32)
        parallel_for(_winograd.input_transform_kernel, x.shape[1], x, int(pt), int(pl), Ty, Tx, V, work=2 * V.size)
        return V

    def _conv3x3_winograd_by_cout(self, m, x, w, bias, pt, pl, out, Ty, Tx):
        """All tiles' input transform V first, then blocks of output channels in parallel, each
        transforming its own weights: no task reads all of U."""
        Cin, Cout = x.shape[1], out.shape[1]
        V = self._input_transform(m, x, pt, pl, Ty, Tx)
        u_bytes = V.shape[0] * Cout * Cin * 4                       # all of U, float32
        tasks = num_threads() * -(-u_bytes // (num_threads() * self.winograd_u_block_bytes))
        block = -(-Cout // tasks)
        with blas_single_threaded():
            parallel_for(_winograd.conv3x3_by_cout_kernel, -(-Cout // block), w, V, bias, out, block)

    def _conv3x3_winograd_dots(self, m, x, w, bias, pt, pl, out, Ty, Tx):
        """All tiles' input transform, turned to Vt (ξ, tiles, Cin), then blocks of
        `winograd_dots_block` output channels in parallel (`conv3x3_dots_kernel`)."""
        V = self._input_transform(m, x, pt, pl, Ty, Tx)
        xi, Cin, tiles = V.shape
        Vt = np.empty((xi, tiles, Cin), np.float32)
        parallel_for(_el.transpose_kernel, xi * -(-Cin // 32), _f32(V), Vt, work=2 * V.size)
        block = self.winograd_dots_block
        parallel_for(_winograd.conv3x3_dots_kernel, -(-out.shape[1] // block), w, Vt, bias, out, block)

    def group_norm(self, x, num_groups, weight, bias, eps, silu=False):
        x = _f32(x)
        B, C = x.shape[:2]
        if C % num_groups:
            raise ValueError(f"group_norm: {C} channels do not split into {num_groups} groups")
        out = np.empty(x.shape, np.float32)
        shape = (B, num_groups, C // num_groups, -1)
        parallel_for(_norm.group_norm_kernel, B * num_groups, x.reshape(shape), _f32(weight), _f32(bias), float(eps),
                     bool(silu), out.reshape(shape), work=2 * x.size)
        return out

    def layer_norm(self, x, weight, bias, eps):
        x = _f32(x)
        out = np.empty(x.shape, np.float32)
        C = x.shape[-1]
        parallel_for(_norm.layer_norm_kernel, x.size // C, x.reshape(-1, C), _f32(weight), _f32(bias), float(eps),
                     out.reshape(-1, C), work=2 * x.size)
        return out

    def silu(self, x):
        return _unary(_el.silu_kernel, x)

    def gelu(self, x):
        return _unary(_el.gelu_kernel, x)

    def relu(self, x):
        return _unary(_el.relu_kernel, x)

    def quick_gelu(self, x):
        return _unary(_el.quick_gelu_kernel, x)

    def geglu(self, x):
        x = _f32(x)
        *lead, two_f = x.shape
        if two_f % 2:
            raise ValueError(f"geglu: last axis {two_f} is not even")
        out = np.empty((*lead, two_f // 2), np.float32)
        rows = x.size // two_f
        parallel_for(_el.geglu_kernel, rows, x.reshape(rows, two_f), out.reshape(rows, two_f // 2), work=x.size + out.size)
        return out

    def linear_geglu(self, x, weight, bias=None):
        x = _f32(x)
        *lead, n_in = x.shape
        two_f = weight.shape[0]
        if two_f % 2:
            raise ValueError(f"linear_geglu: {two_f} output features do not split into (h, gate) halves")
        x2 = x.reshape(-1, n_in)
        if 4 * x2.shape[0] * two_f < self.linear_geglu_min_bytes:
            return super().linear_geglu(x, weight, bias)
        out = np.empty((x2.shape[0], two_f // 2), np.float32)
        bias = _f32(np.zeros(two_f, np.float32) if bias is None else bias)
        tile = self.linear_geglu_tile
        tasks = -(-x2.shape[0] // tile) * -(-out.shape[1] // tile)
        with blas_single_threaded():                        # one GEMM per core, tiles in parallel
            parallel_for(_el.linear_geglu_kernel, tasks, x2, _f32(weight), bias, out, tile)
        return out.reshape(*lead, two_f // 2)

    def attention(self, q, k, v, heads, causal=False):
        q, k, v = _f32(q), _f32(k), _f32(v)
        if q.shape[2] % heads:
            raise ValueError(f"attention: {q.shape[2]} channels do not split into {heads} heads")
        out = np.empty(q.shape, np.float32)
        tile_q, tile_k = self.attention_tiles
        B, Nq, C = q.shape
        tasks = B * heads * -(-Nq // tile_q)
        work = 2 * q.size + 2 * k.size + B * heads * Nq * k.shape[1]        # + the scores
        with blas_single_threaded():                     # the tiles run one per core
            parallel_for(_attention.attention_kernel, tasks, q, k, v, int(heads), bool(causal), out, tile_q, tile_k,
                         work=work)
        return out

    def to_tokens(self, x):
        x = _f32(x)
        B, C, H, W = x.shape
        out = np.empty((B, H * W, C), np.float32)
        parallel_for(_el.transpose_kernel, B * -(-C // 32), x.reshape(B, C, H * W), out, work=2 * x.size)
        return out

    def to_image(self, x, height, width):
        x = _f32(x)
        B, N, C = x.shape
        if N != height * width:
            raise ValueError(f"to_image: {N} tokens are not a {height}×{width} image")
        out = np.empty((B, C, height, width), np.float32)
        parallel_for(_el.transpose_kernel, B * -(-N // 32), x, out.reshape(B, C, N), work=2 * x.size)
        return out

    def upsample_nearest2x(self, x):
        x = _f32(x)
        B, C, H, W = x.shape
        out = np.empty((B, C, 2 * H, 2 * W), np.float32)
        parallel_for(_el.upsample_nearest2x_kernel, B * C, x.reshape(B * C, H, W), out.reshape(B * C, 2 * H, 2 * W),
                     work=5 * x.size)
        return out

    # Training: backward kernels where they beat the inherited NumPy twins (kernels/backward.py;
    # imported on first use, so inference never loads them). Ops without one here (linear,
    # shape ops, take) inherit NumpyBackend's, already BLAS products or cheap copies.
    conv_backward_chunk_bytes = 2 << 20     # im2col scratch per chunk of output rows (1-2 MB measured
                                            # fastest at the shapes model's 8×8, same as 16 MB at SD's 64×64)
    attention_backward_tiles = (128, 256)   # (queries, keys): P and dP tiles of 128 KB each

    def conv2d_backward(self, grad, x, weight, bias=None, stride=1, padding=0, frozen=False):
        """∂L/∂W by im2col GEMMs in chunks of output rows (stored tap-major, like this backend's
        weights). ∂L/∂x: with stride 1 it is the convolution of ∂L/∂y with the kernel flipped in
        both axes and Cin, Cout swapped, padded by k − 1 − p on each side,
            ∂L/∂x[c, y, x] = Σ_o,i,j W[o, c, i, j] ∂L/∂y[o, y + p_top − i, x + p_left − j],
        so it runs on the forward's own fast paths (Winograd for 3×3); other strides scatter
        Wᵀ ∂L/∂y back through col2im."""
        from tinysd.kernels import backward as _backward
        x, grad = _f32(x), _f32(grad)
        B, Cin, H, W = x.shape
        Cout, _, kh, kw = weight.shape
        (pt, pb, pl, pr), Ho, Wo = conv_output_size(x.shape, weight.shape, stride, padding)
        if grad.shape != (B, Cout, Ho, Wo):
            raise ValueError(f"conv2d_backward: grad {grad.shape} is not the output's shape {(B, Cout, Ho, Wo)}")
        none = np.empty((0, 0, 0, 0), np.float32)
        if stride == 1 and max(pt, pb) < kh and max(pl, pr) < kw:
            flipped = weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)             # (Cin, Cout, kh, kw)
            dx = self.conv2d(grad, flipped, None, 1, (kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr))
            dx_scatter = none
        else:
            dx = dx_scatter = np.zeros_like(x)
        dw = none if frozen else np.empty((Cout, kh, kw, Cin), np.float32)
        if dw.size or dx_scatter.size:
            rows = max(1, self.conv_backward_chunk_bytes // (4 * kh * kw * Cin * Wo))
            _backward.conv2d_backward_kernel(x, _f32(weight.transpose(0, 2, 3, 1)), grad, int(stride),
                                             int(pt), int(pl), dw, dx_scatter, int(rows))
        if frozen:
            return dx, None, None
        return dx, dw.transpose(0, 3, 1, 2), None if bias is None else grad.sum(axis=(0, 2, 3))

    def group_norm_backward(self, grad, x, num_groups, weight, bias, eps, silu=False, frozen=False):
        from tinysd.kernels import backward as _backward
        x, grad = _f32(x), _f32(grad)
        B, C = x.shape[:2]
        if C % num_groups:
            raise ValueError(f"group_norm: {C} channels do not split into {num_groups} groups")
        shape = (B, num_groups, C // num_groups, -1)
        dx = np.empty_like(x)
        dweight_b, dbias_b = np.empty((B, C), np.float32), np.empty((B, C), np.float32)
        parallel_for(_backward.group_norm_backward_kernel, B * num_groups, grad.reshape(shape), x.reshape(shape),
                     _f32(weight), _f32(bias), float(eps), bool(silu), dx.reshape(shape), dweight_b, dbias_b,
                     work=3 * x.size)
        if frozen:
            return dx, None, None
        return dx, dweight_b.sum(axis=0), dbias_b.sum(axis=0)

    def layer_norm_backward(self, grad, x, weight, bias, eps, frozen=False):
        from tinysd.kernels import backward as _backward
        x, grad = _f32(x), _f32(grad)
        C = x.shape[-1]
        M = x.size // C
        parts = max(1, min(M, 4 * num_threads()))
        dx = np.empty_like(x)
        dweight_p, dbias_p = np.empty((parts, C), np.float32), np.empty((parts, C), np.float32)
        parallel_for(_backward.layer_norm_backward_kernel, parts, grad.reshape(M, C), x.reshape(M, C), _f32(weight),
                     float(eps), dx.reshape(M, C), dweight_p, dbias_p, work=3 * x.size)
        if frozen:
            return dx, None, None
        return dx, dweight_p.sum(axis=0), dbias_p.sum(axis=0)

    def _unary_backward(self, kernel_name, grad, x):
        from tinysd.kernels import backward as _backward
        x, grad = _f32(x), _f32(grad)
        dx = np.empty_like(x)
        parallel_for(getattr(_backward, kernel_name), x.size, grad.reshape(-1), x.reshape(-1), dx.reshape(-1),
                     work=3 * x.size)
        return dx

    def silu_backward(self, grad, x):
        return self._unary_backward("silu_backward_kernel", grad, x)

    def gelu_backward(self, grad, x):
        return self._unary_backward("gelu_backward_kernel", grad, x)

    def quick_gelu_backward(self, grad, x):
        return self._unary_backward("quick_gelu_backward_kernel", grad, x)

    def geglu_backward(self, grad, x):
        from tinysd.kernels import backward as _backward
        x, grad = _f32(x), _f32(grad)
        two_f = x.shape[-1]
        dx = np.empty_like(x)
        rows = x.size // two_f
        parallel_for(_backward.geglu_backward_kernel, rows, grad.reshape(rows, two_f // 2), x.reshape(rows, two_f),
                     dx.reshape(rows, two_f), work=2 * x.size + grad.size)
        return dx

    def attention_backward(self, grad, q, k, v, heads, causal=False, out=None):
        """Flash-style (kernels/backward.py): no (Nq, Nk) matrix, memory O(N·d). Without the
        forward's `out`, one forward runs first to get it."""
        from tinysd.kernels import backward as _backward
        q, k, v, grad = _f32(q), _f32(k), _f32(v), _f32(grad)
        if q.shape[2] % heads:
            raise ValueError(f"attention: {q.shape[2]} channels do not split into {heads} heads")
        out = self.attention(q, k, v, heads, causal=causal) if out is None else _f32(out)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        tile_q, tile_k = self.attention_backward_tiles
        args = (q, k, v, out, grad, int(heads), bool(causal), tile_q, tile_k, dq, dk, dv)
        tasks = q.shape[0] * heads
        if tasks >= num_threads():
            with blas_single_threaded():                     # one (batch, head) per core
                parallel_for(_backward.attention_backward_kernel, tasks, *args)
        else:                                                # one after the other, BLAS on all cores
            _backward.attention_backward_kernel(*args, 0, tasks)
        return dq, dk, dv
