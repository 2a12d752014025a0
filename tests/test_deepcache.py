"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free") against its
package: tinysd's `deepcache_interval` / `deepcache_branch` vs `DeepCacheSDHelper` of the PyPI
package DeepCache (0.1.1, DeepCache/extension/deepcache.py) wrapping diffusers' own
StableDiffusionPipeline, on the seeded tiny SD v1 model of conftest.py: same prompt, seed,
sampler and steps; latents within 1e-3 relative, images within 0.5/255.

The helper wraps every ResNet, Transformer, down/up-sampler and block of diffusers' U-Net: on a
step that is not a full one, a module past the branch returns its output of the last full step
instead of running. It counts a U-Net call at timestep t as step `scheduler.timesteps.index(t)`
(so Heun's and PLMS's repeated timesteps count as one step) and runs the full U-Net when
(step − first step) % cache_interval == 0. Each test also checks the sequence of full and shallow
U-Net calls itself, on both sides, so a wrong schedule cannot hide behind a small difference.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
deepcache = pytest.importorskip("DeepCache")

import tinysd  # noqa: E402
from tinysd.cli import main  # noqa: E402
from tinysd.pngmeta import read_parameters  # noqa: E402
from torch_util import assert_close  # noqa: E402

SCHEDULERS = {"dpmpp_2m": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler", "heun": "HeunDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler"}
PROMPT, NEGATIVE = "a red circle on the left", "blurry"
SIZE, SEED = 64, 1234


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return tinysd.load(tiny_sd.folder, backend="numpy")


def reference_pipe(tiny, sampler, img2img=False):
    components = dict(tiny.pipe.components)
    saved = diffusers.PNDMScheduler.from_pretrained(tiny.folder, subfolder="scheduler").config
    components["scheduler"] = getattr(diffusers, SCHEDULERS[sampler]).from_config(saved)
    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_image():
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    return (np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1) * 255).round().astype(np.uint8)


def run_reference(tiny, sampler, steps, interval, branch, guidance_scale=7.5, img2img=False):
    """(latents, image, "F"/"S" per U-Net call: did the mid block run) from diffusers + DeepCacheSDHelper."""
    from PIL import Image

    pipe = reference_pipe(tiny, sampler, img2img)
    calls = []
    hooks = [pipe.unet.conv_in.register_forward_hook(lambda *_: calls.append("S")),
             # inside the mid block: the helper's wrapper returns the cached block output without calling it
             pipe.unet.mid_block.resnets[0].register_forward_hook(lambda *_: calls.__setitem__(-1, "F"))]
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    args = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent")
    if img2img:
        args.update(image=Image.fromarray(init_image()), strength=0.75)
    else:
        args.update(height=SIZE, width=SIZE)
    try:
        with torch.no_grad():
            latents = pipe(**args).images
    finally:
        helper.disable()
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return latents.numpy(), (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), "".join(calls)


class Recorder:
    """Wraps a tinysd module: appends to `calls` on every call ("S"), or marks the last call "F"."""

    def __init__(self, module, calls, mark):
        self.module, self.calls, self.mark = module, calls, mark

    def __call__(self, *args, **kwargs):
        if self.mark:
            self.calls[-1] = "F"
        else:
            self.calls.append("S")
        return self.module(*args, **kwargs)


def run_tinysd(sd, sampler, steps, interval, branch, guidance_scale=7.5, img2img=False, monkeypatch=None):
    calls = []
    monkeypatch.setattr(sd.unet, "conv_in", Recorder(sd.unet.conv_in, calls, mark=False))
    monkeypatch.setattr(sd.unet, "mid_block", Recorder(sd.unet.mid_block, calls, mark=True))
    args = dict(negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance_scale, seed=SEED,
                scheduler=sampler, output_type="latent", deepcache_interval=interval, deepcache_branch=branch)
    if img2img:
        args.update(image=init_image(), strength=0.75)
    else:
        args.update(height=SIZE, width=SIZE)
    out = sd(PROMPT, **args)
    monkeypatch.undo()
    return out, sd.decode(out.images), "".join(calls)


def assert_same_picture(ours, reference):
    (lat, img), (ref_lat, ref_img) = ours, reference
    assert_close(lat, ref_lat, rtol=1e-3, name="final latents")
    mad = float(np.abs(img - ref_img).mean())
    assert mad <= 0.5 / 255, f"final image mean abs difference {mad * 255:.3f}/255 > 0.5/255"


# (sampler, steps, interval, branch, expected full (F) / shallow (S) U-Net calls, options)
CASES = {
    "interval 2, branch 0": ("dpmpp_2m", 6, 2, 0, "FSFSFS", {}),
    "interval 3, branch 0": ("dpmpp_2m", 7, 3, 0, "FSSFSSF", {}),
    "interval 2, branch 1": ("dpmpp_2m", 6, 2, 1, "FSFSFS", {}),
    "interval 3, branch 1": ("dpmpp_2m", 7, 3, 1, "FSSFSSF", {}),
    "interval 3, branch 2 (the first level's last)": ("dpmpp_2m", 5, 3, 2, "FSSFS", {}),
    "interval 3, branch 4 (inside the second level)": ("euler_a", 5, 3, 4, "FSSFS", {}),
    "interval 3, branch 11 (the deepest: caches the mid block)": ("dpmpp_2m", 5, 3, 11, "FSSFS", {}),
    "no guidance (batch 1)": ("dpmpp_2m", 5, 2, 0, "FSFSF", {"guidance_scale": 1.0}),
    # PLMS's timesteps are [t0, t1, t1, t2, t3, t4]: its calls are steps 0, 1, 1, 3, 4, 5
    "PLMS, interval 2": ("pndm", 5, 2, 0, "FSSSFS", {}),
    # Heun calls the U-Net twice per step at repeated timesteps [t0, t1, t1, t2, t2, ...]: the calls are
    # steps 0, 1, 1, 3, 3, 5, 5, so with interval 2 only the first call is a full one (as the package does)
    "Heun, interval 2": ("heun", 4, 2, 0, "FSSSSSS", {}),
    "Heun, interval 3": ("heun", 4, 3, 1, "FSSFFSS", {}),
    # img2img starts at step 2 of 7: the package counts from there
    "img2img, interval 3": ("dpmpp_2m", 7, 3, 0, "FSSFS", {"img2img": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_deepcache_package(tiny_sd, sd, case, monkeypatch):
    sampler, steps, interval, branch, pattern, options = CASES[case]
    ref_latents, ref_image, ref_calls = run_reference(tiny_sd, sampler, steps, interval, branch, **options)
    out, image, calls = run_tinysd(sd, sampler, steps, interval, branch, monkeypatch=monkeypatch, **options)
    assert ref_calls == pattern, f"the package ran {ref_calls}"
    assert calls == pattern
    assert_same_picture((out.images, image), (ref_latents, ref_image))
    assert (out.parameters["DeepCache interval"], out.parameters["DeepCache branch"]) == (interval, branch)


def test_deepcache_changes_the_picture_and_interval_1_does_not(sd):
    """The cached features are stale on purpose: a shallow step differs from a full one (so the
    parity above is not trivial), and with interval 1 every step is a full one."""
    args = dict(num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE, seed=SEED, scheduler="dpmpp_2m",
                output_type="latent")
    plain = sd(PROMPT, **args).images
    assert np.abs(sd(PROMPT, deepcache_interval=2, **args).images - plain).max() > 0.05 * np.abs(plain).max()
    np.testing.assert_array_equal(sd(PROMPT, deepcache_interval=1, deepcache_branch=5, **args).images, plain)
    assert "DeepCache interval" not in sd(PROMPT, **args).parameters


def test_full_and_shallow_passes_equal_the_plain_forward(sd):
    """unet(x) = shallow pass of x on the deep features u_k of x itself, at every branch k."""
    unet = sd.unet
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 10, 6)).astype(np.float32)        # odd sizes below: up-sampling crops
    context = rng.standard_normal((2, 77, unet.config["cross_attention_dim"])).astype(np.float32)
    plain = unet(x, 500, context)
    assert unet.num_skips == 12
    for k in range(unet.num_skips):
        eps, features = unet(x, 500, context, cache_branch=k)
        np.testing.assert_array_equal(eps, plain)
        eps, same = unet(x, 500, context, cache_branch=k, cached=features)
        np.testing.assert_array_equal(eps, plain)
        assert same is features


def test_unet_rejects_a_bad_branch(sd):
    x, context = np.zeros((1, 4, 8, 8), np.float32), np.zeros((1, 77, sd.unet.config["cross_attention_dim"]), np.float32)
    with pytest.raises(ValueError, match=r"cache_branch must be in \[0, 11\].*got 12"):
        sd.unet(x, 1, context, cache_branch=12)
    with pytest.raises(ValueError, match="cache_branch"):
        sd.unet(x, 1, context, cached=x)


BAD = {
    "interval 0": (dict(deepcache_interval=0), ValueError, ["deepcache_interval", "got 0"]),
    "interval float": (dict(deepcache_interval=2.5), TypeError, ["deepcache_interval", "2.5 (float)"]),
    "interval bool": (dict(deepcache_interval=True), TypeError, ["deepcache_interval", "True (bool)"]),
    "branch past the U-Net": (dict(deepcache_interval=3, deepcache_branch=12), ValueError,
                              ["deepcache_branch", "from 0 to 11", "got 12"]),
    "branch negative": (dict(deepcache_interval=3, deepcache_branch=-1), ValueError, ["deepcache_branch", "-1"]),
    "branch string": (dict(deepcache_interval=3, deepcache_branch="1"), TypeError, ["deepcache_branch", "'1' (str)"]),
    "branch without interval": (dict(deepcache_branch=2), ValueError, ["deepcache_branch=2", "deepcache_interval"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_argument_is_named_before_any_model_work(sd, case, forbid_model_work):
    forbid_model_work(sd)
    overrides, error, fragments = BAD[case]
    with pytest.raises(error) as info:
        sd(PROMPT, num_inference_steps=2, height=SIZE, width=SIZE, **overrides)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_cli_flags_reach_the_pipeline_and_the_png(tiny_sd, sd, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "cat.png"
    assert main(["a cat", "--seed", "5", "--model", str(tiny_sd.folder), "--backend", "numpy", "-W", "64", "-H", "64",
                 "--steps", "4", "--sampler", "dpmpp_2m", "--deepcache", "3", "--deepcache-branch", "1",
                 "-o", str(out)]) == 0
    p = read_parameters(out)
    assert (p["DeepCache interval"], p["DeepCache branch"]) == ("3", "1")
    expected = sd("a cat", num_inference_steps=4, height=64, width=64, seed=5, scheduler="dpmpp_2m",
                  deepcache_interval=3, deepcache_branch=1).images[0]
    with Image.open(out) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(expected))


def test_cli_branch_needs_an_interval(capsys):
    assert main(["a cat", "--deepcache-branch", "1"]) == 2
    assert capsys.readouterr().err.strip() == "tinysd: error: --deepcache-branch needs --deepcache N"
