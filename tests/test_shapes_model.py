"""The packaged "shapes" model (training/): loads offline by name, follows its prompt, and is
shipped in both published layouts (diffusers folder, original single file) that load the same."""
import sys
from pathlib import Path

import numpy as np
import pytest

import tinysd
from tinysd.weights import PACKAGED, load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from evaluate_shapes import measure  # noqa: E402
from reference_models import diffusers_to_original  # noqa: E402

SHAPES = PACKAGED["shapes"]
SINGLE_FILE = SHAPES.with_suffix(".safetensors")          # tinysd/data/shapes.safetensors
if not (SHAPES / "model_index.json").exists():
    pytest.skip(f"the packaged shapes model is not in {SHAPES}: run training/train_shapes.py", allow_module_level=True)


@pytest.fixture(scope="module")
def shapes(monkeypatch_module):
    return tinysd.load("shapes", backend="numpy")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")          # a packaged model never needs the hub
        yield mp


def test_packaged_folder_is_sd_v1_shaped_and_small():
    ckpt = load_checkpoint("shapes")
    unet = ckpt.configs["unet"]
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert unet["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert ckpt.configs["text_encoder"]["vocab_size"] == 49408
    assert ckpt.configs["text_encoder"]["hidden_act"] == "quick_gelu"
    assert ckpt.configs["vae"]["scaling_factor"] == 0.18215
    assert ckpt.tokenizer_dir is not None and (ckpt.tokenizer_dir / "merges.txt").exists()
    size = sum(f.stat().st_size for f in SHAPES.rglob("*") if f.is_file())
    assert size <= 30 * 2 ** 20, f"packaged model is {size / 2 ** 20:.1f} MiB"


@pytest.mark.parametrize("prompt, colour", [("a red circle", "red"), ("a blue square", "blue"),
                                            ("a yellow star on the right", "yellow")])
def test_colour_follows_prompt(shapes, prompt, colour):
    got = []
    for seed in range(3):
        image = shapes(prompt, seed=seed, num_inference_steps=20, guidance_scale=7.5, scheduler="dpmpp_2m",
                       output_type="np").images[0]
        got.append(measure((image * 255).round().astype(np.uint8))["colour"])
    assert got.count(colour) >= 2, f"{prompt!r}: object colours {got} over seeds 0-2"


def test_single_file_holds_the_folders_weights_and_gives_the_same_latents(shapes):
    from safetensors.numpy import load_file

    assert SINGLE_FILE.stat().st_size <= 30 * 2 ** 20
    expected = diffusers_to_original(load_checkpoint("shapes").state_dicts)
    stored = load_file(str(SINGLE_FILE))
    assert stored.keys() == expected.keys()
    assert all(stored[k].dtype == np.float16 and np.array_equal(stored[k], expected[k]) for k in expected)

    from_file = tinysd.load(str(SINGLE_FILE), backend="numpy")
    kwargs = dict(seed=7, num_inference_steps=8, height=64, width=64, output_type="latent")
    a = shapes("a green triangle at the top", **kwargs).images
    b = from_file("a green triangle at the top", **kwargs).images
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max())
