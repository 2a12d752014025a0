"""Which way the cpu backend should run each 3×3 convolution: milliseconds per conv for every
route it has (Winograd F(4×4, 3×3) and F(2×2, 3×3), each split between the cores by chunks of
tiles, by blocks of output channels with BLAS GEMMs, or by small blocks with dot products; one
im2col GEMM; shifted GEMMs) and for the route
`CpuBackend.conv2d` picks by its thresholds ("picked").

    python benchmarks/conv_routes.py                            # the U-Net's convs, CFG batch 2
    python benchmarks/conv_routes.py --batch 1                  # at batch 1 (LCM, guidance ≤ 1)
    python benchmarks/conv_routes.py --shapes 512,512,128 128,128,512    # the VAE decoder's
    OPENBLAS_CORETYPE=Haswell python benchmarks/conv_routes.py  # OpenBLAS's AVX2 kernels

Shapes are Cin,Cout,size (square images). Best of --repeat runs after a warm-up; random weights.
The thresholds in kernels/cpu.py (winograd_f4_min_tiles, winograd_f2_min_tiles,
winograd_by_cout_max_tiles, winograd_by_cout_min_channels, winograd_dots_max_tiles,
winograd_f4_min_tiles_wide, im2col_max_pixels) were set from this table.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

UNET = "320,320,64 640,320,64 640,640,32 1280,640,32 1280,1280,16 1920,1280,16 2560,1280,16 1280,1280,8"
WINOGRAD_F4 = dict(winograd_f4_min_tiles=0, winograd_f4_min_tiles_wide=0)
WINOGRAD_F2 = dict(winograd_f4_min_tiles=1 << 30, winograd_f4_min_tiles_wide=1 << 30, winograd_f2_min_tiles=0)
NO_WINOGRAD = dict(winograd_f4_min_tiles=1 << 30, winograd_f4_min_tiles_wide=1 << 30, winograd_f2_min_tiles=1 << 30,
                   winograd_by_cout_min_channels=1 << 30)
BY_TILES = dict(winograd_by_cout_max_tiles=0, winograd_dots_max_tiles=0)
BY_COUT = dict(winograd_by_cout_max_tiles=1 << 30, winograd_dots_max_tiles=0, winograd_by_cout_min_channels=0)
BY_DOTS = dict(winograd_dots_max_tiles=1 << 30, winograd_by_cout_min_channels=0)
ROUTES = {"f4 tiles": {**WINOGRAD_F4, **BY_TILES}, "f4 cout": {**WINOGRAD_F4, **BY_COUT},
          "f4 dots": {**WINOGRAD_F4, **BY_DOTS}, "f2 tiles": {**WINOGRAD_F2, **BY_TILES},
          "f2 cout": {**WINOGRAD_F2, **BY_COUT}, "f2 dots": {**WINOGRAD_F2, **BY_DOTS},
          "im2col": {**NO_WINOGRAD, "im2col_max_pixels": 1 << 30},
          "shifted": {**NO_WINOGRAD, "im2col_max_pixels": 0},
          "picked": {}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=UNET.split(), help="Cin,Cout,size ...")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    from tinysd.kernels.cpu import CpuBackend

    rng = np.random.default_rng(0)
    print(f"{'conv':>24}" + "".join(f"{r:>10}" for r in ROUTES) + "   (ms)")
    for shape in args.shapes:
        cin, cout, size = map(int, shape.split(","))
        x = rng.standard_normal((args.batch, cin, size, size)).astype(np.float32)
        w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.02
        b = rng.standard_normal(cout).astype(np.float32)
        cells = []
        for route, thresholds in ROUTES.items():
            be = CpuBackend()
            for name, value in thresholds.items():
                setattr(be, name, value)
            if route == "im2col" and args.batch * size * size > 8192:
                cells.append("-")                        # its column matrix would take GBs
                continue
            wt = be.asarray(w)
            be.conv2d(x, wt, b, 1, 1)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                be.conv2d(x, wt, b, 1, 1)
                times.append(time.perf_counter() - t0)
            cells.append(f"{1000 * min(times):.1f}")
        label = f"{cin}→{cout} at {size}×{size} ×{args.batch}"
        print(f"{label:>24}" + "".join(f"{c:>10}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
