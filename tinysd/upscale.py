"""Bigger pictures from a small model: AUTOMATIC1111's hires fix and its "SD upscale" script.

SD v1 draws well at 512×512; asked straight for 1024×1024 it repeats its subject. Both ways
here draw at the model's size first and add the detail after:

    hires fix:   txt2img at W×H -> upscale (the latents, or the decoded picture) -> img2img at 2W×2H
    SD upscale:  picture -> Lanczos 2× -> img2img tile by tile (tile = the model's size) -> tiles blended

This file holds what the two share with A1111, each rule ported from its code: the latent
upscalers (torch's `interpolate` modes on the latents), the image upscalers ("Lanczos",
"Nearest"), the hires fix's target size, and the tile grid with its seams blended.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A1111's `shared.latent_upscale_modes`: name -> torch.nn.functional.interpolate(mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = ("Lanczos", "Nearest")       # A1111's UpscalerLanczos, UpscalerNearest (PIL resampling)
OPT_F = 8                                      # A1111's name for the VAE's factor


def canonical_upscaler(name, allowed=tuple(LATENT_UPSCALERS) + IMAGE_UPSCALERS):
    """A1111's upscaler name, matched without regard to case ('latent' -> 'Latent')."""
    by_lower = {n.lower(): n for n in allowed}
    if not isinstance(name, str) or name.lower() not in by_lower:
        raise ValueError(f"unknown upscaler {name!r}; choose one of: {', '.join(allowed)}")
    return by_lower[name.lower()]


# -- latent upscalers: torch.nn.functional.interpolate on (B, C, H, W), align_corners=False -----------
def interpolate(x, size, mode="bilinear", antialias=False):
    """x (B, C, H, W) resized to size (h, w) as `torch.nn.functional.interpolate(x, size, mode=mode,
    antialias=antialias)` (CPU, float32): each axis a (out, in) matrix of weights, W_h · x · W_wᵀ."""
    x = np.asarray(x, np.float32)
    rows = resize_weights(x.shape[2], size[0], mode, antialias)
    cols = resize_weights(x.shape[3], size[1], mode, antialias)
    return np.einsum("hi,bcij,wj->bchw", rows, x, cols, optimize=True).astype(np.float32)


def resize_weights(n_in, n_out, mode, antialias=False):
    """(n_out, n_in) float32: output sample i = Σ_j W[i, j]·input[j], torch's rule for `mode`."""
    scale = np.float32(n_in) / np.float32(n_out)           # torch: (float) in / out
    i = np.arange(n_out)
    W = np.zeros((n_out, n_in), np.float32)
    if mode in ("nearest", "nearest-exact"):
        if mode == "nearest" and n_out == n_in:
            src = i
        elif mode == "nearest" and n_out == 2 * n_in:
            src = i >> 1
        else:                                               # floorf(i·scale), or floorf((i + 0.5)·scale)
            offset = 0.5 if mode == "nearest-exact" else 0.0
            src = np.floor(((i + offset) * scale).astype(np.float32)).astype(int)
        W[i, np.minimum(src, n_in - 1)] = 1.0
        return W
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolate: mode {mode!r} is none of nearest, nearest-exact, bilinear, bicubic")
    if antialias:
        return _aa_weights(n_in, n_out, scale, mode, W)
    if n_out == n_in and mode == "bilinear":
        return np.eye(n_in, dtype=np.float32)
    # source coordinate of output i's centre: scale·(i + ½) − ½ (clamped at 0 for bilinear)
    real = (scale * (i.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)).astype(np.float32)
    if mode == "bilinear":
        real = np.maximum(real, 0)
    base = np.minimum(np.floor(real).astype(int), n_in - 1)
    t = np.clip(real - base, 0, 1).astype(np.float32)
    if mode == "bilinear":
        taps, weights = [base, np.minimum(base + 1, n_in - 1)], [1 - t, t]
    else:                                                   # Keys' cubic convolution, A = −0.75
        taps = [np.clip(base - 1 + k, 0, n_in - 1) for k in range(4)]
        weights = [_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75)]
    for tap, w in zip(taps, weights):
        np.add.at(W, (i, tap), w)                           # taps clamped at the border add up
    return W


def _cubic(x, a):
    """Keys' cubic convolution kernel with parameter a (torch −0.75 plain, PIL's −0.5 antialiased)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1              # |x| <= 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a         # 1 < |x| < 2
    return np.where(x <= 1, near, np.where(x < 2, far, 0)).astype(np.float32)


def _aa_weights(n_in, n_out, scale, mode, W):
    """torch's antialiased resampling (PIL's rule): a filter of support (interp_size/2)·max(scale, 1)
    centred on scale·(i + ½), weights normalised to sum 1; bicubic uses PIL's a = −0.5."""
    size = 2 if mode == "bilinear" else 4
    stretch = max(float(scale), 1.0)                       # only a downscale widens the filter
    support = size / 2 * stretch
    for i in range(n_out):
        center = float(scale) * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)           # C++ casts truncate toward zero
        hi = min(int(center + support + 0.5), n_in)
        x = (np.arange(lo, hi) - center + 0.5) / stretch
        w = np.maximum(1 - np.abs(x), 0) if mode == "bilinear" else _cubic(x, -0.5)
        if w.sum() != 0:
            W[i, lo:hi] = w / w.sum()
    return W


# -- image upscalers (A1111's modules/upscaler.py and images.resize_image, resize mode 0) ------------
def upscale_by(image, scale, upscaler="Lanczos"):
    """A PIL image scaled by `scale` as A1111's `Upscaler.upscale` with its Lanczos or Nearest
    upscaler: resized (that resampling) to int(w·scale)×int(h·scale), then (Lanczos) to w·scale×h·scale
    rounded down to a multiple of 8 where that differs. (A1111 repeats the first step up to 3 times
    while the picture is smaller than that size; a resampling upscaler reaches it at once.)"""
    from PIL import Image

    resample = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}[canonical_upscaler(upscaler, IMAGE_UPSCALERS)]
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    image = image.resize((int(image.width * scale), int(image.height * scale)), resample=resample)
    return image if image.size == dest else image.resize(dest, resample=Image.LANCZOS)


def upscale_image(image, width, height, upscaler="Lanczos"):
    """A PIL image resized to width×height as A1111's `images.resize_image(0, image, width, height,
    upscaler_name)`: where it grows, `upscale_by` max(width/w, height/h) first; then Lanczos to
    width×height where the size still differs."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale_by(image, scale, upscaler)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return image


# -- the hires fix ---------------------------------------------------------------------------------------
@dataclass
class HiresFix:
    """The hires fix's settings (A1111's txt2img API names) and what follows from them."""
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    denoising_strength: float = 0.75       # A1111's StableDiffusionProcessingTxt2Img default

    def target(self, width, height):
        """A1111's `calculate_target_resolution`: (upscale_to_x, upscale_to_y, truncate_x, truncate_y).
        With both hr_resize_x and hr_resize_y the picture is scaled to cover that size, keeping its
        aspect, and `truncate` latents are cropped off (half each side) to fit."""
        if not self.hr_resize_x and not self.hr_resize_y:
            return int(width * self.hr_scale), int(height * self.hr_scale), 0, 0
        if not self.hr_resize_y:
            return self.hr_resize_x, self.hr_resize_x * height // width, 0, 0
        if not self.hr_resize_x:
            return self.hr_resize_y * width // height, self.hr_resize_y, 0, 0
        if width / height < self.hr_resize_x / self.hr_resize_y:
            x, y = self.hr_resize_x, self.hr_resize_x * height // width
        else:
            x, y = self.hr_resize_y * width // height, self.hr_resize_y
        return x, y, (x - self.hr_resize_x) // OPT_F, (y - self.hr_resize_y) // OPT_F

    def latent_size(self, width, height):
        """(h, w) of the second pass's latents: the target's latents less the truncated ones."""
        x, y, tx, ty = self.target(width, height)
        return y // OPT_F - ty, x // OPT_F - tx

    def steps(self, first_pass_steps):
        """(schedule length S, img2img strength) for diffusers' img2img to run exactly the hires
        steps N (0 = the first pass's count) as A1111 runs them: the last N steps of a schedule
        of S = int(N / min(denoising_strength, 0.999)) (`sd_samplers_common.setup_img2img_steps`,
        called with steps). diffusers runs int(S·strength) steps, so strength = (N + ½)/S, at most 1."""
        n = self.hr_second_pass_steps or first_pass_steps
        total = int(n / min(self.denoising_strength, 0.999))
        return total, min(1.0, (n + 0.5) / total)

    def fields(self):
        """The fields A1111 writes for the hires fix, in its order."""
        whole = self.hr_scale == int(self.hr_scale)
        resized = self.hr_resize_x or self.hr_resize_y
        fields = {"Denoising strength": float(self.denoising_strength),
                  "Hires upscale": None if resized else int(self.hr_scale) if whole else float(self.hr_scale),
                  "Hires resize": f"{self.hr_resize_x}x{self.hr_resize_y}" if resized else None,
                  "Hires steps": self.hr_second_pass_steps or None,     # written where it is not 0, as A1111
                  "Hires upscaler": self.hr_upscaler}
        return {key: value for key, value in fields.items() if value is not None}

    def upscale_latents(self, latents, width, height):
        """The first pass's latents at the second pass's size, by a latent upscaler: interpolate to
        the target's latent size, then crop the truncated latents (A1111's `sample_hr_pass`)."""
        x, y, tx, ty = self.target(width, height)
        mode, antialias = LATENT_UPSCALERS[self.hr_upscaler]
        z = interpolate(latents, (y // OPT_F, x // OPT_F), mode, antialias)
        return z[:, :, ty // 2:z.shape[2] - (ty + 1) // 2, tx // 2:z.shape[3] - (tx + 1) // 2]

    def upscale_picture(self, image, width, height):
        """A first-pass picture (PIL) at the second pass's size, by an image upscaler. A1111 resizes
        to the target and crops the encoded latents; here the crop is made in pixels (8 per latent)
        so the second pass starts from a picture of its own size."""
        x, y, tx, ty = self.target(width, height)
        image = upscale_image(image, x // OPT_F * OPT_F, y // OPT_F * OPT_F, self.hr_upscaler)
        h, w = self.latent_size(width, height)
        left, top = tx // 2 * OPT_F, ty // 2 * OPT_F
        return image.crop((left, top, left + w * OPT_F, top + h * OPT_F))


HIRES_FIELDS = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "denoising_strength")


def hires_settings(**given):
    """The HiresFix of `__call__`'s hr_* arguments (None: A1111's default), its upscaler's name canonical."""
    hires = HiresFix(**{k: v for k, v in given.items() if v is not None})
    hires.hr_upscaler = canonical_upscaler(hires.hr_upscaler)
    return hires


def check_hires(sd, batch, num_inference_steps, height, width, scheduler, image, enable_hr, settings):
    """The hires fix's arguments: set only with enable_hr=True, each of its kind and range, and a
    second pass that fits the schedule (at most num_train_timesteps steps) and the VAE's sizes.
    `batch`: the number of prompts (an hr_prompt list gives one entry for each)."""
    from tinysd.pipeline import (VAE_SCALE, check_int, check_number, check_prompt, check_side, show,
                                 strength_timesteps)
    from tinysd.schedulers import canonical_name

    if not isinstance(enable_hr, bool):
        raise TypeError(f"enable_hr must be True or False, got {show(enable_hr)}")
    given = {name: value for name, value in settings.items() if value is not None}
    if not enable_hr:
        if given:
            name, value = next(iter(given.items()))
            raise ValueError(f"{name}={value!r} is a hires-fix setting: pass enable_hr=True as well")
        return
    if image is not None:
        raise ValueError("enable_hr is txt2img's hires fix; img2img and inpainting (image=) take none")
    if sd.unet.in_channels == 9:
        raise ValueError("enable_hr on a 9-channel inpainting U-Net is not supported: its second pass would need "
                         "A1111's all-ones mask conditioning; use a 4-channel model")
    if "hr_scale" in given:
        check_number("hr_scale", given["hr_scale"], low=0.0)
    for name in ("hr_resize_x", "hr_resize_y"):
        if given.get(name):              # 0 means unset, as in A1111
            check_side(name, given[name])
        elif name in given:
            check_int(name, given[name], 0, allowed="a multiple of 8 (pixels), or 0 for unset")
    if "hr_upscaler" in given:
        try:
            canonical_upscaler(given["hr_upscaler"])
        except ValueError as e:
            raise ValueError(f"hr_upscaler: {e}") from None
    if "hr_second_pass_steps" in given:
        check_int("hr_second_pass_steps", given["hr_second_pass_steps"], 0,
                  allowed="an integer >= 0 (0: as many as num_inference_steps)")
    if "denoising_strength" in given:
        check_number("denoising_strength", given["denoising_strength"], low=0.0, high=1.0)
        if given["denoising_strength"] == 0:
            raise ValueError("denoising_strength=0 leaves the hires pass nothing to do: pass a value in (0, 1]")
    if "hr_sampler_name" in given:
        if not isinstance(given["hr_sampler_name"], str):
            raise TypeError(f"hr_sampler_name must be a sampler name such as 'euler_a', "
                            f"got {show(given['hr_sampler_name'])}")
        try:
            canonical_name(given["hr_sampler_name"])
        except ValueError as e:
            raise ValueError(f"hr_sampler_name: {e}") from None
    for name in ("hr_prompt", "hr_negative_prompt"):
        count = len(check_prompt(name, given[name])) if name in given else 1
        if count not in (1, batch):
            raise ValueError(f"{name} has {count} entries for {batch} prompt(s): pass one string, or a list "
                             f"of one per prompt")
    hires = hires_settings(**{k: given[k] for k in given if k in HIRES_FIELDS})
    size = sd.unet.config.get("sample_size", 64) * VAE_SCALE
    h, w = hires.latent_size(int(width or size), int(height or size))
    if h < 1 or w < 1:
        raise ValueError(f"the hires fix's second pass would be {VAE_SCALE * w}x{VAE_SCALE * h} pixels: "
                         f"pass a larger hr_scale or hr_resize_x/hr_resize_y")
    total, strength = hires.steps(num_inference_steps)
    most = sd.scheduler_config.get("num_train_timesteps", 1000)
    if total > most:
        raise ValueError(f"the hires pass's {hires.hr_second_pass_steps or num_inference_steps} steps at "
                         f"denoising_strength={hires.denoising_strength} need a schedule of {total} steps, "
                         f"more than the model's {most}: raise denoising_strength or lower hr_second_pass_steps")
    sched, _ = sd._scheduler(given.get("hr_sampler_name", scheduler))
    sched.set_timesteps(total)
    strength_timesteps(sched, total, strength)


def hires_pass(sd, hires, latents, first, width, height, generator, prompts, negative_prompts, **second):
    """A1111's hires fix, second pass: the first pass's latents upscaled (a latent upscaler) or
    its decoded pictures (an image upscaler), then img2img at the new size by the same
    preparation and loop, its noise drawn again from the first pass's seed (A1111 draws the
    second pass's noise from the seed anew; with a latent upscaler that noise is the first draw,
    exactly A1111's; with an image upscaler the VAE's encoding draws first, as in diffusers).
    `prompts`, `negative_prompts`: (first pass's, hires pass's or None)."""
    import copy

    from tinysd.pipeline import to_pil

    first = dict(first)
    for key, (text, hires_text) in (("Hires prompt", prompts), ("Hires negative prompt", negative_prompts)):
        if hires_text is not None and hires_text != text:          # A1111 writes them where they differ
            first[key] = hires_text if isinstance(hires_text, str) else hires_text[0]
    prompt = prompts[0] if prompts[1] is None else prompts[1]
    second["negative_prompt"] = negative_prompts[0] if negative_prompts[1] is None else negative_prompts[1]
    if hires.hr_upscaler in LATENT_UPSCALERS:
        image = hires.upscale_latents(latents, width, height)
    else:
        image = [hires.upscale_picture(picture, width, height) for picture in to_pil(sd.decode(latents))]
    steps, strength = hires.steps(first["Steps"])
    again = copy.copy(generator).manual_seed(generator.initial_seed)
    out = sd(prompt, image=image, strength=strength, num_inference_steps=steps, generator=again, **second)
    fields = hires.fields()
    if out.parameters["Sampler"] != first["Sampler"]:
        fields["Hires sampler"] = out.parameters["Sampler"]
    out.parameters, out.seed = {**first, **fields}, first["Seed"]
    return out


# -- SD upscale: the tile grid (A1111's modules/images.py split_grid / combine_grid) ----------------------
@dataclass
class Tile:
    x: int
    y: int
    image: object          # PIL image, tile_w × tile_h


def grid_positions(size, tile, overlap):
    """Where A1111 places tiles along one side of `size` pixels: n = ⌈(size − overlap)/(tile −
    overlap)⌉ tiles spread evenly (int(k·(size − tile)/(n − 1))), the last flush with the edge."""
    n = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (n - 1) if n > 1 else 0
    return [size - tile if int(k * step) + tile >= size else int(k * step) for k in range(n)]


def split_grid(image, tile_w, tile_h, overlap):
    """The tiles of a PIL image, row by row: [[Tile, ...], ...]."""
    xs = grid_positions(image.width, tile_w, overlap)
    return [[Tile(x, y, image.crop((x, y, x + tile_w, y + tile_h))) for x in xs]
            for y in grid_positions(image.height, tile_h, overlap)]


def combine_grid(rows, width, height, overlap):
    """The tiles pasted back into one width×height picture, A1111's way: within a row each tile
    overwrites the one to its left, its first `overlap` columns faded in linearly (mask k·255/overlap,
    k = 0..overlap−1); then each row overwrites the rows above the same way, its first `overlap`
    rows faded in."""
    from PIL import Image

    def ramp(n, horizontal, length):
        r = (np.arange(n, dtype=np.float32) * 255 / n).astype(np.uint8)
        return Image.fromarray(np.tile(r, (length, 1)) if horizontal else np.tile(r[:, None], (1, length)), "L")

    picture = Image.new("RGB", (width, height))
    for row in rows:
        tile_h = row[0].image.height
        band = Image.new("RGB", (width, tile_h))
        for tile in row:
            if tile.x == 0 or overlap == 0:
                band.paste(tile.image, (tile.x, 0))
                continue
            band.paste(tile.image.crop((0, 0, overlap, tile_h)), (tile.x, 0), mask=ramp(overlap, True, tile_h))
            band.paste(tile.image.crop((overlap, 0, tile.image.width, tile_h)), (tile.x + overlap, 0))
        y = row[0].y
        if y == 0 or overlap == 0:
            picture.paste(band, (0, y))
            continue
        picture.paste(band.crop((0, 0, width, overlap)), (0, y), mask=ramp(overlap, False, width))
        picture.paste(band.crop((0, overlap, width, tile_h)), (0, y + overlap))
    return picture


def sd_upscale(sd, prompt, image, scale=2, upscaler="Lanczos", tile_size=None, overlap=None, strength=0.3,
               seed=None, generator=None, output_type="pil", tile_callback=None, tile_arguments=None, **kwargs):
    """A1111's "SD upscale" script: the picture upscaled by `scale` (`upscaler`), cut into tiles of
    `tile_size` pixels (default: the model's size, 512 for SD v1) overlapping by at least
    `overlap` (default: an eighth of a tile, A1111's 64 for 512), each tile repainted by img2img
    at `strength` with seed + k for tile k (as A1111 bumps the seed per tile), and the tiles
    blended back (`combine_grid`). The default strength, 0.3, is lower than img2img's: the
    picture should stay itself and only gain detail.

    Memory is that of one tile's img2img whatever the picture's size. `kwargs` go to every
    tile's `sd(...)` call (negative_prompt, num_inference_steps, guidance_scale, scheduler,
    callback, ...). `tile_callback(index, count, tile)` runs after each tile with its PIL result.
    `tile_arguments(tile)` (PIL, the upscaled tile before repainting) returns more keyword
    arguments for that tile's call: the hook for a ControlNet "tile" hint, which is the tile
    itself: `tile_arguments=lambda tile: {"control_image": tile}` with a "tile" ControlNet loaded
    (`tinysd.load(model, controlnet=...)`; not yet tested against A1111's ControlNet extension).
    """
    import copy
    import secrets

    from tinysd.pipeline import load_image

    check_sd_upscale(sd, prompt, image, scale, upscaler, tile_size, overlap, output_type, kwargs,
                     dict(tile_callback=tile_callback, tile_arguments=tile_arguments))
    upscaler = canonical_upscaler(upscaler, IMAGE_UPSCALERS)
    tile_size = tile_size or sd.unet.config.get("sample_size", 64) * OPT_F
    overlap = tile_size // 8 if overlap is None else overlap
    picture = load_image(image)
    width, height = int(picture.width * scale // 8 * 8), int(picture.height * scale // 8 * 8)   # upscale_by's
    if width < tile_size or height < tile_size:
        raise ValueError(f"the upscaled picture would be {width}x{height}, smaller than a tile of {tile_size} "
                         f"pixels: pass a smaller tile_size (a multiple of 8) or a larger scale")
    big = upscale_by(picture, scale, upscaler)
    if generator is not None:
        seed = generator.initial_seed
    elif seed is None:
        seed = secrets.randbits(63)
    rows = split_grid(big, tile_size, tile_size, overlap)
    tiles = [tile for row in rows for tile in row]
    sd.num_tiles = len(tiles)
    first = None
    for k, tile in enumerate(tiles):
        tile_generator = None if generator is None else copy.copy(generator).manual_seed(seed + k)
        extra = {} if tile_arguments is None else tile_arguments(tile.image)
        out = sd(prompt, image=tile.image, strength=strength, output_type="pil",
                 seed=None if generator is not None else seed + k, generator=tile_generator, **kwargs, **extra)
        tile.image = out.images[0]
        first = first or out
        if tile_callback is not None:
            tile_callback(k, len(tiles), tile.image)
    result = combine_grid(rows, big.width, big.height, overlap)
    parameters = {**first.parameters, "Seed": seed, "SD upscale overlap": overlap, "SD upscale upscaler": upscaler}
    images = [result] if output_type == "pil" else np.asarray(result, np.float32)[None] / 255.0
    return type(first)(images, seed, parameters=parameters)


def check_sd_upscale(sd, prompt, image, scale, upscaler, tile_size, overlap, output_type, kwargs, hooks):
    """The upscale's own arguments, before any work (each tile's sd(...) call checks the rest)."""
    from tinysd.pipeline import check_image, check_int, check_number, check_side

    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string (one picture is upscaled), got {type(prompt).__name__}")
    check_image("image", image)
    check_number("scale", scale, low=0.0)
    if scale <= 0:
        raise ValueError(f"scale must be a number > 0, got {scale}")
    canonical_upscaler(upscaler, IMAGE_UPSCALERS)
    if tile_size is not None:
        check_side("tile_size", tile_size)
    if overlap is not None:
        most = (tile_size or sd.unet.config.get("sample_size", 64) * OPT_F) - OPT_F
        check_int("overlap", overlap, 0, most, allowed=f"an integer in [0, {most}] (tile_size − 8)")
    if output_type not in ("pil", "np"):
        raise ValueError(f"output_type {output_type!r}: the upscale returns a picture, 'pil' or 'np'")
    for name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise TypeError(f"{name} must be callable, got {hook!r}")
    for name in ("image", "mask_image", "height", "width", "latents", "num_images_per_prompt", "enable_hr"):
        value = kwargs.get(name)
        if value is not None and value is not False:
            raise ValueError(f"upscale sets {name} itself (each tile is one img2img of tile_size pixels)")
