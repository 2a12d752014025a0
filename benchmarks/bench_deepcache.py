"""DeepCache on the full-size U-Net: seconds of a full pass vs a shallow pass, and what that means
for a whole run of steps.

    python benchmarks/bench_deepcache.py                         # full vs shallow passes, branches 0-2
    python benchmarks/bench_deepcache.py --loop                  # also 20 DPM++ 2M steps with and without
    python benchmarks/bench_deepcache.py --branches 0 --repeat 3 --json deepcache.json

Weights: the random SD v1.5-sized diffusers folder of bench_cpu.py (860M-parameter U-Net, built once
under --workdir). One U-Net call with classifier-free guidance (batch 2, 64×64 latents, t = 500) on
the chosen backend: the plain forward; the full pass of DeepCache (the same work, also returning the
deep features u_k: timed at the first branch only); the shallow pass at branch k on those features
(UNet2DConditionModel's docstring). Seconds: median of --repeat runs after one warm-up. The shallow pass on the features of
the same input must give the plain forward's ε̂ (checked, relative max error printed).

The implied run time of S steps with interval N counts the package's schedule: the full pass on
steps 0, N, 2N, ... (ceil(S/N) of them), the shallow pass on the others, plus the sampler's own
time (negligible). With --loop the whole denoising loop (text encoder included, no VAE) is timed
too, once with and once without DeepCache.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import PROMPT, model_folder  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="cpu", help="tinysd backend (default: cpu)")
    p.add_argument("--branches", default="0,1,2", help="comma-separated DeepCache branches to time (default 0,1,2)")
    p.add_argument("--interval", type=int, default=3, help="DeepCache interval of the implied run (default 3)")
    p.add_argument("--steps", type=int, default=20, help="steps of the implied run and of --loop (default 20)")
    p.add_argument("--sampler", default="dpmpp_2m", help="sampler of --loop (default dpmpp_2m)")
    p.add_argument("--loop", action="store_true", help="also time the whole denoising loop with and without")
    p.add_argument("--repeat", type=int, default=2, help="timed runs after one warm-up (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="Numba threads (default: all cores)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinysd-bench"),
                   help="where the random SD v1.5-sized model folder is kept (about 4 GB)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.branch_list = [int(b) for b in args.branches.split(",") if b.strip()]
    return args


def timed(fn, repeat):
    """(median seconds of `repeat` runs after a warm-up (None for none), the warm-up's output)."""
    out = fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return (statistics.median(times) if times else None), out


def main(argv=None):
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    import numba

    import tinysd   # (before numba starts its threads: it sets OMP_WAIT_POLICY)
    numba.set_num_threads(args.threads)

    folder = model_folder(args.workdir)
    sd = tinysd.load(str(folder), backend=args.backend)
    unet, ops = sd.unet, sd.ops
    rng = np.random.default_rng(0)
    x = ops.asarray(rng.standard_normal((2, 4, 64, 64)).astype(np.float32))
    context = ops.asarray(rng.standard_normal((2, 77, 768)).astype(np.float32))

    plain_s, plain = timed(lambda: ops.numpy(unet(x, 500, context)), args.repeat)
    rows = [{"pass": "plain forward", "seconds": plain_s}]
    full_runs = math.ceil(args.steps / args.interval)
    for k in args.branch_list:
        # the full pass does the plain forward's work at every branch: timed at the first one only
        full_s, (_, features) = timed(lambda: unet(x, 500, context, cache_branch=k),
                                      args.repeat if k == args.branch_list[0] else 0)
        full_s = full_s if k == args.branch_list[0] else rows[1]["seconds"]
        shallow_s, (eps, _) = timed(lambda: unet(x, 500, context, cache_branch=k, cached=features), args.repeat)
        error = float(np.abs(ops.numpy(eps) - plain).max() / np.abs(plain).max())
        implied = args.steps * plain_s / (full_runs * full_s + (args.steps - full_runs) * shallow_s)
        if k == args.branch_list[0]:
            rows.append({"pass": f"full, branch {k}", "seconds": full_s})
        rows.append({"pass": f"shallow, branch {k}", "seconds": shallow_s, "error": error, "implied_speedup": implied})

    print(f"U-Net call, CFG batch 2, 64×64 latents, backend {args.backend}, {args.threads} threads, "
          f"median of {args.repeat}")
    print(f"{'pass':20} {'seconds':>8} {'vs plain':>9} {'rel. error':>11} "
          f"{f'{args.steps} steps, interval {args.interval}':>24}")
    for r in rows:
        speedup = f"{r['implied_speedup']:.2f}x fewer s" if "implied_speedup" in r else ""
        error = f"{r['error']:.1e}" if "error" in r else ""
        print(f"{r['pass']:20} {r['seconds']:8.2f} {plain_s / r['seconds']:8.2f}x {error:>11} {speedup:>24}")
    print(f"(implied: {full_runs} full + {args.steps - full_runs} shallow passes against {args.steps} plain ones)")

    result = {"backend": args.backend, "threads": args.threads, "steps": args.steps, "interval": args.interval,
              "rows": rows}
    if args.loop:
        k = args.branch_list[0]
        loop = {}
        for name, kw in (("without", {}), (f"interval {args.interval}, branch {k}",
                                           {"deepcache_interval": args.interval, "deepcache_branch": k})):
            t0 = time.perf_counter()
            out = sd(PROMPT, num_inference_steps=args.steps, scheduler=args.sampler, seed=0, output_type="latent",
                     **kw)
            loop[name] = {"seconds": time.perf_counter() - t0, "latents": out.images}
        base, cached = loop.values()
        change = float(np.abs(cached["latents"] - base["latents"]).max() / np.abs(base["latents"]).max())
        print(f"\n{args.steps} {args.sampler} steps, 512×512, text encoder + denoising loop (no VAE):")
        for name, r in loop.items():
            print(f"  {name:24} {r['seconds']:8.1f} s  {base['seconds'] / r['seconds']:5.2f}x")
        print(f"  final latents moved by {change:.2%} of their scale (DeepCache's approximation, random weights)")
        result["loop"] = {name: r["seconds"] for name, r in loop.items()}
        result["loop_latent_change"] = change
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
