"""tinysd: Stable Diffusion v1 in explicit NumPy.

    import tinysd
    sd = tinysd.load("stable-diffusion-v1-5/stable-diffusion-v1-5")   # model id, folder or file
    image = sd("a cat in space", seed=0)

The picture, one file per part: tokenizer -> text_encoder -> unet <-> schedulers -> vae,
tied together by pipeline; weights finds and reads checkpoints; backend holds the op boundary.
"""
__all__ = ["StableDiffusion", "load"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `from tinysd import tokenizer` does not import the whole pipeline.
    if name in ("load", "StableDiffusion"):
        from tinysd import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'tinysd' has no attribute {name!r}")
