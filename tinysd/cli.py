"""The command line: `python -m tinysd "a cat in space"` (or the `tinysd` script).

    python -m tinysd "a cat in space" --seed 42 --sampler euler_a -o cat.png
    python -m tinysd "a watercolour cat" --init-image cat.png --strength 0.6
    python -m tinysd "a dog" --init-image cat.png --mask cat-mask.png
    python -m tinysd "a castle" --hr-scale 2 --hr-denoise 0.5             # hires fix: 512 -> 1024
    python -m tinysd "a beach" --init-image cat.png --outpaint left=128,right=128
    python -m tinysd upscale cat.png --scale 2 --prompt "a cat"          # SD upscale, tile by tile
    python -m tinysd "a (red:1.3) car, [blurry]" -n "EasyNegative" --embeddings-dir embeddings --clip-skip 2
    python -m tinysd "a cat <lora:watercolor:0.8>" --lora-dir loras/ --lora lcm-lora.safetensors
    python -m tinysd "a cat" --lora lcm-lora-sdv1-5.safetensors --sampler lcm --steps 4 --cfg-scale 1 --taesd madebyollin/taesd
    python -m tinysd "a red circle" --model shapes --control-net shapes-canny --control-image edges.png
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
    add_control_options(p)
    add_bigger_options(p)
    return p


# ControlNet: repeatable groups of options
CONTROL_HELP = """Each --control-net starts a ControlNet unit; the --control-* options that follow it, up to the
next --control-net, belong to that unit. Repeat the group for several ControlNets, e.g.
--control-net a.safetensors --control-image edges.png --control-scale 0.8
--control-net b.pth --control-image pose.png --control-start 0 --control-end 0.5"""


class ControlOption(argparse.Action):
    """--control-net appends a unit to `args.control_units`; the other --control-* options fill in
    the last unit, so a group's options pair up by position on the command line."""

    def __call__(self, parser, namespace, value, option_string=None):
        units = list(getattr(namespace, "control_units", None) or [])
        if self.dest == "control_net":
            units.append({"control_net": value})
        elif not units:
            raise UsageError(f"{option_string} must follow the --control-net it belongs to")
        elif self.dest in units[-1]:
            raise UsageError(f"{option_string} given twice for --control-net {units[-1]['control_net']} "
                             f"(start the next unit with another --control-net)")
        else:
            units[-1][self.dest] = value
        namespace.control_units = units


def fraction(text):
    value = number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def preprocessor(text):
    from tinysd.hints import parse_preprocessor

    try:
        parse_preprocessor(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_control_options(p):
    g = p.add_argument_group("ControlNet", CONTROL_HELP)
    unit = dict(action=ControlOption, default=argparse.SUPPRESS)
    g.add_argument("--control-net", dest="control_net", metavar="PATH", **unit,
                   help="a ControlNet: diffusers folder, control_*.safetensors/.pth file, or 'shapes-canny'; starts a unit")
    g.add_argument("--control-image", dest="control_image", metavar="PATH", **unit,
                   help="the unit's control image (edges, depth, pose, ...), resized to the output size (required)")
    g.add_argument("--control-scale", dest="control_scale", type=guidance, metavar="S", **unit,
                   help="the unit's weight on its residuals (default: 1.0; 0.8 with --init-image, 0.5 with --mask, as diffusers)")
    g.add_argument("--control-start", dest="control_start", type=fraction, metavar="A", **unit,
                   help="the fraction of the steps after which the unit starts acting (default: 0)")
    g.add_argument("--control-end", dest="control_end", type=fraction, metavar="B", **unit,
                   help="the fraction of the steps after which it stops (default: 1)")
    g.add_argument("--control-preprocess", dest="control_preprocess", type=preprocessor, metavar="NAME", **unit,
                   help="make the hint from --control-image first: canny[:LOW:HIGH] (default 100:200), blur[:SIGMA], "
                        "tile[:RATE], invert, scribble[:LEVEL], or none (default: none, the image is the hint)")
    g.add_argument("--guess-mode", action="store_true",
                   help="ControlNets see the conditional half of the guidance batch only, residuals scaled 0.1 -> 1 "
                        "(diffusers' guess_mode; works with an empty prompt)")
    p.set_defaults(control_units=[])


def control_arguments(args):
    """(ControlNet sources or None, keyword arguments of the pipeline call) of the --control-* units;
    the control images are read here, before the model loads."""
    units = args.control_units
    if not units:
        return None, {}
    images = [read_image(u["control_image"], "--control-image", "RGB") for u in units]
    scales = [u.get("control_scale") for u in units]
    return [u["control_net"] for u in units], dict(
        control_image=images, controlnet_conditioning_scale=None if all(s is None for s in scales) else scales,
        control_guidance_start=[u.get("control_start", 0.0) for u in units],
        control_guidance_end=[u.get("control_end", 1.0) for u in units],
        control_preprocess=[u.get("control_preprocess") for u in units], guess_mode=args.guess_mode)


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the picture to inpaint)")
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image")
    if args.deepcache_branch is not None and args.deepcache is None:
        raise UsageError("--deepcache-branch needs --deepcache N")
    if args.init_image is not None and args.strength is None:
        args.strength = DEFAULT_STRENGTH["inpaint" if args.mask or args.outpaint else "img2img"]
    for unit in args.control_units:
        if "control_image" not in unit:
            raise UsageError(f"--control-net {unit['control_net']}: no --control-image after it")
        if unit.get("control_start", 0.0) >= unit.get("control_end", 1.0):
            raise UsageError(f"--control-net {unit['control_net']}: --control-start {unit.get('control_start', 0.0)} must be "
                             f"below --control-end {unit.get('control_end', 1.0)}")
    if args.guess_mode and not args.control_units:
        raise UsageError("--guess-mode needs a --control-net")
    if args.preview is not None and args.taesd is None:
        raise UsageError("--preview needs --taesd PATH (the tiny autoencoder that draws the previews)")
    if args.preview is not None and not args.preview.lower().endswith(".png"):
        raise UsageError(f"--preview {args.preview}: the file name must end in .png")
    check_bigger_args(args)
    return args


# output files
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


# inputs
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


# bigger pictures: the hires fix, outpainting, VAE tiling, and `tinysd upscale`
HIRES_FLAGS = {"hr_scale": "hr_scale", "hr_upscaler": "hr_upscaler", "hr_steps": "hr_second_pass_steps",
               "hr_denoise": "denoising_strength", "hr_resize_x": "hr_resize_x", "hr_resize_y": "hr_resize_y",
               "hr_sampler": "hr_sampler_name", "hr_prompt": "hr_prompt", "hr_negative_prompt": "hr_negative_prompt"}


def positive_number(text):
    value = number(text, float)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_int(text):
    value = number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def upscaler(text):
    from tinysd.upscale import canonical_upscaler

    try:
        return canonical_upscaler(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def sides(text):
    """'left=128,right=0,up=64,down=0' (any of the four, in any order) -> {side: pixels}."""
    from tinysd.outpaint import SIDES

    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in SIDES or not value.strip():
            raise argparse.ArgumentTypeError(f"expected SIDE=PIXELS for SIDE in {', '.join(SIDES)} "
                                             f"(e.g. left=128,up=64), got {part!r}")
        out[name] = non_negative_int(value.strip())
    return out


def add_bigger_options(p):
    hires = p.add_argument_group("hires fix (A1111's): draw at -W x -H, upscale, repaint at the larger size")
    hires.add_argument("--hr-scale", type=positive_number, default=None, metavar="X",
                       help="turn the hires fix on and upscale by X (A1111's default: 2)")
    hires.add_argument("--hr-resize-x", type=image_size, default=None, metavar="PX",
                       help="turn the hires fix on and upscale to this width (the height follows the aspect)")
    hires.add_argument("--hr-resize-y", type=image_size, default=None, metavar="PX",
                       help="turn the hires fix on and upscale to this height (both: cover, then crop)")
    hires.add_argument("--hr-upscaler", type=upscaler, default=None, metavar="NAME",
                       help="Latent (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic "
                            "antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', Lanczos or Nearest")
    hires.add_argument("--hr-steps", type=non_negative_int, default=None, metavar="N",
                       help="second-pass steps (default 0: as many as --steps)")
    hires.add_argument("--hr-denoise", type=strength, default=None, metavar="X",
                       help="the second pass's denoising strength (A1111's default: 0.75)")
    hires.add_argument("--hr-sampler", type=sampler, default=None, metavar="NAME",
                       help="the second pass's sampler (default: --sampler's)")
    hires.add_argument("--hr-prompt", default=None, metavar="TEXT",
                       help="the second pass's prompt (default: the prompt)")
    hires.add_argument("--hr-negative-prompt", default=None, metavar="TEXT",
                       help="the second pass's negative prompt (default: --negative-prompt)")
    big = p.add_argument_group("large pictures")
    big.add_argument("--outpaint", type=sides, default=None, metavar="left=PX,right=PX,up=PX,down=PX",
                     help="extend --init-image by these pixels and paint the new border")
    big.add_argument("--mask-blur", type=non_negative_int, default=None, metavar="PX",
                     help="--outpaint's seam feathering (A1111's Mask blur, default 4)")
    big.add_argument("--keep-unmasked", action=argparse.BooleanOptionalAction, default=True,
                     help="paste the original pixels back outside --mask / the outpainted border (default: on)")
    big.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                     help="encode and decode in tiles (default: only above the VAE's memory budget, about "
                          "1180x1180 for SD v1)")


def check_bigger_args(args):
    hires_on = args.hr_scale is not None or args.hr_resize_x is not None or args.hr_resize_y is not None
    for flag in HIRES_FLAGS:
        if getattr(args, flag) is not None and not hires_on:
            raise UsageError(f"--{flag.replace('_', '-')} needs --hr-scale or --hr-resize-x/-y (the hires fix)")
    if hires_on and args.init_image is not None:
        raise UsageError("the hires fix (--hr-scale, --hr-resize-x/-y) is txt2img's: not with --init-image")
    if args.outpaint is not None:
        if args.init_image is None:
            raise UsageError("--outpaint needs --init-image (the picture to extend)")
        if args.mask is not None:
            raise UsageError("--outpaint makes its own mask: not with --mask")
        if args.width is not None or args.height is not None:
            raise UsageError("--outpaint's size is --init-image's plus the new border: not with -W/-H")
    elif args.mask_blur is not None:
        raise UsageError("--mask-blur is --outpaint's")


def bigger_kwargs(args):
    """The keyword arguments of the hires fix, outpainting and keep-unmasked flags."""
    kwargs = {"keep_unmasked": args.keep_unmasked}
    if args.outpaint is not None:
        kwargs.update(args.outpaint, **({} if args.mask_blur is None else {"mask_blur": args.mask_blur}))
    hires = {name: getattr(args, flag) for flag, name in HIRES_FLAGS.items() if getattr(args, flag) is not None}
    if "hr_scale" in hires or "hr_resize_x" in hires or "hr_resize_y" in hires:
        kwargs.update(enable_hr=True, **hires)
    return kwargs


def set_vae_tiling(sd, tiling):
    if tiling is not None:
        sd.enable_vae_tiling() if tiling else sd.disable_vae_tiling()


UPSCALE_SHARED = ("negative_prompt", "steps", "guidance_scale", "seed", "sampler", "output", "model", "vae", "backend",
                  "vae_tiling", "embeddings_dir", "clip_skip", "prompt_weighting", "lora", "lora_dir")


def build_upscale_parser():
    """`tinysd upscale IMAGE ...`: its own options, and the main parser's generation options (the
    same argparse actions, so their defaults and help are written once)."""
    p = Parser(prog="tinysd upscale", description="AUTOMATIC1111's SD upscale: upscale IMAGE, then repaint it "
                                                 "tile by tile with img2img (memory stays one tile's)")
    p.add_argument("image", metavar="IMAGE", help="the picture to upscale")
    p.add_argument("-p", "--prompt", default="", help="what the tiles show (default: none)")
    p.add_argument("--scale", type=positive_number, default=2.0, metavar="X", help="upscale by X (default: 2)")
    p.add_argument("--upscaler", default="Lanczos", choices=("Lanczos", "Nearest"),
                   help="the image upscaler (default: %(default)s)")
    p.add_argument("--tile-size", type=image_size, default=None, metavar="PX",
                   help="tile side, a multiple of 8 (default: the model's size, 512 for SD v1)")
    p.add_argument("--overlap", type=non_negative_int, default=None, metavar="PX",
                   help="least overlap of neighbouring tiles, blended (default: an eighth of a tile, 64 for 512)")
    p.add_argument("--strength", type=strength, default=0.3, metavar="X",
                   help="how far each tile's img2img moves from the upscaled picture (default: %(default)s)")
    for action in build_parser()._actions:
        if action.dest in UPSCALE_SHARED:
            p._add_action(action)
    return p


def parse_upscale_args(argv):
    return build_upscale_parser().parse_args(argv)


class TileProgress(Progress):
    """A bar over the upscale's tiles (`sd.num_tiles`); each tile's denoising step shows beside it."""

    def __call__(self, step, timestep, latents):
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.sd.num_tiles, unit="tile", desc="tiles", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(f"step {step + 1}/{self.sd.num_timesteps}")

    def tile_done(self, index, count, tile):
        self.bar.update(1)


def upscale(args):
    import tinysd
    from tinysd.backend import get_backend
    from tinysd.pngmeta import infotext

    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 32)
    paths = output_paths(args.output, seed, 1)
    check_writable(paths)
    image = read_image(args.image, "IMAGE", "RGB")
    prompt, written_prompt, loras = prompt_addons(args)
    sd = tinysd.load(args.model, backend=get_backend(args.backend), vae=args.vae)
    apply_prompt_addons(sd, loras, args.embeddings_dir)
    set_vae_tiling(sd, args.vae_tiling)
    progress = TileProgress(sd)
    try:
        out = sd.upscale(prompt, image, scale=args.scale, upscaler=args.upscaler, tile_size=args.tile_size,
                         overlap=args.overlap, strength=args.strength, negative_prompt=args.negative_prompt or None,
                         num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=seed,
                         scheduler=args.sampler, callback=progress, tile_callback=progress.tile_done,
                         **prompt_reading(args))
    finally:
        progress.close()
    save_pngs(out.images, paths, [infotext(written_prompt, args.negative_prompt, out.parameters)])
    print(f"{paths[0]} ({out.images[0].width}x{out.images[0].height}, seed {seed})")
    return 0


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


def prompt_addons(args):
    """lora_requests(args), after checking --embeddings-dir: the prompt-side files, checked before
    the model loads."""
    if args.embeddings_dir is not None and not Path(args.embeddings_dir).is_dir():
        raise UsageError(f"--embeddings-dir {args.embeddings_dir}: no such folder")
    return lora_requests(args)


def apply_prompt_addons(sd, requests, embeddings_dir):
    """The LoRAs of `requests` (from lora_requests) and the embeddings under `embeddings_dir`."""
    from tinysd import embeddings

    for name, path, _, _ in requests:
        sd.load_lora_weights(path, adapter_name=name)
    if requests:
        sd.set_adapters([r[0] for r in requests], [{"text_encoder": r[2], "unet": r[3]} for r in requests])
    if embeddings_dir is not None:
        embeddings.load_dir(sd, embeddings_dir)    # each under its file name; bad files skipped, with a warning


def prompt_reading(args):
    """The pipeline's arguments for how the prompt is read: A1111's syntax or diffusers', clip skip
    (A1111's 1 = diffusers' 0)."""
    return dict(prompt_weighting=args.prompt_weighting, clip_skip=args.clip_skip - 1)


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


# the run
def generate(args):
    timings = Timings()
    import tinysd
    import tinysd.pipeline  # noqa: F401  (timed as imports, not as load)
    from tinysd.backend import get_backend
    from tinysd.pngmeta import batch_fields, infotext

    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 32)
    paths = output_paths(args.output, seed, args.batch_size)
    check_writable(paths + ([Path(args.preview)] if args.preview else []))
    init = read_image(args.init_image, "--init-image", "RGB") if args.init_image else None
    mask = read_image(args.mask, "--mask", "L") if args.mask else None
    if init is not None:
        check_init_size(init, args.init_image, args)
    prompt, written_prompt, loras = prompt_addons(args)
    controlnets, control = control_arguments(args)

    backend = get_backend(args.backend)                 # --backend cuda without a GPU fails here
    timings.mark("imports")
    sd = tinysd.load(args.model, backend=backend, vae=args.vae, taesd=args.taesd, controlnet=controlnets)
    apply_prompt_addons(sd, loras, args.embeddings_dir)
    set_vae_tiling(sd, args.vae_tiling)
    timings.mark("load")
    progress = callback = Progress(sd)
    if args.preview:            # TAESD draws the previews, the VAE the final image
        from tinysd.taesd import preview_callback
        callback = preview_callback(sd, args.preview, every=args.preview_every, callback=progress)
    run = sd.outpaint if args.outpaint else sd
    try:
        out = run(prompt, negative_prompt=args.negative_prompt or None, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=seed,
                  scheduler=args.sampler, image=init, strength=args.strength, mask_image=mask,
                  num_images_per_prompt=args.batch_size, output_type="pil", callback=callback,
                  **prompt_reading(args),
                  vae_decoder="taesd" if args.taesd and not args.preview else "vae",
                  deepcache_interval=args.deepcache, deepcache_branch=args.deepcache_branch or 0,
                  **control, **bigger_kwargs(args))
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


# training subcommands (tinysd.train)
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


SUBCOMMANDS = {   # first word -> function(argv) -> exit status; `tinysd -- upscale` draws the word
    "upscale": lambda argv: upscale(parse_upscale_args(argv)),
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
