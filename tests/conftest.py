"""Shared fixtures: the seeded random reference models of tests/reference_models.py.

    def test_something(tiny_sd):
        tiny_sd.pipe                  # diffusers StableDiffusionPipeline, float32, CPU
        tiny_sd.folder                # diffusers layout (fp32 + fp16 variant)
        tiny_sd.single_safetensors    # original single file, .safetensors
        tiny_sd.single_ckpt           # original single file, .ckpt (PyTorch zip pickle)
        tiny_sd.state_dicts["unet"]   # diffusers key -> np.ndarray (also "vae", "text_encoder")
        tiny_sd.configs["unet"]       # config dicts (also "vae", "text_encoder", "scheduler")

Built once per session (a few seconds); tests skip where torch/diffusers/transformers are
absent. In CI (`CI=true` or `TINYSD_STRICT_SKIPS=1`) any skip except the GPU-only ones fails the
run: every parity test must run on a fresh clone.
"""
import os
import sys
from pathlib import Path

if not (os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia/gpus")):
    # No GPU: the CUDA kernel tests run in numba's simulator. numba reads this once, when it is
    # first imported, so it is set here, before any test module imports numba.
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# torch's OpenMP threads must not spin on the cores between its ops and the cpu backend's kernels
# and BLAS calls in the same test; libgomp reads this once, when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_models import build_reference  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Tiny SD v1 (4-channel U-Net) in all three published layouts."""
    return build_reference(tmp_path_factory.mktemp("tiny_sd"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_sd(tmp_path_factory):
    """Tiny SD v1 inpainting model: 9-channel U-Net (latent 4 + mask 1 + masked-image latent 4)."""
    return build_reference(tmp_path_factory.mktemp("tiny_inpaint_sd"), size="tiny", inpainting=True, seed=1)


@pytest.fixture
def forbid_model_work(monkeypatch):
    """forbid_model_work(pipe): the pipeline with every piece of model work (tokenizer, text
    encoder, VAE, denoising loop) replaced by a failure, for tests that a bad argument is
    refused before any of it runs."""
    def model_work(*args, **kwargs):
        raise AssertionError("model work ran before the arguments were checked")

    def forbid(pipe):
        for part in ("tokenizer", "text_encoder", "encode", "decode", "_denoise"):
            monkeypatch.setattr(pipe, part, model_work)
        return pipe
    return forbid


# Skips that CI accepts: tests that need hardware the CI machine does not have.
ALLOWED_SKIP_REASONS = ("needs a CUDA GPU",)


def _strict_skips():
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("CI", "TINYSD_STRICT_SKIPS"))


def pytest_sessionfinish(session, exitstatus):
    """In CI, fail the run if a test skipped for any reason but a missing GPU."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not _strict_skips() or reporter is None:
        return
    unexpected = []
    for report in reporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIP_REASONS):
            unexpected.append(f"{report.nodeid}: {reason}")
    if unexpected:
        reporter.write_line(f"{len(unexpected)} unexpected skip(s) (only GPU tests may skip in CI):", red=True)
        for line in unexpected:
            reporter.write_line("  " + line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
