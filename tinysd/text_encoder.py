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

Training: `text_encoder(ids, saved={})` keeps each layer's activations, and
`text_encoder.backward(saved, grad)` takes ∂L/∂last_hidden_state back through the layers to the
token and position tables, adding every parameter's gradient into `.grads` (see `tinysd.nn`);
textual inversion trains only the added rows (`TokenEmbedding.train_added`).
"""
from __future__ import annotations

import numpy as np

from tinysd.nn import Embedding, LayerNorm, Linear, Module, child


class CLIPAttention(Module):
    def __init__(self, dim, heads):
        self.q_proj, self.k_proj = Linear(dim, dim), Linear(dim, dim)
        self.v_proj, self.out_proj = Linear(dim, dim), Linear(dim, dim)
        self.heads = heads

    def __call__(self, x, saved=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        out = self.ops.attention(q, k, v, self.heads, causal=True)
        if saved is not None:
            saved.update(x=x, q=q, k=k, v=v, out=out)
        return self.out_proj(out)

    def backward(self, saved, grad):
        """∂L/∂y -> ∂L/∂x: Q, K and V all came from x, so their three gradients add."""
        x, q, k, v, out = (saved[key] for key in ("x", "q", "k", "v", "out"))
        dq, dk, dv = self.ops.attention_backward(self.out_proj.backward(out, grad), q, k, v, self.heads,
                                                 causal=True, out=out)
        return self.q_proj.backward(x, dq) + self.k_proj.backward(x, dk) + self.v_proj.backward(x, dv)


class CLIPMLP(Module):
    def __init__(self, dim, hidden):
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)

    def __call__(self, x, saved=None):
        h = self.fc1(x)
        if saved is not None:
            saved.update(x=x, h=h)
        return self.fc2(self.ops.quick_gelu(h))

    def backward(self, saved, grad):
        x, h = saved["x"], saved["h"]
        return self.fc1.backward(x, self.ops.quick_gelu_backward(self.fc2.backward(self.ops.quick_gelu(h), grad), h))


class CLIPEncoderLayer(Module):
    def __init__(self, dim, heads, hidden, eps):
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = LayerNorm(dim, eps)
        self.mlp = CLIPMLP(dim, hidden)
        self.layer_norm2 = LayerNorm(dim, eps)

    def __call__(self, x, saved=None):
        x1 = x + self.self_attn(self.layer_norm1(x), saved=child(saved, "self_attn"))
        if saved is not None:
            saved.update(x=x, x1=x1)
        return x1 + self.mlp(self.layer_norm2(x1), saved=child(saved, "mlp"))

    def backward(self, saved, grad):
        """∂L/∂out -> ∂L/∂x: each residual passes the gradient on and adds its branch's."""
        x, x1 = saved["x"], saved["x1"]
        dx1 = grad + self.layer_norm2.backward(x1, self.mlp.backward(saved["mlp"], grad))
        return dx1 + self.layer_norm1.backward(x, self.self_attn.backward(saved["self_attn"], dx1))


class CLIPEncoder(Module):
    def __init__(self, n_layers, dim, heads, hidden, eps):
        self.layers = [CLIPEncoderLayer(dim, heads, hidden, eps) for _ in range(n_layers)]

    def __call__(self, x, n_layers=None, saved=None):
        """x through the first `n_layers` layers (all by default): hidden_states[n_layers]."""
        for i, layer in enumerate(self.layers[:n_layers]):
            x = layer(x, saved=child(saved, f"layers.{i}"))
        return x

    def backward(self, saved, grad):
        for i in reversed(range(len(saved))):          # the layers that ran, last first
            grad = self.layers[i].backward(saved[f"layers.{i}"], grad)
        return grad


class TokenEmbedding(Embedding):
    """The token table: the checkpoint's V rows, then rows added by textual inversion (ids V, V+1, ...).

    The added rows live beside the table (`added`, host float32), so the V loaded rows are
    never copied or changed; a lookup takes each id from whichever part holds it.
    """

    added = None     # (n, dim) float32 on the host, or None
    train_added = False     # textual inversion: gradients for the added rows (grads["added"]), even if frozen

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

    def backward(self, ids, grad):
        """Each looked-up row gets the gradient of its positions (`take_backward`): the loaded
        table's unless frozen, the added rows' if `train_added`."""
        if self.added is None:
            return super().backward(ids, grad)
        V = self.weight.shape[0]
        pick = self.ops.asarray((ids >= V)[..., None].astype(np.float32))
        self.accumulate_grad("weight", self.ops.take_backward(grad * (1 - pick), self.weight, np.where(ids >= V, 0, ids),
                                                              frozen=self.frozen))
        if self.train_added:
            self.accumulate_grad("added", self.ops.take_backward(grad * pick, self.ops.asarray(self.added),
                                                                 np.where(ids >= V, ids - V, 0)))


class CLIPEmbeddings(Module):
    def __init__(self, vocab_size, max_positions, dim):
        self.token_embedding = TokenEmbedding(vocab_size, dim)
        self.position_embedding = Embedding(max_positions, dim)

    def __call__(self, ids, saved=None):
        positions = np.arange(ids.shape[1])[None]
        if saved is not None:
            saved["ids"] = ids
        return self.token_embedding(ids) + self.position_embedding(positions)

    def backward(self, saved, grad):
        """Both tables' gradients; the position rows were shared by the batch, so theirs sum over it."""
        ids = saved["ids"]
        self.token_embedding.backward(ids, grad)
        self.position_embedding.backward(np.arange(ids.shape[1])[None], grad.sum(axis=0, keepdims=True))


class CLIPTextTransformer(Module):
    def __init__(self, cfg):
        dim = cfg["hidden_size"]
        self.embeddings = CLIPEmbeddings(cfg["vocab_size"], cfg["max_position_embeddings"], dim)
        self.encoder = CLIPEncoder(cfg["num_hidden_layers"], dim, cfg["num_attention_heads"],
                                   cfg["intermediate_size"], cfg.get("layer_norm_eps", 1e-5))
        self.final_layer_norm = LayerNorm(dim, cfg.get("layer_norm_eps", 1e-5))

    def __call__(self, ids, clip_skip=None, saved=None):
        n_layers = len(self.encoder.layers) - (clip_skip or 0)
        h = self.encoder(self.embeddings(ids, saved=child(saved, "embeddings")), n_layers,
                         saved=child(saved, "encoder"))
        if saved is not None:
            saved["h"] = h
        return self.final_layer_norm(h)

    def backward(self, saved, grad):
        grad = self.encoder.backward(saved["encoder"], self.final_layer_norm.backward(saved["h"], grad))
        self.embeddings.backward(saved["embeddings"], grad)


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

    def __call__(self, ids, clip_skip=None, saved=None):
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
        return self.text_model(ids, clip_skip, saved=child(saved, "text_model"))

    def backward(self, saved, grad):
        """∂L/∂last_hidden_state (B, N, hidden_size) -> None: the ids get no gradient; every
        parameter's is added into its module's `.grads` (unless frozen)."""
        self.text_model.backward(saved["text_model"], grad)

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
