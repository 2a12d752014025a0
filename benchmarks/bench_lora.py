"""How long applying and removing a LoRA takes on the full-size U-Net: a LoRA of the LCM-LoRA's
shapes (rank 64 on every attention projection, feed-forward, proj_in/out, ResNet conv and
time-embedding projection, down/up-sampler conv: kohya keys, fp16, as the published file) on
SD v1.5-sized random U-Net weights, with the `numpy` and `cpu` backends.

    python benchmarks/bench_lora.py                       # both backends, 2 repeats
    python benchmarks/bench_lora.py --backends cpu --repeat 3 --json lora.json

The random weights (3.4 GB) and the LoRA (about 135 MB) are written once under --workdir, straight
from NumPy (no torch), and every run memory-maps them as `tinysd.load` does. Each backend runs in
its own process (its peak RSS is its own). Rows: reading and checking the file against the model
(`read_lora`); applying it (every patched weight re-derived: W + (α/r)·up@down, then the
backend's `asarray`); `load_lora_weights` as a whole (both); changing its weight (`set_adapters`,
all patched weights again); unloading (every patched weight back to the loaded array). After
unloading, every U-Net weight is compared with the file's, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# diffusers' LCM-LoRA training script (train_lcm_distill_lora_sd_wds.py) targets these, at rank 64
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
ROWS = ("read and check", "apply", "load_lora_weights", "set_adapters (new weight)", "unload_lora_weights")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="numpy,cpu", help="comma-separated: numpy, cpu")
    p.add_argument("--repeat", type=int, default=3, help="load/re-weight/unload cycles (default 3): the first "
                                                           "(file pages cold) and the median of the others are shown")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinysd-bench-lora"))
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", metavar="BACKEND", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_safetensors(path, tensors):
    """Write {name: (dtype, shape, make)} as safetensors, calling make() one tensor at a time."""
    header, offset = {}, 0
    for name, (dtype, shape, _) in tensors.items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[np.dtype(dtype).name], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for dtype, _, make in tensors.values():
            f.write(np.ascontiguousarray(make(), dtype=dtype).tobytes())
    tmp.replace(path)


def sd15_config(part):
    return json.loads((REPO / "tinysd" / "data" / "sd-v1-5" / part / "config.json").read_text())


def random_model_file(path, model, seed):
    """Seeded random weights for `model` (N(0, 1/fan_in) for matrices and kernels), written to `path`."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for key, param in model.named_parameters():
        shape = param.shape
        scale = 1 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.05
        tensors[key] = ("float32", shape, lambda s=shape, c=scale: rng.standard_normal(s, dtype=np.float32) * c)
    write_safetensors(path, tensors)


def lcm_shaped_lora_file(path, unet, rank, seed):
    """kohya keys (lora_unet_<path>.lora_down.weight / lora_up.weight / alpha), fp16, rank `rank`."""
    from tinysd.lora import target_layers

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer_path, layer in target_layers(unet).items():
        if not layer_path.endswith(LCM_TARGETS):
            continue
        out_dim, *fan_in = layer.weight.shape
        name = "lora_unet_" + layer_path.replace(".", "_")
        down_shape = (rank, *fan_in)
        up_shape = (out_dim, rank) + ((1, 1) if len(fan_in) == 3 else ())
        tensors[f"{name}.lora_down.weight"] = ("float16", down_shape, lambda s=down_shape: rng.standard_normal(
            s, dtype=np.float32) / np.sqrt(np.prod(s[1:])))
        tensors[f"{name}.lora_up.weight"] = ("float16", up_shape, lambda s=up_shape: rng.standard_normal(
            s, dtype=np.float32) * 0.01)
        tensors[f"{name}.alpha"] = ("float16", (), lambda: np.float32(8.0))
    write_safetensors(path, tensors)
    return len(tensors) // 3


def prepare(workdir, rank):
    from tinysd.text_encoder import CLIPTextModel
    from tinysd.unet import UNet2DConditionModel

    workdir.mkdir(parents=True, exist_ok=True)
    files = {"unet": workdir / "unet.safetensors", "text_encoder": workdir / "text_encoder.safetensors",
             "lora": workdir / f"lcm_lora_shaped_r{rank}.safetensors"}
    unet = UNet2DConditionModel(sd15_config("unet"))
    for part, cls, seed in (("unet", UNet2DConditionModel, 0), ("text_encoder", CLIPTextModel, 1)):
        if not files[part].exists():
            print(f"writing random SD v1.5-sized {part} weights to {files[part]} ...", flush=True)
            random_model_file(files[part], cls(sd15_config(part)), seed)
    if not files["lora"].exists():
        n = lcm_shaped_lora_file(files["lora"], unet, rank, seed=2)
        print(f"wrote a rank-{rank} LoRA on {n} U-Net layers to {files['lora']}", flush=True)
    return files


def worker(args):
    from tinysd.backend import get_backend
    from tinysd.lora import LoraAdapters, read_lora
    from tinysd.text_encoder import CLIPTextModel
    from tinysd.unet import UNet2DConditionModel
    from tinysd.weights import read_safetensors

    files = prepare(args.workdir, args.rank)
    backend = get_backend(args.worker)
    models = {"unet": UNet2DConditionModel(sd15_config("unet")).set_backend(backend),
              "text_encoder": CLIPTextModel(sd15_config("text_encoder")).set_backend(backend)}
    for part, model in models.items():
        model.load_state_dict(read_safetensors(files[part]), source=str(files[part]))
    times = {row: [] for row in ROWS}
    adapters = LoraAdapters(models)
    gflop_sgemm = sgemm_rate()
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        lora = read_lora(files["lora"], models, "check")
        times["read and check"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        adapters.load(files["lora"], "lcm")
        times["load_lora_weights"].append(time.perf_counter() - t0)
        times["apply"].append(times["load_lora_weights"][-1] - times["read and check"][-1])
        t0 = time.perf_counter()
        adapters.set_adapters("lcm", 0.5)
        times["set_adapters (new weight)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        adapters.unload()
        times["unload_lora_weights"].append(time.perf_counter() - t0)
    unet = models["unet"]
    restored = all(np.array_equal(backend.numpy(v), unet.host_array(k)) for k, v in unet.named_parameters())
    patched = sum(len(v) for v in lora.layers.values())
    lora_params = sum(layer.down.size + layer.up.size for c in lora.layers for layer in lora.layers[c])
    gflop = sum(2 * layer.rank * np.prod(models[c].host_array(layer.key).shape) for c in lora.layers
                for layer in lora.layers[c]) / 1e9
    print(json.dumps({"backend": args.worker, "seconds": {r: [t[0], statistics.median(t[1:] or t)]
                                                          for r, t in times.items()},
                      "patched_weights": patched, "lora_parameters": int(lora_params),
                      "unet_parameters": models["unet"].num_parameters(), "bit_identical_after_unload": restored,
                      "delta_gflop": float(gflop), "sgemm_gflops": gflop_sgemm,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def sgemm_rate(n=2048):
    """GFLOP/s of a plain n³ float32 GEMM right now: what this (shared) machine gives BLAS."""
    a, b = np.ones((n, n), np.float32), np.ones((n, n), np.float32)
    a @ b
    t0 = time.perf_counter()
    a @ b
    return 2 * n ** 3 / (time.perf_counter() - t0) / 1e9


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(REPO))
    prepare(args.workdir, args.rank)
    results = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        cmd = [sys.executable, __file__, "--worker", backend, "--repeat", str(args.repeat), "--rank", str(args.rank),
               "--workdir", str(args.workdir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ})
        if proc.returncode:
            sys.exit(f"{backend} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = results[0]
    print(f"\nLoRA of the LCM-LoRA's shapes: rank {args.rank} on {first['patched_weights']} U-Net weights, "
          f"{first['lora_parameters'] / 1e6:.1f}M LoRA parameters; U-Net {first['unet_parameters'] / 1e6:.0f}M "
          f"parameters; applying it is {first['delta_gflop']:.0f} GFLOP of up@down GEMMs. Seconds: the first "
          f"cycle / the median of the {args.repeat - 1} after it\n")
    print(f"| {'':<27} | " + " | ".join(f"{r['backend']:>15}" for r in results) + " |")
    print(f"|{'-' * 29}|" + "|".join("-" * 17 for _ in results) + "|")
    for row in ROWS:
        print(f"| {row:<27} | " + " | ".join(f"{r['seconds'][row][0]:>6.2f} / {r['seconds'][row][1]:>6.2f}"
                                             for r in results) + " |")
    print(f"| {'peak RSS, MB':<27} | " + " | ".join(f"{r['peak_rss_mb']:>15.0f}" for r in results) + " |")
    print(f"| {'sgemm GFLOP/s (2048³) then':<27} | " + " | ".join(f"{r['sgemm_gflops']:>15.0f}" for r in results) + " |")
    print(f"| {'bit-identical after unload':<27} | "
          + " | ".join(f"{str(r['bit_identical_after_unload']):>15}" for r in results) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
