"""tinysd's `cpu` (Numba) and `numpy` backends against diffusers fp32 on the same CPU.

    python benchmarks/bench_cpu.py                          # text encoder, U-Net step, VAE decode
    python benchmarks/bench_cpu.py --image --steps 20       # also a whole 512×512 image (long)
    python benchmarks/bench_cpu.py --sides diffusers,cpu --rows unet --repeat 3 --json cpu.json

Weights: random, SD v1.5-sized (860M-parameter U-Net), built once by the reference libraries
(tests/reference_models.py) and saved as a diffusers folder under --workdir; every side loads that
folder (diffusers `from_pretrained`, tinysd `tinysd.load`). Rows: the CLIP text encoder on
["", prompt]; one U-Net forward with classifier-free guidance (batch 2, 64×64 latents); the VAE
decode of one 64×64 latent to 512×512; with --image, the whole 512×512 image in --steps PNDM
steps. Each (side, row) runs in its own subprocess, so its peak RSS (getrusage) is its own; all
use --threads threads (torch, OpenBLAS, Numba). diffusers runs first and saves its output;
each tinysd side checks its warm-up output against it before timing (relative max error, or
mean |Δ| in 1/255 for the image) and stops if they disagree. Seconds: median of --repeat runs
after the warm-up; with --repeat 0, the checked (first) run itself, for the long image row.
GFLOP/s counts the multiply-adds (2 FLOP) of the linear, conv and attention ops that tinysd
calls for the row, the same count for every column.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flops import count_flops

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
ROWS = {"text": "text encoder, batch 2", "unet": "U-Net step, CFG batch 2, 64×64",
        "vae": "VAE decode 512×512", "image": "512×512 image"}
SIDES = ("diffusers", "numpy", "cpu")
TOLERANCE = {"text": 1e-3, "unet": 1e-3, "vae": 1e-3, "image": 0.5}   # image: mean |Δ|·255

# The variables through which each library is pinned to an instruction set (ISA). --isa native
# removes them all from a worker's environment, so every library picks its kernels for this CPU.
ISA_PINS = ("OPENBLAS_CORETYPE", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "ATEN_CPU_CAPABILITY",
            "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE")
# --isa avx2: every side limited to AVX2 + FMA (a laptop-class x86 CPU).
AVX2_PINS = {
    "OPENBLAS_CORETYPE": "Haswell",     # numpy's and SciPy's OpenBLAS: their Haswell (AVX2) kernels
    "NUMBA_CPU_NAME": "haswell",        # Numba compiles for Haswell, with Haswell's features only:
    "NUMBA_CPU_FEATURES": "",           #   unset, Numba would add this host's (avx512f, ...) to it
    "ATEN_CPU_CAPABILITY": "avx2",      # torch's vectorised ATen kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",       # oneDNN: torch's convolutions, OpenVINO's CPU plugin
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # torch's MKL sgemm (MKL honours it on Intel CPUs only)
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="text,unet,vae", help="comma-separated: text, unet, vae, image")
    p.add_argument("--image", action="store_true", help="add the whole-image row (minutes per side)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the image row (default 20)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated: diffusers, numpy, cpu")
    p.add_argument("--repeat", type=int, default=2, help="timed runs after one warm-up (default 2; 0: time the first run)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every side")
    p.add_argument("--isa", choices=("native", "avx2", "env"), default="native",
                   help="instruction sets of every side's kernels: native (each library picks for this CPU; "
                        "default), avx2 (all limited to AVX2+FMA), env (the environment as it is)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinysd-bench"),
                   help="where the random SD v1.5-sized model folder is kept (about 4 GB)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "ROW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()] + (["image"] if args.image else [])
    args.side_list = [s.strip() for s in args.sides.split(",") if s.strip()]
    if set(args.row_list) - set(ROWS):
        p.error(f"--rows: unknown {sorted(set(args.row_list) - set(ROWS))}; choose from {', '.join(ROWS)}")
    if set(args.side_list) - set(SIDES):
        p.error(f"--sides: unknown {sorted(set(args.side_list) - set(SIDES))}; choose from {', '.join(SIDES)}")
    if args.steps < 1 or args.repeat < 0 or args.threads < 1:
        p.error("--steps and --threads must be at least 1, --repeat at least 0")
    return args


# -- the shared model folder and inputs ---------------------------------------------------------------
def model_folder(workdir, size="sd-v1-5"):
    """The random SD v1.5-sized (or with size="tiny", the tests' tiny) diffusers folder, built on
    first use (in a subprocess, so its torch memory is gone before anything is measured)."""
    folder = workdir / f"{size}-random"
    if not (folder / "model_index.json").exists():
        code = ("import shutil, sys; sys.path.insert(0, %r)\n"
                "from tests.reference_models import build_reference, tokenizer_dir\n"
                "build_reference(size=%r, write=False).pipe.save_pretrained(%r)\n"
                # transformers 5 saves tokenizer.json only; keep the published vocab.json/merges.txt too
                "shutil.copytree(tokenizer_dir(), %r, dirs_exist_ok=True)\n") % (
                    str(REPO), size, str(folder), str(folder / "tokenizer"))
        print(f"building random {size}-sized weights in {folder} ...", flush=True)
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def inputs(folder):
    """Token ids of ["", PROMPT] (2, 77), U-Net latents (2, 4, 64, 64) and context (2, 77, 768),
    one VAE latent (1, 4, 64, 64): the same arrays for every side."""
    from tinysd.tokenizer import CLIPTokenizer
    rng = np.random.default_rng(0)
    ids = np.asarray(CLIPTokenizer.from_folder(folder / "tokenizer")(["", PROMPT]), dtype=np.int64)
    return {"ids": ids,
            "latents": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
            "context": rng.standard_normal((2, 77, 768)).astype(np.float32),
            "z": rng.standard_normal((1, 4, 64, 64)).astype(np.float32)}


# -- the instruction sets each library picked, read in the worker ------------------------------------
def openblas_cores():
    """{"numpy" or "scipy": core name} of each OpenBLAS loaded in this process, asked of the library
    itself (`*_get_corename`): the kernels OPENBLAS_CORETYPE, or else the CPU, made it pick."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:                                     # not Linux
        return {}
    cores = {}
    for path in sorted({ln.split()[-1] for ln in maps.splitlines() if "openblas" in ln.split()[-1].lower()}):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_corename", "scipy_openblas_get_corename64_",
                     "openblas_get_corename", "openblas_get_corename64_"):
            if hasattr(lib, name):
                getattr(lib, name).restype = ctypes.c_char_p
                owner = next((k for k in ("numpy", "scipy") if f"{k}.libs" in path), Path(path).name)
                cores[owner] = getattr(lib, name)().decode()
                break
    return cores


def numba_target():
    """The CPU Numba compiles for (the name in its cache key), "+avx512" if its features allow AVX-512."""
    from numba.core.registry import cpu_target
    _, name, features = cpu_target.target_context.codegen().magic_tuple()
    return name + (" +avx512" if "+avx512f" in features.split(",") else "")


def tinysd_isa():
    return {"openblas": openblas_cores(), "numba": numba_target()}


def onednn_isa():
    """oneDNN's ISA as torch's oneDNN prints it in its verbose header ("Intel AVX2"), from one
    convolution big enough for torch to hand to oneDNN, with the verbose output caught on fd 1."""
    import torch
    with tempfile.TemporaryFile("w+") as caught:
        sys.stdout.flush()
        stdout = os.dup(1)
        os.dup2(caught.fileno(), 1)
        try:
            with torch.no_grad(), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                torch.nn.functional.conv2d(torch.zeros(1, 128, 32, 32), torch.zeros(128, 128, 3, 3), padding=1)
        finally:
            os.dup2(stdout, 1)
            os.close(stdout)
        caught.seek(0)
        found = re.search(r"isa:([^\n]+)", caught.read())
    return found.group(1).strip() if found else "unknown"


def torch_isa():
    import torch
    return {"aten": torch.backends.cpu.get_cpu_capability(), "onednn": onednn_isa()}


# -- one (side, row) in a subprocess --------------------------------------------------------------------
def diffusers_runner(folder, row, x, steps, threads):
    import torch
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    ids, latents, context, z = (torch.from_numpy(x[k]) for k in ("ids", "latents", "context", "z"))

    def run():
        with torch.no_grad():
            if row == "text":
                return pipe.text_encoder(ids)[0].numpy()
            if row == "unet":
                return pipe.unet(latents, 500, encoder_hidden_states=context).sample.numpy()
            if row == "vae":
                return pipe.vae.decode(z).sample.numpy()
            return pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                        output_type="np").images
    return run, load_s, None


def tinysd_runner(folder, row, x, steps, backend_name):
    import tinysd
    t0 = time.perf_counter()
    sd = tinysd.load(str(folder), backend=backend_name)
    load_s = time.perf_counter() - t0
    ops = sd.ops
    context = ops.asarray(x["context"])

    def run():
        if row == "text":
            return ops.numpy(sd.text_encoder(x["ids"]))
        if row == "unet":
            return ops.numpy(sd.unet(ops.asarray(x["latents"]), 500, context))
        if row == "vae":
            return ops.numpy(sd.vae.decode(ops.asarray(x["z"])))
        return sd(PROMPT, num_inference_steps=steps, seed=0, output_type="np").images
    return run, load_s, ops


def agreement(row, out, ref):
    """Relative max error, or for the image the mean |Δ| in 1/255 steps."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise SystemExit(f"{row}: output shape {out.shape} differs from diffusers' {ref.shape}")
    if row == "image":
        return float(np.abs(out - ref).mean() * 255)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def worker(args):
    side, row = args.worker
    folder = model_folder(args.workdir)
    x = inputs(folder)
    if side == "diffusers":
        run, load_s, ops = diffusers_runner(folder, row, x, args.steps, args.threads)
        isa = torch_isa
    else:
        from tinysd.kernels.threads import set_num_threads
        set_num_threads(args.threads)
        run, load_s, ops = tinysd_runner(folder, row, x, args.steps, side)
        isa = tinysd_isa
    t0 = time.perf_counter()
    if ops is not None and row != "image":
        out, flops = count_flops(ops, run)
    else:
        out, flops = run(), None
    first_s = time.perf_counter() - t0
    ref_file = args.workdir / f"diffusers-{row}-{args.steps}.npy"
    result = {"side": side, "row": row, "load_s": load_s, "first_s": first_s, "flops": flops, "isa": isa()}
    if side == "diffusers":
        np.save(ref_file, out)
    elif ref_file.exists():
        result["error"] = agreement(row, out, np.load(ref_file))
        if not result["error"] <= TOLERANCE[row]:
            result["disagrees"] = True
            print(json.dumps(result))
            return 1
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    result["seconds"] = statistics.median(times) if times else first_s
    result["times"] = times
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    return 0


def isa_environment(isa, environ):
    """`environ` with the ISA pins of --isa `isa` (native: none; avx2: AVX2_PINS; env: as it is)."""
    env = dict(environ)
    if isa != "env":
        for var in ISA_PINS:
            env.pop(var, None)
    if isa == "avx2":
        env.update(AVX2_PINS)
    return env


def run_worker(script, worker_args, threads, isa="native"):
    """`python script --worker *worker_args` in a process of its own, every thread pool at `threads`,
    its libraries' instruction sets set by `isa` (see isa_environment).

    -> (the last JSON line it printed, as a dict, or None if it printed none; the CompletedProcess).
    The benchmarks' workers print their result as one JSON line.
    """
    env = isa_environment(isa, os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, str(script), "--worker", *map(str, worker_args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), proc


def worker_failed(label, proc):
    return SystemExit(f"{label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def spawn(args, side, row):
    result, proc = run_worker(__file__, [side, row, "--steps", args.steps, "--repeat", args.repeat,
                                         "--threads", args.threads, "--workdir", args.workdir],
                                 args.threads, args.isa)
    if result is None:
        raise worker_failed(f"{side} {row}", proc)
    if result.get("disagrees"):
        raise SystemExit(f"{side} {row}: output differs from diffusers by {result['error']:.3g} "
                         f"(tolerance {TOLERANCE[row]}); not timing it")
    return result


# -- the table --------------------------------------------------------------------------------------
def print_table(results, rows, sides):
    flops = {row: next((results[s][row]["flops"] for s in sides
                        if row in results[s] and results[s][row].get("flops")), None) for row in rows}
    print(f"{'':32s}{'side':>10s}{'seconds':>10s}{'GFLOP/s':>9s}{'× diffusers':>13s}"
          f"{'peak RSS':>11s}{'load+1st':>10s}{'vs diff.':>12s}")
    for row in rows:
        base = results.get("diffusers", {}).get(row, {}).get("seconds")
        for side in sides:
            r = results[side].get(row)
            if r is None:
                continue
            gflops = f"{flops[row] / r['seconds'] / 1e9:9.1f}" if flops[row] else f"{'':9s}"
            speedup = f"{base / r['seconds']:12.2f}×" if base else f"{'':13s}"
            err = "" if "error" not in r else (f"{r['error']:.2g}/255" if row == "image" else f"{r['error']:.1e}")
            print(f"{ROWS[row] if side == sides[0] else '':32s}{side:>10s}{r['seconds']:10.2f}{gflops}{speedup}"
                  f"{r['peak_rss_mb'] / 1024:9.2f} GB{r['load_s'] + r['first_s']:9.1f}s{err:>12s}")
    for row in rows:
        if flops[row]:
            print(f"{ROWS[row]}: {flops[row] / 1e12:.3f} TFLOP")


def print_isa(results, sides, isa):
    """Per side, the instruction sets its libraries used, as its worker read them."""
    print(f"instruction sets (--isa {isa}):")
    for side in sides:
        for r in list(results[side].values())[:1]:
            print(f"{side:>12s}: " + "; ".join(
                f"{lib} " + (found if isinstance(found, str) else ", ".join(f"{k} {v}" for k, v in found.items()))
                for lib, found in r["isa"].items()))


def main(argv=None):
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    model_folder(args.workdir)
    sides = [s for s in SIDES if s in args.side_list]          # diffusers first: the reference output
    results = {side: {} for side in sides}
    for row in args.row_list:
        for side in sides:
            print(f"{side:>10s} {row} ...", flush=True)
            r = results[side][row] = spawn(args, side, row)
            print(f"{'':11s}{r['seconds']:.2f} s, peak RSS {r['peak_rss_mb'] / 1024:.2f} GB", flush=True)
    import torch
    print(f"\n{os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}, "
          + (f"median of {args.repeat}" if args.repeat else "first run timed") + f", image: {args.steps} steps")
    print_table(results, args.row_list, sides)
    print_isa(results, sides, args.isa)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "steps": args.steps, "repeat": args.repeat,
                                         "isa": args.isa,
                                         "load_average": os.getloadavg(), "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
