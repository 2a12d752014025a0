"""Live controls for the notebooks: sliders and menus that redraw a picture, or a static grid of the same values.

    from _live import Choice, Redraw, live
    redraw = Redraw(sd, "a red circle on the left", "a blue square on the right", picture)
    live(redraw, guidance_scale=Choice([1, 3, 7.5, 15], default=7.5), seed=Choice(range(8)))

`draw(**values)` returns a picture ((H, W, 3) floats in [0, 1] or uint8, or an (H, W) map) or a
(picture, caption) pair. In Jupyter with ipywidgets (`pip install -e ".[notebooks]"`), `live`
returns a panel: one slider (numbers) or menu (anything else) per control; moving one redraws
the picture with the new value. Where widgets cannot run it draws a static grid instead: one row
per control, the control's `grid` values along it, the other controls at their defaults. That is
the case without ipywidgets, outside an IPython kernel, and with TINYSD_NOTEBOOK_STATIC=1, which
scripts/make_notebooks.py and the tests set: the committed notebooks are read without a kernel,
so their outputs must be pictures, not widgets.

The `draw` callables of notebooks 03 and 09 are here, importable and tested headlessly
(tests/test_latent.py): `Redraw` (txt2img / img2img / prompt mix), `DenoisingSteps` (x̂₀ step by
step), `WordMaps` (notebook 03's cross-attention map of one word).
"""
from __future__ import annotations

import importlib.util
import io
import os
import time
from dataclasses import dataclass

import numpy as np

from tinysd.latent import embed, lerp

STATIC_ENV = "TINYSD_NOTEBOOK_STATIC"


@dataclass
class Choice:
    """A control: the values it offers, the one it starts at, the ones a static grid shows."""
    values: list
    default: object = None         # None: the first value
    labels: list | None = None     # what the widget shows for each value (default: str(value))
    grid: list | None = None       # values of the static grid's row (default: up to 5, evenly spread)

    def __post_init__(self):
        self.values = list(self.values)
        if not self.values:
            raise ValueError("a Choice needs at least one value")
        if self.default is None:
            self.default = self.values[0]
        if self.default not in self.values:
            raise ValueError(f"default {self.default!r} is not one of the values {self.values}")
        if self.labels is None:
            self.labels = [str(v) for v in self.values]
        if len(self.labels) != len(self.values):
            raise ValueError(f"{len(self.labels)} labels for {len(self.values)} values")
        if self.grid is None:
            picks = np.unique(np.linspace(0, len(self.values) - 1, min(5, len(self.values))).round().astype(int))
            self.grid = [self.values[i] for i in picks]

    def label(self, value):
        return self.labels[self.values.index(value)]


def widgets_available():
    """Whether live widgets can run here: ipywidgets installed, an IPython kernel, and not asked for static."""
    if os.environ.get(STATIC_ENV, "") not in ("", "0"):
        return False
    if importlib.util.find_spec("ipywidgets") is None:
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def live(draw, *, static=None, size=1.6, **controls):
    """Live controls for `draw(**values)`, or (static=True, or widgets unavailable) a static grid.

    controls: name -> Choice (or a list of values). Returns the widget panel (a cell shows it),
    or, static, None after showing the grid.
    """
    controls = {name: c if isinstance(c, Choice) else Choice(c) for name, c in controls.items()}
    if not controls:
        raise ValueError("live() needs at least one control")
    if static is None:
        static = not widgets_available()
    if static:
        show_grid(static_grid(draw, controls), size)
        return None
    return Panel(draw, controls)


def call(draw, values):
    """(picture, caption) from draw(**values), whichever of the two it returned."""
    out = draw(**values)
    return out if isinstance(out, tuple) else (out, "")


def static_grid(draw, controls):
    """One row per control with more than one grid value: [(row name, [(picture, title), ...]), ...]."""
    defaults = {name: c.default for name, c in controls.items()}
    rows = []
    for name, control in controls.items():
        if len(control.grid) < 2 and len(controls) > 1:
            continue
        cells = []
        for value in control.grid:
            picture, caption = call(draw, {**defaults, name: value})
            title = f"{name}={control.label(value)}" if len(controls) > 1 else control.label(value)
            cells.append((picture, f"{title}\n{caption}" if caption else title))
        rows.append((name, cells))
    return rows


def show_grid(rows, size=1.6):
    import matplotlib.pyplot as plt

    cols = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(size * cols, size * 1.25 * len(rows)), squeeze=False)
    for r, (_, cells) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            ax.set_axis_off()
            if c < len(cells):
                picture, title = cells[c]
                ax.imshow(to_rgb(picture), interpolation="nearest")
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    plt.show()


def to_rgb(picture, cmap="magma"):
    """(H, W, 3) uint8 from a picture in [0, 1] or uint8, or from an (H, W) map (scaled to its own max)."""
    picture = np.asarray(picture)
    if picture.ndim == 2:
        import matplotlib

        top = picture.max()
        picture = matplotlib.colormaps[cmap](picture / top if top > 0 else picture)[..., :3]
    if picture.dtype != np.uint8:
        picture = (np.clip(picture, 0, 1) * 255).round().astype(np.uint8)
    return picture


def png(picture, side=256):
    """PNG bytes of the picture, enlarged (nearest neighbour) to `side` pixels: what the Image widget shows."""
    from PIL import Image

    im = Image.fromarray(to_rgb(picture))
    scale = max(1, side // max(im.size))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    im.save(buffer, format="PNG")
    return buffer.getvalue()


class Panel:
    """The widgets: one per control, the picture and a caption line; any change redraws."""

    def __init__(self, draw, controls, side=256):
        import ipywidgets as widgets

        self.draw, self.side = draw, side
        self.controls = {name: self._widget(widgets, name, c) for name, c in controls.items()}
        self.image = widgets.Image(format="png", width=side, height=side)
        self.caption = widgets.Label()
        for widget in self.controls.values():
            widget.observe(lambda change: self.redraw(), names="value")
        self.box = widgets.HBox([widgets.VBox(list(self.controls.values())),
                                 widgets.VBox([self.image, self.caption])])
        self.redraw()

    @staticmethod
    def _widget(widgets, name, control):
        options = list(zip(control.labels, control.values))
        style = {"description_width": "initial"}
        if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in control.values):
            return widgets.SelectionSlider(options=options, value=control.default, description=name,
                                           continuous_update=False, style=style)
        return widgets.Dropdown(options=options, value=control.default, description=name, style=style)

    def values(self):
        return {name: widget.value for name, widget in self.controls.items()}

    def redraw(self):
        start = time.perf_counter()
        try:
            picture, caption = call(self.draw, self.values())
        except ValueError as e:            # e.g. a strength too small for the step count: say so, keep going
            self.caption.value = f"cannot draw this: {e}"
            return
        self.image.value = png(picture, self.side)
        self.caption.value = f"{caption}  ({time.perf_counter() - start:.2f} s)".strip()

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)


class Redraw:
    """One picture from the controls of notebook 09's live panel: guidance scale, steps, sampler, seed,
    img2img strength (1: txt2img from the seed's noise, below 1: img2img of `picture`) and the
    position `mix` between two prompts' contexts (0: prompt_a, 1: prompt_b).

    The two contexts and the empty prompt's are encoded once; a redraw is the U-Net steps and a decode.
    """

    def __init__(self, sd, prompt_a, prompt_b, picture=None):
        self.sd, self.picture = sd, picture
        self.context_a, self.context_b = embed(sd, prompt_a), embed(sd, prompt_b)
        self.uncond = embed(sd, "")

    def __call__(self, guidance_scale=7.5, num_inference_steps=20, scheduler="dpmpp_2m", seed=0, strength=1.0,
                 mix=0.0):
        kwargs = dict(prompt_embeds=lerp(self.context_a, self.context_b, mix), negative_prompt_embeds=self.uncond,
                      guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, scheduler=scheduler,
                      seed=seed, output_type="np")
        if strength < 1.0:
            if self.picture is None:
                raise ValueError("img2img (strength below 1) needs the picture Redraw was given")
            kwargs.update(image=self.picture, strength=strength)
        return self.sd(**kwargs).images[0]


class DenoisingSteps:
    """x̂₀, the sampler's guess of the final picture, after every step of one generation:
    `steps(step)` is x̂₀ after step `step` (0-based), decoded when first asked for (a 512×512
    decode takes seconds on a CPU), and its timestep."""

    def __init__(self, sd, prompt, seed=0, num_inference_steps=20, scheduler="ddim", **kwargs):
        trace = []

        def callback(step, t, latents, pred_original_sample):
            trace.append((float(t), pred_original_sample.copy()))

        self.sd = sd
        self.image = sd(prompt, seed=seed, num_inference_steps=num_inference_steps, scheduler=scheduler,
                        callback=callback, output_type="np", **kwargs).images[0]
        self.timesteps = [t for t, _ in trace]
        self.latents = [x0 for _, x0 in trace]          # (1, 4, h, w) each
        self.pictures = {}

    def __len__(self):
        return len(self.latents)

    def __call__(self, step):
        if step not in self.pictures:
            self.pictures[step] = self.sd.decode(self.latents[step])[0]
        return self.pictures[step], f"x̂₀ at t={self.timesteps[step]:.0f}"


class WordMaps:
    """Notebook 03's cross-attention maps, one token at a time: `maps(word)` is the map of the token
    at position `word` (1 is the first word), an (side, side) array the grid and the panel show with
    its own colour scale, and the share of the attention that token takes.

    attention: (side, side, 77), a distribution over the 77 context rows at every latent pixel.
    """

    def __init__(self, attention, pieces):
        self.attention = np.asarray(attention)
        self.names = dict(enumerate(["<|startoftext|>"] + list(pieces) + ["<|endoftext|>"]))

    def choice(self):
        """The Choice of the prompt's words (and its end token) by position, labelled 'position: piece'."""
        positions = list(range(1, len(self.names)))
        return Choice(positions, labels=[f"{i}: {self.names[i]}" for i in positions], grid=positions)

    def __call__(self, word):
        m = self.attention[:, :, word]
        return m, f"{m.mean():.1%} of attention"
