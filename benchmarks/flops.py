"""FLOP counting for the benchmarks: wrap a backend's GEMM-shaped ops while fn() runs."""
import numpy as np


def count_flops(backend, fn):
    """(fn()'s result, FLOPs of the linear, conv2d and attention calls it made on `backend`),
    counting 2 per multiply-add."""
    total = [0]
    linear, conv2d, attention = backend.linear, backend.conv2d, backend.attention

    def counted_linear(x, weight, bias=None):
        total[0] += 2 * int(np.prod(x.shape[:-1])) * weight.shape[0] * weight.shape[1]
        return linear(x, weight, bias)

    def counted_conv2d(x, weight, bias=None, stride=1, padding=0):
        y = conv2d(x, weight, bias, stride, padding)
        total[0] += 2 * int(np.prod(y.shape)) * int(np.prod(weight.shape[1:]))
        return y

    def counted_attention(q, k, v, heads, causal=False):
        total[0] += 4 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]     # Q Kᵀ and P V
        return attention(q, k, v, heads, causal)

    backend.linear, backend.conv2d, backend.attention = counted_linear, counted_conv2d, counted_attention
    try:
        return fn(), total[0]
    finally:
        del backend.linear, backend.conv2d, backend.attention
