"""tinysd's `cuda` backend against diffusers on the same GPU: one U-Net step, one VAE decode, one image.

    python benchmarks/bench_cuda.py                       # SD v1.5-sized random weights
    python benchmarks/bench_cuda.py --model path/to/sd-v1-5 --json cuda.json

Rows: the U-Net forward with classifier-free guidance (batch 2, 64×64 latents, 77-token context),
the VAE decode of one 64×64 latent to 512×512, and a whole 512×512 image in `--steps` steps
(text encoder, sampler loop, decode). Columns: tinysd cuda (fp32 SIMT kernels), diffusers fp32 and
diffusers fp16 (tensor cores) on the same GPU, the median of `--repeat` timed runs after a warm-up
(which also compiles tinysd's kernels). TFLOP/s counts the multiply-adds of the linear, conv and
attention ops (2 FLOP each), taken from tinysd's own calls, against the GPU's fp32 peak
(SMs × FP32 lanes per SM × 2 × clock, or `--peak-tflops`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from flops import count_flops

SD15 = Path(__file__).resolve().parents[1] / "tinysd" / "data" / "sd-v1-5"
FP32_LANES_PER_SM = {7: 64, 8: 128, 9: 128, 10: 128, 12: 128}   # by major compute capability (8.0: 64)
PROMPT = "a photograph of an astronaut riding a horse"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="diffusers folder or hub id with real weights (default: random "
                                   "weights with SD v1.5's configs)")
    p.add_argument("--only", default="unet,vae,image",
                   help="comma-separated rows to run: unet, vae, image (default: all)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the whole image (default 50)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per cell after one warm-up (default 3)")
    p.add_argument("--no-diffusers", action="store_true", help="time tinysd only")
    p.add_argument("--peak-tflops", type=float, help="the GPU's fp32 peak (default: from the device)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = set(rows) - {"unet", "vae", "image"}
    if unknown:
        p.error(f"--only: unknown row(s) {', '.join(sorted(unknown))}; choose from unet, vae, image")
    if args.steps < 1 or args.repeat < 1:
        p.error("--steps and --repeat must be at least 1")
    args.rows = rows
    return args


# -- timing and counting ---------------------------------------------------------------------------
def median_seconds(fn, sync, repeat):
    """Median wall time of fn() over `repeat` runs after one warm-up, synchronising the GPU."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fp32_peak_tflops():
    """SMs × FP32 lanes per SM × 2 (FMA) × clock, from numba's device attributes."""
    from numba import cuda
    dev = cuda.get_current_device()
    major, minor = dev.compute_capability
    lanes = 64 if (major, minor) == (8, 0) else FP32_LANES_PER_SM.get(major, 128)
    return dev.MULTIPROCESSOR_COUNT * lanes * 2 * dev.CLOCK_RATE * 1e3 / 1e12, dev.name


# -- the models ------------------------------------------------------------------------------------
def build_reference(model):
    """diffusers (unet, vae, text_encoder) in fp32 on the CPU: loaded, or random SD v1.5-sized."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if model:
        return (UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
                AutoencoderKL.from_pretrained(model, subfolder="vae"),
                CLIPTextModel.from_pretrained(model, subfolder="text_encoder"))
    torch.manual_seed(0)
    configs = {part: json.loads((SD15 / part / "config.json").read_text())
               for part in ("unet", "vae", "text_encoder")}
    text_cfg = {k: v for k, v in configs["text_encoder"].items() if k not in ("architectures", "model_type")}
    return (UNet2DConditionModel.from_config(configs["unet"]), AutoencoderKL.from_config(configs["vae"]),
            CLIPTextModel(CLIPTextConfig(**text_cfg)))


def build_tinysd(ref_unet, ref_vae, ref_text, backend):
    """The same weights in tinysd's modules on `backend`."""
    from tinysd.pipeline import StableDiffusion
    from tinysd.text_encoder import CLIPTextModel
    from tinysd.tokenizer import CLIPTokenizer
    from tinysd.unet import UNet2DConditionModel
    from tinysd.vae import AutoencoderKL

    def state(module, prefix=""):
        out = {}
        for key, value in module.state_dict().items():
            if not key.endswith("position_ids"):
                out[key if key.startswith(prefix) else prefix + key] = value.detach().float().numpy()
        return out

    unet = UNet2DConditionModel(dict(ref_unet.config)).set_backend(backend).load_state_dict(state(ref_unet))
    vae = AutoencoderKL(dict(ref_vae.config)).set_backend(backend).load_state_dict(state(ref_vae))
    text = CLIPTextModel(ref_text.config.to_dict()).set_backend(backend).load_state_dict(
        state(ref_text, "text_model."))
    scheduler = json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text())
    return StableDiffusion(CLIPTokenizer(), text, unet, vae, scheduler, backend)


# -- the rows --------------------------------------------------------------------------------------
def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
            rng.standard_normal((2, 77, 768)).astype(np.float32),
            rng.standard_normal((1, 4, 64, 64)).astype(np.float32))


def tinysd_cells(sd, backend, rows, steps, repeat):
    from numba import cuda
    latents, context, z = inputs()
    ctx = backend.asarray(context)
    run = {
        "unet": lambda: backend.numpy(sd.unet(backend.asarray(latents), 500, ctx)),
        "vae": lambda: backend.numpy(sd.vae.decode(backend.asarray(z))),
        "image": lambda: sd(PROMPT, num_inference_steps=steps, seed=0, output_type="np"),
    }
    cells = {}
    for row in rows:
        flops = count_flops(backend, run[row])[1] if row != "image" else None
        cells[row] = {"seconds": median_seconds(run[row], cuda.synchronize, repeat), "flops": flops}
    return cells


def diffusers_cells(ref, sd, dtype, rows, steps, repeat):
    """The same rows with diffusers on the GPU in `dtype` (scheduler: PNDM, as SD v1.5 ships)."""
    import copy
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    unet, vae, text = (copy.deepcopy(m).to("cuda", dtype).eval() for m in ref)
    latents, context, z = (torch.from_numpy(a).to("cuda", dtype) for a in inputs())
    scheduler = PNDMScheduler.from_config(json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text()))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def image():   # tinysd's tokenizer for both (no tokenizer files needed); the text encoder is timed
        ids = torch.from_numpy(np.asarray(sd.tokenizer(["", PROMPT]), dtype=np.int64)).to("cuda")
        embeds = text(ids)[0]
        return pipe(prompt_embeds=embeds[1:], negative_prompt_embeds=embeds[:1], num_inference_steps=steps,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images

    run = {
        "unet": lambda: unet(latents, 500, context).sample,
        "vae": lambda: vae.decode(z / vae.config.scaling_factor).sample,
        "image": image,
    }
    cells = {}
    with torch.no_grad():
        for row in rows:
            cells[row] = {"seconds": median_seconds(run[row], torch.cuda.synchronize, repeat)}
    del pipe, unet, vae, text
    torch.cuda.empty_cache()
    return cells


LABELS = {"unet": "U-Net step, CFG batch 2, 64×64", "vae": "VAE decode 512×512", "image": "512×512 image"}


def print_table(results, rows, peak):
    columns = list(results)
    print(f"{'':34s}" + "".join(f"{c:>22s}" for c in columns))
    for row in rows:
        line = f"{LABELS[row]:34s}"
        flops = results["tinysd cuda"][row].get("flops")
        for c in columns:
            cell = results[c][row]
            s = f"{cell['seconds'] * 1e3:9.1f} ms"
            if flops and c != "diffusers fp16":
                tflops = flops / cell["seconds"] / 1e12
                s += f" {tflops:5.1f} TF/s ({100 * tflops / peak:2.0f}%)"
            line += f"{s:>22s}"
        print(line)
    print(f"fp32 peak {peak:.1f} TFLOP/s; the fp16 column uses tensor cores (no share of the fp32 peak)")


def main(argv=None):
    args = parse_args(argv)
    from tinysd.backend import get_backend
    backend = get_backend("cuda")     # a clear error without a GPU
    peak, gpu = fp32_peak_tflops()
    peak = args.peak_tflops or peak
    ref = build_reference(args.model)
    sd = build_tinysd(*ref, backend)
    results = {"tinysd cuda": tinysd_cells(sd, backend, args.rows, args.steps, args.repeat)}
    if not args.no_diffusers:
        import torch
        results["diffusers fp32"] = diffusers_cells(ref, sd, torch.float32, args.rows, args.steps, args.repeat)
        results["diffusers fp16"] = diffusers_cells(ref, sd, torch.float16, args.rows, args.steps, args.repeat)
    print(f"{gpu}, weights: {args.model or 'random, SD v1.5-sized'}, {args.steps} steps, "
          f"median of {args.repeat}")
    print_table(results, args.rows, peak)
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "fp32_peak_tflops": peak, "model": args.model,
                                         "steps": args.steps, "repeat": args.repeat, "results": results},
                                        indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
