"""The model the notebooks run on: SD v1.5 where its weights are on this machine, else the packaged "shapes" model.

    from _model import load_demo
    demo = load_demo()        # demo.sd (a tinysd.StableDiffusion), demo.shapes, demo.size, demo.steps
    demo.prompt("a red apple on a wooden table", "a red circle in the center")   # the one that suits the model

SD v1.5 is used when `tinysd.weights.resolve` finds it already downloaded (nothing is fetched).
Otherwise the notebooks run on `tinysd.load("shapes")`: SD v1's architecture, narrower, trained
by this project (training/) on 64×64 pictures of coloured shapes with captions such as
"a small red circle on the left". It ships inside the package, so it needs no download, and
draws a picture in about a second with the plain NumPy backend.

TINYSD_NOTEBOOK_MODEL=shapes forces the shapes model (the tests set it); a model id, folder or
file in it is loaded instead of SD v1.5.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import tinysd
from tinysd.weights import PACKAGED

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# training/shapes_data.py draws the shapes model's pictures: beside notebooks/ in a checkout, or
# beside the tinysd package where it is installed editable (the tests run a copy of notebooks/).
TRAINING = next((d for d in (Path(__file__).resolve().parents[1] / "training",
                             Path(tinysd.__file__).resolve().parents[1] / "training")
                 if (d / "shapes_data.py").is_file()), None)


@dataclass
class Demo:
    sd: object          # tinysd.StableDiffusion
    name: str           # where the weights came from
    shapes: bool        # the packaged shapes model: prompts and pictures must be coloured shapes
    size: int           # picture side in pixels (512 for SD v1.5, 64 for the shapes model)
    steps: int          # sampler steps the notebooks use

    def prompt(self, sd15_text, shapes_text):
        """The text the running model can draw: a caption like its training data's for the shapes model."""
        return shapes_text if self.shapes else sd15_text

    def picture(self):
        """The picture notebooks 5 and 6 encode and repaint, size×size uint8 RGB: a photograph for
        SD v1.5; for the shapes model, whose VAE has only seen shapes, a scene from its training data."""
        return shapes_picture(self.size) if self.shapes else photo(self.size)

    def describe(self):
        if self.name == SD15:
            return f"Running on trained SD v1.5 weights ({SD15}, from the Hugging Face cache)."
        if not self.shapes:
            return f"Running on the checkpoint {self.name} (TINYSD_NOTEBOOK_MODEL)."
        millions = sum(m.num_parameters() for m in (self.sd.unet, self.sd.vae, self.sd.text_encoder)) / 1e6
        return (f'Running on the packaged "shapes" model (tinysd.load("shapes"), {millions:.1f} M parameters, '
                f"{self.size}×{self.size} pictures): SD v1's architecture, narrower, trained by this project "
                "(training/) on captioned pictures of coloured shapes. It draws a coloured circle, square, "
                "triangle or star from a caption, mostly where the caption says (training/README.md). "
                "With SD v1.5 in the Hugging Face cache, the same notebook draws real pictures.")


def load_demo(backend=None):
    """SD v1.5 if it is already on disk (and not overridden by TINYSD_NOTEBOOK_MODEL), else the shapes model.

    backend: None picks 'numpy' for the shapes model (no compile time) and tinysd's default for SD v1.5.
    """
    choice = os.environ.get("TINYSD_NOTEBOOK_MODEL", "")
    if choice and choice != "shapes" and not is_shapes(choice):
        sd = tinysd.load(choice, backend=backend)
        return Demo(sd, choice, False, sd.unet.config.get("sample_size", 64) * 8, 25)
    folder = None if choice else sd15_on_disk()
    if folder is not None:
        return Demo(tinysd.load(str(folder), backend=backend), SD15, False, 512, 25)
    sd = tinysd.load("shapes", backend=backend or "numpy")
    return Demo(sd, "shapes", True, sd.unet.config["sample_size"] * 8, 20)


def is_shapes(choice):
    """Whether a TINYSD_NOTEBOOK_MODEL path points at the packaged shapes folder."""
    return Path(choice).exists() and Path(choice).resolve() == PACKAGED["shapes"].resolve()


def sd15_on_disk():
    """SD v1.5's folder in the Hugging Face cache, or None where it was never downloaded."""
    from tinysd.weights import resolve
    with warnings.catch_warnings():   # huggingface_hub imports tqdm.auto, which warns in Jupyter without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        try:
            return resolve(SD15, local_files_only=True)
        except (FileNotFoundError, ValueError):
            return None


def shapes_picture(size=64):
    """A blue square to the left of a green triangle on white, drawn by the training data's renderer
    (training/shapes_data.py), size×size uint8 RGB. The square lies inside the box notebook 6 repaints."""
    if TRAINING is None:
        raise FileNotFoundError("training/shapes_data.py is not here: run the notebooks from a tinysd checkout")
    sys.path.insert(0, str(TRAINING))
    try:
        from shapes_data import Scene, Thing, render
    finally:
        sys.path.remove(str(TRAINING))
    things = (Thing("square", "blue", "left", "large", (20, 32), 10.0),       # centre (x, y), radius: pixels
              Thing("triangle", "green", "right", "large", (46, 33), 11.0))
    return render(Scene(things, "white"), size)


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
