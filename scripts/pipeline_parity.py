"""Print the end-to-end parity figures per sampler and mode: tinysd vs diffusers' pipelines on
the tiny seeded random model of the tests (same seed, steps, guidance).

    python scripts/pipeline_parity.py [--json FILE]

Columns: max |Δ latents| relative to the latents' scale (bound 1e-3) and the mean absolute
difference of the decoded images in 1/255 units (bound 0.5). tests/test_pipeline.py asserts
the same bounds; this script shows the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    import tinysd
    from reference_models import build_reference
    from test_pipeline import SAMPLERS, run_reference, run_tinysd

    tiny = build_reference(Path(tempfile.mkdtemp(prefix="tinysd-parity-")), size="tiny", seed=0)
    sd = tinysd.load(tiny.folder, backend="numpy")
    rows = []
    print(f"{'sampler':17} {'mode':8} {'latents rel. err':>17} {'image MAD (/255)':>17}")
    for sampler in SAMPLERS:
        for kind in ("txt2img", "img2img", "inpaint"):
            (lat, img), (ref_lat, ref_img) = run_tinysd(sd, kind, sampler), run_reference(tiny, kind, sampler)
            rel = float(np.abs(lat - ref_lat).max() / np.abs(ref_lat).max())
            mad = float(np.abs(img - ref_img).mean() * 255)
            rows.append(dict(sampler=sampler, mode=kind, latents_rel_err=rel, image_mad_255=mad))
            print(f"{sampler:17} {kind:8} {rel:17.2e} {mad:17.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    worst = max(r["latents_rel_err"] for r in rows), max(r["image_mad_255"] for r in rows)
    print(f"\nworst: latents {worst[0]:.2e} (bound 1e-3), image {worst[1]:.2e}/255 (bound 0.5/255)")


if __name__ == "__main__":
    main()
