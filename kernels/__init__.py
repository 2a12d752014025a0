"""Hot paths for the `cpu` (Numba) and `cuda` (numba.cuda) backends, imported as `tinysd.kernels`.

Each kernel sits beside the plain NumPy function it must equal (see `tinysd.backend`).
Importing this package registers the backends that can run here.
"""
# Run from the repository root (`python -m pytest`), this folder is also importable as a
# top-level `kernels`, and transformers/diffusers import that name when they look for the PyPI
# package `kernels`. Under that name it does nothing: it is not that package.
if __name__ == "tinysd.kernels":
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
