"""The `cpu` backend's Numba kernels against their NumPy twins (tinysd.backend.NumpyBackend).

Random shapes with odd sizes, non-contiguous and float64 inputs; float32 tolerances relative
to the output's scale. A few ops are also checked against torch where it is installed.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")
from tinysd.backend import NumpyBackend, get_backend  # noqa: E402
from tinysd.kernels.cpu import CpuBackend  # noqa: E402

ref, cpu = NumpyBackend(), CpuBackend()
rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(actual, expected, rtol=1e-5):
    """|actual − expected| ≤ rtol · max|expected| everywhere (float32 sums reorder)."""
    assert actual.shape == expected.shape
    assert actual.dtype == np.float32
    scale = max(float(np.abs(expected).max()), 1e-30)
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol} × scale {scale:.3g}"


def test_registered():
    assert isinstance(get_backend("cpu"), CpuBackend)


def test_gemm_on_strided_views():
    from tinysd.kernels.blas import gemm
    a, b = randn(40, 60), randn(70, 50)
    c = np.full((45, 80), 7.0, np.float32)
    view = c[3:40, 11:58]
    gemm(a[:37, 5:55], b[:47, :50], view, 0.5, 1.0, True)        # c ← ½ a bᵀ + c
    expected = np.full((45, 80), 7.0, np.float32)
    expected[3:40, 11:58] += 0.5 * a[:37, 5:55] @ b[:47, :50].T
    close(c, expected)


@pytest.mark.parametrize("lead,n_in,n_out,bias", [((2, 77), 64, 48, True), ((5,), 33, 17, False),
                                                  ((1, 3, 9), 20, 30, True), ((1,), 130, 41, True)])
def test_linear(lead, n_in, n_out, bias):
    """sgemm, and with at most `linear_rows_max` rows ((5,), (1,)) the dot-product kernel."""
    x, w = randn(*lead, n_in), randn(n_out, n_in)
    b = randn(n_out) if bias else None
    close(cpu.linear(x, cpu.asarray(w), b), ref.linear(x, w, b))
    close(cpu.linear(x.astype(np.float64), w.T.copy().T, b), ref.linear(x, w, b))   # other layouts


@pytest.mark.parametrize("lead,n_in,features,bias", [((2, 77), 64, 48, True), ((37,), 20, 13, False)])
def test_linear_geglu(lead, n_in, features, bias):
    """The fused linear + GEGLU, with tiles of 16 so that rows and features end mid-tile."""
    fused = CpuBackend()
    fused.linear_geglu_tile, fused.linear_geglu_min_bytes = 16, 0
    x, w = randn(*lead, n_in), randn(2 * features, n_in)
    b = randn(2 * features) if bias else None
    close(fused.linear_geglu(x, fused.asarray(w), b), ref.geglu(ref.linear(x, w, b)))


CONV_CASES = [  # B, Cin, Cout, H, W, k, stride, padding
    (2, 5, 7, 9, 11, 3, 1, 1),
    (1, 3, 4, 8, 8, 3, 2, (0, 1, 0, 1)),    # VAE encoder down-sampling: pad right/bottom only
    (2, 6, 5, 13, 10, 3, 2, 1),             # U-Net down-sampling
    (1, 4, 6, 7, 9, 1, 1, 0),               # 1×1 shortcut / proj
    (2, 3, 3, 5, 6, 5, 1, 2),
    (3, 4, 4, 7, 7, 2, 3, 0),
    (1, 8, 3, 31, 17, 3, 1, 1),
]


@pytest.mark.parametrize("path", ["shifted", "im2col"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(case, path):
    """Both direct paths (shifted GEMMs, one im2col GEMM), Winograd kept out of the way."""
    B, Cin, Cout, H, W, k, s, p = case
    be = CpuBackend()
    be.winograd_f2_min_tiles = 1 << 30
    be.im2col_max_pixels = 1 << 30 if path == "im2col" else 0
    x, w, b = randn(B, Cin, H, W), randn(Cout, Cin, k, k), randn(Cout)
    expected = ref.conv2d(x, w, b, s, p)
    close(be.conv2d(x, be.asarray(w), b, s, p), expected)
    close(be.conv2d(x, w, b, s, p), expected)                         # weights not via asarray
    close(be.conv2d(x, w, None, s, p), ref.conv2d(x, w, None, s, p))
    close(be.conv2d(x[:, :, ::-1], w, b, s, p), ref.conv2d(x[:, :, ::-1], w, b, s, p))   # not C order


def test_conv2d_chunked_rows_and_strided_input():
    small = CpuBackend()
    small.conv_chunk_bytes = 4 * 6 * 20 * 3                           # 3 padded rows per chunk
    x, w, b = randn(2, 9, 19, 18), randn(6, 9, 3, 3), randn(6)
    x_view = np.swapaxes(np.swapaxes(x, 2, 3).copy(), 2, 3)             # same values, not C order
    expected = ref.conv2d(x, w, b, 1, 1)
    close(small.conv2d(x_view, small.asarray(w), b, 1, 1), expected)
    close(small.conv2d(x, w, b, 2, 1), ref.conv2d(x, w, b, 2, 1))


WINOGRAD_CASES = [   # (B, Cin, Cout, H, W, padding): odd sizes (a half tile at the edge), asymmetric padding
    (1, 3, 5, 7, 9, 1), (2, 8, 4, 6, 6, 0), (2, 33, 17, 13, 10, 1), (1, 4, 6, 5, 8, (0, 1, 0, 1)),
    (3, 16, 32, 11, 7, (1, 0, 2, 1)),
]


def winograd_backend(m, chunk_tiles, split="tiles"):
    """A cpu backend that takes Winograd F(m×m, 3×3) for every 3×3 stride-1 conv, split between
    the cores by chunks of tiles, by blocks of output channels ("cout") or by small blocks of
    output channels multiplied by dot products ("dots")."""
    be = CpuBackend()
    be.winograd_f4_min_tiles = be.winograd_f4_min_tiles_wide = 1 if m == 4 else 1 << 30
    be.winograd_f2_min_tiles = 1
    be.winograd_chunk_tiles = chunk_tiles
    be.winograd_by_cout_max_tiles = 1 << 30 if split == "cout" else 0
    be.winograd_dots_max_tiles = be.winograd_dots_max_bytes = 1 << 30 if split == "dots" else 0
    be.winograd_by_cout_min_channels = 1 if split != "tiles" else 1 << 30
    return be


@pytest.mark.parametrize("split", ["tiles", "cout", "dots"])
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("case", WINOGRAD_CASES)
def test_conv2d_winograd(case, m, split):
    """3×3 stride-1 convs by Winograd F(2×2, 3×3) and F(4×4, 3×3), equal to the direct
    convolution. Chunks of ~5 tiles, i.e. one or two tile rows, so that chunk edges fall inside
    pictures and across picture boundaries; by output channels, blocks of 5 (U held to 5
    channels' worth), so that 17 channels end a block inside the last one; the same blocks of 5
    for the dot products, which also leave rows and columns past the last 4 × 4 block."""
    B, Cin, Cout, H, W, p = case
    wino = winograd_backend(m, chunk_tiles=5, split=split)
    wino.winograd_u_block_bytes = (m + 2) ** 2 * 5 * Cin * 4
    wino.winograd_dots_block = 5
    x, w, b = randn(B, Cin, H, W, scale=2.0), randn(Cout, Cin, 3, 3), randn(Cout)
    expected = ref.conv2d(x, w, b, 1, p)
    close(wino.conv2d(x, wino.asarray(w), b, 1, p), expected)
    close(wino.conv2d(x[:, :, :, ::-1], w, None, 1, p), ref.conv2d(x[:, :, :, ::-1], w, None, 1, p))


@pytest.mark.parametrize("split", ["tiles", "dots"])
def test_conv2d_winograd_f4_accuracy_at_sd_widths(split):
    """F(4×4, 3×3)'s rounding grows with the channels summed (transform entries up to 8 and
    1/24); at SD's 512 input channels it must stay well inside the parity tests' 1e-4, with
    BLAS's sums and with the dot products' (reassociated: 16 partial sums a dot)."""
    x, w, b = randn(1, 512, 14, 14), randn(64, 512, 3, 3, scale=0.05), randn(64)
    expected = ref.conv2d(x, w, b, 1, 1)
    got = winograd_backend(4, chunk_tiles=128, split=split).conv2d(x, w, b, 1, 1)
    assert np.abs(got - expected).max() <= 3e-5 * np.abs(expected).max()


@pytest.mark.parametrize("m, n, k", [(16, 64, 640), (7, 5, 33), (3, 9, 4), (4, 4, 1)])
def test_dot_products(m, n, k):
    """winograd.dot_products (4 × 4 blocks, then the rows and columns left over) equals A @ Btᵀ."""
    from tinysd.kernels import winograd

    A, Bt = randn(m, k), randn(n, k)
    C = np.full((m, n), np.nan, np.float32)
    winograd.dot_products(A, Bt, C)
    close(C, A.astype(np.float64) @ Bt.T.astype(np.float64), rtol=1e-5)


def test_conv2d_routes():
    """Which way CpuBackend.conv2d takes a 3×3 conv: (F(m×m) Winograd, split by tiles, by
    output channels or by small blocks of them with dot products) or a direct GEMM path."""
    from tinysd.kernels import winograd

    taken = []
    originals = winograd.conv3x3_kernel, winograd.conv3x3_by_cout_kernel, winograd.conv3x3_dots_kernel

    def recording(split, original):
        def kernel(*args):                    # called once per thread's share of the tasks
            if args[-2] == 0:                 # the share that starts at task 0
                taken.append((2 if len(args[1]) == 16 else 4, split))
            original(*args)
        return kernel

    winograd.conv3x3_kernel = recording("tiles", originals[0])
    winograd.conv3x3_by_cout_kernel = recording("cout", originals[1])
    winograd.conv3x3_dots_kernel = recording("dots", originals[2])
    try:
        cases = [((1, 256, 136, 136), 256, (4, "tiles")),   # 1156 4×4 tiles: F4 by tiles
                 ((2, 256, 64, 64), 256, (4, "cout")),      # 512 4×4 tiles, 256 channels: by output channels
                 ((1, 256, 32, 32), 256, (4, "dots")),      # 64 4×4 tiles: by dot products
                 ((2, 256, 32, 32), 256, (4, "cout")),      # 128
                 ((1, 1920, 32, 32), 256, (4, "cout")),     # 64 tiles, but Vt[ξ] 480 KB
                 ((2, 4, 64, 64), 4, (4, "tiles")),         # 512, few channels: by tiles
                 ((1, 256, 16, 16), 256, (4, "dots")),      # 16 4×4 tiles, wide
                 ((1, 8, 16, 16), 8, (2, "tiles")),         # 64 2×2 tiles, few channels: F2
                 ((2, 256, 8, 8), 256, (2, "dots")),        # 8 4×4 tiles, wide: F2
                 ((2, 4, 8, 8), 4, None)]                   # 32 2×2 tiles, few channels: one im2col GEMM
        for shape, cout, route in cases:
            x, w = randn(*shape), randn(cout, shape[1], 3, 3) / np.sqrt(9 * shape[1])
            taken.clear()
            close(cpu.conv2d(x, w, None, 1, 1), ref.conv2d(x, w, None, 1, 1), rtol=1e-4)   # F4's rounding
            assert taken == ([route] if route else []), (shape, taken)
    finally:
        winograd.conv3x3_kernel, winograd.conv3x3_by_cout_kernel, winograd.conv3x3_dots_kernel = originals


def test_conv2d_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="channels"):
        cpu.conv2d(randn(1, 3, 4, 4), randn(2, 4, 3, 3))


def test_asarray_keeps_shape_and_values():
    w = randn(4, 3, 3, 2)
    a = cpu.asarray(w)
    assert a.shape == w.shape and a.dtype == np.float32 and np.array_equal(a, w)
    assert a.transpose(0, 2, 3, 1).flags.c_contiguous


def test_asarray_of_memory_mapped_weight(tmp_path):
    """A conv weight read from a memory-mapped file: the copy is right and the file's pages,
    released after copying, still read back the same values."""
    w = randn(64, 48, 3, 3)
    path = tmp_path / "w.bin"
    path.write_bytes(b"header" + w.tobytes())
    view = np.memmap(path, dtype=np.uint8, mode="r", offset=6)[:w.nbytes].view(np.float32).reshape(w.shape)
    a = cpu.asarray(view)
    assert np.array_equal(a, w) and np.array_equal(view, w)


@pytest.mark.parametrize("shape,groups", [((2, 32, 5, 7), 8), ((1, 12, 33), 3), ((3, 6, 4, 4), 6)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm(shape, groups, silu):
    x = randn(*shape, scale=3.0) + 2.0                                  # a mean offset, as in VAEs
    w, b = randn(shape[1]), randn(shape[1])
    close(cpu.group_norm(x, groups, w, b, 1e-6, silu=silu), ref.group_norm(x, groups, w, b, 1e-6, silu=silu))


def test_layer_norm():
    x, w, b = randn(2, 77, 48, scale=4.0) + 1.0, randn(48), randn(48)
    close(cpu.layer_norm(x, w, b, 1e-5), ref.layer_norm(x, w, b, 1e-5))
    xt = np.swapaxes(randn(2, 48, 77), 1, 2)                            # non-contiguous
    close(cpu.layer_norm(xt, w, b, 1e-5), ref.layer_norm(xt, w, b, 1e-5))


@pytest.mark.parametrize("op", ["silu", "gelu", "quick_gelu"])
def test_activations(op):
    x = randn(3, 1001, scale=6.0)
    x[0, :5] = [0.0, -100.0, 100.0, -1e-3, 90.0]                       # saturation, tiny values
    close(getattr(cpu, op)(x), getattr(ref, op)(x), rtol=2e-6)
    close(getattr(cpu, op)(x[:, ::3]), getattr(ref, op)(x[:, ::3]), rtol=2e-6)


def test_activations_match_torch():
    torch = pytest.importorskip("torch")
    x = randn(4096, scale=5.0)
    t = torch.from_numpy(x)
    close(cpu.silu(x), torch.nn.functional.silu(t).numpy(), rtol=2e-6)
    close(cpu.gelu(x), torch.nn.functional.gelu(t).numpy(), rtol=2e-6)


def test_geglu():
    x = randn(2, 37, 2 * 24, scale=3.0)
    close(cpu.geglu(x), ref.geglu(x), rtol=2e-6)


ATTENTION_CASES = [  # B, Nq, Nk, heads, d, causal
    (1, 77, 77, 12, 8, True),               # CLIP text encoder
    (2, 130, 77, 8, 5, False),              # U-Net cross-attention: Nq past a tile
    (2, 300, 300, 4, 16, False),            # self-attention, Nk spans several key tiles
    (1, 300, 300, 1, 7, True),              # causal across tile boundaries
    (3, 1, 5, 2, 3, False),
]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(case):
    B, Nq, Nk, heads, d, causal = case
    q, k, v = randn(B, Nq, heads * d, scale=2.0), randn(B, Nk, heads * d, scale=2.0), randn(B, Nk, heads * d)
    small = CpuBackend()
    small.attention_tiles = (64, 128)
    expected = ref.attention(q, k, v, heads, causal=causal)
    close(small.attention(q, k, v, heads, causal=causal), expected)
    close(cpu.attention(q, k, v, heads, causal=causal), expected)


def test_attention_peaked_softmax():
    """Scores spread over ±50: most weights e^(s − m) fall below the kernel's e^−60 cut-off
    (which keeps subnormal numbers out of P V); the result is still the twin's."""
    q, k, v = randn(2, 300, 4 * 16, scale=8.0), randn(2, 300, 4 * 16, scale=2.0), randn(2, 300, 4 * 16)
    expected = ref.attention(q, k, v, 4)
    scores = np.einsum("bqd,bkd->bqk", q[..., :16], k[..., :16]) / 4
    assert (scores - scores.max(-1, keepdims=True) < -60).mean() > 0.1
    close(cpu.attention(q, k, v, 4), expected)


def test_attention_strided_inputs_and_torch():
    torch = pytest.importorskip("torch")
    qkv = randn(2, 200, 3 * 32)                                        # fused projection, then split
    q, k, v = qkv[..., :32], qkv[..., 32:64], qkv[..., 64:]
    got = cpu.attention(q, k, v, 4)
    close(got, ref.attention(q, k, v, 4))
    t = [torch.from_numpy(np.ascontiguousarray(a)).reshape(2, 200, 4, 8).transpose(1, 2) for a in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*t).transpose(1, 2).reshape(2, 200, 32)
    close(got, expected.numpy())


def test_attention_gives_blas_its_threads_back():
    """The attention tiles run sgemm one per core; afterwards every other GEMM must get all
    of OpenBLAS's threads again (a per-task set/restore once raced and left it at 1)."""
    from tinysd.kernels.blas import blas_threads

    before = blas_threads()
    if before is None:
        pytest.skip("this BLAS does not report its thread count")
    q = randn(2, 300, 8 * 16)
    for _ in range(3):
        cpu.attention(q, q, q, 8)
    assert blas_threads() == before


def test_upsample_nearest2x():
    x = randn(2, 3, 5, 7)
    out = cpu.upsample_nearest2x(x[:, :, :, ::-1])
    assert np.array_equal(out, ref.upsample_nearest2x(x[:, :, :, ::-1]))


def test_tokens_round_trip():
    x = randn(2, 37, 5, 9)
    tokens = cpu.to_tokens(x)
    assert np.array_equal(tokens, ref.to_tokens(x))
    assert np.array_equal(cpu.to_image(tokens, 5, 9), x)
    with pytest.raises(ValueError, match="tokens"):
        cpu.to_image(tokens, 9, 9)


def test_kernels_compile_once():
    """Every kernel sees one type signature, whatever layout or dtype the caller passed."""
    from tinysd.kernels import attention, conv, elementwise, norm
    x = randn(1, 4, 6, 6)
    for inp in (x, x.astype(np.float64), x[:, :, ::-1]):
        cpu.group_norm(inp, 2, randn(4), randn(4), 1e-5, silu=True)
        cpu.conv2d(inp, randn(4, 4, 3, 3), randn(4), 1, 1)
        cpu.silu(inp)
    for kernel in (norm.group_norm_kernel, conv.conv2d_kernel, elementwise.silu_kernel,
                   attention.attention_kernel):
        assert len(kernel.signatures) <= 1, kernel.signatures


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_no_openmp_threads():
    """The kernels run on kernels/threads.py's threads: no OpenMP runtime is loaded (its idle
    threads, Numba's prange pool, once spun and slowed OpenBLAS's). In a fresh process."""
    code = ("import numpy as np; from tinysd.kernels.cpu import CpuBackend\n"
            "be, x = CpuBackend(), np.ones((2, 64, 32, 32), np.float32)\n"
            "be.conv2d(x, np.ones((64, 64, 3, 3), np.float32), None, 1, 1); be.group_norm(x, 32, x[0, :, 0, 0], "
            "x[0, :, 0, 0], 1e-5, True); t = be.to_tokens(x); be.attention(t, t, t, 2)\n"
            "print('libgomp' in open('/proc/self/maps').read())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


@pytest.mark.parametrize("first, user_value, expected", [
    ("", None, "4"),                           # the usual order: tinysd loads SciPy's OpenBLAS
    ("import scipy.linalg; ", None, "4"),      # loaded before tinysd: told to read it again
    ("", "10", "10"),                          # the user's own setting wins
])
def test_openblas_helpers_sleep_at_once(first, user_value, expected):
    """OpenBLAS's helper threads run with OPENBLAS_THREAD_TIMEOUT = 4 (they sleep at once after a
    GEMM instead of spinning on the cores tinysd's kernels need), and tinysd leaves the process's
    environment as it found it."""
    from tinysd.kernels import blas
    if blas._openblas("openblas_thread_timeout") is None:
        pytest.skip("this BLAS is not OpenBLAS")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user_value:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    code = (f"{first}import os, numpy as np; from tinysd.kernels import blas\n"
            "a = np.ones((300, 300), np.float32); c = np.empty_like(a); blas.gemm(a, a, c, 1.0, 0.0, False)\n"
            "print(blas._openblas('openblas_thread_timeout')(), os.environ.get('OPENBLAS_THREAD_TIMEOUT'), c[0, 0])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [expected, str(user_value), "300.0"]


@pytest.mark.parametrize("user_setting", [None, "MALLOC_TRIM_THRESHOLD_"])
def test_freed_memory_is_kept_for_the_next_op(user_setting):
    """With a CpuBackend made, a 300 MB block (a VAE activation at 512×512 is 268 MB) comes from
    glibc's heap, not its own mmap, and freeing it leaves the heap as big as it was, for the next
    op to reuse without the kernel zeroing new pages (kernels/malloc.py); a user's own malloc
    setting is left alone (and the block is then mmap'd: the assertion can fail)."""
    from tinysd.kernels import malloc
    if malloc.glibc() is None or not hasattr(malloc.glibc(), "mallinfo2"):
        pytest.skip("not glibc ≥ 2.33")
    env = {k: v for k, v in os.environ.items() if k not in malloc._USER_SETTINGS}
    if user_setting:
        env[user_setting] = str(128 << 10)                   # glibc's default
    code = ("import ctypes; from tinysd.kernels import malloc; from tinysd.kernels.cpu import CpuBackend\n"
            "class Info(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in "
            "('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
            "libc = malloc.glibc(); libc.mallinfo2.restype = Info; libc.malloc.restype = ctypes.c_void_p\n"
            "CpuBackend(); before = libc.mallinfo2()\n"
            "p = libc.malloc(300 << 20); during = libc.mallinfo2(); libc.free(ctypes.c_void_p(p)); after = libc.mallinfo2()\n"
            "print(malloc.keep_freed_memory(), during.hblkhd == before.hblkhd, after.arena >= during.arena)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    applied, from_heap, kept = run.stdout.split()
    assert applied == str(user_setting is None)
    assert (from_heap, kept) == (("True", "True") if user_setting is None else ("False", "True"))


def test_every_kernel_compiles_once_for_read_only_and_writable_weights():
    """Weights that are views of a read-only memory-mapped file and weights in memory give every
    kernel the same type signature, so a fresh install compiles each kernel once (and the cache
    filled by one model serves the next)."""
    from tinysd.kernels import attention, blas, conv, elementwise, norm, winograd
    be = CpuBackend()
    be.linear_geglu_min_bytes = 0
    for writable in (True, False):
        def weight(*shape):
            w = randn(*shape)
            w.flags.writeable = writable
            return w
        x, tokens = randn(2, 8, 6, 6), randn(2, 9, 8)
        be.group_norm(x, 4, weight(8), weight(8), 1e-5, silu=writable)
        be.layer_norm(tokens, weight(8), weight(8), 1e-5)
        be.linear(tokens, weight(5, 8), weight(5))
        be.linear_geglu(tokens, weight(10, 8), weight(10))
        be.geglu(tokens)
        be.attention(tokens, tokens, tokens, 2, causal=writable)
        for path in ("f4", "f2", "f4 by cout", "f2 by cout", "f4 dots", "f2 dots", "im2col", "shifted"):
            be.winograd_f4_min_tiles = be.winograd_f4_min_tiles_wide = 1 if path.startswith("f4") else 1 << 30
            be.winograd_f2_min_tiles = 1 if path.startswith("f2") else 1 << 30
            be.winograd_by_cout_max_tiles = 1 << 30 if path.endswith("cout") else 0
            be.winograd_dots_max_tiles = be.winograd_dots_max_bytes = 1 << 30 if path.endswith("dots") else 0
            be.winograd_by_cout_min_channels = 1 if path.startswith("f") else 1 << 30
            be.im2col_max_pixels = 1 << 30 if path == "im2col" else 0
            be.conv2d(x, weight(8, 8, 3, 3), weight(8), 1, 1)
            be.conv2d(x, be.asarray(weight(8, 8, 3, 3)), None, 1, 1)
        be.conv2d(x, weight(4, 8, 1, 1), weight(4))
        be.upsample_nearest2x(x)
        be.to_image(be.to_tokens(x), 6, 6)
        be.silu(x), be.gelu(x), be.quick_gelu(x)
    kernels = [attention.attention_kernel, conv.conv2d_kernel, conv.im2col_conv2d_kernel, conv.conv1x1_kernel,
               elementwise.silu_kernel, elementwise.gelu_kernel, elementwise.quick_gelu_kernel,
               elementwise.geglu_kernel, elementwise.linear_geglu_kernel, elementwise.upsample_nearest2x_kernel,
               elementwise.transpose_kernel, norm.group_norm_kernel, norm.layer_norm_kernel,
               winograd.weight_transform, winograd.conv3x3_kernel,
               winograd.input_transform_kernel, winograd.conv3x3_by_cout_kernel, winograd.conv3x3_dots_kernel,
               blas.gemm]
    for kernel in kernels:
        assert len(kernel.signatures) == 1, (kernel.__name__, kernel.signatures)


def test_parallel_for_runs_every_task_once():
    """A real kernel over 1, 2 and 3 threads: shares that end mid-array leave no value out."""
    from tinysd.kernels import threads
    from tinysd.kernels.elementwise import silu_kernel

    before = threads.num_threads()
    x = randn(100_003, scale=4.0)
    try:
        for n_threads in (1, 2, 3):
            threads.set_num_threads(n_threads)
            out = np.full_like(x, np.nan)
            threads.parallel_for(silu_kernel, x.size, x, out)
            close(out, ref.silu(x), rtol=2e-6)
    finally:
        threads.set_num_threads(before)


def test_parallel_for_shares_and_errors(monkeypatch):
    """One contiguous share per thread, every task once; small work stays on the calling thread;
    a helper thread that never gets to run holds nothing up (the caller claims its share); an
    exception in any share reaches the caller."""
    import threading

    from tinysd.kernels import threads

    before, me = threads.num_threads(), threading.get_ident()
    calls = []

    def kernel(fail, start, stop):
        calls.append((start, stop, threading.get_ident()))
        if fail and start > 0:
            raise ValueError("share failed")

    try:
        threads.set_num_threads(3)
        threads.parallel_for(kernel, 10, False)
        assert sorted(c[:2] for c in calls) == [(0, 3), (3, 6), (6, 10)]
        calls.clear()
        threads.parallel_for(kernel, 10, False, work=threads.min_work - 1)
        assert calls == [(0, 10, me)]
        with pytest.raises(ValueError, match="share failed"):
            threads.parallel_for(kernel, 10, True)

        class Asleep:                        # a pool whose threads never wake
            def submit(self, fn, *args):
                pass

        monkeypatch.setattr(threads, "_executor", lambda workers: Asleep())
        calls.clear()
        threads.parallel_for(kernel, 10, False)
        assert sorted(calls) == [(0, 3, me), (3, 6, me), (6, 10, me)]
        with pytest.raises(ValueError, match="≥ 1"):
            threads.set_num_threads(0)
    finally:
        threads.set_num_threads(before)
