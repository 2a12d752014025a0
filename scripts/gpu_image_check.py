"""One picture on the `cuda` backend against the same picture on the `numpy` reference backend.

    python scripts/gpu_image_check.py                 # SD v1.5-sized random weights, on a GPU
    python scripts/gpu_image_check.py --tiny --backend cpu   # dry run of the script without a GPU

Builds seeded random weights with diffusers (tests/reference_models.py), writes them as a
diffusers folder, loads that folder on both backends and draws one 512×512 image (64×64 with
--tiny) with the same prompt, seed, sampler and steps. Prints the mean and max |Δ| in 1/255
units and the seconds of each side (the cuda side's first run includes compiling its kernels);
exits non-zero if the mean |Δ| is above 1/255. Writes a JSON line with `--json`. (numba's CUDA
simulator is far too slow even for the tiny model's picture: the CUDA kernels are checked there
by tests/test_kernels_cuda.py on tiny shapes.)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT, SEED = "a photograph of an astronaut riding a horse", 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tests' tiny model (for a dry run in the simulator)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--sampler", default="euler", help="sampler (default euler)")
    p.add_argument("--backend", default="cuda", help="the backend to check against numpy (default cuda)")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    import tinysd
    from reference_models import build_reference

    folder = Path(tempfile.mkdtemp(prefix="tinysd-gpu-check-")) / "model"
    ref = build_reference(size="tiny" if args.tiny else "sd-v1-5", write=False, seed=0)
    ref.pipe.save_pretrained(folder, safe_serialization=True)
    size = 64 if args.tiny else 512
    images, seconds = {}, {}
    for backend in (args.backend, "numpy"):
        sd = tinysd.load(folder, backend=backend)
        start = time.perf_counter()
        images[backend] = sd(PROMPT, num_inference_steps=args.steps, seed=SEED, scheduler=args.sampler,
                             height=size, width=size, output_type="np").images
        seconds[backend] = time.perf_counter() - start
        del sd
    delta = np.abs(images[args.backend] - images["numpy"]) * 255
    result = {"backend": args.backend, "size": size, "steps": args.steps, "sampler": args.sampler,
              "mean_abs_255": float(delta.mean()), "max_abs_255": float(delta.max()),
              f"seconds_{args.backend}": seconds[args.backend], "seconds_numpy": seconds["numpy"]}
    print(f"{args.backend} vs numpy, {size}×{size}, {args.steps} {args.sampler} steps: mean |Δ| "
          f"{result['mean_abs_255']:.4f}/255, max {result['max_abs_255']:.2f}/255; {args.backend} "
          f"{seconds[args.backend]:.1f} s (with compiling), numpy {seconds['numpy']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result))
    return 0 if result["mean_abs_255"] <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
