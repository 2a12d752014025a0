"""Torch-compatible random numbers: `seed=N` here draws the noise diffusers draws.

diffusers makes its initial latents (and the per-step noise of ancestral samplers) with
`torch.randn(shape, generator=torch.Generator(device).manual_seed(N))`. To draw the same
picture we must draw the same numbers, so this file re-does in NumPy what torch does:

    g = Generator(seed)                  # torch.Generator("cpu").manual_seed(seed)
    g.randn((1, 4, 64, 64))              # torch.randn(..., generator=g), float32
    g.randn((2, 4, 96, 96))              # ...continues the same stream, as torch does

CPU stream (device="cpu"):
1. MT19937 (Matsumoto & Nishimura 1998), torch's `at::mt19937`: 624 uint32 words seeded with
   `s[0] = seed mod 2^32, s[j] = 1812433253·(s[j-1] ^ (s[j-1] >> 30)) + j`, twisted 624 words
   at a time, each word tempered on the way out.
2. Uniforms: float32 `u = (r & (2^24 - 1)) · 2^-24` from one word; float64
   `u = (r64 & (2^53 - 1)) · 2^-53` from two words, `r64 = r1·2^32 + r2`.
3. Normals, Box–Muller `z0 = sqrt(-2 ln u1) cos(2π u2)`, `z1 = sqrt(-2 ln u1) sin(2π u2)`:
   - n ≥ 16 (torch's `normal_fill`): draw all n uniforms d first, then for every block of 16
     use `u1 = 1 - d[j]`, `u2 = d[j+8]` (j < 8) and write z0 to d[j], z1 to d[j+8]. When
     n % 16 != 0, 16 more uniforms are drawn and the last 16 outputs are recomputed from them.
     float32 runs torch's x86 SIMD kernel (`normal_fill_16_AVX2`, used by the AVX2 and AVX512
     builds alike), whose ln/sin/cos are the Cephes polynomials of avx_mathfun.h. We evaluate
     the same polynomials in float32 with GCC's fused multiply-adds, each FMA rounded once
     (`_fma32`). float64 uses libm's log/cos/sin, which Python's `math` calls too.
   - n < 16 (torch's scalar path, double precision): each pair takes two float64 uniforms,
     `r = sqrt(-2 log1p(-u2))`, `θ = 2π u1`; returns r·cos θ and caches r·sin θ for the next
     scalar draw (the cache survives large draws in between, as in torch).

   Measured here against torch 2.13 (x86-64, AVX512 and AVX2 kernels): bit-exact for float32
   and float64, all sizes, many seeds (tests/test_rng.py asserts equality). torch builds
   without the x86 SIMD kernel (ATEN_CPU_CAPABILITY=default, ARM) use libm's logf/cosf/sinf
   instead: measured, 39% of their float32 values differ from these, by at most 2e-6.

CUDA stream (device="cuda"):
torch's CUDA `randn` runs curand's Philox4x32-10 (Salmon et al. 2011) in a grid-stride
kernel: thread `idx` of `T = 256·grid` threads calls `curand_init(seed, idx, offset)` and
then `curand_normal4` once per loop turn k; element `idx + 4Tk + Ti` gets component i
(float64: `curand_normal2_double`, element `idx + 2Tk + Ti`). The
grid is `min(ceil(n/256), SMs·(threads per SM / 256))` blocks, so the stream depends on the
GPU (default here: H100/H200, 132 SMs × 2048 threads), and each call advances the
generator's offset by `4·(number of loop turns)`.
UNTESTED AGAINST A GPU: no CUDA device was available when this was written. The Philox core
is exact integer arithmetic; the float transform uses `__sincosf` (a hardware approximation)
and CUDA's `logf`, which we model with correctly rounded sin/cos/log, so expect agreement to
~1e-6 absolute (the test allows 1e-5), not bit-exactness, until `test_cuda_matches_torch`
has run on a GPU.
"""
from __future__ import annotations

import math
import operator

import numpy as np

f32, f64, u32, u64 = np.float32, np.float64, np.uint32, np.uint64

# MT19937, as torch's at::mt19937 (aten/src/ATen/core/MT19937RNGEngine.h)

MT_N, MT_M = 624, 397
MATRIX_A = u32(0x9908B0DF)
UPPER_MASK, LOWER_MASK = u32(0x80000000), u32(0x7FFFFFFF)


def _mt_seed_state(seed: int) -> np.ndarray:
    """The 624-word state from the low 32 bits of the seed (Knuth's multiplier 1812433253)."""
    state = np.empty(MT_N, dtype=u32)
    x = seed & 0xFFFFFFFF
    state[0] = x
    for j in range(1, MT_N):
        x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
        state[j] = x
    return state


def _mt_twist(s: np.ndarray) -> None:
    """One MT19937 state update, in place, vectorised.

    s[i] = s[i+M] ^ twist(s[i], s[i+1]), indices mod N, computed in order i = 0..623. Word i
    reads s[i+M], which for i ≥ N-M was already rewritten this round; cutting at 227, 454
    and 623 gives chunks that only read old words or words of earlier chunks.
    """
    def twist(u, v):        # (upper bit of u | lower 31 bits of v) >> 1, then ^A if v is odd
        y = (u & UPPER_MASK) | (v & LOWER_MASK)
        return (y >> u32(1)) ^ np.where(v & u32(1), MATRIX_A, u32(0))

    k = MT_N - MT_M                                          # 227
    s[0:k] = s[MT_M:MT_N] ^ twist(s[0:k], s[1:k + 1])
    s[k:2 * k] = s[0:k] ^ twist(s[k:2 * k], s[k + 1:2 * k + 1])
    s[2 * k:MT_N - 1] = s[k:MT_M - 1] ^ twist(s[2 * k:MT_N - 1], s[2 * k + 1:MT_N])
    s[MT_N - 1] = s[MT_M - 1] ^ twist(s[MT_N - 1:], s[:1])[0]


def _mt_temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> u32(11))
    y = y ^ ((y << u32(7)) & u32(0x9D2C5680))
    y = y ^ ((y << u32(15)) & u32(0xEFC60000))
    return y ^ (y >> u32(18))


class MT19937:
    """torch's CPU engine: `random(n)` returns the next n uint32 outputs of the stream."""

    def __init__(self, seed: int):
        self.state = _mt_seed_state(seed)
        self.next = MT_N                   # words of the current state already handed out

    def random(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=u32)
        filled = 0
        while filled < n:
            if self.next == MT_N:
                _mt_twist(self.state)
                self.next = 0
            take = min(n - filled, MT_N - self.next)
            out[filled:filled + take] = self.state[self.next:self.next + take]
            filled += take
            self.next += take
        return _mt_temper(out)

    def random64(self, n: int) -> np.ndarray:
        """n uint64 values, each (first word << 32) | second word, as torch's random64()."""
        r = self.random(2 * n).astype(u64)
        return (r[0::2] << u64(32)) | r[1::2]


def _uniform_f32(r: np.ndarray) -> np.ndarray:
    """uint32 -> float32 in [0, 1): the low 24 bits times 2^-24 (exact)."""
    return (r & u32(0xFFFFFF)).astype(f32) * f32(2.0 ** -24)


def _uniform_f64(r64: np.ndarray) -> np.ndarray:
    """uint64 -> float64 in [0, 1): the low 53 bits times 2^-53 (exact)."""
    return (r64 & u64((1 << 53) - 1)).astype(f64) * (2.0 ** -53)


# torch's float32 SIMD Box–Muller (normal_fill_16_AVX2 with avx_mathfun.h's log256_ps and
# sincos256_ps). GCC compiles it with -mfma and contracts a*b+c into one FMA; the comments
# name the contraction each `_fma32` reproduces.

def _fma32(a, b, c) -> np.ndarray:
    """a·b + c on float32 operands, rounded once to float32, as the vfmadd instruction.

    a·b is exact in float64 (24 + 24 ≤ 53 bits), so s = a·b + c in float64 is the exact sum
    rounded once. Rounding s again to float32 gives the right answer unless s landed exactly
    halfway between two float32 (low 29 mantissa bits = 1000...0) while the exact sum did
    not: there the TwoSum residual says which way the exact sum lies, and we step s one
    double ulp that way before the final rounding.
    """
    p = np.asarray(a, f64) * np.asarray(b, f64)
    c = np.asarray(c, f64)
    s = p + c
    tie = (s.view(np.int64) & 0x1FFFFFFF) == 0x10000000
    if tie.any():
        p, c = np.broadcast_to(p, s.shape)[tie], np.broadcast_to(c, s.shape)[tie]
        st = s[tie]
        t = st - p
        err = (p - (st - t)) + (c - t)                       # exact: p + c = st + err
        s[tie] = np.where(err == 0, st, np.nextafter(st, np.copysign(np.inf, err)))
    return s.astype(f32)


LOG_POLY = [7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
            1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
            3.3333331174e-1]
LN2_HI, LN2_LO = f32(0.693359375), f32(-2.12194440e-4)      # ln 2 = LN2_HI + LN2_LO


def _log_cephes(x: np.ndarray) -> np.ndarray:
    """ln x for normal float32 x > 0 (Box–Muller's u1 ∈ [2^-24, 1]), as log256_ps.

    x = m·2^e with m ∈ [√½, √2); ln x = e·ln 2 + ln m, ln(1+f) ≈ f - f²/2 + f³·P(f).
    """
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(f32) + f32(1)
    m = ((bits & ~0x7F800000) | 0x3F000000).view(f32)       # mantissa in [0.5, 1)
    small = m < f32(0.707106781186547524)
    f = m - f32(1) + np.where(small, m, f32(0))              # m < √½: use 2m - 1, e - 1
    e = e - np.where(small, f32(1), f32(0))
    z = f * f
    y = np.full_like(f, LOG_POLY[0])
    for coef in LOG_POLY[1:]:
        y = _fma32(y, f, f32(coef))                          # y·f + coef
    y = y * f
    y = _fma32(y, z, e * LN2_LO)                             # f³·P(f) + e·ln2_lo
    y = _fma32(-z, f32(0.5), y)                              # - f²/2
    return _fma32(e, LN2_HI, f + y)                          # + f + e·ln2_hi


SIN_POLY = [-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1]
COS_POLY = [2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2]
PIO4_PARTS = [-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8]  # -π/4, 3 parts


def _sincos_cephes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin x, cos x) for float32 x ∈ [0, 2π), as sincos256_ps.

    j = the even integer nearest x·4/π; r = x - j·π/4 ∈ [-π/4, π/4] (π/4 in three parts, so
    the reduction stays exact); sin and cos of r from short polynomials; j mod 8 picks which
    polynomial gives sin x, which gives cos x, and their signs.
    """
    j = (x * f32(1.27323954473516)).astype(np.int32)        # truncate x·4/π
    j = (j + 1) & ~1
    y = j.astype(f32)
    r = x
    for part in PIO4_PARTS:
        r = _fma32(y, f32(part), r)                          # r - j·(π/4)_part
    z = r * r
    c = _fma32(f32(COS_POLY[0]), z, f32(COS_POLY[1]))
    c = _fma32(c, z, f32(COS_POLY[2]))
    c = _fma32(c * z, z, -(z * f32(0.5)))                    # z²·Q(z) - z/2
    c = c + f32(1)
    s = _fma32(f32(SIN_POLY[0]), z, f32(SIN_POLY[1]))
    s = _fma32(s, z, f32(SIN_POLY[2]))
    s = _fma32(s * z, r, r)                                  # r + r³·P(z)
    use_sin_poly = (j & 2) == 0
    sin_x = np.where(use_sin_poly, s, c)
    cos_x = np.where(use_sin_poly, c, s)
    sin_x = np.where((j & 4) != 0, -sin_x, sin_x)
    cos_x = np.where(((j - 2) & 4) == 0, -cos_x, cos_x)
    return sin_x, cos_x


def _box_muller_16_f32(d: np.ndarray) -> np.ndarray:
    """Blocks (B, 16) of float32 uniforms -> (B, 16) normals, as normal_fill_16_AVX2."""
    u1 = f32(1) - d[:, :8]                                   # [0, 1) -> (0, 1] for the log
    u2 = d[:, 8:]
    radius = np.sqrt(f32(-2) * _log_cephes(u1))
    theta = f32(2 * math.pi) * u2
    sin_t, cos_t = _sincos_cephes(theta)
    return np.concatenate([radius * cos_t, radius * sin_t], axis=1)


def _box_muller_16_f64(d: np.ndarray) -> np.ndarray:
    """Blocks (B, 16) of float64 uniforms -> normals, as normal_fill_16<double> (libm)."""
    u1 = (1.0 - d[:, :8]).ravel()
    theta = (2.0 * math.pi) * d[:, 8:].ravel()
    # NumPy's own SIMD log differs from libm in the last bit; Python's math module is libm.
    radius = np.sqrt(-2.0 * np.fromiter(map(math.log, u1), f64, u1.size))
    cos_t = np.fromiter(map(math.cos, theta), f64, theta.size)
    sin_t = np.fromiter(map(math.sin, theta), f64, theta.size)
    B = d.shape[0]
    return np.concatenate([(radius * cos_t).reshape(B, 8), (radius * sin_t).reshape(B, 8)], 1)


# Philox4x32-10 and curand's normals (curand_philox4x32_x.h, curand_normal.h)

PHILOX_M0, PHILOX_M1 = u64(0xD2511F53), u64(0xCD9E8D57)    # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85               # key bumps (golden ratio, √3 - 1)
CURAND_2POW32_INV = f32(2.3283064e-10)                       # 2^-32
CURAND_2POW32_INV_2PI = f32(CURAND_2POW32_INV * f32(6.2831855))


def philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on counters ctr (4, n) uint32 with key (k0, k1) -> (4, n) uint32.

    One round: (x, y, z, w) -> (hi(M1·z) ^ y ^ k0, lo(M1·z), hi(M0·x) ^ w ^ k1, lo(M0·x)),
    hi/lo the upper/lower 32 bits of the 64-bit product; the key is bumped by (W0, W1)
    between rounds.
    """
    x, y, z, w = (c.astype(u64) for c in ctr)
    k0, k1 = key
    mask = u64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = PHILOX_M0 * x, PHILOX_M1 * z
        x, y, z, w = ((p1 >> u64(32)) ^ y ^ u64(k0), p1 & mask,
                      (p0 >> u64(32)) ^ w ^ u64(k1), p0 & mask)
        k0, k1 = (k0 + PHILOX_W0) & 0xFFFFFFFF, (k1 + PHILOX_W1) & 0xFFFFFFFF
    return np.stack([x, y, z, w]).astype(u32)


def _curand_normal4(r: np.ndarray) -> np.ndarray:
    """curand_normal4: (4, n) uint32 -> (4, n) float32, Box–Muller on (x, y) and (z, w).

    u = x·2^-32 + 2^-33 ∈ (0, 1], v = y·2π·2^-32 + π·2^-32 (nvcc fuses it into one FMA);
    (s·sin v, s·cos v) with s = sqrt(-2 ln u). The GPU's __sincosf and logf are modelled by
    correctly rounded float32 sin/cos/log: agreement to ~1e-6, not to the bit.
    """
    out = np.empty(r.shape, f32)
    for a, b in ((0, 1), (2, 3)):
        u = _fma32(r[a].astype(f32), CURAND_2POW32_INV, CURAND_2POW32_INV / f32(2))
        v = _fma32(r[b].astype(f32), CURAND_2POW32_INV_2PI, CURAND_2POW32_INV_2PI / f32(2))
        s = np.sqrt(f32(-2) * np.log(u.astype(f64)).astype(f32))
        out[a] = np.sin(v.astype(f64)).astype(f32) * s
        out[b] = np.cos(v.astype(f64)).astype(f32) * s
    return out


def _sincospi(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin πv, cos πv) for float64 v, reducing v exactly by halves before multiplying by π."""
    q = np.rint(2 * v)                                       # v = q/2 + t, |t| ≤ 1/4 exactly
    t = (v - q / 2) * math.pi
    s, c = np.sin(t), np.cos(t)
    quadrant = q.astype(np.int64) & 3
    sin_v = np.choose(quadrant, [s, c, -s, -c])
    cos_v = np.choose(quadrant, [c, -s, -c, s])
    return sin_v, cos_v


def _curand_normal2_double(r: np.ndarray) -> np.ndarray:
    """curand_normal2_double: (4, n) uint32 -> (2, n) float64 (53-bit u, v; sincospi)."""
    x0, x1, y0, y1 = (c.astype(u64) for c in r)
    zx, zy = x0 ^ (x1 << u64(21)), y0 ^ (y1 << u64(21))
    u = zx.astype(f64) * 2.0 ** -53 + 2.0 ** -54
    v = zy.astype(f64) * 2.0 ** -52 + 2.0 ** -53
    s = np.sqrt(-2.0 * np.log(u))
    sin_v, cos_v = _sincospi(v)
    return np.stack([s * sin_v, s * cos_v])


def _cuda_launch(n: int, unroll: int, sm_count: int, threads_per_sm: int) -> tuple[int, int]:
    """torch's calc_execution_policy: (threads in the grid T, loop turns per thread)."""
    block = 256
    grid = min(-(-n // block), sm_count * (threads_per_sm // block))
    threads = block * grid
    return threads, (n - 1) // (threads * unroll) + 1


def _cuda_randn(seed: int, offset: int, n: int, dtype, sm_count: int, threads_per_sm: int):
    """n normals of torch's CUDA randn; returns (values, philox offset increment)."""
    unroll = 4 if dtype == f32 else 2                        # float4 or double2 per call
    threads, turns = _cuda_launch(n, unroll, sm_count, threads_per_sm)
    idx = np.arange(threads, dtype=np.uint64)
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    per_turn = []
    for k in range(turns):
        # curand_init(seed, subsequence=idx, offset) puts idx in the high 64 counter bits and
        # offset/4 in the low 64; each curand4 call then adds 1 to the 128-bit counter.
        low = offset // 4 + k
        ctr = np.stack([np.full(threads, low & 0xFFFFFFFF, u32),
                        np.full(threads, (low >> 32) & 0xFFFFFFFF, u32),
                        (idx + u64(low >> 64)).astype(u32),
                        (idx >> u64(32)).astype(u32)])
        bits = philox4x32_10(ctr, key)
        per_turn.append(_curand_normal4(bits) if dtype == f32 else _curand_normal2_double(bits))
    # element idx + unroll·T·k + T·i comes from thread idx, turn k, component i
    values = np.stack(per_turn).reshape(-1)[:n]
    return values.astype(dtype), turns * 4



def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed = int(seed)
    if not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed {seed} is outside torch's range [-2**63, 2**64)")
    return seed % 2 ** 64                                    # negative seeds wrap, as in torch


def _check_shape(shape) -> tuple[int, ...]:
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"shape {shape} has a negative size")
    return shape


class Generator:
    """A seeded stream of torch-identical normals; see the module docstring.

    device="cpu": torch.Generator("cpu") (MT19937). device="cuda": torch.Generator("cuda")
    (Philox4x32-10) on a GPU with `sm_count` multiprocessors of `threads_per_sm` threads
    (H100/H200 by default; both only matter for draws larger than the GPU's thread count).
    """

    def __init__(self, seed: int = 0, device: str = "cpu", *, sm_count: int = 132,
                 threads_per_sm: int = 2048):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if sm_count < 1 or threads_per_sm < 256:
            raise ValueError(f"need sm_count ≥ 1 and threads_per_sm ≥ 256, "
                             f"got {sm_count} and {threads_per_sm}")
        self.device = device
        self.sm_count, self.threads_per_sm = sm_count, threads_per_sm
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "Generator":
        """Restart the stream from `seed`, as torch's Generator.manual_seed; returns self."""
        self._seed = _check_seed(seed)
        if self.device == "cpu":
            self._mt = MT19937(self._seed)
            self._next_normal = None             # torch's cached second scalar normal
        else:
            self._philox_offset = 0
        return self

    @property
    def initial_seed(self) -> int:
        return self._seed

    def randn(self, shape, dtype=np.float32) -> np.ndarray:
        """Standard normals of `shape`, the next ones torch.randn would draw from this stream."""
        shape = _check_shape(shape)
        dtype = np.dtype(dtype).type
        if dtype not in (f32, f64):
            raise ValueError(f"dtype must be float32 or float64, got {np.dtype(dtype).name}")
        n = math.prod(shape)
        if n == 0:
            return np.zeros(shape, dtype)
        if self.device == "cuda":
            if n >= 2 ** 31:
                raise ValueError(f"{n} values: torch splits draws of ≥ 2**31 values, not modelled")
            values, used = _cuda_randn(self._seed, self._philox_offset, n, dtype,
                                       self.sm_count, self.threads_per_sm)
            self._philox_offset += used
        elif n >= 16:
            values = self._normal_fill(n, dtype)
        else:
            values = np.array([self._normal_scalar() for _ in range(n)]).astype(dtype)
        return values.reshape(shape)

    def _normal_fill(self, n: int, dtype) -> np.ndarray:
        """torch's normal_fill: n uniforms, Box–Muller in blocks of 16, last block redrawn."""
        if dtype == f32:
            uniform, box_muller = _uniform_f32(self._mt.random(n)), _box_muller_16_f32
        else:
            uniform, box_muller = _uniform_f64(self._mt.random64(n)), _box_muller_16_f64
        full = n // 16 * 16
        out = np.empty(n, dtype)
        out[:full] = box_muller(uniform[:full].reshape(-1, 16)).ravel()
        if n % 16:
            tail = self._mt.random(16) if dtype == f32 else self._mt.random64(16)
            tail = _uniform_f32(tail) if dtype == f32 else _uniform_f64(tail)
            out[n - 16:] = box_muller(tail.reshape(1, 16)).ravel()
        return out

    def _normal_scalar(self) -> float:
        """torch's at::normal_distribution<double>: one normal, caching the pair's other half."""
        if self._next_normal is not None:
            z, self._next_normal = self._next_normal, None
            return z
        u1, u2 = _uniform_f64(self._mt.random64(2))
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = r * math.sin(theta)
        return r * math.cos(theta)
