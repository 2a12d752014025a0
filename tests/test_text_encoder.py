"""CLIP text encoder against transformers' CLIPTextModel, on seeded random weights."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tinysd.text_encoder import CLIPTextModel  # noqa: E402
from torch_util import assert_close, randomize_, sd_v15_config, state_dict_numpy, to_numpy  # noqa: E402

SMALL = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")


def reference_and_ours(config, seed):
    torch.manual_seed(seed)
    ref = randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)), seed, scale=0.05)
    ours = CLIPTextModel(config)
    # transformers ≥ 5 names keys without the `text_model.` prefix that published files carry
    state = {("" if k.startswith("text_model.") else "text_model.") + k: v
             for k, v in state_dict_numpy(ref).items() if not k.endswith("position_ids")}
    return ref, ours.load_state_dict(state)


@pytest.mark.parametrize("config", [SMALL, "sd-v1"], ids=["small", "sd-v1"])
def test_last_hidden_state_matches_transformers(config):
    config = sd_v15_config("text_encoder") if config == "sd-v1" else config
    ref, ours = reference_and_ours(config, seed=0)
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], size=(2, 77))
    ids[:, 0], ids[0, 10:], ids[1, 40:] = 49406, 49407, 49407   # start token, padding with end
    with torch.no_grad():
        expected = to_numpy(ref(torch.from_numpy(ids)).last_hidden_state)
    assert_close(ours(ids), expected, rtol=1e-4)


def test_rejects_wrong_activation():
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        CLIPTextModel(dict(SMALL, hidden_act="gelu"))
