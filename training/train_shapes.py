"""Train "shapes": a small SD v1 (same architecture, narrow) on captioned pictures of shapes.

    python training/train_shapes.py                      # ~55 min on 2 free CPU cores
    python training/train_shapes.py --resume             # continue from the work folder's checkpoints
    python training/train_shapes.py --vae-steps 20 --unet-steps 20 --out /tmp/shapes-debug   # smoke run

Two stages, as Stable Diffusion was trained (Rombach et al. 2022):

1. the autoencoder (AutoencoderKL): x -> z ~ N(μ, σ²) -> x̂, loss |x − x̂|₁ + ‖x − x̂‖² + β·KL(N(μ, σ²) ‖ N(0, 1))
   with a tiny β. Afterwards its latents are normalised per channel and the affine map is folded
   into quant_conv / post_quant_conv, so that 0.18215·z has unit variance: SD v1's scaling
   factor then holds exactly and the model loads like any SD v1 checkpoint.
2. the text encoder (CLIPTextModel) and the U-Net together, on the frozen autoencoder's latents,
   with the ε-prediction loss of DDPM (Ho et al. 2020):

       z_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε,   L = ‖ε − ε_θ(z_t, t, c)‖²,   t ~ U{0..999}

   under SD v1's schedule (scaled_linear β from 0.00085 to 0.012), with 10% of the captions
   emptied so that the model also learns ε_θ(z_t, t, ∅) for classifier-free guidance.

Every random draw of step s comes from a generator seeded by (seed, stage, s), so a run is
reproducible and `--resume` continues it exactly. The result is written with save_pretrained
(fp16 safetensors in the plain file names) plus the real CLIP tokenizer files and SD v1.5's
scheduler config, to tinysd/data/shapes/ by default, and once more as an original-layout single
file beside it (tinysd/data/shapes.safetensors).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SD15 = REPO / "tinysd" / "data" / "sd-v1-5"                      # SD v1.5's published configs
TOKENIZER = SD15 / "tokenizer"                                   # and its tokenizer files
SCALING_FACTOR = 0.18215                                         # SD v1's latent scale, kept as is

# SD v1's topology (block types, 2 ResNets per down block, 3 per up block, attention in the
# first three levels and the middle, 8 heads, 32 norm groups), only narrower. The U-Net's first
# width is 64 so that every GroupNorm(32) sees 2+ channels per group. CLIP keeps head size 64.
# The VAE is SD v1's too (4 levels = 8x down, 4 latent channels, mid-block attention) but with
# one ResNet per level and 32 channels at the two full-resolution levels: at 64 px those levels
# cost most of a training step, and flat-coloured shapes need little width there.
UNET = dict(block_out_channels=[64, 64, 64, 64], cross_attention_dim=64, sample_size=8)
VAE = dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64)
TEXT = dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=3, intermediate_size=256, projection_dim=64)


def sd15_config(part):
    return json.loads((SD15 / part / "config.json").read_text())


def build_models(seed):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config({**sd15_config("vae"), **VAE})
    unet = UNet2DConditionModel.from_config({**sd15_config("unet"), **UNET})
    text_cfg = {k: v for k, v in sd15_config("text_encoder").items() if k not in ("architectures", "model_type")}
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**text_cfg, **TEXT}))
    return vae, unet, text_encoder


def step_rng(seed, stage, step):
    """(numpy, torch) generators for one step: draws depend only on (seed, stage, step)."""
    key = (seed, stage, step)
    return np.random.default_rng(key), torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))


def to_tensor(images):
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


class Checkpointer:
    """Saves and restores one stage's modules, optimizer, step and loss log in the work folder."""

    def __init__(self, work, stage):
        self.path = Path(work) / f"{stage}.pt"

    def save(self, step, modules, optimizer, losses):
        state = {"step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                 "optimizer": optimizer.state_dict(), "losses": losses}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def load(self, modules, optimizer):
        """(step, losses) to continue from, or (0, []) when there is no checkpoint."""
        if not self.path.exists():
            return 0, []
        state = torch.load(self.path, weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        optimizer.load_state_dict(state["optimizer"])
        return state["step"], state["losses"]


def train_loop(name, steps, modules, optimizer, loss_fn, args, peak_lr):
    """Run `loss_fn(step) -> loss` for `steps` steps with checkpoints every --save-every steps."""
    ckpt = Checkpointer(args.work, name)
    start, losses = ckpt.load(modules, optimizer) if args.resume else (0, [])
    for m in modules.values():
        m.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=min(100, steps // 10 + 1))
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            ckpt.save(step + 1, modules, optimizer, losses)
    for m in modules.values():
        m.eval()
    return losses


def object_weights(x, weight=10.0):
    """(B, 1, H, W): 1 on the background, 1 + weight on the objects (pixels unlike the border's median).

    The objects cover a few percent of the picture; without the extra weight the decoder learns
    the background long before it learns the objects' colours.
    """
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)   # (B, 3, 4W)
    background = border.median(dim=2).values[:, :, None, None]
    return 1 + weight * ((x - background).abs().sum(dim=1, keepdim=True) > 0.3).float()


def vae_loss(vae, images, kl_weight, generator):
    """Σ w·(|x − x̂| + (x − x̂)²) / Σ w + β·KL, with z sampled by the reparametrisation trick."""
    x = to_tensor(images)
    dist = vae.encode(x).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
    x_hat = vae.decode(z).sample
    w = object_weights(x)
    d = x_hat - x
    recon = (w * (d.abs() + d ** 2)).mean() / w.mean()
    kl = 0.5 * (dist.mean ** 2 + dist.var - 1 - dist.logvar).mean()
    return recon + kl_weight * kl


def train_vae(vae, args):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)

    def loss_fn(step):
        rng, gen = step_rng(args.seed, 1, step)
        images, _ = shapes_data.sample_batch(rng, args.vae_batch)
        return vae_loss(vae, images, args.kl_weight, gen)

    return train_loop("vae", args.vae_steps, {"vae": vae}, optimizer, loss_fn, args, args.vae_lr)


@torch.no_grad()
def check_reconstructions(vae, seed, n=300):
    """Colour, position and shape accuracy of the VAE's reconstructions of n one-object scenes.

    Measured like the final evaluation (evaluate_shapes.measure): a decoder that mixes up hues
    or blurs outlines caps what the U-Net can reach, so this is read before stage 2 starts.
    """
    import evaluate_shapes

    rng = np.random.default_rng((seed, 5))
    scenes = [shapes_data.sample_scene(rng, two_prob=0.0, allow_held_out=True) for _ in range(n)]
    images = np.stack([shapes_data.render(s) for s in scenes])
    x_hat = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample
    pictures = ((x_hat.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits = {"colour": [], "position": [], "shape": []}
    for scene, picture in zip(scenes, pictures):
        got, want = evaluate_shapes.measure(picture), scene.things[0]
        for k in hits:
            hits[k].append(got[k] == getattr(want, k))
    return {k: float(np.mean(v)) for k, v in hits.items()}


@torch.no_grad()
def encode_all(vae, images, batch=64):
    """Latent means and standard deviations (N, 4, 8, 8) of uint8 images (N, 64, 64, 3)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_tensor(images[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def normalise_latents(vae, images):
    """Fold z' = k·(z − m) into the VAE, with per-channel k, m making std(z') = 1/0.18215, mean 0.

    quant_conv yields [μ; log σ²]: μ' = k(μ − m), log σ'² = log σ² + 2 log k. post_quant_conv
    sees z = z'/k + m, so its weight is divided by k and W·m is added to its bias: the decoder's
    output is unchanged, and 0.18215·z' is what the U-Net is trained on.
    """
    mean, std = encode_all(vae, images)
    z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    m = z.mean(dim=(0, 2, 3))
    k = (1 / SCALING_FACTOR) / z.std(dim=(0, 2, 3))
    C = len(m)
    q = vae.quant_conv                      # 1x1 conv, 2C -> 2C outputs: C means, C log-variances
    q.weight[:C] *= k[:, None, None, None]
    q.bias[:C] = k * (q.bias[:C] - m)
    q.bias[C:] += 2 * torch.log(k)
    p = vae.post_quant_conv                 # 1x1 conv, C -> C
    p.bias += p.weight[:, :, 0, 0] @ m
    p.weight /= k[None, :, None, None]
    return {"latent_mean": m.tolist(), "latent_scale": k.tolist()}


def make_dataset(vae, tokenizer, args):
    """The frozen VAE's latents (μ, σ) and token ids of --dataset-size scenes, cached in the work folder."""
    cache = Path(args.work) / "dataset.pt"
    if args.resume and cache.exists():
        data = torch.load(cache)
        if data.get("pairs", "all") == args.pairs:
            return data
    rng = np.random.default_rng((args.seed, 2))
    pairs = shapes_data.VERTICAL_PAIRS if args.pairs == "vertical" else shapes_data.PAIRS
    images, captions = shapes_data.sample_batch(rng, args.dataset_size, pairs=pairs)
    mean, std = encode_all(vae, images)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    data = {"mean": mean, "std": std, "ids": ids, "captions": captions, "pairs": args.pairs}
    torch.save(data, cache)
    return data


def train_unet(unet, text_encoder, data, tokenizer, args):
    """ε-prediction on z_t = √ᾱ z_0 + √(1−ᾱ) ε, text encoder and U-Net trained together."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text()))
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.0)
    n = len(data["ids"])

    def loss_fn(step):
        rng, gen = step_rng(args.seed, 3, step)
        idx = torch.from_numpy(rng.integers(0, n, size=args.unet_batch))
        z0 = SCALING_FACTOR * (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen))
        ids = data["ids"][idx].clone()
        ids[torch.from_numpy(rng.random(args.unet_batch) < args.uncond_prob)] = empty   # 10%: ∅ for CFG
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.unet_batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        z_t = scheduler.add_noise(z0, eps, t)
        context = text_encoder(ids)[0]                    # last hidden state (B, 77, 64), as SD v1 uses
        return F.mse_loss(unet(z_t, t, context).sample, eps)

    return train_loop("unet", args.unet_steps, {"unet": unet, "text_encoder": text_encoder}, optimizer, loss_fn,
                      args, args.unet_lr)


def publish(vae, unet, text_encoder, out):
    """save_pretrained as fp16 safetensors (plain file names), the real tokenizer files, SD v1.5's scheduler."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        copy.deepcopy(model).to(torch.float16).save_pretrained(out / name, safe_serialization=True)
    shutil.copytree(TOKENIZER, out / "tokenizer")
    for f in (out / "tokenizer").iterdir():
        f.chmod(0o644)
    (out / "scheduler").mkdir()
    shutil.copy(SD15 / "scheduler" / "scheduler_config.json", out / "scheduler" / "scheduler_config.json")
    shutil.copy(TOKENIZER.parent / "model_index.json", out / "model_index.json")
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)


def write_single_file(folder, path):
    """The published folder's weights again in the original single-file layout
    (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.text_model.*),
    fp16, with the key mapping of the tests' reference models (the one diffusers' conversion
    script uses). The folder is read with tinysd's loader, which names the text encoder's keys
    as SD v1.5's files do (transformers 5 saves them without the `text_model.` prefix)."""
    from safetensors.numpy import save_file

    from tinysd.weights import load_checkpoint

    sys.path.insert(0, str(REPO / "tests"))
    from reference_models import diffusers_to_original

    tensors = diffusers_to_original(load_checkpoint(str(folder)).state_dicts)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    Path(path).chmod(0o644)


def plot_losses(losses, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses), figsize=(5 * len(losses), 3.2))
    for ax, (name, values) in zip(np.atleast_1d(axes), losses.items()):
        values = np.asarray(values)
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(values, alpha=0.3, lw=0.5)
        ax.plot(np.arange(len(smooth)) + window - 1, smooth)
        ax.set(title=f"{name} loss", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "tinysd" / "data" / "shapes"), help="where the model is written")
    p.add_argument("--work", default="/tmp/tinysd-shapes-work", help="checkpoints, dataset cache, loss log")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--dataset-size", type=int, default=16000)
    p.add_argument("--unet-steps", type=int, default=2500)
    p.add_argument("--unet-batch", type=int, default=64)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--pairs", choices=("all", "vertical"), default="all",
                   help="two-object scenes of the U-Net stage: all four arrangements (the shipped model), "
                        "or only above/below, so that left/right are one-object words only")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--plot", default=str(REPO / "training" / "shapes_loss.png"))
    return p.parse_args(argv)


def main(argv=None):
    from transformers import CLIPTokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    vae, unet, text_encoder = build_models(args.seed)
    began = time.time()

    losses = {"vae": train_vae(vae, args)}
    vae.requires_grad_(False)
    recon = check_reconstructions(vae, args.seed)
    print("VAE reconstructions, accuracy as measured by evaluate_shapes:", json.dumps(recon))
    stats_rng = np.random.default_rng((args.seed, 4))
    stats = normalise_latents(vae, shapes_data.sample_batch(stats_rng, 1000)[0])
    data = make_dataset(vae, tokenizer, args)
    losses["unet"] = train_unet(unet, text_encoder, data, tokenizer, args)

    publish(vae, unet, text_encoder, args.out)
    write_single_file(args.out, Path(args.out).with_suffix(".safetensors"))
    plot_losses(losses, args.plot)
    log = {"args": vars(args), "minutes": (time.time() - began) / 60, **stats,
           "vae_reconstruction_accuracy": recon,
           "final_loss": {k: float(np.mean(v[-100:])) for k, v in losses.items()}}
    (Path(args.work) / "train_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps({k: log[k] for k in ("minutes", "final_loss")}))


if __name__ == "__main__":
    main()
