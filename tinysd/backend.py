"""The op boundary: the few primitive ops every model file calls through `self.ops`.

A backend swaps these ops and nothing else; the model files never branch on the backend.
`NumpyBackend` is the reference: plain NumPy, written to be read. The `cpu` (Numba) and `cuda`
(numba.cuda) backends in `tinysd.kernels` subclass it and override what they speed up; each of
their kernels is tested against the method here.

Layouts: images are NCHW float32; token sequences are (B, N, C). Activations returned by a
backend support `+`, `*`, `.shape` and `.reshape` (NumPy arrays do); anything else goes
through an op.
"""
from __future__ import annotations

import numpy as np


class NumpyBackend:
    name = "numpy"

    # -- moving data in and out ------------------------------------------------------------
    def asarray(self, x) -> np.ndarray:
        """Host array (any float dtype) -> this backend's float32 array. Weights pass here once."""
        return np.ascontiguousarray(x, dtype=np.float32)

    def numpy(self, x) -> np.ndarray:
        """This backend's array -> host NumPy array."""
        return np.asarray(x)

    # -- dense layers --------------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        """y = x Wᵀ + b. x (..., in), weight (out, in) as stored by torch.nn.Linear."""
        y = x @ weight.T
        if bias is not None:
            y += bias
        return y

    def conv2d(self, x, weight, bias=None, stride=1, padding=0):
        """2-D cross-correlation, as torch.nn.Conv2d.

        x (B, Cin, H, W), weight (Cout, Cin, kh, kw). `padding` is an int or a tuple
        (top, bottom, left, right) of zeros added before the window slides; stride is an int.
        A kh×kw conv is the sum of kh·kw 1×1 convs (matmuls over channels) of shifted views of
        the padded input: no im2col buffer, so memory stays at one activation per tap.
        """
        B, Cin, H, W = x.shape
        Cout, _, kh, kw = weight.shape
        (pt, pb, pl, pr), Ho, Wo = conv_output_size(x.shape, weight.shape, stride, padding)
        if pt or pb or pl or pr:
            x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        out = np.zeros((B, Cout, Ho * Wo), dtype=np.float32)
        for i in range(kh):
            for j in range(kw):
                tap = x[:, :, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]
                out += weight[:, :, i, j] @ tap.reshape(B, Cin, Ho * Wo)   # (Cout,Cin)@(B,Cin,HW)
        if bias is not None:
            out += bias[:, None]
        return out.reshape(B, Cout, Ho, Wo)

    # -- normalisation and activations ---------------------------------------------------------
    def group_norm(self, x, num_groups, weight, bias, eps, silu=False):
        """GroupNorm over (C/G, H, W) of each group, then a per-channel affine; SiLU after if asked.

        x (B, C, ...). y = (x − μ_g) / √(σ²_g + eps) · γ_c + β_c.
        """
        B, C = x.shape[:2]
        g = x.reshape(B, num_groups, -1)
        mean = g.mean(axis=2, keepdims=True)
        var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
        y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
        affine = (B, C) + (1,) * (x.ndim - 2)
        y = y * weight.reshape(affine[1:]) + bias.reshape(affine[1:])
        return self.silu(y) if silu else y.astype(np.float32, copy=False)

    def layer_norm(self, x, weight, bias, eps):
        """LayerNorm over the last axis: y = (x − μ) / √(σ² + eps) · γ + β."""
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return ((x - mean) / np.sqrt(var + eps) * weight + bias).astype(np.float32, copy=False)

    def silu(self, x):
        """SiLU (swish): x·σ(x)."""
        from scipy.special import expit      # here, not at the top: 0.1 s that the other backends never need
        return (x * expit(x)).astype(np.float32, copy=False)

    def gelu(self, x):
        """Exact GELU: x·Φ(x) = ½x(1 + erf(x/√2))."""
        from scipy.special import erf
        return 0.5 * x * (1.0 + erf(x * np.float32(1 / np.sqrt(2.0))))   # float32 throughout

    def quick_gelu(self, x):
        """CLIP's GELU approximation: x·σ(1.702x)."""
        from scipy.special import expit
        return (x * expit(1.702 * x)).astype(np.float32, copy=False)

    def geglu(self, x):
        """Gated GELU of the transformer feed-forward: split the last axis in halves (h, gate),
        return h·GELU(gate)."""
        h, gate = np.split(x, 2, axis=-1)
        return h * self.gelu(gate)

    def linear_geglu(self, x, weight, bias=None):
        """geglu(linear(x, weight, bias)), the feed-forward's first half as one op, so that a
        backend can fuse them: the (N, 2F) projection then never has to exist all at once."""
        return self.geglu(self.linear(x, weight, bias))

    # -- attention -------------------------------------------------------------------------------
    def attention(self, q, k, v, heads, causal=False):
        """Multi-head scaled dot-product attention, softmax(Q Kᵀ/√d) V per head.

        q (B, Nq, C), k and v (B, Nk, C) with C = heads·d. With `causal`, query i sees keys ≤ i
        (CLIP's text transformer). One (Nq, Nk) score matrix at a time, so memory stays small.
        """
        B, Nq, C = q.shape
        Nk = k.shape[1]
        d = C // heads
        qh = q.reshape(B, Nq, heads, d)
        kh = k.reshape(B, Nk, heads, d)
        vh = v.reshape(B, Nk, heads, d)
        out = np.empty((B, Nq, heads, d), dtype=np.float32)
        scale = np.float32(1.0 / np.sqrt(d))
        mask = np.triu(np.full((Nq, Nk), -np.inf, np.float32), k=1) if causal else None
        for b in range(B):
            for h in range(heads):
                s = (qh[b, :, h] * scale) @ kh[b, :, h].T                     # (Nq, Nk)
                if mask is not None:
                    s += mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                out[b, :, h] = s @ vh[b, :, h]
        return out.reshape(B, Nq, C)

    # -- shape ops ------------------------------------------------------------------------------
    def upsample_nearest2x(self, x):
        """Nearest-neighbour 2× up-sampling of (B, C, H, W)."""
        return x.repeat(2, axis=2).repeat(2, axis=3)

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def to_tokens(self, x):
        """(B, C, H, W) image -> (B, H·W, C) token sequence, row-major over pixels."""
        B, C, H, W = x.shape
        return np.ascontiguousarray(x.reshape(B, C, H * W).transpose(0, 2, 1))

    def to_image(self, x, height, width):
        """(B, H·W, C) token sequence -> (B, C, H, W) image."""
        B, N, C = x.shape
        return np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(B, C, height, width)

    def take(self, table, ids):
        """Embedding lookup: rows of `table` (V, C) at integer `ids` (B, N) -> (B, N, C)."""
        return table[np.asarray(ids)]


def conv_output_size(x_shape, weight_shape, stride, padding):
    """((top, bottom, left, right) padding, Ho, Wo) of a conv; checks the channels agree.

    Ho = (H + top + bottom − kh) // stride + 1, and likewise Wo.
    """
    (_, Cin, H, W), (_, Cin_w, kh, kw) = x_shape, weight_shape
    if Cin_w != Cin:
        raise ValueError(f"conv2d: input has {Cin} channels, weight {tuple(weight_shape)} expects {Cin_w}")
    pt, pb, pl, pr = (padding,) * 4 if np.isscalar(padding) else padding
    return (pt, pb, pl, pr), (H + pt + pb - kh) // stride + 1, (W + pl + pr - kw) // stride + 1


BACKENDS = {"numpy": NumpyBackend}


def get_backend(name=None):
    """A backend by name: 'numpy' (reference), 'cpu' (Numba) or 'cuda' (numba.cuda).

    None picks 'cpu' where its kernels import, else 'numpy'.
    """
    if name is None or name in ("cpu", "cuda"):
        try:
            from tinysd import kernels  # noqa: F401  registers 'cpu' and 'cuda' where available
        except ImportError:
            if name is not None:
                raise
        if name is None:
            name = "cpu" if "cpu" in BACKENDS else "numpy"
    if not isinstance(name, str):
        return name  # already a backend instance
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]()
