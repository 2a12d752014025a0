"""The U-Net ε_θ(z_t, t, c) of Stable Diffusion v1 (diffusers' `UNet2DConditionModel`).

    z_t (B,4,h,w) ─conv_in─> down path: 4 levels of [ResNet (+ Transformer)] × 2, stride-2 conv
                               between levels; every output is kept as a skip connection
                  ─> mid: ResNet, Transformer, ResNet
                  ─> up path: 4 levels of [concat skip, ResNet (+ Transformer)] × 3, 2× up-sampling
                  ─> GroupNorm, SiLU, conv_out -> ε̂ (B,4,h,w)

The timestep t enters every ResNet through a sinusoidal embedding; the text context c enters
every Transformer through cross-attention (Q from the latent, K/V from the text).

Training: `unet(latents, t, context, saved={})` keeps each block's activations in `saved`
under the block's checkpoint name, and `unet.backward(saved, grad)` walks the blocks in reverse
(up path, mid, down path), routing the skip connections' gradients back to the down blocks
that made them; see `UNet2DConditionModel.backward`.
"""
from __future__ import annotations

import math

import numpy as np

from tinysd.attention import Transformer2DModel
from tinysd.nn import Conv2d, GroupNorm, Linear, Module, child
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


def add_residuals(skips, residuals):
    """ControlNet's entry: s_j + r_j for the skips s_0..s_{m−1} there are (all n, or DeepCache's first k+1)."""
    return skips if residuals is None else [s + r for s, r in zip(skips, residuals)]


class TimestepEmbedding(Module):
    """MLP on the sinusoidal embedding: Linear, SiLU, Linear (to 4× the base channels).

    LCM-distilled U-Nets (`time_cond_proj_dim`) add a projection of the guidance-scale embedding
    to the sinusoidal one first: linear_1(emb + cond_proj(w_emb)).
    """

    def __init__(self, in_dim, dim, cond_proj_dim=None):
        self.linear_1, self.linear_2 = Linear(in_dim, dim), Linear(dim, dim)
        if cond_proj_dim is not None:
            self.cond_proj = Linear(cond_proj_dim, in_dim, bias=False)

    def __call__(self, x, condition=None, saved=None):
        if condition is not None:
            x = x + self.cond_proj(condition)
        h = self.linear_1(x)
        if saved is not None:
            saved.update(x=x, h=h)
        return self.linear_2(self.ops.silu(h))

    def backward(self, saved, grad):
        """Through linear_2, SiLU, linear_1 (cond_proj, an LCM U-Net's, is not trained)."""
        x, h = saved["x"], saved["h"]
        return self.linear_1.backward(x, self.ops.silu_backward(self.linear_2.backward(self.ops.silu(h), grad), h))


class DownBlock2D(Module):
    """Layers 0..n−1: ResNets (CrossAttnDownBlock2D: each followed by a Transformer); layer n: the
    stride-2 conv (not in the last block). Every layer's output is kept as a skip connection."""

    def __init__(self, in_ch, out_ch, temb_ch, n_layers, downsample, groups, eps, pad):
        self.resnets = [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, eps)
                        for i in range(n_layers)]
        self.downsamplers = [Downsample2D(out_ch, pad)] if downsample else []

    def __call__(self, h, temb, context=None, layers=None, saved=None):
        """-> (h, skips). `layers` (a range; all by default) runs only those: DeepCache's passes stop
        and resume between two layers (UNet2DConditionModel)."""
        skips = []
        for i in range(len(self.resnets) + len(self.downsamplers)) if layers is None else layers:
            h = self.layer(i, h, temb, context, saved)
            skips.append(h)
        return h, skips

    def layer(self, i, h, temb, context, saved=None):
        if i < len(self.resnets):
            return self.resnets[i](h, temb, saved=child(saved, f"resnets.{i}"))
        return self.downsamplers[0](h, saved=child(saved, "downsamplers.0"))

    def backward(self, saved, grad, dskips):
        return _down_block_backward(self, saved, grad, dskips)


class CrossAttnDownBlock2D(DownBlock2D):
    def __init__(self, in_ch, out_ch, temb_ch, n_layers, heads, context_dim, downsample, groups, eps, pad):
        super().__init__(in_ch, out_ch, temb_ch, n_layers, downsample, groups, eps, pad)
        self.attentions = [Transformer2DModel(heads, out_ch // heads, out_ch, context_dim, groups)
                           for _ in range(n_layers)]

    def layer(self, i, h, temb, context, saved=None):
        h = super().layer(i, h, temb, context, saved)
        return self.attentions[i](h, context, saved=child(saved, f"attentions.{i}")) if i < len(self.attentions) else h


def _down_block_backward(block, saved, grad, dskips):
    """∂L/∂h_out and the gradients of the block's skips (in the order it made them) ->
    (∂L/∂h_in, ∂L/∂temb, ∂L/∂context). Each skip is also the next layer's input, so the
    gradient at each layer's output is the one from above plus its skip's."""
    dskips = list(dskips)
    dtemb = dcontext = 0
    for down in block.downsamplers:
        grad = down.backward(saved["downsamplers.0"], grad + dskips.pop())
    attentions = getattr(block, "attentions", [])
    for i in reversed(range(len(block.resnets))):
        grad = grad + dskips.pop()
        if attentions:
            grad, dc = attentions[i].backward(saved[f"attentions.{i}"], grad)
            dcontext = dcontext + dc
        grad, dt = block.resnets[i].backward(saved[f"resnets.{i}"], grad)
        dtemb = dtemb + dt
    return grad, dtemb, dcontext


class UpBlock2D(Module):
    """Layer i concatenates a skip from the down path (channels add) and runs ResNet i
    (CrossAttnUpBlock2D: then Transformer i); 2× up-sampling follows the last layer."""

    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, n_layers, upsample, groups, eps):
        self.resnets = [ResnetBlock2D((prev_ch if i == 0 else out_ch) + (in_ch if i == n_layers - 1 else out_ch),
                                      out_ch, temb_ch, groups, eps) for i in range(n_layers)]
        self.upsamplers = [Upsample2D(out_ch)] if upsample else []
        self.skip_channels = [in_ch if i == n_layers - 1 else out_ch for i in range(n_layers)]

    def __call__(self, h, skips, temb, context=None, size=None, layers=None, saved=None):
        """Each layer takes the last of `skips` (popped). `layers` (a range; all by default) runs
        only those, as in DownBlock2D; the up-sampling comes with the last layer."""
        layers = range(len(self.resnets)) if layers is None else layers
        for i in layers:
            h = self.layer(i, self.ops.concat([h, skips.pop()], axis=1), temb, context, saved)
        if layers and layers[-1] == len(self.resnets) - 1:
            for up in self.upsamplers:
                h = up(h, size, saved=child(saved, "upsamplers.0"))
        return h

    def layer(self, i, h, temb, context, saved=None):
        return self.resnets[i](h, temb, saved=child(saved, f"resnets.{i}"))

    def backward(self, saved, grad):
        return _up_block_backward(self, saved, grad)


class CrossAttnUpBlock2D(UpBlock2D):
    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, n_layers, heads, context_dim, upsample, groups, eps):
        super().__init__(in_ch, prev_ch, out_ch, temb_ch, n_layers, upsample, groups, eps)
        self.attentions = [Transformer2DModel(heads, out_ch // heads, out_ch, context_dim, groups)
                           for _ in range(n_layers)]

    def layer(self, i, h, temb, context, saved=None):
        return self.attentions[i](super().layer(i, h, temb, context, saved), context, saved=child(saved, f"attentions.{i}"))


def _up_block_backward(block, saved, grad):
    """∂L/∂h_out -> (∂L/∂h_in, [∂L/∂skip in the order the block was given them], ∂L/∂temb,
    ∂L/∂context). Each ResNet's input was [h, skip] concatenated on the channels, so its
    gradient splits the same way; the first ResNet took the last skip."""
    dtemb = dcontext = 0
    for up in block.upsamplers:
        grad = up.backward(saved["upsamplers.0"], grad)
    attentions = getattr(block, "attentions", [])
    dskips = []
    for i in reversed(range(len(block.resnets))):
        if attentions:
            grad, dc = attentions[i].backward(saved[f"attentions.{i}"], grad)
            dcontext = dcontext + dc
        grad, dt = block.resnets[i].backward(saved[f"resnets.{i}"], grad)
        dtemb = dtemb + dt
        c = grad.shape[1] - block.skip_channels[i]
        grad, dskip = grad[:, :c], grad[:, c:]             # concat's backward: each input's slice
        dskips.append(dskip)
    return grad, dskips, dtemb, dcontext


class UNetMidBlock2DCrossAttn(Module):
    def __init__(self, ch, temb_ch, heads, context_dim, groups, eps):
        self.resnets = [ResnetBlock2D(ch, ch, temb_ch, groups, eps), ResnetBlock2D(ch, ch, temb_ch, groups, eps)]
        self.attentions = [Transformer2DModel(heads, ch // heads, ch, context_dim, groups)]

    def __call__(self, h, temb, context, saved=None):
        h = self.resnets[0](h, temb, saved=child(saved, "resnets.0"))
        h = self.attentions[0](h, context, saved=child(saved, "attentions.0"))
        return self.resnets[1](h, temb, saved=child(saved, "resnets.1"))

    def backward(self, saved, grad):
        """∂L/∂out -> (∂L/∂h, ∂L/∂temb, ∂L/∂context)."""
        grad, dtemb1 = self.resnets[1].backward(saved["resnets.1"], grad)
        grad, dcontext = self.attentions[0].backward(saved["attentions.0"], grad)
        grad, dtemb0 = self.resnets[0].backward(saved["resnets.0"], grad)
        return grad, dtemb0 + dtemb1, dcontext


SUPPORTED = {
    "down_block_types": {"CrossAttnDownBlock2D", "DownBlock2D"},
    "up_block_types": {"CrossAttnUpBlock2D", "UpBlock2D"},
}


def down_path(cfg, channels, heads, temb_ch):
    """The down blocks a U-Net config describes (a ControlNet copies the same path)."""
    groups, eps, pad = cfg.get("norm_num_groups", 32), cfg.get("norm_eps", 1e-5), cfg.get("downsample_padding", 1)
    ctx_dim, n_layers = cfg["cross_attention_dim"], cfg.get("layers_per_block", 2)
    blocks = []
    for i, kind in enumerate(cfg["down_block_types"]):
        in_ch, out_ch, last = channels[max(i - 1, 0)], channels[i], i == len(channels) - 1
        if kind == "CrossAttnDownBlock2D":
            blocks.append(CrossAttnDownBlock2D(in_ch, out_ch, temb_ch, n_layers, heads[i], ctx_dim, not last, groups,
                                               eps, pad))
        else:
            blocks.append(DownBlock2D(in_ch, out_ch, temb_ch, n_layers, not last, groups, eps, pad))
    return blocks


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

        self.down_blocks = down_path(cfg, channels, heads, temb_ch)

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

    def __call__(self, latents, t, context, timestep_cond=None, cache_branch=None, cached=None, saved=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
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
        Training: `saved` (a dict, full passes only) keeps the activations `backward` needs.
        ControlNet (tinysd.controlnet): its residuals r_0..r_{n−1}, r_mid join the skips the up
        path takes and the mid block, s_j <- s_j + r_j, u_{n−1} = mid(s_{n−1}) + r_mid; the down
        path itself runs on the plain s_j.
        """
        B = latents.shape[0]
        t = np.broadcast_to(np.asarray(t, dtype=np.float32).reshape(-1), (B,))
        temb = self.ops.asarray(timestep_embedding(t, self.time_proj_dim, self.flip_sin_to_cos,
                                                   self.freq_shift))
        if timestep_cond is not None:        # (B, time_cond_proj_dim): LCM's guidance_scale_embedding
            timestep_cond = self.ops.asarray(timestep_cond)
        temb = self.time_embedding(temb, timestep_cond, saved=child(saved, "time_embedding"))

        n = self.num_skips
        if cache_branch is None and cached is not None:
            raise ValueError("cached features need the cache_branch they were made at")
        if cache_branch is not None and not 0 <= cache_branch < n:
            raise ValueError(f"cache_branch must be in [0, {n - 1}] (this U-Net has {n} skip connections), "
                             f"got {cache_branch}")
        residuals = down_block_additional_residuals
        if residuals is not None and len(residuals) != n:
            raise ValueError(f"down_block_additional_residuals has {len(residuals)} tensors, the U-Net has {n} "
                             f"skip connections")
        if saved is not None and cache_branch is not None:
            raise ValueError("training (saved=...) needs a full pass: no cache_branch")
        k = n - 1 if cache_branch is None else cache_branch
        h = self.conv_in(latents)
        h, skips = self.down(h, [h], temb, context, k + 1, saved)                # s_0..s_k
        if cached is None:                                                       # the deep part: u_k
            h_deep, all_skips = self.down(h, skips, temb, context, n, saved)
            u = self.mid_block(h_deep, temb, context, saved=child(saved, "mid_block"))
            if mid_block_additional_residual is not None:                        # ControlNet: r_mid
                u = u + mid_block_additional_residual
            cached = self.up(u, add_residuals(all_skips, residuals), temb, context, k + 1, saved)
        h = self.up(cached, add_residuals(skips, residuals), temb, context, 0, saved)
        if saved is not None:
            saved.update(latents=latents, h=h)
        eps = self.conv_out(self.conv_norm_out(h, silu=True))
        return eps if cache_branch is None else (eps, cached)

    @property
    def num_skips(self):
        """n: conv_in's output and one per down-path layer (= the up path's ResNets)."""
        return 1 + sum(len(b.resnets) + len(b.downsamplers) for b in self.down_blocks)

    def down(self, h, skips, temb, context, stop, saved=None):
        """Go on down from s_{len(skips)−1} = h until the skips s_0..s_{stop−1} are made. -> (h, skips)"""
        first = 1                                 # the number of the skip this block makes first
        for i, block in enumerate(self.down_blocks):
            n = len(block.resnets) + len(block.downsamplers)
            layers = range(max(len(skips) - first, 0), min(stop - first, n))
            if layers:
                h, block_skips = block(h, temb, context, layers, saved=child(saved, f"down_blocks.{i}"))
                skips = skips + block_skips
            first += n
        return h, skips

    def up(self, h, skips, temb, context, stop, saved=None):
        """Go on up from u_j = h, j = len(skips) − 1, through U_j, ..., U_stop; -> u_{stop−1}."""
        end = self.num_skips                      # this block's ResNet i takes skip s_{end−1−i}
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            layers = range(max(end - len(skips), 0), min(end - stop, n))
            if layers:
                last = layers.stop == n and end > n     # up-samples: to the next level's size, for odd inputs
                size = skips[end - n - 1].shape[2:] if last else None
                h = block(h, skips[end - layers.stop:end - layers.start], temb, context, size, layers,
                          saved=child(saved, f"up_blocks.{i}"))
            end -= n
        return h

    def backward(self, saved, grad):
        """∂L/∂ε̂ (B, C_out, h, w) -> (∂L/∂latents, ∂L/∂context); every parameter's gradient is
        added into its module's `.grads` (unless frozen).

        The forward's steps in reverse. The skips: conv_in's output and every down-block
        output was kept on a stack that the up blocks popped; here each up block returns the
        gradients of the skips it took (`dskips` holds them at the stack's positions), and each
        down block gets them back with the gradient of its output. The timestep embedding fed
        every ResNet, so its gradient is the sum of theirs (then through time_embedding's MLP);
        the text context fed every cross-attention, so its gradient is the sum of theirs.
        """
        h = saved["h"]
        grad = self.conv_out.backward(self.conv_norm_out(h, silu=True), grad)
        grad = self.conv_norm_out.backward(h, grad, silu=True)

        n_skips = [1] + [len(b.resnets) + len(b.downsamplers) for b in self.down_blocks]   # pushed by each
        dskips = [None] * sum(n_skips)
        starts, end = [], len(dskips)                   # where each up block's skips sat on the stack
        for block in self.up_blocks:
            end -= len(block.resnets)
            starts.append(end)
        dtemb = dcontext = 0
        for i in reversed(range(len(self.up_blocks))):
            grad, block_dskips, dt, dc = self.up_blocks[i].backward(saved[f"up_blocks.{i}"], grad)
            dskips[starts[i]:starts[i] + len(block_dskips)] = block_dskips
            dtemb, dcontext = dtemb + dt, dcontext + dc

        grad, dt, dc = self.mid_block.backward(saved["mid_block"], grad)
        dtemb, dcontext = dtemb + dt, dcontext + dc

        end = len(dskips)
        for i in reversed(range(len(self.down_blocks))):
            start = end - n_skips[i + 1]
            grad, dt, dc = self.down_blocks[i].backward(saved[f"down_blocks.{i}"], grad, dskips[start:end])
            dtemb, dcontext, end = dtemb + dt, dcontext + dc, start

        dlatents = self.conv_in.backward(saved["latents"], grad + dskips[0])
        self.time_embedding.backward(saved["time_embedding"], dtemb)
        return dlatents, dcontext
