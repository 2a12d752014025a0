"""Group norm (with SiLU fused) and layer norm. NumPy twins: `NumpyBackend.group_norm`,
`NumpyBackend.layer_norm`.

One pass collects Σx and Σx² in float64 (var = E[x²] − μ², safe in float64 for float32 data),
a second writes y = (x − μ)·rstd·γ + β, with SiLU applied in the same loop. Each kernel runs
tasks start … stop − 1 (groups, rows); `kernels/threads.py` spreads them over the cores.
"""
import numpy as np
from numba import njit

from tinysd.kernels.elementwise import silu

F32 = np.float32


@njit(inline="always")
def _mean_rstd(row, eps):
    """μ and 1/√(σ² + eps) of a 1-D float32 array, accumulated in float64."""
    s1 = 0.0
    s2 = 0.0
    for v in row:
        v = np.float64(v)
        s1 += v
        s2 += v * v
    mean = s1 / row.size
    var = max(s2 / row.size - mean * mean, 0.0)
    return mean, 1.0 / np.sqrt(var + eps)


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def group_norm_kernel(x, weight, bias, eps, apply_silu, out, start, stop):
    """x, out (B, G, C/G, S) with S spatial positions; weight, bias (C,). Task bg = b·G + g is
    one group of one image; tasks start … stop − 1."""
    B, G, Cg, S = x.shape
    for bg in range(start, stop):
        b, g = bg // G, bg % G
        mean, rstd = _mean_rstd(x[b, g].reshape(Cg * S), eps)
        for c in range(Cg):
            scale = F32(rstd * weight[g * Cg + c])                 # y = x·scale + shift
            shift = F32(bias[g * Cg + c] - mean * rstd * weight[g * Cg + c])
            if apply_silu:
                for s in range(S):
                    out[b, g, c, s] = silu(x[b, g, c, s] * scale + shift)
            else:
                for s in range(S):
                    out[b, g, c, s] = x[b, g, c, s] * scale + shift


@njit(nogil=True, error_model="numpy", fastmath={"reassoc", "contract"}, cache=True)
def layer_norm_kernel(x, weight, bias, eps, out, start, stop):
    """x, out (M, C); normalise each of the rows start … stop − 1 over C."""
    C = x.shape[1]
    for m in range(start, stop):
        mean, rstd = _mean_rstd(x[m], eps)
        for c in range(C):
            out[m, c] = F32((x[m, c] - mean) * rstd) * weight[c] + bias[c]
