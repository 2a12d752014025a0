"""The variational auto-encoder (diffusers' `AutoencoderKL`): pixels <-> the 8× smaller latent
the diffusion runs in.

    encode: x (B,3,H,W) ─Encoder─> moments (B,8,H/8,W/8) ─quant_conv─> mean, log σ²  (B,4,H/8,W/8)
    decode: z (B,4,H/8,W/8) ─post_quant_conv─Decoder─> x̂ (B,3,H,W) in about [-1, 1]

The pipeline multiplies the sampled latent by `scaling_factor` (0.18215) after encoding and
divides by it before decoding, so the diffusion sees latents of about unit variance.

Tiling (diffusers' `enable_tiling` rule): a large picture is encoded or decoded in overlapping
tiles of `tile_sample_min_size` pixels (`tile_latent_min_size` latents), a tile every
(1 − `tile_overlap_factor`)·tile, and each tile's overlap with the tile above and to its left
is blended linearly, so memory stays that of one tile whatever the picture's size.

Training: `Encoder` and `Decoder` take `saved={}` and have `backward(saved, grad)`, built from
the same ResNet, down/up-sampling and attention blocks as the U-Net (see `tinysd.nn`).
"""
from __future__ import annotations

import numpy as np

from tinysd.attention import Attention
from tinysd.nn import Conv2d, GroupNorm, Module, child
from tinysd.resnet import Downsample2D, ResnetBlock2D, Upsample2D


class UNetMidBlock2D(Module):
    """ResNet, single-head self-attention over all pixels, ResNet."""

    def __init__(self, ch, groups, eps=1e-6):
        self.resnets = [ResnetBlock2D(ch, ch, None, groups, eps), ResnetBlock2D(ch, ch, None, groups, eps)]
        self.attentions = [Attention(ch, heads=1, dim_head=ch, bias=True, norm_groups=groups, eps=eps)]

    def __call__(self, h, saved=None):
        h = self.resnets[0](h, saved=child(saved, "resnets.0"))
        h = self.attentions[0].forward_image(h, saved=child(saved, "attentions.0"))
        return self.resnets[1](h, saved=child(saved, "resnets.1"))

    def backward(self, saved, grad):
        grad, _ = self.resnets[1].backward(saved["resnets.1"], grad)
        grad = self.attentions[0].backward_image(saved["attentions.0"], grad)
        return self.resnets[0].backward(saved["resnets.0"], grad)[0]


class DownEncoderBlock2D(Module):
    def __init__(self, in_ch, out_ch, n_layers, downsample, groups, eps=1e-6):
        self.resnets = [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, eps) for i in range(n_layers)]
        self.downsamplers = [Downsample2D(out_ch, padding=0)] if downsample else []

    def __call__(self, h, saved=None):
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, saved=child(saved, f"resnets.{i}"))
        for down in self.downsamplers:
            h = down(h, saved=child(saved, "downsamplers.0"))
        return h

    def backward(self, saved, grad):
        for down in self.downsamplers:
            grad = down.backward(saved["downsamplers.0"], grad)
        for i in reversed(range(len(self.resnets))):
            grad, _ = self.resnets[i].backward(saved[f"resnets.{i}"], grad)
        return grad


class UpDecoderBlock2D(Module):
    def __init__(self, in_ch, out_ch, n_layers, upsample, groups, eps=1e-6):
        self.resnets = [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, eps) for i in range(n_layers)]
        self.upsamplers = [Upsample2D(out_ch)] if upsample else []

    def __call__(self, h, saved=None):
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, saved=child(saved, f"resnets.{i}"))
        for up in self.upsamplers:
            h = up(h, saved=child(saved, "upsamplers.0"))
        return h

    def backward(self, saved, grad):
        for up in self.upsamplers:
            grad = up.backward(saved["upsamplers.0"], grad)
        for i in reversed(range(len(self.resnets))):
            grad, _ = self.resnets[i].backward(saved[f"resnets.{i}"], grad)
        return grad


class Encoder(Module):
    def __init__(self, cfg):
        ch, groups, n = cfg["block_out_channels"], cfg.get("norm_num_groups", 32), cfg.get("layers_per_block", 2)
        self.conv_in = Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.down_blocks = [DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], n, i < len(ch) - 1, groups)
                            for i in range(len(ch))]
        self.mid_block = UNetMidBlock2D(ch[-1], groups)
        self.conv_norm_out = GroupNorm(groups, ch[-1], 1e-6)
        self.conv_out = Conv2d(ch[-1], 2 * cfg["latent_channels"], 3, padding=1)

    def __call__(self, x, saved=None):
        h = self.conv_in(x)
        for i, block in enumerate(self.down_blocks):
            h = block(h, saved=child(saved, f"down_blocks.{i}"))
        h = self.mid_block(h, saved=child(saved, "mid_block"))
        if saved is not None:
            saved.update(x=x, h=h)
        return self.conv_out(self.conv_norm_out(h, silu=True))

    def backward(self, saved, grad):
        """∂L/∂moments -> ∂L/∂x, the forward in reverse."""
        h = saved["h"]
        grad = self.conv_norm_out.backward(h, self.conv_out.backward(self.conv_norm_out(h, silu=True), grad), silu=True)
        grad = self.mid_block.backward(saved["mid_block"], grad)
        for i in reversed(range(len(self.down_blocks))):
            grad = self.down_blocks[i].backward(saved[f"down_blocks.{i}"], grad)
        return self.conv_in.backward(saved["x"], grad)


class Decoder(Module):
    def __init__(self, cfg):
        ch, groups, n = cfg["block_out_channels"], cfg.get("norm_num_groups", 32), cfg.get("layers_per_block", 2)
        rev = ch[::-1]
        self.conv_in = Conv2d(cfg["latent_channels"], rev[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(rev[0], groups)
        self.up_blocks = [UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], n + 1, i < len(ch) - 1, groups)
                          for i in range(len(ch))]
        self.conv_norm_out = GroupNorm(groups, ch[0], 1e-6)
        self.conv_out = Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    def __call__(self, z, saved=None):
        h = self.mid_block(self.conv_in(z), saved=child(saved, "mid_block"))
        for i, block in enumerate(self.up_blocks):
            h = block(h, saved=child(saved, f"up_blocks.{i}"))
        if saved is not None:
            saved.update(z=z, h=h)
        return self.conv_out(self.conv_norm_out(h, silu=True))

    def backward(self, saved, grad):
        """∂L/∂x̂ -> ∂L/∂z, the forward in reverse."""
        h = saved["h"]
        grad = self.conv_norm_out.backward(h, self.conv_out.backward(self.conv_norm_out(h, silu=True), grad), silu=True)
        for i in reversed(range(len(self.up_blocks))):
            grad = self.up_blocks[i].backward(saved[f"up_blocks.{i}"], grad)
        return self.conv_in.backward(saved["z"], self.mid_block.backward(saved["mid_block"], grad))


class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)); `sample(noise)` = mean + σ·noise (reparameterisation)."""

    def __init__(self, moments):
        self.mean, logvar = np.split(np.asarray(moments, dtype=np.float32), 2, axis=1)
        self.logvar = np.clip(logvar, -30.0, 20.0)
        self.std = np.exp(0.5 * self.logvar)

    def sample(self, noise):
        return self.mean + self.std * noise

    def mode(self):
        return self.mean


class AutoencoderKL(Module):
    """`vae.encode(x)` -> DiagonalGaussian over latents; `vae.decode(z)` -> image in [-1, 1] (roughly).

    Neither applies `scaling_factor`; the pipeline does, as diffusers' pipelines do.

    Tiling: `use_tiling` True tiles every picture larger than a tile (diffusers' rule), False
    never tiles, None (the default) tiles where the untiled pass is estimated to need more than
    `tiling_budget` bytes (`peak_bytes`). The tile knobs are diffusers' attribute names.
    """

    use_tiling = None
    tiling_budget = 4 << 30     # bytes: SD v1's decoder passes it above about 1180×1180 pixels

    def __init__(self, config):
        self.config = dict(config)
        self.scaling_factor = self.config.get("scaling_factor", 0.18215)
        lat = self.config["latent_channels"]
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = Conv2d(2 * lat, 2 * lat, 1)
        self.post_quant_conv = Conv2d(lat, lat, 1)
        size = self.config.get("sample_size", 512)
        size = size[0] if isinstance(size, (list, tuple)) else size
        self.tile_sample_min_size = size                                  # pixels (512 for SD v1)
        self.tile_latent_min_size = int(size / 2 ** (len(self.config["block_out_channels"]) - 1))   # 64
        self.tile_overlap_factor = 0.25

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> the latent distribution (B, 4, H/8, W/8)."""
        if self.tiles("encoder", x.shape):
            return DiagonalGaussian(self.tiled(self._encode, x, self.tile_sample_min_size, self.tile_latent_min_size))
        return DiagonalGaussian(self.ops.numpy(self._encode(x)))

    def decode(self, z):
        """z (B, 4, h, w) unscaled latent -> image (B, 3, 8h, 8w)."""
        if self.tiles("decoder", z.shape):
            return self.tiled(self._decode, z, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decode(z)

    def _encode(self, x):
        return self.quant_conv(self.encoder(self.ops.asarray(x)))

    def _decode(self, z):
        return self.decoder(self.post_quant_conv(self.ops.asarray(z)))

    def tiles(self, part, shape):
        """Whether to tile a pass of `part` ("encoder" or "decoder") over an input of `shape`."""
        tile = self.tile_sample_min_size if part == "encoder" else self.tile_latent_min_size
        larger = shape[-1] > tile or shape[-2] > tile           # diffusers' condition
        if self.use_tiling is None:
            scale = 1 if part == "encoder" else 2 ** (len(self.config["block_out_channels"]) - 1)
            return larger and self.peak_bytes(part, shape[0], shape[-2] * scale, shape[-1] * scale) > self.tiling_budget
        return bool(self.use_tiling) and larger

    def peak_bytes(self, part, batch, height, width):
        """Estimated peak memory (bytes) of an untiled pass of `part` for pictures of height×width
        pixels: three float32 activations of its largest level (channels × pixels; for SD v1's
        decoder the last upsampler's 256 channels at full size, 0.8 GB at 512², 3.2 GB at 1024²)."""
        channels = self.config["block_out_channels"]
        levels = len(channels)
        if part == "encoder":      # level i: channels[i] at 1/2^i of the size
            widest = max(c / 4 ** i for i, c in enumerate(channels))
        else:                      # up block i upsamples rev[i] channels to 1/2^(levels-2-i) of the size
            rev = channels[::-1]
            widest = max([c / 4 ** (levels - 2 - i) for i, c in enumerate(rev[:-1])] + [rev[-1]])
        return 3 * 4 * batch * widest * height * width

    def tiled(self, run, x, tile, tile_out):
        """`run` (the encoder or decoder) over overlapping tiles of x, blended: diffusers'
        `_tiled_encode` / `tiled_decode`. Input tiles of `tile` start every (1 − overlap)·tile;
        output tiles of `tile_out` blend their first `blend` rows and columns linearly into the
        tile above and the tile to the left, then keep `tile_out − blend` of each side.
        A row of tiles at a time: the row above is all the blend needs."""
        x = self.ops.numpy(x)                   # tiles are cut and blended on the host
        stride = int(tile * (1 - self.tile_overlap_factor))
        blend = int(tile_out * self.tile_overlap_factor)
        keep = tile_out - blend
        above, rows = None, []
        for i in range(0, x.shape[2], stride):
            row = [self.ops.numpy(run(x[:, :, i:i + tile, j:j + tile])).copy() for j in range(0, x.shape[3], stride)]
            for j, out in enumerate(row):         # blended in place, as diffusers does
                if above is not None:
                    blend_v(above[j], out, blend)
                if j > 0:
                    blend_h(row[j - 1], out, blend)
            rows.append(np.concatenate([out[:, :, :keep, :keep] for out in row], axis=3))
            above = row
        return np.concatenate(rows, axis=2)


def blend_v(a, b, extent):
    """Fade the top `extent` rows of tile b in from the bottom rows of tile a (above it), in place:
    b[y] = a[y − extent]·(1 − y/extent) + b[y]·y/extent."""
    extent = min(a.shape[2], b.shape[2], extent)
    w = (np.arange(extent) / extent).astype(np.float32)[:, None]          # (extent, 1): y / extent
    b[:, :, :extent] = a[:, :, a.shape[2] - extent:] * (1 - w) + b[:, :, :extent] * w


def blend_h(a, b, extent):
    """The same across columns: tile a is to the left of tile b."""
    extent = min(a.shape[3], b.shape[3], extent)
    w = (np.arange(extent) / extent).astype(np.float32)                   # (extent,): x / extent
    b[:, :, :, :extent] = a[:, :, :, a.shape[3] - extent:] * (1 - w) + b[:, :, :, :extent] * w
