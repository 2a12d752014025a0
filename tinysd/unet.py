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


def guidance_scale_embedding(w, dim):
    """The guidance-scale embedding of LCM-distilled U-Nets (diffusers' `LatentConsistencyModelPipeline`
    calls it with w = guidance_scale − 1; VDM's formula, Kingma et al. 2021):

        freqs_i = exp(−ln(10000) · i / (dim/2 − 1)),  emb = [sin(1000 w · f), cos(1000 w · f)]

    zero-padded to `dim` when odd. w (B,) -> (B, dim) float32.
    """
    half = dim // 2
    step = np.log(np.float32(10000)) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    args = (np.asarray(w, dtype=np.float32) * np.float32(1000))[:, None] * freqs[None]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


class TimestepEmbedding(Module):
    """MLP on the sinusoidal embedding: Linear, SiLU, Linear (to 4× the base channels).

    LCM-distilled U-Nets (`time_cond_proj_dim`) add a projection of the guidance-scale embedding
    to the sinusoidal one first: linear_1(emb + cond_proj(w_emb)).
    """

    def __init__(self, in_dim, dim, cond_proj_dim=None):
        self.linear_1, self.linear_2 = Linear(in_dim, dim), Linear(dim, dim)
        if cond_proj_dim is not None:
            self.cond_proj = Linear(cond_proj_dim, in_dim, bias=False)

    def __call__(self, x, condition=None):
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(self.ops.silu(self.linear_1(x)))


class DownBlock2D(Module):
    """Layers 0..n−1: ResNets (CrossAttnDownBlock2D: each followed by a Transformer); layer n: the
    stride-2 conv (not in the last block). Every layer's output is kept as a skip connection."""

    def __init__(self, in_ch, out_ch, temb_ch, n_layers, downsample, groups, eps, pad):
        self.resnets = [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps)
                        for i in range(n_layers)]
        self.downsamplers = [Downsample2D(out_ch, pad)] if downsample else []

    def __call__(self, h, temb, context=None, layers=None):
        """-> (h, skips). `layers` (a range; all by default) runs only those: DeepCache's passes stop
        and resume between two layers (UNet2DConditionModel)."""
        skips = []
        for i in range(len(self.resnets) + len(self.downsamplers)) if layers is None else layers:
            h = self.layer(i, h, temb, context)
            skips.append(h)
        return h, skips

    def layer(self, i, h, temb, context):
        return self.resnets[i](h, temb) if i < len(self.resnets) else self.downsamplers[0](h)


class CrossAttnDownBlock2D(DownBlock2D):
    def __init__(self, in_ch, out_ch, temb_ch, n_layers, heads, context_dim, downsample, groups, eps, pad):
        super().__init__(in_ch, out_ch, temb_ch, n_layers, downsample, groups, eps, pad)
        self.attentions = [Transformer2DModel(heads, out_ch // heads, out_ch, context_dim, groups)
                           for _ in range(n_layers)]

    def layer(self, i, h, temb, context):
        h = super().layer(i, h, temb, context)
        return self.attentions[i](h, context) if i < len(self.attentions) else h


class UpBlock2D(Module):
    """Layer i concatenates a skip from the down path (channels add) and runs ResNet i
    (CrossAttnUpBlock2D: then Transformer i); 2× up-sampling follows the last layer."""

    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, n_layers, upsample, groups, eps):
        self.resnets = [ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == n_layers - 1 else out_ch),
                                      out_ch, temb_ch, groups, eps) for i in range(n_layers)]
        self.upsamplers = [Upsample2D(out_ch)] if upsample else []

    def __call__(self, h, skips, temb, context=None, size=None, layers=None):
        """Each layer takes the last of `skips` (popped). `layers` (a range; all by default) runs
        only those, as in DownBlock2D; the up-sampling comes with the last layer."""
        layers = range(len(self.resnets)) if layers is None else layers
        for i in layers:
            h = self.layer(i, self.ops.concat([h, skips.pop()], axis=1), temb, context)
        if layers and layers[-1] == len(self.resnets) - 1:
            for up in self.upsamplers:
                h = up(h, size)
        return h

    def layer(self, i, h, temb, context):
        return self.resnets[i](h, temb)


class CrossAttnUpBlock2D(UpBlock2D):
    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, n_layers, heads, context_dim, upsample, groups, eps):
        super().__init__(in_ch, prev_ch, out_ch, temb_ch, n_layers, upsample, groups, eps)
        self.attentions = [Transformer2DModel(heads, out_ch // heads, out_ch, context_dim, groups)
                           for _ in range(n_layers)]

    def layer(self, i, h, temb, context):
        return self.attentions[i](super().layer(i, h, temb, context), context)


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
    t a scalar or (B,), context (B, 77, cross_attention_dim); timestep_cond (B,
    time_cond_proj_dim), for LCM-distilled U-Nets only: `guidance_scale_embedding(w)`.
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
        self.time_embedding = TimestepEmbedding(channels[0], temb_ch, cfg.get("time_cond_proj_dim"))

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

    def __call__(self, latents, t, context, timestep_cond=None, cache_branch=None, cached=None):
        """ε̂ = unet(latents, t, context). The skips are numbered in the order the down path makes
        them, s_0 = conv_in(z), s_1 = D_1(s_0), ..., s_{n−1}; the up path's ResNets take them back
        in reverse order, U_j taking s_j:

            u_{n−1} = mid(s_{n−1}),   u_{j−1} = U_j([u_j, s_j]),   ε̂ = conv_out(u_{−1})

        timestep_cond: (B, time_cond_proj_dim), an LCM-distilled U-Net's guidance-scale embedding.
        DeepCache (Ma et al. 2023) at branch k (0 <= k < n, the package's `cache_branch_id`; n = 12
        for SD v1): a full pass (`cached=None`) also returns u_k, the hidden state that enters U_k;
        a shallow pass (`cached=u_k`) runs only s_0..s_k and U_k..U_0 on it, skipping the deep
        part between them. Both return (ε̂, u_k). Branch 0 is the shallowest: conv_in, the last
        up block's last ResNet (and Transformer), conv_out.
        """
        B = latents.shape[0]
        t = np.broadcast_to(np.asarray(t, dtype=np.float32).reshape(-1), (B,))
        temb = self.ops.asarray(timestep_embedding(t, self.time_proj_dim, self.flip_sin_to_cos,
                                                   self.freq_shift))
        if timestep_cond is not None:        # (B, time_cond_proj_dim): LCM's guidance_scale_embedding
            timestep_cond = self.ops.asarray(timestep_cond)
        temb = self.time_embedding(temb, timestep_cond)

        n = self.num_skips
        if cache_branch is None and cached is not None:
            raise ValueError("cached features need the cache_branch they were made at")
        if cache_branch is not None and not 0 <= cache_branch < n:
            raise ValueError(f"cache_branch must be in [0, {n - 1}] (this U-Net has {n} skip connections), "
                             f"got {cache_branch}")
        k = n - 1 if cache_branch is None else cache_branch
        h = self.conv_in(latents)
        h, skips = self.down(h, [h], temb, context, k + 1)                       # s_0..s_k
        if cached is None:                                                       # the deep part: u_k
            h_deep, all_skips = self.down(h, skips, temb, context, n)
            cached = self.up(self.mid_block(h_deep, temb, context), all_skips, temb, context, k + 1)
        h = self.up(cached, skips, temb, context, 0)
        eps = self.conv_out(self.conv_norm_out(h, silu=True))
        return eps if cache_branch is None else (eps, cached)

    @property
    def num_skips(self):
        """n: conv_in's output and one per down-path layer (= the up path's ResNets)."""
        return 1 + sum(len(b.resnets) + len(b.downsamplers) for b in self.down_blocks)

    def down(self, h, skips, temb, context, stop):
        """Go on down from s_{len(skips)−1} = h until the skips s_0..s_{stop−1} are made. -> (h, skips)"""
        first = 1                                 # the number of the skip this block makes first
        for block in self.down_blocks:
            n = len(block.resnets) + len(block.downsamplers)
            layers = range(max(len(skips) - first, 0), min(stop - first, n))
            if layers:
                h, block_skips = block(h, temb, context, layers)
                skips = skips + block_skips
            first += n
        return h, skips

    def up(self, h, skips, temb, context, stop):
        """Go on up from u_j = h, j = len(skips) − 1, through U_j, ..., U_stop; -> u_{stop−1}."""
        end = self.num_skips                      # this block's ResNet i takes skip s_{end−1−i}
        for block in self.up_blocks:
            n = len(block.resnets)
            layers = range(max(end - len(skips), 0), min(end - stop, n))
            if layers:
                last = layers.stop == n and end > n     # up-samples: to the next level's size, for odd inputs
                size = skips[end - n - 1].shape[2:] if last else None
                h = block(h, skips[end - layers.stop:end - layers.start], temb, context, size, layers)
            end -= n
        return h
