"""Warm redraw time of the packaged "shapes" model: what a live slider in notebook 09 waits for.

    python benchmarks/bench_shapes.py                        # cpu backend, 20 steps, 7 samplers, 1 BLAS thread
    python benchmarks/bench_shapes.py --backends diffusers,cpu --samplers dpmpp_2m   # with the reference's ratio
    python benchmarks/bench_shapes.py --backends cpu,numpy --blas-threads default,1 --repeat 11 --json shapes.json

A redraw is one `sd(prompt, seed=s, num_inference_steps=20, scheduler=name, output_type="np")` at
64×64 with guidance 7.5 (a U-Net batch of 2 per step, then a VAE decode; encoding the prompt
costs about a millisecond). `diffusers` is the reference: diffusers' StableDiffusionPipeline on the
same folder (tinysd/data/shapes) with the same scheduler classes, fp32; the "× diffusers" column
is its median over each tinysd row's. Each (backend, BLAS threads) configuration runs in its own
subprocess, because OpenBLAS reads its thread count once, when NumPy is imported: "default"
leaves it to OpenBLAS (one per core), a number sets OPENBLAS_NUM_THREADS (and torch's threads for
diffusers). The default is 1: the
shapes model's matrices are too small for BLAS threads to pay, and on a busy machine their
spinning makes a redraw many times slower. In each, one redraw
per sampler warms up (the cpu backend compiles its kernels, or loads them from Numba's cache),
then every sampler is timed --repeat times (seeds 0, 1, ...): the best and the median wall
seconds, and the median CPU seconds of the process (time.process_time, all its threads: what
a redraw costs on cores it has to itself). The load average is printed before and after each
configuration: on a shared machine wall time far above CPU time means the redraw waited for a
core. The issue's target is a redraw under 0.5 s warm with the cpu backend.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "a red circle at the top"
SAMPLERS = ("dpmpp_2m", "ddim", "euler", "euler_a", "pndm", "heun", "dpmpp_2m_karras")
TARGET_S = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="cpu", help="comma-separated: diffusers (the reference), cpu, numpy (default cpu)")
    p.add_argument("--blas-threads", default="1",
                   help="comma-separated OpenBLAS thread counts to try, 'default' for OpenBLAS's own (default: 1)")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=7, help="timed redraws per sampler (default 7)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=1, metavar="BACKEND", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sampler_list = [s.strip() for s in args.samplers.split(",") if s.strip()]
    args.backend_list = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.thread_list = [t.strip() for t in args.blas_threads.split(",") if t.strip()]
    if args.steps < 1 or args.repeat < 1:
        p.error("--steps and --repeat must be at least 1")
    if not args.backend_list or set(args.backend_list) - {"diffusers", "cpu", "numpy"}:
        p.error(f"--backends: choose from diffusers, cpu, numpy, got {args.backends}")
    if any(t != "default" and not t.isdigit() for t in args.thread_list):
        p.error(f"--blas-threads: 'default' or positive integers, got {args.blas_threads}")
    return args


def diffusers_pipe():
    """diffusers' pipeline on the packaged shapes folder, called like tinysd's: sd(prompt, seed=, ..., scheduler=name)."""
    import diffusers
    import torch

    from tinysd.schedulers import SCHEDULERS
    from tinysd.weights import PACKAGED

    if os.environ.get("OPENBLAS_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OPENBLAS_NUM_THREADS"]))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(PACKAGED["shapes"], torch_dtype=torch.float32,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config

    def sd(prompt, seed, num_inference_steps, scheduler, output_type, callback=None):
        cls, extra = SCHEDULERS[scheduler]          # tinysd's classes carry diffusers' names
        pipe.scheduler = getattr(diffusers, cls.__name__).from_config(config, **extra)
        on_step_end = None if callback is None else (lambda p, i, t, kwargs: (callback(i, t, None), kwargs)[1])
        with torch.no_grad():
            return pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=7.5, output_type=output_type,
                        generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step_end)
    return sd


def worker(backend, samplers, steps, repeat):
    """Runs in the subprocess: time the redraws, print one JSON line."""
    import numpy as np

    import tinysd

    began = time.perf_counter()
    sd = diffusers_pipe() if backend == "diffusers" else tinysd.load("shapes", backend=backend)
    loaded = time.perf_counter() - began
    began = time.perf_counter()
    sd(PROMPT, seed=0, num_inference_steps=steps, scheduler=samplers[0], output_type="np")
    first = time.perf_counter() - began
    rows = []
    for name in samplers:
        calls = []
        sd(PROMPT, seed=0, num_inference_steps=steps, scheduler=name, output_type="np",
           callback=lambda i, t, latents: calls.append(i))                       # warm-up; counts U-Net calls
        wall, cpu = [], []
        for seed in range(repeat):
            w, c = time.perf_counter(), time.process_time()
            sd(PROMPT, seed=seed, num_inference_steps=steps, scheduler=name, output_type="np")
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        rows.append({"sampler": name, "unet_calls": len(calls), "best_s": min(wall),
                     "median_s": statistics.median(wall), "median_cpu_s": statistics.median(cpu)})
    threads = {}
    if backend == "cpu":
        import numba
        threads["numba_threads"] = numba.get_num_threads()
    if backend == "diffusers":
        import torch
        threads["torch_threads"] = torch.get_num_threads()
    print(json.dumps({"load_s": loaded, "first_redraw_s": first, "rows": rows, **threads,
                      "numpy_version": np.__version__}))


def run_config(backend, blas, args):
    env = dict(os.environ)
    if blas == "default":
        env.pop("OPENBLAS_NUM_THREADS", None)
    else:
        env["OPENBLAS_NUM_THREADS"] = blas
    cmd = [sys.executable, __file__, "--worker", backend, "--samplers", ",".join(args.sampler_list),
           "--steps", str(args.steps), "--repeat", str(args.repeat)]
    before = os.getloadavg()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    after = os.getloadavg()
    if out.returncode != 0:
        raise SystemExit(f"{backend} (BLAS threads {blas}) failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"backend": backend, "blas_threads": blas, "loadavg_before": before, "loadavg_after": after, **result}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.sampler_list, args.steps, args.repeat)
    print(f"shapes model, 64×64, {args.steps} steps, guidance 7.5, {args.repeat} timed redraws per sampler; "
          f"{os.cpu_count()} CPU cores; target: under {TARGET_S} s warm (cpu backend)")
    results, reference = [], {}
    for backend in sorted(args.backend_list, key=lambda b: b != "diffusers"):     # the reference first
        for blas in args.thread_list:
            r = run_config(backend, blas, args)
            results.append(r)
            if backend == "diffusers":
                reference[blas] = {row["sampler"]: row["median_s"] for row in r["rows"]}
            threads = "".join(f", {name} threads {r[key]}" for key, name in (("numba_threads", "Numba"),
                                                                              ("torch_threads", "torch")) if key in r)
            print(f"\n{backend}, OpenBLAS threads {blas}{threads}: load {r['load_s']:.1f} s, first redraw "
                  f"{r['first_redraw_s']:.1f} s; load average {r['loadavg_before'][0]:.1f} before, "
                  f"{r['loadavg_after'][0]:.1f} after")
            print(f"  {'sampler':16} {'U-Net calls':>11} {'best s':>8} {'median s':>9} {'CPU s':>7} {'× diffusers':>12}"
                  f"  under {TARGET_S} s")
            for row in r["rows"]:
                ok = "yes" if row["best_s"] < TARGET_S else "no"
                ratio = reference.get(blas, {}).get(row["sampler"], float("nan")) / row["median_s"]
                print(f"  {row['sampler']:16} {row['unet_calls']:>11} {row['best_s']:8.3f} {row['median_s']:9.3f} "
                      f"{row['median_cpu_s']:7.3f} {ratio:12.2f}  {ok}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {"steps": args.steps, "repeat": args.repeat, "prompt": PROMPT,
                                                      "cores": os.cpu_count()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
