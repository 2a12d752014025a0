"""Moving around the three latent spaces: the start noise z_T, the text context, the VAE latent.

    from tinysd.latent import embed, mix_embeds, seed_noise, slerp, word_direction
    z = slerp(seed_noise(sd, 0), seed_noise(sd, 1), 0.5)           # half-way between two seeds
    sd("a red circle", latents=z)
    ctx = mix_embeds(embed(sd, "a red circle"), embed(sd, "a blue square"), 0.5)
    sd(prompt_embeds=ctx)                                           # half-way between two prompts
    blue = embed(sd, "a red circle") + word_direction(sd, "red", "blue", ["a {} square", "a {} star"])

Everything here makes arrays that enter the pipeline through its own arguments (`latents=`,
`prompt_embeds=`, `negative_prompt_embeds=`); the pipeline does not change.

Start noise: `sd(prompt, seed=s)` starts from `seed_noise(sd, s)` (times the sampler's
init_noise_sigma), a draw of n = 4·h·w independent N(0, 1) numbers. In n dimensions such a draw
lies, with overwhelming probability, near the sphere of radius √n (‖z‖² is a χ² with n degrees
of freedom: mean n, standard deviation √(2n)). The straight line between two draws leaves that
shell: the midpoint (z₀ + z₁)/2 of two independent draws is N(0, I/2), of norm ≈ √(n/2), noise
the model never saw at t = T. Spherical interpolation (`slerp`) follows the great circle and
keeps the norm at ≈ √n all the way.

Text context: `embed(sd, prompt)` is the (B, 77, D) context the U-Net cross-attends to. Mixing
two prompts interpolates their contexts row by row. Arithmetic on contexts is per token: see
`context_direction`.
"""
from __future__ import annotations

import numpy as np

from tinysd.rng import Generator

DOT_THRESHOLD = 0.9995      # |cos θ| above this: the vectors are nearly (anti)parallel, slerp falls back to lerp
LATENT_CHANNELS = 4         # SD v1's VAE latents: the start noise is (B, 4, H/8, W/8)
VAE_SCALE = 8


def _pair(a, b, t):
    """a, b as float arrays of one shape, and t (scalar or 1-D) shaped to broadcast in front of them."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate arrays of shapes {a.shape} and {b.shape}: they must match")
    t = np.asarray(t, dtype=np.float64)
    if t.ndim > 1:
        raise ValueError(f"t must be a number or a 1-D array of positions, got shape {t.shape}")
    if not np.isfinite(t).all():
        raise ValueError(f"t must be finite, got {t}")
    dtype = np.result_type(a.dtype, b.dtype, np.float32)
    return a.astype(np.float64), b.astype(np.float64), t.reshape(t.shape + (1,) * a.ndim), dtype


def lerp(a, b, t):
    """Linear interpolation (1 − t)·a + t·b. A 1-D `t` gives one result per position, stacked in front."""
    a, b, t, dtype = _pair(a, b, t)
    return ((1.0 - t) * a + t * b).astype(dtype)


def slerp(a, b, t, axis=None, dot_threshold=DOT_THRESHOLD):
    """Spherical linear interpolation (Shoemake 1985) from a (t = 0) to b (t = 1):

        cos θ = a·b / (‖a‖‖b‖),    slerp(a, b; t) = sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b

    For ‖a‖ = ‖b‖ the result turns a towards b at constant speed on the great circle through
    both, keeping the norm; two draws of Gaussian noise have nearly equal norms (≈ √n, the
    module's docstring says why), so slerp between them stays noise the sampler expects, where
    lerp's midpoint would have norm ≈ √(n/2). Where |cos θ| > dot_threshold (nearly parallel,
    or a zero vector) sin θ ≈ 0 makes the weights ill-conditioned, and the arc is a straight
    line anyway: that case falls back to lerp.

    axis=None takes each array whole as one vector (a start noise (1, 4, h, w) is one point);
    axis=-1 interpolates every vector along the last axis on its own (each token row of a
    (B, 77, D) context). t: a number, or a 1-D array of positions (results stacked in front).
    Computed in float64; returned in the inputs' float type (at least float32).
    """
    a, b, t, dtype = _pair(a, b, t)
    norm_a = np.sqrt(np.sum(a * a, axis=axis, keepdims=True))
    norm_b = np.sqrt(np.sum(b * b, axis=axis, keepdims=True))
    denominator = norm_a * norm_b
    cos = np.sum(a * b, axis=axis, keepdims=True) / np.where(denominator > 0, denominator, 1.0)
    cos = np.where(denominator > 0, np.clip(cos, -1.0, 1.0), 1.0)     # a zero vector: take the straight line
    near = np.abs(cos) > dot_threshold
    theta = np.arccos(cos)
    sin_theta = np.where(near, 1.0, np.sin(theta))
    weight_a = np.where(near, 1.0 - t, np.sin((1.0 - t) * theta) / sin_theta)
    weight_b = np.where(near, t, np.sin(t * theta) / sin_theta)
    return (weight_a * a + weight_b * b).astype(dtype)


def gaussian_radius(shape):
    """√n for noise of `shape` taken as one vector: the norm n standard normal numbers concentrate at
    (E‖z‖ = √2·Γ((n+1)/2)/Γ(n/2) ≈ √(n − ½), standard deviation ≈ 1/√2)."""
    return float(np.sqrt(np.prod(shape)))


def renormalize(z, radius=None):
    """Each sample z[i] rescaled to norm `radius` (default √n, n = z[i].size): back on the shell where
    start noise lives, after an edit (an added direction) moved it off."""
    z = np.asarray(z)
    flat = z.reshape(len(z), -1).astype(np.float64)
    radius = gaussian_radius(flat.shape[1:]) if radius is None else radius
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    if not (norms > 0).all():
        raise ValueError("cannot renormalize a zero sample: it has no direction")
    return (flat * (radius / norms)).reshape(z.shape).astype(np.result_type(z.dtype, np.float32))


def seed_noise(sd, seed, height=None, width=None):
    """The start noise `sd(prompt, seed=seed)` draws for txt2img: (1, 4, height/8, width/8) float32.

    `sd(prompt, latents=seed_noise(sd, s))` gives the same picture as `sd(prompt, seed=s)` (the
    pipeline scales `latents` by the sampler's init_noise_sigma either way).
    """
    size = sd.unet.config.get("sample_size", 64) * VAE_SCALE
    height, width = height or size, width or size
    if height % VAE_SCALE or width % VAE_SCALE or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {VAE_SCALE}, got {height}x{width}")
    return Generator(seed).randn((1, LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE))


def embed(sd, prompt, **kwargs):
    """The text context of `prompt` (a string or a list of them): (B, 77, D) float32 NumPy, what
    `sd(prompt_embeds=...)` takes. kwargs go to `sd.encode_prompt` (clip_skip, prompt_weighting)."""
    return sd.ops.numpy(sd.encode_prompt(prompt, guidance=False, **kwargs))


def mix_embeds(a, b, t, spherical=False):
    """Two contexts (B, L, D) mixed token row by token row: a at t = 0, b at t = 1.

    spherical=False: (1 − t)·a + t·b, the way diffusers' prompt-interpolation examples mix
    prompts. spherical=True: `slerp` of each row, which keeps each row's norm (CLIP's rows all
    come out of one final layer norm, so their norms are alike). A 1-D `t` gives (len(t), B, L, D).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 3:
        raise ValueError(f"contexts must have shape (batch, tokens, width), got {a.shape}")
    return slerp(a, b, t, axis=-1) if spherical else lerp(a, b, t)


def context_direction(sd, sources, targets):
    """The mean, over aligned prompt pairs, of the per-token context difference target − source: (1, L, D).

    Adding it to a prompt's context is arithmetic on text embeddings done position by position:

        direction = mean_i [ context(targets[i]) − context(sources[i]) ]      (row by row)

    CLIP's context is not a bag of word vectors: row j has read tokens 0..j (causal attention,
    notebook 1) and the padding rows have read the whole prompt. So a word's "embedding" cannot
    be cut out of a context and subtracted on its own; `context("red")` has "red" in row 1 and
    its end token in row 2, where "a red circle" has "red" and "circle". What can be subtracted
    is the difference a word makes in the context of a prompt around it: `targets[i]` and
    `sources[i]` must tokenize to the same number of pieces, so every row, the end token and the
    padding line up; the difference is then zero before the changed word and, after it, the
    change that word made to every later row. Averaging over several prompts keeps what the
    change has in common and thins out what belongs to each prompt.
    """
    sources, targets = list(sources), list(targets)
    if not sources or len(sources) != len(targets):
        raise ValueError(f"need as many target prompts as source prompts (at least one), got "
                         f"{len(targets)} and {len(sources)}")
    for s, t in zip(sources, targets):
        ns, nt = len(sd.tokenizer.tokenize(s)), len(sd.tokenizer.tokenize(t))
        if ns != nt:
            raise ValueError(f"prompts {s!r} ({ns} pieces) and {t!r} ({nt} pieces) do not align token by token: "
                             f"pick words with as many BPE pieces, or prompts of the same length")
    return (embed(sd, targets) - embed(sd, sources)).mean(axis=0, keepdims=True)


def word_direction(sd, source, target, templates):
    """`context_direction` from `source` to `target` in each template: ("red", "blue", ["a {} square"])
    is context("a blue square") − context("a red square"). Each template holds "{}" once."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must hold '{{}}' exactly once, where the word goes")
    return context_direction(sd, [t.format(source) for t in templates], [t.format(target) for t in templates])


def attribute_direction(with_attribute, without_attribute):
    """Mean of the samples with an attribute minus the mean of those without: (1, ...).

    The latent-space arithmetic of the GAN papers (Radford et al. 2016: "smiling woman" −
    "neutral woman" + "neutral man"), on start noises: average over several samples so that
    what the samples share (the attribute) stays and the rest, independent noise, shrinks as
    1/√(count).
    """
    with_attribute, without_attribute = np.asarray(with_attribute), np.asarray(without_attribute)
    if not len(with_attribute) or not len(without_attribute):
        raise ValueError("need at least one sample with the attribute and one without")
    if with_attribute.shape[1:] != without_attribute.shape[1:]:
        raise ValueError(f"samples of shapes {with_attribute.shape[1:]} and {without_attribute.shape[1:]} differ")
    return with_attribute.mean(axis=0, keepdims=True) - without_attribute.mean(axis=0, keepdims=True)
