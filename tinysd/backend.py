"""The op boundary: the few primitive ops every model file calls through `self.ops`.

A backend swaps these ops and nothing else; the model files never branch on the backend.
`NumpyBackend` is the reference: plain NumPy, written to be read. The `cpu` (Numba) and `cuda`
(numba.cuda) backends in `tinysd.kernels` subclass it and override what they speed up; each of
their kernels is tested against the method here.

Layouts: images are NCHW float32; token sequences are (B, N, C). Activations returned by a
backend support `+`, `*`, `.shape` and `.reshape` (NumPy arrays do); anything else goes
through an op.

Training: each op `f` has `f_backward` right after it, the chain rule through that one op.
It takes `grad`, the loss's gradient ∂L/∂y with respect to the op's output y, then the
forward's own arguments as the forward got them (so what a block saves for its backward is
the inputs of its ops), and returns ∂L/∂ of the forward's array arguments in their order: a
tuple, or one array for ops with one input. A bias that was None gets None; `frozen=True`
skips the parameter gradients (None, and their products never run), for training through
frozen layers (LoRA, textual inversion). Statistics that one cheap pass recomputes (norm
means and variances, softmax row sums) are recomputed rather than saved; where recomputing
costs a GEMM the backward takes the forward's output or intermediate as an optional argument
(attention's `out`, linear_geglu's `proj`). Gradients keep the inputs' dtype: ops with weights
compute in the weights' dtype (float32 from `asarray`; float64 in the tests' tight checks),
the others in their input's. The U-Net's sinusoidal timestep embedding
(`tinysd.unet.timestep_embedding`) is not an op and has no backward: it has no parameters and
the timestep t is not differentiated; the MLP after it is linear, silu, linear.
"""
from __future__ import annotations

import numpy as np


def expit(x):
    """σ(x) = 1/(1 + e^(−x)), SciPy's; imported on first use, not with this module: 0.1 s of
    every start that the cpu and cuda backends never need."""
    from scipy.special import expit as scipy_expit
    return scipy_expit(x)


def erf(x):
    """The error function, SciPy's; imported on first use (see `expit`)."""
    from scipy.special import erf as scipy_erf
    return scipy_erf(x)


class NumpyBackend:
    name = "numpy"
    dtype = np.float32

    def __init__(self, dtype=np.float32):
        """`dtype=np.float64` keeps a model's weights, and so every activation and gradient, in
        float64: the tight gradient checks against torch.autograd run this way."""
        self.dtype = np.dtype(dtype)

    # moving data in and out
    def asarray(self, x) -> np.ndarray:
        """Host array (any float dtype) -> this backend's array (float32 unless made with
        `dtype=np.float64`). Weights pass here once."""
        return np.ascontiguousarray(x, dtype=self.dtype)

    def numpy(self, x) -> np.ndarray:
        """This backend's array -> host NumPy array."""
        return np.asarray(x)

    # dense layers
    def linear(self, x, weight, bias=None):
        """y = x Wᵀ + b. x (..., in), weight (out, in) as stored by torch.nn.Linear."""
        y = x @ weight.T
        if bias is not None:
            y += bias
        return y

    def linear_backward(self, grad, x, weight, bias=None, frozen=False):
        """y = x Wᵀ + b, so with the rows of x and y as the (M, in) and (M, out) matrices:

            ∂L/∂x = ∂L/∂y W,   ∂L/∂W = (∂L/∂y)ᵀ x,   ∂L/∂b = Σ_rows ∂L/∂y.

        Saved: the input x. Returns (dx, dweight, dbias).
        """
        dx = grad @ weight                                          # (..., out) @ (out, in)
        if frozen:
            return dx, None, None
        g2, x2 = grad.reshape(-1, weight.shape[0]), x.reshape(-1, weight.shape[1])
        return dx, g2.T @ x2, None if bias is None else g2.sum(axis=0)

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
        out = np.zeros((B, Cout, Ho * Wo), dtype=_compute_dtype(weight))
        for i in range(kh):
            for j in range(kw):
                tap = x[:, :, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]
                out += weight[:, :, i, j] @ tap.reshape(B, Cin, Ho * Wo)   # (Cout,Cin)@(B,Cin,HW)
        if bias is not None:
            out += bias[:, None]
        return out.reshape(B, Cout, Ho, Wo)

    def conv2d_backward(self, grad, x, weight, bias=None, stride=1, padding=0, frozen=False):
        """The forward is, per tap (i, j), a linear layer over channels applied to the tap's
        view of the padded input, xpad_ij[b, :, p] = xpad[b, :, s·y + i, s·x + j] at output pixel
        p = (y, x):  y[b, :, p] = Σ_ij W_ij xpad_ij[b, :, p] + bias,  W_ij = W[:, :, i, j].
        So, tap by tap as in `linear_backward`:

            ∂L/∂W_ij = Σ_b,p ∂L/∂y[b, :, p] ⊗ xpad_ij[b, :, p]       (Cout, Cin)
            ∂L/∂xpad_ij += W_ijᵀ ∂L/∂y      (scatter-added into the same strided view)
            ∂L/∂b = Σ_b,p ∂L/∂y,   ∂L/∂x = ∂L/∂xpad without its padding.

        The second line summed over the taps is the transposed convolution, here as the
        forward's sum of shifted matmuls run backwards. Rows or columns that no window reached
        (with stride 2, the last row of an even-sized input without padding) get no gradient.
        Saved: the input x. Returns (dx, dweight, dbias).
        """
        B, Cin, H, W = x.shape
        Cout, _, kh, kw = weight.shape
        (pt, pb, pl, pr), Ho, Wo = conv_output_size(x.shape, weight.shape, stride, padding)
        dtype = _compute_dtype(weight)
        xpad = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        dxpad = np.zeros(xpad.shape, dtype)
        dweight = None if frozen else np.empty(weight.shape, dtype)
        g = grad.reshape(B, Cout, Ho * Wo)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i, i + stride * (Ho - 1) + 1, stride)
                cols = slice(j, j + stride * (Wo - 1) + 1, stride)
                dxpad[:, :, rows, cols] += (weight[:, :, i, j].T @ g).reshape(B, Cin, Ho, Wo)
                if not frozen:
                    tap = xpad[:, :, rows, cols].reshape(B, Cin, Ho * Wo)
                    dweight[:, :, i, j] = np.tensordot(g, tap, axes=((0, 2), (0, 2)))   # Σ_b,p
        dx = dxpad[:, :, pt:pt + H, pl:pl + W]
        dbias = None if frozen or bias is None else g.sum(axis=(0, 2))
        return dx, dweight, dbias

    # normalisation and activations
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
        y = y.astype(_compute_dtype(weight), copy=False)
        return self.silu(y) if silu else y

    def group_norm_backward(self, grad, x, num_groups, weight, bias, eps, silu=False, frozen=False):
        """With x̂ = (x − μ_g)·r, r = 1/√(σ²_g + eps), y = γ x̂ + β (then z = SiLU(y) if `silu`):

            ∂L/∂y = ∂L/∂z · SiLU'(y)                        (with `silu`; see silu_backward)
            ∂L/∂γ_c = Σ_b,pixels ∂L/∂y · x̂,   ∂L/∂β_c = Σ_b,pixels ∂L/∂y
            ∂L/∂x = r · (ĝ − mean_g(ĝ) − x̂ · mean_g(ĝ x̂)),   ĝ = ∂L/∂x̂ = γ ∂L/∂y,

        means over each group's (C/G)·H·W entries: μ and σ² depend on every entry of the group,
        which subtracts ĝ's projection on the constants (through μ) and on x̂ (through σ²).
        Saved: the input x; μ, σ² and x̂ are recomputed in one pass. Returns (dx, dweight, dbias).
        """
        B, C = x.shape[:2]
        dtype = _compute_dtype(weight)
        g = x.reshape(B, num_groups, -1)
        mean = g.mean(axis=2, keepdims=True)
        rstd = 1 / np.sqrt(((g - mean) ** 2).mean(axis=2, keepdims=True) + eps)
        xhat = ((g - mean) * rstd).reshape(x.shape).astype(dtype, copy=False)
        affine = (C,) + (1,) * (x.ndim - 2)
        if silu:
            grad = grad * _silu_derivative(xhat * weight.reshape(affine) + bias.reshape(affine))
        sum_axes = (0,) + tuple(range(2, x.ndim))
        dweight = None if frozen else (grad * xhat).sum(axis=sum_axes)
        dbias = None if frozen else grad.sum(axis=sum_axes)
        ghat = (grad * weight.reshape(affine)).reshape(g.shape)
        xhat = xhat.reshape(g.shape)
        dx = rstd * (ghat - ghat.mean(axis=2, keepdims=True) - xhat * (ghat * xhat).mean(axis=2, keepdims=True))
        return dx.reshape(x.shape).astype(dtype, copy=False), dweight, dbias

    def layer_norm(self, x, weight, bias, eps):
        """LayerNorm over the last axis: y = (x − μ) / √(σ² + eps) · γ + β."""
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return ((x - mean) / np.sqrt(var + eps) * weight + bias).astype(_compute_dtype(weight), copy=False)

    def layer_norm_backward(self, grad, x, weight, bias, eps, frozen=False):
        """As `group_norm_backward` with one group per row and the mean over the last axis:
        x̂ = (x − μ)·r,  ĝ = γ ∂L/∂y,  ∂L/∂x = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)),
        ∂L/∂γ = Σ_rows ∂L/∂y · x̂,  ∂L/∂β = Σ_rows ∂L/∂y.
        Saved: the input x. Returns (dx, dweight, dbias).
        """
        dtype = _compute_dtype(weight)
        mean = x.mean(axis=-1, keepdims=True)
        rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
        xhat = ((x - mean) * rstd).astype(dtype, copy=False)
        ghat = grad * weight
        dx = rstd * (ghat - ghat.mean(axis=-1, keepdims=True) - xhat * (ghat * xhat).mean(axis=-1, keepdims=True))
        if frozen:
            return dx.astype(dtype, copy=False), None, None
        g2 = grad.reshape(-1, x.shape[-1])
        return dx.astype(dtype, copy=False), (g2 * xhat.reshape(g2.shape)).sum(axis=0), g2.sum(axis=0)

    def silu(self, x):
        """SiLU (swish): x·σ(x)."""
        return (x * expit(x)).astype(_compute_dtype(x), copy=False)

    def silu_backward(self, grad, x):
        """d/dx x·σ(x) = σ(x) + x·σ(x)(1 − σ(x)) = σ(x)·(1 + x(1 − σ(x))). Saved: the input x."""
        return (grad * _silu_derivative(x)).astype(_compute_dtype(x), copy=False)

    def relu(self, x):
        """ReLU: max(x, 0)."""
        return np.maximum(x, np.float32(0)).astype(np.float32, copy=False)

    def tanh(self, x):
        return np.tanh(x).astype(np.float32, copy=False)

    def gelu(self, x):
        """Exact GELU: x·Φ(x) = ½x(1 + erf(x/√2))."""
        return 0.5 * x * (1.0 + erf(x * _compute_dtype(x).type(1 / np.sqrt(2.0))))   # x's dtype throughout

    def gelu_backward(self, grad, x):
        """d/dx x·Φ(x) = Φ(x) + x·φ(x),  φ(x) = e^(−x²/2)/√(2π) the normal density.
        Saved: the input x."""
        one = _compute_dtype(x).type
        cdf = 0.5 * (1.0 + erf(x * one(1 / np.sqrt(2.0))))
        pdf = np.exp(-0.5 * x * x) * one(1 / np.sqrt(2 * np.pi))
        return grad * (cdf + x * pdf)

    def quick_gelu(self, x):
        """CLIP's GELU approximation: x·σ(1.702x)."""
        return (x * expit(1.702 * x)).astype(_compute_dtype(x), copy=False)

    def quick_gelu_backward(self, grad, x):
        """d/dx x·σ(ax) = σ(ax) + a·x·σ(ax)(1 − σ(ax)), a = 1.702. Saved: the input x."""
        s = expit(1.702 * x)
        return (grad * (s + 1.702 * x * s * (1 - s))).astype(_compute_dtype(x), copy=False)

    def geglu(self, x):
        """Gated GELU of the transformer feed-forward: split the last axis in halves (h, gate),
        return h·GELU(gate)."""
        h, gate = np.split(x, 2, axis=-1)
        return h * self.gelu(gate)

    def geglu_backward(self, grad, x):
        """y = h·GELU(gate) with x = [h, gate] on the last axis:
        ∂L/∂h = ∂L/∂y · GELU(gate),  ∂L/∂gate = ∂L/∂y · h · GELU'(gate), concatenated back into
        the shape of x. Saved: the input x."""
        h, gate = np.split(x, 2, axis=-1)
        return np.concatenate([grad * self.gelu(gate), self.gelu_backward(grad * h, gate)], axis=-1)

    def linear_geglu(self, x, weight, bias=None):
        """geglu(linear(x, weight, bias)), the feed-forward's first half as one op, so that a
        backend can fuse them: the (N, 2F) projection then never has to exist all at once."""
        return self.geglu(self.linear(x, weight, bias))

    def linear_geglu_backward(self, grad, x, weight, bias=None, proj=None, frozen=False):
        """The chain rule through the two ops: geglu_backward, then linear_backward.

        Saved: the input x, and optionally `proj` = x Wᵀ + b, the (N, 2F) projection; without it
        the projection is recomputed (one GEMM, the forward's cost; the fused forward never
        holds it whole). Returns (dx, dweight, dbias).
        """
        if proj is None:
            proj = self.linear(x, weight, bias)
        return self.linear_backward(self.geglu_backward(grad, proj), x, weight, bias, frozen=frozen)

    # attention
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
        dtype = _compute_dtype(q, k, v)
        out = np.empty((B, Nq, heads, d), dtype=dtype)
        scale = dtype.type(1.0 / np.sqrt(d))
        mask = np.triu(np.full((Nq, Nk), -np.inf, dtype), k=1) if causal else None
        for b in range(B):
            for h in range(heads):
                out[b, :, h] = _attention_probs(qh[b, :, h], kh[b, :, h], scale, mask) @ vh[b, :, h]
        return out.reshape(B, Nq, C)

    def attention_backward(self, grad, q, k, v, heads, causal=False, out=None):
        """Per batch and head, with S = Q Kᵀ/√d (−∞ above the diagonal if causal), P = softmax(S)
        row by row and O = P V:

            ∂L/∂V = Pᵀ ∂L/∂O,   ∂L/∂P = ∂L/∂O Vᵀ,
            ∂L/∂S = P ∘ (∂L/∂P − D),   D_i = Σ_j P_ij ∂L/∂P_ij   (softmax's Jacobian, row i),
            ∂L/∂Q = ∂L/∂S K/√d,   ∂L/∂K = (∂L/∂S)ᵀ Q/√d.

        Masked scores have P = 0, so they get no gradient. D_i is also ∂L/∂O_i · O_i, since
        Σ_j P_ij (∂L/∂O_i · V_j) = ∂L/∂O_i · Σ_j P_ij V_j; that form is used when the forward's
        output `out` is passed (it is the input of the projection after attention, so a block
        keeps it anyway).

        This twin keeps one (Nq, Nk) P per head. The flash-style form (FlashAttention-2, Dao
        2023) never holds it: with the row log-sum-exp L_i = log Σ_j e^S_ij (from the forward, or
        one recomputing pass over the key tiles) and D = rowsum(∂L/∂O ∘ O), walk query tile ×
        key tile and recompute each tile's P = e^(S − L) from Q and K; then dV_tile += Pᵀ dO,
        dP = dO V_tileᵀ, dS = P ∘ (dP − D), dQ += dS K_tile/√d, dK_tile += dSᵀ Q/√d: memory
        O(N·d) in the sequence length, at the price of recomputing S.
        Saved: q, k, v, and optionally the output. Returns (dq, dk, dv).
        """
        B, Nq, C = q.shape
        Nk = k.shape[1]
        d = C // heads
        dtype = _compute_dtype(q, k, v)
        scale = dtype.type(1.0 / np.sqrt(d))
        qh, kh, vh = (a.reshape(B, -1, heads, d) for a in (q, k, v))
        gh = grad.reshape(B, Nq, heads, d)
        oh = None if out is None else out.reshape(B, Nq, heads, d)
        dq, dk, dv = (np.empty((B, n, heads, d), dtype) for n in (Nq, Nk, Nk))
        mask = np.triu(np.full((Nq, Nk), -np.inf, dtype), k=1) if causal else None
        for b in range(B):
            for h in range(heads):
                p = _attention_probs(qh[b, :, h], kh[b, :, h], scale, mask)    # (Nq, Nk)
                go = gh[b, :, h]
                dv[b, :, h] = p.T @ go
                dp = go @ vh[b, :, h].T
                if oh is None:
                    D = (p * dp).sum(axis=1, keepdims=True)
                else:
                    D = (go * oh[b, :, h]).sum(axis=1, keepdims=True)
                ds = p * (dp - D)
                dq[b, :, h] = (ds @ kh[b, :, h]) * scale
                dk[b, :, h] = (ds.T @ qh[b, :, h]) * scale
        return dq.reshape(B, Nq, C), dk.reshape(B, Nk, C), dv.reshape(B, Nk, C)

    # shape ops
    def upsample_nearest2x(self, x):
        """Nearest-neighbour 2× up-sampling of (B, C, H, W)."""
        return x.repeat(2, axis=2).repeat(2, axis=3)

    def upsample_nearest2x_backward(self, grad, x):
        """Each input pixel was copied to a 2×2 block, so its gradient is the block's sum.
        Saved: nothing but x's shape."""
        B, C, H, W = x.shape
        return grad.reshape(B, C, H, 2, W, 2).sum(axis=(3, 5))

    def concat(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def concat_backward(self, grad, xs, axis):
        """The gradient of each input is its slice of `grad` along `axis`. Saved: only the
        inputs' shapes. Returns a list, one gradient per input."""
        ends = np.cumsum([x.shape[axis] for x in xs])[:-1]
        return np.split(grad, ends, axis=axis)

    def to_tokens(self, x):
        """(B, C, H, W) image -> (B, H·W, C) token sequence, row-major over pixels."""
        B, C, H, W = x.shape
        return np.ascontiguousarray(x.reshape(B, C, H * W).transpose(0, 2, 1))

    def to_tokens_backward(self, grad, x):
        """A permutation of the entries: its backward is the inverse permutation, to_image."""
        return self.to_image(grad, x.shape[2], x.shape[3])

    def to_image(self, x, height, width):
        """(B, H·W, C) token sequence -> (B, C, H, W) image."""
        B, N, C = x.shape
        return np.ascontiguousarray(x.transpose(0, 2, 1)).reshape(B, C, height, width)

    def to_image_backward(self, grad, x, height, width):
        """The inverse permutation of to_image: to_tokens."""
        return self.to_tokens(grad)

    def take(self, table, ids):
        """Embedding lookup: rows of `table` (V, C) at integer `ids` (B, N) -> (B, N, C)."""
        return table[np.asarray(ids)]

    def take_backward(self, grad, table, ids, frozen=False):
        """y[b, n] = table[ids[b, n]], so row r of ∂L/∂table is the sum of ∂L/∂y[b, n] over
        every (b, n) with ids[b, n] = r (a scatter-add: a token used twice gets both
        gradients), and 0 for rows never looked up. The ids are integers: no gradient.
        Saved: the ids. Returns the (V, C) table gradient (None if `frozen`)."""
        if frozen:
            return None
        dtable = np.zeros(table.shape, _compute_dtype(table))
        np.add.at(dtable, np.asarray(ids).reshape(-1), grad.reshape(-1, table.shape[1]))
        return dtable


def _compute_dtype(*arrays):
    """The float dtype an op computes in: its weights' (or inputs') dtype, at least float32.
    float32 in inference (backends store weights as float32); float64 when a test passes
    float64 throughout."""
    return np.result_type(*(a.dtype for a in arrays), np.float32)


def _attention_probs(q, k, scale, mask):
    """P = softmax(q kᵀ·scale + mask) row by row for one (batch, head): q (Nq, d), k (Nk, d)."""
    s = (q * scale) @ k.T                                                 # (Nq, Nk)
    if mask is not None:
        s += mask
    s = np.exp(s - s.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    return s


def _silu_derivative(x):
    """d/dx x·σ(x) = σ(x)·(1 + x(1 − σ(x)))."""
    s = expit(x)
    return s * (1 + x * (1 - s))


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
