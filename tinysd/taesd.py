"""TAESD, the tiny autoencoder for SD's latents (Ollin Boer Bohan; diffusers' `AutoencoderTiny`).

The same latent space as the VAE, in ~2.4M parameters of plain 3×3 convs and ReLUs, no
normalisation and no attention: a 512×512 decode is ~1/20 of the VAE's work. It is good enough
for previews of every sampling step and for fast final decodes.

    decode: z (B,4,h,w) ─tanh(z/3)·3─> conv, ReLU ─> [3 Blocks, 2× nearest, conv] × 3 ─> Block, conv ─> ×2 − 1
    encode: x (B,3,H,W) in [−1, 1] ─(x+1)/2─> conv, Block ─> [stride-2 conv, 3 Blocks] × 3 ─> conv ─> z

    Block(x) = ReLU(conv(ReLU(conv(ReLU(conv(x))))) + x),    all convs 64 channels

TAESD was distilled on SD's latents as the U-Net sees them (already ×0.18215), so its
`scaling_factor` is 1: the pipeline hands it the diffusion's latents as they are. The decoder's
tanh(z/3)·3 soft-clamps wild latents to ±3. `latent_magnitude` (3) and `latent_shift` (0.5) map
latents to [0, 1] and back (`scale_latents`), for storing them as 8-bit images.

Two published layouts, both loaded by `load_taesd`:

    diffusers folder (madebyollin/taesd): config.json + diffusion_pytorch_model.safetensors,
        keys encoder.layers.N... and decoder.layers.N...
    the original files taesd_encoder.{pth,safetensors} and taesd_decoder.{pth,safetensors}
        (madebyollin/taesd on GitHub), keys N... without the prefix; the decoder's are one
        higher than diffusers' (its nn.Sequential starts with the parameter-free Clamp, which
        diffusers' DecoderTiny does in forward), as diffusers' convert_tiny_autoencoder_to_diffusers.py maps them.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from tinysd.nn import Conv2d, Module

# diffusers' AutoencoderTiny defaults: the published TAESD (and TAESDXL, TAESD3/F1 with 16 channels).
DEFAULT_CONFIG = dict(in_channels=3, out_channels=3, encoder_block_out_channels=[64, 64, 64, 64],
                      decoder_block_out_channels=[64, 64, 64, 64], act_fn="relu", upsample_fn="nearest",
                      latent_channels=4, upsampling_scaling_factor=2, num_encoder_blocks=[1, 3, 3, 3],
                      num_decoder_blocks=[3, 3, 3, 1], latent_magnitude=3, latent_shift=0.5,
                      scaling_factor=1.0)
SUPPORTED = dict(act_fn=("relu",), upsample_fn=("nearest",), upsampling_scaling_factor=(2,))
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
           "diffusion_pytorch_model.bin")
PARTS = ("encoder", "decoder")


class ReLU(Module):
    def __call__(self, x):
        return self.ops.relu(x)


class Upsample(Module):
    """Nearest-neighbour 2× up-sampling."""

    def __call__(self, x):
        return self.ops.upsample_nearest2x(x)


class AutoencoderTinyBlock(Module):
    """ReLU(conv(x) + skip(x)), conv = three 3×3 convs with ReLUs between; skip a 1×1 conv when
    the channels change, else the identity."""

    def __init__(self, in_channels, out_channels):
        self.conv = [Conv2d(in_channels, out_channels, 3, padding=1), ReLU(),
                     Conv2d(out_channels, out_channels, 3, padding=1), ReLU(),
                     Conv2d(out_channels, out_channels, 3, padding=1)]
        if in_channels != out_channels:
            self.skip = Conv2d(in_channels, out_channels, 1, bias=False)

    def __call__(self, x):
        h = x
        for layer in self.conv:
            h = layer(h)
        return self.ops.relu(h + (self.skip(x) if hasattr(self, "skip") else x))


def _run(layers, x):
    for layer in layers:
        x = layer(x)
    return x


class EncoderTiny(Module):
    """Image in [−1, 1] (B, 3, H, W) -> latents (B, 4, H/8, W/8); `layers` as diffusers numbers them."""

    def __init__(self, in_channels, out_channels, num_blocks, block_out_channels):
        self.layers = []
        for i, n in enumerate(num_blocks):
            ch = block_out_channels[i]
            self.layers.append(Conv2d(in_channels, ch, 3, padding=1) if i == 0 else
                               Conv2d(ch, ch, 3, stride=2, padding=1, bias=False))
            self.layers += [AutoencoderTinyBlock(ch, ch) for _ in range(n)]
        self.layers.append(Conv2d(block_out_channels[-1], out_channels, 3, padding=1))

    def __call__(self, x):
        return _run(self.layers, (x + 1) / 2)           # TAESD works on images in [0, 1]


class DecoderTiny(Module):
    """Latents (B, 4, h, w) -> image in [−1, 1] (B, 3, 8h, 8w); `layers` as diffusers numbers them."""

    def __init__(self, in_channels, out_channels, num_blocks, block_out_channels):
        self.layers = [Conv2d(in_channels, block_out_channels[0], 3, padding=1), ReLU()]
        for i, n in enumerate(num_blocks):
            ch, last = block_out_channels[i], i == len(num_blocks) - 1
            self.layers += [AutoencoderTinyBlock(ch, ch) for _ in range(n)]
            if not last:
                self.layers.append(Upsample())
            self.layers.append(Conv2d(ch, out_channels if last else ch, 3, padding=1, bias=last))

    def __call__(self, z):
        z = self.ops.tanh(z / 3) * 3                    # soft clamp to ±3 ("Clamp" in the original)
        return _run(self.layers, z) * 2 - 1


class AutoencoderTiny(Module):
    """`taesd.encode(x)` -> latents, `taesd.decode(z)` -> image in [−1, 1], both as NumPy arrays.

    parts: build only the encoder or the decoder (a single taesd_decoder file has only that).
    """

    def __init__(self, config=None, parts=PARTS):
        cfg = self.config = {**DEFAULT_CONFIG, **{k: v for k, v in (config or {}).items() if k in DEFAULT_CONFIG}}
        for key, allowed in SUPPORTED.items():
            if cfg[key] not in allowed:
                raise ValueError(f"TAESD config {key}={cfg[key]!r} is not implemented (supported: {allowed})")
        self.scaling_factor = cfg["scaling_factor"]
        self.latent_magnitude, self.latent_shift = cfg["latent_magnitude"], cfg["latent_shift"]
        if "encoder" in parts:
            self.encoder = EncoderTiny(cfg["in_channels"], cfg["latent_channels"], cfg["num_encoder_blocks"],
                                       cfg["encoder_block_out_channels"])
        if "decoder" in parts:
            self.decoder = DecoderTiny(cfg["latent_channels"], cfg["out_channels"], cfg["num_decoder_blocks"],
                                       cfg["decoder_block_out_channels"])

    @property
    def parts(self):
        return tuple(part for part in PARTS if hasattr(self, part))

    def _part(self, part):
        if not hasattr(self, part):
            raise ValueError(f"this TAESD has no {part}: load taesd_{part} too (or the diffusers folder)")
        return getattr(self, part)

    def encode(self, x):
        """Image (B, 3, H, W) in [−1, 1] -> latents (B, C, H/8, W/8), in the diffusion's scale."""
        return self.ops.numpy(self._part("encoder")(self.ops.asarray(x)))

    def decode(self, z):
        """Latents (B, C, h, w), in the diffusion's scale -> image (B, 3, 8h, 8w) in about [−1, 1]."""
        return self.ops.numpy(self._part("decoder")(self.ops.asarray(z)))

    def scale_latents(self, z):
        """Latents -> [0, 1]: z / (2·magnitude) + shift, clipped (an 8-bit image of them)."""
        return np.clip(np.asarray(z, np.float32) / np.float32(2 * self.latent_magnitude)
                       + np.float32(self.latent_shift), 0, 1)

    def unscale_latents(self, x):
        """[0, 1] -> latents: (x − shift) · 2·magnitude."""
        return (np.asarray(x, np.float32) - np.float32(self.latent_shift)) * np.float32(2 * self.latent_magnitude)


# Loading


def original_to_diffusers(state, part):
    """Keys of an original taesd_encoder / taesd_decoder file -> AutoencoderTiny's."""
    out = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if part == "decoder":
            index = str(int(index) - 1)         # the original's layer 0 is the parameter-free Clamp
        out[f"{part}.layers.{index}.{rest}"] = value
    return out


def _original_part(state, source):
    """'encoder' or 'decoder' for the state of an original file, told apart by their keys: the
    encoder starts with a conv at index 0, the decoder with the Clamp (its first conv is 1)."""
    if not state or not all(re.match(r"\d+\.", k) for k in state):
        from tinysd.single_file import file_kind

        kind = file_kind(state)
        what = f"it is {kind[0]} ({kind[1]})" if kind else f"its keys begin {', '.join(sorted(state)[:3])}"
        raise ValueError(f"{source} is not a TAESD file: {what}; TAESD's are those of taesd_encoder/taesd_decoder "
                         f"(0.weight, 1.conv.0.weight, ...) or of a diffusers AutoencoderTiny (encoder.layers.*, ...)")
    return "encoder" if "0.weight" in state else "decoder"


def _read(path):
    from tinysd.weights import read_weights

    state = read_weights(path)
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in state):
        return state                                       # a diffusers AutoencoderTiny file
    return original_to_diffusers(state, _original_part(state, path))


def _files(source):
    """(config dict or None, [weight files]) for a folder, a file or a pair of files."""
    if isinstance(source, (list, tuple)):
        return None, [Path(p) for p in source]
    path = Path(source).expanduser()
    if path.is_file():
        return None, [path]
    if not path.is_dir():
        return _hub(str(source))
    if (path / "config.json").exists():
        weights = next((path / w for w in WEIGHTS if (path / w).exists()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: a diffusers AutoencoderTiny folder needs one of {', '.join(WEIGHTS)}")
        return json.loads((path / "config.json").read_text()), [weights]
    files = sorted(p for p in path.iterdir() if re.search(r"(encoder|decoder)\.(safetensors|pth)$", p.name))
    if not files:
        raise FileNotFoundError(f"{path}: no TAESD weights (config.json + diffusion_pytorch_model.safetensors, "
                                f"or taesd_encoder/taesd_decoder .safetensors/.pth files)")
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    return None, safetensors or files                       # both formats there: the safetensors


def _hub(repo_id):
    """A diffusers AutoencoderTiny repo on the hub (e.g. madebyollin/taesd), cached or downloaded."""
    from tinysd.weights import ModelNotFoundError, _is_offline

    if len(repo_id.split("/")) != 2 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"TAESD: no such file or folder: {repo_id!r} (nor a hub id like 'madebyollin/taesd')")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", WEIGHTS[0]]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        if _is_offline():
            raise ModelNotFoundError(f"TAESD {repo_id!r} is not in the Hugging Face cache and the hub is not "
                                     f"reachable (offline mode): pass a local folder or taesd_decoder file") from None
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as e:
            raise ModelNotFoundError(f"could not download TAESD {repo_id!r} ({type(e).__name__}: {e}); pass a "
                                     f"local folder or taesd_decoder file") from e
    return _files(folder)


def load_taesd(source, backend=None):
    """An AutoencoderTiny from a diffusers folder (or hub id, e.g. 'madebyollin/taesd'), a folder of
    the original taesd_encoder/taesd_decoder files, one such file (that part only), or an
    (encoder, decoder) pair of paths. backend: as `tinysd.load`'s (None picks 'cpu' where it runs)."""
    from tinysd.backend import get_backend

    config, files = _files(source)
    state = {}
    for file in files:
        part_state = _read(file)
        clash = {k.split(".")[0] for k in part_state} & {k.split(".")[0] for k in state}
        if clash:
            raise ValueError(f"TAESD: two files hold the {', '.join(sorted(clash))}: {', '.join(map(str, files))}")
        state.update(part_state)
    parts = tuple(p for p in PARTS if any(k.startswith(p + ".") for k in state))
    if config is None:                                      # the original files carry no config
        config = {"latent_channels": _latent_channels(state)}
    where = ", ".join(map(str, files))
    return AutoencoderTiny(config, parts).set_backend(get_backend(backend)).load_state_dict(state, source=where)


def _latent_channels(state):
    if "decoder.layers.0.weight" in state:
        return int(state["decoder.layers.0.weight"].shape[1])
    last = max((k for k in state if re.fullmatch(r"encoder\.layers\.\d+\.weight", k)),
               key=lambda k: int(k.split(".")[2]), default=None)
    return int(state[last].shape[0]) if last else DEFAULT_CONFIG["latent_channels"]


# Previews


class Preview:
    """A `callback` for `sd(...)` that decodes the sampler's x̂₀ with TAESD every `every` steps
    (and at the last step), while the pipeline's own decoder makes the final image.

    path: where to write each preview PNG (replaced atomically, so a viewer never sees half a
    file); "{step}" in it numbers the files instead. None keeps them in memory only. Either way
    `images` collects (step, PIL image); a batch is laid out side by side.
    callback: another `callback(step, timestep, latents)` to run every step (a progress bar).
    decoder: "vae" previews with the model's own VAE instead, for models whose latent space has
    no TAESD (TAESD is trained on SD's; a small model's own VAE may be cheap enough).
    """

    def __init__(self, sd, path=None, every=1, callback=None, decoder="taesd"):
        if decoder == "taesd" and (getattr(sd, "taesd", None) is None or "decoder" not in sd.taesd.parts):
            raise ValueError("a TAESD preview needs a TAESD decoder: tinysd.load(model, taesd=PATH), "
                             "or sd.taesd = tinysd.taesd.load_taesd(PATH)")
        if decoder not in ("taesd", "vae"):
            raise ValueError(f"decoder {decoder!r}: choose 'taesd' or 'vae'")
        if not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an integer ≥ 1, got {every!r}")
        self.sd, self.path, self.every, self.callback, self.decoder = sd, path, int(every), callback, decoder
        self.images = []

    def __call__(self, step, timestep, latents, pred_original_sample):
        if self.callback is not None:
            self.callback(step, timestep, latents)
        if step % self.every and step != self.sd.num_timesteps - 1:
            return
        from tinysd.pipeline import to_pil

        tiles = to_pil(self.sd.decode(pred_original_sample, decoder=self.decoder))
        picture = tiles[0] if len(tiles) == 1 else side_by_side(tiles)
        self.images.append((step, picture))
        if self.path is not None:
            write_png(picture, Path(str(self.path).format(step=step)))


def preview_callback(sd, path=None, every=1, callback=None, decoder="taesd"):
    """`sd(prompt, callback=preview_callback(sd, "preview.png", every=2))`: see `Preview`."""
    return Preview(sd, path, every, callback, decoder)


def side_by_side(images):
    from PIL import Image

    out = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


def write_png(image, path):
    """Write to a temporary file beside `path`, then rename it into place."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".png.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)             # mkstemp makes it private; give it a new file's mode
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
