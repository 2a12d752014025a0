"""tinysd.rng against torch's own generators.

CPU: bit-exact equality with torch.randn / torch.rand for many seeds, sizes, dtypes and
successive draws, and with the exact calls diffusers makes. CUDA (Philox): the integer core
against an inverse derived from its definition, the launch layout against a loop written
from torch's kernel, distribution moments; equality with torch on a GPU where one exists.
"""
import math
from fractions import Fraction

import numpy as np
import pytest

from tinysd.rng import Generator, MT19937, _curand_normal4, _fma32, philox4x32_10

torch = pytest.importorskip("torch")

SEEDS = [0, 1, 42, 2**32 + 5, 2**63 + 12345, 2**64 - 1, -7]
SIZES = [1, 2, 7, 15, 16, 17, 31, 32, 100, 1001, (1, 4, 64, 64), (2, 4, 8, 12)]


def torch_gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def as_shape(size):
    return size if isinstance(size, tuple) else (size,)


@pytest.mark.parametrize("seed", SEEDS)
def test_uniform_stream_matches_torch_rand(seed):
    """The MT19937 words, as torch.rand turns them into float32 (24 bits) and float64 (53)."""
    ref32 = torch.rand(2000, generator=torch_gen(seed)).numpy()
    r = MT19937(seed % 2**64).random(2000)
    np.testing.assert_array_equal((r & 0xFFFFFF).astype(np.float32) * np.float32(2**-24), ref32)
    ref64 = torch.rand(700, generator=torch_gen(seed), dtype=torch.float64).numpy()
    r64 = MT19937(seed % 2**64).random64(700)
    np.testing.assert_array_equal((r64 & (2**53 - 1)).astype(np.float64) * 2.0**-53, ref64)


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_randn_float32_bit_exact(seed, size):
    ref = torch.randn(as_shape(size), generator=torch_gen(seed)).numpy()
    ours = Generator(seed).randn(size)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("size", [1, 3, 15, 16, 17, 100, (2, 4, 8, 12)], ids=str)
@pytest.mark.parametrize("seed", [0, 42, 2**32 + 5])
def test_randn_float64_bit_exact(seed, size):
    ref = torch.randn(as_shape(size), generator=torch_gen(seed), dtype=torch.float64).numpy()
    np.testing.assert_array_equal(Generator(seed).randn(size, dtype=np.float64), ref)


def test_many_seeds_latent_shape():
    for seed in range(0, 400, 13):
        ref = torch.randn((1, 4, 16, 16), generator=torch_gen(seed)).numpy()
        np.testing.assert_array_equal(Generator(seed).randn((1, 4, 16, 16)), ref)


def test_successive_draws_continue_the_stream():
    """Mixed sizes and dtypes from one generator, including the cached scalar normal that a
    draw of < 16 values leaves behind and a later small draw picks up."""
    draws = [(3, torch.float32), (16, torch.float32), (1, torch.float32), (17, torch.float64),
             (5, torch.float64), ((1, 4, 8, 8), torch.float32), (2, torch.float32),
             (15, torch.float32), (1, torch.float64), (1001, torch.float32), (7, torch.float32)]
    tg, g = torch_gen(1234), Generator(1234)
    for shape, dtype in draws:
        ref = torch.randn(as_shape(shape), generator=tg, dtype=dtype).numpy()
        np.testing.assert_array_equal(g.randn(shape, dtype=ref.dtype), ref, err_msg=str(shape))


def test_diffusers_latents_then_ancestral_noise():
    """The calls diffusers makes: prepare_latents' randn_tensor for the initial latents (one
    generator, and a list of generators, one per image), then per-step noise of an ancestral
    sampler from the same generator."""
    pytest.importorskip("diffusers")
    from diffusers.utils.torch_utils import randn_tensor

    shape = (2, 4, 12, 16)
    tg, g = torch_gen(31337), Generator(31337)
    ref = randn_tensor(shape, generator=tg, device=torch.device("cpu"), dtype=torch.float32)
    np.testing.assert_array_equal(g.randn(shape), ref.numpy())
    for _ in range(3):                                       # EulerAncestral's step noise
        ref = randn_tensor(shape, generator=tg, device=torch.device("cpu"), dtype=torch.float32)
        np.testing.assert_array_equal(g.randn(shape), ref.numpy())

    seeds = [5, 6]
    ref = randn_tensor(shape, generator=[torch_gen(s) for s in seeds],
                       device=torch.device("cpu"), dtype=torch.float32)
    ours = np.concatenate([Generator(s).randn((1,) + shape[1:]) for s in seeds])
    np.testing.assert_array_equal(ours, ref.numpy())


def test_manual_seed_resets_and_initial_seed():
    g = Generator(3)
    first = g.randn(20)
    g.randn(5)                                               # leaves a cached scalar normal
    assert g.manual_seed(3) is g
    np.testing.assert_array_equal(g.randn(20), first)
    for seed in (2**32 + 5, -1, 2**64 - 1):
        assert Generator(seed).initial_seed == torch_gen(seed).initial_seed()


@pytest.mark.parametrize("bad, error", [
    (dict(seed=1.5), TypeError), (dict(seed=True), TypeError), (dict(seed=2**64), ValueError),
    (dict(seed=-2**63 - 1), ValueError), (dict(device="tpu"), ValueError),
    (dict(device="cuda", sm_count=0), ValueError)])
def test_bad_generator_arguments(bad, error):
    with pytest.raises(error):
        Generator(**{"seed": 0, **bad})


def test_bad_randn_arguments():
    g = Generator(0)
    with pytest.raises(ValueError, match="float16"):
        g.randn(4, dtype=np.float16)
    with pytest.raises(ValueError, match="negative"):
        g.randn((2, -1))
    with pytest.raises(TypeError, match="tuple of ints"):
        g.randn((2, 1.5))
    assert g.randn((0, 3)).shape == (0, 3)


def exact_fma32(a, b, c):
    """a·b + c in exact rational arithmetic, then the nearest float32 (ties to even)."""
    v = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    f = np.float32(float(v))
    candidates = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    return min(candidates, key=lambda q: (abs(Fraction(float(q)) - v),
                                          int(np.float32(q).view(np.int32)) & 1))


def test_fma32_rounds_once():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(1500).astype(np.float32) for _ in range(3))
    # plus sums that land on a float32 halfway point in float64 while the exact sum is just
    # below it: (1 + 2^-23)(1 - 2^-23) + (2^24 + 2) = 2^24 + 3 - 2^-46
    one_up, one_down = np.float32(1 + 2**-23), np.float32(1 - 2**-23)
    a = np.append(a, [one_up, one_up, -one_up])
    b = np.append(b, [one_down, one_down, one_down])
    c = np.append(c, [np.float32(2**24 + 2), np.float32(2**25 + 4), np.float32(-(2**24 + 2))])
    expected = np.array([exact_fma32(*abc) for abc in zip(a, b, c)], np.float32)
    np.testing.assert_array_equal(_fma32(a, b, c), expected)
    assert _fma32(a[-3:-2], b[-3:-2], c[-3:-2])[0] == np.float32(2**24 + 2)


# ---------------------------------------------------------------------------------------------
# CUDA stream (Philox4x32-10)

M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox_decrypt(out, key):
    """Invert Philox4x32-10 with Python ints: run the rounds backwards. From one round
    (x,y,z,w) -> (hi(M1 z)^y^k0, lo(M1 z), hi(M0 x)^w^k1, lo(M0 x)): z = lo·M1^-1 mod 2^32,
    x likewise, then y and w from the xors."""
    keys = [((key[0] + r * W0) % 2**32, (key[1] + r * W1) % 2**32) for r in range(10)]
    inv0, inv1 = pow(M0, -1, 2**32), pow(M1, -1, 2**32)
    a, b, c, d = out
    for k0, k1 in reversed(keys):
        z = (b * inv1) % 2**32
        x = (d * inv0) % 2**32
        y = a ^ ((M1 * z) >> 32) ^ k0
        w = c ^ ((M0 * x) >> 32) ^ k1
        a, b, c, d = x, y, z, w
    return [a, b, c, d]


def test_philox_inverts_to_its_counter():
    rng = np.random.default_rng(1)
    ctr = rng.integers(0, 2**32, size=(4, 64), dtype=np.uint64).astype(np.uint32)
    ctr[:, 0] = 0
    ctr[:, 1] = 2**32 - 1
    for key in [(0, 0), (2**32 - 1, 2**32 - 1), (0x243F6A88, 0x85A308D3)]:
        out = philox4x32_10(ctr, key)
        assert out.dtype == np.uint32
        for i in range(ctr.shape[1]):
            assert philox_decrypt([int(v) for v in out[:, i]], key) == [int(v) for v in ctr[:, i]]
        assert len(set(map(tuple, out.T.tolist()))) == ctr.shape[1]


def cuda_normal4_by_loop(seed, offset, n, threads):
    """torch's grid-stride loop, written out: thread idx, turn k, component i -> element."""
    out = np.full(n, np.nan, np.float32)
    turns = (n - 1) // (threads * 4) + 1
    for idx in range(threads):
        for k in range(turns):
            low = offset // 4 + k
            ctr = np.array([[low % 2**32], [low >> 32], [idx], [0]], np.uint32)
            rand = _curand_normal4(philox4x32_10(ctr, (seed % 2**32, seed >> 32)))[:, 0]
            for i in range(4):
                li = idx + threads * 4 * k + threads * i
                if li < n:
                    out[li] = rand[i]
    return out


def test_cuda_layout_follows_the_grid_stride_loop():
    """A tiny 'GPU' (1 SM × 256 threads) so the draw wraps: 2000 values need 2 loop turns."""
    g = Generator(77, device="cuda", sm_count=1, threads_per_sm=256)
    first, second = g.randn(2000), g.randn(100)
    np.testing.assert_array_equal(first, cuda_normal4_by_loop(77, 0, 2000, 256))
    np.testing.assert_array_equal(second, cuda_normal4_by_loop(77, 8, 100, 256))


def test_cuda_stream_properties():
    g = Generator(0, device="cuda")
    a = g.randn((1, 4, 64, 64))
    np.testing.assert_array_equal(Generator(0, device="cuda").randn((1, 4, 64, 64)), a)
    assert not np.array_equal(g.randn((1, 4, 64, 64)), a)            # offset moved on
    # with enough threads, element i is thread i's first value: a prefix draws the same
    np.testing.assert_array_equal(Generator(0, device="cuda").randn(1000), a.ravel()[:1000])
    big = Generator(9, device="cuda").randn((2, 4, 96, 96))
    for x in (big.ravel(), Generator(9, device="cuda").randn(20000, dtype=np.float64)):
        n = x.size
        assert abs(x.mean()) < 5 / math.sqrt(n)
        assert abs(x.var() - 1) < 5 * math.sqrt(2 / n)
        assert abs((x**4).mean() - 3) < 5 * math.sqrt(96 / n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and torch with CUDA")
def test_cuda_matches_torch():
    """Untested where written: the GPU's __sincosf and logf are approximations, modelled by
    correctly rounded ones, so float32 is asserted to 1e-5 absolute, float64 to 1e-12."""
    props = torch.cuda.get_device_properties(0)
    kw = dict(device="cuda", sm_count=props.multi_processor_count,
              threads_per_sm=props.max_threads_per_multi_processor)
    for seed in (0, 42, 2**32 + 5):
        tg, g = torch.Generator("cuda").manual_seed(seed), Generator(seed, **kw)
        for shape, dtype in [((1, 4, 64, 64), torch.float32), ((2, 4, 96, 96), torch.float32),
                             (17, torch.float32), ((3, 1000), torch.float64)]:
            ref = torch.randn(shape, generator=tg, device="cuda", dtype=dtype).cpu().numpy()
            ours = g.randn(shape, dtype=ref.dtype)
            atol = 1e-5 if dtype == torch.float32 else 1e-12
            np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
