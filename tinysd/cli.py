"""The command line: `python -m tinysd "a cat in space"` (or the `tinysd` script).

    python -m tinysd "a cat in space" --seed 42 --sampler euler_a -o cat.png
    python -m tinysd "a watercolour cat" --init-image cat.png --strength 0.6
    python -m tinysd "a dog" --init-image cat.png --mask cat-mask.png
    python -m tinysd "a (red:1.3) car, [blurry]" -n "EasyNegative" --embeddings-dir embeddings --clip-skip 2
    python -m tinysd "a cat <lora:watercolor:0.8>" --lora-dir loras/ --lora lcm-lora.safetensors
    python -m tinysd "a cat" --lora lcm-lora-sdv1-5.safetensors --sampler lcm --steps 4 --cfg-scale 1 --taesd madebyollin/taesd
    python -m tinysd train-lora DATA --model shapes --rank 4 --steps 500 -o my.safetensors
    python -m tinysd train-embedding DATA --model shapes --token "<zorb>" --init-word star -o zorb.safetensors

A first word that names a subcommand (`SUBCOMMANDS`) runs it; anything else is a prompt
(`python -m tinysd -- train-lora` draws the words "train-lora").

Writes PNGs carrying their generation parameters in AUTOMATIC1111's format (`tinysd.pngmeta`).
A mistake (a bad option, an unreadable image, an unwritable path, a missing model or GPU) is
one line on stderr and a non-zero exit status, and leaves no file behind: the output folder is
checked before the model loads, and each PNG is written to a temporary file that is renamed
into place only once it is complete.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_STEPS = 20            # A1111's default; diffusers' is 50, too slow for a CPU
DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}   # diffusers' pipelines' defaults


class UsageError(Exception):
    """A mistake in the command line: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)     # one line, instead of argparse's usage block and exit


def number(text, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_int(text):
    value = number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def image_size(text):
    value = number(text, int)
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (the VAE scales by 8), got {value}")
    return value


def strength(text):
    value = number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def seed(text):
    value = number(text, int)
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def guidance(text):
    return number(text, float)


def clip_skip(text):
    value = number(text, int)
    if not 1 <= value <= 12:
        raise argparse.ArgumentTypeError(f"must be from 1 (the last layer) to 12, as in A1111, got {value}")
    return value


def sampler(text):
    from tinysd.schedulers import canonical_name

    try:
        return canonical_name(text)       # also takes A1111's names ("Euler a") and diffusers' class names
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def lora_file(text):
    """--lora PATH[:WEIGHT] -> (path, weight); the last ':' splits only if a number follows (C:\\x stays whole)."""
    import math

    path, sep, tail = text.rpartition(":")
    try:
        weight = float(tail) if sep and path else None
    except ValueError:
        weight = None
    if weight is None:
        return text, 1.0
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"the weight of {text!r} must be a finite number")
    return path, weight


def build_parser():
    from tinysd.schedulers import SCHEDULERS

    p = Parser(prog="tinysd", description="Stable Diffusion v1 text-to-image (and img2img, inpainting) in NumPy. "
                                          "The same weights, prompt, seed, sampler and steps give diffusers' picture.")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("-n", "--negative-prompt", default="", metavar="TEXT", help="what to steer away from")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, metavar="N",
                   help="denoising steps (default: %(default)s, as A1111; diffusers' default is 50, slow on a CPU)")
    p.add_argument("--guidance-scale", "--cfg-scale", dest="guidance_scale", type=guidance, default=DEFAULT_GUIDANCE,
                   metavar="S", help="classifier-free guidance: eps = eps_uncond + S*(eps_cond - eps_uncond); "
                                     "1 turns it off (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=None,
                   help="seed, as torch.Generator('cpu').manual_seed(SEED) in diffusers (default: random, printed)")
    p.add_argument("--sampler", type=sampler, default=None, metavar="NAME",
                   help=f"one of {', '.join(SCHEDULERS)} (default: the model's scheduler, pndm for SD v1.5)")
    p.add_argument("-W", "--width", type=image_size, default=None, metavar="PX",
                   help="image width, a multiple of 8 (default: 512 for SD v1, or the init image's width)")
    p.add_argument("-H", "--height", type=image_size, default=None, metavar="PX",
                   help="image height, a multiple of 8 (default: 512 for SD v1, or the init image's height)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.png",
                   help="where to write (default: tinysd-SEED.png; with --batch-size > 1, FILE-0.png, FILE-1.png, ...)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="ID|PATH",
                   help="Hugging Face model id, diffusers folder, or single .safetensors/.ckpt file "
                        "(default: %(default)s, downloaded on first use); --model shapes is a small model of "
                        "coloured shapes that ships with tinysd and works offline")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="a standalone VAE to decode (and encode) with instead of the model's own, e.g. "
                        "vae-ft-mse-840000-ema-pruned.safetensors (.safetensors/.ckpt, or a diffusers vae/ folder)")
    p.add_argument("--backend", choices=("numpy", "cpu", "cuda"), default=None,
                   help="numpy (reference), cpu (Numba kernels) or cuda (default: cpu where Numba runs, else numpy)")
    p.add_argument("--init-image", default=None, metavar="PATH", help="start from this image (img2img)")
    p.add_argument("--strength", type=strength, default=None, metavar="X",
                   help=f"how far to move away from --init-image, in (0, 1] (default: "
                        f"{DEFAULT_STRENGTH['img2img']}, {DEFAULT_STRENGTH['inpaint']} with --mask, as diffusers)")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="inpaint --init-image: white pixels are repainted, black ones kept")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="images of the prompt, denoised in one batch (default: %(default)s)")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="load every textual-inversion embedding (.pt, .bin, .safetensors) under DIR; a prompt uses "
                        "one by its file name, as in A1111")
    p.add_argument("--clip-skip", type=clip_skip, default=1, metavar="N",
                   help="take the text encoder's N-th layer from the end, as A1111: 1 = the last (default), "
                        "2 = the penultimate (anime fine-tunes)")
    p.add_argument("--no-prompt-weighting", dest="prompt_weighting", action="store_false",
                   help="read the prompt as diffusers does: no (word:1.2) weights or BREAK, cut at 77 tokens "
                        "(default: A1111's prompt syntax, any length)")
    p.add_argument("--lora", type=lora_file, action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="apply a LoRA file (kohya/A1111, diffusers or PEFT) with WEIGHT (default 1); repeatable")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="the folder where a prompt tag <lora:NAME:WEIGHT> finds NAME.safetensors (.pt, .ckpt, .bin), "
                        "as A1111's Lora folder")
    p.add_argument("--taesd", default=None, metavar="PATH|ID",
                   help="the tiny autoencoder TAESD (a diffusers folder or hub id such as madebyollin/taesd, "
                        "or taesd_decoder.safetensors/.pth): decodes the final image in a fraction of the VAE's "
                        "time; with --preview it only makes the previews and the VAE the final image")
    p.add_argument("--preview", default=None, metavar="FILE.png",
                   help="write a TAESD picture of the sampler's current estimate of the final image (x0) here "
                        "while denoising, replaced every --preview-every steps ({step} in the name numbers them); "
                        "needs --taesd")
    p.add_argument("--preview-every", type=positive_int, default=1, metavar="K",
                   help="preview every K steps, and at the last (default: %(default)s)")
    p.add_argument("--deepcache", type=positive_int, default=None, metavar="N",
                   help="DeepCache: run the whole U-Net on every N-th step only and, in between, just its shallow "
                        "branch on the cached deep features (N = 3: about 2.3x fewer seconds for 20 steps)")
    p.add_argument("--deepcache-branch", type=lambda text: number(text, int), default=None, metavar="K",
                   help="the skip connection where DeepCache's shallow branch ends: 0 (default) is the shallowest "
                        "and fastest, up to 11 for SD v1 (the package's cache_branch_id)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the picture to inpaint)")
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image")
    if args.deepcache_branch is not None and args.deepcache is None:
        raise UsageError("--deepcache-branch needs --deepcache N")
    if args.init_image is not None and args.strength is None:
        args.strength = DEFAULT_STRENGTH["inpaint" if args.mask else "img2img"]
    if args.preview is not None and args.taesd is None:
        raise UsageError("--preview needs --taesd PATH (the tiny autoencoder that draws the previews)")
    if args.preview is not None and not args.preview.lower().endswith(".png"):
        raise UsageError(f"--preview {args.preview}: the file name must end in .png")
    return args


# -- output files ------------------------------------------------------------------------------------
def output_paths(output, seed, batch_size):
    """The PNG path of each image: tinysd-SEED.png by default, numbered NAME-i.png for a batch."""
    path = Path(output) if output else Path(f"tinysd-{seed}.png")
    if path.suffix.lower() != ".png":
        raise UsageError(f"--output {output}: the file name must end in .png")
    if batch_size == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(batch_size)]


def check_writable(paths):
    """Fail now, before minutes of model loading and denoising, if a path cannot be written."""
    for path in paths:
        folder = path.parent
        if path.is_dir():
            raise UsageError(f"--output {path}: is a folder, not a file name")
        if not folder.is_dir():
            raise UsageError(f"--output {path}: the folder {folder} does not exist")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise UsageError(f"--output {path}: cannot write in {folder} ({e.strerror})") from None


def save_pngs(images, paths, parameters):
    """Write every image to a temporary file beside its target, then rename them all into place."""
    from tinysd.pngmeta import png_info

    temps = []
    try:
        for image, path, text in zip(images, paths, parameters):
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".png.tmp")
            temps.append(temp)
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=png_info(text))
            os.chmod(temp, 0o666 & ~umask())      # mkstemp makes it private; give it a new file's mode
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- inputs ------------------------------------------------------------------------------------------
def read_image(path, option, mode):
    from tinysd.pipeline import load_image

    try:
        return load_image(path, mode)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def check_init_size(image, path, args):
    """The output size defaults to --init-image's, rounded down to a multiple of 8: fail now, before the
    model loads, if a side of it rounds to 0. (--mask is resized to the picture, as in diffusers.)"""
    for side, given in ((image.width, args.width), (image.height, args.height)):
        if given is None and side < 8:
            raise UsageError(f"--init-image {path}: {image.width}x{image.height} pixels, under 8 pixels a side "
                             f"(sizes are multiples of 8); resize it, or pass -W and -H to set the output size")


class Progress:
    """A tqdm bar driven by the pipeline's `callback(step, timestep, latents)`; its length is the
    pipeline's own count of the run's U-Net steps (`sd.num_timesteps`), read at the first step."""

    def __init__(self, sd):
        self.sd, self.bar = sd, None
        self.last = time.perf_counter()

    def __call__(self, step, timestep, latents):
        from tqdm import tqdm

        if self.bar is None:         # made at the first step, once the pipeline has checked its arguments
            self.bar = tqdm(total=self.sd.num_timesteps, unit="step", desc="denoising", file=sys.stderr,
                            dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                                           "[{elapsed}<{remaining}{postfix}]")
        elif step == 0:              # a new denoising pass starts
            self.bar.reset(total=self.sd.num_timesteps)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now        # this step's U-Net call(s) and sampler update
        self.bar.set_postfix_str(f"{seconds:.2f} s/step, t={float(timestep):g}", refresh=False)
        self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def lora_requests(args):
    """(the prompt the model reads, the prompt written to the PNG, [(adapter name, path, text-encoder
    weight, U-Net weight)]) from --lora and the prompt's A1111 tags <lora:NAME:WEIGHT>. The model
    reads the prompt without its tags; the PNG keeps them, and gets <lora:NAME:WEIGHT> for each
    --lora as A1111 writes a LoRA it adds to the prompt itself. Files are checked before the model loads."""
    from tinysd.lora import find_lora_file, prompt_lora_tags

    try:
        prompt, tags = prompt_lora_tags(args.prompt)
    except ValueError as e:
        raise UsageError(str(e)) from None
    requests, written = [], args.prompt
    for path, weight in args.lora:
        if not Path(path).exists():
            raise UsageError(f"--lora {path}: no such file")
        requests.append((Path(path).stem, path, weight, weight))
        written += f"<lora:{Path(path).stem}:{weight}>"
    for tag in tags:
        if args.lora_dir is None:
            raise UsageError(f"prompt tag {tag.text}: pass --lora-dir DIR, the folder that holds {tag.name}.safetensors")
        path = find_lora_file(tag.name, args.lora_dir)
        if path is None:
            raise UsageError(f"prompt tag {tag.text}: no {tag.name}.safetensors (.pt, .ckpt, .bin) in --lora-dir {args.lora_dir}")
        requests.append((tag.name, path, tag.text_encoder, tag.unet))
    names = [r[0] for r in requests]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"LoRA {', '.join(twice)} is given twice (--lora and prompt tags name a LoRA by its file name)")
    return prompt, written, requests


def apply_loras(sd, requests):
    for name, path, _, _ in requests:
        sd.load_lora_weights(path, adapter_name=name)
    if requests:
        sd.set_adapters([r[0] for r in requests], [{"text_encoder": r[2], "unet": r[3]} for r in requests])


class Timings:
    """Seconds per phase of the run, wall and CPU (all threads), one line on stderr at the end when
    TINYSD_TIMINGS is set (benchmarks/bench_startup.py reads it): imports (the model code and the
    backend's kernels), load (weights), picture (the pipeline call: prompt, steps, decode; kernels
    compiled or read from Numba's cache on their first call), save (the PNGs)."""

    def __init__(self):
        self.phases, self.last = {}, (time.perf_counter(), time.process_time())

    def mark(self, phase):
        now = (time.perf_counter(), time.process_time())
        self.phases[phase], self.last = (now[0] - self.last[0], now[1] - self.last[1]), now

    def report(self):
        if os.environ.get("TINYSD_TIMINGS"):
            print("tinysd: timings: " + ", ".join(f"{k} {wall:.3f} s / {cpu:.3f} s CPU"
                                                  for k, (wall, cpu) in self.phases.items()), file=sys.stderr)


# -- the run -----------------------------------------------------------------------------------------
def generate(args):
    timings = Timings()
    import tinysd
    import tinysd.pipeline  # noqa: F401  (timed as imports, not as load)
    from tinysd import embeddings
    from tinysd.backend import get_backend
    from tinysd.pngmeta import batch_fields, infotext

    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 32)
    paths = output_paths(args.output, seed, args.batch_size)
    check_writable(paths + ([Path(args.preview)] if args.preview else []))
    init = read_image(args.init_image, "--init-image", "RGB") if args.init_image else None
    mask = read_image(args.mask, "--mask", "L") if args.mask else None
    if init is not None:
        check_init_size(init, args.init_image, args)
    if args.embeddings_dir is not None and not Path(args.embeddings_dir).is_dir():
        raise UsageError(f"--embeddings-dir {args.embeddings_dir}: no such folder")
    prompt, written_prompt, loras = lora_requests(args)

    backend = get_backend(args.backend)                 # --backend cuda without a GPU fails here
    timings.mark("imports")
    sd = tinysd.load(args.model, backend=backend, vae=args.vae, taesd=args.taesd)
    apply_loras(sd, loras)
    if args.embeddings_dir is not None:
        embeddings.load_dir(sd, args.embeddings_dir)    # each under its file name; bad files skipped, with a warning
    timings.mark("load")
    progress = callback = Progress(sd)
    if args.preview:            # TAESD draws the previews, the VAE the final image
        from tinysd.taesd import preview_callback
        callback = preview_callback(sd, args.preview, every=args.preview_every, callback=progress)
    try:
        out = sd(prompt, negative_prompt=args.negative_prompt or None, num_inference_steps=args.steps,
                 guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=seed,
                 scheduler=args.sampler, image=init, strength=args.strength, mask_image=mask,
                 num_images_per_prompt=args.batch_size, output_type="pil", callback=callback,
                 prompt_weighting=args.prompt_weighting, clip_skip=args.clip_skip - 1,   # A1111's 1 = diffusers' 0
                 vae_decoder="taesd" if args.taesd and not args.preview else "vae",
                 deepcache_interval=args.deepcache, deepcache_branch=args.deepcache_branch or 0)
    finally:
        progress.close()
    timings.mark("picture")

    texts = [infotext(written_prompt, args.negative_prompt, batch_fields(out.parameters, args.batch_size, i))
             for i in range(args.batch_size)]
    save_pngs(out.images, paths, texts)
    timings.mark("save")
    for path in paths:
        print(f"{path} (seed {seed})")
    timings.report()
    return 0


# -- training subcommands (tinysd.train) --------------------------------------------------------------
def training_parser(prog, description, lr):
    """The options train-lora and train-embedding share."""
    p = Parser(prog=f"tinysd {prog}", description=description)
    p.add_argument("data", metavar="DATA", help="a folder of pictures with a caption beside each (NAME.txt beside "
                                                "NAME.png/.jpg, as kohya's scripts read them); resized to the model's size")
    p.add_argument("-o", "--output", required=True, metavar="FILE.safetensors", help="where to write the result")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="ID|PATH", help="the model to train on (default: %(default)s; "
                                                                           "--model shapes is the small shipped one)")
    p.add_argument("--backend", choices=("numpy", "cpu"), default=None,
                   help="numpy (reference) or cpu (Numba kernels; default where Numba runs)")
    p.add_argument("--steps", type=positive_int, default=500, metavar="N", help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=4, metavar="N", help="pictures per micro-batch (default: %(default)s)")
    p.add_argument("--gradient-accumulation", type=positive_int, default=1, metavar="N",
                   help="micro-batches per optimiser step (default: %(default)s)")
    p.add_argument("--lr", type=guidance, default=lr, metavar="X", help="AdamW's learning rate (default: %(default)s)")
    p.add_argument("--lr-warmup", type=int, default=0, metavar="N", help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=guidance, default=None, metavar="X", help="AdamW's decoupled weight decay")
    p.add_argument("--min-snr-gamma", type=guidance, default=None, metavar="G",
                   help="min-SNR-γ loss weighting (5 is the paper's value; default: off)")
    p.add_argument("--seed", type=seed, default=0, help="seeds the draws of every step (default: %(default)s)")
    p.add_argument("--state", default=None, metavar="FILE",
                   help="save the run's state here (default: OUTPUT with .state.safetensors), to --resume from")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --state")
    p.add_argument("--save-every", type=int, default=100, metavar="N", help="save the state every N steps (default: %(default)s)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="loss plot (default: OUTPUT with -loss.png)")
    p.add_argument("--fit-latents", type=int, default=0, metavar="N",
                   help="refine each picture's latent by N steps of gradient descent through the VAE's decoder, for "
                        "content its encoder never saw (default: 0, the encoder's latents)")
    return p


def mean_tail(losses, n=20):
    return sum(losses[-n:]) / max(1, len(losses[-n:]))


def training_config(args, weight_decay):
    from tinysd.train import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation,
                       learning_rate=args.lr, lr_warmup_steps=args.lr_warmup,
                       weight_decay=weight_decay if args.weight_decay is None else args.weight_decay,
                       min_snr_gamma=args.min_snr_gamma, seed=args.seed)


def training_paths(args):
    """(output, state, plot) paths, checked before the model loads."""
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise UsageError(f"--output {output}: the file name must end in .safetensors")
    state = Path(args.state) if args.state else output.with_name(output.stem + ".state.safetensors")
    plot = Path(args.plot) if args.plot else output.with_name(output.stem + "-loss.png")
    check_writable([output, state, plot])
    if not Path(args.data).is_dir():
        raise UsageError(f"DATA {args.data}: no such folder")
    if args.resume and not state.is_file():
        raise UsageError(f"--resume: no saved state at {state}")
    return output, state, plot


def train_lora_command(argv):
    p = training_parser("train-lora", "Train a LoRA (kohya format) on the U-Net's attention projections.", lr=1e-4)
    p.add_argument("--rank", type=positive_int, default=4, metavar="R", help="the adapters' rank (default: %(default)s)")
    p.add_argument("--alpha", type=guidance, default=None, metavar="A", help="LoRA alpha: the update is scaled by "
                                                                             "alpha/rank (default: the rank)")
    p.add_argument("--text-encoder", action="store_true", help="also adapt the text encoder's attention")
    args = p.parse_args(argv)
    output, state, plot = training_paths(args)
    import tinysd
    from tinysd.backend import get_backend
    from tinysd.train import plot_losses, save_lora, train_lora

    sd = tinysd.load(args.model, backend=get_backend(args.backend))
    adapters, losses = train_lora(sd, args.data, training_config(args, 1e-2), rank=args.rank, alpha=args.alpha,
                                  text_encoder=args.text_encoder, state_path=state, resume=args.resume,
                                  save_every=args.save_every, fit_steps=args.fit_latents)
    save_lora(output, adapters)
    plot_losses(losses, plot, title=f"LoRA rank {args.rank}: loss")
    print(f"{output} ({len(adapters)} adapters, final loss {mean_tail(losses):.4f}); state {state}; loss plot {plot}")
    return 0


def train_embedding_command(argv):
    p = training_parser("train-embedding", "Train a textual-inversion embedding: new token vectors for a concept.", lr=5e-3)
    p.add_argument("--token", required=True, help="the new word, as the captions write it (e.g. '<zorb>')")
    p.add_argument("--init-word", default=None, metavar="WORD", help="start from this word's vectors (default: random)")
    p.add_argument("--vectors", type=positive_int, default=1, metavar="N", help="vectors per token (default: %(default)s)")
    p.add_argument("--diffusers-output", default=None, metavar="FILE",
                   help="also write diffusers' learned_embeds.safetensors format here")
    args = p.parse_args(argv)
    output, state, plot = training_paths(args)
    import tinysd
    from tinysd.backend import get_backend
    from tinysd.train import plot_losses, save_embedding, train_textual_inversion

    sd = tinysd.load(args.model, backend=get_backend(args.backend))
    vectors, losses = train_textual_inversion(sd, args.data, args.token, training_config(args, 0.0), args.vectors,
                                              args.init_word, state_path=state, resume=args.resume,
                                              save_every=args.save_every, fit_steps=args.fit_latents)
    save_embedding(output, vectors)
    if args.diffusers_output:
        save_embedding(args.diffusers_output, vectors, args.token, format="diffusers")
    plot_losses(losses, plot, title=f"embedding {args.token}: loss")
    print(f"{output} ({len(vectors)} vector(s), final loss {mean_tail(losses):.4f}); state {state}; loss plot {plot}")
    return 0


SUBCOMMANDS = {   # first word -> function(argv) -> exit status
    "train-lora": train_lora_command,
    "train-embedding": train_embedding_command,
}


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 bad usage, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        return generate(parse_args(argv))
    except UsageError as e:
        print(f"tinysd: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, RuntimeError, ImportError, MemoryError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__
        print("tinysd: error: " + " ".join(str(message).split()), file=sys.stderr)   # one line
        return 1
    except KeyboardInterrupt:
        print("tinysd: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:         # --help and --version exit through argparse
        return e.code if isinstance(e.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
