"""End-to-end parity: tinysd's txt2img, img2img and inpainting against diffusers' pipelines,
same seeded random weights, prompt, seed (torch CPU generator), sampler and steps.

Bounds (float32): final latents within 1e-3 relative to their scale, final images within
0.5/255 mean absolute difference. One denoising step more or less moves the image by far more.
"""
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tinysd  # noqa: E402
from torch_util import assert_close  # noqa: E402

SAMPLERS = {   # tinysd name -> diffusers class, extra config
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
}
PROMPT, NEGATIVE = "a red circle on the left", "blurry"
SIZE, STEPS, SEED = 64, 4, 1234


def reference_pipe(tiny, kind, sampler):
    """diffusers' pipeline of `kind` with `sampler`, its scheduler built as a diffusers user builds
    it from the saved model: `Cls.from_config(PNDMScheduler.from_pretrained(...).config)`."""
    cls, extra = SAMPLERS[sampler]
    components = dict(tiny.pipe.components)
    saved = diffusers.PNDMScheduler.from_pretrained(tiny.folder, subfolder="scheduler").config
    components["scheduler"] = getattr(diffusers, cls).from_config(saved, **extra)
    pipeline_cls = {"txt2img": diffusers.StableDiffusionPipeline,
                    "img2img": diffusers.StableDiffusionImg2ImgPipeline,
                    "inpaint": diffusers.StableDiffusionInpaintPipeline}[kind]
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_image_and_mask():
    """A smooth test picture (uint8 RGB) and a mask whose right half is repainted."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    return (image * 255).round().astype(np.uint8), mask


def run_reference(tiny, kind, sampler, guidance_scale=7.5, eta=0.0, **kw):
    from PIL import Image

    pipe = reference_pipe(tiny, kind, sampler)
    image, mask = make_image_and_mask()
    args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", **kw)
    if sampler == "ddim":
        args["eta"] = eta
    if kind == "txt2img":
        args.update(height=SIZE, width=SIZE)
    else:
        args["image"] = Image.fromarray(image)
    if kind == "inpaint":
        args.update(mask_image=Image.fromarray(mask), height=SIZE, width=SIZE)
    with torch.no_grad():
        latents = pipe(**args).images
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents.numpy(), (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def run_tinysd(sd, kind, sampler, guidance_scale=7.5, eta=0.0, **kw):
    image, mask = make_image_and_mask()
    args = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=guidance_scale, seed=SEED,
                scheduler=sampler, eta=eta, output_type="latent", **kw)
    if kind == "txt2img":
        args.update(height=SIZE, width=SIZE)
    else:
        args["image"] = image
    if kind == "inpaint":
        args["mask_image"] = mask
    latents = sd(PROMPT, **args).images
    return latents, sd.decode(latents)


def assert_same_picture(ours, reference):
    (lat, img), (ref_lat, ref_img) = ours, reference
    assert_close(lat, ref_lat, rtol=1e-3, name="final latents")
    mad = float(np.abs(img - ref_img).mean())
    assert mad <= 0.5 / 255, f"final image mean abs difference {mad * 255:.3f}/255 > 0.5/255"


@pytest.fixture(scope="module")
def sd_folder(tiny_sd):
    return tinysd.load(tiny_sd.folder, backend="numpy")


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_matches_diffusers(tiny_sd, sd_folder, kind, sampler):
    assert_same_picture(run_tinysd(sd_folder, kind, sampler), run_reference(tiny_sd, kind, sampler))


@pytest.mark.parametrize("layout", ["single_safetensors", "single_ckpt"])
@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
def test_single_file_layouts_match_diffusers(tiny_sd, layout, kind):
    sd = tinysd.load(getattr(tiny_sd, layout), backend="numpy", config=tiny_sd.folder)
    assert_same_picture(run_tinysd(sd, kind, "euler_a"), run_reference(tiny_sd, kind, "euler_a"))


def test_fp16_variant_matches_diffusers_on_the_same_weights(tiny_sd):
    """fp16-stored weights, computed in float32, against diffusers loading the same fp16 files."""
    sd = tinysd.load(tiny_sd.folder, backend="numpy", variant="fp16")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd.folder, variant="fp16", torch_dtype=torch.float32,
                                                             safety_checker=None, requires_safety_checker=False)
    ref = SimpleNamespace(pipe=pipe, folder=tiny_sd.folder)   # the reference from the fp16 files
    assert_same_picture(run_tinysd(sd, "txt2img", "euler_a"), run_reference(ref, "txt2img", "euler_a"))


def test_ddim_with_eta(tiny_sd, sd_folder):
    assert_same_picture(run_tinysd(sd_folder, "txt2img", "ddim", eta=0.5),
                        run_reference(tiny_sd, "txt2img", "ddim", eta=0.5))


def test_guidance_one_skips_unconditional_pass(tiny_sd, sd_folder):
    assert_same_picture(run_tinysd(sd_folder, "txt2img", "euler", guidance_scale=1.0),
                        run_reference(tiny_sd, "txt2img", "euler", guidance_scale=1.0))


def test_batch_of_prompts_and_images_per_prompt(tiny_sd, sd_folder):
    prompts = [PROMPT, "a small blue square"]
    ours = sd_folder(prompts, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=SEED, height=SIZE,
                     width=SIZE, scheduler="euler_a", num_images_per_prompt=2, output_type="latent").images
    pipe = reference_pipe(tiny_sd, "txt2img", "euler_a")
    with torch.no_grad():
        ref = pipe(prompts, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                   generator=torch.Generator("cpu").manual_seed(SEED), num_images_per_prompt=2,
                   output_type="latent").images.numpy()
    assert ours.shape == (4, 4, SIZE // 8, SIZE // 8)
    assert_close(ours, ref, rtol=1e-3)


def test_inpainting_unet_nine_channels(tiny_inpaint_sd):
    sd = tinysd.load(tiny_inpaint_sd.folder, backend="numpy")
    for strength in (1.0, 0.6):
        assert_same_picture(run_tinysd(sd, "inpaint", "euler_a", strength=strength),
                            run_reference(tiny_inpaint_sd, "inpaint", "euler_a", strength=strength))


def test_callback_sees_every_step(sd_folder):
    seen = []
    sd_folder(PROMPT, num_inference_steps=3, seed=0, height=SIZE, width=SIZE, scheduler="euler", output_type="latent",
              callback=lambda step, t, latents, pred_original_sample: seen.append(
                  (step, float(t), latents.shape, pred_original_sample.shape)))
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(s[2] == s[3] == (1, 4, SIZE // 8, SIZE // 8) for s in seen)


@pytest.mark.parametrize("kind, sampler, strength", [("txt2img", "pndm", None), ("img2img", "pndm", 0.5),
                                                     ("inpaint", "heun", 0.6)])
def test_reports_its_step_count_and_parameters(tiny_sd, sd_folder, kind, sampler, strength):
    """The pipeline, not its caller, knows how many U-Net steps a run takes (as diffusers'
    `pipe.num_timesteps`) and what to write in a PNG's parameters."""
    seen, reference_steps = [], []
    kw = {} if strength is None else dict(strength=strength)
    run_tinysd(sd_folder, kind, sampler, callback=lambda *a: seen.append(sd_folder.num_timesteps), **kw)
    run_reference(tiny_sd, kind, sampler, callback_on_step_end=lambda pipe, i, t, kwargs: (
        reference_steps.append(pipe.num_timesteps), kwargs)[1], **kw)
    assert seen == reference_steps and len(seen) == seen[0]
    out = sd_folder(PROMPT, num_inference_steps=STEPS, seed=3, scheduler=sampler, output_type="latent")
    assert out.parameters == {"Steps": STEPS, "Sampler": {"pndm": "PLMS", "heun": "Heun"}[sampler],
                              "CFG scale": 7.5, "Seed": 3, "Size": "64x64", "Model": "diffusers",
                              "Denoising strength": None}


def test_pil_output_and_seed(sd_folder):
    out = sd_folder(PROMPT, num_inference_steps=1, seed=7, height=SIZE, width=SIZE)
    assert out.seed == 7 and out.images[0].size == (SIZE, SIZE) and out.images[0].mode == "RGB"


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=60), "height must be a positive multiple of 8"),
    (dict(scheduler="warp_drive"), "warp_drive"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(mask_image=np.zeros((64, 64), np.uint8)), "needs `image=`"),
    (dict(image=np.zeros((64, 64, 3), np.uint8), strength=1.5), "strength must be in"),
])
def test_bad_arguments(sd_folder, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd_folder(PROMPT, num_inference_steps=1, seed=0, **kwargs)


def test_mask_of_another_size_is_resized_as_diffusers_does(tiny_sd, sd_folder):
    """diffusers resizes mask_image to the image's size (Lanczos, then >= 0.5): so does tinysd."""
    from PIL import Image

    image, _ = make_image_and_mask()
    mask = np.zeros((40, 24), np.uint8)           # another size and aspect ratio than the 64×64 image
    mask[:, 9:] = 255
    ours = sd_folder(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=SEED, scheduler="euler_a",
                     image=image, mask_image=mask, output_type="latent").images
    pipe = reference_pipe(tiny_sd, "inpaint", "euler_a")
    with torch.no_grad():
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, image=Image.fromarray(image),
                   mask_image=Image.fromarray(mask), height=SIZE, width=SIZE, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(SEED)).images.numpy()
    assert_close(ours, ref, rtol=1e-3, name="final latents")
