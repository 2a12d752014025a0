"""Hot paths for the `cpu` (Numba) and `cuda` (numba.cuda) backends, imported as `tinysd.kernels`.

Each kernel sits beside the plain NumPy function it must equal (see `tinysd.backend`).
"""
