"""VAE (AutoencoderKL) blocks and whole model against diffusers, on seeded random weights."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tinysd import vae  # noqa: E402
from torch_util import assert_close, randomize_, sd_v15_config, state_dict_numpy, to_numpy  # noqa: E402

TINY_VAE = dict(sd_v15_config("vae"), block_out_channels=[32, 64, 64, 64])


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    keep = {k: v for k, v in TINY_VAE.items() if not k.startswith("_")}
    ref = randomize_(diffusers.AutoencoderKL(**keep), 0, scale=0.1)
    return ref, vae.AutoencoderKL(TINY_VAE).load_state_dict(state_dict_numpy(ref))


def test_mid_block_attention(pair):
    ref, ours = pair
    x = rand(2, 64, 4, 6)
    with torch.no_grad():
        expected = to_numpy(ref.decoder.mid_block(torch.from_numpy(x)))
    assert_close(ours.decoder.mid_block(x), expected)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 6, 10)], ids=["square", "non-square"])
def test_decode_matches_diffusers(pair, shape):
    ref, ours = pair
    z = rand(*shape)
    with torch.no_grad():
        expected = to_numpy(ref.decode(torch.from_numpy(z)).sample)
    assert_close(ours.decode(z), expected)


def test_encode_matches_diffusers(pair):
    ref, ours = pair
    x = np.tanh(rand(2, 3, 64, 48))
    noise = rand(2, 4, 8, 6, seed=1)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
    ours_dist = ours.encode(x)
    assert_close(ours_dist.mean, to_numpy(dist.mean), name="mean")
    assert_close(ours_dist.logvar, to_numpy(dist.logvar), name="logvar")
    # sampling with a given noise: mean + std · noise, as diffusers' reparameterisation
    assert_close(ours_dist.sample(noise), to_numpy(dist.mean + dist.std * torch.from_numpy(noise)), name="sample")


def test_parameter_names_match_diffusers(pair):
    ref, ours = pair
    assert sorted(k for k, _ in ours.named_parameters()) == sorted(ref.state_dict())
