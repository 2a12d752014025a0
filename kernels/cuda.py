"""The `cuda` backend: NumpyBackend's ops as numba.cuda kernels, activations kept on the GPU.

    sd = tinysd.load(..., backend="cuda")

`asarray` uploads (weights once), every op returns a `DeviceArray` that stays on the device, and
`numpy` downloads (the final latent or image). The kernels are in `cuda_kernels.py`, each the twin
of the `NumpyBackend` method of the same name, and run for real on an NVIDIA GPU or, slowly, in
numba's CUDA simulator (`NUMBA_ENABLE_CUDASIM=1`), which is how they are tested without a GPU.

This module imports without numba.cuda: the CUDA machinery loads when a `CudaBackend` is made.
"""
from __future__ import annotations

import numpy as np

from tinysd.backend import NumpyBackend, conv_output_size

_NO_GPU = ("--backend cuda needs an NVIDIA GPU with CUDA; none was found ({why}). "
           "Use --backend cpu, or set NUMBA_ENABLE_CUDASIM=1 to run the CUDA kernels in numba's "
           "(very slow) simulator.")


def _load_cuda():
    """Import numba.cuda and the kernels, or raise RuntimeError saying why the GPU is unusable."""
    from numba.core import config
    config.reload_config()          # honour NUMBA_ENABLE_CUDASIM set after `import numba`
    try:
        from numba import cuda
    except Exception as e:          # a broken CUDA toolkit install
        raise RuntimeError(_NO_GPU.format(why=f"importing numba.cuda failed: {e}")) from e
    if not cuda.is_available():
        raise RuntimeError(_NO_GPU.format(why="numba.cuda.is_available() is False: no driver or device"))
    from tinysd.kernels import cuda_kernels
    return cuda, cuda_kernels


class DeviceArray:
    """A float32 array in GPU memory: a C-contiguous numba device array with the little the model
    code uses on activations: `.shape`, `.reshape`, and `+ − * /` by scalars or by arrays that
    broadcast NumPy-style (up to 4 axes), e.g. (B, C, H, W) + (B, C, 1, 1).

    It refuses silent conversion to NumPy: download with `backend.numpy(x)`.
    """
    __array_ufunc__ = None          # ndarray ∘ DeviceArray defers to our reflected operators

    def __init__(self, data, backend):
        self.data = data            # numba DeviceNDArray (or the simulator's), C-contiguous float32
        self.backend = backend

    shape = property(lambda self: tuple(self.data.shape))
    ndim = property(lambda self: len(self.data.shape))
    size = property(lambda self: int(np.prod(self.data.shape)))
    dtype = np.dtype(np.float32)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = _resolve_shape(shape, self.size)
        return DeviceArray(self.data.reshape(shape), self.backend)

    def __getitem__(self, key):
        """A contiguous copy of a slice of a 4-D array, e.g. the crop x[:, :, :h, :w] of an
        up-sampled odd-sized U-Net level."""
        return self.backend._contiguous(self.data[key])

    def __array__(self, *args, **kwargs):
        raise TypeError("a DeviceArray lives on the GPU: download it with backend.numpy(x)")

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, float32)"

    def _op(self, op, other, reverse=False):
        return self.backend._binary(op, self, other, reverse)

    def __add__(self, other):
        return self._op("add", other)

    def __radd__(self, other):
        return self._op("add", other, reverse=True)

    def __sub__(self, other):
        return self._op("sub", other)

    def __rsub__(self, other):
        return self._op("sub", other, reverse=True)

    def __mul__(self, other):
        return self._op("mul", other)

    def __rmul__(self, other):
        return self._op("mul", other, reverse=True)

    def __truediv__(self, other):
        return self._op("div", other)

    def __neg__(self):
        return self._op("mul", -1.0)


def _resolve_shape(shape, size):
    """(2, -1, 4) with size 24 -> (2, 3, 4); a clear error if the sizes disagree."""
    shape = tuple(int(s) for s in shape)
    known = int(np.prod([s for s in shape if s != -1]))
    if shape.count(-1) == 1 and known and size % known == 0:
        shape = tuple(size // known if s == -1 else s for s in shape)
    if int(np.prod(shape)) != size or shape.count(-1):
        raise ValueError(f"cannot reshape a DeviceArray of {size} elements into {shape}")
    return shape


def _rows(x, ncols):
    """The device array of DeviceArray x viewed as a matrix with `ncols` columns."""
    return x.data.reshape(x.size // ncols, ncols)


def _broadcast_strides(shape, out_shape):
    """Element strides of a C-contiguous `shape` inside `out_shape` (both padded to 4 axes),
    0 along broadcast axes."""
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    strides, step = [0] * 4, 1
    for ax in range(3, -1, -1):
        strides[ax] = step if shape[ax] != 1 else 0
        step *= shape[ax]
    return tuple(strides)


class CudaBackend(NumpyBackend):
    name = "cuda"
    _OPS = {"add": 0, "sub": 1, "mul": 2, "div": 3}

    def __init__(self):
        self.cuda, self.k = _load_cuda()

    # -- moving data in and out ------------------------------------------------------------
    def asarray(self, x) -> DeviceArray:
        """Host array (any float dtype) -> DeviceArray (float32 on the GPU). Weights pass here once."""
        if isinstance(x, DeviceArray):
            return x
        return DeviceArray(self.cuda.to_device(np.ascontiguousarray(x, dtype=np.float32)), self)

    def numpy(self, x) -> np.ndarray:
        """DeviceArray -> host float32 NumPy array (NumPy arrays pass through)."""
        return x.data.copy_to_host() if isinstance(x, DeviceArray) else np.asarray(x)

    def _empty(self, shape) -> DeviceArray:
        return DeviceArray(self.cuda.device_array(tuple(int(s) for s in shape), np.float32), self)

    def _contiguous(self, view) -> DeviceArray:
        """Wrap a numba device array, copying a strided (sliced) 4-D view into a contiguous one."""
        if view.flags["C_CONTIGUOUS"]:
            return DeviceArray(view, self)
        if view.ndim != 4:
            raise ValueError(f"DeviceArray slicing copies 4-D (B, C, H, W) views only, got {view.ndim}-D")
        out = self._empty(view.shape)
        self.k.launch_1d(self.k.copy_4d_kernel, out.size, view, out.data)
        return out

    def _flat(self, x):
        return x.data.reshape(x.size)

    # -- elementwise -----------------------------------------------------------------------------
    def _binary(self, op, a, b, reverse=False):
        """a ∘ b for DeviceArray a and a scalar, a DeviceArray or a host array (uploaded)."""
        code = self._OPS[op]
        if np.isscalar(b) or (isinstance(b, np.ndarray) and b.ndim == 0):
            out = self._empty(a.shape)
            self.k.launch_1d(self.k.scalar_kernel, a.size, code, self._flat(a), np.float32(b),
                             reverse, self._flat(out))
            return out
        b = self.asarray(b)
        if reverse:
            a, b = b, a
        try:
            shape = np.broadcast_shapes(a.shape, b.shape)
        except ValueError:
            raise ValueError(f"cannot {op} DeviceArrays of shapes {a.shape} and {b.shape}") from None
        if len(shape) > 4:
            raise ValueError(f"DeviceArray {op}: broadcasting over {len(shape)} axes, at most 4 supported")
        out = self._empty(shape)
        self.k.launch_1d(self.k.binary_kernel, out.size, code, self._flat(a), self._flat(b),
                         self._flat(out), (1,) * (4 - len(shape)) + tuple(shape),
                         _broadcast_strides(a.shape, shape), _broadcast_strides(b.shape, shape))
        return out

    def _activation(self, op, x):
        x = self.asarray(x)
        out = self._empty(x.shape)
        self.k.launch_1d(self.k.activation_kernel, x.size, op, self._flat(x), self._flat(out))
        return out

    def silu(self, x):
        return self._activation(self.k.SILU, x)

    def gelu(self, x):
        return self._activation(self.k.GELU, x)

    def quick_gelu(self, x):
        return self._activation(self.k.QUICK_GELU, x)

    def geglu(self, x):
        x = self.asarray(x)
        F = x.shape[-1] // 2
        out = self._empty(x.shape[:-1] + (F,))
        self.k.launch_1d(self.k.geglu_kernel, out.size, _rows(x, 2 * F), _rows(out, F))
        return out

    # -- dense layers --------------------------------------------------------------------------
    def linear(self, x, weight, bias=None):
        x, weight = self.asarray(x), self.asarray(weight)
        N, K = weight.shape
        if x.shape[-1] != K:
            raise ValueError(f"linear: input has {x.shape[-1]} features, weight {weight.shape} expects {K}")
        out = self._empty(x.shape[:-1] + (N,))
        self.k.linear(_rows(x, K), weight.data, None if bias is None else self.asarray(bias).data,
                      _rows(out, N))
        return out

    def conv2d(self, x, weight, bias=None, stride=1, padding=0):
        x, weight = self.asarray(x), self.asarray(weight)
        B, Cin, H, W = x.shape
        Cout, _, kh, kw = weight.shape
        (pt, pb, pl, pr), Ho, Wo = conv_output_size(x.shape, weight.shape, stride, padding)
        out = self._empty((B, Cout, Ho, Wo))
        self.k.conv2d(x.data, weight.data, None if bias is None else self.asarray(bias).data,
                      stride, pt, pl, out.data)
        return out

    # -- normalisation -----------------------------------------------------------------------------
    def _norm(self, x, rows, groups, hw, weight, bias, eps, silu):
        out = self._empty(x.shape)
        self.k.norm_kernel[rows, self.k.THREADS](
            _rows(x, x.size // rows), self.asarray(weight).data, self.asarray(bias).data,
            groups, hw, np.float32(eps), silu, _rows(out, x.size // rows))
        return out

    def group_norm(self, x, num_groups, weight, bias, eps, silu=False):
        x = self.asarray(x)
        B, C = x.shape[:2]
        if C % num_groups:
            raise ValueError(f"group_norm: {C} channels do not split into {num_groups} groups")
        hw = x.size // (B * C)
        return self._norm(x, B * num_groups, num_groups, hw, weight, bias, eps, silu)

    def layer_norm(self, x, weight, bias, eps):
        x = self.asarray(x)
        return self._norm(x, x.size // x.shape[-1], 1, 1, weight, bias, eps, False)

    # -- attention -------------------------------------------------------------------------------
    def attention(self, q, k, v, heads, causal=False):
        q, k, v = self.asarray(q), self.asarray(k), self.asarray(v)
        if q.shape[-1] % heads or k.shape != v.shape or q.shape[::2] != k.shape[::2]:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit {heads} heads")
        out = self._empty(q.shape)
        self.k.attention(q.data, k.data, v.data, heads, bool(causal), out.data)
        return out

    # -- shape ops ------------------------------------------------------------------------------
    def upsample_nearest2x(self, x):
        x = self.asarray(x)
        B, C, H, W = x.shape
        out = self._empty((B, C, 2 * H, 2 * W))
        self.k.launch_1d(self.k.upsample_nearest2x_kernel, out.size, x.data.reshape(B * C, H, W),
                         out.data.reshape(B * C, 2 * H, 2 * W))
        return out

    def concat(self, xs, axis):
        xs = [self.asarray(x) for x in xs]
        ndim = xs[0].ndim
        axis = axis % ndim
        for x in xs[1:]:
            if x.ndim != ndim or x.shape[:axis] != xs[0].shape[:axis] or x.shape[axis + 1:] != xs[0].shape[axis + 1:]:
                raise ValueError(f"concat along axis {axis}: shapes {[x.shape for x in xs]} differ elsewhere")
        shape = list(xs[0].shape)
        shape[axis] = sum(x.shape[axis] for x in xs)
        out = self._empty(shape)
        outer = int(np.prod(shape[:axis]))
        dst = _rows(out, out.size // outer)
        offset = 0
        for x in xs:                 # each input is a block of columns of out viewed as (outer, inner)
            inner = x.size // outer
            self.k.launch_1d(self.k.copy_columns_kernel, x.size, x.data.reshape(outer, inner), dst, offset)
            offset += inner
        return out

    def to_tokens(self, x):
        x = self.asarray(x)
        B, C, H, W = x.shape
        out = self._empty((B, H * W, C))
        self.k.transpose(x.data.reshape(B, C, H * W), out.data)
        return out

    def to_image(self, x, height, width):
        x = self.asarray(x)
        B, N, C = x.shape
        if N != height * width:
            raise ValueError(f"to_image: {N} tokens are not a {height}×{width} image")
        out = self._empty((B, C, height, width))
        self.k.transpose(x.data, out.data.reshape(B, C, N))
        return out

    def take(self, table, ids):
        table = self.asarray(table)
        ids = np.asarray(ids)
        V, C = table.shape
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise IndexError(f"take: ids must lie in [0, {V}), got {ids.min()}..{ids.max()}")
        out = self._empty(ids.shape + (C,))
        flat_ids = self.cuda.to_device(np.ascontiguousarray(ids.reshape(-1), dtype=np.int64))
        self.k.launch_1d(self.k.take_kernel, out.size, table.data, flat_ids, _rows(out, C))
        return out


def _no_backward(op):
    def backward(self, *args, **kwargs):
        raise NotImplementedError(f"{op}: the cuda backend has no backward ops, so it cannot train; "
                                  "train on --backend cpu (or numpy), then draw on cuda with the saved file")
    backward.__name__ = backward.__qualname__ = op
    return backward


# Training: every `*_backward` of NumpyBackend (the inherited ones would meet a DeviceArray)
# raises one clear error instead, naming the op.
for _op in [name for name in vars(NumpyBackend) if name.endswith("_backward")]:
    setattr(CudaBackend, _op, _no_backward(_op))
