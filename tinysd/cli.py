"""The command line: `python -m tinysd "a cat in space"` (or the `tinysd` script).

    python -m tinysd "a cat in space" --seed 42 --sampler euler_a -o cat.png
    python -m tinysd "a watercolour cat" --init-image cat.png --strength 0.6
    python -m tinysd "a dog" --init-image cat.png --mask cat-mask.png

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


def sampler(text):
    from tinysd.schedulers import canonical_name

    try:
        return canonical_name(text)       # also takes A1111's names ("Euler a") and diffusers' class names
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
                        "(default: %(default)s)")
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
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.mask is not None and args.init_image is None:
        raise UsageError("--mask needs --init-image (the picture to inpaint)")
    if args.strength is not None and args.init_image is None:
        raise UsageError("--strength needs --init-image")
    if args.init_image is not None and args.strength is None:
        args.strength = DEFAULT_STRENGTH["inpaint" if args.mask else "img2img"]
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


def model_name(source):
    """What A1111 writes as "Model": the checkpoint file's stem, the folder's or the repo's name."""
    path = Path(source)
    return path.stem if path.is_file() else path.name


# -- inputs ------------------------------------------------------------------------------------------
def read_image(path, option, mode):
    from tinysd.pipeline import load_image

    try:
        return load_image(path, mode)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def model_sampler(scheduler_config):
    """The --sampler name of a model's own scheduler (scheduler/scheduler_config.json)."""
    from tinysd.schedulers import SCHEDULERS, canonical_name

    name = canonical_name(scheduler_config.get("_class_name", "PNDMScheduler"))
    karras = f"{name}_karras"
    return karras if scheduler_config.get("use_karras_sigmas") and karras in SCHEDULERS else name


def count_steps(sd, sampler, steps, strength):
    """How many U-Net steps the run takes: pndm takes one more, heun two per step but the last,
    img2img only the last `strength` of the schedule."""
    from tinysd.pipeline import strength_timesteps
    from tinysd.schedulers import make_scheduler

    sched = make_scheduler(sampler, sd.scheduler_config)
    sched.set_timesteps(steps)
    return len(sched.timesteps if strength is None else strength_timesteps(sched, steps, strength))


class Progress:
    """A tqdm bar driven by the pipeline's `callback(step, timestep, latents)`."""

    def __init__(self, total):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", desc="denoising", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        self.last = time.perf_counter()

    def __call__(self, step, timestep, latents):
        now = time.perf_counter()
        seconds, self.last = now - self.last, now        # this step's U-Net call(s) and sampler update
        self.bar.set_postfix_str(f"{seconds:.2f} s/step, t={float(timestep):g}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


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
    from tinysd.backend import get_backend
    from tinysd.pngmeta import format_parameters

    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 32)
    paths = output_paths(args.output, seed, args.batch_size)
    check_writable(paths)
    init = read_image(args.init_image, "--init-image", "RGB") if args.init_image else None
    mask = read_image(args.mask, "--mask", "L") if args.mask else None

    backend = get_backend(args.backend)                 # --backend cuda without a GPU fails here
    timings.mark("imports")
    sd = tinysd.load(args.model, backend=backend)
    timings.mark("load")
    sampler = args.sampler or model_sampler(sd.scheduler_config)
    progress = Progress(count_steps(sd, sampler, args.steps, args.strength if init else None))
    try:
        out = sd(args.prompt, negative_prompt=args.negative_prompt or None, num_inference_steps=args.steps,
                 guidance_scale=args.guidance_scale, height=args.height, width=args.width, seed=seed,
                 scheduler=sampler, image=init, strength=args.strength, mask_image=mask,
                 num_images_per_prompt=args.batch_size, output_type="pil", callback=progress)
    finally:
        progress.close()
    timings.mark("picture")

    width, height = out.images[0].size
    texts = [format_parameters(args.prompt, args.negative_prompt, args.steps, sampler, args.guidance_scale, seed,
                               width, height, model=model_name(args.model),
                               denoising_strength=args.strength if init else None,
                               batch_size=args.batch_size, batch_pos=i) for i in range(args.batch_size)]
    save_pngs(out.images, paths, texts)
    timings.mark("save")
    for path in paths:
        print(f"{path} (seed {seed})")
    timings.report()
    return 0


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 bad usage, 130 interrupted)."""
    try:
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
