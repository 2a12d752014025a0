"""The `cuda` backend's kernels against their NumPy twins (the NumpyBackend methods).

Without an NVIDIA GPU they run in numba's CUDA simulator (every thread a Python thread), so the
shapes are tiny; odd sizes and small tile configurations make every kernel cross its tile edges.
On a GPU machine the same tests run on the device. The simulator does not type-check kernels
as the real compiler does: `test_kernels_compile_for_sm90` compiles each one to PTX where a CUDA
toolkit (libnvvm) is installed, even without a GPU.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest


def _has_nvidia_gpu():
    return os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia/gpus")


if not _has_nvidia_gpu():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")   # before anything imports numba.cuda

from tinysd.backend import BACKENDS, NumpyBackend, get_backend  # noqa: E402

cuda_mod = pytest.importorskip("tinysd.kernels.cuda", reason="numba missing")
from tinysd.kernels.cuda import CudaBackend, DeviceArray  # noqa: E402

ref = NumpyBackend()
TINY_GEMM = (8, 8, 4, 2, 2)          # (BM, BN, BK, TM, TN): 16 threads, many tiles on tiny shapes
TINY_ATTENTION = (4, 4, 2)           # (BQ, BK, TX): 8 threads


@pytest.fixture(scope="module")
def cb():
    try:
        return get_backend("cuda")
    except RuntimeError as e:        # numba.cuda was imported for real before this file, no GPU
        pytest.skip(str(e))


def rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def close(out, expected, tol=1e-5):
    """Within `tol` relative to the scale of the expected values."""
    assert out.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * scale)


def test_registered(cb):
    assert BACKENDS["cuda"] is CudaBackend
    assert cb.name == "cuda" and isinstance(cb, NumpyBackend)


@pytest.mark.skipif(_has_nvidia_gpu(), reason="this machine has a GPU")
def test_no_gpu_is_a_clear_error():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    code = "from tinysd.backend import get_backend; get_backend('cuda')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--backend cuda needs an NVIDIA GPU with CUDA; none was found" in r.stderr


# -- dense layers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape,out_features,with_bias", [((5, 9), 7, True), ((2, 3, 6), 5, False)])
def test_linear(cb, x_shape, out_features, with_bias):
    x, w = rand(*x_shape), rand(out_features, x_shape[-1], seed=1)
    b = rand(out_features, seed=2) if with_bias else None
    out = cb.linear(cb.asarray(x), cb.asarray(w), None if b is None else cb.asarray(b))
    assert isinstance(out, DeviceArray)
    close(cb.numpy(out), ref.linear(x, w, b))


def test_linear_crosses_tile_edges(cb):
    """M, N, K = 19, 21, 11 on 8×8×4 tiles: 3×3 blocks, partial in every direction."""
    from tinysd.kernels import cuda_kernels as K
    x, w, b = rand(19, 11), rand(21, 11, seed=1), rand(21, seed=2)
    out = cb._empty((19, 21))
    K.linear(cb.asarray(x).data, cb.asarray(w).data, cb.asarray(b).data, out.data, tile=TINY_GEMM)
    close(cb.numpy(out), ref.linear(x, w, b))


@pytest.mark.parametrize("k,stride,padding,with_bias", [
    (3, 1, 1, True),               # the U-Net / VAE 3×3 conv
    (3, 2, (0, 1, 0, 1), True),    # the VAE down-sampler: asymmetric padding, stride 2
    (1, 1, 0, False),              # 1×1 (shortcut, proj_in)
])
def test_conv2d(cb, k, stride, padding, with_bias):
    x, w = rand(2, 3, 5, 6), rand(4, 3, k, k, seed=1)
    b = rand(4, seed=2) if with_bias else None
    out = cb.conv2d(cb.asarray(x), cb.asarray(w), None if b is None else cb.asarray(b), stride, padding)
    close(cb.numpy(out), ref.conv2d(x, w, b, stride, padding))


def test_conv2d_crosses_tile_edges(cb):
    """Cout = 10 and N = B·Ho·Wo = 2·4·5 = 40 on 8×8 tiles; K = 3·9 = 27 on BK = 4."""
    from tinysd.kernels import cuda_kernels as K
    x, w, b = rand(2, 3, 4, 5), rand(10, 3, 3, 3, seed=1), rand(10, seed=2)
    out = cb._empty((2, 10, 4, 5))
    K.conv2d(cb.asarray(x).data, cb.asarray(w).data, cb.asarray(b).data, 1, 1, 1, out.data, tile=TINY_GEMM)
    close(cb.numpy(out), ref.conv2d(x, w, b, 1, 1))


# -- attention ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,d,nq,nk,causal", [
    (2, 8, 5, 7, False),       # small head dim: the D ≤ 64 tiles
    (2, 8, 6, 6, True),        # CLIP's causal self-attention
    (1, 100, 3, 5, False),     # the 64 < D ≤ 160 tiles (U-Net: 80, 160)
    (1, 200, 3, 5, False),     # the D ≤ 512 tiles (VAE: one head of 512)
])
def test_attention(cb, heads, d, nq, nk, causal):
    q, k, v = rand(1, nq, heads * d), rand(1, nk, heads * d, seed=1), rand(1, nk, heads * d, seed=2)
    out = cb.attention(cb.asarray(q), cb.asarray(k), cb.asarray(v), heads, causal=causal)
    close(cb.numpy(out), ref.attention(q, k, v, heads, causal=causal))


@pytest.mark.parametrize("nq,nk,causal", [(9, 11, False), (10, 10, True)])
def test_attention_crosses_tile_edges(cb, nq, nk, causal):
    """Several query blocks and key tiles of 4 (the online softmax rescales across tiles), a
    head dim of 3 that does not split evenly over the 2 threads of a row, batch 2 × 2 heads."""
    from tinysd.kernels import cuda_kernels as K
    q, k, v = rand(2, nq, 6), rand(2, nk, 6, seed=1), rand(2, nk, 6, seed=2)
    out = cb._empty(q.shape)
    K.attention(cb.asarray(q).data, cb.asarray(k).data, cb.asarray(v).data, 2, causal, out.data,
                tile=TINY_ATTENTION)
    close(cb.numpy(out), ref.attention(q, k, v, 2, causal=causal))


# -- normalisation and activations -------------------------------------------------------------------
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm(cb, silu):
    x, g, b = 3 * rand(1, 6, 3, 5) + 1, rand(6, seed=1), rand(6, seed=2)
    close(cb.numpy(cb.group_norm(cb.asarray(x), 2, cb.asarray(g), cb.asarray(b), 1e-5, silu=silu)),
          ref.group_norm(x, 2, g, b, 1e-5, silu=silu))


def test_layer_norm(cb):
    x, g, b = 3 * rand(1, 3, 7) + 1, rand(7, seed=1), rand(7, seed=2)
    close(cb.numpy(cb.layer_norm(cb.asarray(x), cb.asarray(g), cb.asarray(b), 1e-5)),
          ref.layer_norm(x, g, b, 1e-5))


@pytest.mark.parametrize("op", ["silu", "gelu", "quick_gelu", "geglu"])
def test_activations(cb, op):
    x = 3 * rand(2, 3, 10)
    close(cb.numpy(getattr(cb, op)(cb.asarray(x))), getattr(ref, op)(x))


# -- shape ops ----------------------------------------------------------------------------------------
def test_shape_ops(cb):
    img, tok = rand(2, 3, 4, 5), rand(2, 20, 3, seed=1)
    close(cb.numpy(cb.upsample_nearest2x(cb.asarray(img))), ref.upsample_nearest2x(img))
    close(cb.numpy(cb.to_tokens(cb.asarray(img))), ref.to_tokens(img))
    close(cb.numpy(cb.to_image(cb.asarray(tok), 4, 5)), ref.to_image(tok, 4, 5))
    other = rand(2, 2, 4, 5, seed=2)
    close(cb.numpy(cb.concat([cb.asarray(img), cb.asarray(other)], axis=1)), ref.concat([img, other], 1))
    close(cb.numpy(cb.concat([cb.asarray(tok), cb.asarray(tok)], axis=-1)), ref.concat([tok, tok], -1))
    table, ids = rand(11, 4), np.array([[0, 10, 3], [3, 3, 1]])
    close(cb.numpy(cb.take(cb.asarray(table), ids)), ref.take(table, ids))
    with pytest.raises(IndexError, match=r"\[0, 11\)"):
        cb.take(cb.asarray(table), np.array([[11]]))


def test_transpose_crosses_tile_edges(cb):
    """(1, 33, 2) tokens: two 32-row tiles, the second holding one row."""
    tok = rand(1, 33, 2)
    close(cb.numpy(cb.to_image(cb.asarray(tok), 3, 11)), ref.to_image(tok, 3, 11))


# -- the device array ----------------------------------------------------------------------------------
def test_device_array_arithmetic(cb):
    a, b = rand(2, 3, 2, 2), rand(2, 3, 2, 2, seed=1)
    da, db = cb.asarray(a), cb.asarray(b)
    close(cb.numpy(da + db), a + b)
    close(cb.numpy(da * db), a * b)
    close(cb.numpy(da - db), a - b)
    close(cb.numpy(2.0 * da + 1), 2 * a + 1)
    close(cb.numpy(1 - da / 4), 1 - a / 4)
    close(cb.numpy(-da), -a)
    temb = rand(2, 3, seed=2)                     # the U-Net's time embedding added per channel
    close(cb.numpy(da + cb.asarray(temb).reshape(2, 3, 1, 1)), a + temb[:, :, None, None])
    bias = rand(2, seed=3)                        # a host array broadcast over tokens
    close(cb.numpy(bias + da.reshape(2, 6, 2)), bias + a.reshape(2, 6, 2))
    assert da.reshape(6, -1).shape == (6, 4) and da.shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="cannot reshape"):
        da.reshape(5, -1)
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 2\) and \(5,\)"):
        da + cb.asarray(rand(5))
    close(cb.numpy(da[:, 1:, :1, :]), a[:, 1:, :1, :])        # the U-Net's crop of odd sizes
    with pytest.raises(TypeError, match="backend.numpy"):
        np.asarray(da)


# -- the real compiler -------------------------------------------------------------------------------
PTX_CHECK = textwrap.dedent("""
    import sys, types
    from numba import cuda, types as T
    from numba.cuda.cudadrv import nvvm
    try:
        nvvm.NVVM()
    except Exception as e:
        print("no libnvvm:", e); sys.exit(3)
    import numba.cuda.dispatcher as dispatcher
    # device functions ask the current device for its compute capability: there is none here
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    from tinysd.kernels import cuda_kernels as K
    f1, f2, f3, f4 = T.float32[::1], T.float32[:, ::1], T.float32[:, :, ::1], T.float32[:, :, :, ::1]
    i8, b1, f32, tup = T.int64, T.boolean, T.float32, T.UniTuple(T.int64, 4)
    jobs = [(K.activation_kernel, (i8, f1, f1)), (K.binary_kernel, (i8, f1, f1, f1, tup, tup, tup)),
            (K.scalar_kernel, (i8, f1, f32, b1, f1)), (K.geglu_kernel, (f2, f2)),
            (K.norm_kernel, (f2, f1, f1, i8, i8, f32, b1, f2)), (K.upsample_nearest2x_kernel, (f3, f3)),
            (K.copy_columns_kernel, (f2, f2, i8)), (K.transpose_kernel, (f3, f3)),
            (K.take_kernel, (f2, T.int64[::1], f2)), (K.copy_4d_kernel, (T.float32[:, :, :, :], f4))]
    for tile in (K.GEMM_BIG, K.GEMM_SMALL):
        linear, conv = K.gemm_kernels(*tile)
        jobs += [(linear, (f2, f2, f1, b1, f2)), (conv, (f4, f2, f1, b1) + (i8,) * 6 + (f3,))]
    for D in (40, 64, 80, 160, 512):
        jobs.append((K.attention_kernel(D, *K.pick_attention_tile(D)), (f3, f3, f3, i8, f32, b1, f3)))
    for kernel, sig in jobs:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        assert ".f64" not in ptx, f"{kernel.py_func.__name__} computes in float64"
    print("compiled", len(jobs))
""")


def test_kernels_compile_for_sm90():
    """Every kernel types and compiles with numba's real CUDA compiler, for sm_90, all float32."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    r = subprocess.run([sys.executable, "-c", PTX_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode == 3:
        pytest.skip("no CUDA toolkit (libnvvm) to compile with; set CUDA_HOME: " + r.stdout.strip())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compiled 19" in r.stdout
