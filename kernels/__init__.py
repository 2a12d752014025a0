"""Hot paths for the `cpu` (Numba) and `cuda` (numba.cuda) backends, imported as `tinysd.kernels`.

Each kernel sits beside the plain NumPy function it must equal (see `tinysd.backend`).
Importing this package registers the backends that can run here.
"""
from tinysd.backend import BACKENDS

try:
    from tinysd.kernels.cpu import CpuBackend
    BACKENDS["cpu"] = CpuBackend
except ImportError:  # numba missing: the numpy backend still works
    pass

try:
    from tinysd.kernels.cuda import CudaBackend
    BACKENDS["cuda"] = CudaBackend
except ImportError:
    pass
