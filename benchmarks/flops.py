"""FLOP counting for the benchmarks: wrap a backend's GEMM-shaped ops while fn() runs."""
import numpy as np

WRAPPED = ("linear", "linear_geglu", "conv2d", "attention")


def op_flops(name, args, out):
    """FLOPs (2 per multiply-add) of one call of a backend op with positional `args` and result
    `out`; 0 for the ops that are not GEMM-shaped."""
    if name in ("linear", "linear_geglu"):
        x, weight = args[0], args[1]
        return 2 * int(np.prod(x.shape[:-1])) * weight.shape[0] * weight.shape[1]
    if name == "conv2d":
        return 2 * int(np.prod(out.shape)) * int(np.prod(args[1].shape[1:]))
    if name == "attention":
        q, k = args[0], args[1]
        return 4 * q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]     # Q Kᵀ and P V
    return 0


def count_flops(backend, fn):
    """(fn()'s result, FLOPs of the linear, linear_geglu, conv2d and attention calls it made on
    `backend`). A backend's linear_geglu may call its linear: that projection is counted once."""
    total, depth = [0], [0]
    ops = {name: getattr(backend, name) for name in WRAPPED}

    def counted(name):
        def call(*args, **kwargs):
            depth[0] += 1
            try:
                out = ops[name](*args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                total[0] += op_flops(name, args, out)
            return out
        return call

    for name in WRAPPED:
        setattr(backend, name, counted(name))
    try:
        return fn(), total[0]
    finally:
        for name in WRAPPED:
            delattr(backend, name)
