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


@pytest.mark.parametrize("clip_skip", [0, 1, 2])
def test_clip_skip_is_the_hidden_state_before_the_last_layers(clip_skip):
    """clip_skip=N: hidden_states[-(N+1)] through the final layer norm (diffusers' definition)."""
    ref, ours = reference_and_ours(SMALL, seed=1)
    ids = np.array([[49406, 320, 2368, 49407] + [49407] * 73])
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
        expected = to_numpy(ref.final_layer_norm(out.hidden_states[-(clip_skip + 1)]))
    assert_close(ours(ids, clip_skip=clip_skip), expected, rtol=1e-4)
    def skipped(x):
        raise AssertionError("a skipped layer ran")
    ours.text_model.encoder.layers[2 - clip_skip:] = [skipped] * clip_skip    # they are not run at all
    assert_close(ours(ids, clip_skip=clip_skip), expected, rtol=1e-4)


def test_added_token_rows_equal_a_resized_table():
    """Rows appended by textual inversion read as transformers' table resized to hold them."""
    ref, ours = reference_and_ours(SMALL, seed=2)
    rows = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    assert ours.add_tokens(rows) == [49408, 49409, 49410] and ours.num_tokens == 49411
    ref.resize_token_embeddings(49411)
    with torch.no_grad():
        ref.get_input_embeddings().weight[49408:] = torch.from_numpy(rows)
        ids = np.array([[49406, 49409, 320, 49408, 49410, 49407]])
        expected = to_numpy(ref(torch.from_numpy(ids)).last_hidden_state)
    assert_close(ours(ids), expected, rtol=1e-4)
    for bad, message in [(dict(clip_skip=3), "clip_skip must be an integer from 0 to 2"),
                         (dict(clip_skip=-1), "clip_skip"), (dict(ids=[[49411]]), r"token ids must be in \[0, 49411\)")]:
        with pytest.raises(ValueError, match=message):
            ours(bad.pop("ids", ids), **bad)
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        ours.add_tokens(np.zeros((2, 768)))
