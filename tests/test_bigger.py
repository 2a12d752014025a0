"""Bigger pictures against their references: the tiled VAE (diffusers' AutoencoderKL tiling), the
hires fix (diffusers' txt2img then img2img, the upscale between computed by torch / PIL, and
A1111's size and step rules), SD upscale (A1111's grid, diffusers' img2img per tile), outpainting
(diffusers' inpainting on the canvas and mask built by A1111's rule) and keep-unmasked
(diffusers' `apply_overlay`). The A1111 functions below are ported from AUTOMATIC1111's
stable-diffusion-webui (modules/processing.py, modules/images.py, modules/upscaler.py,
modules/sd_samplers_common.py, scripts/poor_mans_outpainting.py), as the comments cite.
"""
import contextlib
import math
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image, ImageDraw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tinysd  # noqa: E402
from tinysd import vae as tinysd_vae  # noqa: E402
from tinysd.cli import main, parse_args  # noqa: E402
from tinysd.outpaint import FILL_NOISE, gaussian_blur  # noqa: E402
from tinysd.pngmeta import read_parameters  # noqa: E402
from tinysd.upscale import (LATENT_UPSCALERS, HiresFix, combine_grid, interpolate, split_grid,  # noqa: E402
                            upscale_by, upscale_image)
from torch_util import assert_close, randomize_, sd_v15_config, state_dict_numpy  # noqa: E402

PROMPT, NEGATIVE, SEED = "a red circle", "blurry", 11
SCHEDULERS = {"euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tinysd.load(tiny_sd.folder, backend="numpy")


def reference(tiny, kind, sampler="euler_a"):
    """diffusers' pipeline of `kind` on the tiny model, its scheduler built from the saved config."""
    components = dict(tiny.pipe.components)
    saved = diffusers.PNDMScheduler.from_pretrained(tiny.folder, subfolder="scheduler").config
    components["scheduler"] = getattr(diffusers, SCHEDULERS[sampler]).from_config(saved)
    cls = {"txt2img": diffusers.StableDiffusionPipeline, "img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed=SEED):
    return torch.Generator("cpu").manual_seed(seed)


def picture(width, height, seed=0):
    """A smooth RGB test picture (uint8)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(7 * x * y + seed)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def mean_255(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


# -- tiled VAE -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_pair():
    config = dict(sd_v15_config("vae"), block_out_channels=[32, 64, 64, 64], sample_size=64)
    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    ref = randomize_(diffusers.AutoencoderKL(**keep), 0, scale=0.1)
    return ref, tinysd_vae.AutoencoderKL(config).load_state_dict(state_dict_numpy(ref))


def set_tiles(model, sample, latent, overlap):
    model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor = sample, latent, overlap


KNOBS = {"default (64 px, 8 latents)": (64, 8, 0.25), "small (32 px, 4 latents)": (32, 4, 0.25),
         "wide overlap": (32, 4, 0.5)}
# latents to decode for each: a batch of 2 on the default tiles, and just over two tiles a side
# (an edge tile narrower than the rest) on the smaller ones, which cut many more tiles
LATENTS = {"default (64 px, 8 latents)": (2, 4, 20, 13), "small (32 px, 4 latents)": (1, 4, 10, 7),
           "wide overlap": (1, 4, 9, 7)}


@contextlib.contextmanager
def tiled(vae_pair, knobs):
    """Both VAEs tiling with the same tile sizes and overlap, for the block only."""
    ref, ours = vae_pair
    ref.enable_tiling()
    set_tiles(ref, *KNOBS[knobs])
    set_tiles(ours, *KNOBS[knobs])
    ours.use_tiling = True
    try:
        yield ref, ours
    finally:
        ref.disable_tiling()
        ours.use_tiling = None


@pytest.mark.parametrize("knobs", list(KNOBS))
def test_tiled_decode_matches_diffusers(vae_pair, knobs):
    z = np.random.default_rng(0).standard_normal(LATENTS[knobs]).astype(np.float32)
    with tiled(vae_pair, knobs) as (ref, ours):
        with torch.no_grad():
            expected = ref.decode(torch.from_numpy(z)).sample.numpy()
        assert_close(ours.decode(z), expected)


@pytest.mark.parametrize("knobs", list(KNOBS))
def test_tiled_encode_matches_diffusers(vae_pair, knobs):
    b, _, h, w = LATENTS[knobs]
    x = np.tanh(np.random.default_rng(1).standard_normal((b, 3, 8 * h, 8 * w))).astype(np.float32)
    with tiled(vae_pair, knobs) as (ref, ours):
        with torch.no_grad():
            dist = ref.encode(torch.from_numpy(x)).latent_dist
        ours_dist = ours.encode(x)
        assert_close(ours_dist.mean, dist.mean.numpy(), name="mean")
        assert_close(ours_dist.logvar, dist.logvar.numpy(), name="logvar")


def test_automatic_tiling_follows_the_memory_budget(vae_pair, monkeypatch):
    """use_tiling None (the default) tiles exactly where the estimate passes `tiling_budget`;
    False never tiles; True tiles whatever is larger than a tile, as diffusers' enable_tiling."""
    ref, ours = vae_pair
    set_tiles(ref, *KNOBS["default (64 px, 8 latents)"])
    set_tiles(ours, *KNOBS["default (64 px, 8 latents)"])
    z = np.random.default_rng(2).standard_normal((1, 4, 12, 10)).astype(np.float32)
    with torch.no_grad():
        untiled = ref.decode(torch.from_numpy(z)).sample.numpy()
        ref.enable_tiling()
        tiled = ref.decode(torch.from_numpy(z)).sample.numpy()
        ref.disable_tiling()
    assert np.abs(tiled - untiled).max() > 1e-3 * np.abs(untiled).max()      # the two differ: the test can tell
    estimate = ours.peak_bytes("decoder", 1, 96, 80)
    assert ours.use_tiling is None
    monkeypatch.setattr(ours, "tiling_budget", estimate)          # at the budget: untiled
    assert_close(ours.decode(z), untiled)
    monkeypatch.setattr(ours, "tiling_budget", estimate - 1)      # above it: tiled
    assert_close(ours.decode(z), tiled)
    monkeypatch.setattr(ours, "use_tiling", False)
    assert_close(ours.decode(z), untiled)
    monkeypatch.setattr(ours, "use_tiling", True)
    monkeypatch.setattr(ours, "tiling_budget", 1 << 60)
    assert_close(ours.decode(z), tiled)


def test_memory_estimate_of_sd_v15s_vae():
    """Three float32 activations of the widest level: the decoder's last upsampler (256 channels at
    the full size), the encoder's first level (128 channels at the full size)."""
    sd15 = tinysd_vae.AutoencoderKL(sd_v15_config("vae"))
    assert sd15.peak_bytes("decoder", 1, 512, 512) == 3 * 4 * 256 * 512 * 512
    assert sd15.peak_bytes("encoder", 2, 512, 512) == 2 * 3 * 4 * 128 * 512 * 512
    assert not sd15.tiles("decoder", (1, 4, 128, 128))             # 1024²: 3.2 GB, under the 4 GiB budget
    assert sd15.tiles("decoder", (1, 4, 160, 160))                 # 1280²: 5.0 GB
    assert sd15.tiles("decoder", (1, 4, 256, 256))                 # 2048²: 12.9 GB
    assert (sd15.tile_sample_min_size, sd15.tile_latent_min_size, sd15.tile_overlap_factor) == (512, 64, 0.25)


def test_pipeline_with_vae_tiling_matches_diffusers(tiny_sd, sd):
    pipe = reference(tiny_sd, "txt2img")
    args = dict(num_inference_steps=2, height=128, width=96, output_type="np")
    sd.enable_vae_tiling()
    pipe.vae.enable_tiling()            # diffusers 0.42: the pipeline-level name is gone
    try:
        ours = sd(PROMPT, seed=SEED, scheduler="euler_a", **args).images
        with torch.no_grad():
            expected = pipe(PROMPT, generator=generator(), **args).images
    finally:
        sd.vae.use_tiling = None
        pipe.vae.disable_tiling()
    assert mean_255(ours, expected) * 255 <= 0.5
    sd.disable_vae_tiling()
    assert sd.vae.use_tiling is False
    sd.vae.use_tiling = None


# -- the hires fix: A1111's rules --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LATENT_UPSCALERS))
def test_latent_upscalers_are_torch_interpolate(name):
    mode, antialias = LATENT_UPSCALERS[name]
    x = np.random.default_rng(3).standard_normal((2, 4, 9, 13)).astype(np.float32)
    for size in [(18, 26), (9, 13), (16, 31), (12, 20), (5, 7), (27, 6)]:
        expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode, antialias=antialias)
        assert_close(interpolate(x, size, mode, antialias), expected.numpy(), rtol=1e-5, name=f"{name} {size}")


LANCZOS, NEAREST = Image.LANCZOS, Image.NEAREST


def a1111_upscale(img, scale, upscaler_name):
    """A1111 modules/upscaler.py `Upscaler.upscale` with `UpscalerLanczos` / `UpscalerNearest.do_upscale`."""
    resample = {"Lanczos": LANCZOS, "Nearest": NEAREST}[upscaler_name]

    def do_upscale(img):
        return img.resize((int(img.width * scale), int(img.height * scale)), resample=resample)

    dest_w = int((img.width * scale) // 8 * 8)
    dest_h = int((img.height * scale) // 8 * 8)
    for _ in range(3):
        shape = (img.width, img.height)
        img = do_upscale(img)
        if shape == (img.width, img.height):
            break
        if img.width >= dest_w and img.height >= dest_h:
            break
    if img.width != dest_w or img.height != dest_h:
        img = img.resize((int(dest_w), int(dest_h)), resample=LANCZOS)
    return img


def a1111_resize_image(im, width, height, upscaler_name):
    """A1111 modules/images.py `resize_image(0, im, width, height, upscaler_name)`."""
    scale = max(width / im.width, height / im.height)
    if scale > 1.0:
        im = a1111_upscale(im, scale, upscaler_name)
    if im.width != width or im.height != height:
        im = im.resize((width, height), resample=LANCZOS)
    return im


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest"])
@pytest.mark.parametrize("size, target", [((64, 48), (128, 96)), ((64, 48), (100, 75)), ((40, 56), (96, 136)),
                                          ((64, 48), (40, 32))])
def test_image_upscalers_are_a1111s(upscaler, size, target):
    image = picture(*size)
    ours = upscale_image(image, *target, upscaler)
    assert ours.size == target
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(a1111_resize_image(image, *target, upscaler)))


@pytest.mark.parametrize("upscaler", ["Lanczos", "Nearest"])
@pytest.mark.parametrize("size, scale", [((64, 48), 2), ((45, 61), 1.5), ((40, 40), 4), ((64, 64), 1), ((80, 72), 0.5)])
def test_upscale_by_is_a1111s_upscaler(upscaler, size, scale):
    image = picture(*size)
    np.testing.assert_array_equal(np.asarray(upscale_by(image, scale, upscaler)),
                                  np.asarray(a1111_upscale(image, scale, upscaler)))


def a1111_target_resolution(width, height, hr_scale, hr_resize_x, hr_resize_y, opt_f=8):
    """A1111 modules/processing.py `StableDiffusionProcessingTxt2Img.calculate_target_resolution`
    (without the old-hires-fix option): (hr_upscale_to_x, hr_upscale_to_y, truncate_x, truncate_y)."""
    truncate_x = truncate_y = 0
    if hr_resize_x == 0 and hr_resize_y == 0:
        hr_upscale_to_x = int(width * hr_scale)
        hr_upscale_to_y = int(height * hr_scale)
    else:
        if hr_resize_y == 0:
            hr_upscale_to_x = hr_resize_x
            hr_upscale_to_y = hr_resize_x * height // width
        elif hr_resize_x == 0:
            hr_upscale_to_x = hr_resize_y * width // height
            hr_upscale_to_y = hr_resize_y
        else:
            target_w = hr_resize_x
            target_h = hr_resize_y
            src_ratio = width / height
            dst_ratio = hr_resize_x / hr_resize_y
            if src_ratio < dst_ratio:
                hr_upscale_to_x = hr_resize_x
                hr_upscale_to_y = hr_resize_x * height // width
            else:
                hr_upscale_to_x = hr_resize_y * width // height
                hr_upscale_to_y = hr_resize_y
            truncate_x = (hr_upscale_to_x - target_w) // opt_f
            truncate_y = (hr_upscale_to_y - target_h) // opt_f
    return hr_upscale_to_x, hr_upscale_to_y, truncate_x, truncate_y


@pytest.mark.parametrize("width, height, scale, rx, ry", [
    (512, 512, 2, 0, 0), (512, 768, 1.5, 0, 0), (512, 512, 1.3, 0, 0), (512, 768, 2, 1024, 0),
    (768, 512, 2, 0, 1024), (512, 768, 2, 1024, 1024), (768, 512, 2, 1024, 1024), (640, 448, 2, 1000, 808)])
def test_hires_target_size_is_a1111s(width, height, scale, rx, ry):
    hires = HiresFix(hr_scale=scale, hr_resize_x=rx, hr_resize_y=ry)
    x, y, tx, ty = a1111_target_resolution(width, height, scale, rx, ry)
    assert hires.target(width, height) == (x, y, tx, ty)
    # A1111 crops truncate//2 and (truncate+1)//2 latents off the interpolated ones
    assert hires.latent_size(width, height) == (y // 8 - ty, x // 8 - tx)


def a1111_setup_img2img_steps(requested_steps, denoising_strength):
    """A1111 modules/sd_samplers_common.py `setup_img2img_steps(p, steps)` with steps given (the
    hires pass): (schedule length, t_enc); k-diffusion then runs sigmas[steps − t_enc − 1:], t_enc + 1 steps."""
    steps = int(requested_steps / min(denoising_strength, 0.999)) if denoising_strength > 0 else 0
    return steps, requested_steps - 1


@pytest.mark.parametrize("n, strength", [(10, 0.5), (20, 0.7), (10, 0.3), (3, 1.0), (1, 0.05), (49, 0.49), (7, 0.999)])
def test_hires_steps_run_as_a1111(n, strength):
    """diffusers' img2img with (S, s) runs min(int(S·s), S) steps from index S − that: the same
    last N of the same S-step schedule as A1111's hires pass."""
    total, s = HiresFix(hr_second_pass_steps=n, denoising_strength=strength).steps(first_pass_steps=99)
    schedule, t_enc = a1111_setup_img2img_steps(n, strength)
    assert total == schedule and min(int(total * s), total) == t_enc + 1 == n
    assert HiresFix(denoising_strength=strength).steps(first_pass_steps=n) == (total, s)    # 0: the first pass's


# -- the hires fix against diffusers ------------------------------------------------------------------------
HIRES_CASES = {   # hr_* arguments; the first pass is 48x64 (W x H), 3 steps
    "Latent x2": dict(hr_upscaler="Latent", hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.5),
    "Latent (bicubic antialiased) x1.5": dict(hr_upscaler="Latent (bicubic antialiased)", hr_scale=1.5,
                                              hr_second_pass_steps=3, denoising_strength=0.6),
    "Latent (nearest) to 72x72, own sampler": dict(hr_upscaler="Latent (nearest)", hr_resize_x=72, hr_resize_y=72,
                                                   hr_second_pass_steps=2, denoising_strength=0.7,
                                                   hr_sampler_name="ddim"),
    "Lanczos x1.5, steps 0": dict(hr_upscaler="Lanczos", hr_scale=1.5, denoising_strength=0.75),
    "Nearest to width 64, own prompts": dict(hr_upscaler="Nearest", hr_resize_x=64, hr_second_pass_steps=2,
                                             hr_prompt="a blue square", hr_negative_prompt="dark"),
}


def reference_hires(tiny, hr, steps=3, width=48, height=64):
    """The hires fix computed with diffusers: txt2img, the upscale (torch interpolate / PIL, A1111's
    sizes), img2img with the same seed (a fresh generator), A1111's step rule."""
    settings = {k: v for k, v in hr.items() if k not in ("hr_sampler_name", "hr_prompt", "hr_negative_prompt")}
    hires = HiresFix(**settings)
    x, y, tx, ty = a1111_target_resolution(width, height, hires.hr_scale, hires.hr_resize_x, hires.hr_resize_y)
    with torch.no_grad():
        first = reference(tiny, "txt2img")(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=height,
                                           width=width, generator=generator(), output_type="latent").images
        if hires.hr_upscaler in LATENT_UPSCALERS:
            mode, antialias = LATENT_UPSCALERS[hires.hr_upscaler]
            init = torch.nn.functional.interpolate(first, size=(y // 8, x // 8), mode=mode, antialias=antialias)
            init = init[:, :, ty // 2:init.shape[2] - (ty + 1) // 2, tx // 2:init.shape[3] - (tx + 1) // 2]
        else:
            pipe = reference(tiny, "txt2img")
            decoded = pipe.vae.decode(first / pipe.vae.config.scaling_factor).sample
            decoded = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
            big = a1111_resize_image(decoded, x // 8 * 8, y // 8 * 8, hires.hr_upscaler)
            left, top = tx // 2 * 8, ty // 2 * 8
            init = big.crop((left, top, left + (x // 8 - tx) * 8, top + (y // 8 - ty) * 8))
        n = hires.hr_second_pass_steps or steps
        total, _ = a1111_setup_img2img_steps(n, hires.denoising_strength)
        strength = min(1.0, (n + 0.5) / total)       # diffusers runs int(total·strength) = n steps
        second = reference(tiny, "img2img", hr.get("hr_sampler_name", "euler_a"))(
            hr.get("hr_prompt", PROMPT), negative_prompt=hr.get("hr_negative_prompt", NEGATIVE), image=init,
            strength=strength, num_inference_steps=total, generator=generator(), output_type="latent").images
    return second.numpy()


@pytest.mark.parametrize("case", list(HIRES_CASES))
def test_hires_fix_matches_diffusers_txt2img_then_img2img(tiny_sd, sd, case):
    ours = sd(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, height=64, width=48, seed=SEED,
              scheduler="euler_a", output_type="latent", enable_hr=True, **HIRES_CASES[case])
    assert_close(ours.images, reference_hires(tiny_sd, HIRES_CASES[case]), rtol=1e-3, name="final latents")


def test_hires_fix_reports_a1111s_fields_and_restarts_the_step_count(sd):
    steps = []
    out = sd(PROMPT, num_inference_steps=3, seed=4, scheduler="euler", output_type="latent", enable_hr=True,
             hr_second_pass_steps=2, denoising_strength=0.5,
             callback=lambda i, t, latents: steps.append((i, sd.num_timesteps, latents.shape)))
    assert [s[:2] for s in steps] == [(0, 3), (1, 3), (2, 3), (0, 2), (1, 2)]
    assert steps[0][2] == (1, 4, 8, 8) and steps[-1][2] == out.images.shape == (1, 4, 16, 16)
    assert out.seed == 4 and out.parameters == {
        "Steps": 3, "Sampler": "Euler", "CFG scale": 7.5, "Seed": 4, "Size": "64x64", "Model": "diffusers",
        "Denoising strength": 0.5, "Hires upscale": 2, "Hires steps": 2, "Hires upscaler": "Latent"}
    from tinysd.pngmeta import infotext
    assert infotext(PROMPT, "", out.parameters).endswith(
        "Size: 64x64, Model: diffusers, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 2, "
        "Hires upscaler: Latent")
    other = sd(PROMPT, num_inference_steps=1, seed=4, scheduler="euler", output_type="latent", enable_hr=True,
               hr_resize_x=96, hr_resize_y=80, hr_sampler_name="DPM++ 2M", hr_prompt="a blue square",
               hr_upscaler="latent (nearest-exact)").parameters
    assert {k: other[k] for k in ("Hires resize", "Hires sampler", "Hires prompt", "Hires upscaler")} == {
        "Hires resize": "96x80", "Hires sampler": "DPM++ 2M", "Hires prompt": "a blue square",
        "Hires upscaler": "Latent (nearest-exact)"}
    assert "Hires upscale" not in other and "Hires steps" not in other and other["Denoising strength"] == 0.75


def hires_and_by_hand(sd, text, steps, strength, by_hand_settings=(), **settings):
    """(the hires fix's output, the same latents made by hand: the first pass, the latent upscale
    ×2 and an img2img call with the same settings (and `by_hand_settings`) and A1111's step rule)."""
    out = sd(text, enable_hr=True, hr_second_pass_steps=steps, denoising_strength=strength, **settings)
    settings = dict(settings, output_type="latent")
    hires = HiresFix(hr_second_pass_steps=steps, denoising_strength=strength)
    total, img2img_strength = hires.steps(settings["num_inference_steps"])
    first = sd(text, **settings).images
    upscaled = hires.upscale_latents(first, 8 * first.shape[3], 8 * first.shape[2])
    by_hand = sd(text, image=upscaled, strength=img2img_strength,
                 **dict(settings, num_inference_steps=total, **dict(by_hand_settings))).images
    return out, by_hand


def test_hires_second_pass_reads_the_prompt_as_the_first(sd):
    """prompt_weighting and clip_skip reach the second pass."""
    settings = dict(num_inference_steps=2, seed=SEED, scheduler="euler", prompt_weighting=True, clip_skip=1,
                    output_type="latent")
    out, by_hand = hires_and_by_hand(sd, "a (red:1.3) circle", 2, 0.5, **settings)
    np.testing.assert_array_equal(out.images, by_hand)
    plain = sd("a (red:1.3) circle", enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.5,
               **dict(settings, clip_skip=None, prompt_weighting=False)).images
    assert np.abs(plain - by_hand).max() > 1e-3 * np.abs(by_hand).max()      # the settings change the result
    assert out.parameters["Clip skip"] == 2 and out.parameters["Hires upscale"] == 2


def test_hires_second_pass_keeps_the_fast_recipes(sd):
    """The LCM sampler at guidance 1 and DeepCache reach the second pass too."""
    settings = dict(num_inference_steps=3, seed=SEED, scheduler="lcm", guidance_scale=1.0, deepcache_interval=2,
                    output_type="latent")
    out, by_hand = hires_and_by_hand(sd, PROMPT, 3, 0.6, **settings)
    np.testing.assert_array_equal(out.images, by_hand)
    plain = sd(PROMPT, enable_hr=True, hr_second_pass_steps=3, denoising_strength=0.6,
               **dict(settings, deepcache_interval=None)).images
    assert np.abs(plain - by_hand).max() > 1e-3 * np.abs(by_hand).max()      # DeepCache changes the result
    assert (out.parameters["Sampler"], out.parameters["DeepCache interval"]) == ("LCM", 2)


# -- SD upscale ----------------------------------------------------------------------------------------------
Grid = namedtuple("Grid", ["tiles", "tile_w", "tile_h", "image_w", "image_h", "overlap"])


def a1111_split_grid(image, tile_w=512, tile_h=512, overlap=64):
    """A1111 modules/images.py `split_grid`, as there."""
    w, h = image.width, image.height
    non_overlap_width = tile_w - overlap
    non_overlap_height = tile_h - overlap
    cols = math.ceil((w - overlap) / non_overlap_width)
    rows = math.ceil((h - overlap) / non_overlap_height)
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        row_images = []
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            tile = image.crop((x, y, x + tile_w, y + tile_h))
            row_images.append([x, tile_w, tile])
        grid.tiles.append([y, tile_h, row_images])
    return grid


def a1111_combine_grid(grid):
    """A1111 modules/images.py `combine_grid`, as there."""
    def make_mask_image(r):
        r = r * 255 / grid.overlap
        r = r.astype(np.uint8)
        return Image.fromarray(r, 'L')

    mask_w = make_mask_image(np.arange(grid.overlap, dtype=np.float32).reshape((1, grid.overlap))
                             .repeat(grid.tile_h, axis=0))
    mask_h = make_mask_image(np.arange(grid.overlap, dtype=np.float32).reshape((grid.overlap, 1))
                             .repeat(grid.image_w, axis=1))
    combined_image = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, row in grid.tiles:
        combined_row = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0:
                combined_row.paste(tile, (0, 0))
                continue
            combined_row.paste(tile.crop((0, 0, grid.overlap, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((grid.overlap, 0, w, h)), (x + grid.overlap, 0))
        if y == 0:
            combined_image.paste(combined_row, (0, 0))
            continue
        combined_image.paste(combined_row.crop((0, 0, combined_row.width, grid.overlap)), (0, y), mask=mask_h)
        combined_image.paste(combined_row.crop((0, grid.overlap, combined_row.width, h)), (0, y + grid.overlap))
    return combined_image


def repaint(tile, seed):
    """A stand-in for a tile's img2img: a different picture per tile, so every seam shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (tile.height, tile.width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size, tile, overlap", [((128, 96), 64, 16), ((200, 150), 64, 24), ((64, 64), 64, 8),
                                                 ((130, 70), 48, 40), ((1024, 1024), 512, 64), ((96, 160), 32, 8)])
def test_grid_split_and_blend_are_a1111s(size, tile, overlap):
    image = picture(*size)
    reference_grid = a1111_split_grid(image, tile, tile, overlap)
    ours = split_grid(image, tile, tile, overlap)
    assert [[(t.x, t.y) for t in row] for row in ours] == [[(x, y) for x, _, _ in row]
                                                           for y, _, row in reference_grid.tiles]
    for r, (row, (_, _, reference_row)) in enumerate(zip(ours, reference_grid.tiles)):
        for c, (t, reference_tile) in enumerate(zip(row, reference_row)):
            np.testing.assert_array_equal(np.asarray(t.image), np.asarray(reference_tile[2]))
            t.image = reference_tile[2] = repaint(t.image, 100 * r + c)
    expected = a1111_combine_grid(reference_grid)
    np.testing.assert_array_equal(np.asarray(combine_grid(ours, *size, overlap)), np.asarray(expected))


def test_sd_upscale_is_a1111s_script_with_diffusers_img2img_tiles(tiny_sd, sd):
    """Each tile: diffusers' img2img with seed + k (A1111 bumps the seed per tile); the tiles
    combined by A1111's combine_grid; the whole equals tinysd's `sd.upscale`."""
    image, tile, overlap, strength = picture(48, 40), 64, 32, 0.5
    tiles_seen, hinted = [], []

    def hook(tile):                  # where a ControlNet "tile" hint would enter: the tile itself
        hinted.append(np.asarray(tile))
        return {"negative_prompt": NEGATIVE}

    out = sd.upscale(PROMPT, image, scale=2, tile_size=tile, overlap=overlap, strength=strength, seed=SEED,
                     num_inference_steps=4, scheduler="euler_a", tile_arguments=hook,
                     tile_callback=lambda i, n, t: tiles_seen.append((i, n, t.size)))
    big = a1111_upscale(image, 2, "Lanczos")            # scripts/sd_upscale.py: upscaler.scaler.upscale
    grid = a1111_split_grid(big, tile, tile, overlap)
    pipe = reference(tiny_sd, "img2img")
    k = 0
    for _, _, row in grid.tiles:
        for cell in row:
            with torch.no_grad():
                cell[2] = pipe(PROMPT, negative_prompt=NEGATIVE, image=cell[2], strength=strength,
                               num_inference_steps=4, generator=generator(SEED + k)).images[0]
            k += 1
    assert tiles_seen == [(i, 4, (64, 64)) for i in range(4)] and sd.num_tiles == 4
    upscaled_tiles = [np.asarray(c[2]) for _, _, row in a1111_split_grid(big, tile, tile, overlap).tiles for c in row]
    assert len(hinted) == 4 and all(np.array_equal(a, b) for a, b in zip(hinted, upscaled_tiles))
    result = out.images[0]
    assert result.size == (96, 80)
    assert mean_255(result, a1111_combine_grid(grid)) <= 0.5
    assert out.seed == SEED and out.parameters["SD upscale overlap"] == 32
    assert (out.parameters["SD upscale upscaler"], out.parameters["Size"]) == ("Lanczos", "64x64")


# -- outpainting and keep-unmasked ------------------------------------------------------------------------
def a1111_outpaint_mask(size, left, right, up, down, mask_blur):
    """A1111 scripts/poor_mans_outpainting.py's mask (its rectangle inset by mask_blur·2 on the
    extended sides), blurred by img2img's mask blur (modules/processing.py, p.mask_blur = mask_blur·2:
    cv2.GaussianBlur along x then y) and made `mask_for_overlay` (doubled, clipped)."""
    import cv2

    mask = Image.new("L", size, "white")
    draw = ImageDraw.Draw(mask)
    draw.rectangle((
        left + (mask_blur * 2 if left > 0 else 0),
        up + (mask_blur * 2 if up > 0 else 0),
        mask.width - right - (mask_blur * 2 if right > 0 else 0),
        mask.height - down - (mask_blur * 2 if down > 0 else 0)
    ), fill="black")
    np_mask = np.array(mask)
    blur = mask_blur * 2
    if blur > 0:
        kernel_size = 2 * int(2.5 * blur + 0.5) + 1
        np_mask = cv2.GaussianBlur(np_mask, (kernel_size, 1), blur)
        np_mask = cv2.GaussianBlur(np_mask, (1, kernel_size), blur)
    return np.clip(np_mask.astype(np.float32) * 2, 0, 255).astype(np.uint8)


def outpaint_canvas_by_hand(image, left, right, up, down, seed):
    """The picture's edge pixels stretched outward, plus N(0, (255·FILL_NOISE)²) noise on the border."""
    pixels = np.asarray(image, np.float64)
    canvas = np.pad(pixels, ((up, down), (left, right), (0, 0)), mode="edge")
    noise = np.random.default_rng(seed).normal(0, 255 * FILL_NOISE, canvas.shape)
    border = np.ones(canvas.shape[:2], bool)
    border[up:up + pixels.shape[0], left:left + pixels.shape[1]] = False
    canvas[border] += noise[border]
    return Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("sigma", [1, 2, 4, 8, 16])
def test_mask_blur_is_opencvs(sigma):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(sigma)
    mask = np.where(rng.random((40, 56)) > 0.7, 255, 0).astype(np.uint8)
    mask[10:30, 5:50] = 255
    k = 2 * int(2.5 * sigma + 0.5) + 1
    expected = cv2.GaussianBlur(cv2.GaussianBlur(mask, (k, 1), sigma), (1, k), sigma)
    np.testing.assert_array_equal(gaussian_blur(mask, sigma), expected)       # OpenCV's fixed point, bit for bit


def apply_overlay(pipe, mask, init_image, image):
    """diffusers' VaeImageProcessor.apply_overlay (padding_mask_crop None): the original pasted back."""
    return pipe.image_processor.apply_overlay(mask, init_image, image)


@pytest.mark.parametrize("model", ["4-channel", "9-channel"])
def test_outpaint_matches_diffusers_inpainting_on_the_canvas(request, model):
    tiny = request.getfixturevalue("tiny_sd" if model == "4-channel" else "tiny_inpaint_sd")
    sd9 = tinysd.load(tiny.folder, backend="numpy")
    image, sides = picture(40, 48), dict(left=16, right=8, up=0, down=16)
    canvas = outpaint_canvas_by_hand(image, **sides, seed=SEED)
    ours = sd9.outpaint(PROMPT, image, **sides, mask_blur=2, seed=SEED, negative_prompt=NEGATIVE,
                        num_inference_steps=3, scheduler="euler_a", output_type="np", keep_unmasked=False)
    kept = sd9.outpaint(PROMPT, image, **sides, mask_blur=2, seed=SEED, negative_prompt=NEGATIVE,
                        num_inference_steps=3, scheduler="euler_a")
    from tinysd.outpaint import outpaint_canvas
    our_canvas, our_mask = outpaint_canvas(image, **sides, mask_blur=2, seed=SEED)
    np.testing.assert_array_equal(np.asarray(our_canvas), np.asarray(canvas))
    np.testing.assert_array_equal(np.asarray(our_mask), a1111_outpaint_mask((64, 64), **sides, mask_blur=2))
    pipe = reference(tiny, "inpaint")
    with torch.no_grad():
        expected = pipe(PROMPT, negative_prompt=NEGATIVE, image=canvas, mask_image=our_mask, height=64, width=64,
                        num_inference_steps=3, generator=generator(), output_type="np").images
        expected_pil = pipe.numpy_to_pil(expected)[0]
    assert ours.images.shape == (1, 64, 64, 3) and mean_255(ours.images, expected) * 255 <= 0.5
    assert mean_255(kept.images[0], apply_overlay(pipe, our_mask, canvas, expected_pil)) <= 0.5
    assert kept.parameters["Mask blur"] == 2 and kept.parameters["Size"] == "64x64"
    kept_as_is = np.asarray(our_mask) == 0                 # the picture away from the seam: its own pixels
    assert kept_as_is.sum() > 200
    np.testing.assert_array_equal(np.asarray(kept.images[0])[kept_as_is], np.asarray(canvas)[kept_as_is])


def test_keep_unmasked_pastes_the_original_back_as_apply_overlay(tiny_sd, sd):
    image = picture(64, 64, seed=3)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    mask[:, 24:32] = np.linspace(0, 255, 10)[1:9].astype(np.uint8)        # a feathered seam
    args = dict(negative_prompt=NEGATIVE, num_inference_steps=3, seed=SEED, scheduler="euler_a", image=image,
                mask_image=mask)
    plain = sd(PROMPT, output_type="np", **args).images
    kept = sd(PROMPT, output_type="np", keep_unmasked=True, **args).images
    m = (mask / 255.0)[None, :, :, None]
    np.testing.assert_allclose(kept, m * plain + (1 - m) * np.asarray(image)[None] / 255.0, atol=1e-6)
    kept_pil = sd(PROMPT, keep_unmasked=True, **args).images[0]
    np.testing.assert_array_equal(np.asarray(kept_pil)[:, :24], np.asarray(image)[:, :24])
    pipe = reference(tiny_sd, "inpaint")
    with torch.no_grad():
        generated = pipe(PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=Image.fromarray(mask),
                         num_inference_steps=3, generator=generator()).images[0]
    expected = apply_overlay(pipe, Image.fromarray(mask), image, generated)
    assert mean_255(kept_pil, expected) <= 0.5
    assert np.abs(np.asarray(kept_pil, int) - np.asarray(expected, int)).max() <= 2


# -- bad arguments: one clear error, before any model work --------------------------------------------------
@pytest.fixture
def guarded(sd, forbid_model_work):
    return forbid_model_work(sd)


IMAGE = np.zeros((64, 64, 3), np.uint8)
MASK = np.zeros((64, 64), np.uint8)
BAD = {
    "hr_scale without enable_hr": (dict(hr_scale=2), ValueError, ["hr_scale=2", "enable_hr=True"]),
    "denoising_strength without enable_hr": (dict(denoising_strength=0.5), ValueError, ["denoising_strength"]),
    "enable_hr string": (dict(enable_hr="yes"), TypeError, ["enable_hr", "'yes'"]),
    "hr upscaler unknown": (dict(enable_hr=True, hr_upscaler="ESRGAN"), ValueError,
                            ["hr_upscaler", "'ESRGAN'", "Latent (nearest-exact)", "Lanczos"]),
    "hr_scale zero": (dict(enable_hr=True, hr_scale=0), ValueError, ["second pass would be 0x0"]),
    "hr_scale string": (dict(enable_hr=True, hr_scale="2"), TypeError, ["hr_scale", "'2'"]),
    "hr_resize_x not a multiple of 8": (dict(enable_hr=True, hr_resize_x=100), ValueError, ["hr_resize_x", "100"]),
    "hr_resize_y negative": (dict(enable_hr=True, hr_resize_y=-8), ValueError, ["hr_resize_y", "-8"]),
    "hr steps negative": (dict(enable_hr=True, hr_second_pass_steps=-1), ValueError, ["hr_second_pass_steps", "-1"]),
    "denoising_strength 0": (dict(enable_hr=True, denoising_strength=0), ValueError, ["denoising_strength=0"]),
    "denoising_strength 1.5": (dict(enable_hr=True, denoising_strength=1.5), ValueError, ["denoising_strength", "1.5"]),
    "hires schedule too long": (dict(enable_hr=True, hr_second_pass_steps=50, denoising_strength=0.04), ValueError,
                                ["50 steps", "schedule of 1250 steps", "1000"]),
    "hr sampler unknown": (dict(enable_hr=True, hr_sampler_name="warp"), ValueError, ["hr_sampler_name", "'warp'"]),
    "hr_prompt wrong length": (dict(enable_hr=True, hr_prompt=["a", "b"]), ValueError, ["hr_prompt", "2 entries"]),
    "hires with image": (dict(enable_hr=True, image=IMAGE), ValueError, ["enable_hr", "image="]),
    "keep_unmasked string": (dict(keep_unmasked="yes"), TypeError, ["keep_unmasked", "'yes'"]),
    "keep_unmasked with latent output": (dict(image=IMAGE, mask_image=MASK, keep_unmasked=True), ValueError,
                                         ["keep_unmasked=True", "output_type='latent'"]),
    "image latents of 3 channels": (dict(image=np.zeros((1, 3, 8, 8), np.float32)), ValueError,
                                    ["image", "(1, 3, 8, 8)", "latents"]),
    "image latents with a mask": (dict(image=np.zeros((1, 4, 8, 8), np.float32), mask_image=MASK), ValueError,
                                  ["latents start img2img only"]),
    "image latents nan": (dict(image=np.full((1, 4, 8, 8), np.nan, np.float32)), ValueError, ["non-finite"]),
    "image list of a non-picture": (dict(image=[IMAGE, 3]), TypeError, ["image[1]", "3 (int)"]),
    "image list longer than the batch": (dict(image=[IMAGE, IMAGE]), ValueError, ["2 pictures for 1 image"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument_is_named_before_any_model_work(guarded, case):
    overrides, error, fragments = BAD[case]
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent")
    kwargs.update(overrides)
    if "image" in overrides:
        kwargs.pop("height"), kwargs.pop("width")
    with pytest.raises(error) as e:
        guarded(**kwargs)
    assert type(e.value) is error
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"


def test_nine_channel_model_refuses_the_hires_fix(tiny_inpaint_sd):
    sd9 = tinysd.load(tiny_inpaint_sd.folder, backend="numpy")
    with pytest.raises(ValueError, match="9-channel"):
        sd9(PROMPT, num_inference_steps=1, enable_hr=True)


OUTPAINT_BAD = {
    "canvas width not a multiple of 8": (dict(left=5), ["canvas width 64 + 5", "3 more pixels"]),
    "no side": (dict(), ["at least one of left, right, up, down"]),
    "negative side": (dict(up=-8), ["up", "-8"]),
    "side a float": (dict(down=8.0), ["down", "8.0"]),
    "mask given": (dict(left=8, mask_image=MASK), ["outpaint sets mask_image"]),
    "size given": (dict(left=8, width=72), ["outpaint sets width"]),
    "bad seed": (dict(left=8, seed="x"), ["seed", "'x'"]),
    "bad generation argument": (dict(left=8, num_inference_steps=0), ["num_inference_steps"]),
}


@pytest.mark.parametrize("case", list(OUTPAINT_BAD))
def test_outpaint_bad_arguments(guarded, case):
    kwargs, fragments = OUTPAINT_BAD[case]
    with pytest.raises((ValueError, TypeError)) as e:
        guarded.outpaint(PROMPT, IMAGE, **kwargs)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"


UPSCALE_BAD = {
    "tile larger than the picture": (dict(scale=1, tile_size=128), ["64x64, smaller than a tile of 128"]),
    "scale too small": (dict(scale=0.01), ["would be 0x0"]),
    "overlap as large as a tile": (dict(overlap=64), ["overlap", "[0, 56]"]),
    "overlap negative": (dict(overlap=-1), ["overlap", "-1"]),
    "unknown upscaler": (dict(upscaler="Latent"), ["unknown upscaler 'Latent'", "Lanczos, Nearest"]),
    "latent output": (dict(output_type="latent"), ["output_type 'latent'"]),
    "scale zero": (dict(scale=0), ["scale", "> 0"]),
    "tile not a multiple of 8": (dict(tile_size=60), ["tile_size", "60"]),
    "size given": (dict(height=64), ["upscale sets height"]),
    "bad generation argument": (dict(guidance_scale="7"), ["guidance_scale", "'7'"]),
    "tile_arguments not callable": (dict(tile_arguments={"a": 1}), ["tile_arguments must be callable"]),
}


@pytest.mark.parametrize("case", list(UPSCALE_BAD))
def test_upscale_bad_arguments(guarded, case):
    kwargs, fragments = UPSCALE_BAD[case]
    with pytest.raises((ValueError, TypeError)) as e:
        guarded.upscale(PROMPT, IMAGE, **kwargs)
    for fragment in fragments:
        assert fragment in str(e.value), f"{fragment!r} not in {str(e.value)!r}"


# -- the command line -----------------------------------------------------------------------------------------
FAST = ["--backend", "numpy", "--steps", "2", "--seed", "9", "--sampler", "euler"]


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_cli_hires_fix(tiny_sd, sd, tmp_path):
    out = tmp_path / "hr.png"
    assert main(["a cat", "--model", str(tiny_sd.folder), "-o", str(out), "-W", "64", "-H", "48", "--hr-scale", "2",
                 "--hr-steps", "2", "--hr-denoise", "0.5", "--hr-upscaler", "latent (bicubic)"] + FAST) == 0
    p = read_parameters(out)
    assert (p["Size"], p["Hires upscale"], p["Hires steps"], p["Hires upscaler"], p["Denoising strength"]) == (
        (64, 48), 2.0, 2, "Latent (bicubic)", 0.5)
    expected = sd("a cat", num_inference_steps=2, seed=9, scheduler="euler", width=64, height=48, enable_hr=True,
                  hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.5, hr_upscaler="Latent (bicubic)")
    assert pixels(out).shape == (96, 128, 3)
    np.testing.assert_array_equal(pixels(out), np.asarray(expected.images[0]))


def test_cli_outpaint_and_vae_tiling(tiny_sd, sd, tmp_path):
    init = tmp_path / "init.png"
    picture(80, 72).save(init)
    out = tmp_path / "wide.png"
    assert main(["a cat", "--model", str(tiny_sd.folder), "-o", str(out), "--init-image", str(init),
                 "--outpaint", "left=16,down=8", "--vae-tiling"] + FAST) == 0
    p = read_parameters(out)
    assert (p["Size"], p["Mask blur"], p["Denoising strength"]) == ((96, 80), 4, 1.0)
    sd.enable_vae_tiling()
    try:
        expected = sd.outpaint("a cat", str(init), left=16, down=8, num_inference_steps=2, seed=9, scheduler="euler")
    finally:
        sd.vae.use_tiling = None
    np.testing.assert_array_equal(pixels(out), np.asarray(expected.images[0]))


def test_cli_upscale_subcommand(tiny_sd, sd, tmp_path, capsys):
    init = tmp_path / "small.png"
    picture(40, 40).save(init)
    out = tmp_path / "big.png"
    assert main(["upscale", str(init), "--prompt", "a cat", "--model", str(tiny_sd.folder), "-o", str(out),
                 "--tile-size", "64", "--overlap", "16", "--strength", "0.5"] + FAST) == 0
    assert "80x80" in capsys.readouterr().out
    p = read_parameters(out)
    assert (p["SD upscale overlap"], p["SD upscale upscaler"], p["Size"], p["Seed"]) == (16, "Lanczos", (64, 64), 9)
    expected = sd.upscale("a cat", str(init), tile_size=64, overlap=16, strength=0.5, num_inference_steps=2, seed=9,
                          scheduler="euler")
    np.testing.assert_array_equal(pixels(out), np.asarray(expected.images[0]))


@pytest.mark.parametrize("argv, message", [
    (["a cat", "--hr-steps", "4"], "--hr-steps needs --hr-scale"),
    (["a cat", "--hr-scale", "2", "--init-image", "x.png"], "txt2img's"),
    (["a cat", "--outpaint", "left=8"], "--outpaint needs --init-image"),
    (["a cat", "--outpaint", "sideways=8", "--init-image", "x.png"], "SIDE=PIXELS"),
    (["a cat", "--outpaint", "left=8", "--init-image", "x.png", "--mask", "m.png"], "not with --mask"),
    (["a cat", "--mask-blur", "4"], "--mask-blur is --outpaint's"),
    (["a cat", "--hr-scale", "0"], "must be a number > 0"),
    (["a cat", "--hr-scale", "2", "--hr-upscaler", "ESRGAN"], "unknown upscaler 'ESRGAN'"),
    (["upscale"], "IMAGE"),
    (["upscale", "x.png", "--upscaler", "Latent"], "invalid choice"),
])
def test_cli_mistakes_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_prompt_upscale_is_still_a_prompt():
    assert parse_args(["--", "upscale"]).prompt == "upscale"
    assert parse_args(["upscale me", "--seed", "1"]).prompt == "upscale me"
    args = parse_args(["a dog", "--init-image", "x.png", "--outpaint", "up=64"])
    assert args.strength == 1.0 and args.keep_unmasked and args.outpaint == {"up": 64}
