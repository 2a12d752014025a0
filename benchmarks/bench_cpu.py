"""tinysd's `cpu` (Numba) and `numpy` backends against diffusers fp32, and optionally OpenVINO, on the same CPU.

    python benchmarks/bench_cpu.py                          # text encoder, U-Net step, VAE decode
    python benchmarks/bench_cpu.py --image --steps 20       # also a whole 512×512 image (long)
    python benchmarks/bench_cpu.py --sides diffusers,cpu --rows unet --repeat 3 --json cpu.json
    python benchmarks/bench_cpu.py --sides diffusers,openvino,cpu --isa avx2   # pip install openvino

Weights: random, SD v1.5-sized (860M-parameter U-Net), built once by the reference libraries
(tests/reference_models.py) and saved as a diffusers folder under --workdir; every side loads that
folder (diffusers `from_pretrained`, tinysd `tinysd.load`). Rows: the CLIP text encoder on
["", prompt]; one U-Net forward with classifier-free guidance (batch 2, 64×64 latents), or
(unet1) on the first latent alone, as LCM and guidance ≤ 1 run it; the VAE
decode of one 64×64 latent to 512×512; with --image, the whole 512×512 image in --steps PNDM
steps. Each (side, row) runs in its own subprocess, so its peak RSS (getrusage) is its own; all
use --threads threads (torch, OpenBLAS, Numba, OpenVINO). diffusers runs first and saves its output;
each other side checks its warm-up output against it before timing (relative max error, or
mean |Δ| in 1/255 for the image) and stops if they disagree. Seconds: median of --repeat runs
after the warm-up; with --repeat 0, the checked (first) run itself, for the long image row.
GFLOP/s counts the multiply-adds (2 FLOP) of the linear, conv and attention ops that tinysd
calls for the row, the same count for every column.

The `openvino` side (optional, `pip install openvino`; no image row): the row's transformers/diffusers
module from the same folder, converted by `openvino.convert_model` (static shapes) and compiled for
OpenVINO's CPU plugin in fp32 (INFERENCE_PRECISION_HINT f32: on CPUs with bf16 its default is bf16)
with --threads threads. Its load column includes the conversion, its peak RSS the torch model's.

Instruction sets (--isa): the libraries pick their kernels at run time, each by its own rule, and
some follow environment variables that pin them (this machine's environment sets
OPENBLAS_CORETYPE=Haswell, which holds OpenBLAS, and so tinysd's GEMMs, to AVX2 while torch's oneDNN
uses AVX-512). `native` (default) removes every such pin from the workers' environment (ISA_PINS),
`avx2` limits every side to AVX2+FMA (AVX2_PINS: OpenBLAS Haswell, Numba haswell, torch's ATen and
oneDNN, and through ONEDNN_MAX_CPU_ISA most of OpenVINO's kernels), `env` leaves the environment as
it is. Each worker reads back what its libraries picked (OpenBLAS's core name, Numba's target CPU,
torch's ATen capability and oneDNN's ISA, the ISA named by each OpenVINO kernel) and the table's
footer prints it. Not reached by any setting: torch's fp32 matmuls go to MKL and many of OpenVINO's
to MLAS, which choose by CPUID (avx2 sets MKL_ENABLE_INSTRUCTIONS too, which MKL follows on Intel
CPUs; on an AMD CPU it did not change MKL's sgemm speed, AVX2-class either way), and OpenVINO's
MVN (group/layer norm) and Interpolate kernels stay AVX-512 under ONEDNN_MAX_CPU_ISA=AVX2.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
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
        "unet1": "U-Net step, batch 1 (no CFG)",
        "vae": "VAE decode 512×512", "image": "512×512 image"}
SIDES = ("diffusers", "numpy", "cpu", "openvino")
TOLERANCE = {"text": 1e-3, "unet": 1e-3, "unet1": 1e-3, "vae": 1e-3, "image": 0.5}   # image: mean |Δ|·255

# The variables through which each library is pinned to an instruction set (ISA). --isa native
# removes them all from a worker's environment, so every library picks its kernels for this CPU.
ISA_PINS = ("OPENBLAS_CORETYPE", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "ATEN_CPU_CAPABILITY",
            "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE")
# --isa avx2: every side limited to AVX2 + FMA (a laptop-class x86 CPU), as far as a setting reaches
# (not: MKL on AMD CPUs, OpenVINO's MLAS matmuls and its MVN and Interpolate kernels).
AVX2_PINS = {
    "OPENBLAS_CORETYPE": "Haswell",     # numpy's and SciPy's OpenBLAS: their Haswell (AVX2) kernels
    "NUMBA_CPU_NAME": "haswell",        # Numba compiles for Haswell, with Haswell's features only:
    "NUMBA_CPU_FEATURES": "",           #   unset, Numba would add this host's (avx512f, ...) to it
    "ATEN_CPU_CAPABILITY": "avx2",      # torch's vectorised ATen kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",       # oneDNN: torch's convolutions, OpenVINO's CPU plugin
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # torch's MKL sgemm (on Intel CPUs; MKL ignores it on AMD's)
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="text,unet,vae", help="comma-separated: text, unet, unet1, vae, image")
    p.add_argument("--image", action="store_true", help="add the whole-image row (minutes per side)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps of the image row (default 20)")
    p.add_argument("--sides", default="diffusers,numpy,cpu",
                   help="comma-separated: diffusers, numpy, cpu, openvino (default: the first three; openvino "
                        "needs `pip install openvino` and skips the image row)")
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
    if "openvino" in args.side_list and importlib.util.find_spec("openvino") is None:
        raise SystemExit("bench_cpu.py: --sides openvino: OpenVINO is not installed (pip install openvino)")
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
    return run, load_s, None, lambda: {"isa": torch_isa()}


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
    return run, load_s, ops, lambda: {"isa": tinysd_isa()}


def openvino_module(folder, row):
    """The reference module of `row` (transformers' CLIP text encoder, diffusers' U-Net or VAE
    decoder) from `folder`, wrapped so that its forward takes and returns plain tensors, which is
    what openvino.convert_model traces."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    class Plain(torch.nn.Module):
        def __init__(self, module, plain_forward):
            super().__init__()
            self.module = module
            self.plain_forward = plain_forward

        def forward(self, *tensors):
            return self.plain_forward(self.module, *tensors)

    if row == "text":
        return Plain(CLIPTextModel.from_pretrained(folder / "text_encoder"), lambda m, ids: m(ids)[0])
    if row == "unet":
        return Plain(UNet2DConditionModel.from_pretrained(folder / "unet"),
                     lambda m, latents, t, context: m(latents, t, encoder_hidden_states=context).sample)
    return Plain(AutoencoderKL.from_pretrained(folder / "vae"), lambda m, z: m.decode(z).sample)


def openvino_inputs(row, x):
    """The row's inputs in the order of openvino_module's forward; the U-Net's timestep is an int64 scalar."""
    return {"text": [x["ids"]], "unet": [x["latents"], np.array(500, np.int64), x["context"]],
            "vae": [x["z"]]}[row]


def openvino_kernels(compiled):
    """{ISA: how many nodes} of a compiled model, from the primitive type OpenVINO's CPU plugin names
    for each node it ran: brgconv_avx512_f32 -> avx512, gemm_mlas_f32 -> mlas (its own dispatch),
    jit_uni_f32 -> uni (the ISA chosen inside), ref_any_f32 -> ref (plain C++). Nodes that compute
    nothing (inputs, constants, reshapes: unknown/undef) and layout reorders are left out."""
    kernels = {}
    for op in compiled.get_runtime_model().get_ops():
        primitive = op.get_rt_info()["primitiveType"].astype(str)
        if primitive.startswith(("unknown", "undef", "reorder")):
            continue
        kind = next((k for k in ("avx512", "avx2", "mlas", "uni", "ref") if k in primitive), "other")
        kernels[kind] = kernels.get(kind, 0) + 1
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]))


def openvino_runner(folder, row, x, threads):
    """OpenVINO's CPU plugin on the reference module of `row`: converted from torch with
    openvino.convert_model (static shapes: the benchmark's), compiled in fp32 (on CPUs with bf16
    OpenVINO's default is bf16) with `threads` threads. Loading = from_pretrained + conversion + compiling."""
    import openvino as ov
    import torch
    torch.set_num_threads(threads)
    arrays = openvino_inputs(row, x)
    t0 = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(openvino_module(folder, row).eval(),
                                 example_input=tuple(torch.from_numpy(a) for a in arrays))
    model.reshape({model.input(i): ov.PartialShape(a.shape) for i, a in enumerate(arrays)})
    convert_s = time.perf_counter() - t0
    core = ov.Core()
    default_precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_NUM_THREADS": threads})
    load_s = time.perf_counter() - t0
    request = compiled.create_infer_request()

    def run():
        request.infer(arrays)
        return request.get_output_tensor(0).data.copy()

    def facts():
        return {"convert_s": convert_s, "isa": {
            "kernels by ISA": openvino_kernels(compiled),
            "precision": f"{compiled.get_property('INFERENCE_PRECISION_HINT').to_string()} "
                         f"(OpenVINO's default on this CPU: {default_precision})"}}
    return run, load_s, None, facts


def agreement(row, out, ref):
    """Relative max error, or for the image the mean |Δ| in 1/255 steps."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if out.shape != ref.shape:
        raise SystemExit(f"{row}: output shape {out.shape} differs from diffusers' {ref.shape}")
    if row == "image":
        return float(np.abs(out - ref).mean() * 255)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def time_runs(run, repeat):
    """Call run() `repeat` times -> (its last output, {"times": wall seconds of each call,
    "seconds": their median (None for no calls), "peak_rss_mb": this process's peak RSS so far}).
    The benchmarks' workers time their rows with it, after a warm-up."""
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return out, {"times": times, "seconds": statistics.median(times) if times else None,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(args):
    side, row = args.worker
    folder = model_folder(args.workdir)
    x = inputs(folder)
    model_row = row
    if row == "unet1":                  # the same U-Net on the first latent alone, as with guidance ≤ 1
        x, model_row = dict(x, latents=x["latents"][:1], context=x["context"][:1]), "unet"
    if side == "diffusers":
        run, load_s, ops, facts = diffusers_runner(folder, model_row, x, args.steps, args.threads)
    elif side == "openvino":
        run, load_s, ops, facts = openvino_runner(folder, model_row, x, args.threads)
    else:
        from tinysd.kernels.threads import set_num_threads
        set_num_threads(args.threads)
        run, load_s, ops, facts = tinysd_runner(folder, model_row, x, args.steps, side)
    t0 = time.perf_counter()
    if ops is not None and row != "image":
        out, flops = count_flops(ops, run)
    else:
        out, flops = run(), None
    first_s = time.perf_counter() - t0
    ref_file = args.workdir / f"diffusers-{row}-{args.steps}.npy"
    result = {"side": side, "row": row, "load_s": load_s, "first_s": first_s, "flops": flops, **facts()}
    if side == "diffusers":
        np.save(ref_file, out)
    elif ref_file.exists():
        result["error"] = agreement(row, out, np.load(ref_file))
        if not result["error"] <= TOLERANCE[row]:
            result["disagrees"] = True
            print(json.dumps(result))
            return 1
    result.update(time_runs(run, args.repeat)[1])
    if not result["times"]:
        result["seconds"] = first_s                     # --repeat 0: the checked run itself
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


def describe_isa(isa):
    """{"openblas": {"scipy": "SkylakeX"}, "numba": "znver5"} -> "openblas scipy SkylakeX; numba znver5"."""
    def text(found):
        return found if isinstance(found, str) else ", ".join(f"{k} {v}" for k, v in found.items())
    return "; ".join(f"{lib} {text(found)}" for lib, found in isa.items())


def print_isa(results, sides, isa):
    """Per side, the instruction sets its libraries used, as its worker read them: one line, or one
    per row where they differ (OpenVINO's kernels)."""
    print(f"instruction sets (--isa {isa}):")
    for side in sides:
        found = {row: describe_isa(r["isa"]) for row, r in results[side].items()}
        if len(set(found.values())) == 1:
            found = {"": next(iter(found.values()))}
        for row, text in found.items():
            print(f"{(side + ' ' + row).strip():>14s}: {text}")
    if results.get("openvino"):
        print("openvino's load+1st includes converting from torch (" + ", ".join(
            f"{row} {r['convert_s']:.0f} s" for row, r in results["openvino"].items()) +
              ") and its peak RSS the torch model's; MLAS (its fp32 matmuls) picks its ISA by CPUID: "
              "no setting found limits it")


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
            if (side, row) == ("openvino", "image"):
                continue
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
