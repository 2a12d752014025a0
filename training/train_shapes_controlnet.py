"""Train "shapes-canny": a Canny-edge ControlNet for the packaged "shapes" model.

    python training/train_shapes_controlnet.py                # stops after --minutes (60) of training
    python training/train_shapes_controlnet.py --resume       # continue from the work folder's checkpoint
    python training/train_shapes_controlnet.py --steps 20 --out /tmp/shapes-canny-debug   # smoke run

ControlNet (Zhang, Rao & Agrawala 2023) steers a frozen diffusion model with a picture of the
structure wanted. Its parts, as diffusers' `ControlNetModel.from_unet` makes them:

- a small conv stack (`controlnet_cond_embedding`) that maps the 64×64 edge map to the 8×8
  latent grid, added to the latent after the copy's `conv_in`;
- a trainable copy of the U-Net's down path and mid block, starting from the U-Net's own weights;
- zero-initialised 1×1 convs on every skip connection of the copy and on its mid block, whose
  outputs are added to the frozen U-Net's skips and mid block. At step 0 they output zeros, so
  training starts from the unchanged model and the control grows in gradually.

The U-Net, text encoder and VAE of tinysd/data/shapes stay frozen; the loss is the U-Net's own
ε-prediction loss ‖ε − ε_θ(z_t, t, c, control)‖² on the shapes training scenes, with the Canny
edges of each scene (tinysd.hints.canny, thresholds 100/200, as A1111's default) as the control
image. Half of the captions are emptied and a quarter lose their position words, as the
ControlNet paper drops prompts: the edge map alone must then say where the object is.

The machine is a shared 2-core CPU, so the recipe is made to learn in a few hundred steps: a
constant learning rate after a short warm-up, large timesteps drawn more often (t = ⌊1000(1 − u²)⌋,
71% above 500: where and what the object is gets decided early in sampling, so that is where the
control matters most), and a run that stops after --minutes and can be resumed. Every
--eval-every steps diffusers' ControlNet pipeline draws a few held-out edge maps and
evaluate_shapes.measure checks the object's position and shape.

Writes the ControlNet with save_pretrained (fp16) to tinysd/data/shapes-canny/ and once more in
the original single-file layout (`control_model.*`, as control_v11p_sd15_canny.safetensors) to
tinysd/data/shapes-canny.safetensors. `training/evaluate_shapes_controlnet.py` measures it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

# Idle OpenMP threads must sleep, not spin: on a shared machine spinning threads burned ~20× the
# CPU time of the work itself (8 CPU-s per step instead of 0.4). libgomp reads this when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import shapes_data  # noqa: E402
from train_shapes import SCALING_FACTOR, Checkpointer, encode_all, plot_losses, step_rng  # noqa: E402

SHAPES = REPO / "tinysd" / "data" / "shapes"
# The hint encoder: 64×64 edges -> 8×8 (three stride-2 convs), narrower than SD's (16, 32, 96, 256).
CONDITIONING_CHANNELS = (16, 32, 64, 64)
CANNY = (100, 200)


@torch.no_grad()
def init_hint_encoder(controlnet, seed):
    """He-normal weights and zero biases for the hint encoder's convs (conv_out stays zero).

    With PyTorch's default init (uniform ±1/√fan_in, biases as large as weights) seven conv + SiLU
    layers shrink the hint to ~0.1% of features made by the biases alone: measured here, the edge
    map then moved the residuals by 3·10⁻⁷ after 600 steps, and the ControlNet learned to be a
    fine-tune of the U-Net that ignores its hint. He init (std √(2/fan_in), zero bias) keeps the
    hint's signal at full scale through the stack, so the zero convs see it from step one.
    """
    g = torch.Generator().manual_seed(seed)
    emb = controlnet.controlnet_cond_embedding
    for conv in [emb.conv_in, *emb.blocks]:
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / conv.weight[0].numel()) ** 0.5)
        conv.bias.zero_()


def load_shapes():
    """The frozen shapes model's parts, float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(SHAPES / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(SHAPES / "vae", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(SHAPES / "text_encoder", torch_dtype=torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(str(SHAPES / "tokenizer"))
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval()
    return unet, vae, text_encoder, tokenizer


def canny_edges(image):
    """(64, 64, 3) uint8 scene -> (64, 64) uint8 Canny edges (255 on edges)."""
    from tinysd.hints import canny

    return canny(image, *CANNY)


def as_hint(edges):
    """(B, 64, 64) uint8 edges -> (B, 3, 64, 64) float in [0, 1], as the pipeline feeds a ControlNet."""
    return (edges.float() / 255)[:, None].expand(-1, 3, -1, -1).contiguous()


def caption_without_position(scene, rng):
    """The scene's objects and (half the time) its background, without saying where anything is."""
    things = " and ".join(shapes_data.describe(t, rng.random() < 0.5) for t in scene.things)
    return things + (f" on a {scene.background} background" if rng.random() < 0.5 else "")


def make_dataset(vae, tokenizer, args):
    """Latents (μ, σ), edge maps and token ids of --dataset-size scenes, cached in the work folder.

    Scenes come from their own seed stream and never contain a held-out (colour, shape, position)
    triple; each caption is the full one (25%), one without position words (25%) or empty (50%).
    """
    cache = Path(args.work) / "dataset.pt"
    if args.resume and cache.exists():
        return torch.load(cache)
    rng = np.random.default_rng((args.seed, 7))
    scenes = [shapes_data.sample_scene(rng, pairs=shapes_data.VERTICAL_PAIRS) for _ in range(args.dataset_size)]
    images = np.stack([shapes_data.render(s) for s in scenes])
    edges = torch.from_numpy(np.stack([canny_edges(im) for im in images]))      # (N, 64, 64) uint8
    captions = []
    for scene in scenes:
        r = rng.random()
        captions.append("" if r < 0.5 else shapes_data.caption(scene, rng) if r < 0.75
                        else caption_without_position(scene, rng))
    mean, std = encode_all(vae, images)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    data = {"mean": mean, "std": std, "edges": edges, "ids": ids, "captions": captions}
    torch.save(data, cache)
    return data


def train_controlnet(controlnet, unet, text_encoder, tokenizer, vae, data, args):
    """ε-prediction with the ControlNet's residuals added to the frozen U-Net; only the ControlNet
    learns. Stops at --steps or after --minutes; checkpoints every --save-every steps."""
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    scheduler = DDPMScheduler.from_config(json.loads((SHAPES / "scheduler" / "scheduler_config.json").read_text()))
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = Checkpointer(args.work, "controlnet")
    start, log = ckpt.load({"controlnet": controlnet}, optimizer) if args.resume else (0, [])
    losses = [entry for entry in log if isinstance(entry, float)]
    evals = [entry for entry in log if isinstance(entry, dict)]
    n, began = len(data["ids"]), time.time()
    controlnet.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="controlnet", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        rng, gen = step_rng(args.seed, 8, step)
        idx = torch.from_numpy(rng.integers(0, n, size=args.batch))
        z0 = SCALING_FACTOR * (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen))
        u = torch.rand(args.batch, generator=gen)
        t = torch.floor((1 - u ** 2) * scheduler.config.num_train_timesteps).long().clamp(max=999)
        eps = torch.randn(z0.shape, generator=gen)
        z_t = scheduler.add_noise(z0, eps, t)
        with torch.no_grad():
            context = text_encoder(data["ids"][idx])[0]
        down, mid = controlnet(z_t, t, context, controlnet_cond=as_hint(data["edges"][idx]), return_dict=False)
        pred = unet(z_t, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        done = step + 1 == args.steps or (time.time() - began) / 60 > args.minutes
        if (step + 1) % args.eval_every == 0 or done:
            controlnet.eval()
            evals.append({"step": step + 1, **quick_eval(controlnet, unet, text_encoder, tokenizer, vae)})
            print(json.dumps(evals[-1]), flush=True)
            controlnet.train()
        if (step + 1) % args.save_every == 0 or done:
            ckpt.save(step + 1, {"controlnet": controlnet}, optimizer, losses + evals)
        if done:
            break
    controlnet.eval()
    return losses, evals


@torch.no_grad()
def quick_eval(controlnet, unet, text_encoder, tokenizer, vae, n=12, steps=10):
    """Position and shape accuracy on n held-out edge maps, prompts without position, diffusers' pipeline."""
    import evaluate_shapes
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
    from PIL import Image

    sched = DPMSolverMultistepScheduler.from_config(json.loads((SHAPES / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             controlnet=controlnet, scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    scenes = held_out_scenes(n)
    controls = [Image.fromarray(canny_edges(shapes_data.render(s))).convert("RGB") for s in scenes]
    prompts = [f"a {s.things[0].colour} {s.things[0].shape}" for s in scenes]
    images = pipe(prompts, image=controls, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    got = [evaluate_shapes.measure((im * 255).round().astype(np.uint8)) for im in images]
    return {"position": float(np.mean([g["position"] == s.things[0].position for g, s in zip(got, scenes)])),
            "shape": float(np.mean([g["shape"] == s.things[0].shape for g, s in zip(got, scenes)]))}


def held_out_scenes(n, seed=1000):
    """n one-object scenes whose (colour, shape, position) is held out of training, from their own seed."""
    rng = np.random.default_rng(seed)
    triples = sorted(shapes_data.HELD_OUT)
    scenes = []
    for i in range(n):
        colour, shape, position = triples[i % len(triples)]
        thing = shapes_data.make_thing(rng, shape, colour, position, rng.choice(list(shapes_data.RADII)))
        scenes.append(shapes_data.Scene((thing,), str(rng.choice(list(shapes_data.BACKGROUNDS)))))
    return scenes


def publish(controlnet, out):
    """save_pretrained as fp16 (plain file name), and the original single-file layout beside it."""
    from safetensors.numpy import save_file

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    half = copy.deepcopy(controlnet).to(torch.float16)
    half.save_pretrained(out, safe_serialization=True)
    sys.path.insert(0, str(REPO / "tests"))
    from controlnet_reference import controlnet_to_original

    state = {k: v.numpy() for k, v in half.state_dict().items()}
    single = out.with_suffix(".safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in controlnet_to_original(state).items()}, str(single))
    for f in [single, *out.rglob("*")]:
        f.chmod(0o755 if f.is_dir() else 0o644)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "tinysd" / "data" / "shapes-canny"), help="where the ControlNet is written")
    p.add_argument("--work", default="/tmp/tinysd-shapes-canny-work", help="checkpoint, dataset cache, loss log")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dataset-size", type=int, default=8000)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=60.0, help="stop (and publish) after this much training time")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--plot", default=str(HERE / "shapes_canny_loss.png"))
    return p.parse_args(argv)


def main(argv=None):
    from diffusers import ControlNetModel

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    unet, vae, text_encoder, tokenizer = load_shapes()
    torch.manual_seed(args.seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    init_hint_encoder(controlnet, args.seed)
    controlnet.requires_grad_(True)
    began = time.time()
    data = make_dataset(vae, tokenizer, args)
    print(f"dataset: {len(data['ids'])} scenes in {(time.time() - began) / 60:.1f} min")
    losses, evals = train_controlnet(controlnet, unet, text_encoder, tokenizer, vae, data, args)
    publish(controlnet, args.out)
    plot_losses({"controlnet": losses}, args.plot)
    log = {"args": vars(args), "minutes": (time.time() - began) / 60, "steps": len(losses),
           "final_loss": float(np.mean(losses[-100:])), "evaluations": evals,
           "parameters": sum(p.numel() for p in controlnet.parameters())}
    (Path(args.work) / "train_log.json").write_text(json.dumps(log, indent=1))
    (HERE / "shapes_canny_train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: log[k] for k in ("minutes", "steps", "final_loss", "parameters")}))


if __name__ == "__main__":
    main()
