"""A standalone VAE in place of the model's own (`tinysd.load(model, vae=...)`, `--vae`), against
diffusers' `AutoencoderKL.from_single_file` / `from_pretrained` given to its pipeline; what a file
is when it is not a model; txt2img on a 9-channel inpainting model as A1111 runs it."""
import hashlib

import numpy as np
import pytest

import tinysd
from tinysd.cli import main
from tinysd.pngmeta import read_parameters
from torch_util import assert_close

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from reference_models import (TINY_VAE, diffusers_to_original, numpy_state, randomize_,  # noqa: E402
                              sd15_config)

PROMPT, SIZE, STEPS, SEED = "a red circle", 64, 3, 11


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A second random tiny VAE, written as vae-ft-mse-840000-ema-pruned is published (original
    names, .safetensors and a Lightning-style .ckpt with `loss.*` and `model_ema.*` leftovers)
    and as a diffusers `vae/` folder."""
    out = tmp_path_factory.mktemp("vae")
    cfg = sd15_config("vae")
    cfg.update(TINY_VAE)
    vae = randomize_(diffusers.AutoencoderKL.from_config(cfg), 77).eval()
    original = {k[len("first_stage_model."):]: np.ascontiguousarray(v) for k, v in
                diffusers_to_original({"vae": numpy_state(vae), "unet": {}, "text_encoder": {}}).items()}
    from safetensors.numpy import save_file
    save_file(original, str(out / "other-vae.safetensors"))
    leftovers = {"loss.logvar": np.zeros(()), "model_ema.decay": np.array(0.9999, np.float32),
                 "model_ema.num_updates": np.array(7, np.int32)}
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in {**original, **leftovers}.items()}},
               out / "other-vae.ckpt")
    vae.save_pretrained(out / "vae")
    return vae, out


def reference_image(tiny, vae):
    pipe = diffusers.StableDiffusionPipeline(**{**tiny.pipe.components, "vae": vae})
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(SEED))
    return out.images


@pytest.mark.parametrize("form", ["other-vae.safetensors", "other-vae.ckpt", "vae"])
def test_swapped_vae_gives_diffusers_picture(tiny_sd, other_vae, form):
    vae, folder = other_vae
    path = folder / form
    if form == "vae":
        reference_vae = diffusers.AutoencoderKL.from_pretrained(path)
    else:
        reference_vae = diffusers.AutoencoderKL.from_single_file(str(path), config=str(tiny_sd.folder), subfolder="vae")
    for (name, ours), theirs in zip(reference_vae.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(ours, theirs), name           # the reference read the file right
    sd = tinysd.load(tiny_sd.folder, backend="numpy", vae=path)
    z = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = reference_vae.decode(torch.from_numpy(z)).sample.numpy()
    assert_close(sd.vae.decode(z), expected, name="decode")
    ours = sd(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, seed=SEED, output_type="np").images
    theirs = reference_image(tiny_sd, reference_vae)
    assert np.abs(ours - theirs).mean() * 255 <= 0.5
    assert np.abs(ours - reference_image(tiny_sd, tiny_sd.vae)).mean() * 255 > 5    # the swap shows


def test_cli_vae_writes_a1111_fields(tiny_sd, other_vae, tmp_path):
    path = other_vae[1] / "other-vae.safetensors"
    out = tmp_path / "x.png"
    assert main([PROMPT, "--model", str(tiny_sd.folder), "--vae", str(path), "--backend", "numpy", "--steps", "2",
                 "--seed", "1", "-o", str(out)]) == 0
    params = read_parameters(out)
    assert params["VAE"] == "other-vae.safetensors"
    assert params["VAE hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]


def test_bad_vae_files(tiny_sd, other_vae, tmp_path):
    from safetensors.numpy import save_file
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": np.zeros((4, 4, 3, 3), np.float32)}, str(lora))
    with pytest.raises(ValueError, match="not a VAE: it is a LoRA"):
        tinysd.load(tiny_sd.folder, backend="numpy", vae=lora)
    with pytest.raises(FileNotFoundError, match="no such file"):
        tinysd.load(tiny_sd.folder, backend="numpy", vae=tmp_path / "absent.safetensors")
    vae = {k: np.ascontiguousarray(v) for k, v in tiny_sd.original.items() if k.startswith("first_stage_model.")}
    wide = dict(vae, **{"first_stage_model.post_quant_conv.weight": np.zeros((8, 8, 1, 1), np.float32)})
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="its latents have 8 channels, the model's U-Net works on 4"):
        tinysd.load(tiny_sd.folder, backend="numpy", vae=tmp_path / "wide.safetensors")
    key = "first_stage_model.decoder.mid.block_1.conv1.weight"
    odd = dict(vae, **{key: np.zeros((64, 32, 3, 3), np.float32)})
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match=r"'decoder.mid_block.resnets.0.conv1.weight' has shape \(64, 32, 3, 3\)"):
        tinysd.load(tiny_sd.folder, backend="numpy", vae=tmp_path / "odd.safetensors")


@pytest.mark.parametrize("name, state, what", [
    ("vae.safetensors", None, "is a standalone VAE, not a Stable Diffusion model: pass it with --vae"),
    ("lora.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32, 1, 1)},
     "is a LoRA, not a Stable Diffusion model: pass it with --lora"),
    ("easyneg.safetensors", {"emb_params": (8, 768)}, "is a textual-inversion embedding"),
    ("learned_embeds.safetensors", {"<cat-toy>": (768,)}, "is a textual-inversion embedding"),
    ("canny.safetensors", {"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "is a ControlNet"),
    ("taesd_decoder.safetensors", {"1.weight": (64, 4, 3, 3), "3.conv.0.weight": (64, 64, 3, 3)}, "is a TAESD"),
    ("sdxl.safetensors", {"conditioner.embedders.0.transformer.x": (2,)}, "is an SD-XL checkpoint"),
])
def test_a_file_that_is_not_a_model_says_what_it_is(tiny_sd, other_vae, tmp_path, capsys, name, state, what):
    from safetensors.numpy import save_file
    path = tmp_path / name
    if state is None:
        path = other_vae[1] / "other-vae.safetensors"
    else:
        save_file({k: np.zeros(shape, np.float32) for k, shape in state.items()}, str(path))
    with pytest.raises(ValueError, match=what):
        tinysd.load(path, backend="numpy")
    assert main(["x", "--model", str(path), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0]


def test_a1111_textual_inversion_pt_as_model_says_what_it_is(tmp_path):
    path = tmp_path / "easyneg.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(8, 768)},
                "name": "easyneg", "step": 100}, path)
    with pytest.raises(ValueError, match="is a textual-inversion embedding"):
        tinysd.load(path, backend="numpy")


def test_txt2img_on_inpainting_model_is_a1111s(tiny_inpaint_sd):
    """A1111 runs txt2img on a 9-channel model with everything masked and a mid-grey masked
    image: tinysd's inpainting given exactly that, and diffusers' inpainting pipeline too.

    The masked-image latent is the VAE encoding of a constant picture, where every GroupNorm
    divides by a near-zero spread: float32 rounding grows there (diffusers' own float32 encoding
    is 2.4e-5 from float64 on this model) and guidance amplifies it, so against diffusers the
    final picture is held to the pipeline bound (0.5/255) and the encoding, against a float64
    reference, to the module bound; the latents to 2e-2 relative, not 1e-3.
    """
    sd = tinysd.load(tiny_inpaint_sd.folder, backend="numpy")
    ours = sd(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, seed=SEED, output_type="latent")
    assert ours.parameters["Denoising strength"] is None
    grey, white = np.full((SIZE, SIZE, 3), 0.5, np.float32), np.ones((SIZE, SIZE), np.float32)
    explicit = sd(PROMPT, image=grey, mask_image=white, num_inference_steps=STEPS, seed=SEED, output_type="latent")
    np.testing.assert_array_equal(ours.images, explicit.images)

    pipe = diffusers.StableDiffusionInpaintPipeline(**tiny_inpaint_sd.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    args = dict(image=grey[None], mask_image=white[None, :, :, None], num_inference_steps=STEPS, height=SIZE,
                width=SIZE, strength=1.0)
    with torch.no_grad():
        expected = pipe(PROMPT, output_type="latent", generator=torch.Generator("cpu").manual_seed(SEED), **args)
        image = pipe(PROMPT, output_type="np", generator=torch.Generator("cpu").manual_seed(SEED), **args).images
        grey_f64 = torch.zeros(1, 3, SIZE, SIZE, dtype=torch.float64)
        mean_f64 = tiny_inpaint_sd.vae.double().encode(grey_f64).latent_dist.mean.numpy()
    tiny_inpaint_sd.vae.float()
    assert_close(sd.vae.encode(np.zeros((1, 3, SIZE, SIZE), np.float32)).mean, mean_f64, name="encoded grey")
    assert_close(ours.images, expected.images.numpy(), rtol=2e-2, name="latents")
    assert np.abs(sd.decode(ours.images) - image).mean() * 255 <= 0.5
