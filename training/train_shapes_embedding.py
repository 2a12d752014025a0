"""Teach the shapes model a new word: "<zorb>" = a large purple star, by textual inversion in tinysd's NumPy.

    python training/train_shapes_embedding.py                  # data, training, evaluation before/after
    python training/train_shapes_embedding.py --steps 20 --seeds 0 --out /tmp/zorb-smoke   # smoke run

The data set: large purple stars in three of the five positions, on every background, captioned
"a <zorb> at the top" (half of them "... on a gray background"). `tinysd.train.
train_textual_inversion` adds the token, starting from the vector of the word "square" (a
shape, but the wrong one), and trains only that vector (U-Net and text encoder frozen):

    python -m tinysd train-embedding DATA --model shapes --token "<zorb>" --init-word square --steps 600 --batch-size 16 --lr 5e-3 -o zorb.safetensors

The evaluation draws "a <zorb> PLACE" for all five places (two of them never in the data) and
reads each picture with evaluate_shapes.measure: the concept is drawn when the object is purple,
a star, and large (its area nearer a large star's than a small one's). Before: the same prompts
without the embedding (the tokenizer then spells "<zorb>" in pieces). Target: >= 80% after.
Writes zorb.safetensors (A1111), zorb-learned_embeds.safetensors (diffusers),
shapes_embedding_eval.json / .png, shapes_embedding_loss.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from shapes_finetune import (Clock, HERE, evaluate_shapes, loss_by_tenth, score, shapes_data, table, write_folder,
                             write_json)

TOKEN = "<zorb>"
TRAIN_PLACES = ("left", "top", "center")


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    pictures, captions = [], []
    for _ in range(n):
        place = TRAIN_PLACES[rng.integers(len(TRAIN_PLACES))]
        background = str(rng.choice(list(shapes_data.BACKGROUNDS)))
        scene = shapes_data.Scene((shapes_data.make_thing(rng, "star", "purple", place, "large"),), background)
        caption = f"a {TOKEN} {shapes_data.PLACE_WORDS[place]}"
        if rng.random() < 0.5:
            caption += f" on a {background} background"
        pictures.append(shapes_data.render(scene))
        captions.append(caption)
    return pictures, captions


def area_threshold():
    """Halfway (geometrically) between a small and a large star's area, in pixels."""
    small, large = (shapes_data.render_mask("star", (32, 32), r).sum() for r in shapes_data.RADII.values())
    return float(np.sqrt(small * large))


def concept_rate(rows):
    """Share of pictures with a large purple star, and the three parts of it."""
    threshold = area_threshold()
    hits = {"purple": [r["colour"] == "purple" for r in rows], "star": [r["shape"] == "star" for r in rows],
            "large": [r["area"] >= threshold for r in rows]}
    hits["large purple star"] = [all(parts) for parts in zip(*hits.values())]
    return {k: float(np.mean(v)) for k, v in hits.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--data", default="/tmp/tinysd-shapes-zorb")
    p.add_argument("--pictures", type=int, default=200)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--init-word", default="square")
    p.add_argument("--vectors", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--backend", default="cpu")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    import tinysd
    from tinysd.train import TrainConfig, plot_losses, save_embedding, train_textual_inversion

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_folder(args.data, *make_data(args.pictures, args.seed))
    prompts = [("purple", "star", place, f"a {TOKEN} {words}") for place, words in shapes_data.PLACE_WORDS.items()]
    held_out = [row for row in prompts if row[2] not in TRAIN_PLACES]

    sd = tinysd.load("shapes", backend=args.backend)
    before, pictures_before, _ = score(sd, prompts, args.seeds)
    clock = Clock()
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, weight_decay=0.0,
                         seed=args.seed)
    vectors, losses = train_textual_inversion(sd, args.data, TOKEN, config, args.vectors, args.init_word,
                                              state_path=out / "zorb.state.safetensors", resume=args.resume,
                                              save_every=50)
    timing = clock.report()
    print("mean loss by tenth of the run:", " ".join(f"{v:.4f}" for v in loss_by_tenth(losses)))
    save_embedding(out / "zorb.safetensors", vectors)
    save_embedding(out / "zorb-learned_embeds.safetensors", vectors, TOKEN, format="diffusers")
    plot_losses(losses, out / "shapes_embedding_loss.png", title=f"textual inversion {TOKEN}: loss")

    fresh = tinysd.load("shapes", backend=args.backend)           # the saved file, as a user loads it
    fresh.load_textual_inversion(out / "zorb.safetensors", token=TOKEN)
    after, pictures_after, _ = score(fresh, prompts, args.seeds)
    is_held = lambda r: r["want"]["position"] not in TRAIN_PLACES      # noqa: E731
    results = {"all five places, without the embedding": concept_rate(before),
               "all five places, with it": concept_rate(after),
               "the two places not in the data, with it": concept_rate([r for r in after if is_held(r)]),
               "position right, with it (all places)": {"position": evaluate_shapes.accuracy(after)["position"]}}
    table(f"{len(prompts)} prompts x {len(args.seeds)} seeds; {args.steps} steps in {timing['minutes']} min, "
          f"load {timing['load_average']} on {timing['cores']} cores", results)
    labels = [f"{prompt} ({tag})" for *_, prompt in prompts for tag in ("before", "after")]
    evaluate_shapes.save_grid([row for pair in zip(pictures_before, pictures_after) for row in pair], labels,
                              out / "shapes_embedding_eval.png")
    write_json(out / "shapes_embedding_eval.json", {
        "settings": vars(args), "training": timing, "final_loss": float(np.mean(losses[-50:])),
        "loss_by_tenth": loss_by_tenth(losses),
        "held_out_places": [r[2] for r in held_out], "accuracy": results, "before": before, "after": after})


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {(time.time() - t0) / 60:.1f} min")
