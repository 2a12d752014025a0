"""ControlNet against diffusers: the model block by block, the U-Net's residual entry, every
pipeline mode with one and two ControlNets, both weight layouts; the hint preprocessors against
OpenCV; the shipped "shapes-canny" ControlNet.

The ControlNets are diffusers' `ControlNetModel.from_unet` on the tiny SD v1 U-Net with every
parameter randomised (so the zero convolutions are not zero), saved with `save_pretrained` (fp32
and the fp16 variant) and in the original single-file layout (`control_model.*`, .safetensors and
.pth), whose key mapping is checked by converting back with diffusers' own converter.
"""
import base64
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tinysd  # noqa: E402
from tinysd import controlnet as cn  # noqa: E402
from tinysd import hints  # noqa: E402
from controlnet_reference import controlnet_to_original, random_controlnet  # noqa: E402
from reference_models import numpy_state  # noqa: E402
from test_pipeline import NEGATIVE, PROMPT, SEED, SIZE, STEPS, assert_same_picture, make_image_and_mask  # noqa: E402
from torch_util import assert_close  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nets(tiny_sd, tmp_path_factory):
    """Two random ControlNets for the tiny model, written in every layout."""
    from safetensors.numpy import save_file

    out = tmp_path_factory.mktemp("controlnets")
    refs = [random_controlnet(tiny_sd.unet, seed=10), random_controlnet(tiny_sd.unet, seed=11)]
    paths = {}
    for i, ref in enumerate(refs):
        folder = out / f"controlnet-{i}"
        ref.to(torch.float16).save_pretrained(folder, variant="fp16")    # fp16 first: the last save writes config.json
        ref.to(torch.float32).save_pretrained(folder)
        original = controlnet_to_original(numpy_state(ref))
        single = out / f"control_v11p_sd15_test{i}.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in original.items()}, str(single))
        pth = out / f"control_v11p_sd15_test{i}.pth"
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in original.items()}, pth)
        paths[i] = dict(folder=folder, single=single, pth=pth)
    return refs, paths


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tinysd.load(tiny_sd.folder, backend="numpy")


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- weights ---------------------------------------------------------------------------------------

def test_original_layout_round_trips_through_diffusers_converter(nets):
    """The original names the tests write are the ones diffusers' single-file converter reads."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    refs, _ = nets
    state = numpy_state(refs[0])
    back = convert_controlnet_checkpoint({k: torch.from_numpy(v) for k, v in controlnet_to_original(state).items()},
                                         dict(refs[0].config))
    assert set(back) == set(state)
    assert all(np.array_equal(back[k].numpy(), state[k]) for k in state)


@pytest.mark.parametrize("layout", ["folder", "single", "pth"])
def test_every_layout_loads_the_same_weights(nets, tiny_sd, layout):
    refs, paths = nets
    ckpt = cn.read_controlnet(paths[0][layout], tiny_sd.configs["unet"])
    expected = numpy_state(refs[0])
    assert set(ckpt.state) == set(expected)
    assert all(np.array_equal(np.asarray(ckpt.state[k], np.float32), v) for k, v in expected.items())
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "conditioning_embedding_out_channels"):
        assert list(np.atleast_1d(ckpt.config[key])) == list(np.atleast_1d(refs[0].config[key])), key
    assert ckpt.name == Path(paths[0][layout]).stem or layout == "folder"
    assert len(ckpt.short_hash) == 8


def test_fp16_variant_matches_diffusers_loading_it(nets):
    _, paths = nets
    ref = diffusers.ControlNetModel.from_pretrained(paths[0]["folder"], variant="fp16", torch_dtype=torch.float32)
    ours = cn.load_controlnet(paths[0]["folder"], backend="numpy", variant="fp16")
    x, ctx, cond = rand(1, 4, 8, 8), rand(1, 77, 128, seed=1), np.random.default_rng(2).random((1, 3, 64, 64), np.float32)
    with torch.no_grad():
        down, mid = ref(torch.from_numpy(x), 500, torch.from_numpy(ctx), torch.from_numpy(cond), return_dict=False)
    ours_down, ours_mid = ours(x, 500, ctx, cond)
    for a, b in zip(ours_down, down):
        assert_close(a, b.numpy())
    assert_close(ours_mid, mid.numpy())


# -- the model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("guess_mode, scale", [(False, 1.0), (False, 0.6), (True, 0.8)])
def test_residuals_match_diffusers_per_block(nets, guess_mode, scale):
    refs, paths = nets
    ours = cn.load_controlnet(paths[0]["single"], backend="numpy", unet_config=dict(refs[0].config))
    x, ctx = rand(2, 4, 8, 8), rand(2, 77, 128, seed=1)
    cond = np.random.default_rng(2).random((2, 3, 64, 64), dtype=np.float32)
    t = np.array([999, 10])
    with torch.no_grad():
        down, mid = refs[0](torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), torch.from_numpy(cond),
                            conditioning_scale=scale, guess_mode=guess_mode, return_dict=False)
    ours_down, ours_mid = ours(x, t, ctx, cond, scale, guess_mode)
    assert len(ours_down) == len(down) == 12
    for k, (a, b) in enumerate(zip(ours_down, down)):
        assert_close(a, b.numpy(), name=f"controlnet_down_blocks.{k}")
    assert_close(ours_mid, mid.numpy(), name="controlnet_mid_block")


def test_hint_encoder_and_zero_convs_are_live(nets, tiny_sd):
    """The randomised hint encoder matters: a different hint changes every residual."""
    _, paths = nets
    ours = cn.load_controlnet(paths[0]["folder"], backend="numpy")
    x, ctx = rand(1, 4, 8, 8), rand(1, 77, 128, seed=1)
    a, _ = ours(x, 500, ctx, np.zeros((1, 3, 64, 64), np.float32))
    b, _ = ours(x, 500, ctx, np.ones((1, 3, 64, 64), np.float32))
    assert all(np.abs(p - q).max() > 1e-3 for p, q in zip(a, b))


def test_unet_takes_the_residuals_as_diffusers(tiny_sd, nets):
    """The U-Net's one documented entry for the control: skip_k + r_k and mid + r_mid."""
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    x, ctx = rand(2, 4, 8, 8), rand(2, 77, 128, seed=1)
    down = [rand(*s.shape, seed=3 + k) for k, s in enumerate(_skip_shapes(sd.unet, x))]
    mid = rand(2, 64, 1, 1, seed=40)
    with torch.no_grad():
        expected = tiny_sd.unet(torch.from_numpy(x), 500, torch.from_numpy(ctx),
                                down_block_additional_residuals=tuple(torch.from_numpy(d) for d in down),
                                mid_block_additional_residual=torch.from_numpy(mid)).sample.numpy()
    actual = sd.unet(x, 500, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert_close(actual, expected)
    assert np.abs(actual - sd.unet(x, 500, ctx)).max() > 1e-2
    with pytest.raises(ValueError, match="down_block_additional_residuals has 3"):
        sd.unet(x, 500, ctx, down_block_additional_residuals=down[:3], mid_block_additional_residual=mid)


def _skip_shapes(unet, x):
    shapes, h, w, c = [], x.shape[2], x.shape[3], unet.config["block_out_channels"]
    shapes.append((x.shape[0], c[0], h, w))
    for i, block in enumerate(unet.down_blocks):
        shapes += [(x.shape[0], c[i], h, w)] * len(block.resnets)
        if block.downsamplers:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((x.shape[0], c[i], h, w))
    return [np.empty(s) for s in shapes]


# -- pipelines -------------------------------------------------------------------------------------

def control_pictures(n):
    """Control images with structure: a disc and a bar (uint8 RGB, SIZE×SIZE), one per ControlNet."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    disc = ((x - 20) ** 2 + (y - 30) ** 2 < 150)
    bar = (np.abs(x - 44) < 6) & (y > 10)
    pictures = [np.where(disc[..., None], [255, 255, 255], [0, 0, 0]), np.where(bar[..., None], [250, 20, 90], [10, 10, 10])]
    return [p.astype(np.uint8) for p in pictures[:n]]


def reference_controlnet_pipe(tiny, kind, controlnets, sampler="euler_a"):
    from test_pipeline import SAMPLERS

    cls, extra = SAMPLERS[sampler]
    components = {k: v for k, v in tiny.pipe.components.items() if k not in ("image_encoder",)}
    saved = diffusers.PNDMScheduler.from_pretrained(tiny.folder, subfolder="scheduler").config
    components["scheduler"] = getattr(diffusers, cls).from_config(saved, **extra)
    pipeline_cls = {"txt2img": diffusers.StableDiffusionControlNetPipeline,
                    "img2img": diffusers.StableDiffusionControlNetImg2ImgPipeline,
                    "inpaint": diffusers.StableDiffusionControlNetInpaintPipeline}[kind]
    pipe = pipeline_cls(**components, controlnet=controlnets[0] if len(controlnets) == 1 else list(controlnets))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(tiny, kind, controlnets, sampler="euler_a", deepcache=None, **kw):
    """diffusers' ControlNet pipeline of `kind`; deepcache=(interval, branch) wraps it in the DeepCache
    package's DeepCacheSDHelper."""
    from PIL import Image

    pipe = reference_controlnet_pipe(tiny, kind, controlnets, sampler)
    if deepcache is not None:
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=deepcache[0], cache_branch_id=deepcache[1])
        helper.enable()
    image, mask = make_image_and_mask()
    controls = [Image.fromarray(p) for p in control_pictures(len(controlnets))]
    args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent", height=SIZE, width=SIZE, **kw)
    if kind == "txt2img":
        args["image"] = controls[0] if len(controls) == 1 else controls
    else:
        args.update(image=Image.fromarray(image), control_image=controls[0] if len(controls) == 1 else controls)
    if kind == "inpaint":
        args["mask_image"] = Image.fromarray(mask)
    try:
        with torch.no_grad():
            latents = pipe(**args).images
    finally:
        if deepcache is not None:
            helper.disable()
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents.numpy(), (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def run_tinysd(sd, kind, n, sampler="euler_a", **kw):
    image, mask = make_image_and_mask()
    controls = control_pictures(n)
    args = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, seed=SEED, scheduler=sampler,
                output_type="latent", height=SIZE, width=SIZE, control_image=controls[0] if n == 1 else controls, **kw)
    if kind != "txt2img":
        args["image"] = image
    if kind == "inpaint":
        args["mask_image"] = mask
    latents = sd(PROMPT, **args).images
    return latents, sd.decode(latents)


@pytest.fixture(scope="module")
def sd_one(tiny_sd, nets):
    _, paths = nets
    return tinysd.load(tiny_sd.folder, backend="numpy", controlnet=paths[0]["folder"])


@pytest.fixture(scope="module")
def sd_two(tiny_sd, nets):
    _, paths = nets
    return tinysd.load(tiny_sd.folder, backend="numpy", controlnet=[paths[0]["single"], paths[1]["pth"]])


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
def test_one_controlnet_matches_diffusers(tiny_sd, nets, sd_one, kind):
    refs, _ = nets
    kw = dict(controlnet_conditioning_scale=0.8)
    assert_same_picture(run_tinysd(sd_one, kind, 1, **kw), run_reference(tiny_sd, kind, refs[:1], **kw))


@pytest.mark.parametrize("kind", ["txt2img", "img2img", "inpaint"])
def test_two_controlnets_match_diffusers(tiny_sd, nets, sd_two, kind):
    refs, _ = nets
    kw = dict(controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.25],
              control_guidance_end=[0.75, 1.0])
    assert_same_picture(run_tinysd(sd_two, kind, 2, **kw), run_reference(tiny_sd, kind, refs, **kw))


@pytest.mark.parametrize("kind, n", [("txt2img", 1), ("img2img", 2), ("inpaint", 1)])
def test_guess_mode_matches_diffusers(tiny_sd, nets, sd_one, sd_two, kind, n):
    refs, _ = nets
    kw = dict(guess_mode=True, guidance_scale=4.0)
    assert_same_picture(run_tinysd(sd_one if n == 1 else sd_two, kind, n, **kw), run_reference(tiny_sd, kind, refs[:n], **kw))


@pytest.mark.parametrize("sampler", ["pndm", "heun", "dpmpp_2m"])
def test_start_end_window_matches_diffusers(tiny_sd, nets, sd_one, sampler):
    """The window counts U-Net calls (len(timesteps)), as diffusers' `controlnet_keep`: Heun's
    second-order steps and PNDM's extra first steps included."""
    refs, _ = nets
    kw = dict(control_guidance_start=0.3, control_guidance_end=0.7)
    assert_same_picture(run_tinysd(sd_one, "txt2img", 1, sampler, **kw), run_reference(tiny_sd, "txt2img", refs[:1], sampler, **kw))


@pytest.mark.parametrize("kind, branch", [("txt2img", 0), ("img2img", 3)])
def test_deepcache_with_a_controlnet_matches_the_deepcache_package(tiny_sd, nets, sd_one, kind, branch):
    """DeepCache's shallow passes add the ControlNet's residuals to the skips they use (s_0..s_k),
    as diffusers' ControlNet pipeline does under the DeepCache package's DeepCacheSDHelper; and
    the cache changes the picture, so the comparison is not one of two plain runs."""
    pytest.importorskip("DeepCache")
    refs, _ = nets
    kw = dict(controlnet_conditioning_scale=0.8)
    ours = run_tinysd(sd_one, kind, 1, deepcache_interval=2, deepcache_branch=branch, **kw)
    assert_same_picture(ours, run_reference(tiny_sd, kind, refs[:1], deepcache=(2, branch), **kw))
    plain = run_tinysd(sd_one, kind, 1, **kw)[0]
    assert np.abs(ours[0] - plain).max() > 1e-2 * np.abs(plain).max()


def test_no_guidance_and_a_batch_of_images(tiny_sd, nets, sd_one):
    """guidance_scale 1 (no CFG batch) with two images per prompt."""
    refs, _ = nets
    kw = dict(guidance_scale=1.0, num_images_per_prompt=2)
    assert_same_picture(run_tinysd(sd_one, "txt2img", 1, **kw), run_reference(tiny_sd, "txt2img", refs[:1], **kw))


def test_nine_channel_inpainting_unet(tiny_inpaint_sd, nets):
    """The 9-channel inpainting U-Net with an ordinary (4-channel) ControlNet: the ControlNet sees
    the latents, the U-Net the latents, the mask and the masked image, as in diffusers."""
    refs, paths = nets
    sd = tinysd.load(tiny_inpaint_sd.folder, backend="numpy", controlnet=paths[0]["folder"])
    for strength in (1.0, 0.6):
        kw = dict(strength=strength, controlnet_conditioning_scale=0.9)
        assert_same_picture(run_tinysd(sd, "inpaint", 1, **kw), run_reference(tiny_inpaint_sd, "inpaint", refs[:1], **kw))


def test_control_image_sets_the_size(sd_one, nets, tiny_sd):
    """txt2img without height/width takes the control image's size, as diffusers does."""
    picture = np.zeros((48, 80, 3), np.uint8)
    out = sd_one(PROMPT, control_image=picture, num_inference_steps=1, seed=0, output_type="latent")
    assert out.images.shape == (1, 4, 6, 10)


def test_hires_fix_keeps_the_control_images_and_scales(sd_two):
    """The second pass runs with the same control images, now at twice the size, and the same
    conditioning scales as the first: given (0.7, 1.3) and by default 1.0, as A1111 keeps a
    unit's weight (an img2img call on its own defaults to 0.8)."""
    from test_bigger import hires_and_by_hand

    for scale in ((0.7, 1.3), None):
        settings = dict(num_inference_steps=2, seed=SEED, scheduler="euler", height=SIZE, width=SIZE,
                        control_image=control_pictures(2), controlnet_conditioning_scale=scale, output_type="latent")
        out, by_hand = hires_and_by_hand(sd_two, PROMPT, 2, 0.6, by_hand_settings=dict(
            controlnet_conditioning_scale=scale or 1.0), **settings)
        np.testing.assert_array_equal(out.images, by_hand)
        assert out.images.shape[2:] == (SIZE // 4, SIZE // 4)


def test_parameters_carry_a1111_controlnet_fields(sd_two, nets):
    from tinysd.pngmeta import infotext, parse_parameters

    _, paths = nets
    out = sd_two(PROMPT, control_image=control_pictures(2), num_inference_steps=2, seed=1, output_type="latent",
                 controlnet_conditioning_scale=[1.0, 0.5], control_guidance_end=[1.0, 0.8], control_preprocess=["canny", None])
    hash0 = cn.model_hash(paths[0]["single"])
    assert out.parameters["ControlNet 0"] == (
        f"Module: canny, Model: control_v11p_sd15_test0 [{hash0}], Weight: 1.0, Resize Mode: Just Resize, "
        "Low Vram: False, Processor Res: 64, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, "
        "Guidance End: 1.0, Pixel Perfect: True, Control Mode: Balanced")
    assert out.parameters["ControlNet 1"].startswith("Module: none, Model: control_v11p_sd15_test1 [")
    assert "Weight: 0.5" in out.parameters["ControlNet 1"] and "Guidance End: 0.8" in out.parameters["ControlNet 1"]
    text = infotext(PROMPT, "", out.parameters)
    assert text.splitlines()[-1].endswith(f'ControlNet 1: "{out.parameters["ControlNet 1"]}"')
    parsed = parse_parameters(text)
    assert parsed["ControlNet 0"] == out.parameters["ControlNet 0"] and parsed["Steps"] == 2


def test_preprocessor_in_the_pipeline_equals_canny_first(sd_one):
    """control_preprocess="canny" is the edge map of the resized picture, passed as the hint."""
    photo = make_image_and_mask()[0]
    a = sd_one(PROMPT, control_image=photo, control_preprocess="canny:50:120", num_inference_steps=2, seed=3,
               output_type="latent").images
    b = sd_one(PROMPT, control_image=hints.canny(photo, 50, 120), num_inference_steps=2, seed=3, output_type="latent").images
    np.testing.assert_array_equal(a, b)


HINT = np.zeros((64, 64, 3), np.uint8)
# (ControlNets loaded, arguments, exception, the message's fragment naming the argument and what is wrong)
BAD_CONTROL = {
    "no control_image": (1, dict(), ValueError, "pass control_image="),
    "control_image without a ControlNet": (0, dict(control_image=HINT), ValueError, "control_image needs a ControlNet"),
    "scale without a ControlNet": (0, dict(controlnet_conditioning_scale=0.5), ValueError,
                                   "controlnet_conditioning_scale needs a ControlNet"),
    "guess_mode without a ControlNet": (0, dict(guess_mode=True), ValueError, "guess_mode needs a ControlNet"),
    "control_image int": (1, dict(control_image=3), TypeError, r"control_image must be .* got 3 \(int\)"),
    "control_image channel-first": (1, dict(control_image=np.zeros((3, 64, 64), np.uint8)), ValueError,
                                    "control_image: an array of shape"),
    "more images than prompts": (1, dict(control_image=[HINT] * 3), ValueError, "3 control images for 1 prompt"),
    "one image for two nets": (2, dict(control_image=HINT), ValueError, "2 ControlNets need a list of 2 control images"),
    "lists for two nets": (2, dict(control_image=[[HINT], [HINT]]), ValueError, "one image per ControlNet"),
    "second net's image int": (2, dict(control_image=[HINT, 7]), TypeError, r"control_image\[1\] must be"),
    "scale string": (1, dict(control_image=HINT, controlnet_conditioning_scale="1"), TypeError,
                     "controlnet_conditioning_scale must be a number"),
    "scale nan": (1, dict(control_image=HINT, controlnet_conditioning_scale=float("nan")), ValueError,
                  "controlnet_conditioning_scale must be a finite number"),
    "scale list too long": (1, dict(control_image=HINT, controlnet_conditioning_scale=[1.0, 2.0]), ValueError,
                            r"controlnet_conditioning_scale=\[1.0, 2.0\] has 2 entries for 1 ControlNet"),
    "start string": (1, dict(control_image=HINT, control_guidance_start="0"), TypeError,
                     "control_guidance_start must be a number"),
    "end above 1": (1, dict(control_image=HINT, control_guidance_end=1.5), ValueError,
                    r"control_guidance_end must be in \[0, 1\]"),
    "empty window": (1, dict(control_image=HINT, control_guidance_start=0.5, control_guidance_end=0.5), ValueError,
                     "need 0 <= start < end <= 1"),
    "end list too short": (2, dict(control_image=[HINT, HINT], control_guidance_end=[1.0]), ValueError,
                           "control_guidance_end=\\[1.0\\] has 1 entries for 2 ControlNet"),
    "guess_mode string": (1, dict(control_image=HINT, guess_mode="yes"), TypeError, "guess_mode must be True or False"),
    "preprocess unknown": (1, dict(control_image=HINT, control_preprocess="sobel"), ValueError,
                           "unknown preprocessor 'sobel'"),
    "preprocess int": (1, dict(control_image=HINT, control_preprocess=3), TypeError, "control_preprocess must be"),
}


@pytest.fixture(scope="module")
def sd_by_count(sd, sd_one, sd_two):
    return {0: sd, 1: sd_one, 2: sd_two}


@pytest.mark.parametrize("case", list(BAD_CONTROL))
def test_bad_control_arguments_before_any_model_work(sd_by_count, forbid_model_work, case):
    """check_inputs names the bad ControlNet argument before the text encoder, the VAE or the
    denoising loop (where the ControlNets run) is called: each is replaced by a failure."""
    count, kwargs, error, message = BAD_CONTROL[case]
    pipe = forbid_model_work(sd_by_count[count])
    with pytest.raises(error, match=message):
        pipe(PROMPT, num_inference_steps=1, seed=0, **kwargs)


def test_unreadable_control_image_file(sd_one):
    with pytest.raises(ValueError, match="cannot read image"):
        sd_one(PROMPT, num_inference_steps=1, seed=0, control_image="/no/such/hint.png")


def test_load_and_unload(tiny_sd, nets):
    _, paths = nets
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    sd.load_controlnet(paths[0]["pth"])
    assert [n.name for n in sd.controlnets] == ["control_v11p_sd15_test0"]
    sd.unload_controlnet()
    assert sd(PROMPT, num_inference_steps=1, seed=0, output_type="latent").parameters.get("ControlNet 0") is None


def test_controlnet_for_another_model_is_refused_naming_both(tiny_sd, tmp_path):
    """A ControlNet of another width / cross-attention width (SD 2.x, SD-XL, another fine-tune
    family) is one error naming both, raised before anything is built."""
    from diffusers import UNet2DConditionModel
    from safetensors.numpy import save_file

    config = {k: v for k, v in tiny_sd.configs["unet"].items() if not k.startswith("_")}
    other = UNet2DConditionModel(**dict(config, cross_attention_dim=1024, block_out_channels=[32, 64, 64, 128]))
    ref = random_controlnet(other, seed=3)
    save_file({k: np.ascontiguousarray(v) for k, v in controlnet_to_original(numpy_state(ref)).items()},
              str(tmp_path / "control_sd21.safetensors"))
    ref.save_pretrained(tmp_path / "folder")
    for source in (tmp_path / "control_sd21.safetensors", tmp_path / "folder"):
        with pytest.raises(cn.ControlNetError) as err:
            tinysd.load(tiny_sd.folder, backend="numpy", controlnet=source)
        message = str(err.value)
        assert "cross-attention 1024 (SD 2.x)" in message and "widths 32/64/64/128" in message
        assert "widths 32/64/64/64" in message and "cross-attention 128" in message and "diffusers" in message


def test_sdxl_controlnet_is_refused_naming_both(tiny_sd, tmp_path):
    """An SD-XL-shaped ControlNet (3 levels, linear projections, 2 transformer layers, text_time
    embedding), written by diffusers: the error names it SD-XL and the model it does not fit."""
    from diffusers import ControlNetModel

    ControlNetModel(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D"), cross_attention_dim=64, transformer_layers_per_block=(1, 2, 2),
                    attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=112,
                    conditioning_embedding_out_channels=(16, 32)).save_pretrained(tmp_path / "xl")
    with pytest.raises(cn.ControlNetError, match=r"widths 32/64/64, .*\(SD-XL\)\) does not fit .*widths 32/64/64/64"):
        tinysd.load(tiny_sd.folder, backend="numpy", controlnet=tmp_path / "xl")


def test_a_controlnet_given_as_the_model_says_what_it_is(nets):
    _, paths = nets
    for source in (paths[0]["single"], paths[0]["pth"], paths[0]["folder"]):
        with pytest.raises(ValueError, match=r"is a ControlNet.*--control-net"):
            tinysd.load(source, backend="numpy")


def test_not_a_controlnet(tiny_sd):
    with pytest.raises(cn.ControlNetError, match="not a ControlNet"):
        cn.read_controlnet(tiny_sd.single_safetensors)
    with pytest.raises(cn.ControlNetError, match="no such file"):
        cn.read_controlnet("/no/such/controlnet.safetensors")


# -- preprocessors against OpenCV -------------------------------------------------------------------

def notebook_pictures():
    """Every PNG the committed notebooks show (generated pictures, plots with text and lines)."""
    from io import BytesIO

    from PIL import Image

    pictures = []
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            for output in cell.get("outputs", []):
                data = output.get("data", {}).get("image/png")
                if data:
                    pictures.append(np.asarray(Image.open(BytesIO(base64.b64decode(data))).convert("RGB")))
    return pictures


def synthetic_pictures():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:120, 0:161]
    return [
        (rng.random((97, 131, 3)) * 255).astype(np.uint8),                                    # noise
        ((np.sin(x / 7) + np.cos(y / 5)) * 60 + 128).astype(np.uint8),                         # smooth waves, grey
        np.stack([(x * 1.5) % 256, (y * 2) % 256, (x + y) % 256], -1).astype(np.uint8),      # gradients that wrap
        np.clip(rng.normal(128, 40, (64, 64, 3)), 0, 255).astype(np.uint8),
        np.full((16, 16, 3), 77, np.uint8),                                                  # flat: no edges
    ]


def test_canny_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    pictures = notebook_pictures()
    assert len(pictures) >= 10, "the notebooks' committed pictures"
    pictures += synthetic_pictures()
    equal = total = 0
    for picture in pictures:
        for low, high in ((100, 200), (50, 150), (20, 60), (200, 100), (30.7, 90.2)):
            ours, ref = hints.canny(picture, low, high), cv2.Canny(picture, low, high)
            equal += int((ours == ref).sum())
            total += ref.size
        gray = picture[..., 1].copy() if picture.ndim == 3 else picture
        ours, ref = hints.canny(gray, 100, 200), cv2.Canny(gray, 100, 200)
        equal += int((ours == ref).sum())
        total += ref.size
    assert equal / total >= 0.99
    assert equal == total, f"{total - equal} of {total} pixels differ from cv2.Canny"


def test_blur_and_tile_against_opencv():
    cv2 = pytest.importorskip("cv2")
    for picture in synthetic_pictures()[:3] + notebook_pictures()[:2]:
        for sigma in (0.8, 2.0, 5.0):
            diff = np.abs(hints.gaussian_blur(picture, sigma).astype(int) - cv2.GaussianBlur(picture, (0, 0), sigma))
            assert diff.max() <= 2 and diff.mean() < 0.3, (sigma, diff.max(), diff.mean())
        H, W = picture.shape[:2]
        for rate in (2.0, 3.0, 1.7):
            ref = cv2.resize(picture, (int(W / rate), int(H / rate)), interpolation=cv2.INTER_AREA)
            diff = np.abs(hints.tile(picture, rate).astype(int) - ref)
            assert diff.max() <= 1 and diff.mean() < 0.1, (rate, diff.max(), diff.mean())   # rounding only
    assert hints.tile(picture, 1.0) is picture


def test_invert_and_scribble():
    drawing = np.full((8, 8, 3), 250, np.uint8)
    drawing[2:4, 1:7] = (10, 10, 10)
    drawing[6, 6] = (250, 100, 250)
    np.testing.assert_array_equal(hints.invert(drawing), 255 - drawing)
    strokes = hints.scribble(drawing, 127)
    assert strokes.shape == (8, 8) and strokes.dtype == np.uint8
    assert (strokes[2:4, 1:7] == 255).all() and strokes[6, 6] == 255 and strokes.sum() == 255 * 13


@pytest.mark.parametrize("spec, expected", [("canny", ("canny", (100.0, 200.0))), ("canny:50:150", ("canny", (50.0, 150.0))),
                                            ("blur:3", ("blur", (3.0,))), ("none", ("none", ()))])
def test_preprocessor_names(spec, expected):
    assert hints.parse_preprocessor(spec) == expected


@pytest.mark.parametrize("spec", ["sobel", "canny:1:2:3", "blur:x"])
def test_bad_preprocessor_names(spec):
    with pytest.raises(ValueError, match="preprocessor"):
        hints.parse_preprocessor(spec)


# -- command line -----------------------------------------------------------------------------------

def test_cli_groups_pair_up_by_position():
    from tinysd.cli import parse_args

    args = parse_args(["a cat", "--control-net", "a", "--control-image", "a.png", "--control-scale", "0.5", "--steps", "3",
                       "--control-net", "b", "--control-end", "0.6", "--control-image", "b.png", "--control-preprocess",
                       "canny:50:100", "--guess-mode"])
    assert args.control_units == [
        {"control_net": "a", "control_image": "a.png", "control_scale": 0.5},
        {"control_net": "b", "control_end": 0.6, "control_image": "b.png", "control_preprocess": "canny:50:100"}]
    assert args.guess_mode and args.steps == 3
    assert parse_args(["a cat"]).control_units == []


@pytest.mark.parametrize("argv, message", [
    (["--control-image", "a.png", "--control-net", "a"], "--control-image must follow the --control-net"),
    (["--control-net", "a", "--control-image", "a.png", "--control-image", "b.png"], "--control-image given twice"),
    (["--control-net", "a"], "--control-net a: no --control-image after it"),
    (["--control-net", "a", "--control-image", "a.png", "--control-start", "0.5", "--control-end", "0.2"],
     "--control-start 0.5 must be below --control-end 0.2"),
    (["--control-net", "a", "--control-image", "a.png", "--control-end", "1.5"], "must be in \\[0, 1\\]"),
    (["--control-net", "a", "--control-image", "a.png", "--control-preprocess", "sobel"], "unknown preprocessor"),
    (["--guess-mode"], "--guess-mode needs a --control-net"),
])
def test_cli_control_usage_errors(argv, message, capsys):
    from tinysd.cli import main

    assert main(["a cat", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinysd: error: ")
    assert __import__("re").search(message, err[0]), err[0]


def test_cli_help_explains_the_pairing(capsys, monkeypatch):
    from tinysd.cli import main

    monkeypatch.setenv("COLUMNS", "300")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Each --control-net starts a ControlNet unit" in out and "--control-preprocess NAME" in out


def test_cli_draws_what_the_pipeline_draws(tiny_sd, nets, sd_one, tmp_path):
    from PIL import Image

    from tinysd.cli import main
    from tinysd.pngmeta import read_parameters

    _, paths = nets
    photo = tmp_path / "photo.png"
    Image.fromarray(make_image_and_mask()[0]).save(photo)
    out = tmp_path / "out.png"
    assert main(["a red circle", "--model", str(tiny_sd.folder), "--backend", "numpy", "--steps", "2", "--seed", "5",
                 "--control-net", str(paths[0]["folder"]), "--control-image", str(photo), "--control-preprocess", "canny",
                 "--control-scale", "0.7", "--control-end", "0.5", "-o", str(out)]) == 0
    expected = sd_one("a red circle", num_inference_steps=2, seed=5, control_image=Image.open(photo),
                      control_preprocess="canny", controlnet_conditioning_scale=0.7, control_guidance_end=0.5)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected.images[0]))
    params = read_parameters(out)
    assert params["ControlNet 0"] == expected.parameters["ControlNet 0"]
    assert params["ControlNet 0"].startswith("Module: canny, Model: controlnet-0 [")
    assert "Weight: 0.7" in params["ControlNet 0"] and "Guidance End: 0.5" in params["ControlNet 0"]


def test_cli_controlnet_as_the_model_is_one_line(nets, capsys):
    from tinysd.cli import main

    _, paths = nets
    assert main(["a cat", "--model", str(paths[0]["single"]), "--backend", "numpy"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a ControlNet" in err[0] and "--control-net" in err[0]


def test_cpu_backend_matches_diffusers(tiny_sd, nets):
    """The cpu backend's kernels run the ControlNet too (stride-2 hint convs, 1×1 zero convs)."""
    refs, paths = nets
    sd = tinysd.load(tiny_sd.folder, backend="cpu", controlnet=[paths[0]["folder"], paths[1]["single"]])
    kw = dict(controlnet_conditioning_scale=[0.9, 0.6], control_guidance_start=[0.0, 0.5])
    assert_same_picture(run_tinysd(sd, "txt2img", 2, **kw), run_reference(tiny_sd, "txt2img", refs, **kw))


# -- the shipped "shapes-canny" ControlNet ---------------------------------------------------------------

SHAPES_CANNY = cn.PACKAGED["shapes-canny"]


def test_shipped_controlnet_both_layouts_small_and_equal():
    """tinysd/data/shapes-canny/ (save_pretrained, fp16) and shapes-canny.safetensors (original
    layout): at most 10 MiB together, the same weights, and both load to the same latents."""
    from safetensors.numpy import load_file

    single = SHAPES_CANNY.with_suffix(".safetensors")
    size = sum(f.stat().st_size for f in SHAPES_CANNY.rglob("*") if f.is_file()) + single.stat().st_size
    assert size <= 10 * 2 ** 20, f"shapes-canny is {size / 2 ** 20:.1f} MiB in both layouts"
    folder = cn.read_controlnet("shapes-canny", tinysd.load("shapes", backend="numpy").unet.config)
    stored = load_file(str(single))
    assert stored.keys() == controlnet_to_original(folder.state).keys()
    assert all(np.array_equal(stored[k], v) for k, v in controlnet_to_original(folder.state).items())
    a = tinysd.load("shapes", backend="numpy", controlnet="shapes-canny")
    b = tinysd.load("shapes", backend="numpy", controlnet=str(single))
    edges = hints.canny(_scene("star", "yellow", "bottom"))
    kw = dict(control_image=edges, seed=3, num_inference_steps=6, output_type="latent")
    np.testing.assert_array_equal(a("a yellow star", **kw).images, b("a yellow star", **kw).images)


def _scene(shape, colour, position, background="gray"):
    import sys

    sys.path.insert(0, str(REPO / "training"))
    import shapes_data

    thing = shapes_data.make_thing(np.random.default_rng(0), shape, colour, position, "large")
    return shapes_data.render(shapes_data.Scene((thing,), background))


@pytest.mark.parametrize("shape, colour, position", [("circle", "red", "left"), ("square", "blue", "top"),
                                                     ("star", "yellow", "bottom"), ("triangle", "green", "right")])
def test_shipped_controlnet_places_the_object_where_the_edges_are(shape, colour, position):
    """The prompt says nothing about position; the edge map does (red circle on the left is a
    triple the training never saw; without the ControlNet position is right 17% of the time)."""
    import sys

    sys.path.insert(0, str(REPO / "training"))
    from evaluate_shapes import measure

    sd = tinysd.load("shapes", backend="numpy", controlnet="shapes-canny")
    hits = 0
    for seed in range(3):
        image = sd(f"a {colour} {shape}", control_image=_scene(shape, colour, position), control_preprocess="canny",
                   seed=seed, num_inference_steps=20, scheduler="dpmpp_2m", output_type="np").images[0]
        hits += measure((image * 255).round().astype(np.uint8))["position"] == position
    assert hits >= 2, f"{colour} {shape} edges on the {position}: drawn there {hits} of 3 times"


@pytest.mark.parametrize("damage", ["1-D hint conv", "no downsampler", "op at block 0", "truncated"])
def test_damaged_controlnet_files_are_one_clear_error(nets, tmp_path, damage):
    from safetensors.numpy import load_file, save_file

    _, paths = nets
    state = load_file(str(paths[0]["single"]))
    path = tmp_path / "damaged.safetensors"
    if damage == "1-D hint conv":
        state["control_model.input_hint_block.0.weight"] = np.zeros(3, np.float32)
    elif damage == "no downsampler":
        state = {k: v for k, v in state.items() if ".0.op." not in k}
    elif damage == "op at block 0":
        state["control_model.input_blocks.0.0.op.weight"] = np.zeros((1, 1, 3, 3), np.float32)
    save_file(state, str(path))
    if damage == "truncated":
        path.write_bytes(paths[0]["single"].read_bytes()[:5000])
    refs, _ = nets
    with pytest.raises(ValueError, match=path.name):
        cn.read_controlnet(path, dict(refs[0].config))
