"""The whole 512×512 picture, fast recipes: tinysd's `cpu` backend against diffusers doing the same.

    python benchmarks/bench_fast.py                                   # every recipe, 512×512 (long)
    python benchmarks/bench_fast.py --size 128 --recipes a,c,taesd    # a quick check
    python benchmarks/bench_fast.py --tiny --steps 2                  # the tests' tiny model: seconds

Recipes (prompt and seed fixed, the same start latents on both sides):
  a  20 PNDM steps, CFG 7.5, the full VAE (SD v1.5's default)
  b  LCM-LoRA: 4 LCM steps, guidance 1 (one U-Net pass per step), the full VAE
  c  the same, decoded by TAESD
  d  20 DPM++ 2M steps, CFG 7.5, DeepCache interval 3 (branch 0)
  e  20 DPM++ 2M steps, CFG 7.5: (d) without DeepCache
  taesd  TAESD decode of one latent alone (64×64 at 512×512)
diffusers runs them as a user would: `LCMScheduler` + `load_lora_weights`, `AutoencoderTiny` as
the pipeline's VAE, the DeepCache package's `DeepCacheSDHelper`.

Weights, all random and seeded: the SD v1.5-sized diffusers folder of bench_cpu.py, a LoRA of
the LCM-LoRA's shapes (bench_lora.py: rank 64, kohya keys, fp16) and a TAESD (diffusers'
`AutoencoderTiny()`, its default config = the published one), built once under --workdir.
Each (side, recipe) runs in its own process (its peak RSS is its own): load, one warm-up picture
at a quarter of the size and 2 steps (Numba's compiles, torch's first-call costs), then the timed
picture (text encoder, denoising loop, decode). The outputs are compared as images: mean |Δ| in
1/255 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import PROMPT, model_folder, run_worker, time_runs, worker_failed  # noqa: E402
from bench_lora import lcm_shaped_lora_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED = 0
SIDES = ("tinysd", "diffusers")
DIFFUSERS_SCHEDULER = {"pndm": "PNDMScheduler", "lcm": "LCMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


@dataclass
class Recipe:
    title: str
    scheduler: str = "pndm"
    steps: int = 20
    guidance_scale: float = 7.5
    lora: bool = False
    taesd: bool = False
    deepcache: int | None = None


RECIPES = {
    "a": Recipe("20 PNDM steps, CFG 7.5, VAE"),
    "b": Recipe("LCM-LoRA, 4 steps, guidance 1, VAE", "lcm", 4, 1.0, lora=True),
    "c": Recipe("LCM-LoRA, 4 steps, guidance 1, TAESD", "lcm", 4, 1.0, lora=True, taesd=True),
    "d": Recipe("20 DPM++ 2M steps, CFG 7.5, DeepCache 3", "dpmpp_2m", deepcache=3),
    "e": Recipe("20 DPM++ 2M steps, CFG 7.5", "dpmpp_2m"),
    "taesd": Recipe("TAESD decode of one latent alone", taesd=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default="a,b,c,d,e,taesd", help="comma-separated, run in this order: "
                                                                "a, b, c, d, e, taesd (default: all)")
    p.add_argument("--size", type=int, default=512, help="picture height and width (default 512)")
    p.add_argument("--steps", type=int, help="every recipe's step count (default: the recipe's own)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides (default: all)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model (and a rank-8 LoRA): a dry run")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinysd-bench"),
                   help="where the random weights are kept (about 4 GB)")
    p.add_argument("--json", type=Path, help="also write the results here (after every row)")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "RECIPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if set(args.recipe_list) - set(RECIPES):
        p.error(f"--recipes: unknown {sorted(set(args.recipe_list) - set(RECIPES))}; choose from {', '.join(RECIPES)}")
    if args.size < 64 or args.size % 8 or (args.steps is not None and args.steps < 1) or args.threads < 1:
        p.error("--size must be a multiple of 8 from 64, --steps and --threads at least 1")
    return args


def weight_files(args):
    """{model, lora, taesd}: the paths of the random weights (built by `prepare`)."""
    size = "tiny" if args.tiny else "sd-v1-5"
    rank = 8 if args.tiny else 64
    return {"model": args.workdir / f"{size}-random", "taesd": args.workdir / "taesd-random", "rank": rank,
            "lora": args.workdir / f"lcm-lora-shaped-{size}-r{rank}.safetensors"}


def prepare(args):
    from tinysd.unet import UNet2DConditionModel

    files = weight_files(args)
    model_folder(args.workdir, "tiny" if args.tiny else "sd-v1-5")
    if not files["lora"].exists():
        unet = UNet2DConditionModel(json.loads((files["model"] / "unet" / "config.json").read_text()))
        n = lcm_shaped_lora_file(files["lora"], unet, files["rank"], seed=2)
        print(f"wrote a rank-{files['rank']} LoRA on {n} U-Net layers to {files['lora']}", flush=True)
    if not (files["taesd"] / "config.json").exists():
        code = ("import torch, diffusers; torch.manual_seed(3); "
                f"diffusers.AutoencoderTiny().save_pretrained({str(files['taesd'])!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"wrote a random AutoencoderTiny to {files['taesd']}", flush=True)
    return files


def start_latents(size):
    return np.random.default_rng(SEED).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)


# -- one (side, recipe) in a subprocess: load() -> run(size, steps) -> images (1, H, W, 3) in [0, 1] -----
def tinysd_side(recipe, files):
    import tinysd
    from tinysd.taesd import load_taesd

    if recipe is RECIPES["taesd"]:
        tiny = load_taesd(str(files["taesd"]), "cpu")
        return lambda size, steps: np.clip(tiny.ops.numpy(tiny.decode(start_latents(size))) / 2 + 0.5, 0, 1)
    sd = tinysd.load(str(files["model"]), backend="cpu", taesd=str(files["taesd"]) if recipe.taesd else None)
    if recipe.lora:
        sd.load_lora_weights(str(files["lora"]))
    return lambda size, steps: sd(
        PROMPT, num_inference_steps=steps, guidance_scale=recipe.guidance_scale, height=size, width=size, seed=SEED,
        latents=start_latents(size), scheduler=recipe.scheduler, vae_decoder="taesd" if recipe.taesd else "vae",
        deepcache_interval=recipe.deepcache, output_type="np").images


def diffusers_side(recipe, files):
    import diffusers
    import torch

    tiny = diffusers.AutoencoderTiny.from_pretrained(files["taesd"]) if recipe.taesd else None
    if recipe is RECIPES["taesd"]:
        def decode(size, steps):
            with torch.no_grad():
                x = tiny.decode(torch.from_numpy(start_latents(size))).sample
            return (x / 2 + 0.5).clamp(0, 1).numpy()
        return decode
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        files["model"], torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
        **({"vae": tiny} if tiny else {}))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULER[recipe.scheduler]).from_config(pipe.scheduler.config)
    if recipe.lora:
        pipe.load_lora_weights(str(files["lora"]))
    if recipe.deepcache:
        from DeepCache import DeepCacheSDHelper
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=recipe.deepcache, cache_branch_id=0)
        helper.enable()

    def run(size, steps):
        with torch.no_grad():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=recipe.guidance_scale, height=size,
                        width=size, latents=torch.from_numpy(start_latents(size)),
                        generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    return run


def worker(args):
    side, name = args.worker
    recipe, files = RECIPES[name], weight_files(args)
    steps = args.steps or recipe.steps
    if side == "diffusers":
        import torch
        torch.set_num_threads(args.threads)
    else:
        import numba

        import tinysd  # noqa: F401  (before numba starts its threads: it sets OMP_WAIT_POLICY)
        numba.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run = (tinysd_side if side == "tinysd" else diffusers_side)(recipe, files)
    load_s = time.perf_counter() - t0
    run(max(64, args.size // 32 * 8), min(steps, 2))                 # warm-up
    images, timing = time_runs(lambda: run(args.size, steps), 3 if name == "taesd" else 1)
    np.save(output_file(args, side, name), np.asarray(images, np.float32))
    print(json.dumps({"side": side, "recipe": name, "load_s": load_s, "seconds": timing["seconds"],
                      "peak_rss_mb": timing["peak_rss_mb"]}))


def output_file(args, side, name):
    return args.workdir / f"fast-{'tiny' if args.tiny else 'sd15'}-{side}-{name}-{args.size}.npy"


def spawn(args, side, name):
    result, proc = run_worker(__file__, [side, name, "--size", args.size, "--threads", args.threads,
                                         "--workdir", args.workdir] + (["--steps", args.steps] if args.steps else [])
                              + (["--tiny"] if args.tiny else []), args.threads)
    if proc.returncode or result is None:
        raise worker_failed(f"{side} {name}", proc)
    return result


# -- the table --------------------------------------------------------------------------------------
def machine():
    """CPU model, the SIMD flags that matter here, thread count and load average, in one line."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(ln.split(":", 1) for ln in reversed(info.splitlines()) if ":" in ln)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    cpu = f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    return f"{cpu}, {os.cpu_count()} CPUs, flags: {' '.join(simd) or 'no AVX2'}"


def load_average():
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_table(args, results):
    def show(name, side, key, fmt):
        r = results.get(name, {}).get(side)
        return format(r[key], fmt) if r else "—"

    size = f"{args.size}×{args.size}"
    print(f"\n| recipe ({size}{', tiny model' if args.tiny else ''}) | tinysd s | diffusers s | ratio | "
          "tinysd peak RSS | diffusers peak RSS | mean abs Δ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in RECIPES:
        if name not in results:
            continue
        r = results[name]
        title = RECIPES[name].title + (f" ({args.size // 8}×{args.size // 8} latent)" if name == "taesd" else "")
        steps = f" [{args.steps} steps]" if args.steps and name != "taesd" else ""
        ratio = f"{r['diffusers']['seconds'] / r['tinysd']['seconds']:.2f}×" if "delta" in r else "—"
        delta = f"{r['delta']:.2g}/255" if "delta" in r else "—"
        print(f"| ({name}) {title}{steps} | {show(name, 'tinysd', 'seconds', '.2f')} | "
              f"{show(name, 'diffusers', 'seconds', '.2f')} | {ratio} | "
              f"{show(name, 'tinysd', 'peak_rss_mb', '.0f')} MB | {show(name, 'diffusers', 'peak_rss_mb', '.0f')} MB "
              f"| {delta} |")
    for fast, slow in (("c", "a"), ("d", "e")):
        if fast in results and slow in results:
            print(f"({fast}) over ({slow}): " + ", ".join(
                f"{side} {results[slow][side]['seconds'] / results[fast][side]['seconds']:.2f}× fewer seconds"
                for side in SIDES if side in results[fast] and side in results[slow]))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{machine()}; {args.threads} threads; at start: {load_average()}", flush=True)
    prepare(args)
    results = {}
    for name in args.recipe_list:
        results[name] = {}
        for side in SIDES:
            print(f"({name}) {side} ...", end=" ", flush=True)
            r = results[name][side] = spawn(args, side, name)
            print(f"{r['seconds']:.2f} s (load {r['load_s']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        images = [np.load(output_file(args, side, name)) for side in SIDES]
        results[name]["delta"] = float(np.abs(images[0].astype(np.float64) - images[1]).mean() * 255)
        if args.json:
            args.json.write_text(json.dumps({"argv": sys.argv[1:], "machine": machine(), "results": results}, indent=2))
    print_table(args, results)
    print(f"{machine()}; {args.threads} threads; at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
