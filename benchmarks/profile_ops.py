"""Where a backend spends its time: seconds and GFLOP/s per primitive op for the text encoder
(batch 2), one U-Net step with CFG (batch 2, 64×64 latents; --batch 1 without) and one 512×512 VAE decode, on SD
v1.5-sized random weights.

    python benchmarks/profile_ops.py [--backend cpu] [--model FOLDER] [--parts text,unet,vae] [--by-shape]
    python benchmarks/profile_ops.py --fixed-cost [--repeat 3]

--by-shape splits each op's row by its operands' shapes (which conv or attention is slow).
--fixed-cost times the U-Net at batch 1 and 2 in one process and splits each shape's seconds as
t = a·batch + F: F = 2·t(1) − t(2) is what a step costs whatever the batch (reading and
transforming weights, packing them for BLAS), a = t(2) − t(1) what each image adds; batch 1 runs
at (2a + F)/(a + F) times the speed of batch 2. Fastest of --repeat runs per shape.

FOLDER defaults to the one bench_cpu.py writes (/tmp/tinysd-bench/sd-v1-5-random). The first
call of each part warms up (Numba compile or cache load) and is not counted.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from flops import op_flops

OPS = ("conv2d", "linear", "linear_geglu", "attention", "group_norm", "layer_norm", "geglu", "silu", "to_tokens",
       "to_image", "upsample_nearest2x", "concat")


def shape_key(name, args):
    """e.g. "conv2d 320→320 3×3 at 64×64 ×2" or "attention (16, 4096, 40) × (16, 77, 40)"."""
    if name == "conv2d":
        (B, Cin, H, W), (Cout, _, kh, kw) = args[0].shape, args[1].shape
        return f"{name} {Cin}→{Cout} {kh}×{kw} at {H}×{W} ×{B}"
    arrays = [a for a in args[:2] if hasattr(a, "shape")]
    return f"{name} " + " × ".join(str(tuple(a.shape)) for a in arrays)


def profiled(backend, fn, by_shape=False):
    """Run fn() with every op in OPS timed; returns {op: [seconds, flops, calls]} (keys
    `shape_key(op, args)` with `by_shape`). An op called by another (linear_geglu → linear)
    counts in its caller's row only."""
    table = defaultdict(lambda: [0.0, 0, 0])
    originals = {name: getattr(backend, name) for name in OPS}
    depth = [0]

    def wrap(name, op):
        def timed(*args, **kwargs):
            if depth[0]:
                return op(*args, **kwargs)
            depth[0] += 1
            start = time.perf_counter()
            try:
                out = op(*args, **kwargs)
            finally:
                depth[0] -= 1
            row = table[shape_key(name, args) if by_shape else name]
            row[0] += time.perf_counter() - start
            row[1] += op_flops(name, args, out)
            row[2] += 1
            return out
        return timed

    for name, op in originals.items():
        setattr(backend, name, wrap(name, op))
    try:
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
    finally:
        for name in OPS:
            delattr(backend, name)
    return table, total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--model", default="/tmp/tinysd-bench/sd-v1-5-random")
    parser.add_argument("--parts", default="text,unet,vae")
    parser.add_argument("--by-shape", action="store_true", help="one row per op and operand shapes")
    parser.add_argument("--batch", type=int, default=2, help="the U-Net's batch (2: CFG; 1: guidance ≤ 1, LCM)")
    parser.add_argument("--fixed-cost", action="store_true", help="the U-Net's per-step cost at batch 1 and 2, per shape")
    parser.add_argument("--repeat", type=int, default=3, help="with --fixed-cost: runs per batch")
    args = parser.parse_args()

    import tinysd

    if not Path(args.model).is_dir():
        raise SystemExit(f"{args.model}: no model folder (run benchmarks/bench_cpu.py once, or pass --model)")
    sd = tinysd.load(args.model, backend=args.backend)
    rng = np.random.default_rng(0)
    runs = {
        "text": lambda: sd.encode_prompt("a photograph of an astronaut riding a horse"),
        "unet": lambda: sd.unet(sd.ops.asarray(rng.standard_normal((args.batch, 4, 64, 64), dtype=np.float32)),
                                999, sd.ops.asarray(rng.standard_normal((args.batch, 77, 768), dtype=np.float32))),
        "vae": lambda: sd.vae.decode(rng.standard_normal((1, 4, 64, 64), dtype=np.float32)),
    }
    if args.fixed_cost:
        return fixed_cost(sd, rng, args.repeat)
    for part in args.parts.split(","):
        runs[part]()                                   # warm-up: compile or load the kernels
        table, total = profiled(sd.ops, runs[part], args.by_shape)
        print(f"\n{part} on {args.backend}: {total:.2f} s")
        width = max(20, *(len(k) for k in table))
        print(f"  {'op':{width}} {'calls':>6} {'seconds':>8} {'share':>6} {'GFLOP/s':>8}")
        for name, (sec, flops, calls) in sorted(table.items(), key=lambda kv: -kv[1][0]):
            rate = f"{flops / sec / 1e9:8.1f}" if flops else f"{'':8}"
            print(f"  {name:{width}} {calls:6d} {sec:8.2f} {sec / total:6.1%} {rate}")
        print(f"  {'(outside the ops)':{width}} {'':6} {total - sum(r[0] for r in table.values()):8.2f}")


def fixed_cost(sd, rng, repeat):
    """Print the U-Net's seconds per op and shape at batch 1 and 2, and F = 2·t(1) − t(2)."""
    inputs = {b: (sd.ops.asarray(rng.standard_normal((b, 4, 64, 64), dtype=np.float32)),
                  sd.ops.asarray(rng.standard_normal((b, 77, 768), dtype=np.float32))) for b in (1, 2)}
    best, total = {1: {}, 2: {}}, {1: np.inf, 2: np.inf}
    for b, (x, c) in inputs.items():
        sd.unet(x, 999, c)                                          # warm-up
    for _ in range(repeat):
        for b, (x, c) in inputs.items():
            table, seconds = profiled(sd.ops, lambda: sd.unet(x, 999, c), by_shape=True)
            total[b] = min(total[b], seconds)
            for key, (sec, _, _) in table.items():
                if key.endswith(f" ×{b}"):                              # one row for both batches
                    key = key[:-len(str(b))] + "B"
                key = key.replace(f"({b}, ", "(B, ")
                best[b][key] = min(best[b].get(key, np.inf), sec)
    a, F = total[2] - total[1], 2 * total[1] - total[2]
    print(f"\nU-Net step: batch 1 {total[1]:.3f} s, batch 2 {total[2]:.3f} s: batch 1 at "
          f"{total[2] / total[1]:.3f}× the speed; a = {a:.3f} s per image, F = {F:.3f} s per step")
    rows = sorted(((2 * t1 - best[2].get(k, 0.0), t1, best[2].get(k, 0.0), k) for k, t1 in best[1].items()), reverse=True)
    width = max(len(r[3]) for r in rows)
    print(f"  {'op (B: the batch)':{width}} {'F ms':>7} {'batch 1 ms':>10} {'batch 2 ms':>10}")
    for f, t1, t2, key in rows:
        print(f"  {key:{width}} {f * 1e3:7.1f} {t1 * 1e3:10.1f} {t2 * 1e3:10.1f}")
    print(f"  {'(all ops)':{width}} {sum(r[0] for r in rows) * 1e3:7.1f}")


if __name__ == "__main__":
    main()
