"""Every op's backward (`NumpyBackend.<op>_backward`) against torch.autograd.

Each case runs the op forward in torch with `requires_grad`, takes `torch.autograd.grad` of
the output against a random output gradient, and compares the gradients of every array
argument with ours: in float64 tightly (the NumPy twins keep float64), in float32 within 1e-4
of each gradient's scale, on the numpy backend and on the cpu backend (weights re-laid out by
its `asarray`, its own backward kernels where it has them). Central finite differences of
L = Σ grad · op(inputs) on a few entries are a second witness, independent of torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from tinysd.backend import NumpyBackend

torch = pytest.importorskip("torch")
F = torch.nn.functional

BACKENDS = {"numpy": NumpyBackend}
try:
    from tinysd.kernels.cpu import CpuBackend
    BACKENDS["cpu"] = CpuBackend
except ImportError:       # numba missing: the cpu backend is tested where it runs
    pass


@dataclass
class Case:
    """One op on fixed inputs. `forward(be, **inputs)` and `backward(be, grad, **inputs)` call
    the backend; `reference(**tensors)` is the same op in torch. `wrt` names the inputs that
    get gradients, in the order `backward` returns them; `params` those that are weights (the
    cpu backend receives them through its `asarray`); `options` are passed to all three."""
    name: str
    inputs: dict
    forward: object
    backward: object
    reference: object
    wrt: tuple
    params: tuple = ()
    options: dict = field(default_factory=dict)

    def __repr__(self):
        return self.name


def randn(rng, *shape, scale=1.0, offset=0.0):
    return rng.standard_normal(shape) * scale + offset


def as_tuple(grads):
    return grads if isinstance(grads, (tuple, list)) else (grads,)


def torch_conv2d(x, weight, bias=None, stride=1, padding=0):
    pt, pb, pl, pr = (padding,) * 4 if np.isscalar(padding) else padding
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, stride=stride)


def torch_attention(q, k, v, heads, causal=False):
    B, Nq, C = q.shape
    split = [a.reshape(B, a.shape[1], heads, C // heads).transpose(1, 2) for a in (q, k, v)]
    return F.scaled_dot_product_attention(*split, is_causal=causal).transpose(1, 2).reshape(B, Nq, C)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def geglu(x):
    h, gate = x.chunk(2, dim=-1)
    return h * F.gelu(gate)


def linear_case(name, rng, lead, n_in, n_out, bias=True):
    inputs = {"x": randn(rng, *lead, n_in), "weight": randn(rng, n_out, n_in, scale=0.3)}
    if bias:
        inputs["bias"] = randn(rng, n_out)
    return Case(name, inputs,
                lambda be, **a: be.linear(**a),
                lambda be, g, **a: be.linear_backward(g, **a),
                lambda **a: F.linear(**{"input": a.pop("x"), **a}),
                tuple(inputs), params=("weight", "bias"))


def conv_case(name, rng, B, Cin, Cout, H, W, k, stride, padding, bias=True):
    inputs = {"x": randn(rng, B, Cin, H, W), "weight": randn(rng, Cout, Cin, k, k, scale=0.3)}
    if bias:
        inputs["bias"] = randn(rng, Cout)
    return Case(name, inputs,
                lambda be, stride, padding, **a: be.conv2d(**a, stride=stride, padding=padding),
                lambda be, g, stride, padding, **a: be.conv2d_backward(g, **a, stride=stride, padding=padding),
                torch_conv2d, tuple(inputs), params=("weight", "bias"),
                options={"stride": stride, "padding": padding})


def group_norm_case(name, rng, shape, groups, silu):
    C = shape[1]
    inputs = {"x": randn(rng, *shape, scale=3.0, offset=2.0),      # a mean offset, as in VAEs
              "weight": randn(rng, C, scale=0.3, offset=1.0), "bias": randn(rng, C)}

    def reference(x, weight, bias, num_groups, silu):
        y = F.group_norm(x, num_groups, weight, bias, eps=1e-5)
        return F.silu(y) if silu else y
    return Case(name, inputs,
                lambda be, num_groups, silu, **a: be.group_norm(a["x"], num_groups, a["weight"], a["bias"], 1e-5, silu=silu),
                lambda be, g, num_groups, silu, **a: be.group_norm_backward(
                    g, a["x"], num_groups, a["weight"], a["bias"], 1e-5, silu=silu),
                reference, ("x", "weight", "bias"), params=("weight", "bias"),
                options={"num_groups": groups, "silu": silu})


def activation_case(name, rng, op, reference):
    x = randn(rng, 3, 67, scale=4.0)
    x[0, :6] = [0.0, -30.0, 30.0, -1e-3, 1e-3, 12.0]                  # saturation, tiny values
    return Case(name, {"x": x}, lambda be, x: getattr(be, op)(x),
                lambda be, g, x: getattr(be, op + "_backward")(g, x), reference, ("x",))


def attention_case(name, rng, B, Nq, Nk, heads, d, causal, pass_out=False):
    C = heads * d
    inputs = {"q": randn(rng, B, Nq, C, scale=1.5), "k": randn(rng, B, Nk, C, scale=1.5), "v": randn(rng, B, Nk, C)}

    def backward(be, g, q, k, v, heads, causal):
        out = be.attention(q, k, v, heads, causal=causal) if pass_out else None
        return be.attention_backward(g, q, k, v, heads, causal=causal, out=out)
    return Case(name, inputs,
                lambda be, q, k, v, heads, causal: be.attention(q, k, v, heads, causal=causal),
                backward, torch_attention, ("q", "k", "v"), options={"heads": heads, "causal": causal})


def cases():
    rng = np.random.default_rng(18)
    yield linear_case("linear", rng, (2, 5), 7, 6)
    yield linear_case("linear_no_bias", rng, (9,), 8, 3, bias=False)
    yield linear_case("linear_3d_lead", rng, (2, 3, 4), 5, 6)
    yield conv_case("conv3x3", rng, 2, 3, 5, 9, 11, 3, 1, 1)
    yield conv_case("conv3x3_stride2_sd_downsampler", rng, 2, 4, 4, 8, 8, 3, 2, (0, 1, 0, 1))
    yield conv_case("conv3x3_stride2_odd_asymmetric", rng, 1, 3, 6, 9, 7, 3, 2, (0, 1, 0, 1))
    yield conv_case("conv3x3_stride2_pad1", rng, 2, 5, 3, 13, 10, 3, 2, 1)
    yield conv_case("conv3x3_stride2_unreached_row", rng, 1, 2, 3, 8, 6, 3, 2, 0)
    yield conv_case("conv1x1", rng, 2, 4, 6, 7, 9, 1, 1, 0)
    yield conv_case("conv5x5_no_bias", rng, 1, 3, 3, 6, 5, 5, 1, 2, bias=False)
    yield conv_case("conv2x2_stride3_asym", rng, 3, 4, 4, 7, 8, 2, 3, (1, 0, 2, 1))
    for silu in (False, True):
        yield group_norm_case(f"group_norm{'_silu' * silu}", rng, (2, 12, 5, 7), 4, silu)
    yield group_norm_case("group_norm_3d_one_channel_groups", rng, (1, 6, 33), 6, True)
    x = randn(rng, 2, 7, 12, scale=2.0, offset=1.0)
    yield Case("layer_norm", {"x": x, "weight": randn(rng, 12, scale=0.3, offset=1.0), "bias": randn(rng, 12)},
               lambda be, **a: be.layer_norm(a["x"], a["weight"], a["bias"], 1e-5),
               lambda be, g, **a: be.layer_norm_backward(g, a["x"], a["weight"], a["bias"], 1e-5),
               lambda x, weight, bias: F.layer_norm(x, (12,), weight, bias, eps=1e-5),
               ("x", "weight", "bias"), params=("weight", "bias"))
    yield activation_case("silu", rng, "silu", lambda x: F.silu(x))
    yield activation_case("gelu", rng, "gelu", lambda x: F.gelu(x))
    yield activation_case("quick_gelu", rng, "quick_gelu", quick_gelu)
    yield Case("geglu", {"x": randn(rng, 2, 9, 14, scale=2.0)}, lambda be, x: be.geglu(x),
               lambda be, g, x: be.geglu_backward(g, x), geglu, ("x",))
    for with_proj in (False, True):
        def backward(be, g, x, weight, bias, with_proj=with_proj):
            proj = be.linear(x, weight, bias) if with_proj else None
            return be.linear_geglu_backward(g, x, weight, bias, proj=proj)
        yield Case(f"linear_geglu{'_saved_proj' * with_proj}",
                   {"x": randn(rng, 2, 9, 8), "weight": randn(rng, 14, 8, scale=0.4), "bias": randn(rng, 14)},
                   lambda be, x, weight, bias: be.linear_geglu(x, weight, bias), backward,
                   lambda x, weight, bias: geglu(F.linear(x, weight, bias)),
                   ("x", "weight", "bias"), params=("weight", "bias"))
    yield attention_case("attention_self", rng, 2, 16, 16, 4, 4, False)
    yield attention_case("attention_cross", rng, 2, 13, 7, 2, 5, False)           # Nk ≠ Nq
    yield attention_case("attention_causal", rng, 1, 11, 11, 3, 4, True)          # CLIP
    yield attention_case("attention_causal_saved_out", rng, 2, 9, 9, 2, 3, True, pass_out=True)
    yield attention_case("attention_cross_saved_out", rng, 3, 5, 12, 1, 6, False, pass_out=True)
    yield Case("upsample_nearest2x", {"x": randn(rng, 2, 3, 5, 7)}, lambda be, x: be.upsample_nearest2x(x),
               lambda be, g, x: be.upsample_nearest2x_backward(g, x),
               lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), ("x",))
    yield Case("concat", {"a": randn(rng, 2, 3, 4, 5), "b": randn(rng, 2, 5, 4, 5), "c": randn(rng, 2, 1, 4, 5)},
               lambda be, a, b, c: be.concat([a, b, c], axis=1),
               lambda be, g, a, b, c: be.concat_backward(g, [a, b, c], axis=1),
               lambda a, b, c: torch.cat([a, b, c], dim=1), ("a", "b", "c"))
    yield Case("to_tokens", {"x": randn(rng, 2, 6, 3, 5)}, lambda be, x: be.to_tokens(x),
               lambda be, g, x: be.to_tokens_backward(g, x), lambda x: x.flatten(2).transpose(1, 2), ("x",))
    yield Case("to_image", {"x": randn(rng, 2, 15, 6)}, lambda be, x: be.to_image(x, 3, 5),
               lambda be, g, x: be.to_image_backward(g, x, 3, 5),
               lambda x: x.transpose(1, 2).reshape(2, 6, 3, 5), ("x",))
    ids = np.array([[0, 3, 3, 7, 10, 3], [10, 1, 0, 0, 5, 2]])               # repeats: scatter-add
    yield Case("take", {"table": randn(rng, 11, 6)}, lambda be, table: be.take(table, ids),
               lambda be, g, table: be.take_backward(g, table, ids),
               lambda table: F.embedding(torch.from_numpy(ids), table), ("table",), params=("table",))


CASES = list(cases())


def run_ours(be, case, dtype, grad):
    inputs = {k: v.astype(dtype) for k, v in case.inputs.items()}
    if dtype == np.float32:                            # weights as a backend stores them
        inputs = {k: be.asarray(v) if k in case.params else v for k, v in inputs.items()}
    y = be.numpy(case.forward(be, **inputs, **case.options))
    grads = as_tuple(case.backward(be, grad.astype(dtype), **inputs, **case.options))
    assert all(g is None for g in grads[len(case.wrt):]), "a gradient for an absent bias"
    grads = grads[:len(case.wrt)]
    assert len(grads) == len(case.wrt)
    return y, [be.numpy(g) for g in grads]


def run_torch(case, dtype, grad):
    tensors = {k: torch.tensor(v, dtype=dtype, requires_grad=k in case.wrt) for k, v in case.inputs.items()}
    y = case.reference(**tensors, **case.options)
    grads = torch.autograd.grad(y, [tensors[k] for k in case.wrt], torch.tensor(grad, dtype=dtype))
    return y.detach().numpy(), [g.numpy() for g in grads]


def output_grad(case):
    """A random ∂L/∂y of the op's output shape (from torch's forward, so it needs no backend)."""
    tensors = {k: torch.tensor(v) for k, v in case.inputs.items()}
    shape = case.reference(**tensors, **case.options).shape
    return np.random.default_rng(len(case.name)).standard_normal(tuple(shape))


def assert_close(actual, expected, rtol, name):
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    scale = max(float(np.abs(expected).max()), 1e-300)
    assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol:g} × scale {scale:.3g}"


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_float64_matches_torch(case):
    """The NumPy twins in float64 against torch.autograd in float64, to ~1e-12."""
    grad = output_grad(case)
    y, grads = run_ours(NumpyBackend(), case, np.float64, grad)
    y_ref, grads_ref = run_torch(case, torch.float64, grad)
    assert y.dtype == np.float64
    assert_close(y, y_ref, 1e-12, "output")
    for name, g, g_ref in zip(case.wrt, grads, grads_ref):
        assert g.dtype == np.float64, f"d{name} is {g.dtype}"
        assert_close(g, g_ref, 1e-11, f"d{name}")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_float32_matches_torch(case, backend):
    """float32 on each backend against torch.autograd in float32, within 1e-4 of the scale."""
    grad = output_grad(case)
    y, grads = run_ours(BACKENDS[backend](), case, np.float32, grad)
    y_ref, grads_ref = run_torch(case, torch.float32, grad)
    assert_close(y, y_ref, 1e-5, "output")
    for name, g, g_ref in zip(case.wrt, grads, grads_ref):
        assert g.dtype == np.float32, f"d{name} is {g.dtype}"
        assert_close(g, g_ref, 1e-4, f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_finite_differences(case):
    """(L(x + h·e) − L(x − h·e)) / 2h for a few entries e of every input, L = Σ grad · op(x),
    in float64 on the numpy backend: the backward agrees with its own forward."""
    be = NumpyBackend()
    grad = output_grad(case)
    _, grads = run_ours(be, case, np.float64, grad)
    rng = np.random.default_rng(7)
    h = 1e-6

    def loss(inputs):
        return float((case.forward(be, **inputs, **case.options) * grad).sum())
    for name, g in zip(case.wrt, grads):
        for index in zip(*(rng.integers(0, n, 4) for n in case.inputs[name].shape)):
            plus = {k: v.copy() for k, v in case.inputs.items()}
            minus = {k: v.copy() for k, v in case.inputs.items()}
            plus[name][index] += h
            minus[name][index] -= h
            numeric = (loss(plus) - loss(minus)) / (2 * h)
            assert abs(numeric - g[index]) <= 1e-6 * max(1.0, float(np.abs(g).max())), \
                f"d{name}{index}: finite difference {numeric:.10g}, backward {g[index]:.10g}"


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_frozen_skips_parameter_gradients(backend):
    """`frozen=True`: the same input gradient, None for the parameters."""
    be = BACKENDS[backend]()
    rng = np.random.default_rng(1)
    x, w, b = (randn(rng, *shape).astype(np.float32) for shape in ((2, 3, 6, 5), (4, 3, 3, 3), (4,)))
    g = randn(rng, 2, 4, 3, 3).astype(np.float32)
    dx, dw, db = be.conv2d_backward(g, x, w, b, 2, 1)
    assert be.conv2d_backward(g, x, w, b, 2, 1, frozen=True)[1:] == (None, None)
    assert np.array_equal(be.conv2d_backward(g, x, w, b, 2, 1, frozen=True)[0], dx)
    xl, wl, gl = randn(rng, 5, 6), randn(rng, 3, 6), randn(rng, 5, 3)
    assert be.linear_backward(gl, xl, wl, None, frozen=True)[1:] == (None, None)
    gamma, beta = randn(rng, 4).astype(np.float32), randn(rng, 4).astype(np.float32)
    xn = 2 * g[::-1] + 1                                                # any input of the shape
    dx = be.group_norm_backward(g, xn, 2, gamma, beta, 1e-5)[0]
    frozen = be.group_norm_backward(g, xn, 2, gamma, beta, 1e-5, frozen=True)
    assert frozen[1:] == (None, None) and np.array_equal(frozen[0], dx)
    assert be.layer_norm_backward(gl, gl, wl[0, :3], wl[1, :3], 1e-5, frozen=True)[1:] == (None, None)
    assert be.take_backward(gl, wl, [0, 1, 2, 1, 0], frozen=True) is None


needs_cpu = pytest.mark.skipif("cpu" not in BACKENDS, reason="numba missing")


def close32(actual, expected, rtol=1e-4, name="gradient"):
    assert actual.dtype == np.float32, f"{name} is {actual.dtype}"
    assert_close(actual, expected, rtol, name)


def cpu_backend(**settings):
    be = CpuBackend()
    for name, value in settings.items():
        setattr(be, name, value)
    return be


CONV_PATHS = {   # how the cpu backend's conv backward can run: chunk sizes, the forward path dx takes
    "default": {},
    "one_row_chunks": {"conv_backward_chunk_bytes": 1},             # chunks end inside images
    "winograd_dx": {"winograd_f4_min_tiles": 1, "winograd_f2_min_tiles": 1},
    "shifted_dx": {"winograd_f4_min_tiles": 1 << 30, "winograd_f2_min_tiles": 1 << 30, "im2col_max_pixels": 0},
}


@needs_cpu
@pytest.mark.parametrize("path", sorted(CONV_PATHS))
@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith("conv")], ids=repr)
def test_cpu_conv2d_backward_paths(case, path):
    """The cpu backend's conv backward (im2col GEMMs for ∂L/∂W, the flipped-kernel forward or
    col2im for ∂L/∂x) against the NumPy twin, weights tap-major from `asarray`, and frozen."""
    be = cpu_backend(**CONV_PATHS[path])
    a = {k: v.astype(np.float32) for k, v in case.inputs.items()}
    grad = output_grad(case).astype(np.float32)
    expected = NumpyBackend().conv2d_backward(grad, **a, **case.options)
    got = be.conv2d_backward(grad, a["x"], be.asarray(a["weight"]), a.get("bias"), **case.options)
    for name, g, e in zip(("dx", "dweight", "dbias"), got, expected):
        if e is None:
            assert g is None
        else:
            close32(g, e, 1e-5, name)
    dx, dw, db = be.conv2d_backward(grad[:, :, ::-1][:, :, ::-1], a["x"], a["weight"], None, frozen=True, **case.options)
    assert dw is None and db is None
    close32(dx, expected[0], 1e-5, "frozen dx")


@needs_cpu
@pytest.mark.parametrize("B,Nq,Nk,heads,d,causal", [
    (1, 75, 75, 1, 8, True),       # one (batch, head): the serial driver; causal across tiles
    (2, 70, 45, 3, 5, False),      # cross-attention, query and key tiles ending mid-tile
    (3, 50, 50, 2, 16, True),
])
def test_cpu_attention_backward_tiles(B, Nq, Nk, heads, d, causal):
    """The flash-style backward with 16×32 tiles against the NumPy twin, with and without the
    forward's output."""
    rng = np.random.default_rng(B * Nq + heads)
    q, k = randn(rng, B, Nq, heads * d, scale=2.0), randn(rng, B, Nk, heads * d, scale=2.0)
    v, grad = randn(rng, B, Nk, heads * d), randn(rng, B, Nq, heads * d)
    q, k, v, grad = (a.astype(np.float32) for a in (q, k, v, grad))
    expected = NumpyBackend().attention_backward(grad.astype(np.float64), q.astype(np.float64),
                                                 k.astype(np.float64), v.astype(np.float64), heads, causal=causal)
    be = cpu_backend(attention_backward_tiles=(16, 32))
    out = be.attention(q, k, v, heads, causal=causal)
    for got in (be.attention_backward(grad, q, k, v, heads, causal=causal),
                be.attention_backward(grad, q, k, v, heads, causal=causal, out=out),
                CpuBackend().attention_backward(grad, q, k, v, heads, causal=causal)):
        for name, g, e in zip(("dq", "dk", "dv"), got, expected):
            close32(g, e, 1e-5, name)


@needs_cpu
def test_cpu_norm_and_activation_backward_layouts():
    """Non-contiguous and float64 inputs reach the kernels as float32 C-order, with the same
    gradients; layer norm with fewer rows than parallel parts."""
    rng = np.random.default_rng(3)
    be, ref = CpuBackend(), NumpyBackend()
    x = randn(rng, 2, 8, 9, 5, scale=3.0, offset=1.0).astype(np.float32)
    g = randn(rng, 2, 8, 5, 9).astype(np.float32).transpose(0, 1, 3, 2)      # not C order
    w, b = randn(rng, 8).astype(np.float32), randn(rng, 8).astype(np.float32)
    for silu in (False, True):
        expected = ref.group_norm_backward(g, x, 4, w, b, 1e-6, silu=silu)
        for got_, exp_ in zip(be.group_norm_backward(g, x.astype(np.float64), 4, w, b, 1e-6, silu=silu), expected):
            close32(got_, exp_, 1e-5)
    xl, gl = x[0, 0, :3], g[0, 0, :3]                                   # 3 rows of 5
    for got_, exp_ in zip(be.layer_norm_backward(gl, xl, w[:5], b[:5], 1e-5),
                          ref.layer_norm_backward(gl, xl, w[:5], b[:5], 1e-5)):
        close32(got_, exp_, 1e-5)
    xa = x[:, :, ::-1]                                                 # not C order either
    for op in ("silu", "gelu", "quick_gelu"):
        close32(getattr(be, op + "_backward")(g, xa), getattr(ref, op + "_backward")(g, xa), 2e-6, op)
    xg = np.swapaxes(x, 2, 3)[..., :8]                                  # (2, 8, 5, 8): h and gate of 4
    gg = g[:, :, :5, :4]
    close32(be.geglu_backward(gg, xg), ref.geglu_backward(gg, xg), 2e-6, "geglu")


def test_float64_backend_through_modules():
    """`NumpyBackend(dtype=np.float64)`: weights loaded into modules stay float64, and so do a
    small chain's activations and gradients (conv → group norm + SiLU → stride-2 conv),
    equal to torch.autograd in float64; the default backend still stores float32."""
    from tinysd.nn import Conv2d, GroupNorm

    rng = np.random.default_rng(5)
    be = NumpyBackend(dtype=np.float64)
    assert NumpyBackend().asarray(np.ones(2)).dtype == np.float32
    conv1, norm, conv2 = Conv2d(3, 8, 3, padding=1), GroupNorm(4, 8, 1e-5), Conv2d(8, 8, 3, 2, (0, 1, 0, 1))
    weights = {}
    for module, name in ((conv1, "conv1"), (norm, "norm"), (conv2, "conv2")):
        module.set_backend(be)
        state = {k: randn(rng, *p.shape, scale=0.3, offset=1.0 if module is norm and k == "weight" else 0.0)
                 for k, p in module.named_parameters()}
        module.load_state_dict(state)
        weights[name] = state
    x = randn(rng, 2, 3, 9, 7)
    a = conv1(x)
    b = norm(a, silu=True)
    y = conv2(b)
    assert y.dtype == np.float64 and conv1.weight.dtype == np.float64
    grad = randn(rng, *y.shape)
    db, dw2, dbias2 = be.conv2d_backward(grad, b, conv2.weight, conv2.bias, conv2.stride, conv2.padding)
    da, dgamma, dbeta = be.group_norm_backward(db, a, 4, norm.weight, norm.bias, 1e-5, silu=True)
    dx, dw1, dbias1 = be.conv2d_backward(da, x, conv1.weight, conv1.bias, 1, 1)

    t = {f"{m}.{k}": torch.tensor(v, requires_grad=True) for m, state in weights.items() for k, v in state.items()}
    tx = torch.tensor(x, requires_grad=True)
    th = F.silu(F.group_norm(F.conv2d(tx, t["conv1.weight"], t["conv1.bias"], padding=1), 4, t["norm.weight"],
                             t["norm.bias"], 1e-5))
    ty = F.conv2d(F.pad(th, (0, 1, 0, 1)), t["conv2.weight"], t["conv2.bias"], stride=2)
    keys = ["conv1.weight", "conv1.bias", "norm.weight", "norm.bias", "conv2.weight", "conv2.bias"]
    expected = torch.autograd.grad(ty, [tx] + [t[k] for k in keys], torch.tensor(grad))
    assert_close(y, ty.detach().numpy(), 1e-12, "output")
    for name, ours, theirs in zip(["x"] + keys, [dx, dw1, dbias1, dgamma, dbeta, dw2, dbias2], expected):
        assert ours.dtype == np.float64, name
        assert_close(ours, theirs.numpy(), 1e-11, f"d{name}")
