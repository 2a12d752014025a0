"""Bad arguments to `StableDiffusion.__call__`: one TypeError or ValueError naming the argument and
its value, raised by `check_inputs` before any model work (the text encoder, the VAE and the U-Net
are replaced by functions that fail the test if called). Values diffusers takes and handles
sensibly (guidance_scale <= 1, an integral float size, a tuple of prompts) run as they do there.
"""
import numpy as np
import pytest

import tinysd
from tinysd.rng import Generator

PROMPT, SIZE = "a red circle", 64
IMAGE = np.zeros((SIZE, SIZE, 3), np.uint8)
MASK = np.zeros((SIZE, SIZE), np.uint8)


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tinysd.load(tiny_sd.folder, backend="numpy")


@pytest.fixture
def guarded(sd, forbid_model_work):
    """The pipeline with every piece of model work replaced by a failure."""
    return forbid_model_work(sd)


# (argument overrides, exception type, fragments the message must hold: the argument and the value)
BAD = {
    "prompt None": (dict(prompt=None), TypeError, ["prompt", "None"]),
    "prompt int": (dict(prompt=3), TypeError, ["prompt", "3 (int)"]),
    "prompt empty list": (dict(prompt=[]), ValueError, ["prompt", "[]"]),
    "prompt list of non-strings": (dict(prompt=["a cat", 3]), TypeError, ["prompt[1]", "3 (int)"]),
    "prompt lone surrogate": (dict(prompt="\ud800"), ValueError, ["prompt", r"'\ud800'", "index 0"]),
    "prompt list with a surrogate": (dict(prompt=["ok", "x\udc80"]), ValueError, ["prompt[1]", r"'\udc80'"]),
    "negative_prompt int": (dict(negative_prompt=3), TypeError, ["negative_prompt", "3 (int)"]),
    "negative_prompt list of non-strings": (dict(negative_prompt=[None]), TypeError, ["negative_prompt[0]", "None"]),
    "negative_prompt wrong length": (dict(negative_prompt=["x", "y"]), ValueError,
                                     ["negative_prompt", "['x', 'y']", "2 entries for 1 prompt"]),
    "negative_prompt lone surrogate": (dict(negative_prompt="\udfff"), ValueError, ["negative_prompt", r"'\udfff'"]),
    "num_inference_steps 0": (dict(num_inference_steps=0), ValueError, ["num_inference_steps", "got 0"]),
    "num_inference_steps negative": (dict(num_inference_steps=-3), ValueError, ["num_inference_steps", "-3"]),
    "num_inference_steps float": (dict(num_inference_steps=1.5), TypeError, ["num_inference_steps", "1.5 (float)"]),
    "num_inference_steps integral float": (dict(num_inference_steps=2.0), TypeError, ["num_inference_steps", "2.0"]),
    "num_inference_steps string": (dict(num_inference_steps="20"), TypeError, ["num_inference_steps", "'20'"]),
    "num_inference_steps over the schedule": (dict(num_inference_steps=1001), ValueError,
                                              ["num_inference_steps", "1001", "[1, 1000]"]),
    "guidance_scale nan": (dict(guidance_scale=float("nan")), ValueError, ["guidance_scale", "nan"]),
    "guidance_scale inf": (dict(guidance_scale=float("inf")), ValueError, ["guidance_scale", "inf"]),
    "guidance_scale -inf": (dict(guidance_scale=-float("inf")), ValueError, ["guidance_scale", "-inf"]),
    "guidance_scale string": (dict(guidance_scale="7.5"), TypeError, ["guidance_scale", "'7.5'"]),
    "guidance_scale None": (dict(guidance_scale=None), TypeError, ["guidance_scale", "None"]),
    "width 0": (dict(width=0), ValueError, ["width must be a positive multiple of 8", "got 0"]),
    "height 0": (dict(height=0), ValueError, ["height must be a positive multiple of 8", "got 0"]),
    "width negative": (dict(width=-64), ValueError, ["width", "-64"]),
    "width not a multiple of 8": (dict(width=60), ValueError, ["width", "60"]),
    "width string": (dict(width="64"), TypeError, ["width", "'64' (str)"]),
    "width bool": (dict(width=True), TypeError, ["width", "True (bool)"]),
    "height fractional": (dict(height=64.5), ValueError, ["height", "64.5"]),
    "height inf": (dict(height=float("inf")), ValueError, ["height", "inf"]),
    "seed negative": (dict(seed=-1), ValueError, ["seed", "-1", "[0, 2**64)"]),
    "seed float": (dict(seed=1.5), TypeError, ["seed", "1.5 (float)"]),
    "seed 2**64": (dict(seed=2 ** 64), ValueError, ["seed", str(2 ** 64)]),
    "seed string": (dict(seed="42"), TypeError, ["seed", "'42'"]),
    "seed bool": (dict(seed=True), TypeError, ["seed", "True (bool)"]),
    "generator int": (dict(generator=3), TypeError, ["generator", "3 (int)"]),
    "generator list": (dict(generator=[Generator(0)]), TypeError, ["generator", "list"]),
    "generator and seed": (dict(generator=Generator(0), seed=1), ValueError, ["seed=1", "generator"]),
    "latents wrong size": (dict(latents=np.zeros((1, 4, 4, 4))), ValueError, ["latents", "(1, 4, 4, 4)", "(1, 4, 8, 8)"]),
    "latents wrong batch": (dict(latents=np.zeros((2, 4, 8, 8))), ValueError, ["latents", "(2, 4, 8, 8)", "(1, 4, 8, 8)"]),
    "latents for fewer images": (dict(latents=np.zeros((1, 4, 8, 8)), num_images_per_prompt=3), ValueError,
                                 ["latents", "(1, 4, 8, 8)", "(3, 4, 8, 8)"]),
    "latents wrong channels": (dict(latents=np.zeros((1, 9, 8, 8))), ValueError, ["latents", "(1, 9, 8, 8)"]),
    "latents nan": (dict(latents=np.full((1, 4, 8, 8), np.nan)), ValueError, ["latents", "256 non-finite", "nan"]),
    "latents string": (dict(latents="noise"), TypeError, ["latents", "'noise'"]),
    "latents with image": (dict(latents=np.zeros((1, 4, 8, 8)), image=IMAGE), ValueError, ["latents", "image"]),
    "scheduler unknown": (dict(scheduler="warp_drive"), ValueError, ["scheduler", "'warp_drive'", "euler_a"]),
    "scheduler int": (dict(scheduler=3), TypeError, ["scheduler", "3 (int)"]),
    "eta negative": (dict(eta=-0.5), ValueError, ["eta", "-0.5", ">= 0"]),
    "eta nan": (dict(eta=float("nan")), ValueError, ["eta", "nan"]),
    "eta string": (dict(eta="0"), TypeError, ["eta", "'0'"]),
    "output_type unknown": (dict(output_type="jpeg"), ValueError, ["output_type", "'jpeg'", "'np'"]),
    "output_type None": (dict(output_type=None), ValueError, ["output_type", "None"]),
    "callback not callable": (dict(callback="print"), TypeError, ["callback", "'print' (str)"]),
    "image int": (dict(image=123), TypeError, ["image", "123 (int)", "PIL image"]),
    "image empty list": (dict(image=[]), ValueError, ["image is an empty list"]),
    "image channel-first": (dict(image=np.zeros((3, SIZE, SIZE), np.uint8)), ValueError,
                            ["image", "(3, 64, 64)", "(H, W, 3)", "transpose(1, 2, 0)"]),
    "image batched": (dict(image=np.zeros((1, SIZE, SIZE, 3), np.float32)), ValueError, ["image", "(1, 64, 64, 3)"]),
    "image int64 pixels": (dict(image=np.full((SIZE, SIZE, 3), 100)), TypeError, ["image", "int64", "uint8"]),
    "image nan pixels": (dict(image=np.full((SIZE, SIZE, 3), np.nan, np.float32)), ValueError, ["image", "nan"]),
    "image empty": (dict(image=np.zeros((0, SIZE, 3), np.uint8)), ValueError, ["image", "(0, 64, 3)"]),
    "image 1x1": (dict(image=np.zeros((1, 1, 3), np.uint8), height=None, width=None), ValueError,
                  ["image is 1x1 pixels", "height= and width="]),
    "image missing file": (dict(image="{tmp}/absent.png"), ValueError, ["image", "absent.png"]),
    "strength without image": (dict(strength=0.5), ValueError, ["strength=0.5", "image="]),
    "strength 1.5 without image": (dict(strength=1.5), ValueError, ["strength", "1.5", "[0, 1]"]),
    "strength above 1": (dict(image=IMAGE, strength=1.5), ValueError, ["strength must be in [0, 1]", "1.5"]),
    "strength negative": (dict(image=IMAGE, strength=-0.1), ValueError, ["strength", "-0.1"]),
    "strength nan": (dict(image=IMAGE, strength=float("nan")), ValueError, ["strength", "nan"]),
    "strength string": (dict(image=IMAGE, strength="0.5"), TypeError, ["strength", "'0.5'"]),
    "strength leaves no step": (dict(image=IMAGE, strength=0.1, scheduler="ddim"), ValueError,
                                ["strength 0.1 with 2 steps", "no denoising step"]),
    "default strength leaves no step": (dict(image=IMAGE, scheduler="euler", num_inference_steps=1), ValueError,
                                        ["strength 0.8 with 1 steps"]),
    "mask_image without image": (dict(mask_image=MASK), ValueError, ["mask_image", "image="]),
    "mask_image int": (dict(image=IMAGE, mask_image=123), TypeError, ["mask_image", "123 (int)"]),
    "mask_image channel-first": (dict(image=IMAGE, mask_image=np.zeros((1, SIZE, SIZE), np.float32)), ValueError,
                                 ["mask_image", "(1, 64, 64)", "transpose"]),
    "mask_image bool pixels": (dict(image=IMAGE, mask_image=MASK > 0), TypeError, ["mask_image", "bool"]),
    "num_images_per_prompt 0": (dict(num_images_per_prompt=0), ValueError, ["num_images_per_prompt", "got 0"]),
    "num_images_per_prompt negative": (dict(num_images_per_prompt=-1), ValueError, ["num_images_per_prompt", "-1"]),
    "num_images_per_prompt float": (dict(num_images_per_prompt=1.5), TypeError, ["num_images_per_prompt", "1.5"]),
    "num_images_per_prompt None": (dict(num_images_per_prompt=None), TypeError, ["num_images_per_prompt", "None"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument_is_named_before_any_model_work(guarded, case, tmp_path):
    overrides, error, fragments = BAD[case]
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent")
    kwargs.update({k: v.format(tmp=tmp_path) if isinstance(v, str) and "{tmp}" in v else v
                   for k, v in overrides.items()})
    with pytest.raises(error) as e:
        guarded(**kwargs)
    message = str(e.value)
    assert type(e.value) is error, f"{type(e.value).__name__}: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_the_first_bad_argument_in_signature_order_is_reported(guarded):
    with pytest.raises(TypeError, match="^prompt"):
        guarded(None, num_inference_steps=0, width=3, seed=-1)
    with pytest.raises(ValueError, match="^num_inference_steps"):
        guarded(PROMPT, num_inference_steps=0, width=3, seed=-1)


# -- values diffusers takes, taken the same way ----------------------------------------------------------
def latents_of(sd, **kwargs):
    args = dict(num_inference_steps=1, seed=5, height=SIZE, width=SIZE, scheduler="euler", output_type="latent")
    args.update(kwargs)
    return sd(args.pop("prompt", PROMPT), **args)


@pytest.mark.parametrize("guidance_scale", [1, 0, -2.5, np.float32(1.0)])
def test_guidance_at_most_one_turns_guidance_off(sd, guidance_scale):
    """diffusers: `do_classifier_free_guidance = guidance_scale > 1`; nothing else changes."""
    np.testing.assert_array_equal(latents_of(sd, guidance_scale=guidance_scale).images,
                                  latents_of(sd, guidance_scale=1.0).images)


def test_sizes_steps_and_seeds_of_other_number_types(sd):
    reference = latents_of(sd)
    for kwargs in (dict(height=64.0, width=np.float64(64)), dict(seed=np.int64(5)),
                   dict(num_inference_steps=np.int32(1)), dict(num_images_per_prompt=np.int8(1))):
        out = latents_of(sd, **kwargs)
        np.testing.assert_array_equal(out.images, reference.images, err_msg=str(kwargs))
        assert out.parameters["Size"] == "64x64" and out.parameters["Seed"] == 5


def test_prompt_forms(sd):
    as_list = latents_of(sd, prompt=[PROMPT, ""], negative_prompt=["blurry", "dark"]).images
    np.testing.assert_array_equal(latents_of(sd, prompt=(PROMPT, ""), negative_prompt=("blurry", "dark")).images,
                                  as_list)
    np.testing.assert_array_equal(latents_of(sd, negative_prompt=["blurry"]).images,
                                  latents_of(sd, negative_prompt="blurry").images)


def test_largest_seed_and_given_latents(sd):
    assert latents_of(sd, seed=2 ** 64 - 1).seed == 2 ** 64 - 1
    start = Generator(5).randn((2, 4, SIZE // 8, SIZE // 8))
    np.testing.assert_array_equal(latents_of(sd, latents=start, num_images_per_prompt=2).images,
                                  latents_of(sd, num_images_per_prompt=2).images)
