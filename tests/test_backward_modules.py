"""Module-level backward passes (`block.backward(saved, grad)`) against torch.autograd.

The tiny SD v1 models of tests/reference_models.py (every parameter randomised) run in torch
in float64; each block of the U-Net, the whole U-Net under the ε-prediction loss, the text
encoder and the VAE's encoder and decoder are differentiated there with `torch.autograd.grad`
and here by their explicit backwards. Every parameter gradient and every input gradient must
agree: float64 (NumpyBackend(np.float64)) within 1e-9 of each gradient's scale, float32 (numpy
and cpu backends) within 1e-4 of it. Blocks run on the activations the reference U-Net gives
them (captured with forward pre-hooks), so their inputs have realistic scales. Central finite
differences of our own float64 loss on a few parameter entries are a second witness.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from reference_models import build_models, numpy_state, text_model_keys  # noqa: E402

from tinysd.backend import NumpyBackend  # noqa: E402
from tinysd.text_encoder import CLIPTextModel  # noqa: E402
from tinysd.unet import UNet2DConditionModel, timestep_embedding  # noqa: E402
from tinysd.vae import AutoencoderKL  # noqa: E402

BACKENDS = {"numpy64": lambda: NumpyBackend(np.float64), "numpy": NumpyBackend}
try:
    from tinysd.kernels.cpu import CpuBackend
    BACKENDS["cpu"] = CpuBackend
except ImportError:       # numba missing: the cpu backend is tested where it runs
    pass
RTOL = {"numpy64": 1e-9, "numpy": 1e-4, "cpu": 1e-4}


@pytest.fixture(scope="module")
def reference():
    """The tiny reference models (float32 weights, as saved), and float64 copies to differentiate."""
    unet, vae, text_encoder = build_models("tiny", seed=7)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder,
            "unet64": copy.deepcopy(unet).double(), "vae64": copy.deepcopy(vae).double(),
            "text_encoder64": copy.deepcopy(text_encoder).double()}


def build_ours(reference, part, backend):
    """tinysd's model of `part` on `backend`, with the reference's (float32) weights."""
    ref = reference[part]
    if part == "unet":
        model, state = UNet2DConditionModel(dict(ref.config)), numpy_state(ref)
    elif part == "vae":
        model, state = AutoencoderKL(dict(ref.config)), numpy_state(ref)
    else:
        model, state = CLIPTextModel(ref.config.to_dict()), text_model_keys(numpy_state(ref))
    return model.set_backend(BACKENDS[backend]()).load_state_dict(state)


def sub(module, path):
    """The sub-module at a dotted checkpoint path, in a torch or a tinysd tree."""
    for part in path.split(".") if path else []:
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def capture_inputs(model, paths, run):
    """{path: (args, kwargs)} of each sub-module's first call while `run()` runs (no grad)."""
    got = {}
    hooks = [sub(model, p).register_forward_pre_hook(
        lambda m, args, kwargs, p=p: got.setdefault(p, (args, kwargs)), with_kwargs=True) for p in paths]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return got


def assert_grads_close(ours, expected, rtol, what):
    """Every gradient in `expected` (name -> array) has its twin in `ours`, within rtol × its scale.

    The scale is the gradient's own largest entry. Some gradients are zero in exact arithmetic
    (a conv bias or the timestep projection before a GroupNorm with one channel per group, which
    subtracts them again): torch's float64 then holds rounding noise under 1e-9 of the largest
    gradient of `expected`, and ours must stay within rtol of that largest one.
    """
    assert sorted(ours) == sorted(expected), f"{what}: gradients for {sorted(set(ours) ^ set(expected))} differ in presence"
    largest = max(float(np.abs(w).max()) for w in expected.values())
    for name, want in expected.items():
        got = np.asarray(ours[name], dtype=np.float64)
        assert got.shape == want.shape, f"{what} {name}: shape {got.shape} != {want.shape}"
        scale = float(np.abs(want).max())
        if scale < 1e-9 * largest:           # an exact zero, up to rounding
            scale = largest
        err = float(np.abs(got - want).max())
        assert err <= rtol * scale, f"{what} {name}: max error {err:.3g} > {rtol:g} × scale {scale:.3g}"


def torch_param_grads(module, loss, inputs):
    """(param name -> grad, input name -> grad) of `loss`, as float64 NumPy arrays."""
    named = [(n, p) for n, p in module.named_parameters()]
    wrt = [p for _, p in named] + list(inputs.values())
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    as_np = [None if g is None else g.detach().numpy() for g in grads]
    params = {n: g if g is not None else np.zeros(tuple(p.shape)) for (n, p), g in zip(named, as_np)}
    return params, dict(zip(inputs, as_np[len(named):]))


# -- the U-Net's blocks, each on the activations the reference gives it ---------------------------------

def _call_torch(kind, m, x):
    """The block in torch on inputs `x` (name -> tensor): its outputs as a list."""
    if kind == "resnet":
        return [m(x["x"], x.get("temb"))]
    if kind == "transformer":
        return [m(x["x"], encoder_hidden_states=x["context"]).sample]
    if kind in ("basic_block", "cross_attention"):
        return [m(x["x"], encoder_hidden_states=x["context"])]
    if kind in ("self_attention", "ff", "downsample", "time_embedding"):
        return [m(x["x"])]
    if kind == "upsample":
        return [m(x["x"], output_size=x["size"])]
    if kind == "down_block":
        h, skips = m(x["x"], x["temb"], **({"encoder_hidden_states": x["context"]} if "context" in x else {}))
        return [h, *skips]
    if kind == "up_block":
        skips = tuple(x[f"skip{i}"] for i in range(len(m.resnets)))
        kw = {"encoder_hidden_states": x["context"]} if "context" in x else {}
        return [m(x["x"], skips, x["temb"], upsample_size=x.get("size"), **kw)]
    if kind == "mid_block":
        return [m(x["x"], x["temb"], encoder_hidden_states=x["context"])]
    raise ValueError(kind)


def _run_ours(kind, m, x, out_grads):
    """Our forward with `saved`, then our backward: (outputs, input name -> gradient)."""
    saved = {}
    if kind == "resnet":
        outs = [m(x["x"], x.get("temb"), saved=saved)]
        dx, dtemb = m.backward(saved, out_grads(outs)[0])
        return outs, {"x": dx, **({"temb": dtemb} if "temb" in x else {})}
    if kind in ("transformer", "basic_block", "cross_attention"):
        outs = [m(x["x"], x["context"], saved=saved)]
        dx, dcontext = m.backward(saved, out_grads(outs)[0])
        return outs, {"x": dx, "context": dcontext}
    if kind == "self_attention":
        outs = [m(x["x"], saved=saved)]
        dx, none = m.backward(saved, out_grads(outs)[0])
        assert none is None
        return outs, {"x": dx}
    if kind in ("ff", "downsample", "time_embedding"):
        outs = [m(x["x"], saved=saved)]
        return outs, {"x": m.backward(saved, out_grads(outs)[0])}
    if kind == "upsample":
        outs = [m(x["x"], x["size"], saved=saved)]
        return outs, {"x": m.backward(saved, out_grads(outs)[0])}
    if kind == "down_block":
        h, skips = m(x["x"], x["temb"], x.get("context"), saved=saved)
        outs = [h, *skips]
        g = out_grads(outs)
        dx, dtemb, dcontext = m.backward(saved, g[0], g[1:])
        return outs, {"x": dx, "temb": dtemb, **({"context": dcontext} if "context" in x else {})}
    if kind == "up_block":
        skips = [x[f"skip{i}"] for i in range(len(m.resnets))]
        outs = [m(x["x"], skips, x["temb"], x.get("context"), size=x.get("size"), saved=saved)]
        dx, dskips, dtemb, dcontext = m.backward(saved, out_grads(outs)[0])
        return outs, {"x": dx, "temb": dtemb, **{f"skip{i}": d for i, d in enumerate(dskips)},
                      **({"context": dcontext} if "context" in x else {})}
    if kind == "mid_block":
        outs = [m(x["x"], x["temb"], x["context"], saved=saved)]
        dx, dtemb, dcontext = m.backward(saved, out_grads(outs)[0])
        return outs, {"x": dx, "temb": dtemb, "context": dcontext}
    raise ValueError(kind)


BLOCKS = {   # checkpoint path -> kind
    "time_embedding": "time_embedding",
    "down_blocks.0": "down_block",
    "down_blocks.1": "down_block",
    "down_blocks.3": "down_block",
    "down_blocks.1.resnets.0": "resnet",                     # 32 -> 64 channels: conv_shortcut
    "down_blocks.0.downsamplers.0": "downsample",
    "down_blocks.1.attentions.0": "transformer",
    "down_blocks.1.attentions.0.transformer_blocks.0": "basic_block",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1": "self_attention",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2": "cross_attention",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff": "ff",
    "mid_block": "mid_block",
    "up_blocks.0": "up_block",
    "up_blocks.2": "up_block",
    "up_blocks.3": "up_block",
    "up_blocks.1.upsamplers.0": "upsample",
}


def _inputs_of(kind, args, kwargs):
    """name -> float64 array of a block's captured call."""
    a = lambda t: t.detach().numpy().astype(np.float64)   # noqa: E731
    x = {"x": a(args[0] if args else kwargs["hidden_states"])}
    if kind in ("resnet", "down_block", "mid_block"):
        x["temb"] = a(args[1] if len(args) > 1 else kwargs["temb"])
    if kind == "up_block":
        for i, skip in enumerate(args[1] if len(args) > 1 else kwargs["res_hidden_states_tuple"]):
            x[f"skip{i}"] = a(skip)
        x["temb"] = a(args[2] if len(args) > 2 else kwargs["temb"])
        if kwargs.get("upsample_size") is not None:
            x["size"] = tuple(int(s) for s in kwargs["upsample_size"])
    if kind == "upsample" and kwargs.get("output_size") is not None:
        x["size"] = tuple(int(s) for s in kwargs["output_size"])
    elif kind == "upsample":
        x["size"] = None
    context = kwargs.get("encoder_hidden_states")
    if context is not None and kind != "self_attention":
        x["context"] = a(context)
    return x


@pytest.fixture(scope="module")
def unet_case(reference):
    """An ε-prediction training batch for the tiny U-Net (odd-sized, so the up path crops) and
    the inputs every block in BLOCKS receives during its forward."""
    rng = np.random.default_rng(0)
    B, ctx_dim = 2, reference["unet"].config.cross_attention_dim
    x0, eps = rng.standard_normal((B, 4, 9, 11)), rng.standard_normal((B, 4, 9, 11))
    t = np.array([999, 37])
    abar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)[t][:, None, None, None]
    z_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    context = rng.standard_normal((B, 77, ctx_dim))
    ref = reference["unet64"]
    inputs = capture_inputs(ref, list(BLOCKS), lambda: ref(torch.from_numpy(z_t), torch.from_numpy(t),
                                                             torch.from_numpy(context)))
    blocks = {p: _inputs_of(kind, *inputs[p]) for p, kind in BLOCKS.items()}
    return {"z_t": z_t, "t": t, "eps": eps, "context": context, "blocks": blocks}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("path", list(BLOCKS))
def test_unet_block_gradients_match_torch(reference, unet_case, path, backend):
    kind, x = BLOCKS[path], unet_case["blocks"][path]
    ref = sub(reference["unet64"], path)
    rng = np.random.default_rng(len(path))
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in x.items() if isinstance(v, np.ndarray)}
    outs = _call_torch(kind, ref, {**x, **tensors})
    targets = [rng.standard_normal(tuple(o.shape)) for o in outs]          # L = Σ_outputs mean((y − target)²)
    loss = sum(((o - torch.from_numpy(tg)) ** 2).mean() for o, tg in zip(outs, targets))
    want_params, want_inputs = torch_param_grads(ref, loss, tensors)

    model = build_ours(reference, "unet", backend)
    ours = sub(model, path)
    dtype = np.float64 if backend == "numpy64" else np.float32
    ours_x = {k: v.astype(dtype) if isinstance(v, np.ndarray) else v for k, v in x.items()}

    def out_grads(outputs):                                                 # ∂L/∂y = 2(y − target)/size
        return [(2 * (np.asarray(o, np.float64) - tg) / tg.size).astype(dtype) for o, tg in zip(outputs, targets)]
    _, got_inputs = _run_ours(kind, ours, ours_x, out_grads)
    rtol = RTOL[backend]
    assert_grads_close(dict(ours.named_grads()), want_params, rtol, f"{path} parameters")
    assert_grads_close(got_inputs, want_inputs, rtol, f"{path} inputs")


def unet_loss_grads_torch(reference, case):
    """Parameter gradients of L = mean((ε̂(z_t, t, c) − ε)²) and ∂L/∂c, in torch float64.

    Both sides compute the sinusoidal timestep embedding in float32 (as diffusers does), where
    NumPy's and torch's sin/cos may differ by an ulp (1e-8 of the loss); torch is handed ours.
    """
    ref = copy.deepcopy(reference["unet64"])
    sinusoid = timestep_embedding(case["t"], ref.config.block_out_channels[0])
    ref.time_proj.forward = lambda t: torch.from_numpy(sinusoid)
    context = torch.tensor(case["context"], requires_grad=True)
    pred = ref(torch.from_numpy(case["z_t"]), torch.from_numpy(case["t"]), context).sample
    loss = ((pred - torch.from_numpy(case["eps"])) ** 2).mean()
    params, inputs = torch_param_grads(ref, loss, {"context": context})
    return loss.item(), params, inputs["context"]


def unet_loss_ours(model, case, dtype, saved=None):
    """Our ε-prediction loss and its gradient ∂L/∂ε̂."""
    pred = np.asarray(model(case["z_t"].astype(dtype), case["t"], case["context"].astype(dtype), saved=saved), np.float64)
    return float(((pred - case["eps"]) ** 2).mean()), (2 * (pred - case["eps"]) / pred.size).astype(dtype)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_unet_gradients_match_torch(reference, unet_case, backend):
    """The whole U-Net under the ε-prediction loss: every parameter's gradient and the context's."""
    loss_ref, want_params, want_context = unet_loss_grads_torch(reference, unet_case)
    model = build_ours(reference, "unet", backend)
    dtype = np.float64 if backend == "numpy64" else np.float32
    saved = {}
    loss, grad = unet_loss_ours(model, unet_case, dtype, saved)
    assert abs(loss - loss_ref) <= RTOL[backend] * loss_ref
    dlatents, dcontext = model.backward(saved, grad)
    assert dlatents.shape == unet_case["z_t"].shape
    assert_grads_close(dict(model.named_grads()), want_params, RTOL[backend], "U-Net parameters")
    assert_grads_close({"context": dcontext}, {"context": want_context}, RTOL[backend], "U-Net context")


def test_unet_gradients_finite_differences(reference, unet_case):
    """A second witness, independent of torch: (L(θ + h) − L(θ − h)) / 2h on a few entries."""
    model = build_ours(reference, "unet", "numpy64")
    saved = {}
    _, grad = unet_loss_ours(model, unet_case, np.float64, saved)
    model.backward(saved, grad)
    grads = dict(model.named_grads())
    params = dict(model.named_parameters())
    h = 1e-5
    for key, index in [("conv_in.weight", (3, 1, 0, 2)), ("time_embedding.linear_1.bias", (5,)),
                       ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight", (7, 100)),
                       ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight", (300, 12)),
                       ("up_blocks.3.resnets.2.conv_shortcut.weight", (1, 40, 0, 0)),
                       ("up_blocks.1.upsamplers.0.conv.bias", (9,)), ("conv_out.weight", (2, 17, 1, 2))]:
        p = params[key]
        old = p[index]
        p[index] = old + h
        up, _ = unet_loss_ours(model, unet_case, np.float64)
        p[index] = old - h
        down, _ = unet_loss_ours(model, unet_case, np.float64)
        p[index] = old
        numeric = (up - down) / (2 * h)
        assert abs(numeric - grads[key][index]) <= 1e-6 * max(abs(numeric), 1e-3), (key, numeric, grads[key][index])


def test_frozen_unet_has_no_parameter_gradients(reference, unet_case):
    """frozen=True: no parameter gradient anywhere, the context's gradient unchanged (LoRA, textual
    inversion train through a frozen U-Net)."""
    _, _, want_context = unet_loss_grads_torch(reference, unet_case)
    model = build_ours(reference, "unet", "numpy64").freeze()
    saved = {}
    _, grad = unet_loss_ours(model, unet_case, np.float64, saved)
    _, dcontext = model.backward(saved, grad)
    assert dict(model.named_grads()) == {}
    assert_grads_close({"context": dcontext}, {"context": want_context}, 1e-9, "frozen U-Net context")


def test_gradients_accumulate_and_zero(reference, unet_case):
    """Two backwards add up (gradient accumulation); zero_grad drops them."""
    model = build_ours(reference, "unet", "numpy64")
    for _ in range(2):
        saved = {}
        _, grad = unet_loss_ours(model, unet_case, np.float64, saved)
        model.backward(saved, grad)
    twice = dict(model.named_grads())
    model.zero_grad()
    assert dict(model.named_grads()) == {}
    saved = {}
    _, grad = unet_loss_ours(model, unet_case, np.float64, saved)
    model.backward(saved, grad)
    for key, g in model.named_grads():
        np.testing.assert_allclose(twice[key], 2 * g, rtol=1e-12, atol=1e-300)


def test_inference_keeps_nothing(reference, unet_case):
    """Without `saved` the forward is the inference forward, bit for bit."""
    model = build_ours(reference, "unet", "numpy")
    args = (unet_case["z_t"].astype(np.float32), unet_case["t"], unet_case["context"].astype(np.float32))
    np.testing.assert_array_equal(model(*args), model(*args, saved={}))


# -- the text encoder --------------------------------------------------------------------------------------

TEXT_IDS = np.array([[49406, 320, 1929, 530, 2867, 49407] + [49407] * 9,
                     [49406, 1125, 539, 320, 2368, 11, 3241, 1611, 49407] + [49407] * 6])


def text_grads_torch(ref, ids, target, clip_skip=None):
    out = ref(torch.from_numpy(ids), output_hidden_states=True)
    h = out.last_hidden_state if not clip_skip else getattr(ref, "text_model", ref).final_layer_norm(out.hidden_states[-(clip_skip + 1)])
    loss = ((h - torch.from_numpy(target)) ** 2).mean()
    params, _ = torch_param_grads(ref, loss, {})
    return text_model_keys(params)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("clip_skip", [None, 1])
def test_text_encoder_gradients_match_torch(reference, backend, clip_skip):
    ref = reference["text_encoder64"]
    target = np.random.default_rng(1).standard_normal((2, TEXT_IDS.shape[1], ref.config.hidden_size))
    want = text_grads_torch(ref, TEXT_IDS, target, clip_skip)
    if clip_skip:       # the skipped layer gets no gradient: torch gives None (zeros here), we give none
        want = {k: v for k, v in want.items() if f"layers.{ref.config.num_hidden_layers - 1}." not in k}
    model = build_ours(reference, "text_encoder", backend)
    dtype = np.float64 if backend == "numpy64" else np.float32
    saved = {}
    h = np.asarray(model(TEXT_IDS, clip_skip=clip_skip, saved=saved), np.float64)
    model.backward(saved, (2 * (h - target) / h.size).astype(dtype))
    assert_grads_close(dict(model.named_grads()), want, RTOL[backend], "text encoder parameters")


def test_text_encoder_finite_differences(reference):
    model = build_ours(reference, "text_encoder", "numpy64")
    target = np.random.default_rng(2).standard_normal((2, TEXT_IDS.shape[1], model.hidden_size))

    def loss(saved=None):
        h = model(TEXT_IDS, saved=saved)
        return float(((h - target) ** 2).mean()), 2 * (h - target) / h.size
    saved = {}
    model.backward(saved, loss(saved)[1])
    grads, params = dict(model.named_grads()), dict(model.named_parameters())
    for key, index in [("text_model.embeddings.token_embedding.weight", (1929, 5)),
                       ("text_model.embeddings.position_embedding.weight", (3, 17)),
                       ("text_model.encoder.layers.0.self_attn.k_proj.weight", (4, 9)),
                       ("text_model.encoder.layers.1.mlp.fc1.bias", (33,)),
                       ("text_model.final_layer_norm.weight", (8,))]:
        p, h = params[key], 1e-5
        old = p[index]
        p[index] = old + h
        up = loss()[0]
        p[index] = old - h
        down = loss()[0]
        p[index] = old
        numeric = (up - down) / (2 * h)
        assert abs(numeric - grads[key][index]) <= 1e-6 * max(abs(numeric), 1e-3), (key, numeric, grads[key][index])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_textual_inversion_rows_match_torch(reference, backend):
    """Added token rows (textual inversion) with the table frozen: only grads["added"], equal to
    the gradient of the same rows appended to torch's table."""
    ref = copy.deepcopy(reference["text_encoder64"])
    V, D = ref.config.vocab_size, ref.config.hidden_size
    rows = (np.random.default_rng(3).standard_normal((2, D)) * 0.02).astype(np.float32)   # added rows are float32
    ref.resize_token_embeddings(V + 2, mean_resizing=False)
    with torch.no_grad():
        ref.get_input_embeddings().weight[V:] = torch.from_numpy(rows.astype(np.float64))
    ids = TEXT_IDS.copy()
    ids[0, 2], ids[1, 4], ids[1, 5] = V, V + 1, V       # one new token used twice
    target = np.random.default_rng(4).standard_normal((2, ids.shape[1], D))
    want = text_grads_torch(ref, ids, target)["text_model.embeddings.token_embedding.weight"][V:]

    model = build_ours(reference, "text_encoder", backend)
    model.add_tokens(rows)
    model.freeze()
    token_embedding = model.text_model.embeddings.token_embedding
    token_embedding.train_added = True
    dtype = np.float64 if backend == "numpy64" else np.float32
    saved = {}
    h = np.asarray(model(ids, saved=saved), np.float64)
    model.backward(saved, (2 * (h - target) / h.size).astype(dtype))
    got = dict(model.named_grads())
    assert list(got) == ["text_model.embeddings.token_embedding.added"]
    assert_grads_close({"added": got["text_model.embeddings.token_embedding.added"]}, {"added": want},
                       RTOL[backend], "added rows")


# -- the VAE ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_vae_gradients_match_torch(reference, part, backend):
    ref = getattr(reference["vae64"], part)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 3, 24, 16) if part == "encoder" else (1, 4, 3, 2))
    tx = torch.tensor(x, requires_grad=True)
    out = ref(tx)
    target = rng.standard_normal(tuple(out.shape))
    loss = ((out - torch.from_numpy(target)) ** 2).mean()
    want_params, want_inputs = torch_param_grads(ref, loss, {"x": tx})

    model = getattr(build_ours(reference, "vae", backend), part)
    dtype = np.float64 if backend == "numpy64" else np.float32
    saved = {}
    y = np.asarray(model(x.astype(dtype), saved=saved), np.float64)
    dx = model.backward(saved, (2 * (y - target) / y.size).astype(dtype))
    assert_grads_close(dict(model.named_grads()), want_params, RTOL[backend], f"VAE {part} parameters")
    assert_grads_close({"x": dx}, want_inputs, RTOL[backend], f"VAE {part} input")
