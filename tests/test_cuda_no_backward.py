"""The cuda backend has no backward ops: every one raises NotImplementedError naming the op and
saying to train on cpu/numpy, and the training entry points say so before any model work.
No CUDA context is made (the backend is built without __init__, which loads numba.cuda)."""
import numpy as np
import pytest

from tinysd.backend import NumpyBackend

cuda_mod = pytest.importorskip("tinysd.kernels.cuda", reason="numba missing")
from tinysd.kernels.cuda import CudaBackend  # noqa: E402
from tinysd.train import TrainConfig, check_backward, train_lora, train_textual_inversion  # noqa: E402

BACKWARD_OPS = sorted(name for name in vars(NumpyBackend) if name.endswith("_backward"))


def no_context_backend():
    return object.__new__(CudaBackend)


def test_there_are_backward_ops_to_refuse():
    assert {"linear_backward", "conv2d_backward", "attention_backward", "group_norm_backward"} <= set(BACKWARD_OPS)


@pytest.mark.parametrize("op", BACKWARD_OPS)
def test_every_backward_op_raises_naming_itself(op):
    grad = np.zeros((1, 4), np.float32)
    with pytest.raises(NotImplementedError, match=rf"^{op}: the cuda backend has no backward ops.*--backend cpu"):
        getattr(no_context_backend(), op)(grad, grad)


class FakeSD:
    """Just enough of a pipeline for the training entry points' first line."""
    class unet:
        ops = no_context_backend()


@pytest.mark.parametrize("entry", ["lora", "embedding"])
def test_training_on_cuda_fails_before_reading_the_data(entry, tmp_path):
    missing = tmp_path / "no such folder"          # would be a ValueError if the data were read first
    with pytest.raises(NotImplementedError, match="silu_backward: the cuda backend"):
        if entry == "lora":
            train_lora(FakeSD(), missing, TrainConfig(steps=1), progress=False)
        else:
            train_textual_inversion(FakeSD(), missing, "<x>", TrainConfig(steps=1), progress=False)


def test_numpy_backend_passes_the_check():
    check_backward(NumpyBackend())
