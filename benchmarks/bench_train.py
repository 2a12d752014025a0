"""One training step of the shapes U-Net: tinysd (`cpu`, `numpy` backends) against PyTorch on the same CPU.

    python benchmarks/bench_train.py                          # torch and cpu, 1 thread, min of 5
    python benchmarks/bench_train.py --threads 2 --sides torch,cpu,numpy --repeat 10 --json train.json
    python benchmarks/bench_train.py --rows full,lora         # also a LoRA step (U-Net frozen)

The step: the shapes U-Net (tinysd/data/shapes/unet, 4.3M parameters, SD v1's blocks) on a batch
of 64 noised 8×8 latents with 77-token contexts, the ε-prediction loss, the backward pass, and
one AdamW update of every parameter (row "full"), as training/train_shapes.py trains it; or
with the U-Net frozen and rank-4 LoRA adapters on every attention projection trained (row
"lora"). torch: diffusers' UNet2DConditionModel, autograd, torch.optim.AdamW (PEFT's LoRA
through diffusers' `load_lora_weights` for "lora"). tinysd: `unet(..., saved={})`,
`unet.backward`, `tinysd.train.AdamW`. Each (side, row) runs in its own subprocess (its peak
RSS, from getrusage, is its own) with --threads threads for torch, OpenBLAS and Numba. Both
sides' first-step losses are printed, and each tinysd side's loss and gradient norm must agree
with torch's within 1e-4 before it is timed.

Seconds: the minimum over --repeat steps after two warm-up steps. On a shared machine the
minimum is the run least disturbed by others; the load average is printed. On a busy machine,
multi-threaded BLAS (torch's and OpenBLAS's alike) can be slower than one thread by 10x or
more (a thread waits at each barrier for its partner to be scheduled), so the default is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
UNET = REPO / "tinysd" / "data" / "shapes" / "unet"
ROWS = {"full": "full step (all 4.3M parameters)", "lora": "LoRA step (rank 4, U-Net frozen)"}
SIDES = ("torch", "cpu", "numpy")
BATCH = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="full", help="comma-separated: full, lora")
    p.add_argument("--sides", default="torch,cpu", help="comma-separated: torch, cpu, numpy")
    p.add_argument("--repeat", type=int, default=5, help="timed steps after two warm-up steps (default 5)")
    p.add_argument("--threads", type=int, default=1, help="threads for every side (default 1: see above)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "ROW"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.row_list = [r for r in args.rows.split(",") if r]
    args.side_list = [s for s in SIDES if s in args.sides.split(",")]
    if set(args.row_list) - set(ROWS) or set(args.sides.split(",")) - set(SIDES):
        p.error(f"--rows from {', '.join(ROWS)}; --sides from {', '.join(SIDES)}")
    return args


def batch():
    """The step's inputs: noised latents, timesteps, contexts and the noise to predict (fixed)."""
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    z_t = rng.standard_normal((BATCH, 4, 8, 8)).astype(np.float32)
    t = rng.integers(0, 1000, BATCH)
    context = rng.standard_normal((BATCH, 77, 64)).astype(np.float32)
    return z_t, t, context, eps


def lora_file():
    """A rank-4 kohya LoRA on every attention projection of the shapes U-Net (random up factors, so
    the adapters matter), written once by tinysd and read by both sides."""
    path = Path("/tmp/tinysd-bench-train-lora.safetensors")
    if not path.exists():
        import tinysd
        from tinysd.train import UNET_LORA_TARGETS, add_lora, save_lora

        sd = tinysd.load("shapes", backend="numpy")
        adapters = add_lora(sd.unet, "lora_unet", UNET_LORA_TARGETS, 4)
        rng = np.random.default_rng(1)
        for a in adapters.values():
            a.lora_up.weight[...] = rng.standard_normal(a.lora_up.weight.shape) * 0.1
        save_lora(path, adapters)
    return path


def torch_step(row, threads):
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    unet = UNet2DConditionModel.from_pretrained(UNET).float().train()
    if row == "lora":
        unet.requires_grad_(False)
        from diffusers import StableDiffusionPipeline  # noqa: F401  (load_lora_weights lives on the pipeline mixin)
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(lora_file()))
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    z_t, t, context, eps = (torch.from_numpy(a) for a in batch())

    def step():
        opt.zero_grad(set_to_none=True)
        loss = ((unet(z_t, t, context).sample - eps) ** 2).mean()
        loss.backward()
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
        opt.step()
        return loss.item(), norm
    return step


def tinysd_step(row, side):
    import tinysd
    from tinysd.train import AdamW, UNET_LORA_TARGETS, add_lora, diffusion_loss, lora_parameters, trainable_parameters

    sd = tinysd.load("shapes", backend=side)
    unet = sd.unet
    if row == "lora":
        from safetensors.numpy import load_file

        unet.freeze()
        adapters = add_lora(unet, "lora_unet", UNET_LORA_TARGETS, 4)
        state = load_file(str(lora_file()))
        for name, a in adapters.items():
            a.lora_down.weight[...] = state[f"{name}.lora_down.weight"]
            a.lora_up.weight[...] = state[f"{name}.lora_up.weight"]
        params = lora_parameters(adapters)
    else:
        params = trainable_parameters(unet)
    opt = AdamW(params, lr=1e-4)
    z_t, t, context, eps = batch()
    ones = np.ones(BATCH)

    def step():
        unet.zero_grad()
        saved = {}
        loss, grad = diffusion_loss(unet(z_t, t, context, saved=saved), eps, ones)
        unet.backward(saved, grad)
        norm = float(np.sqrt(sum(np.square(p.grad, dtype=np.float64).sum() for p in params)))
        opt.step()
        return loss, norm
    return step


def worker(args):
    side, row = args.worker
    if side != "torch":
        import numba

        import tinysd  # noqa: F401  (sets OMP_WAIT_POLICY before numba starts its threads)
        numba.set_num_threads(args.threads)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = torch_step(row, args.threads) if side == "torch" else tinysd_step(row, side)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    loss, norm = step()
    first_s = time.perf_counter() - t0
    step()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"side": side, "row": row, "loss": loss, "grad_norm": norm, "first_s": first_s,
                      "seconds": min(times), "times": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_loaded_mb": rss_loaded, "rss_start_mb": rss_before}))
    return 0


def spawn(args, side, row):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, __file__, "--worker", side, row, "--repeat", str(args.repeat), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{side} {row} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if "lora" in args.row_list:
        lora_file()
    results = {}
    for row in args.row_list:
        for side in args.side_list:
            print(f"{side:>6s} {row} ...", flush=True)
            r = results[(side, row)] = spawn(args, side, row)
            print(f"{'':7s}{r['seconds']:.3f} s (min of {args.repeat}), loss {r['loss']:.6f}, "
                  f"grad norm {r['grad_norm']:.6g}, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            ref = results.get(("torch", row))
            if ref and side != "torch":
                for key in ("loss", "grad_norm"):
                    if abs(r[key] - ref[key]) > 1e-4 * abs(ref[key]):
                        raise SystemExit(f"{side} {row}: {key} {r[key]:.8g} differs from torch's {ref[key]:.8g}")
    print(f"\n{os.cpu_count()} CPUs, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}; "
          f"batch {BATCH}, 8×8 latents; min of {args.repeat} steps after 2 warm-up steps")
    print(f"{'':36s}{'side':>6s}{'seconds':>9s}{'× torch':>9s}{'peak RSS':>10s}{'(loaded)':>10s}")
    for row in args.row_list:
        base = results.get(("torch", row), {}).get("seconds")
        for side in args.side_list:
            r = results[(side, row)]
            ratio = f"{r['seconds'] / base:8.2f}×" if base else f"{'':9s}"
            print(f"{ROWS[row] if side == args.side_list[0] else '':36s}{side:>6s}{r['seconds']:9.3f}{ratio}"
                  f"{r['peak_rss_mb']:7.0f} MB{r['rss_loaded_mb']:7.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "repeat": args.repeat, "load_average": os.getloadavg(),
                                         "results": [dict(v) for v in results.values()]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
