"""Score "shapes-canny": does the generated object follow the edge map's position and shape?

    python training/evaluate_shapes_controlnet.py                  # tinysd.load("shapes", controlnet="shapes-canny")
    python training/evaluate_shapes_controlnet.py --controlnet tinysd/data/shapes-canny.safetensors

Held-out scenes: one object whose (colour, shape, position) triple training never saw (each of
the 20 triples, --per-triple scenes each, random size, jitter and background from their own seed).
Each scene's Canny edge map (tinysd.hints.canny, 100/200) is the control image; the prompt names
colour and shape but says nothing about position ("a red circle"). tinysd draws it (20 steps,
DPM++ 2M, guidance 7.5, seed = the scene's index) with the ControlNet and, as the baseline,
without it; evaluate_shapes.measure reads each picture: colour, position (centroid -> nearest
of the five places) and shape (template IoU), plus the overlap (IoU) of the drawn object with the
scene's own object mask, and the centroid's distance from the scene's object centre in pixels.
A third run gives the edge map with an empty prompt: position and shape must then come from
the edges alone.

Prints the table, writes shapes_canny_eval.json and a picture grid shapes_canny_eval.png
(edge map | with ControlNet | without | empty prompt with ControlNet) for the first scenes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import shapes_data as data  # noqa: E402
from evaluate_shapes import object_mask, measure  # noqa: E402


def held_out_scenes(per_triple, seed=2024):
    """per_triple one-object scenes for every held-out (colour, shape, position) triple."""
    rng = np.random.default_rng(seed)
    scenes = []
    for colour, shape, position in sorted(data.HELD_OUT):
        for _ in range(per_triple):
            thing = data.make_thing(rng, shape, colour, position, str(rng.choice(list(data.RADII))))
            scenes.append(data.Scene((thing,), str(rng.choice(list(data.BACKGROUNDS)))))
    return scenes


def score(picture, scene, prompt_has_colour=True):
    """evaluate_shapes.measure of a picture against its scene, plus mask IoU and centroid distance."""
    want, got = scene.things[0], measure(picture)
    truth = object_mask(data.render(scene))
    drawn = object_mask(picture)
    iou = float((truth & drawn).sum() / max(1, (truth | drawn).sum()))
    ys, xs = np.nonzero(drawn)
    distance = float(np.hypot(xs.mean() + 0.5 - want.centre[0], ys.mean() + 0.5 - want.centre[1])) if len(xs) else 64.0
    row = {"want": {"colour": want.colour, "shape": want.shape, "position": want.position},
           "position_ok": got["position"] == want.position, "shape_ok": got["shape"] == want.shape,
           "iou": iou, "distance": distance, **{k: got[k] for k in ("colour", "position", "shape")}}
    if prompt_has_colour:
        row["colour_ok"] = got["colour"] == want.colour
    return row


def run(sd, scenes, prompts, steps, guidance, sampler, with_control):
    """Draw every scene; returns (rows, pictures)."""
    from tinysd.hints import canny

    rows, pictures = [], []
    for i, (scene, prompt) in enumerate(zip(scenes, prompts)):
        kw = {"control_image": canny(data.render(scene), 100, 200)} if with_control else {}
        image = sd(prompt, seed=i, num_inference_steps=steps, guidance_scale=guidance, scheduler=sampler,
                   output_type="np", **kw).images[0]
        picture = (image * 255).round().astype(np.uint8)
        rows.append({"prompt": prompt, "seed": i, **score(picture, scene, bool(prompt))})
        pictures.append(picture)
    return rows, pictures


def summary(rows):
    keys = [k for k in ("colour_ok", "position_ok", "shape_ok") if k in rows[0]]
    out = {k[:-3]: float(np.mean([r[k] for r in rows])) for k in keys}
    out.update(iou=float(np.mean([r["iou"] for r in rows])), distance=float(np.mean([r["distance"] for r in rows])))
    return out


def save_grid(columns, labels, path, n, zoom=2):
    size = 64 * zoom
    grid = Image.new("RGB", (size * len(columns), size * n + 14), "white")
    draw = ImageDraw.Draw(grid)
    for j, (column, label) in enumerate(zip(columns, labels)):
        draw.text((j * size + 4, 1), label, fill="black")
        for i, picture in enumerate(column[:n]):
            grid.paste(Image.fromarray(picture).convert("RGB").resize((size, size), Image.NEAREST), (j * size, 14 + i * size))
    grid.save(path, optimize=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--controlnet", default="shapes-canny")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--per-triple", type=int, default=3, help="held-out scenes per held-out triple (default 3: 60 scenes)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--grid", default=str(HERE / "shapes_canny_eval.png"))
    p.add_argument("--json", default=str(HERE / "shapes_canny_eval.json"))
    args = p.parse_args(argv)

    import tinysd
    from tinysd.hints import canny

    with_cn = tinysd.load(args.model, backend=args.backend, controlnet=args.controlnet)
    without = tinysd.load(args.model, backend=args.backend)
    scenes = held_out_scenes(args.per_triple)
    prompts = [f"a {s.things[0].colour} {s.things[0].shape}" for s in scenes]
    with_cn("warm-up", control_image=canny(data.render(scenes[0]), 100, 200), num_inference_steps=2)
    began = time.perf_counter()
    rows, pictures = run(with_cn, scenes, prompts, args.steps, args.guidance, args.sampler, True)
    per_image = (time.perf_counter() - began) / len(scenes)
    base_rows, base_pictures = run(without, scenes, prompts, args.steps, args.guidance, args.sampler, False)
    empty_rows, empty_pictures = run(with_cn, scenes, [""] * len(scenes), args.steps, args.guidance, args.sampler, True)

    table = {"controlnet": summary(rows), "without": summary(base_rows), "controlnet, empty prompt": summary(empty_rows)}
    print(f"{'':26s}{'colour':>8s}{'position':>10s}{'shape':>8s}{'mask IoU':>10s}{'centre px':>11s}   "
          f"({len(scenes)} held-out scenes, {args.steps} steps {args.sampler}, guidance {args.guidance})")
    for name, acc in table.items():
        colour = f"{acc['colour']:8.0%}" if "colour" in acc else f"{'':8s}"
        print(f"{name:26s}{colour}{acc['position']:10.0%}{acc['shape']:8.0%}{acc['iou']:10.2f}{acc['distance']:11.1f}")
    print(f"{per_image:.2f} s per picture with the ControlNet ({args.backend} backend)")
    edges = [canny(data.render(s), 100, 200) for s in scenes]
    save_grid([edges, pictures, base_pictures, empty_pictures],
              ["edges", "+ControlNet", "without", "empty prompt"], args.grid, n=12)
    Path(args.json).write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k not in ("grid", "json")},
        "accuracy": table, "seconds_per_picture": per_image,
        "controlnet": rows, "without": base_rows, "empty_prompt": empty_rows}, indent=1))


if __name__ == "__main__":
    main()
