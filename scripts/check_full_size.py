"""Full-size parity check: SD v1.5-sized seeded random weights written by diffusers, then
tinysd's text encoder, U-Net forward (CFG batch 2 at 64×64) and VAE decode (512×512) compared
with diffusers'. Prints max abs and relative error and seconds for each.

    python scripts/check_full_size.py [--backend numpy|cpu] [--out DIR]

Needs about 12 GB of memory and a few minutes on 2 cores; not part of the CI tests.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="numpy", help="tinysd backend (default: numpy)")
    parser.add_argument("--out", default=None, help="folder for the written checkpoint (default: a temp dir)")
    args = parser.parse_args()

    import torch

    import tinysd
    from reference_models import build_reference

    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out or tempfile.mkdtemp(prefix="tinysd-full-"))
    ref, t_build = timed(lambda: build_reference(size="sd-v1-5", write=False, seed=0))
    folder = out / "sd-v1-5-random"
    _, t_write = timed(lambda: ref.pipe.save_pretrained(folder, safe_serialization=True))
    print(f"built SD v1.5-sized random weights in {t_build:.0f}s, wrote {folder} in {t_write:.0f}s")
    sd, t_load = timed(lambda: tinysd.load(folder, backend=args.backend))
    print(f"tinysd.load(backend={args.backend!r}): {t_load:.1f}s; U-Net parameters: {sd.unet.num_parameters():,}")

    rng = np.random.default_rng(0)
    ids = sd.tokenizer(["a cat in space", ""])
    latents = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)
    t = np.array([999, 999])
    z = rng.standard_normal((1, 4, 64, 64)).astype(np.float32)

    rows = []
    with torch.no_grad():
        ref_ctx, t_ref = timed(lambda: ref.pipe.text_encoder(torch.from_numpy(ids))[0].numpy())
        ours_ctx, t_ours = timed(lambda: sd.ops.numpy(sd.text_encoder(ids)))
        rows.append(("text encoder (2×77)", ours_ctx, ref_ctx, t_ours, t_ref))
        ctx = torch.from_numpy(ref_ctx)
        ref_eps, t_ref = timed(lambda: ref.pipe.unet(torch.from_numpy(latents), torch.from_numpy(t), ctx).sample.numpy())
        ours_eps, t_ours = timed(lambda: sd.ops.numpy(sd.unet(sd.ops.asarray(latents), t, sd.ops.asarray(ref_ctx))))
        rows.append(("U-Net, CFG batch 2, 64×64", ours_eps, ref_eps, t_ours, t_ref))
        ref_img, t_ref = timed(lambda: ref.pipe.vae.decode(torch.from_numpy(z)).sample.numpy())
        ours_img, t_ours = timed(lambda: sd.ops.numpy(sd.vae.decode(z)))
        rows.append(("VAE decode 512×512", ours_img, ref_img, t_ours, t_ref))

    print(f"\n{'part':28} {'max abs err':>12} {'rel. to scale':>14} {'tinysd s':>9} {'diffusers s':>12}")
    ok = True
    for name, ours, expected, t_ours, t_ref in rows:
        err = float(np.abs(ours - expected).max())
        rel = err / float(np.abs(expected).max())
        ok &= rel <= 1e-4
        print(f"{name:28} {err:12.3g} {rel:14.3g} {t_ours:9.2f} {t_ref:12.2f}")
    print("\nwithin 1e-4 relative:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
