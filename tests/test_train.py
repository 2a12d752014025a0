"""tinysd.train against its references: AdamW against torch.optim.AdamW step by step, the noise
schedule and min-SNR weights against diffusers, the step noise against torch.randn, a few
full training steps of the tiny U-Net against torch, resuming, gradient accumulation, LoRA
(gradients through the U-Net against diffusers + PEFT; the kohya file through diffusers'
load_lora_weights gives the same picture) and textual inversion (both file formats read back
by tinysd.embeddings and diffusers), the data folder's errors, and the CLI subcommands.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tinysd  # noqa: E402
from torch_util import sd_v15_config  # noqa: E402
from tinysd import cli, embeddings  # noqa: E402
from tinysd.nn import Module  # noqa: E402
from tinysd.train import (AdamW, LoRALinear, NoiseSchedule, Parameter, TrainConfig, add_lora,  # noqa: E402
                          diffusion_loss, diffusion_micro_step, fit_latents, LatentDataset, lora_parameters, named_modules,
                          read_image_folder, remove_lora, save_embedding, save_lora, step_generators, step_seed,
                          train, train_lora, train_textual_inversion, trainable_parameters, UNET_LORA_TARGETS,
                          TEXT_LORA_TARGETS)

SIZE = 64          # the tiny reference model's pictures (latents 8×8)


# -- AdamW -------------------------------------------------------------------------------------------------

class Holder(Module):
    """A module holding one array `w` (no checkpoint key): what AdamW updates in these tests."""


def adam_pair(shapes, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    holders = []
    for a in init:
        h = Holder()
        object.__setattr__(h, "w", a.copy())
        holders.append(h)
    ours = AdamW([Parameter(f"p{i}", h, "w") for i, h in enumerate(holders)], **kwargs)
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    return ours, holders, torch.optim.AdamW(params, **kwargs), params


def run_adam(shapes, steps, ours, holders, ref, params, seed=1):
    """Both optimisers on the same gradients (wide range of scales, a varying lr); yields after each step."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        grads = [(rng.standard_normal(s) * 10.0 ** rng.uniform(-6, 1)).astype(np.float32) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        for h, g in zip(holders, grads):
            h.grads = {"w": g.copy()}
        lr = 1e-2 * 0.95 ** step
        for group in ref.param_groups:
            group["lr"] = lr
        ref.step()
        ours.step(lr)
        yield


SHAPES = [(7, 13), (5,), (3, 4, 3, 3), (1000,)]      # sizes with SIMD tails


def test_adamw_is_torch_adamw_bit_for_bit(monkeypatch):
    """With torch's float32 sqrt (MKL's, not correctly rounded) the update is torch's, bit for bit."""
    monkeypatch.setattr(AdamW, "sqrt", staticmethod(lambda v: torch.from_numpy(v).sqrt().numpy()))
    ours, holders, ref, params = adam_pair(SHAPES, lr=1e-2, weight_decay=0.05)
    for _ in run_adam(SHAPES, 50, ours, holders, ref, params):
        for h, p in zip(holders, params):
            np.testing.assert_array_equal(h.w, p.detach().numpy())
    for key, st in ours.state.items():
        p = params[int(key[1:])]
        np.testing.assert_array_equal(st["exp_avg"], ref.state[p]["exp_avg"].numpy())
        np.testing.assert_array_equal(st["exp_avg_sq"], ref.state[p]["exp_avg_sq"].numpy())


def test_adamw_with_numpy_sqrt_stays_within_ulps():
    ours, holders, ref, params = adam_pair(SHAPES, lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    for _ in run_adam(SHAPES, 50, ours, holders, ref, params):
        pass
    for h, p in zip(holders, params):
        np.testing.assert_allclose(h.w, p.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_adamw_skips_parameters_without_gradients():
    ours, holders, _, _ = adam_pair([(3,), (4,)], lr=0.1)
    before = [h.w.copy() for h in holders]
    holders[0].grads = {"w": np.ones(3, np.float32)}
    ours.step()
    assert not np.array_equal(holders[0].w, before[0]) and np.array_equal(holders[1].w, before[1])
    assert list(ours.state) == ["p0"]


# -- the noise schedule, the step noise, the loss ----------------------------------------------------------

def test_noise_schedule_matches_diffusers():
    ref = diffusers.DDPMScheduler.from_config(sd_v15_config("scheduler"))
    ours = NoiseSchedule(dict(ref.config))
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    rng = np.random.default_rng(0)
    z0, eps = rng.standard_normal((3, 4, 5, 6)).astype(np.float32), rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    t = np.array([0, 500, 999])
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(ours.add_noise(z0, eps, t), ref.add_noise(torch.from_numpy(z0), torch.from_numpy(eps), tt).numpy(),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.velocity(z0, eps, t), ref.get_velocity(torch.from_numpy(z0), torch.from_numpy(eps), tt).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert ours.target(z0, eps, t) is eps


def test_min_snr_weights_match_diffusers():
    """diffusers' train_text_to_image.py: compute_snr, then min(snr, γ)/snr (ε) or /(snr + 1) (v)."""
    from diffusers.training_utils import compute_snr

    t = np.array([0, 1, 10, 100, 500, 900, 999])
    for prediction_type in ("epsilon", "v_prediction"):
        ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      prediction_type=prediction_type)
        snr = compute_snr(ref, torch.from_numpy(t))
        want = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        want = want / (snr if prediction_type == "epsilon" else snr + 1)
        ours = NoiseSchedule(dict(ref.config)).loss_weights(t, 5.0)
        np.testing.assert_allclose(ours, want.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(NoiseSchedule().loss_weights(t), np.ones(len(t)))


def test_step_noise_is_torch_randn():
    """Step k's normals are torch.randn's from torch.Generator().manual_seed(step_seed(seed, k))."""
    for seed, step in [(0, 0), (3, 17), (12345, 999)]:
        _, gen = step_generators(seed, step)
        ref = torch.Generator().manual_seed(step_seed(seed, step))
        for shape in [(2, 4, 8, 8), (5,), (3, 4, 9, 7)]:
            np.testing.assert_array_equal(gen.randn(shape), torch.randn(shape, generator=ref).numpy())


def test_diffusion_loss_gradient_matches_torch():
    rng = np.random.default_rng(1)
    pred, target = rng.standard_normal((3, 4, 5, 5)), rng.standard_normal((3, 4, 5, 5))
    w = np.array([0.5, 1.0, 2.0])
    tp = torch.tensor(pred, requires_grad=True)
    loss = ((tp - torch.from_numpy(target)) ** 2).mean(dim=(1, 2, 3)).mul(torch.from_numpy(w)).mean()
    loss.backward()
    ours, grad = diffusion_loss(pred, target, w)
    assert abs(ours - loss.item()) < 1e-12
    np.testing.assert_allclose(grad, tp.grad.numpy(), rtol=1e-12)


# -- whole training steps ----------------------------------------------------------------------------------

def test_full_unet_training_steps_match_torch(tiny_sd):
    """Three AdamW steps of the ε-loss on the whole tiny U-Net (every parameter trained), step by
    step: from the same parameters and the same batch, each parameter's update within 1e-3 of
    torch's (Frobenius norm, plus 1e-3·lr per entry), and then both continue from torch's.

    Why step by step, and ε = 1e-4 (the gradients here are 1e-2 to 1e-5): Adam's step
    m/(√v + ε) is ±lr whatever the size of the gradient once |g| ≫ ε, so an entry whose
    gradient is rounding noise (exactly zero in exact arithmetic: a 1-token self-attention's q
    and k, a bias before a one-channel GroupNorm) moves by ±lr at random in each float32
    implementation with ε = 1e-8, and a random narrow network amplifies that from step to step.
    AdamW itself is torch's bit for bit (test_adamw_is_torch_adamw_bit_for_bit). Latents 16×16:
    at 8×8 the 1×1 mid block's GroupNorms normalise 2 values per group, where float32 gradients
    of both implementations carry errors well above 1e-4.
    """
    ref = copy.deepcopy(tiny_sd.unet).train()
    ref_params = dict(ref.named_parameters())
    unet = tinysd.load(tiny_sd.folder, backend="numpy").unet
    params = trainable_parameters(unet)
    assert sorted(p.key for p in params) == sorted(ref_params)
    lr = 1e-3
    ours, opt = AdamW(params, lr=lr, eps=1e-4), torch.optim.AdamW(ref.parameters(), lr=lr, eps=1e-4)
    schedule = NoiseSchedule()
    rng = np.random.default_rng(0)
    for step in range(3):
        z0 = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
        eps = rng.standard_normal(z0.shape).astype(np.float32)
        t = rng.integers(0, 1000, 2)
        context = rng.standard_normal((2, 77, ref.config.cross_attention_dim)).astype(np.float32)
        z_t = schedule.add_noise(z0, eps, t)
        before = {p.key: np.array(p.value) for p in params}
        opt.zero_grad()
        loss = ((ref(torch.from_numpy(z_t), torch.from_numpy(t), torch.from_numpy(context)).sample
                 - torch.from_numpy(eps)) ** 2).mean()
        loss.backward()
        opt.step()
        unet.zero_grad()
        saved = {}
        our_loss, grad = diffusion_loss(unet(z_t, t, context, saved=saved), eps, np.ones(2))
        unet.backward(saved, grad)
        ours.step()
        assert abs(our_loss - loss.item()) <= 1e-5 * loss.item()
        for p in params:
            want = ref_params[p.key].detach().numpy()
            diff = np.linalg.norm((p.value - before[p.key]) - (want - before[p.key]))
            assert diff <= 1e-3 * (np.linalg.norm(want - before[p.key]) + lr * np.sqrt(want.size)), (step, p.key)
            p.value[...] = want


def write_folder(folder, n=3, caption="a photo of a red square", size=SIZE, seed=0):
    """n small pictures (different sizes, so they are resized) with NAME.txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        side = size + 8 * i
        Image.fromarray(rng.integers(0, 255, (side, side + 4 * i, 3), dtype=np.uint8)).save(folder / f"pic{i}.png")
        (folder / f"pic{i}.txt").write_text(caption.format(i=i) + "\n")
    return folder


@pytest.fixture
def data(tmp_path):
    return write_folder(tmp_path / "data")


def lora_values(adapters):
    return {k: np.array(v) for k, v in ((f"{n}.{part}", getattr(a, part).weight) for n, a in adapters.items()
                                        for part in ("lora_down", "lora_up"))}


def test_lora_training_resumes_exactly(tiny_sd, data, tmp_path):
    """4 steps in one go, and 2 steps then a resumed run to 4: the same adapters and losses, bit for bit."""
    config = TrainConfig(steps=4, batch_size=2, learning_rate=1e-3, seed=3)
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    straight, losses = train_lora(sd, data, config, rank=2, progress=False)
    state = tmp_path / "state.safetensors"
    sd2 = tinysd.load(tiny_sd.folder, backend="numpy")
    train_lora(sd2, data, TrainConfig(**{**vars(config), "steps": 2}), rank=2, state_path=state, progress=False)
    sd3 = tinysd.load(tiny_sd.folder, backend="numpy")
    resumed, losses3 = train_lora(sd3, data, config, rank=2, state_path=state, resume=True, progress=False)
    assert losses3 == losses
    for key, value in lora_values(straight).items():
        np.testing.assert_array_equal(lora_values(resumed)[key], value, err_msg=key)
    with pytest.raises(ValueError, match="other settings"):
        train_lora(tinysd.load(tiny_sd.folder, backend="numpy"), data, TrainConfig(**{**vars(config), "seed": 4}),
                   rank=2, state_path=state, resume=True, progress=False)


def test_gradient_accumulation_averages_the_micro_batches(tiny_sd, data):
    """Two micro-batches with grad_scale 1/2 accumulate the mean of their gradients."""
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    config = TrainConfig(steps=1, batch_size=2, gradient_accumulation_steps=2, seed=5)
    sd.unet.freeze()
    adapters = add_lora(sd.unet, "lora_unet", UNET_LORA_TARGETS, 2)
    for a in adapters.values():               # lora_up starts at 0: give lora_down a gradient too
        a.lora_up.weight[...] = np.random.default_rng(0).standard_normal(a.lora_up.weight.shape) * 0.1
    params = lora_parameters(adapters)
    data = LatentDataset(sd, *read_image_folder(data, SIZE))
    step = diffusion_micro_step(sd, data, config, NoiseSchedule())
    single = []
    for micro in (0, 1):
        sd.unet.zero_grad()
        step(0, micro, 1.0)
        single.append({p.key: np.array(p.grad) for p in params})
    sd.unet.zero_grad()
    step(0, 0, 0.5)
    step(0, 1, 0.5)
    for p in params:
        np.testing.assert_allclose(p.grad, (single[0][p.key] + single[1][p.key]) / 2, rtol=1e-5, atol=1e-9)


def test_train_loop_clips_and_follows_the_warmup():
    """The loop: gradients clipped to max_grad_norm before the step; the warm-up's lr."""
    h = Holder()
    object.__setattr__(h, "w", np.zeros(4, np.float32))
    seen = []

    def micro_step(step, micro, scale):
        h.grads = {"w": np.full(4, 10.0 * scale, np.float32)}          # norm 20 per step
        return 1.0

    config = TrainConfig(steps=3, learning_rate=0.1, lr_warmup_steps=2, weight_decay=0.0, max_grad_norm=1.0)
    assert [config.lr_at(s) for s in range(3)] == [0.05, 0.1, 0.1]
    orig = AdamW.step
    AdamW.step = lambda self, lr=None: (seen.append((lr, float(np.linalg.norm(h.grads["w"])))), orig(self, lr))
    try:
        train(micro_step, [Parameter("w", h, "w")], config, progress=False)
    finally:
        AdamW.step = orig
    assert [lr for lr, _ in seen] == [0.05, 0.1, 0.1]
    assert all(abs(norm - 1.0) < 1e-5 for _, norm in seen)


# -- LoRA --------------------------------------------------------------------------------------------------

def random_adapters(adapters, seed=0, scale=0.3):
    """Strong random factors, so that a picture shows every adapter (trained ones start near 0)."""
    rng = np.random.default_rng(seed)
    for a in adapters.values():
        for layer in (a.lora_down, a.lora_up):
            layer.weight[...] = rng.standard_normal(layer.weight.shape) * scale / np.sqrt(layer.weight.shape[1])


def test_lora_linear_gradients_match_torch():
    rng = np.random.default_rng(2)
    base = tinysd.nn.Linear(6, 5)
    base.weight, base.bias = rng.standard_normal((5, 6)), rng.standard_normal(5)
    base.ops = tinysd.backend.NumpyBackend(np.float64)
    base.freeze()
    lora = LoRALinear(base, rank=3, alpha=1.5, rng=rng)
    lora.lora_up.weight = rng.standard_normal((5, 3))
    x, g = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 4, 5))
    dx = lora.backward(x, g)
    A, B = (torch.tensor(np.asarray(w), requires_grad=True) for w in (lora.lora_down.weight, lora.lora_up.weight))
    tx = torch.tensor(x, requires_grad=True)
    y = tx @ torch.from_numpy(base.weight).T + torch.from_numpy(base.bias) + 0.5 * (tx @ A.T) @ B.T
    np.testing.assert_allclose(lora(x), y.detach().numpy(), rtol=1e-12)
    (y * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(lora.lora_down.grads["weight"], A.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(lora.lora_up.grads["weight"], B.grad.numpy(), rtol=1e-12)
    assert "grads" not in base.__dict__                              # the base stays frozen


def ours_with_lora_file(tiny_sd, tmp_path, text_encoder=True, alpha=2.0):
    """tinysd with random rank-4 adapters on the U-Net (and text encoder), and their kohya file."""
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    sd.unet.freeze()
    sd.text_encoder.freeze()
    adapters = add_lora(sd.unet, "lora_unet", UNET_LORA_TARGETS, 4, alpha=alpha)
    if text_encoder:
        adapters.update(add_lora(sd.text_encoder, "lora_te", TEXT_LORA_TARGETS, 4, alpha=alpha, seed=1))
    random_adapters(adapters)
    path = tmp_path / "lora.safetensors"
    save_lora(path, adapters)
    return sd, adapters, path


def test_lora_file_loads_in_diffusers_and_draws_the_same_picture(tiny_sd, tmp_path):
    """The kohya file through diffusers' load_lora_weights: every adapter taken, and the same
    picture as tinysd drawing with the adapters (final latents 1e-3, image 0.5/255); tinysd's
    own reader (`load_lora_weights`, tinysd.lora) draws it too."""
    from safetensors.numpy import load_file

    sd, adapters, path = ours_with_lora_file(tiny_sd, tmp_path)
    state = load_file(str(path))
    assert len(state) == 3 * len(adapters) == 3 * (16 * 8 + 2 * 4)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in state)
    assert float(state["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha"]) == 2.0
    pipe = diffusers.StableDiffusionPipeline(**tiny_sd.pipe.components)
    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(str(path))
    kwargs = dict(prompt="a cat in space", num_inference_steps=4, height=SIZE, width=SIZE, output_type="latent",
                  guidance_scale=7.5)
    with torch.no_grad():
        want = pipe(generator=torch.Generator("cpu").manual_seed(0), **kwargs).images.numpy()
        plain = tiny_sd.pipe(generator=torch.Generator("cpu").manual_seed(0), **kwargs).images.numpy()
    got = sd(seed=0, scheduler="pndm", **kwargs).images
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-3 * scale
    reread = tinysd.load(tiny_sd.folder, backend="numpy")        # the file through tinysd's own LoRA reader
    reread.load_lora_weights(str(path))
    assert np.abs(reread(seed=0, scheduler="pndm", **kwargs).images - want).max() <= 1e-3 * scale
    assert np.abs(plain - want).max() > 0.05 * scale                # the adapters change the picture
    image_ours, image_ref = sd.decode(got), (pipe.vae.decode(torch.from_numpy(want) / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    assert np.abs(image_ours - image_ref.detach().permute(0, 2, 3, 1).numpy()).mean() <= 0.5 / 255


def test_lora_gradients_through_the_unet_match_peft(tiny_sd, tmp_path):
    """The ε-loss's gradients of every adapter factor, through the whole U-Net, against torch
    with the same file loaded by diffusers (PEFT's lora_A = lora_down, lora_B = lora_up)."""
    sd, adapters, path = ours_with_lora_file(tiny_sd, tmp_path, text_encoder=False)
    pipe = copy.deepcopy(diffusers.StableDiffusionPipeline(**tiny_sd.pipe.components))
    pipe.load_lora_weights(str(path))
    rng = np.random.default_rng(0)
    z_t = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    eps, t = rng.standard_normal(z_t.shape).astype(np.float32), np.array([10, 700])
    context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32)
    ((pipe.unet(torch.from_numpy(z_t), torch.from_numpy(t), torch.from_numpy(context)).sample
      - torch.from_numpy(eps)) ** 2).mean().backward()
    saved = {}
    _, grad = diffusion_loss(sd.unet(z_t, t, context, saved=saved), eps, np.ones(2))
    sd.unet.backward(saved, grad)
    paths = {module: name for name, module in named_modules(sd.unet) if isinstance(module, LoRALinear)}
    for adapter in adapters.values():
        ref = pipe.unet.get_submodule(paths[adapter])
        for ours, theirs in ((adapter.lora_down, ref.lora_A["default_0"]), (adapter.lora_up, ref.lora_B["default_0"])):
            want = theirs.weight.grad.numpy()
            assert np.abs(ours.grads["weight"] - want).max() <= 1e-4 * np.abs(want).max(), paths[adapter]


def test_remove_lora_restores_the_model(tiny_sd):
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    before = dict(sd.unet.named_parameters())
    adapters = add_lora(sd.unet, "lora_unet", UNET_LORA_TARGETS, 2)
    assert len(dict(sd.unet.named_parameters())) == len(before) + 2 * len(adapters)
    remove_lora(sd.unet, adapters)
    after = dict(sd.unet.named_parameters())
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)


def test_training_a_lora_lowers_the_loss(tiny_sd, tmp_path):
    """10 steps on one picture: the loss at fixed draws falls (the adapters learn something)."""
    folder = write_folder(tmp_path / "one", n=1)
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    data = LatentDataset(sd, *read_image_folder(folder, SIZE))
    probe_config = TrainConfig(steps=1, batch_size=8, seed=99)
    probe = diffusion_micro_step(sd, data, probe_config, NoiseSchedule(sd.scheduler_config))
    base_loss = probe(0, 0, 1.0)
    sd.unet.zero_grad()
    adapters, losses = train_lora(sd, folder, TrainConfig(steps=10, batch_size=4, learning_rate=1e-2), rank=4, progress=False)
    sd.unet.zero_grad()
    assert probe(0, 0, 1.0) < 0.9 * base_loss


def test_fit_latents_draws_the_pictures_closer_than_the_encoder(tiny_sd, tmp_path):
    """fit_latents: AdamW on ‖decode(z) − x‖² through the frozen decoder lowers the encoder's error."""
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    images, _ = read_image_folder(write_folder(tmp_path / "fit", n=2), SIZE)
    start = sd.vae.encode(images).mean
    fitted = fit_latents(sd, images, start, steps=5, lr=0.05)
    assert fitted.shape == start.shape and fitted.dtype == np.float32
    error = lambda z: float(np.mean((sd.vae.decoder(sd.vae.post_quant_conv(z)) - images) ** 2))  # noqa: E731
    assert error(fitted) < 0.9 * error(start)


# -- textual inversion --------------------------------------------------------------------------------------

def test_textual_inversion_trains_only_its_rows_and_round_trips(tiny_sd, tmp_path):
    folder = write_folder(tmp_path / "zorb", n=2, caption="a <zorb> number {i}")
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    table_before = np.array(sd.text_encoder.text_model.embeddings.token_embedding.weight)
    unet_before = {k: np.array(v) for k, v in sd.unet.named_parameters()}
    init = table_before[sd.tokenizer.encode("cat")].mean(axis=0)
    vectors, losses = train_textual_inversion(sd, folder, "<zorb>", TrainConfig(steps=3, batch_size=2, learning_rate=1e-2,
                                                                                 weight_decay=0.0), num_vectors=2,
                                              init_word="cat", progress=False)
    assert vectors.shape == (2, sd.text_encoder.hidden_size) and len(losses) == 3
    assert np.abs(vectors - init).max() > 1e-3                       # moved from the init word
    np.testing.assert_array_equal(sd.text_encoder.text_model.embeddings.token_embedding.weight, table_before)
    assert all(np.array_equal(v, unet_before[k]) for k, v in sd.unet.named_parameters())
    a1111, learned = tmp_path / "zorb.safetensors", tmp_path / "learned_embeds.safetensors"
    save_embedding(a1111, vectors)
    save_embedding(learned, vectors, "<zorb>", format="diffusers")
    prompt = "a <zorb> in the snow"
    want = sd.encode_prompt(prompt, guidance=False)
    for path in (a1111, learned):
        fresh = tinysd.load(tiny_sd.folder, backend="numpy")
        ti = embeddings.load_textual_inversion(fresh, path, token="<zorb>")
        np.testing.assert_array_equal(ti.vectors, vectors)
        np.testing.assert_array_equal(fresh.encode_prompt(prompt, guidance=False), want)
    pipe = copy.deepcopy(diffusers.StableDiffusionPipeline(**tiny_sd.pipe.components))
    pipe.load_textual_inversion(str(learned))
    with torch.no_grad():
        ref = pipe.encode_prompt(prompt, "cpu", 1, False)[0].numpy()
    assert np.abs(ref - want).max() <= 1e-4 * np.abs(ref).max()
    # the same picture: diffusers with the diffusers file, tinysd with the token it trained
    kwargs = dict(prompt=prompt, num_inference_steps=4, height=SIZE, width=SIZE, output_type="latent", guidance_scale=7.5)
    with torch.no_grad():
        theirs = pipe(generator=torch.Generator("cpu").manual_seed(0), **kwargs).images.numpy()
    ours = sd(seed=0, scheduler="pndm", **kwargs).images
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()
    image_ref = (pipe.vae.decode(torch.from_numpy(theirs) / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    assert np.abs(sd.decode(ours) - image_ref.detach().permute(0, 2, 3, 1).numpy()).mean() <= 0.5 / 255


def test_textual_inversion_needs_the_token_in_every_caption(tiny_sd, tmp_path):
    folder = write_folder(tmp_path / "bad", n=2, caption="a red square")
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    with pytest.raises(ValueError, match="does not say '<zorb>'"):
        train_textual_inversion(sd, folder, "<zorb>", TrainConfig(steps=1), progress=False)
    assert "<zorb>" not in sd.tokenizer.added_tokens_encoder


# -- the data folder ----------------------------------------------------------------------------------------

def test_read_image_folder(tmp_path):
    folder = write_folder(tmp_path / "ok", n=3, caption="picture {i}")
    (folder / "notes.md").write_text("ignored")
    images, captions = read_image_folder(folder, 32)
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.float32
    assert -1 <= images.min() and images.max() <= 1
    assert captions == ["picture 0", "picture 1", "picture 2"]


@pytest.mark.parametrize("problem, message", [
    ("empty", "no pictures"), ("no caption", "no caption file pic1.txt"), ("empty caption", "the caption is empty"),
    ("not a picture", "cannot read the picture"), ("missing", "no such folder")])
def test_read_image_folder_names_the_problem(tmp_path, problem, message):
    folder = tmp_path / "data"
    if problem == "empty":
        folder.mkdir()
    elif problem != "missing":
        write_folder(folder, n=2)
        if problem == "no caption":
            (folder / "pic1.txt").unlink()
        elif problem == "empty caption":
            (folder / "pic0.txt").write_text("  \n")
        else:
            (folder / "pic1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=message):
        read_image_folder(folder, 32)


# -- the command line ---------------------------------------------------------------------------------------

def test_cli_train_lora_and_embedding(tiny_sd, data, tmp_path, capsys):
    from safetensors.numpy import load_file

    out = tmp_path / "my.safetensors"
    assert cli.main(["train-lora", str(data), "--model", str(tiny_sd.folder), "--backend", "numpy", "--rank", "2",
                     "--steps", "2", "--batch-size", "2", "-o", str(out)]) == 0
    state = load_file(str(out))
    assert len(state) == 3 * 16 * 8 and state["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape == (2, 32)
    assert (tmp_path / "my.state.safetensors").is_file() and (tmp_path / "my-loss.png").is_file()
    assert cli.main(["train-lora", str(data), "--model", str(tiny_sd.folder), "--backend", "numpy", "--rank", "2",
                     "--steps", "3", "--batch-size", "2", "-o", str(out), "--resume"]) == 0
    zorb = write_folder(tmp_path / "zorb", n=2, caption="a <zorb>")
    emb = tmp_path / "zorb.safetensors"
    assert cli.main(["train-embedding", str(zorb), "--model", str(tiny_sd.folder), "--backend", "numpy", "--token", "<zorb>",
                     "--init-word", "cat", "--steps", "2", "--batch-size", "2", "-o", str(emb),
                     "--diffusers-output", str(tmp_path / "learned_embeds.safetensors")]) == 0
    assert list(load_file(str(emb))) == ["emb_params"]
    assert list(load_file(str(tmp_path / "learned_embeds.safetensors"))) == ["<zorb>"]


@pytest.mark.parametrize("argv, message", [
    (["train-lora", "DATA_MISSING", "-o", "x.safetensors"], "no such folder"),
    (["train-lora", "{data}", "-o", "x.png"], "must end in .safetensors"),
    (["train-lora", "{data}", "-o", "x.safetensors", "--resume"], "no saved state"),
    (["train-lora", "{data}"], "required: -o"),
    (["train-embedding", "{data}", "-o", "x.safetensors"], "--token"),
    (["train-lora", "{data}", "-o", "x.safetensors", "--steps", "0"], "at least 1")])
def test_cli_training_usage_errors(argv, message, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([a.format(data=data) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_prompts_still_parse():
    """Every generation command line keeps working; a prompt that is a subcommand's name goes after --."""
    assert cli.parse_args(["a cat in space", "--steps", "3"]).prompt == "a cat in space"
    assert cli.parse_args(["--", "train-lora"]).prompt == "train-lora"
    assert cli.parse_args(["train lora"]).prompt == "train lora"
