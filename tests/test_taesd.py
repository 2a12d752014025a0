"""TAESD (tinysd.taesd) against diffusers' AutoencoderTiny, every parameter randomised, in both
published layouts: the diffusers folder (madebyollin/taesd) and the original taesd_encoder /
taesd_decoder files (.safetensors and .pth), written here with the key mapping of diffusers'
convert_tiny_autoencoder_to_diffusers.py run backwards. Then TAESD in the pipeline: final
decodes against diffusers' StableDiffusionPipeline(vae=AutoencoderTiny), and the previews."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tinysd  # noqa: E402
from reference_models import randomize_  # noqa: E402
from tinysd.taesd import AutoencoderTiny, load_taesd, original_to_diffusers, preview_callback  # noqa: E402
from torch_util import assert_close, state_dict_numpy  # noqa: E402

PROMPT, SIZE, SEED = "a red circle on the left", 32, 1234


def diffusers_to_original(state, part):
    """AutoencoderTiny keys -> an original taesd_<part> file's (the converter's map, inverted)."""
    out = {}
    for key, value in state.items():
        if key.startswith(part + ".layers."):
            index, _, rest = key[len(part + ".layers."):].partition(".")
            out[f"{int(index) + (part == 'decoder')}.{rest}"] = value
    return out


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """A randomised AutoencoderTiny (TAESD's published config) saved in every layout."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("taesd")
    model = randomize_(diffusers.AutoencoderTiny(), seed=7).eval()
    model.save_pretrained(root / "diffusers")
    state = state_dict_numpy(model)
    files = {}
    for part in ("encoder", "decoder"):
        original = {k: np.ascontiguousarray(v) for k, v in diffusers_to_original(state, part).items()}
        files[part, "safetensors"] = root / "original" / f"taesd_{part}.safetensors"
        files[part, "safetensors"].parent.mkdir(exist_ok=True)
        save_file(original, str(files[part, "safetensors"]))
        files[part, "pth"] = root / "pth" / f"taesd_{part}.pth"
        files[part, "pth"].parent.mkdir(exist_ok=True)
        torch.save({k: torch.from_numpy(v) for k, v in original.items()}, files[part, "pth"])
    return model, root, files


def test_the_converter_mapping_round_trips(taesd):
    """Our original-file keys, mapped as diffusers' converter maps them, give back AutoencoderTiny's."""
    model, _, _ = taesd
    state = state_dict_numpy(model)
    mapped = {}
    for part in ("encoder", "decoder"):
        mapped.update(original_to_diffusers(diffusers_to_original(state, part), part))
    assert mapped.keys() == state.keys()
    ref = diffusers.AutoencoderTiny()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in mapped.items()})   # strict: every key fits


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference(model, method, x):
    with torch.no_grad():
        out = getattr(model, method)(torch.from_numpy(x))
    return (out.latents if method == "encode" else out.sample).numpy()


@pytest.mark.parametrize("layout", ["diffusers", "original safetensors", "original pth", "pair", "decoder only"])
def test_encoder_and_decoder_match_diffusers(taesd, layout):
    model, root, files = taesd
    source = {"diffusers": root / "diffusers", "original safetensors": root / "original",
              "original pth": root / "pth",
              "pair": (files["encoder", "pth"], files["decoder", "safetensors"]),
              "decoder only": files["decoder", "pth"]}[layout]
    ours = load_taesd(source, backend="numpy")
    z = rand(2, 4, 5, 3, seed=1) * 2              # odd sizes; |z| beyond 3 reaches the tanh clamp
    assert_close(ours.decode(z), reference(model, "decode", z), rtol=1e-4, name="decoder")
    if layout == "decoder only":
        assert ours.parts == ("decoder",)
        with pytest.raises(ValueError, match="no encoder"):
            ours.encode(rand(1, 3, 64, 64))
        return
    x = np.tanh(rand(2, 3, 32, 24, seed=2))
    assert_close(ours.encode(x), reference(model, "encode", x), rtol=1e-4, name="encoder")


def test_latent_scaling_for_images(taesd):
    model, root, _ = taesd
    ours = load_taesd(root / "diffusers", backend="numpy")
    z = rand(1, 4, 8, 8, seed=3) * 4
    scaled = ours.scale_latents(z)
    np.testing.assert_allclose(scaled, model.scale_latents(torch.from_numpy(z)).numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours.unscale_latents(scaled),
                               model.unscale_latents(torch.from_numpy(scaled)).numpy(), rtol=0, atol=1e-6)


def test_cpu_backend_matches(taesd):
    _, root, _ = taesd
    z = rand(1, 4, 8, 8, seed=4)
    expected = load_taesd(root / "diffusers", backend="numpy").decode(z)
    assert_close(load_taesd(root / "diffusers", backend="cpu").decode(z), expected, rtol=1e-4)


def test_cpu_relu_kernel_matches_its_numpy_twin():
    from tinysd.backend import get_backend
    from tinysd.kernels import elementwise

    cpu, ref = get_backend("cpu"), get_backend("numpy")
    x = rand(2, 5, 7, 9, seed=5)
    x[0, 0, 0, :4] = [0.0, -0.0, 1e-30, -1e-30]
    for inp in (x, x[:, :, ::2], x.astype(np.float64)):
        np.testing.assert_array_equal(cpu.relu(inp), ref.relu(inp))
    assert len(elementwise.relu_kernel.signatures) == 1


def test_bad_files(taesd, tiny_sd, tmp_path):
    _, root, files = taesd
    with pytest.raises(ValueError, match="not a TAESD file"):
        load_taesd(tiny_sd.single_safetensors)
    with pytest.raises(ValueError, match="two files hold the decoder"):
        load_taesd((files["decoder", "pth"], files["decoder", "safetensors"]))
    with pytest.raises(FileNotFoundError, match="no TAESD weights"):
        load_taesd(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_taesd(tmp_path / "absent" / "taesd.safetensors")


# In the pipeline


@pytest.fixture(scope="module")
def sd(tiny_sd, taesd):
    return tinysd.load(tiny_sd.folder, backend="numpy", taesd=taesd[1] / "diffusers")


def test_hires_fix_decodes_with_taesd(sd):
    """vae_decoder="taesd" decodes the hires fix's final latents with TAESD."""
    settings = dict(num_inference_steps=2, seed=3, scheduler="euler", enable_hr=True, hr_second_pass_steps=2,
                    denoising_strength=0.5)
    latents = sd(PROMPT, output_type="latent", **settings).images
    images = sd(PROMPT, output_type="np", vae_decoder="taesd", **settings).images
    np.testing.assert_array_equal(images, sd.decode(latents, decoder="taesd"))
    assert images.shape[1:3] == (8 * latents.shape[2], 8 * latents.shape[3])
    assert np.abs(images - sd.decode(latents)).max() > 0.01                   # not the full VAE's


def test_txt2img_decoded_by_taesd_matches_diffusers(tiny_sd, taesd, sd):
    """sd(..., vae_decoder="taesd") against StableDiffusionPipeline with vae=AutoencoderTiny."""
    components = dict(tiny_sd.pipe.components, vae=taesd[0])
    pipe = diffusers.StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = pipe(PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(SEED)).images
    out = sd(PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, seed=SEED, output_type="np",
             vae_decoder="taesd")
    mad = float(np.abs(out.images - expected).mean())
    assert mad <= 0.5 / 255, f"image mean abs difference {mad * 255:.3f}/255"
    latents = sd(PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, seed=SEED, output_type="latent").images
    np.testing.assert_array_equal(sd.decode(latents, decoder="taesd"), out.images)   # decode later, the same
    full = sd.decode(latents)
    assert np.abs(full - out.images).mean() > 5 / 255      # really another decoder (random weights)


def test_preview_writes_taesd_pictures_of_x0(sd, tmp_path):
    """Every k-th step (and the last) x̂₀ goes through TAESD; the final image stays the VAE's."""
    seen = []
    preview = preview_callback(sd, tmp_path / "step-{step}.png", every=2,
                               callback=lambda step, t, latents: seen.append(step))
    x0s = []
    out = sd(PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, seed=SEED, scheduler="euler",
             output_type="np", callback=lambda *a, pred_original_sample: (
                 preview(*a, pred_original_sample=pred_original_sample), x0s.append(pred_original_sample)))
    assert seen == [0, 1, 2, 3]
    assert [step for step, _ in preview.images] == [0, 2, 3]          # every 2nd, and the last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0.png", "step-2.png", "step-3.png"]
    for step, image in preview.images:
        expected = (sd.decode(x0s[step], decoder="taesd")[0] * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(image), expected)
    reference = sd(PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, seed=SEED, scheduler="euler",
                   output_type="np").images
    np.testing.assert_array_equal(out.images, reference)     # previews change nothing


def test_preview_with_the_models_own_vae(sd):
    preview = preview_callback(sd, every=3, decoder="vae")
    latents = sd(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, seed=SEED, scheduler="lcm",
                 guidance_scale=1.0, output_type="latent", callback=preview).images
    assert [step for step, _ in preview.images] == [0, 2]
    expected = (sd.decode(latents)[0] * 255).round().astype(np.uint8)   # LCM's last x̂₀ is its result
    np.testing.assert_array_equal(np.asarray(preview.images[-1][1]), expected)


def test_taesd_errors(tiny_sd, taesd):
    plain = tinysd.load(tiny_sd.folder, backend="numpy")
    with pytest.raises(ValueError, match="needs a TAESD"):
        plain(PROMPT, num_inference_steps=1, seed=0, vae_decoder="taesd")
    with pytest.raises(ValueError, match="needs a TAESD decoder"):
        preview_callback(plain)
    with pytest.raises(ValueError, match="choose 'taesd' or 'vae'"):
        preview_callback(plain, decoder="full")
    with pytest.raises(ValueError, match="vae_decoder"):
        plain(PROMPT, num_inference_steps=1, seed=0, vae_decoder="tiny")
    encoder_only = tinysd.load(tiny_sd.folder, backend="numpy", taesd=taesd[2]["encoder", "pth"])
    with pytest.raises(ValueError, match="needs a TAESD"):
        encoder_only(PROMPT, num_inference_steps=1, seed=0, vae_decoder="taesd")
    with pytest.raises(ValueError, match="every must be"):
        preview_callback(tinysd.load(tiny_sd.folder, backend="numpy", taesd=taesd[1] / "diffusers"), every=0)


def test_module_tree_is_named_after_the_keys():
    ours = dict(AutoencoderTiny().named_parameters())
    ref = state_dict_numpy(diffusers.AutoencoderTiny())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


# The command line


def test_cli_taesd_decodes_and_preview_leaves_the_vae_the_final_image(tiny_sd, taesd, sd, tmp_path, capsys):
    from PIL import Image
    from tinysd.cli import main

    def pixels(path):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    base = ["a cat", "--seed", "5", "--steps", "3", "-W", "32", "-H", "32", "--sampler", "euler", "--backend", "numpy",
            "--model", str(tiny_sd.folder), "--taesd", str(taesd[1] / "diffusers")]
    kw = dict(num_inference_steps=3, seed=5, height=32, width=32, scheduler="euler")
    assert main(base + ["-o", str(tmp_path / "fast.png")]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "fast.png"), np.asarray(sd("a cat", vae_decoder="taesd", **kw).images[0]))
    assert main(base + ["-o", str(tmp_path / "full.png"), "--preview", str(tmp_path / "live.png"), "--preview-every", "2"]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "full.png"), np.asarray(sd("a cat", **kw).images[0]))
    preview = preview_callback(sd, every=2)
    sd("a cat", callback=preview, **kw)
    assert [step for step, _ in preview.images] == [0, 2]
    np.testing.assert_array_equal(pixels(tmp_path / "live.png"), np.asarray(preview.images[-1][1]))   # the last one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.png", "full.png", "live.png"]


@pytest.mark.parametrize("extra, message", [
    (["--preview", "{tmp}/p.png"], "--preview needs --taesd"),
    (["--taesd", "{taesd}", "--preview", "{tmp}/p.jpg"], "must end in .png"),
    (["--taesd", "{taesd}", "--preview", "{tmp}/no/p.png"], "does not exist"),
    (["--taesd", "{tmp}/absent"], "no such file or folder"),
    (["--taesd", "{single}"], "not a TAESD file"),
    (["--taesd", "{taesd}", "--preview-every", "0"], "must be at least 1"),
])
def test_cli_taesd_errors(tiny_sd, taesd, tmp_path, capsys, monkeypatch, extra, message):
    from tinysd.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = [a.format(tmp=tmp_path, taesd=taesd[1] / "diffusers", single=tiny_sd.single_safetensors) for a in extra]
    assert main(["a cat", "--steps", "1", "--backend", "numpy", "--model", str(tiny_sd.folder),
                 "-o", str(tmp_path / "x.png")] + extra) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_lora_given_as_taesd_says_what_it_is(tmp_path):
    from safetensors.numpy import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), np.float32)},
              str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="not a TAESD file: it is a LoRA"):
        load_taesd(tmp_path / "lora.safetensors")
