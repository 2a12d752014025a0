"""LCM against diffusers: the `lcm` (and `tcd`) sampler on a plain SD model, as with the LCM-LoRA
(StableDiffusionPipeline / StableDiffusionImg2ImgPipeline with LCMScheduler or TCDScheduler),
and an LCM-distilled U-Net (`time_cond_proj_dim`, every parameter randomised) in both layouts
against LatentConsistencyModelPipeline and its img2img twin.

The single file is written with the original key names by tests/reference_models.py's port of
diffusers' convert_diffusers_to_original_stable_diffusion.py, which has no name for
`time_embedding.cond_proj` and so leaves it as is (diffusers' own single-file loader drops it);
the spelling `time_embed.cond_proj` of other converters is tested too.
"""
import contextlib
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tinysd  # noqa: E402
from reference_models import (Reference, build_models, diffusers_to_original, numpy_state, randomize_,  # noqa: E402
                              sd15_config, text_model_keys, tokenizer_dir, write_checkpoints)
from tinysd import unet as tiny_unet  # noqa: E402
from tinysd.single_file import unet_sizes  # noqa: E402
from torch_util import assert_close, random_lora_, state_dict_numpy  # noqa: E402

PROMPT, NEGATIVE = "a red circle on the left", "blurry"
SIZE, STEPS, SEED = 64, 4, 1234
COND_DIM = 256


def image_and_picture():
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    return (image * 255).round().astype(np.uint8)


def mask_right_half():
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    return mask


def decode_reference(pipe, latents):
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents.numpy(), (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def assert_same_picture(ours, reference):
    (lat, img), (ref_lat, ref_img) = ours, reference
    assert_close(lat, ref_lat, rtol=1e-3, name="final latents")
    mad = float(np.abs(img - ref_img).mean())
    assert mad <= 0.5 / 255, f"final image mean abs difference {mad * 255:.3f}/255 > 0.5/255"


def run_tinysd(sd, kind, sampler, **kw):
    args = dict(num_inference_steps=STEPS, seed=SEED, scheduler=sampler, output_type="latent", **kw)
    if kind in ("img2img", "inpaint"):
        args["image"] = image_and_picture()
        if kind == "inpaint":
            args["mask_image"] = mask_right_half()
    else:
        args.update(height=SIZE, width=SIZE)
    latents = sd(PROMPT, **args).images
    return latents, sd.decode(latents)


def run_reference(pipe, kind, **kw):
    from PIL import Image

    args = dict(prompt=PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(SEED),
                output_type="latent", **kw)
    if kind in ("img2img", "inpaint"):
        args["image"] = Image.fromarray(image_and_picture())
        if kind == "inpaint":
            args.update(mask_image=Image.fromarray(mask_right_half()), height=SIZE, width=SIZE)
    else:
        args.update(height=SIZE, width=SIZE)
    with torch.no_grad():
        latents = pipe(**args).images
    return decode_reference(pipe, latents)


@contextlib.contextmanager
def counting_unet(sd):
    """Records (batch, whether timestep_cond was given) of every U-Net call sd makes."""
    calls, unet = [], sd.unet

    class Counting:
        def __getattr__(self, name):
            return getattr(unet, name)

        def __call__(self, x, *args, **kwargs):
            calls.append((x.shape[0], kwargs.get("timestep_cond") is not None))
            return unet(x, *args, **kwargs)

    sd.unet = Counting()
    try:
        yield calls
    finally:
        sd.unet = unet


# The U-Net's guidance embedding


def test_guidance_scale_embedding_matches_the_pipelines():
    """Within 2 ulp of the largest argument 1000·w: torch's and NumPy's float32 exp differ by
    1 ulp on about half the frequencies, and sin(1000·w·f) moves with its argument (7500·2⁻²³
    = 9e-4 at w = 7.5). The rest of the formula is the same float32 arithmetic."""
    pipe_cls = diffusers.LatentConsistencyModelPipeline
    w = np.array([7.5, 0.0, 2.25, -0.5], np.float32)
    for dim in (256, 7):
        expected = pipe_cls.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=dim).numpy()
        ours = tiny_unet.guidance_scale_embedding(w, dim)
        assert ours.shape == expected.shape and ours.dtype == np.float32
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1000 * np.abs(w).max() * 2.0**-23)
        np.testing.assert_allclose(ours[1:], expected[1:], rtol=0, atol=3000 * 2.0**-23)


def test_unet_with_time_cond_matches_diffusers():
    cfg = dict(sd15_config("unet"), block_out_channels=[32, 64, 64, 64], cross_attention_dim=32,
               time_cond_proj_dim=COND_DIM)
    ref = randomize_(diffusers.UNet2DConditionModel.from_config(cfg), 3).eval()
    ours = tiny_unet.UNet2DConditionModel(cfg).load_state_dict(state_dict_numpy(ref))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    t = np.array([999, 259])
    cond = tiny_unet.guidance_scale_embedding(np.array([7.5, 1.0], np.float32), COND_DIM)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                       timestep_cond=torch.from_numpy(cond)).sample.numpy()
        without = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    assert_close(ours(x, t, ctx, timestep_cond=cond), expected)
    assert_close(ours(x, t, ctx), without)                     # as diffusers: no condition, no cond_proj
    assert np.abs(expected - without).max() > 1e-2 * np.abs(expected).max()


# A plain SD model with the lcm / tcd sampler (the LCM-LoRA recipe)


def plain_reference(tiny, kind, scheduler_cls):
    components = dict(tiny.pipe.components)
    saved = diffusers.PNDMScheduler.from_pretrained(tiny.folder, subfolder="scheduler").config
    components["scheduler"] = getattr(diffusers, scheduler_cls).from_config(saved)
    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tinysd.load(tiny_sd.folder, backend="numpy")


@pytest.mark.parametrize("kind, kw", [("txt2img", dict(guidance_scale=1.0)),
                                      ("txt2img", dict(guidance_scale=1.5, negative_prompt=NEGATIVE)),
                                      ("img2img", dict(guidance_scale=1.0, strength=0.6)),
                                      ("img2img", dict(guidance_scale=1.0, strength=1.0)),
                                      ("inpaint", dict(guidance_scale=1.0, strength=0.75))])
def test_lcm_sampler_matches_diffusers(tiny_sd, sd, kind, kw):
    """`sd(prompt, scheduler="lcm", num_inference_steps=4, guidance_scale=1)`, as diffusers runs
    an LCM-LoRA: its pipeline with LCMScheduler; guidance ≤ 1 is one U-Net pass per step."""
    with counting_unet(sd) as calls:
        ours = run_tinysd(sd, kind, "lcm", **kw)
    assert {batch for batch, _ in calls} == {1 if kw["guidance_scale"] <= 1 else 2}
    assert_same_picture(ours, run_reference(plain_reference(tiny_sd, kind, "LCMScheduler"), kind, **kw))


@pytest.mark.parametrize("kind, eta", [("txt2img", 0.3), ("txt2img", 0.0), ("img2img", 0.3)])
def test_tcd_sampler_matches_diffusers(tiny_sd, sd, kind, eta):
    kw = dict(guidance_scale=1.0, eta=eta, **({"strength": 0.6} if kind == "img2img" else {}))
    assert_same_picture(run_tinysd(sd, kind, "tcd", **kw),
                        run_reference(plain_reference(tiny_sd, kind, "TCDScheduler"), kind, **kw))


def test_lcm_parameters_and_step_count(sd):
    out = sd(PROMPT, scheduler="LCM", num_inference_steps=4, guidance_scale=1.0, seed=3, output_type="latent")
    assert out.parameters["Sampler"] == "LCM" and out.parameters["Steps"] == 4
    assert sd.num_timesteps == 4
    out = sd(PROMPT, scheduler="tcd", num_inference_steps=2, guidance_scale=1.0, seed=3, output_type="latent")
    assert out.parameters["Sampler"] == "TCD"


# The LCM-LoRA recipe end to end: a random LoRA of the LCM-LoRA's layout on the tiny model

# the layers latent-consistency/lcm-lora-sdv1-5 adapts: the U-Net's attention, feed-forward, ResNet
# convs and time projections, resamplers; no text encoder
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]


@pytest.fixture(scope="module")
def lcm_lora(tiny_sd, tmp_path_factory):
    """{format: path}: the LoRA as diffusers' save_lora_weights writes it (PEFT keys, metadata) and
    in kohya's keys (lora_unet_<diffusers path>.lora_down/lora_up/alpha), as the published file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("lcm_lora")
    unet = copy.deepcopy(tiny_sd.unet)
    config = LoraConfig(r=8, lora_alpha=8, init_lora_weights=False, target_modules=LCM_LORA_TARGETS)
    unet.add_adapter(config)
    random_lora_(unet, 40)
    state = get_peft_model_state_dict(unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(folder / "diffusers", unet_lora_layers=state,
                                                        unet_lora_adapter_metadata=config.to_dict())
    kohya = {}
    for key, value in state.items():
        path, kind = key.rsplit(".lora_", 1)
        name = "lora_unet_" + path.replace(".", "_")
        kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(config.lora_alpha))
    save_file(kohya, str(folder / "lcm-lora-sdv1-5.safetensors"))
    return {"diffusers": folder / "diffusers", "kohya": folder / "lcm-lora-sdv1-5.safetensors"}


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_lcm_lora_recipe_matches_diffusers(tiny_sd, lcm_lora, fmt):
    """load_lora_weights + 4 LCM steps at guidance 1: tinysd against diffusers doing the same."""
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    sd.load_lora_weights(lcm_lora[fmt])
    ours = run_tinysd(sd, "txt2img", "lcm", guidance_scale=1.0)
    components = copy.deepcopy(dict(tiny_sd.pipe.components))
    components["scheduler"] = diffusers.LCMScheduler.from_config(components["scheduler"].config)
    pipe = diffusers.StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lcm_lora[fmt])
    assert_same_picture(ours, run_reference(pipe, "txt2img", guidance_scale=1.0))
    sd.unload_lora_weights()
    assert np.abs(run_tinysd(sd, "txt2img", "lcm", guidance_scale=1.0)[0] - ours[0]).max() > 1e-2


def test_cli_lcm_lora_recipe(tiny_sd, lcm_lora, tmp_path):
    """The README's command: --lora FILE --sampler lcm --steps 4 --cfg-scale 1."""
    from PIL import Image
    from tinysd.cli import main
    from tinysd.pngmeta import read_parameters

    out = tmp_path / "lcm.png"
    assert main(["a cat", "--lora", str(lcm_lora["kohya"]), "--sampler", "lcm", "--steps", "4", "--cfg-scale", "1",
                 "--seed", "5", "-W", "64", "-H", "64", "--backend", "numpy", "--model", str(tiny_sd.folder),
                 "--no-prompt-weighting", "-o", str(out)]) == 0
    assert (read_parameters(out)["Sampler"], read_parameters(out)["Steps"]) == ("LCM", 4)
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    sd.load_lora_weights(lcm_lora["kohya"])
    expected = sd("a cat", scheduler="lcm", num_inference_steps=4, guidance_scale=1.0, seed=5, height=64,
                  width=64).images[0]
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))


# An LCM-distilled U-Net (time_cond_proj_dim), in both layouts


@pytest.fixture(scope="module")
def tiny_lcm(tmp_path_factory):
    """A tiny SD whose U-Net has time_cond_proj_dim=256, as LatentConsistencyModelPipeline, in
    the diffusers folder (fp32 + fp16), the single .safetensors and the single .ckpt."""
    from transformers import CLIPTokenizer

    _, vae, text_encoder = build_models("tiny", seed=20)
    cfg = dict(sd15_config("unet"), block_out_channels=[32, 64, 64, 64], cross_attention_dim=128, sample_size=8,
               time_cond_proj_dim=COND_DIM)
    torch.manual_seed(21)
    unet = randomize_(diffusers.UNet2DConditionModel.from_config(cfg), 22).eval()
    scheduler = diffusers.LCMScheduler.from_config(sd15_config("scheduler"))
    pipe = diffusers.LatentConsistencyModelPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir())),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = Reference(pipe=pipe,
                    configs={"unet": dict(unet.config), "vae": dict(vae.config),
                             "text_encoder": text_encoder.config.to_dict(), "scheduler": dict(scheduler.config)},
                    state_dicts={"unet": numpy_state(unet), "vae": numpy_state(vae),
                                 "text_encoder": text_model_keys(numpy_state(text_encoder))})
    ref.original = diffusers_to_original(ref.state_dicts)
    return write_checkpoints(ref, tmp_path_factory.mktemp("tiny_lcm"))


def lcm_reference(tiny, kind):
    cls = (diffusers.LatentConsistencyModelImg2ImgPipeline if kind == "img2img"
           else diffusers.LatentConsistencyModelPipeline)
    pipe = cls(**tiny.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_single_file_keeps_the_converters_name(tiny_lcm):
    key = "model.diffusion_model.time_embedding.cond_proj.weight"
    assert key in tiny_lcm.original and tiny_lcm.original[key].shape == (32, COND_DIM)
    unet = {k[len("model.diffusion_model."):]: v for k, v in tiny_lcm.original.items()
            if k.startswith("model.diffusion_model.")}
    assert unet_sizes(unet, "test")["time_cond_proj_dim"] == COND_DIM


@pytest.mark.parametrize("layout", ["folder", "single_safetensors", "single_ckpt", "time_embed.cond_proj"])
def test_lcm_model_txt2img_matches_latent_consistency_pipeline(tiny_lcm, layout, tmp_path):
    if layout == "folder":
        source = tiny_lcm.folder
    elif layout == "time_embed.cond_proj":        # the other spelling in the wild
        from safetensors.numpy import save_file
        state = {k.replace("time_embedding.cond_proj", "time_embed.cond_proj"): np.ascontiguousarray(v)
                 for k, v in tiny_lcm.original.items()}
        source = tmp_path / "lcm.safetensors"
        save_file(state, str(source))
    else:
        source = getattr(tiny_lcm, layout)
    sd = tinysd.load(source, backend="numpy")
    assert sd.is_lcm_model and sd.default_sampler == "lcm"       # single files carry PNDM's config
    with counting_unet(sd) as calls:
        ours = run_tinysd(sd, "txt2img", None, guidance_scale=8.5)
    assert calls == [(1, True)] * STEPS                       # one pass per step, w in the embedding
    assert_same_picture(ours, run_reference(lcm_reference(tiny_lcm, "txt2img"), "txt2img", guidance_scale=8.5))


def test_lcm_model_guidance_and_img2img(tiny_lcm):
    sd = tinysd.load(tiny_lcm.folder, backend="numpy")
    for kind, kw in [("txt2img", dict(guidance_scale=2.0)), ("img2img", dict(guidance_scale=8.5, strength=0.6))]:
        assert_same_picture(run_tinysd(sd, kind, "lcm", **kw), run_reference(lcm_reference(tiny_lcm, kind), kind, **kw))
    assert sd.num_timesteps == STEPS             # img2img: all 4 steps, from LCM's grid cut to 0.6·50
    with pytest.warns(UserWarning, match="negative_prompt has no effect"):
        sd(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, seed=0, output_type="latent")
    scales = [sd(PROMPT, num_inference_steps=1, seed=0, guidance_scale=g, output_type="latent").images
              for g in (1.0, 8.0)]
    assert np.abs(scales[0] - scales[1]).max() > 1e-3          # the scale reaches the U-Net


def test_lcm_model_hires_fix(tiny_lcm):
    """The hires fix with a distilled LCM: its second pass keeps the guidance embedding w."""
    from test_bigger import hires_and_by_hand

    sd = tinysd.load(tiny_lcm.folder, backend="numpy")
    settings = dict(num_inference_steps=2, seed=SEED, guidance_scale=6.0, output_type="latent")
    out, by_hand = hires_and_by_hand(sd, PROMPT, 2, 0.6, **settings)
    np.testing.assert_array_equal(out.images, by_hand)
    other_w = sd(PROMPT, enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.6,
                 **dict(settings, guidance_scale=2.0)).images
    assert np.abs(other_w - by_hand).max() > 1e-3 * np.abs(by_hand).max()
    assert out.parameters["Sampler"] == "LCM" and out.parameters["Hires upscale"] == 2


def test_lcm_model_configs(tiny_lcm):
    config = json.loads((tiny_lcm.folder / "unet" / "config.json").read_text())
    assert config["time_cond_proj_dim"] == COND_DIM
    assert json.loads((tiny_lcm.folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"


# The command line


def test_cli_sampler_lcm_writes_a1111s_name(tiny_sd, sd, tmp_path):
    from tinysd.cli import main
    from tinysd.pngmeta import read_parameters

    out = tmp_path / "lcm.png"
    assert main(["a cat", "--sampler", "lcm", "--steps", "4", "--cfg-scale", "1", "--seed", "5", "-W", "64",
                 "-H", "64", "--backend", "numpy", "--model", str(tiny_sd.folder), "-o", str(out)]) == 0
    p = read_parameters(out)
    assert (p["Sampler"], p["Steps"], p["CFG scale"]) == ("LCM", 4, 1.0)
    from PIL import Image
    expected = sd("a cat", scheduler="lcm", num_inference_steps=4, guidance_scale=1.0, seed=5, height=64,
                  width=64).images[0]
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))


def test_bad_lcm_arguments_fail_before_any_model_work(sd, tiny_lcm, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("the text encoder ran before the arguments were checked")

    lcm_model = tinysd.load(tiny_lcm.folder, backend="numpy")
    for pipe, kw, message in [
        (sd, dict(scheduler="lcm", num_inference_steps=51), "original_inference_steps 50"),
        (lcm_model, dict(num_inference_steps=8, image=image_and_picture(), strength=0.1), "strength 0.1 leaves 5"),
    ]:
        monkeypatch.setattr(pipe, "text_encoder", no_model_work)
        with pytest.raises(ValueError, match=message):
            pipe(PROMPT, seed=0, **kw)
    # the LCM model's img2img takes its steps from the grid: 4 steps at strength 0.1 (int(4·0.1) = 0) are fine
    monkeypatch.undo()
    lcm_model(PROMPT, seed=0, num_inference_steps=4, image=image_and_picture(), strength=0.1, output_type="latent")
    assert lcm_model.num_timesteps == 4
