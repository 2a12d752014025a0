"""FLOP counting for the benchmarks: wrap a backend's GEMM-shaped ops while fn() runs."""
import numpy as np

WRAPPED = ("linear", "linear_geglu", "conv2d", "attention")


def count_flops(backend, fn):
    """(fn()'s result, FLOPs of the linear, linear_geglu, conv2d and attention calls it made on
    `backend`), counting 2 per multiply-add. A backend's linear_geglu may call its linear: that
    projection is counted once."""
    total, depth = [0], [0]
    ops = {name: getattr(backend, name) for name in WRAPPED}

    def gemm_flops(x, weight):
        return 2 * int(np.prod(x.shape[:-1])) * weight.shape[0] * weight.shape[1]

    def counted_linear(x, weight, bias=None):
        if depth[0] == 0:
            total[0] += gemm_flops(x, weight)
        return ops["linear"](x, weight, bias)

    def counted_linear_geglu(x, weight, bias=None):
        total[0] += gemm_flops(x, weight)
        depth[0] += 1
        try:
            return ops["linear_geglu"](x, weight, bias)
        finally:
            depth[0] -= 1

    def counted_conv2d(x, weight, bias=None, stride=1, padding=0):
        y = ops["conv2d"](x, weight, bias, stride, padding)
        total[0] += 2 * int(np.prod(y.shape)) * int(np.prod(weight.shape[1:]))
        return y

    def counted_attention(q, k, v, heads, causal=False):
        total[0] += 4 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]     # Q Kᵀ and P V
        return ops["attention"](q, k, v, heads, causal)

    backend.linear, backend.linear_geglu = counted_linear, counted_linear_geglu
    backend.conv2d, backend.attention = counted_conv2d, counted_attention
    try:
        return fn(), total[0]
    finally:
        for name in WRAPPED:
            delattr(backend, name)
