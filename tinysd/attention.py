"""Attention and the transformer block of the U-Net (diffusers' `attention_processor.py`,
`attention.py` and `transformer_2d.py`).

Self-attention mixes the latent's pixels with each other; cross-attention takes Q from the
latent and K, V from the text context, so each pixel draws from the words that concern it:

    Attention(Q, K, V) = softmax(Q Kᵀ / √d) V,   Q = x W_q,  K = c W_k,  V = c W_v

Each block has `backward(saved, grad)` beside its forward for training (see `tinysd.nn`);
cross-attention's also returns the gradient of the text context, which the caller sums.
"""
from __future__ import annotations

from tinysd.nn import Conv2d, GroupNorm, LayerNorm, Linear, Module, child


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

    def __call__(self, x, context=None, saved=None):
        c = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(c), self.to_v(c)              # (B, N, heads·d)
        out = self.ops.attention(q, k, v, self.heads)
        if saved is not None:
            saved.update(x=x, context=context, q=q, k=k, v=v, out=out)
        return self.to_out[0](out)

    def backward(self, saved, grad):
        """∂L/∂y -> (∂L/∂x, ∂L/∂context, None for self-attention). K and V come from the
        context (from x itself in self-attention, whose three paths then add up in ∂L/∂x)."""
        x, context, q, k, v, out = (saved[key] for key in ("x", "context", "q", "k", "v", "out"))
        dout = self.to_out[0].backward(out, grad)
        dq, dk, dv = self.ops.attention_backward(dout, q, k, v, self.heads, out=out)
        c = x if context is None else context
        dx, dc = self.to_q.backward(x, dq), self.to_k.backward(c, dk) + self.to_v.backward(c, dv)
        return (dx + dc, None) if context is None else (dx, dc)

    def forward_image(self, x, saved=None):
        """The VAE's spatial self-attention on (B, C, H, W): x + Attn(GN(x)) over the H·W pixels."""
        _, _, H, W = x.shape
        tokens = self.ops.to_tokens(self.group_norm(x))
        if saved is not None:
            saved["image"] = x
        return x + self.ops.to_image(self(tokens, saved=saved), H, W)

    def backward_image(self, saved, grad):
        """∂L/∂out -> ∂L/∂x for `forward_image`; to_tokens and to_image are inverse permutations,
        so each one's backward is the other."""
        x = saved["image"]
        _, _, H, W = x.shape
        dtokens, _ = self.backward(saved, self.ops.to_tokens(grad))
        return grad + self.group_norm.backward(x, self.ops.to_image(dtokens, H, W))


class FeedForward(Module):
    """GEGLU feed-forward: Linear(GEGLU(x W_proj)), with `net.0.proj` and `net.2` as keys."""

    def __init__(self, dim, mult=4):
        inner = dim * mult
        self.net = [GEGLU(dim, inner), None, Linear(inner, dim)]   # net.1 is dropout: no weights

    def __call__(self, x, saved=None):
        h = self.net[0](x, saved=child(saved, "net.0"))
        if saved is not None:
            saved["h"] = h
        return self.net[2](h)

    def backward(self, saved, grad):
        return self.net[0].backward(saved["net.0"], self.net[2].backward(saved["h"], grad))


class GEGLU(Module):
    """h, gate = split(x W + b); h · GELU(gate)."""

    def __init__(self, dim_in, dim_out):
        self.proj = Linear(dim_in, dim_out * 2)

    def __call__(self, x, saved=None):
        if saved is None:
            return self.ops.linear_geglu(x, self.proj.weight, getattr(self.proj, "bias", None))
        saved.update(x=x, proj=self.proj(x))        # training keeps the (N, 2F) projection
        return self.ops.geglu(saved["proj"])

    def backward(self, saved, grad):
        return self.proj.backward(saved["x"], self.ops.geglu_backward(grad, saved["proj"]))


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

    def __call__(self, x, context, saved=None):
        x1 = x + self.attn1(self.norm1(x), saved=child(saved, "attn1"))
        x2 = x1 + self.attn2(self.norm2(x1), context, saved=child(saved, "attn2"))
        if saved is not None:
            saved.update(x=x, x1=x1, x2=x2)
        return x2 + self.ff(self.norm3(x2), saved=child(saved, "ff"))

    def backward(self, saved, grad):
        """∂L/∂out -> (∂L/∂x, ∂L/∂context): each residual passes its gradient on unchanged and
        adds the gradient that came back through its branch (FF, then cross-, then self-attention)."""
        x, x1, x2 = saved["x"], saved["x1"], saved["x2"]
        dx2 = grad + self.norm3.backward(x2, self.ff.backward(saved["ff"], grad))
        dn2, dcontext = self.attn2.backward(saved["attn2"], dx2)
        dx1 = dx2 + self.norm2.backward(x1, dn2)
        dn1, _ = self.attn1.backward(saved["attn1"], dx1)
        return dx1 + self.norm1.backward(x, dn1), dcontext


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

    def __call__(self, x, context, saved=None):
        _, _, H, W = x.shape
        h = self.ops.to_tokens(self.proj_in(self.norm(x)))               # (B, H·W, inner)
        for i, block in enumerate(self.transformer_blocks):
            h = block(h, context, saved=child(saved, f"transformer_blocks.{i}"))
        if saved is not None:
            saved.update(x=x, h=h)
        return x + self.proj_out(self.ops.to_image(h, H, W))

    def backward(self, saved, grad):
        """∂L/∂out -> (∂L/∂x, ∂L/∂context): proj_out, the blocks in reverse, proj_in, the norm,
        plus the residual. to_tokens and to_image are inverse permutations, so each one's
        backward is the other."""
        x, h = saved["x"], saved["h"]
        _, _, H, W = x.shape
        dh = self.ops.to_tokens(self.proj_out.backward(self.ops.to_image(h, H, W), grad))
        dcontext = 0
        for i in reversed(range(len(self.transformer_blocks))):
            dh, dc = self.transformer_blocks[i].backward(saved[f"transformer_blocks.{i}"], dh)
            dcontext = dcontext + dc
        dn = self.proj_in.backward(self.norm(x), self.ops.to_image(dh, H, W))
        return grad + self.norm.backward(x, dn), dcontext
