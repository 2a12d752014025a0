"""Attention and the transformer block of the U-Net (diffusers' `attention_processor.py`,
`attention.py` and `transformer_2d.py`).

Self-attention mixes the latent's pixels with each other; cross-attention takes Q from the
latent and K, V from the text context, so each pixel draws from the words that concern it:

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,   Q = x W_q,  K = c W_k,  V = c W_v
"""
from __future__ import annotations

from tinysd.nn import Conv2d, GroupNorm, LayerNorm, Linear, Module


class Attention(Module):
    """Multi-head attention; keys `to_q`, `to_k`, `to_v`, `to_out.0`.

    `context=None` makes it self-attention. The U-Net's projections have no bias on q/k/v; the
    VAE's have, and it wraps the block in a GroupNorm and a residual (`group_norm` is set).
    """

    def __init__(self, query_dim, heads, dim_head, context_dim=None, bias=False, norm_groups=None, eps=1e-6):
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        if norm_groups:
            self.group_norm = GroupNorm(norm_groups, query_dim, eps)
        self.to_q = Linear(query_dim, inner, bias=bias)
        self.to_k = Linear(context_dim, inner, bias=bias)
        self.to_v = Linear(context_dim, inner, bias=bias)
        self.to_out = [Linear(inner, query_dim)]
        self.heads = heads

    def __call__(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)   # (B, N, heads·d)
        return self.to_out[0](self.ops.attention(q, k, v, self.heads))

    def forward_image(self, x):
        """The VAE's spatial self-attention on (B, C, H, W): x + Attn(GN(x)) over the H·W pixels."""
        _, _, H, W = x.shape
        tokens = self.ops.to_tokens(self.group_norm(x))
        return x + self.ops.to_image(self(tokens), H, W)


class FeedForward(Module):
    """GEGLU feed-forward: Linear(GEGLU(x W_proj)), with `net.0.proj` and `net.2` as keys."""

    def __init__(self, dim, mult=4):
        inner = dim * mult
        self.net = [GEGLU(dim, inner), None, Linear(inner, dim)]   # net.1 is dropout: no weights

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class GEGLU(Module):
    """h, gate = split(x W + b); h · GELU(gate)."""

    def __init__(self, dim_in, dim_out):
        self.proj = Linear(dim_in, dim_out * 2)

    def __call__(self, x):
        return self.ops.linear_geglu(x, self.proj.weight, getattr(self.proj, "bias", None))


class BasicTransformerBlock(Module):
    """Pre-norm transformer block on the latent's pixels as tokens:
    x += SelfAttn(LN(x));  x += CrossAttn(LN(x), text);  x += FF(LN(x))."""

    def __init__(self, dim, heads, dim_head, context_dim):
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(Module):
    """The U-Net's spatial transformer: image -> tokens -> transformer blocks -> image, plus x.

    SD v1 projects in and out with 1×1 convs (`use_linear_projection=False`).
    """

    def __init__(self, heads, dim_head, in_channels, context_dim, groups=32, n_layers=1):
        inner = heads * dim_head
        self.norm = GroupNorm(groups, in_channels, eps=1e-6)
        self.proj_in = Conv2d(in_channels, inner, 1)
        self.transformer_blocks = [BasicTransformerBlock(inner, heads, dim_head, context_dim)
                                   for _ in range(n_layers)]
        self.proj_out = Conv2d(inner, in_channels, 1)

    def __call__(self, x, context):
        _, _, H, W = x.shape
        h = self.ops.to_tokens(self.proj_in(self.norm(x)))               # (B, H·W, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(self.ops.to_image(h, H, W))
