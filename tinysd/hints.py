"""Control images ("hints") made by algorithms: Canny edges, blur and tile, inverted line art, scribbles.

A ControlNet is steered by a picture of the structure wanted: an edge map, a depth map, a
pose skeleton, a segmentation map. The ones below are computed by plain algorithms, each
written out here in NumPy and equal to what the ControlNet tools use (OpenCV in
AUTOMATIC1111's ControlNet extension and in diffusers' examples):

    edges = canny(image, 100, 200)        # (H, W) uint8, 255 on the edges: cv2.Canny, pixel for pixel
    soft = gaussian_blur(image, 5.0)      # the "blur" hint (cv2.GaussianBlur with ksize (0, 0))
    small = tile(image, 4.0)              # the "tile" hint: area-averaged down-sampling (cv2.INTER_AREA)
    lines = invert(drawing)               # black lines on white -> white lines on black, as line-art nets want
    strokes = scribble(drawing, 127)      # dark strokes -> a white-on-black scribble map

Depth, pose, normal and segmentation hints need networks of their own (MiDaS, OpenPose, ...):
make them with those tools and pass the picture in as the control image.

Images are uint8 arrays (H, W) or (H, W, C), or anything `tinysd.pipeline.load_image` reads.
"""
from __future__ import annotations

import math

import numpy as np

# The Sobel kernels: a central difference across the gradient, smoothed [1, 2, 1] along it.
SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.int32)
SOBEL_Y = SOBEL_X.T


def as_uint8(image):
    """An image as a uint8 array (H, W) or (H, W, C): arrays pass through, PIL images and paths are read."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got dtype {image.dtype} (scale floats in [0, 1] by 255 first)")
        if image.ndim not in (2, 3):
            raise ValueError(f"expected an image (H, W) or (H, W, C), got shape {image.shape}")
        return image
    from tinysd.pipeline import load_image

    return np.asarray(load_image(image, "RGB"))


def _correlate3x3(x, kernel):
    """3×3 cross-correlation of int32 (H, W, C) with edge pixels repeated (OpenCV's BORDER_REPLICATE)."""
    H, W = x.shape[:2]
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            if kernel[i, j]:
                out += kernel[i, j] * p[i:i + H, j:j + W]
    return out


def sobel(image):
    """(dx, dy) int32 (H, W, C): the Sobel derivatives of each channel, ∂/∂x to the right, ∂/∂y down."""
    x = as_uint8(image).astype(np.int32)
    x = x[:, :, None] if x.ndim == 2 else x
    return _correlate3x3(x, SOBEL_X), _correlate3x3(x, SOBEL_Y)


# tan(22.5°) in 15-bit fixed point, as OpenCV compares directions without dividing.
CANNY_SHIFT = 15
TG22 = int(0.4142135623730950488016887242097 * (1 << CANNY_SHIFT) + 0.5)


def canny(image, low=100, high=200):
    """Canny's edge detector (1986), exactly as OpenCV's `cv2.Canny(image, low, high)` (aperture 3, L1).

    1. Gradient: Sobel derivatives dx, dy of each channel; the magnitude is |dx| + |dy| (L1). In
       a colour image each pixel keeps the channel with the largest magnitude (the first on ties).
       Canny's paper smooths with a Gaussian first; cv2.Canny does not (the Sobel kernel's
       [1, 2, 1] is its only smoothing), and neither does this function: blur first if wanted.
    2. Non-maximum suppression: the gradient direction is rounded to one of four (horizontal,
       vertical, two diagonals) by comparing |dy| with tan(22.5°)·|dx| and tan(67.5°)·|dx| in
       integers; a pixel stays only if its magnitude beats both neighbours along that direction
       (strictly the one behind, ≥ the one ahead, except on diagonals: strictly both).
    3. Double threshold: pixels that stay with magnitude > low are candidates, > high are edges.
    4. Hysteresis: a candidate becomes an edge when it is 8-connected, through other candidates,
       to an edge pixel. OpenCV grows the edges from a stack; the same set is every 8-connected
       component of candidates that holds a pixel above `high`.

    image: uint8 (H, W) or (H, W, C) (or a PIL image or path, read as RGB). Thresholds in units
    of the L1 magnitude (up to 8·255 per axis); floored to integers and swapped if low > high,
    as OpenCV does. Returns (H, W) uint8: 255 on edges, 0 elsewhere.
    """
    from scipy import ndimage

    low, high = sorted((float(low), float(high)))
    low, high = math.floor(low), math.floor(high)
    dx, dy = sobel(image)
    mag = np.abs(dx) + np.abs(dy)                                  # (H, W, C)
    best = mag.argmax(axis=2)[:, :, None]                          # first channel with the largest
    mag, dx, dy = (np.take_along_axis(a, best, axis=2)[:, :, 0] for a in (mag, dx, dy))

    H, W = mag.shape
    m = np.pad(mag, 1)                                             # zeros around: the border has no neighbours
    centre = m[1:-1, 1:-1]

    def neighbour(di, dj):
        return m[1 + di:1 + di + H, 1 + dj:1 + dj + W]

    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << CANNY_SHIFT
    tg22x = ax * TG22
    tg67x = tg22x + (ax << (CANNY_SHIFT + 1))                      # tan 67.5° = tan 22.5° + 2
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    diagonal = ~horizontal & ~vertical
    s = np.where((dx ^ dy) < 0, -1, 1)                             # gradient along ↘ (s = 1) or ↙ (s = −1)
    keep_h = (centre > neighbour(0, -1)) & (centre >= neighbour(0, 1))
    keep_v = (centre > neighbour(-1, 0)) & (centre >= neighbour(1, 0))
    keep_down_right = (centre > neighbour(-1, -1)) & (centre > neighbour(1, 1))
    keep_down_left = (centre > neighbour(-1, 1)) & (centre > neighbour(1, -1))
    keep_d = np.where(s == 1, keep_down_right, keep_down_left)
    maximum = (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)

    candidate = maximum & (mag > low)
    strong = candidate & (mag > high)
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3), dtype=bool))
    connected = np.zeros(n + 1, dtype=bool)
    connected[labels[strong]] = True
    connected[0] = False
    return np.where(connected[labels], 255, 0).astype(np.uint8)


def gaussian_kernel(sigma, ksize=None):
    """The normalised 1-D Gaussian exp(−x²/2σ²), x = −k..k; by default 2k+1 = round(6σ + 1) | 1,
    the size OpenCV picks for uint8 images when ksize is (0, 0)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if ksize is None:
        ksize = int(round(sigma * 3 * 2 + 1)) | 1
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _filter_rows_cols(x, ky, kx):
    """Separable filter of float (H, W, C), borders mirrored without repeating the edge
    (OpenCV's BORDER_REFLECT_101: ... 2 1 | 0 1 2 ...)."""
    ry, rx = len(ky) // 2, len(kx) // 2
    p = np.pad(x, ((ry, ry), (0, 0), (0, 0)), mode="reflect")
    x = sum(w * p[i:i + x.shape[0]] for i, w in enumerate(ky))
    p = np.pad(x, ((0, 0), (rx, rx), (0, 0)), mode="reflect")
    return sum(w * p[:, j:j + x.shape[1]] for j, w in enumerate(kx))


def gaussian_blur(image, sigma):
    """The "blur" hint: a Gaussian blur of standard deviation `sigma` pixels, as
    `cv2.GaussianBlur(image, (0, 0), sigma)`; uint8 in, uint8 out (rounded), same shape."""
    img = as_uint8(image)
    x = img.astype(np.float64)
    x = x[:, :, None] if x.ndim == 2 else x
    k = gaussian_kernel(float(sigma))
    out = np.clip(np.round(_filter_rows_cols(x, k, k)), 0, 255).astype(np.uint8)
    return out.reshape(img.shape)


def area_weights(n_in, n_out):
    """(n_out, n_in): how much of each input pixel falls in each output pixel, divided by the
    output pixel's width in input pixels, so each row sums to 1 (area averaging)."""
    scale = n_in / n_out
    edges = np.arange(n_out + 1) * scale                       # output pixel i covers [edges[i], edges[i+1])
    start, end = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None]
    overlap = np.clip(np.minimum(end, j + 1) - np.maximum(start, j), 0, None)
    return overlap / scale


def tile(image, down_sampling_rate=1.0):
    """The "tile" hint (ControlNet 1.1 tile_resample): the picture shrunk by `down_sampling_rate`
    with area averaging (cv2.INTER_AREA), losing its detail; the pipeline scales it back up to
    the generation size, and the tile ControlNet redraws the detail. A rate below 1.1 returns
    the picture unchanged, as the extension does."""
    img = as_uint8(image)
    rate = float(down_sampling_rate)
    if rate < 1.1:
        return img
    H, W = img.shape[:2]
    h, w = int(H / rate), int(W / rate)
    x = img.astype(np.float64)
    x = x[:, :, None] if x.ndim == 2 else x
    rows = np.tensordot(area_weights(H, h), x, axes=(1, 0))                 # (h, W, C)
    out = np.tensordot(area_weights(W, w), rows, axes=(1, 1)).transpose(1, 0, 2)   # (h, w, C)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out if img.ndim == 3 else out[:, :, 0]


def invert(image):
    """Black lines on white paper -> white lines on black, what line-art and scribble ControlNets
    were trained on (A1111's "invert" preprocessor): 255 − x."""
    return 255 - as_uint8(image)


def scribble(image, threshold=127):
    """A drawing's dark strokes as a scribble map: 255 where the darkest channel is below
    `threshold`, else 0 (the ControlNet paper's scribble demo). (H, W) uint8."""
    img = as_uint8(image)
    darkest = img.min(axis=2) if img.ndim == 3 else img
    return np.where(darkest < threshold, 255, 0).astype(np.uint8)


# name -> (function, its numeric arguments' defaults, A1111's preprocessor ("Module") name)
PREPROCESSORS = {
    "none": (None, (), "none"),
    "canny": (canny, (100.0, 200.0), "canny"),
    "blur": (gaussian_blur, (5.0,), "blur_gaussian"),
    "tile": (tile, (1.0,), "tile_resample"),
    "invert": (invert, (), "invert"),
    "scribble": (scribble, (127.0,), "scribble_thr"),
}


def parse_preprocessor(spec):
    """'canny', 'canny:50:150', 'blur:3', 'none', ... -> (name, numeric arguments).

    Raises ValueError naming the choices when the name is unknown or an argument is not a number.
    """
    name, *args = str(spec).split(":")
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {spec!r}: choose from {', '.join(PREPROCESSORS)}")
    defaults = PREPROCESSORS[name][1]
    if len(args) > len(defaults):
        raise ValueError(f"preprocessor {name!r} takes at most {len(defaults)} number(s), got {spec!r}")
    try:
        values = tuple(float(a) for a in args)
    except ValueError:
        raise ValueError(f"preprocessor {spec!r}: arguments must be numbers") from None
    return name, values + defaults[len(values):]


def preprocess(image, spec="none"):
    """Apply a preprocessor named as in `parse_preprocessor` to an image: (hint uint8, A1111 fields).

    The fields are what AUTOMATIC1111's ControlNet extension records about its preprocessor:
    "Module", and where they apply "Processor Res" (the short side it ran at) and "Threshold A/B".
    """
    name, args = parse_preprocessor(spec)
    function, _, module = PREPROCESSORS[name]
    img = as_uint8(image)
    fields = {"Module": module}
    if function is None:
        return img, fields
    hint = function(img, *args)
    fields["Processor Res"] = min(img.shape[:2])
    for key, value in zip(("Threshold A", "Threshold B"), args):
        fields[key] = value
    return hint, fields
