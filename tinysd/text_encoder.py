"""CLIP's text transformer (transformers' `CLIPTextModel`): token ids -> the context the U-Net
cross-attends to.

    ids (B, 77) -> token + position embeddings (B, 77, 768)
               -> 12 × [x += SelfAttention(LN(x), causal); x += MLP(LN(x))]   (pre-norm, quick-GELU)
               -> final LayerNorm -> last_hidden_state (B, 77, 768)

The causal mask lets token i see tokens ≤ i only, so the padding after <|endoftext|> does not
change the real tokens' states. Attribute names follow the checkpoint's keys
(`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...).
"""
from __future__ import annotations

import numpy as np

from tinysd.nn import Embedding, LayerNorm, Linear, Module


class CLIPAttention(Module):
    def __init__(self, dim, heads):
        self.q_proj, self.k_proj = Linear(dim, dim), Linear(dim, dim)
        self.v_proj, self.out_proj = Linear(dim, dim), Linear(dim, dim)
        self.heads = heads

    def __call__(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(self.ops.attention(q, k, v, self.heads, causal=True))


class CLIPMLP(Module):
    def __init__(self, dim, hidden):
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def __call__(self, x):
        return self.fc2(self.ops.quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(Module):
    def __init__(self, dim, heads, hidden, eps):
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = LayerNorm(dim, eps)
        self.mlp = CLIPMLP(dim, hidden)
        self.layer_norm2 = LayerNorm(dim, eps)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(Module):
    def __init__(self, n_layers, dim, heads, hidden, eps):
        self.layers = [CLIPEncoderLayer(dim, heads, hidden, eps) for _ in range(n_layers)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPEmbeddings(Module):
    def __init__(self, vocab_size, max_positions, dim):
        self.token_embedding = Embedding(vocab_size, dim)
        self.position_embedding = Embedding(max_positions, dim)

    def __call__(self, ids):
        positions = np.arange(ids.shape[1])[None]
        return self.token_embedding(ids) + self.position_embedding(positions)


class CLIPTextTransformer(Module):
    def __init__(self, cfg):
        dim = cfg["hidden_size"]
        self.embeddings = CLIPEmbeddings(cfg["vocab_size"], cfg["max_position_embeddings"], dim)
        self.encoder = CLIPEncoder(cfg["num_hidden_layers"], dim, cfg["num_attention_heads"],
                                   cfg["intermediate_size"], cfg.get("layer_norm_eps", 1e-5))
        self.final_layer_norm = LayerNorm(dim, cfg.get("layer_norm_eps", 1e-5))

    def __call__(self, ids):
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


class CLIPTextModel(Module):
    """`CLIPTextModel(config)(ids)` -> last hidden state (B, N, hidden_size), float32."""

    def __init__(self, config):
        act = config.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"text encoder hidden_act {act!r} is not supported (SD v1 uses 'quick_gelu')")
        self.config = dict(config)
        self.text_model = CLIPTextTransformer(config)

    def __call__(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        return self.text_model(ids)
