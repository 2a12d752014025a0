"""Captioned pictures of simple shapes, the training data of the packaged "shapes" model.

    scene = sample_scene(np.random.default_rng(0))      # one or two objects on a plain background
    image = render(scene)                               # (64, 64, 3) uint8
    caption(scene, rng)                                 # "a small red circle on the left"

Every scene is drawn from a seeded NumPy generator, so a seed gives the same pictures and
captions on every machine. A held-out set of (colour, shape, position) triples never appears
in training, neither in a caption nor in a picture (`is_held_out`): the evaluation asks for
exactly those, so a model that gets them right has learned colour, shape and position apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64            # pixels per side
SUPERSAMPLE = 4      # draw at 4x and box-filter down: smooth edges

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (240, 210, 20), "purple": (140, 40, 180)}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle", "star")
# Object centres (x, y) in pixels and how a caption names them.
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
PLACE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top",
               "bottom": "at the bottom", "center": "in the center"}
RADII = {"small": 8, "large": 13}   # half the object's width, pixels
JITTER = 2                          # centre and radius wobble, pixels
# Two objects side by side or one above the other: (position of the first, relation, position of the second)
PAIRS = (("left", "to the left of", "right"), ("right", "to the right of", "left"),
         ("top", "above", "bottom"), ("bottom", "below", "top"))
# Only the vertical pairs: their relation words are not the one-object position words, whereas
# "A to the left of B" puts the word "left" beside objects on both sides (training/README.md).
VERTICAL_PAIRS = PAIRS[2:]


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    position: str
    size: str
    centre: tuple      # (x, y) pixels
    radius: float


@dataclass(frozen=True)
class Scene:
    things: tuple      # one or two Things
    background: str


def held_out_triples():
    """(colour, shape, position) triples training never sees: one position per colour x shape.

    Position index (2·colour + shape) mod 5 spreads the 20 held-out triples evenly over the
    positions, so every colour, shape and position still appears in training, only not together.
    """
    places = list(POSITIONS)
    return {(c, s, places[(2 * ci + si) % len(places)])
            for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES)}


HELD_OUT = held_out_triples()


def is_held_out(scene):
    return any((t.colour, t.shape, t.position) in HELD_OUT for t in scene.things)


def make_thing(rng, shape, colour, position, size):
    x, y = POSITIONS[position]
    dx, dy = rng.integers(-JITTER, JITTER + 1, size=2)
    radius = RADII[size] + rng.uniform(-1.0, 1.0)
    return Thing(shape, colour, position, size, (x + int(dx), y + int(dy)), float(radius))


def sample_scene(rng, two_prob=0.3, allow_held_out=False, pairs=PAIRS):
    """A random scene: one object (70%) or two (30%, small, in one of `pairs`' arrangements)."""
    while True:
        background = rng.choice(list(BACKGROUNDS))
        if rng.random() < two_prob:
            first, _, second = pairs[rng.integers(len(pairs))]
            colours = rng.choice(list(COLOURS), size=2, replace=False)
            shapes = rng.choice(SHAPES, size=2)
            things = tuple(make_thing(rng, s, c, p, "small") for s, c, p in zip(shapes, colours, (first, second)))
        else:
            things = (make_thing(rng, rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(POSITIONS)),
                                 rng.choice(list(RADII))),)
        scene = Scene(things, str(background))
        if allow_held_out or not is_held_out(scene):
            return scene


def shape_polygon(shape, centre, radius):
    """The outline of a square, triangle or star as (x, y) points (a circle is drawn as an ellipse)."""
    x, y = centre
    if shape == "square":
        r = radius * 0.85
        return [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]
    if shape == "triangle":     # pointing up, centred on its bounding box
        return [(x, y - radius), (x + radius, y + radius * 0.8), (x - radius, y + radius * 0.8)]
    if shape == "star":         # five points, inner radius 0.45 of the outer
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius * 1.1, radius * 0.5)
        return [(x + r * np.cos(a), y + r * np.sin(a)) for r, a in zip(radii, angles)]
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def draw_shape(draw, shape, centre, radius, fill, scale=1):
    centre, radius = (centre[0] * scale, centre[1] * scale), radius * scale
    if shape == "circle":
        draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=fill)
    else:
        draw.polygon(shape_polygon(shape, centre, radius), fill=fill)


def render(scene, size=SIZE):
    """The scene as a (size, size, 3) uint8 picture, anti-aliased by supersampling."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for t in scene.things:
        draw_shape(draw, t.shape, t.centre, t.radius, COLOURS[t.colour], scale=SUPERSAMPLE * size / SIZE)
    return np.asarray(image.resize((size, size), Image.BOX))


def render_mask(shape, centre, radius, size=SIZE):
    """A (size, size) bool mask of one shape: the templates the evaluation compares against."""
    image = Image.new("L", (size * SUPERSAMPLE,) * 2, 0)
    draw_shape(ImageDraw.Draw(image), shape, centre, radius, 255, scale=SUPERSAMPLE)
    return np.asarray(image.resize((size, size), Image.BOX)) >= 128


def describe(thing, say_size):
    size = f"{thing.size} " if say_size else ""
    return f"a {size}{thing.colour} {thing.shape}"


def caption(scene, rng):
    """A plain-English caption; the size and the background are mentioned half of the time each."""
    if len(scene.things) == 1:
        t = scene.things[0]
        text = f"{describe(t, rng.random() < 0.5)} {PLACE_WORDS[t.position]}"
    else:
        a, b = scene.things
        relation = next(rel for first, rel, second in PAIRS if (first, second) == (a.position, b.position))
        text = f"{describe(a, False)} {relation} {describe(b, False)}"
    if rng.random() < 0.5:
        text += f" on a {scene.background} background"
    return text


def sample_batch(rng, n, allow_held_out=False, pairs=PAIRS):
    """n pictures (n, 64, 64, 3) uint8 and their captions."""
    scenes = [sample_scene(rng, allow_held_out=allow_held_out, pairs=pairs) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), [caption(s, rng) for s in scenes]


def held_out_prompts():
    """One prompt per held-out triple, e.g. "a red circle on the left": what the evaluation asks for."""
    order = {name: i for i, name in enumerate(COLOURS)}
    return [(c, s, p, f"a {c} {s} {PLACE_WORDS[p]}") for c, s, p in sorted(HELD_OUT, key=lambda x: (order[x[0]], x[1]))]
