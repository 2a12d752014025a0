"""One denoising step with a ControlNet against one without, tinysd's `cpu` backend and diffusers fp32.

    python benchmarks/bench_controlnet.py                       # both sides, both rows, median of 2
    python benchmarks/bench_controlnet.py --sides cpu --repeat 3 --json controlnet.json

Weights: random, SD v1.5-sized, built once by the reference libraries as bench_cpu.py builds
them (the same folder under --workdir, reused), plus a random ControlNet made by diffusers'
`ControlNetModel.from_unet` on that U-Net (the size of control_v11p_sd15_canny, 361M
parameters), saved with save_pretrained beside it. Rows: the U-Net with classifier-free guidance
(batch 2, 64×64 latents), and the same step with the ControlNet first (batch 2, a 512×512 hint)
and its 13 residuals added to the U-Net. Each (side, row) runs in its own subprocess with
--threads threads; diffusers runs first and saves its output, tinysd checks its warm-up output
against it (relative max error ≤ 1e-3) before it is timed. Seconds: median of --repeat runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import model_folder, run_worker, time_runs, worker_failed  # noqa: E402

ROWS = {"unet": "U-Net step, CFG batch 2, 64×64", "controlnet": "ControlNet + U-Net step, same"}
SIDES = ("diffusers", "cpu")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated: diffusers, cpu")
    p.add_argument("--repeat", type=int, default=2, help="timed runs after one warm-up (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every side")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinysd-bench"),
                   help="where the random SD v1.5-sized model and ControlNet are kept (about 5.5 GB)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "ROW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.side_list = [s.strip() for s in args.sides.split(",") if s.strip()]
    if set(args.side_list) - set(SIDES) or args.repeat < 1 or args.threads < 1:
        p.error(f"--sides from {', '.join(SIDES)}; --repeat and --threads at least 1")
    return args


def controlnet_folder(workdir):
    """A random ControlNet for the random U-Net, every parameter randomised (zero convs included)."""
    folder = workdir / "controlnet-random"
    if not (folder / "config.json").exists():
        code = ("import sys; sys.path[:0] = [%r, %r]\n"
                "from diffusers import UNet2DConditionModel\n"
                "from controlnet_reference import random_controlnet\n"
                "unet = UNet2DConditionModel.from_pretrained(%r, subfolder='unet')\n"
                "random_controlnet(unet, seed=7).save_pretrained(%r)\n") % (
                    str(REPO / "tests"), str(REPO), str(model_folder(workdir)), str(folder))
        print(f"building a random ControlNet in {folder} ...", flush=True)
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def inputs():
    rng = np.random.default_rng(0)
    return {"latents": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
            "context": rng.standard_normal((2, 77, 768)).astype(np.float32),
            "hint": rng.random((2, 3, 512, 512), dtype=np.float32)}


def diffusers_runner(folder, cn_folder, row, x, threads):
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
    net = ControlNetModel.from_pretrained(cn_folder, torch_dtype=torch.float32).eval() if row == "controlnet" else None
    load_s = time.perf_counter() - t0
    latents, context, hint = (torch.from_numpy(x[k]) for k in ("latents", "context", "hint"))

    def run():
        with torch.no_grad():
            kw = {}
            if net is not None:
                down, mid = net(latents, 500, context, controlnet_cond=hint, return_dict=False)
                kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            return unet(latents, 500, encoder_hidden_states=context, **kw).sample.numpy()
    return run, load_s


def tinysd_runner(folder, cn_folder, row, x, backend_name):
    import tinysd
    from tinysd.controlnet import load_controlnet
    t0 = time.perf_counter()
    sd = tinysd.load(str(folder), backend=backend_name)
    net = load_controlnet(cn_folder, sd.ops, sd.unet.config) if row == "controlnet" else None
    load_s = time.perf_counter() - t0
    ops = sd.ops
    latents, context, hint = (ops.asarray(x[k]) for k in ("latents", "context", "hint"))

    def run():
        kw = {}
        if net is not None:
            down, mid = net(latents, 500, context, hint)
            kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return ops.numpy(sd.unet(latents, 500, context, **kw))
    return run, load_s


def worker(args):
    side, row = args.worker
    folder, cn_folder, x = model_folder(args.workdir), controlnet_folder(args.workdir), inputs()
    if side == "diffusers":
        run, load_s = diffusers_runner(folder, cn_folder, row, x, args.threads)
    else:
        import numba

        import tinysd  # noqa: F401  (before numba starts its threads: it sets OMP_WAIT_POLICY)
        numba.set_num_threads(args.threads)
        run, load_s = tinysd_runner(folder, cn_folder, row, x, side)
    t0 = time.perf_counter()
    out = run()
    result = {"side": side, "row": row, "load_s": load_s, "first_s": time.perf_counter() - t0}
    ref_file = args.workdir / f"diffusers-controlnet-{row}.npy"
    if side == "diffusers":
        np.save(ref_file, out)
    else:
        ref = np.load(ref_file)
        result["error"] = float(np.abs(out - ref).max() / np.abs(ref).max())
        if not result["error"] <= 1e-3:
            result["disagrees"] = True
            print(json.dumps(result))
            return 1
    result.update(time_runs(run, args.repeat)[1])
    print(json.dumps(result))
    return 0


def spawn(args, side, row):
    result, proc = run_worker(__file__, [side, row, "--repeat", args.repeat, "--threads", args.threads,
                                         "--workdir", args.workdir], args.threads)
    if result is None:
        raise worker_failed(f"{side} {row}", proc)
    if result.get("disagrees"):
        raise SystemExit(f"{side} {row}: output differs from diffusers by {result['error']:.3g}; not timing it")
    return result


def main(argv=None):
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    controlnet_folder(args.workdir)
    sides = [s for s in SIDES if s in args.side_list]
    results = {side: {} for side in sides}
    for row in ROWS:
        for side in sides:
            print(f"{side:>10s} {row} ...", flush=True)
            r = results[side][row] = spawn(args, side, row)
            print(f"{'':11s}{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb'] / 1024:.2f} GB", flush=True)
    print(f"\n{os.cpu_count()} CPUs, {args.threads} threads, load average {os.getloadavg()[0]:.1f}, "
          f"median of {args.repeat}")
    print(f"{'':34s}{'side':>10s}{'seconds':>10s}{'× diffusers':>13s}{'+ControlNet':>13s}{'peak RSS':>11s}{'vs diff.':>10s}")
    for row in ROWS:
        for side in sides:
            r = results[side][row]
            base = results.get("diffusers", {}).get(row, {}).get("seconds")
            speedup = f"{base / r['seconds']:12.2f}×" if base else f"{'':13s}"
            extra = f"{r['seconds'] / results[side]['unet']['seconds']:12.2f}×" if row == "controlnet" else f"{'':13s}"
            err = f"{r['error']:.1e}" if "error" in r else ""
            print(f"{ROWS[row] if side == sides[0] else '':34s}{side:>10s}{r['seconds']:10.2f}{speedup}{extra}"
                  f"{r['peak_rss_mb'] / 1024:9.2f} GB{err:>10s}")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "repeat": args.repeat,
                                         "load_average": os.getloadavg(), "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
