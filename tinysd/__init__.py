"""tinysd: Stable Diffusion v1 in explicit NumPy.

    import tinysd
    sd = tinysd.load("stable-diffusion-v1-5/stable-diffusion-v1-5")   # model id, folder or file
    image = sd("a cat in space", seed=0)

The picture, one file per part: tokenizer -> text_encoder -> unet <-> schedulers -> vae,
tied together by pipeline; weights finds and reads checkpoints; backend holds the op boundary.
"""
import os

__all__ = ["StableDiffusion", "load"]
__version__ = "0.1.0"


def _libgomp_loaded():
    """Whether this process has loaded GNU OpenMP already (Linux; False where it cannot tell)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return False


# The cpu backend's OpenMP threads must not spin between kernels (kernels/cpu.py says why).
# libgomp reads this once, when something first loads it (numba.set_num_threads, torch), so it
# is set as soon as tinysd is imported; where it comes too late, the cpu backend warns.
_openmp_spins = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and _libgomp_loaded()
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name):
    # Lazy, so `from tinysd import tokenizer` does not import the whole pipeline.
    if name in ("load", "StableDiffusion"):
        from tinysd import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'tinysd' has no attribute {name!r}")
