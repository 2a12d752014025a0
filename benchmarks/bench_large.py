"""Large pictures on the `cpu` backend: peak memory (RSS) and seconds, SD v1.5-sized random weights.

    python benchmarks/bench_large.py                               # every row (an hour or more on 2 cores)
    python benchmarks/bench_large.py --rows unet768,unet1024       # some of them
    python benchmarks/bench_large.py --rows decode2048 --json large.json
    python benchmarks/bench_large.py --rows hires,upscale --steps 4 --hires-steps 2   # peak RSS, quicker

Rows (each in its own subprocess, so its peak RSS is its own; getrusage):
    unet768, unet1024      one U-Net step with classifier-free guidance (batch 2) at 96×96 and
                           128×128 latents: only the U-Net is loaded
    decode1024             the untiled VAE decode of 128×128 latents (only the VAE is loaded)
    decode2048             the tiled VAE decode of 256×256 latents to 2048×2048
    decode2048-untiled     the same untiled, where the machine has the memory for it (else skipped)
    hires                  a 512×512 txt2img of 20 steps, hires fix ×2 ("Latent") and 10 more steps at
                           1024×1024 (denoising 0.5), decoded: the whole model loaded
    upscale                SD upscale ×2 of a 512×512 picture (Lanczos, 512 tiles, overlap 64,
                           20 steps at strength 0.3: 6 steps a tile), 9 tiles to 1024×1024

The weights are the random SD v1.5-sized folder of benchmarks/bench_cpu.py (built on first use
under --workdir). Seconds are wall-clock of the first (and only) run after loading, so Numba's
compilation is included where a shape is new: the large rows run minutes, compilation seconds.
"CPU s" is the process's user + system time over the same work: on a busy (shared) machine the
wall-clock grows with the other load, the CPU time much less (about threads × wall when idle).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_cpu import PROMPT, model_folder, run_worker  # noqa: E402

ROWS = {"unet768": "U-Net step, CFG batch 2, 96×96 latents (768²)",
        "unet1024": "U-Net step, CFG batch 2, 128×128 latents (1024²)",
        "decode1024": "VAE decode 1024×1024, untiled",
        "decode2048": "VAE decode 2048×2048, tiled",
        "decode2048-untiled": "VAE decode 2048×2048, untiled",
        "hires": "hires fix 512→1024, 20 + 10 steps",
        "upscale": "SD upscale ×2 of 512², 9 tiles × 6 steps"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (OpenBLAS, Numba)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinysd-bench"),
                   help="where the random SD v1.5-sized model folder is kept (about 4 GB)")
    p.add_argument("--steps", type=int, default=20, help="first-pass steps of hires, the steps upscale's "
                                                          "strength 0.3 takes a part of (default 20)")
    p.add_argument("--hires-steps", type=int, default=10, help="the hires pass's steps (default 10)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", metavar="ROW", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    if set(args.row_list) - set(ROWS):
        p.error(f"--rows: unknown {sorted(set(args.row_list) - set(ROWS))}; choose from {', '.join(ROWS)}")
    return args


def load_part(folder, part, cls, backend):
    """One part of the model (unet or vae) alone, from the diffusers folder."""
    from tinysd.weights import read_weights

    config = json.loads((folder / part / "config.json").read_text())
    state = read_weights(folder / part / "diffusion_pytorch_model.safetensors")
    return cls(config).set_backend(backend).load_state_dict(state, source=f"{folder} ({part})")


def mem_available():
    """MemAvailable of /proc/meminfo, bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def prepare(row, folder, steps=20, hires_steps=10):
    """(work, describe) for the row, after loading what it needs: `work()` is what is timed,
    `describe(result)` the note; (None, reason) where the row cannot run here."""
    import tinysd
    from tinysd.backend import get_backend
    from tinysd.unet import UNet2DConditionModel
    from tinysd.vae import AutoencoderKL

    backend = get_backend("cpu")
    rng = np.random.default_rng(0)
    if row.startswith("unet"):
        side = {"unet768": 96, "unet1024": 128}[row]
        unet = load_part(folder, "unet", UNet2DConditionModel, backend)
        x = backend.asarray(rng.standard_normal((2, 4, side, side)).astype(np.float32))
        context = backend.asarray(rng.standard_normal((2, 77, 768)).astype(np.float32))
        return (lambda: backend.numpy(unet(x, 500, context))), (lambda out: f"output {out.shape}")
    if row.startswith("decode"):
        side = 128 if row == "decode1024" else 256
        vae = load_part(folder, "vae", AutoencoderKL, backend)
        vae.use_tiling = row == "decode2048"
        if row == "decode2048-untiled":
            need, have = vae.peak_bytes("decoder", 1, 2048, 2048), mem_available()
            if have is not None and need * 1.2 > have:
                return None, (f"skipped: the estimate {need / 2 ** 30:.1f} GiB (x1.2) > "
                              f"{have / 2 ** 30:.1f} GiB available")
        z = rng.standard_normal((1, 4, side, side)).astype(np.float32)
        return (lambda: backend.numpy(vae.decode(z))), (lambda out: f"output {out.shape[3]}x{out.shape[2]}")
    sd = tinysd.load(str(folder), backend=backend)
    if row == "hires":
        def hires():
            return sd(PROMPT, num_inference_steps=steps, seed=0, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                      hr_second_pass_steps=hires_steps, denoising_strength=0.5, output_type="np").images
        return hires, (lambda out: f"output {out.shape[2]}x{out.shape[1]}")
    picture = (rng.random((512, 512, 3)) * 255).astype(np.uint8)

    def upscale():
        return sd.upscale(PROMPT, picture, scale=2, num_inference_steps=steps, strength=0.3, seed=0).images[0]
    return upscale, (lambda out: f"output {out.width}x{out.height}, {sd.num_tiles} tiles")


def worker(args):
    import numba
    import tinysd  # noqa: F401  (before numba starts its threads: it sets OMP_WAIT_POLICY)
    numba.set_num_threads(args.threads)
    work, describe = prepare(args.worker, model_folder(args.workdir), args.steps, args.hires_steps)
    result = {"row": args.worker, "seconds": None, "cpu_s": None, "note": describe}
    if work is not None:
        t0, c0 = time.perf_counter(), cpu_seconds()
        out = work()
        result.update(seconds=time.perf_counter() - t0, cpu_s=cpu_seconds() - c0, note=describe(out))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    return 0


def spawn(args, row):
    result, proc = run_worker(__file__, [row, "--threads", args.threads, "--workdir", args.workdir,
                                         "--steps", args.steps, "--hires-steps", args.hires_steps], args.threads)
    if result is None:
        return {"row": row, "seconds": None, "cpu_s": None, "peak_rss_mb": None,
                "note": f"failed (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"}
    return result


def main(argv=None):
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args)
    model_folder(args.workdir)
    results = []
    for row in args.row_list:
        print(f"{row} ...", flush=True)
        results.append(spawn(args, row))
        r = results[-1]
        print(f"    {r['seconds'] and round(r['seconds'], 1)} s ({r['cpu_s'] and round(r['cpu_s'], 1)} CPU s), "
              f"peak RSS {r['peak_rss_mb'] and round(r['peak_rss_mb'] / 1024, 2)} GB {r['note']}", flush=True)
    print(f"\n{os.cpu_count()} CPUs, {args.threads} threads, load average {os.getloadavg()[0]:.1f} (at the end)")
    print(f"{'':50s}{'seconds':>10s}{'CPU s':>10s}{'peak RSS':>12s}  note")
    for r in results:
        seconds = f"{r['seconds']:10.1f}{r['cpu_s']:10.1f}" if r["seconds"] is not None else f"{'-':>10s}{'-':>10s}"
        rss = f"{r['peak_rss_mb'] / 1024:9.2f} GB" if r["peak_rss_mb"] is not None else f"{'-':>12s}"
        print(f"{ROWS[r['row']]:50s}{seconds}{rss}  {r['note']}")
    if (args.steps, args.hires_steps) != (20, 10):
        print(f"hires and upscale ran {args.steps} (+ {args.hires_steps}) steps, not the rows' 20 (+ 10)")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "load_average": os.getloadavg(),
                                         "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
