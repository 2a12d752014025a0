"""Teach the shapes model a colour it never saw, orange, with a LoRA trained by tinysd's own NumPy code.

    python training/train_shapes_lora.py                      # data, training, evaluation before/after
    python training/train_shapes_lora.py --steps 20 --seeds 0 --out /tmp/lora-smoke   # smoke run

The shapes model knows red, green, blue, yellow and purple; "orange" is in its CLIP vocabulary
but never appeared in a caption, so its token vector is the untrained initial one. The data
set: captioned orange shapes in every size, background and position (a few shape x position
pairs held out), plus a quarter of ordinary scenes so the adapters do not turn everything
orange. `tinysd.train.train_lora` trains rank-4 adapters on every attention projection of the
U-Net (to_q, to_k, to_v, to_out.0) and of the text encoder (`--no-text-encoder`: the U-Net's
only), as

    python -m tinysd train-lora DATA --model shapes --rank 4 --steps 1600 --batch-size 16 --lr 2e-3 --text-encoder -o shapes_orange.safetensors

does, except that this script first fits each picture's latent through the decoder
(`--fit-steps`), which the command line does not.

The evaluation draws held-out prompts ("an orange star at the bottom": shape x position pairs
no training picture had) and reads each picture's colour with evaluate_shapes.measure, orange
added to its palette, before and after. Targets: orange in >= 80% with the LoRA, <= 10% without.
Writes shapes_orange.safetensors (kohya format), shapes_lora_eval.json / .png, shapes_lora_loss.png.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from shapes_finetune import (Clock, HERE, evaluate_shapes, loss_by_tenth, score, shapes_data, table, write_folder,
                             write_json)

ORANGE = (245, 125, 20)
PLACES = list(shapes_data.POSITIONS)


def held_out_pairs():
    """Two (shape, position) pairs per shape that no orange training picture shows."""
    return {(s, PLACES[(si + k) % len(PLACES)]) for si, s in enumerate(shapes_data.SHAPES) for k in (0, 2)}


def orange_caption(scene, rng):
    return shapes_data.caption(scene, rng).replace("a orange", "an orange")


def make_data(n, seed, orange_share=0.75):
    """n pictures and captions: orange one-object scenes (held-out pairs excluded) and ordinary ones."""
    rng = np.random.default_rng(seed)
    held = held_out_pairs()
    pictures, captions = [], []
    while len(pictures) < n:
        if rng.random() < orange_share:
            shape, place = shapes_data.SHAPES[rng.integers(4)], PLACES[rng.integers(5)]
            if (shape, place) in held:
                continue
            thing = shapes_data.make_thing(rng, shape, "orange", place, ("small", "large")[rng.integers(2)])
            scene = shapes_data.Scene((thing,), str(rng.choice(list(shapes_data.BACKGROUNDS))))
        else:
            scene = shapes_data.sample_scene(rng)
        pictures.append(shapes_data.render(scene))
        captions.append(orange_caption(scene, rng))
    return pictures, captions


def prompts_for(pairs, colour="orange"):
    article = "an" if colour == "orange" else "a"
    return [(colour, s, p, f"{article} {colour} {s} {shapes_data.PLACE_WORDS[p]}") for s, p in sorted(pairs)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE), help="where the LoRA, the tables and the pictures go")
    p.add_argument("--data", default="/tmp/tinysd-shapes-orange", help="the generated training folder")
    p.add_argument("--pictures", type=int, default=200)
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help="min-SNR-γ loss weighting (e.g. 5); default: none, plain ε-loss")
    p.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="also adapt the text encoder's attention (default: yes)")
    p.add_argument("--fit-steps", type=int, default=40,
                   help="refine each picture's latent through the decoder (the encoder turns orange into yellow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluation seeds")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    import tinysd
    from tinysd.train import TrainConfig, plot_losses, remove_lora, save_lora, train_lora

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes_data.COLOURS["orange"] = ORANGE          # drawn by render, recognised by evaluate_shapes.measure
    write_folder(args.data, *make_data(args.pictures, args.seed))
    held = prompts_for(held_out_pairs())
    others = [row for row in shapes_data.held_out_prompts()][::2]      # ordinary colours: does the LoRA spill?

    sd = tinysd.load("shapes", backend=args.backend)
    before, pictures_before, acc_before = score(sd, held, args.seeds)
    clock = Clock()
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                         min_snr_gamma=args.min_snr_gamma)
    adapters, losses = train_lora(sd, args.data, config, rank=args.rank, text_encoder=args.text_encoder,
                                  state_path=out / "shapes_orange.state.safetensors", resume=args.resume, save_every=50,
                                  fit_steps=args.fit_steps)
    timing = clock.report()
    print("mean loss by tenth of the run:", " ".join(f"{v:.4f}" for v in loss_by_tenth(losses)))
    save_lora(out / "shapes_orange.safetensors", adapters)
    plot_losses(losses, out / "shapes_lora_loss.png", title="orange LoRA (rank 4): loss")
    after, pictures_after, acc_after = score(sd, held, args.seeds)
    spill_rows, _, spill = score(sd, others, args.seeds[:1])
    remove_lora(sd.unet, adapters)
    remove_lora(sd.text_encoder, adapters)
    base_rows, _, base_others = score(sd, others, args.seeds[:1])

    results = {"held-out orange prompts, without the LoRA": acc_before,
               "held-out orange prompts, with the LoRA": acc_after,
               "other colours' held-out prompts, with": spill,
               "other colours' held-out prompts, without": base_others}
    table(f"{len(held)} prompts x {len(args.seeds)} seeds; {args.steps} steps in {timing['minutes']} min, "
          f"load {timing['load_average']} on {timing['cores']} cores", results)
    labels = [f"{prompt} ({tag})" for *_, prompt in held for tag in ("before", "after")]
    evaluate_shapes.save_grid([row for pair in zip(pictures_before, pictures_after) for row in pair], labels,
                              out / "shapes_lora_eval.png")
    write_json(out / "shapes_lora_eval.json", {
        "settings": {k: v for k, v in vars(args).items()}, "training": timing,
        "final_loss": float(np.mean(losses[-50:])), "loss_by_tenth": loss_by_tenth(losses), "accuracy": results,
        "before": before, "after": after, "other_colours_with_lora": spill_rows, "other_colours_without": base_rows})


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {(time.time() - t0) / 60:.1f} min")
