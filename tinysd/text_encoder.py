"""CLIP's text transformer (transformers' `CLIPTextModel`): token ids -> the context the U-Net
cross-attends to.

    ids (B, 77) -> token + position embeddings (B, 77, 768)
               -> 12 × [x += SelfAttention(LN(x), causal); x += MLP(LN(x))]   (pre-norm, quick-GELU)
               -> final LayerNorm -> last_hidden_state (B, 77, 768)

The causal mask lets token i see tokens ≤ i only, so the padding after <|endoftext|> does not
change the real tokens' states. Attribute names follow the checkpoint's keys
(`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...).

Clip skip (diffusers' `clip_skip=N`) takes the hidden state N layers before the last one,
hidden_states[-(N+1)], through the same final LayerNorm: the last N layers are not run.
Textual inversion appends rows to the token table (ids 49408, 49409, ...); the checkpoint's
rows stay as loaded (memory-mapped).
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

    def __call__(self, x, n_layers=None):
        """x through the first `n_layers` layers (all by default): hidden_states[n_layers]."""
        for layer in self.layers[:n_layers]:
            x = layer(x)
        return x


class TokenEmbedding(Embedding):
    """The token table: the checkpoint's V rows, then rows added by textual inversion (ids V, V+1, ...).

    The added rows live beside the table (`added`, host float32), so the V loaded rows are
    never copied or changed; a lookup takes each id from whichever part holds it.
    """

    added = None     # (n, dim) float32 on the host, or None

    @property
    def num_embeddings(self):
        return self.weight.shape[0] + (0 if self.added is None else len(self.added))

    def append(self, rows) -> list[int]:
        """Add rows (n, dim); returns their ids."""
        rows = np.asarray(rows, dtype=np.float32)
        first = self.num_embeddings
        self.added = rows.copy() if self.added is None else np.concatenate([self.added, rows])
        return list(range(first, first + len(rows)))

    def __call__(self, ids):
        if self.added is None:
            return super().__call__(ids)
        V = self.weight.shape[0]
        new = ids >= V
        loaded = self.ops.take(self.weight, np.where(new, 0, ids))
        added = self.ops.take(self.ops.asarray(self.added), np.where(new, ids - V, 0))
        pick = new[..., None].astype(np.float32)        # (B, N, 1): 1 where the id is an added row
        return loaded * self.ops.asarray(1 - pick) + added * self.ops.asarray(pick)   # exact: x·1 + y·0


class CLIPEmbeddings(Module):
    def __init__(self, vocab_size, max_positions, dim):
        self.token_embedding = TokenEmbedding(vocab_size, dim)
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

    def __call__(self, ids, clip_skip=None):
        n_layers = len(self.encoder.layers) - (clip_skip or 0)
        return self.final_layer_norm(self.encoder(self.embeddings(ids), n_layers))


class CLIPTextModel(Module):
    """`CLIPTextModel(config)(ids)` -> last hidden state (B, N, hidden_size), float32.

    `clip_skip=N` skips the last N layers (diffusers' meaning; A1111's "Clip skip" is N + 1).
    """

    def __init__(self, config):
        act = config.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"text encoder hidden_act {act!r} is not supported (SD v1 uses 'quick_gelu')")
        self.config = dict(config)
        self.text_model = CLIPTextTransformer(config)

    def __call__(self, ids, clip_skip=None):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        n_layers = len(self.text_model.encoder.layers)
        if clip_skip is not None and not (isinstance(clip_skip, (int, np.integer)) and 0 <= clip_skip <= n_layers):
            raise ValueError(f"clip_skip must be an integer from 0 to {n_layers} (the text encoder's layers), "
                             f"got {clip_skip!r}")
        vocab = self.num_tokens
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
        return self.text_model(ids, clip_skip)

    @property
    def hidden_size(self):
        return self.config["hidden_size"]

    @property
    def num_tokens(self):
        """Rows of the token table: the vocabulary, plus any added by textual inversion."""
        return self.text_model.embeddings.token_embedding.num_embeddings

    def add_tokens(self, rows) -> list[int]:
        """Append token-embedding rows (n, hidden_size) after the table; returns their ids."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.hidden_size:
            raise ValueError(f"token rows must have shape (n, {self.hidden_size}), got {rows.shape}")
        return self.text_model.embeddings.token_embedding.append(rows)
