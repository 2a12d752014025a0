"""Score the "shapes" model by measuring its pictures: colour, position and shape of the object.

    python training/evaluate_shapes.py                   # tinysd.load("shapes"), 20 steps, guidance 7.5
    python training/evaluate_shapes.py --model /tmp/shapes-debug --seeds 0 1

For every held-out prompt ("a red circle on the left": a colour x shape x position triple the
training never saw) and a few fixed seeds, tinysd draws a picture, and `measure` reads it:

- the background is the median colour of the picture's border; the object is the largest
  connected region that differs from it by more than 60/255 (Euclidean, RGB);
- colour: the object's mean colour (edges eroded away) -> the nearest of shapes_data.COLOURS;
- position: the object's centroid -> the nearest of shapes_data.POSITIONS;
- shape: each shape's template is drawn over a range of sizes, centred on the object's
  bounding box, and the shape whose best template overlaps the object most (IoU) wins.

Prints the accuracy per attribute (held-out prompts, and the same colour x shape pairs at
positions seen in training), writes the table as JSON and a grid picture (prompts x seeds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_data as data  # noqa: E402

HERE = Path(__file__).resolve().parent
OBJECT_DISTANCE = 60        # RGB distance (0-255) from the background that counts as object
TEMPLATE_RADII = np.arange(4.0, 20.5, 0.5)


def background_colour(image):
    """Median RGB of the 2-pixel border of a (H, W, 3) uint8 picture."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def object_mask(image):
    """Bool (H, W) mask of the largest region unlike the background (all False if none)."""
    far = np.linalg.norm(image.astype(np.float32) - background_colour(image), axis=-1) > OBJECT_DISTANCE
    labels, n = ndimage.label(far)
    if n == 0:
        return far
    sizes = ndimage.sum(far, labels, index=np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(sizes))


def nearest(value, table):
    """The key of `table` whose value is nearest to `value` (Euclidean)."""
    names = list(table)
    return names[int(np.argmin([np.linalg.norm(np.subtract(value, table[k])) for k in names]))]


def classify_shape(mask):
    """(best shape, {shape: IoU}) by matching templates of every shape and size to `mask`."""
    ys, xs = np.nonzero(mask)
    box_centre = np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2])
    scores = {}
    for shape in data.SHAPES:
        best = 0.0
        for r in TEMPLATE_RADII:
            # draw once at the middle to find the template's own box, then again centred on the object's box
            probe = data.render_mask(shape, (32, 32), r)
            py, px = np.nonzero(probe)
            offset = np.array([(px.min() + px.max() + 1) / 2, (py.min() + py.max() + 1) / 2]) - 32
            template = data.render_mask(shape, tuple(box_centre - offset), r)
            best = max(best, (template & mask).sum() / (template | mask).sum())
        scores[shape] = float(best)
    return max(scores, key=scores.get), scores


def measure(image):
    """{colour, position, shape, ...} read off a (64, 64, 3) uint8 picture; None values if no object."""
    mask = object_mask(image)
    if mask.sum() < 4:
        return {"colour": None, "position": None, "shape": None, "area": int(mask.sum())}
    core = ndimage.binary_erosion(mask)
    rgb = image[core if core.sum() >= 4 else mask].astype(np.float32).mean(axis=0)
    ys, xs = np.nonzero(mask)
    centroid = (xs.mean() + 0.5, ys.mean() + 0.5)
    shape, ious = classify_shape(mask)
    return {"colour": nearest(rgb, data.COLOURS), "position": nearest(centroid, data.POSITIONS), "shape": shape,
            "rgb": [round(float(c)) for c in rgb], "centroid": [round(float(c), 1) for c in centroid],
            "iou": ious, "area": int(mask.sum())}


def seen_prompts():
    """The held-out colour x shape pairs at the next position, which training did show."""
    places = list(data.POSITIONS)
    out = []
    for c, s, p, _ in data.held_out_prompts():
        q = places[(places.index(p) + 1) % len(places)]
        out.append((c, s, q, f"a {c} {s} {data.PLACE_WORDS[q]}"))
    return out


def evaluate(sd, prompts, seeds, steps, guidance, sampler):
    """Generate every prompt x seed, measure each picture: (rows of results, pictures)."""
    rows, pictures = [], []
    for colour, shape, position, prompt in prompts:
        line = []
        for seed in seeds:
            image = sd(prompt, seed=seed, num_inference_steps=steps, guidance_scale=guidance, scheduler=sampler,
                       output_type="np").images[0]
            image = (image * 255).round().astype(np.uint8)
            got = measure(image)
            rows.append({"prompt": prompt, "seed": seed, "want": {"colour": colour, "shape": shape, "position": position},
                         **got, **{f"{k}_ok": got[k] == want for k, want in
                                   (("colour", colour), ("shape", shape), ("position", position))}})
            line.append(image)
        pictures.append(line)
    return rows, pictures


def accuracy(rows):
    return {k: float(np.mean([r[f"{k}_ok"] for r in rows])) for k in ("colour", "position", "shape")}


def save_grid(pictures, labels, path, zoom=2):
    """Prompts as rows (labelled on the left), seeds as columns."""
    size, label_w = 64 * zoom, 190
    grid = Image.new("RGB", (label_w + size * len(pictures[0]), size * len(pictures)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (line, label) in enumerate(zip(pictures, labels)):
        draw.text((4, i * size + size // 2 - 6), label, fill="black")
        for j, image in enumerate(line):
            grid.paste(Image.fromarray(image).resize((size, size), Image.NEAREST), (label_w + j * size, i * size))
    grid.save(path, optimize=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--seen", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the held-out colour x shape pairs at positions seen in training")
    p.add_argument("--grid", default=str(HERE / "shapes_eval.png"))
    p.add_argument("--json", default=str(HERE / "shapes_eval.json"))
    args = p.parse_args(argv)

    import tinysd

    sd = tinysd.load(args.model, backend=args.backend)
    sd("warm-up", seed=0, num_inference_steps=args.steps, output_type="np")      # compile the kernels first
    began = time.perf_counter()
    held_rows, pictures = evaluate(sd, data.held_out_prompts(), args.seeds, args.steps, args.guidance, args.sampler)
    per_image = (time.perf_counter() - began) / len(held_rows)
    seen_rows = evaluate(sd, seen_prompts(), args.seeds, args.steps, args.guidance, args.sampler)[0] if args.seen else []

    table = {"held_out": accuracy(held_rows), **({"seen": accuracy(seen_rows)} if seen_rows else {})}
    print(f"{'':10s} {'colour':>7s} {'position':>9s} {'shape':>7s}   ({len(held_rows)} pictures each, "
          f"{args.steps} steps, guidance {args.guidance}, {args.sampler})")
    for split, acc in table.items():
        print(f"{split:10s} {acc['colour']:7.0%} {acc['position']:9.0%} {acc['shape']:7.0%}")
    print(f"{per_image:.2f} s per picture ({args.backend} backend)")
    save_grid(pictures, [prompt for *_, prompt in data.held_out_prompts()], args.grid)
    Path(args.json).write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k not in ("grid", "json")},
        "accuracy": table, "seconds_per_picture": per_image,
        "held_out": held_rows, "seen": seen_rows}, indent=1))


if __name__ == "__main__":
    main()
