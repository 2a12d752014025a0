"""Outpainting and keeping what was not masked: the canvas, the feathered mask, the paste-back.

    outpaint:  picture -> a larger canvas (the new border: the edge pixels stretched outward, plus
               noise) -> a mask, white on the border and feathered into the picture -> inpainting

The mask is AUTOMATIC1111's "Poor man's outpainting" mask: white everywhere but a black
rectangle over the picture, inset by 2·mask_blur on each extended side, blurred by a Gaussian of
σ = 2·mask_blur (A1111's inpainting blur, cv2.GaussianBlur along x then y) and doubled (A1111's
`mask_for_overlay`), so the border is white right up to the picture's edge and the repainted
band reaches 2–3·mask_blur pixels into the picture, where the seam is hidden.

Inpainting repaints the latents, and a VAE round trip moves every pixel a little (about 2/255).
`keep_unmasked` pastes the original pixels back where the mask is black, blending where it is
grey, as A1111's `apply_overlay` and diffusers' `VaeImageProcessor.apply_overlay` do:

    out = m·generated + (1 − m)·original,    m = mask / 255
"""
from __future__ import annotations

import numpy as np

FILL_NOISE = 0.1     # σ of the noise added to the stretched edge, in units of the pixel range [0, 1]
SIDES = ("left", "right", "up", "down")


def outpaint_canvas(image, left=0, right=0, up=0, down=0, mask_blur=4, seed=0):
    """(canvas, mask): PIL RGB picture with the new border filled, PIL L mask (255 = paint).

    The border: each new pixel copies the nearest edge pixel of the picture (np.pad 'edge'), plus
    Gaussian noise of σ = FILL_NOISE (numpy's default_rng(seed), so the seed fixes it)."""
    from PIL import Image

    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    canvas = np.pad(pixels, ((up, down), (left, right), (0, 0)), mode="edge")
    border = np.ones(canvas.shape[:2], bool)
    border[up:up + pixels.shape[0], left:left + pixels.shape[1]] = False
    noise = np.random.default_rng(seed).normal(0.0, 255 * FILL_NOISE, canvas.shape)
    canvas[border] += noise[border]
    canvas = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    return canvas, outpaint_mask(canvas.size, left, right, up, down, mask_blur)


def outpaint_mask(size, left, right, up, down, mask_blur):
    """A1111's outpainting mask on a canvas of size (W, H), as a PIL L image: a black rectangle
    (PIL's, corners inclusive) inset by 2·mask_blur on each extended side, then `blur_mask`."""
    from PIL import Image, ImageDraw

    width, height = size
    inset = 2 * mask_blur
    mask = Image.new("L", size, "white")
    ImageDraw.Draw(mask).rectangle((left + (inset if left else 0), up + (inset if up else 0),
                                    width - right - (inset if right else 0),
                                    height - down - (inset if down else 0)), fill="black")
    blurred = gaussian_blur(np.asarray(mask), inset)
    return Image.fromarray(np.clip(blurred.astype(np.float32) * 2, 0, 255).astype(np.uint8))


def gaussian_blur(mask, sigma):
    """uint8 (H, W) blurred as A1111 blurs an inpainting mask, cv2.GaussianBlur along x then along
    y, and to the same bits as OpenCV's 8-bit blur: a kernel of n = 2·int(2.5σ + ½) + 1 taps,
    G_i ∝ exp(−(i − (n−1)/2)²/2σ²), in fixed point (integers summing to 256, the rounding error
    carried from tap to tap, `gaussian_kernel_256`), each output round(Σ k_i·x_i / 256); the
    border mirrored without repeating the edge pixel (BORDER_REFLECT_101)."""
    if sigma <= 0:
        return np.asarray(mask, np.uint8)
    kernel = gaussian_kernel_256(sigma, 2 * int(2.5 * sigma + 0.5) + 1)
    out = np.asarray(mask, np.int64)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (len(kernel) // 2, len(kernel) // 2)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        total = sum(int(k) * np.take(padded, np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
        out = (total + 128) >> 8                                   # round half up, 8 fraction bits
    return out.astype(np.uint8)


def gaussian_kernel_256(sigma, n):
    """OpenCV's fixed-point Gaussian kernel for 8-bit pictures (getGaussianKernelFixedPoint_ED):
    the outer taps round(256·G_i + carried error) from the edge inward, symmetric, the centre tap
    256 minus the rest, so the taps sum to exactly 256."""
    r = np.arange(n) - (n - 1) / 2
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    taps, error = np.zeros(n, np.int64), 0.0
    for i in range(n // 2):
        value = g[i] * 256 + error
        taps[i] = taps[n - 1 - i] = np.rint(value)              # cvRound: to nearest, ties to even
        error = value - taps[i]
    taps[n // 2] = 256 - 2 * taps[:n // 2].sum()
    return taps


def check_outpaint(image_size, left, right, up, down, mask_blur):
    """The sides are non-negative integers, at least one positive, and the canvas a multiple of 8."""
    from tinysd.pipeline import check_int

    for name, value in zip(SIDES, (left, right, up, down)):
        check_int(name, value, 0, allowed="a number of pixels >= 0")
    check_int("mask_blur", mask_blur, 0, allowed="an integer >= 0 (pixels; A1111's default is 4)")
    if not any((left, right, up, down)):
        raise ValueError("outpaint needs at least one of left, right, up, down > 0 (pixels to add on that side)")
    width, height = image_size
    for what, side, extra, names in (("width", width, left + right, "left + right"),
                                     ("height", height, up + down, "up + down")):
        if (side + extra) % 8:
            raise ValueError(f"the canvas {what} {side} + {extra} ({names}) = {side + extra} is not a multiple of 8; "
                             f"add {-(side + extra) % 8} more pixels (or {(side + extra) % 8} fewer) to {names}")


def overlay_mask(mask_image, height, width):
    """The mask as given (grey levels kept, not binarised), resized to the picture: (H, W) in [0, 1]."""
    from PIL import Image

    from tinysd.pipeline import load_image

    pil = load_image(mask_image, mode="L")
    if pil.size != (width, height):
        pil = pil.resize((width, height), resample=Image.LANCZOS)
    return np.asarray(pil, np.float32) / 255.0


def paste_unmasked(images, original, mask):
    """Paste `original` back outside the mask: images and original (B, H, W, 3) in [0, 1], mask
    (H, W) in [0, 1] (1 = repainted). out = m·images + (1 − m)·original."""
    m = mask[None, :, :, None]
    return (m * images + (1 - m) * original).astype(np.float32)
