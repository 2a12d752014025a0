"""The U-Net ε_θ(z_t, t, c) of Stable Diffusion v1 (diffusers' `UNet2DConditionModel`).

    z_t (B,4,h,w) ─conv_in─> down path: 4 levels of [ResNet (+ Transformer)] × 2, stride-2 conv
                               between levels; every output is kept as a skip connection
                  ─> mid: ResNet, Transformer, ResNet
                  ─> up path: 4 levels of [concat skip, ResNet (+ Transformer)] × 3, 2× up-sampling
                  ─> GroupNorm, SiLU, conv_out -> ε̂ (B,4,h,w)

The timestep t enters every ResNet through a sinusoidal embedding; the text context c enters
every Transformer through cross-attention (Q from the latent, K/V from the text).
"""
from __future__ import annotations

import math

import numpy as np

from tinysd.attention import Transformer2DModel
from tinysd.nn import Conv2d, GroupNorm, Linear, Module
from tinysd.resnet import Downsample2D, ResnetBlock2D, Upsample2D


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal embedding of the timestep, as in "Attention is all you need".

    freqs_i = exp(−ln(max_period) · i / (dim/2 − freq_shift)),  emb = [cos(t·f), sin(t·f)]
    (SD v1 puts cos first: `flip_sin_to_cos=True`). t (B,) -> (B, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    args = np.asarray(t, dtype=np.float32)[:, None] * np.exp(exponent)[None]
    sin, cos = np.sin(args), np.cos(args)
    return np.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=1).astype(np.float32)


class TimestepEmbedding(Module):
    """MLP on the sinusoidal embedding: Linear, SiLU, Linear (to 4× the base channels)."""

    def __init__(self, in_dim, dim):
        self.linear_1, self.linear_2 = Linear(in_dim, dim), Linear(dim, dim)

    def __call__(self, x):
        return self.linear_2(self.ops.silu(self.linear_1(x)))


class CrossAttnDownBlock2D(Module):
    def __init__(self, in_ch, out_ch, temb_ch, n_layers, heads, context_dim, downsample, groups, eps, pad):
        self.resnets = [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps)
                        for i in range(n_layers)]
        self.attentions = [Transformer2DModel(heads, out_ch // heads, out_ch, context_dim, groups)
                           for _ in range(n_layers)]
        self.downsamplers = [Downsample2D(out_ch, pad)] if downsample else []

    def __call__(self, h, temb, context):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            h = attn(resnet(h, temb), context)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class DownBlock2D(Module):
    def __init__(self, in_ch, out_ch, temb_ch, n_layers, downsample, groups, eps, pad):
        self.resnets = [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps)
                        for i in range(n_layers)]
        self.downsamplers = [Downsample2D(out_ch, pad)] if downsample else []

    def __call__(self, h, temb, context=None):
        skips = []
        for resnet in self.resnets:
            h = resnet(h, temb)
            skips.append(h)
        for down in self.downsamplers:
            h = down(h)
            skips.append(h)
        return h, skips


class CrossAttnUpBlock2D(Module):
    """Each ResNet first concatenates the matching skip from the down path (channels add)."""

    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, n_layers, heads, context_dim, upsample, groups, eps):
        self.resnets = [ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == n_layers - 1 else out_ch),
                                      out_ch, temb_ch, groups, eps) for i in range(n_layers)]
        self.attentions = [Transformer2DModel(heads, out_ch // heads, out_ch, context_dim, groups)
                           for _ in range(n_layers)]
        self.upsamplers = [Upsample2D(out_ch)] if upsample else []

    def __call__(self, h, skips, temb, context, size=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            h = self.ops.concat([h, skips.pop()], axis=1)
            h = attn(resnet(h, temb), context)
        for up in self.upsamplers:
            h = up(h, size)
        return h


class UpBlock2D(Module):
    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, n_layers, upsample, groups, eps):
        self.resnets = [ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == n_layers - 1 else out_ch),
                                      out_ch, temb_ch, groups, eps) for i in range(n_layers)]
        self.upsamplers = [Upsample2D(out_ch)] if upsample else []

    def __call__(self, h, skips, temb, context=None, size=None):
        for resnet in self.resnets:
            h = resnet(self.ops.concat([h, skips.pop()], axis=1), temb)
        for up in self.upsamplers:
            h = up(h, size)
        return h


class UNetMidBlock2DCrossAttn(Module):
    def __init__(self, ch, temb_ch, heads, context_dim, groups, eps):
        self.resnets = [ResnetBlock2D(ch, ch, temb_ch, groups, eps), ResnetBlock2D(ch, ch, temb_ch, groups, eps)]
        self.attentions = [Transformer2DModel(heads, ch // heads, ch, context_dim, groups)]

    def __call__(self, h, temb, context):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


SUPPORTED = {
    "down_block_types": {"CrossAttnDownBlock2D", "DownBlock2D"},
    "up_block_types": {"CrossAttnUpBlock2D", "UpBlock2D"},
}


class UNet2DConditionModel(Module):
    """`unet(latents, t, context)` -> ε̂, the noise predicted in `latents` at timestep t.

    latents (B, C_in, h, w) float32 (h, w any size; multiples of 8 keep every level even),
    t a scalar or (B,), context (B, 77, cross_attention_dim).
    """

    def __init__(self, config):
        cfg = self.config = dict(config)
        for key, allowed in SUPPORTED.items():
            bad = [b for b in cfg[key] if b not in allowed]
            if bad:
                raise ValueError(f"U-Net config {key}: {bad} not supported (SD v1 uses {sorted(allowed)})")
        if cfg.get("use_linear_projection"):
            raise ValueError("U-Net config use_linear_projection=True is SD 2.x; tinysd implements SD v1")
        channels = list(cfg["block_out_channels"])
        n_levels = len(channels)
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n_levels
        groups, eps = cfg.get("norm_num_groups", 32), cfg.get("norm_eps", 1e-5)
        ctx_dim, n_layers = cfg["cross_attention_dim"], cfg.get("layers_per_block", 2)
        temb_ch = channels[0] * 4
        self.flip_sin_to_cos, self.freq_shift = cfg.get("flip_sin_to_cos", True), cfg.get("freq_shift", 0)
        self.time_proj_dim = channels[0]

        self.conv_in = Conv2d(cfg["in_channels"], channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch)

        self.down_blocks = []
        for i, kind in enumerate(cfg["down_block_types"]):
            in_ch, out_ch, last = channels[max(i - 1, 0)], channels[i], i == n_levels - 1
            pad = cfg.get("downsample_padding", 1)
            if kind == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(in_ch, out_ch, temb_ch, n_layers, heads[i], ctx_dim, not last, groups, eps, pad)
            else:
                block = DownBlock2D(in_ch, out_ch, temb_ch, n_layers, not last, groups, eps, pad)
            self.down_blocks.append(block)

        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb_ch, heads[-1], ctx_dim, groups, eps)

        self.up_blocks = []
        rev, rev_heads = channels[::-1], heads[::-1]
        for i, kind in enumerate(cfg["up_block_types"]):
            prev_ch, out_ch = rev[max(i - 1, 0)], rev[i]
            in_ch, last = rev[min(i + 1, n_levels - 1)], i == n_levels - 1
            if kind == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(in_ch, prev_ch, out_ch, temb_ch, n_layers + 1, rev_heads[i], ctx_dim, not last, groups, eps)
            else:
                block = UpBlock2D(in_ch, prev_ch, out_ch, temb_ch, n_layers + 1, not last, groups, eps)
            self.up_blocks.append(block)

        self.conv_norm_out = GroupNorm(groups, channels[0], eps)
        self.conv_out = Conv2d(channels[0], cfg["out_channels"], 3, padding=1)

    @property
    def in_channels(self):
        return self.config["in_channels"]

    def __call__(self, latents, t, context, down_block_additional_residuals=None, mid_block_additional_residual=None):
        """ε̂ for `latents` at t. A ControlNet's residuals r_k, r_mid (tinysd.controlnet) join the
        skip connections and the mid block: skip_k <- skip_k + r_k (one r_k per skip, in the down
        path's order), h_mid <- mid_block(h) + r_mid."""
        B = latents.shape[0]
        t = np.broadcast_to(np.asarray(t, dtype=np.float32).reshape(-1), (B,))
        temb = self.ops.asarray(timestep_embedding(t, self.time_proj_dim, self.flip_sin_to_cos,
                                                   self.freq_shift))
        temb = self.time_embedding(temb)

        h = self.conv_in(latents)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips += block_skips
        if down_block_additional_residuals is not None:          # ControlNet: where the control enters
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors, the U-Net has {len(skips)} skip connections")
            skips = [skip + r for skip, r in zip(skips, down_block_additional_residuals)]

        h = self.mid_block(h, temb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if skips else None   # the next level's size, for odd inputs
            h = block(h, block_skips, temb, context, size=size)

        return self.conv_out(self.conv_norm_out(h, silu=True))
