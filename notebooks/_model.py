"""The model the notebooks run on: SD v1.5 where its weights are on this machine, else a tiny one.

    from _model import load_demo
    demo = load_demo()        # demo.sd (a tinysd.StableDiffusion), demo.real, demo.size, demo.steps

SD v1.5 is used when `tinysd.weights.resolve` finds it already downloaded (nothing is fetched).
Otherwise the notebooks run on a tiny SD-v1-shaped model with seeded random weights: the same
block types, depths and head count as SD v1, widths divided by 10-40. It is written once, with
NumPy only, as a diffusers folder (configs + safetensors) under ~/.cache/tinysd/, and loaded
with `tinysd.load` like any checkpoint. Random weights draw noise, so its pictures show the
mechanics (shapes, schedules, which step changes what), not a cat.

TINYSD_NOTEBOOK_MODEL=tiny forces the tiny model (the tests set it); a model id, folder or file
in it is loaded instead of SD v1.5.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tinysd
from tinysd.text_encoder import CLIPTextModel
from tinysd.tokenizer import CLIPTokenizer
from tinysd.unet import UNet2DConditionModel
from tinysd.vae import AutoencoderKL

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_CONFIGS = Path(tinysd.__file__).parent / "data" / "sd-v1-5"
CACHE = Path(os.environ.get("TINYSD_CACHE", Path.home() / ".cache" / "tinysd"))
TINY_NAME = "tiny-random-sd-v1"

# SD v1.5's configs with narrower widths (the test suite's tiny models use the same numbers);
# sample_size 8 makes 8×8 latents, 64×64 pictures.
TINY = {
    "unet": dict(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, sample_size=8),
    "vae": dict(block_out_channels=[32, 64, 64, 64], sample_size=64),
    "text_encoder": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, projection_dim=32),
}
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}
MODELS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}


@dataclass
class Demo:
    sd: object          # tinysd.StableDiffusion
    real: bool          # a real checkpoint (SD v1.5, or TINYSD_NOTEBOOK_MODEL's), not the tiny random model
    name: str           # where the weights came from
    size: int           # picture side in pixels (512 for SD v1.5, 64 for the tiny model)
    steps: int          # sampler steps the notebooks use

    def describe(self):
        if self.real and self.name == SD15:
            return f"Running on trained SD v1.5 weights ({SD15}, from the Hugging Face cache)."
        if self.real:
            return f"Running on the checkpoint {self.name} (TINYSD_NOTEBOOK_MODEL)."
        return (f"Running on a tiny SD-v1-shaped model with seeded random weights ({self.name}, "
                f"{self.sd.unet.num_parameters() / 1e6:.1f} M U-Net parameters, {self.size}×{self.size} pictures): "
                "SD v1's blocks, narrower. Random weights draw noise, so the pictures below show "
                "the mechanics, not a cat. With SD v1.5 downloaded (diffusers' cache), the same "
                "notebook draws real pictures.")


def load_demo(backend=None):
    """SD v1.5 if it is already on disk (and not overridden by TINYSD_NOTEBOOK_MODEL), else the tiny model.

    backend: None picks 'numpy' for the tiny model (no compile time) and tinysd's default for SD v1.5.
    """
    choice = os.environ.get("TINYSD_NOTEBOOK_MODEL", "")
    if choice and choice != "tiny":
        return Demo(tinysd.load(choice, backend=backend), True, choice, 512, 25)
    folder = None if choice else sd15_on_disk()
    if folder is not None:
        return Demo(tinysd.load(str(folder), backend=backend), True, SD15, 512, 25)
    folder = tiny_model_folder()
    return Demo(tinysd.load(str(folder), backend=backend or "numpy"), False, folder.name, 64, 10)


def sd15_on_disk():
    """SD v1.5's folder in the Hugging Face cache, or None where it was never downloaded."""
    from tinysd.weights import resolve
    try:
        return resolve(SD15, local_files_only=True)
    except (FileNotFoundError, ValueError):
        return None


def tiny_model_folder(seed=0):
    """The tiny random model's diffusers folder, written on first use."""
    digest = hashlib.sha1(json.dumps(tiny_configs(), sort_keys=True).encode()).hexdigest()[:8]
    folder = CACHE / f"{TINY_NAME}-seed{seed}-{digest}"   # a new folder when the configs change
    if not (folder / "model_index.json").is_file():
        write_tiny_model(folder, seed)
    return folder


def tiny_configs():
    """part -> config dict: SD v1.5's published configs, narrowed by TINY."""
    configs = {}
    for part in ("unet", "vae", "text_encoder"):
        cfg = json.loads((SD15_CONFIGS / part / "config.json").read_text())
        configs[part] = {**cfg, **TINY[part]}
    configs["scheduler"] = json.loads((SD15_CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    return configs


def random_state_dict(module, rng):
    """Seeded random weights for every key of `module`, in the published key layout.

    Matrices and kernels ~ N(0, 1/fan_in) (keeps activations O(1)); norm scales ~ 1 + N(0, 0.1²);
    biases ~ N(0, 0.05²).
    """
    state = {}
    for key, param in module.named_parameters():
        shape = param.shape
        noise = rng.standard_normal(shape, dtype=np.float32)
        if len(shape) >= 2:
            state[key] = noise / np.float32(np.sqrt(np.prod(shape[1:])))
        elif "norm" in key and key.endswith("weight"):
            state[key] = 1 + np.float32(0.1) * noise
        else:
            state[key] = np.float32(0.05) * noise
    return state


def write_tiny_model(folder, seed=0):
    """Write the tiny random model as a diffusers folder: configs, safetensors, tokenizer files."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    rng = np.random.default_rng(seed)
    configs = tiny_configs()
    for part, cls in MODELS.items():
        (tmp / part).mkdir(parents=True, exist_ok=True)
        (tmp / part / "config.json").write_text(json.dumps(configs[part], indent=2))
        save_file(random_state_dict(cls(configs[part]), rng), str(tmp / part / WEIGHT_FILES[part]))
    (tmp / "scheduler").mkdir(exist_ok=True)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
    write_tokenizer(tmp / "tokenizer")
    (tmp / "model_index.json").write_text((SD15_CONFIGS / "model_index.json").read_text())
    tmp.replace(folder)   # complete or absent: a killed run leaves only the .partial folder
    return folder


def write_tokenizer(folder):
    """CLIP's vocabulary (shipped with tinysd) as vocab.json + merges.txt."""
    tok = CLIPTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder), encoding="utf-8")
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")


def photo(size=256):
    """A photograph to noise, encode and repaint: matplotlib's sample portrait of Grace Hopper,
    centre-cropped to a square, size×size uint8 RGB (a smooth synthetic picture if it is absent)."""
    from PIL import Image

    try:
        from matplotlib import cbook
        with cbook.get_sample_data("grace_hopper.jpg") as f:
            im = Image.open(f).convert("RGB")
    except (OSError, ValueError):
        y, x = np.mgrid[0:size, 0:size] / size
        rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * x * y)], axis=-1)
        return (rgb * 255).round().astype(np.uint8)
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return np.asarray(im)


def show(images, titles=None, size=2.2, cmap=None, suptitle=None):
    """Images side by side: (H, W, 3) floats in [0, 1] or uint8, or (H, W) maps (with `cmap`)."""
    import matplotlib.pyplot as plt

    images = list(images)
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size * 1.1), squeeze=False)
    for i, (ax, im) in enumerate(zip(axes[0], images)):
        ax.imshow(im, cmap=cmap, interpolation="nearest")
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    if suptitle:
        fig.suptitle(suptitle)
    plt.show()
