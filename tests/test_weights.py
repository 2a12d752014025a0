"""tinysd.weights and tinysd.single_file against checkpoints written by the reference libraries.

The tiny_sd fixture's files are written by diffusers/transformers (folder) and by torch /
safetensors (single files, original key names); the expected arrays are the reference
models' own state dicts.
"""
import collections
import io
import json
import os
import pickle
import re
import shutil
import struct
import zipfile

import numpy as np
import pytest

from tinysd import single_file
from tinysd.weights import (CheckpointError, ModelNotFoundError, load_checkpoint, read_ckpt,
                            read_safetensors, resolve)


def assert_state_dicts_equal(got, expected, dtype=None):
    for part, reference in expected.items():
        assert sorted(got[part]) == sorted(reference), part
        for key, value in reference.items():
            want = value.astype(dtype) if dtype else value
            assert got[part][key].dtype == want.dtype, key
            np.testing.assert_array_equal(got[part][key], want, err_msg=key)


def read_torch_file(path):
    torch = pytest.importorskip("torch")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, weights_only=True)["state_dict"]


# The harness itself: its original-key single file must convert back with diffusers' own code.


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_inpaint_sd"])
@pytest.mark.parametrize("kind", ["single_safetensors", "single_ckpt"])
def test_harness_single_file_matches_diffusers_converters(request, fixture, kind):
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                      convert_ldm_vae_checkpoint)
    ref = request.getfixturevalue(fixture)
    checkpoint = read_torch_file(getattr(ref, kind))
    converted = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, ref.configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(checkpoint, ref.configs["vae"]),
        "text_encoder": {k: v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()
                         if not k.endswith("position_ids")},
    }
    assert_state_dicts_equal({p: {k: v.numpy() for k, v in sd.items()} for p, sd in converted.items()},
                             ref.state_dicts)


def test_harness_randomises_every_parameter(tiny_sd):
    for part, state in tiny_sd.state_dicts.items():
        for key, value in state.items():
            assert np.unique(value).size > min(1, value.size // 2), f"{part} {key} looks constant"


# Loading the published layouts


def test_folder_fp32(tiny_sd):
    ckpt = load_checkpoint(tiny_sd.folder)
    assert_state_dicts_equal(ckpt.state_dicts, tiny_sd.state_dicts)
    assert ckpt.configs["unet"]["block_out_channels"] == list(tiny_sd.configs["unet"]["block_out_channels"])
    assert ckpt.configs["scheduler"]["_class_name"] == "PNDMScheduler"
    assert (ckpt.tokenizer_dir / "vocab.json").exists()
    assert ckpt.configs["text_encoder"].get("dtype", "float32") == "float32"   # diffusers reloads it as fp32
    weight = ckpt.state_dicts["unet"]["conv_in.weight"]
    assert not weight.flags.writeable and not weight.flags.owndata      # a view into the file's memmap


def test_folder_fp16_variant(tiny_sd):
    ckpt = load_checkpoint(tiny_sd.folder, variant="fp16")
    assert_state_dicts_equal(ckpt.state_dicts, tiny_sd.state_dicts, dtype=np.float16)


def test_folder_falls_back_to_fp16_when_only_that_is_there(tiny_sd, tmp_path):
    folder = shutil.copytree(tiny_sd.folder, tmp_path / "fp16-only")
    for part, name in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")]:
        (folder / part / f"{name}.safetensors").unlink()
    ckpt = load_checkpoint(folder)
    assert ckpt.state_dicts["unet"]["conv_in.weight"].dtype == np.float16


SIZES = {
    "unet": ["in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
             "up_block_types", "cross_attention_dim", "attention_head_dim", "use_linear_projection"],
    "vae": ["in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types"],
    "text_encoder": ["vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings",
                     "intermediate_size", "num_hidden_layers", "hidden_act"],
}


def assert_same_sizes(got, expected):
    for part, keys in SIZES.items():
        for key in keys:
            want = expected[part][key]
            assert got[part][key] == (list(want) if isinstance(want, tuple) else want), (part, key)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_inpaint_sd"])
@pytest.mark.parametrize("kind", ["single_safetensors", "single_ckpt"])
def test_single_file(request, fixture, kind):
    ref = request.getfixturevalue(fixture)
    ckpt = load_checkpoint(getattr(ref, kind))
    assert_state_dicts_equal(ckpt.state_dicts, ref.state_dicts)
    assert_same_sizes(ckpt.configs, ref.configs)          # read off the weights: 9 input channels for inpainting
    assert ckpt.tokenizer_dir is None


def test_single_file_with_explicit_config(tiny_sd):
    ckpt = load_checkpoint(tiny_sd.single_ckpt, config=tiny_sd.folder)
    assert_state_dicts_equal(ckpt.state_dicts, tiny_sd.state_dicts)
    assert ckpt.configs["unet"]["sample_size"] == tiny_sd.configs["unet"]["sample_size"]


def test_single_file_without_text_model_level(tiny_sd, tmp_path):
    from safetensors.numpy import save_file
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in tiny_sd.original.items()}
    save_file(old, str(tmp_path / "old.safetensors"))
    ckpt = load_checkpoint(tmp_path / "old.safetensors")
    assert_state_dicts_equal(ckpt.state_dicts, tiny_sd.state_dicts)


def test_single_file_sizes_of_full_sd15():
    """SD v1.5's own shapes (meta tensors, no memory) give back exactly the published configs."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from reference_models import diffusers_to_original, sd15_config, text_model_keys
    from tinysd.weights import SD15_CONFIGS, read_configs
    text_cfg = {k: v for k, v in sd15_config("text_encoder").items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(dict(sd15_config("unet"), in_channels=9)),
                  "vae": AutoencoderKL.from_config(sd15_config("vae")),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**text_cfg))}
    shapes = {part: {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in m.state_dict().items()}
              for part, m in models.items()}
    shapes["text_encoder"] = text_model_keys(shapes["text_encoder"])
    parts = single_file.split_components(diffusers_to_original(shapes), "sd15")
    configs = single_file.configs_for(parts, read_configs(SD15_CONFIGS))
    expected = read_configs(SD15_CONFIGS)
    expected["unet"]["in_channels"] = 9
    assert_same_sizes(configs, expected)


def test_single_file_clip_heads_not_inferable():
    state = {"text_model.embeddings.token_embedding.weight": np.broadcast_to(np.float32(0), (49408, 32))}
    with pytest.raises(single_file.SingleFileError, match=r"hidden size 32 is not a multiple of .* pass config="):
        single_file.text_encoder_sizes(state, "odd.safetensors")


def test_single_file_missing_vae(tiny_sd, tmp_path):
    from safetensors.numpy import save_file
    save_file({k: v for k, v in tiny_sd.original.items() if not k.startswith("first_stage_model.")},
              str(tmp_path / "no_vae.safetensors"))
    with pytest.raises(single_file.SingleFileError, match=r"no_vae.safetensors .* lacks the VAE .*'first_stage_model\.'"):
        load_checkpoint(tmp_path / "no_vae.safetensors")


def test_single_file_unknown_unet_key(tiny_sd, tmp_path):
    from safetensors.numpy import save_file
    state = dict(tiny_sd.original, **{"model.diffusion_model.input_blocks.99.0.weight": np.zeros(2, np.float32)})
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(single_file.SingleFileError, match=r"input_blocks\.99\.0\.weight"):
        load_checkpoint(tmp_path / "odd.safetensors")


# safetensors reader


@pytest.fixture
def small_safetensors(tmp_path):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((3, 5)).astype(np.float32), "h": rng.standard_normal(7).astype(np.float16),
               "i": np.arange(4, dtype=np.int64), "empty": np.zeros((0, 3), np.float32)}
    path = tmp_path / "small.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_safetensors_dtypes(small_safetensors):
    path, tensors = small_safetensors
    got = read_safetensors(path)
    assert sorted(got) == sorted(tensors)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        np.testing.assert_array_equal(got[key], value)


def test_safetensors_bf16(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"x": t}, str(tmp_path / "bf16.safetensors"))
    got = read_safetensors(tmp_path / "bf16.safetensors")["x"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, t.float().numpy())


def test_safetensors_header_cut(small_safetensors, tmp_path):
    path, _ = small_safetensors
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    (tmp_path / "cut.safetensors").write_bytes(raw[: 8 + n // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated safetensors header"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match=r"tiny.safetensors: not a safetensors file"):
        read_safetensors(tmp_path / "tiny.safetensors")


def test_safetensors_data_cut(small_safetensors, tmp_path):
    path, _ = small_safetensors
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated data section: tensor '\w+'"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_safetensors_header_not_json(tmp_path):
    header = b"{this is not json}"
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: safetensors header is not valid JSON"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_safetensors_size_mismatch(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor 'x' \(F32, shape \[4\]\) needs 16 bytes"):
        read_safetensors(tmp_path / "odd.safetensors")


# .ckpt reader


def test_ckpt_views_dtypes_and_extras(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    tensors = {"w": base, "rows": base[1:], "transposed": base.t(), "col": base[:, 2], "half": base.half(),
               "bf16": base.bfloat16(), "ids": torch.arange(5), "param": torch.nn.Parameter(base[0].clone()),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 2)}
    torch.save({"state_dict": tensors, "global_step": 7, "epoch": np.int64(3)}, tmp_path / "x.ckpt")
    got = read_ckpt(tmp_path / "x.ckpt")
    assert got["global_step"] == 7 and got["epoch"] == 3
    for key, t in tensors.items():
        want = t.detach().float().numpy() if key == "bf16" else t.detach().numpy()
        assert got["state_dict"][key].dtype == want.dtype, key
        np.testing.assert_array_equal(got["state_dict"][key], want, err_msg=key)


def test_ckpt_refuses_os_system_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()       # pickle protocol 0: os.system(...)
    with zipfile.ZipFile(tmp_path / "evil.ckpt", "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/version", "3\n")             # what torch.load needs, so only the pickle is refused
    with pytest.raises(CheckpointError, match=r"evil.ckpt: the pickle references the global os\.system"):
        read_ckpt(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_ckpt_refuses_pickled_module(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.ckpt")
    with pytest.raises(CheckpointError, match=r"global torch\.nn\.modules\.linear\.Linear"):
        read_ckpt(tmp_path / "module.ckpt")


def test_ckpt_not_a_zip(tmp_path):
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match=r"old.ckpt: not a PyTorch zip checkpoint"):
        read_ckpt(tmp_path / "old.ckpt")


# Model ids


def test_offline_unknown_model_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"'tinysd-test/no-such-model' is not in the Hugging Face cache"
                                                 r".*pass a local diffusers folder or a single"):
        load_checkpoint("tinysd-test/no-such-model", cache_dir=tmp_path)


def test_missing_local_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no such file or folder: .*missing.safetensors"):
        resolve(tmp_path / "missing.safetensors")


def fake_hub_cache(cache, repo_id, folder, skip=()):
    """Lay `folder` out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<hash>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit,
                    ignore=lambda d, names: [n for n in names if n in skip])
    return repo / "snapshots" / commit


def test_model_id_found_in_hub_cache_offline(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path, "tinysd-test/tiny-sd", tiny_sd.folder)
    assert resolve("tinysd-test/tiny-sd", cache_dir=tmp_path) == snapshot
    ckpt = load_checkpoint("tinysd-test/tiny-sd", cache_dir=tmp_path)
    assert_state_dicts_equal(ckpt.state_dicts, tiny_sd.state_dicts)


def test_model_id_cached_as_fp16_only(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path, "tinysd-test/tiny-sd", tiny_sd.folder,
                   skip=("diffusion_pytorch_model.safetensors", "model.safetensors"))
    ckpt = load_checkpoint("tinysd-test/tiny-sd", cache_dir=tmp_path)
    assert_state_dicts_equal(ckpt.state_dicts, tiny_sd.state_dicts, dtype=np.float16)


def test_single_file_in_hub_cache_offline(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hub_cache(tmp_path, "tinysd-test/tiny-single", tiny_sd.single_safetensors.parent,
                              skip=("diffusers",))
    path = resolve("tinysd-test/tiny-single/single.ckpt", cache_dir=tmp_path)
    assert path == snapshot / "single.ckpt"
    with pytest.raises(ModelNotFoundError, match=r"'tinysd-test/tiny-single/other.ckpt' is not in the Hugging Face cache"):
        resolve("tinysd-test/tiny-single/other.ckpt", cache_dir=tmp_path)


def test_manifest():
    from pathlib import Path
    from tinysd.weights import DEFAULT_MODEL
    manifest = json.loads((Path(__file__).resolve().parents[1] / "weights" / "manifest.json").read_text())
    ids = [c["id"] for c in manifest["checkpoints"]]
    assert manifest["default"] == DEFAULT_MODEL and DEFAULT_MODEL in ids
    for c in manifest["checkpoints"]:
        assert c["sha256"] is None or (len(c["sha256"]) == 64 and int(c["sha256"], 16) >= 0), c["id"]
        assert c["layout"] in ("diffusers", "single-file")
        assert (c["layout"] == "single-file") == c["id"].endswith((".ckpt", ".safetensors")), c["id"]


# The readers against every rule of their formats (tests/test_fuzz_readers.py mutates files at random)


def write_safetensors(path, header, data=b"", length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


NESTED = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":' + b"[" * 126 + b"]" * 126 + b"}}"
# (header, data, the rule's words in the message, whether safetensors itself refuses it too)
BAD_SAFETENSORS = {
    "length past the end": (b"{}", b"", "truncated safetensors header", True, 1000),
    "length over 100 MB": (b"{}", b"", "over the format's limit", True, 100_000_001),
    "not UTF-8": (b'{"\xff": 1}', b"", "not UTF-8", True, None),
    "not JSON": (b"{this is not json}", b"", "not valid JSON", True, None),
    "not an object": (b"[1, 2]", b"", "is a JSON list, expected an object", True, None),
    "nested too deep": (NESTED, b"\0" * 4, "nests 128 levels deep, over the limit of 127", True, None),
    "nested very deep": (b"[" * 100_000 + b"]" * 100_000, b"", "nests 100000 levels deep", True, None),
    "duplicate key": (b'{"x":' + json.dumps(entry()).encode() + b',"x":' + json.dumps(entry()).encode() + b"}",
                      b"\0" * 4, "has the key 'x' twice", False, None),
    "fractional number": ({"x": entry(shape=(1.0,))}, b"\0" * 4, "number 1.0, not an integer", True, None),
    "NaN": (b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[NaN,4]}}', b"\0" * 4, "number NaN", True, None),
    "Infinity": (b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,Infinity]}}', b"\0" * 4, "number Infinity", True, None),
    "huge number": (b'{"x":{"dtype":"F32","shape":[1e300],"data_offsets":[0,4]}}', b"\0" * 4, "1e300, not an integer", True, None),
    "huge integer": (b'{"x":{"dtype":"F32","shape":[' + b"9" * 30 + b'],"data_offsets":[0,4]}}', b"\0" * 4,
                     "larger than any offset or size", True, None),
    "metadata not strings": ({"__metadata__": {"format": 1}, "x": entry()}, b"\0" * 4, "__metadata__ must map strings", True, None),
    "lone surrogate": (b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4, "lone surrogate", True, None),
    "entry not an object": ({"x": ["F32", [1], [0, 4]]}, b"\0" * 4, "tensor 'x': its header entry is a JSON list", False, None),
    "missing field": ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "tensor 'x': its header entry has no 'data_offsets'", True, None),
    "unknown dtype": ({"x": entry(dtype="F17")}, b"\0" * 4, "tensor 'x': unknown or unsupported dtype 'F17'", True, None),
    "negative shape": ({"x": entry(shape=(-1, -4))}, b"\0" * 4, "tensor 'x': shape [-1, -4] is not a list of non-negative", True, None),
    "too many dimensions": ({"x": entry(shape=(1,) * 65)}, b"\0" * 4, "65 dimensions, over NumPy's limit of 64", True, None),
    "overflowing shape": ({"x": entry(shape=(2**62, 2**62), offsets=(0, 0))}, b"", "larger than any array can be", True, None),
    "offsets not a pair": ({"x": entry(offsets=(0, 4, 8))}, b"\0" * 4, "data_offsets [0, 4, 8] is not [begin, end]", True, None),
    "bytes do not match shape": ({"x": entry(shape=(4,), offsets=(0, 8))}, b"\0" * 8, "needs 16 bytes, its offsets [0, 8) give 8", True, None),
    "overlap": ({"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(shape=(2,), offsets=(4, 12))}, b"\0" * 12,
                "tensor 'b': its data begins at byte 4, not 8 where 'a' ends (an overlap", True, None),
    "gap": ({"a": entry(), "b": entry(offsets=(8, 12))}, b"\0" * 12, "tensor 'b': its data begins at byte 8, not 4 where 'a' ends (a gap", True, None),
    "hole at the start": ({"a": entry(offsets=(4, 8))}, b"\0" * 8, "begins at byte 4, not 0 at the data section's start", True, None),
    "bytes left over": ({"a": entry()}, b"\0" * 5, "1 bytes left over after the last tensor's data", True, None),
    "truncated data": ({"a": entry(), "b": entry(offsets=(4, 8))}, b"\0" * 6, "truncated data section: tensor 'b' needs bytes [4, 8)", True, None),
    "header 3 bytes short": (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   ', b"\0" * 4, "3 bytes left over", True, -3),
}


@pytest.mark.parametrize("case", list(BAD_SAFETENSORS))
def test_safetensors_rules(case, tmp_path):
    header, data, message, official_refuses, length = BAD_SAFETENSORS[case]
    if isinstance(length, int) and length < 0:           # the length field 3 short: 3 header bytes become data
        length, data = len(header) + length, header[length:] + data
        header = header[: length]
    path = write_safetensors(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: .*" + re.escape(message)) as error:
        read_safetensors(path)
    assert "\n" not in str(error.value)
    from safetensors.numpy import load_file
    if official_refuses:
        with pytest.raises(Exception):
            load_file(str(path))
    else:                                                 # tinysd is stricter than the reference here
        load_file(str(path))


def test_safetensors_metadata_null_unknown_fields_and_zero_size_tensors_load(tmp_path):
    header = {"__metadata__": None, "a": {**entry(), "note": "ignored, as the reference ignores it"},
              "empty": entry(shape=(0, 3), offsets=(4, 4)), "b": entry(dtype="U16", shape=(2,), offsets=(4, 8))}
    got = read_safetensors(write_safetensors(tmp_path / "ok.safetensors", header, struct.pack("<fHH", 1.5, 7, 9)))
    assert got["a"].tolist() == [1.5] and got["b"].tolist() == [7, 9] and got["empty"].shape == (0, 3)


def test_safetensors_bf16_scalar_stays_an_array(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file
    save_file({"alpha": torch.tensor(4.0).bfloat16()}, str(tmp_path / "s.safetensors"))
    alpha = read_safetensors(tmp_path / "s.safetensors")["alpha"]
    assert isinstance(alpha, np.ndarray) and alpha.shape == () and alpha.dtype == np.float32 and alpha == 4.0


def test_safetensors_reads_the_header_once_and_maps_the_data(small_safetensors, monkeypatch):
    path, tensors = small_safetensors
    reads = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if str(file) == str(path):
            real_read = handle.read
            handle.read = lambda n=-1: reads.append(n) or real_read(n)
        return handle

    import builtins
    monkeypatch.setattr(builtins, "open", counting_open)
    got = read_safetensors(path)
    assert reads and all(n >= 0 for n in reads) and sum(reads) <= 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert not got["w"].flags.owndata and not got["w"].flags.writeable       # a view of the memmap, no copy


# .ckpt: what real embedding, LoRA and checkpoint files contain loads; nothing else does


def torch_saved(tmp_path, name, obj):
    torch = pytest.importorskip("torch")
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def as_numpy(value):
    """torch.load's object with tensors, Parameters and ParameterDicts as tinysd gives them."""
    import torch
    if isinstance(value, torch.nn.ParameterDict):
        return {k: as_numpy(v) for k, v in value.items()}
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, torch.Tensor):
        t = value.detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(value, dict):
        return {k: as_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_numpy(v) for v in value)
    return value


def assert_same(got, want, where="root"):
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape, where
        np.testing.assert_array_equal(got, want, err_msg=where)
        assert not got.flags.writeable, where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want and type(got) is type(want), where


def real_files():
    import torch
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g)
    p = torch.nn.Parameter(torch.randn(3, generator=g))
    p.note = "an attribute: torch.save writes _rebuild_parameter_with_state"
    module = torch.nn.Sequential(torch.nn.Linear(4, 2))
    return {
        "a1111_embedding.pt": {"string_to_token": {"*": 265},
                               "string_to_param": {"*": torch.randn(2, 768, generator=g).requires_grad_()},
                               "name": "bad-hands", "step": 1500, "sd_checkpoint": "cc6cb27103",
                               "sd_checkpoint_name": "v1-5-pruned-emaonly"},
        "textual_inversion_parameterdict.pt": {
            "string_to_token": {"*": torch.tensor(265)}, "name": "cat-toy", "step": 3000,
            "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, 768, generator=g))})},
        "diffusers_learned_embeds.bin": {"<cat-toy>": torch.randn(768, generator=g)},
        "kohya_lora.pt": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=g).half(),
                          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4, generator=g).half(),
                          "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0).half(),
                          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 8, generator=g).bfloat16()},
        "pytorch_lora_weights.bin": {"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.randn(4, 32, generator=g),
                                     "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": torch.randn(32, 4, generator=g)},
        "lightning.ckpt": {"state_dict": module.state_dict(), "global_step": 7, "epoch": np.int64(3),
                           "views": {"t": base.t(), "column": base[:, 1], "rows": base[1:], "expanded": base[:1].expand(5, 4),
                                     "bf16_t": base.bfloat16().t(), "empty": torch.zeros(0, 2), "ids": torch.arange(5),
                                     "mask": base > 0, "bf16_scalar": torch.tensor(2.5).bfloat16(), "param": p}},
        "numpy_values.pt": {"array": np.arange(6.0).reshape(2, 3), "fortran": np.asfortranarray(np.ones((2, 3), np.float32)),
                            "scalar": np.float32(2.5), "set": {1, 2}, "size": torch.Size([2, 3]), "dtype": torch.float16,
                            "bytes": b"\x00\xff"},
    }


@pytest.mark.parametrize("name", ["a1111_embedding.pt", "textual_inversion_parameterdict.pt", "diffusers_learned_embeds.bin",
                                  "kohya_lora.pt", "pytorch_lora_weights.bin", "lightning.ckpt", "numpy_values.pt"])
def test_ckpt_real_structures_load(name, tmp_path):
    torch = pytest.importorskip("torch")
    obj = real_files()[name]
    path = torch_saved(tmp_path, name, obj)
    want = as_numpy(torch.load(path, weights_only=False))
    if name == "numpy_values.pt":
        want["dtype"] = np.dtype(np.float16)              # torch.float16 as a value: its NumPy dtype
    got = read_ckpt(path)
    assert_same(got, want)
    if name == "lightning.ckpt":                          # stored storages are views of the file's memmap
        assert not got["state_dict"]["0.weight"].flags.owndata


def write_ckpt(path, program, storages=(), top="archive"):
    """A torch.save-shaped zip: version, byteorder, the pickle program, raw storage bytes."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/data.pkl", program)
        z.writestr(f"{top}/byteorder", "little")
        for key, data in storages:
            z.writestr(f"{top}/data/{key}", data)
        z.writestr(f"{top}/version", "3\n")
    return path


class Storage:
    """Pickled as torch.save pickles a storage: a persistent id ("storage", type, key, location, numel)."""

    def __init__(self, key="0", numel=4, kind="FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class Call:
    """Pickled as func(*args)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        import torch
        return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel) if isinstance(obj, Storage) else None


def program(obj):
    """A pickle program as torch.save writes it (protocol 2, storages as persistent ids)."""
    buffer = io.BytesIO()
    TorchPickler(buffer, protocol=2, fix_imports=False).dump(obj)
    return buffer.getvalue()


def tensor(offset, size, stride, storage=None):
    torch = pytest.importorskip("torch")
    return Call(torch._utils._rebuild_tensor_v2, storage or Storage(), offset, tuple(size), tuple(stride), False,
                collections.OrderedDict())


def tensor_program(offset, size, stride):
    return program({"w": tensor(offset, size, stride)})


BAD_TENSORS = {   # (offset, size, stride) against a storage of 4 float32 -> the rule in the message
    "negative stride (the SIGSEGV of issue 13)": ((3,), (4,), (-1,), "offset, sizes and strides must be ≥ 0"),
    "negative offset": ((-1,), (2,), (1,), "offset, sizes and strides must be ≥ 0"),
    "negative size": ((0,), (-2, 2), (2, 1), "offset, sizes and strides must be ≥ 0"),
    "offset past the end": ((4,), (1,), (1,), "reaches element 4 of a storage of 4 elements"),
    "stride past the end": ((0,), (2,), (4,), "reaches element 4"),
    "size past the end": ((0,), (2, 3), (3, 1), "reaches element 5"),
    "overflowing product": ((0,), (2**40, 2**40), (0, 0), "larger than any array can be"),
    "beyond 64 bits": ((0,), (1,), (2**64,), "fit in 64 bits"),
    "one stride per dimension": ((0,), (2, 2), (1,), "needs one stride per dimension"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_ckpt_tensor_bounds_are_checked_before_any_view(case, tmp_path):
    (offset,), size, stride, message = BAD_TENSORS[case]
    path = write_ckpt(tmp_path / "bad.ckpt", tensor_program(offset, size, stride), [("0", b"\0" * 16)])
    with pytest.raises(CheckpointError, match=r"bad\.ckpt: tensor of size .*" + re.escape(message)):
        read_ckpt(path)


def test_ckpt_strided_views_within_bounds_read_as_torch_does(tmp_path):
    torch = pytest.importorskip("torch")
    data = np.arange(4, dtype=np.float32)
    for offset, size, stride in [(0, (2, 2), (1, 2)), (1, (3,), (1,)), (0, (4, 3), (1, 0)), (3, (1, 1), (7, 9)), (9, (0, 5), (1, 1))]:
        path = write_ckpt(tmp_path / "ok.ckpt", tensor_program(offset, size, stride), [("0", data.tobytes())])
        want = torch.load(path, weights_only=True)["w"].numpy()
        got = read_ckpt(path)["w"]
        assert got.shape == want.shape and not got.flags.writeable
        np.testing.assert_array_equal(got, want)


def evil_programs():
    """A pickle program -> the global (or rule) the error names."""
    import torch
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    self_list = []
    self_list.append(self_list)
    return {
        "builtins.eval": (program(Call(eval, "1+1")), "the global builtins.eval"),
        "builtins.getattr": (program(Call(getattr, 1, "real")), "the global builtins.getattr"),
        "os.system": (program(Call(os.system, "true")), f"the global {os.system.__module__}.system"),
        "torch module": (program(torch.nn.Linear(2, 2)), "the global torch.nn.modules.linear.Linear"),
        "numpy frombuffer": (program(Call(np.frombuffer, b"x")), "the global numpy.frombuffer"),
        "_reconstruct of another type": (program(Call(multiarray._reconstruct, collections.OrderedDict, (0,), b"b")),
                                         "only _reconstruct(numpy.ndarray, (0,), b'b') is allowed"),
        "object dtype": (program(Call(np.dtype, "O8", False, True)), "only plain numeric dtypes are allowed"),
        "calling a class marker": (b"\x80\x02cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)R.",
                                   "tries to call pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        "BUILD on a tensor": (program(tensor(0, (4,), (1,)))[:-1] + b"}b.", "sets the state of a ndarray"),
        "a cycle": (program(self_list), "contain themselves"),
        "protocol 4 opcode": (b"\x80\x04\x95\x01\x00\x00\x00\x00\x00\x00\x00N.", "opcode b'\\x95'"),
        "no STOP": (b"\x80\x02N", "ends without its STOP"),
        "tuple without a mark": (b"\x80\x02t.", "closes a MARK it never opened"),
        "int tensor requiring grad": (program(Call(torch._utils._rebuild_tensor_v2, Storage(kind="LongStorage"), 0, (4,), (1,),
                                                   True, collections.OrderedDict())), "cannot require gradients"),
    }


@pytest.mark.parametrize("case", ["builtins.eval", "builtins.getattr", "os.system", "torch module", "numpy frombuffer",
                                  "_reconstruct of another type", "object dtype", "calling a class marker",
                                  "BUILD on a tensor", "a cycle", "protocol 4 opcode", "no STOP", "tuple without a mark",
                                  "int tensor requiring grad"])
def test_ckpt_refuses_anything_else_naming_it(case, tmp_path):
    pytest.importorskip("torch")
    code, message = evil_programs()[case]
    path = write_ckpt(tmp_path / "evil.ckpt", code, [("0", b"\0" * (32 if case == "int tensor requiring grad" else 16))])
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: .*" + re.escape(message)):
        read_ckpt(path)


def test_ckpt_zip_rules(tmp_path):
    torch = pytest.importorskip("torch")
    good = torch_saved(tmp_path, "good.ckpt", {"w": torch.ones(4)})
    with zipfile.ZipFile(good) as z:
        members = {n: z.read(n) for n in z.namelist()}

    def variant(name, change):
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            for member, data in members.items():
                result = change(member, data)
                if result is not None:
                    z.writestr(*(result if isinstance(result, tuple) else (member, result)))
        return path

    cases = {
        "no version record": (variant("a.ckpt", lambda n, d: None if n.endswith("/version") else d), "no <top>/version record"),
        "version 11": (variant("b.ckpt", lambda n, d: b"11\n" if n.endswith("/version") else d), "format version b'11'"),
        "big-endian": (variant("c.ckpt", lambda n, d: b"big" if n.endswith("/byteorder") else d), "not little-endian"),
        "storage too long": (variant("d.ckpt", lambda n, d: d + b"\0" * 4 if n.endswith("/data/0") else d),
                             "has 20 bytes, the pickle says 4 × float32 = 16"),
        "storage missing": (variant("e.ckpt", lambda n, d: None if n.endswith("/data/0") else d), "is missing from the archive"),
        "outside the folder": (variant("f.ckpt", lambda n, d: ("elsewhere/x", d) if n.endswith("/byteorder") else d),
                               "is not in the archive's folder"),
        "no data.pkl": (variant("g.ckpt", lambda n, d: None if n.endswith("data.pkl") else d), "no <top>/data.pkl"),
    }
    for case, (path, message) in cases.items():
        with pytest.raises(CheckpointError, match=re.escape(message)):
            read_ckpt(path)
    raw = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for name in ("cut.ckpt", "empty.ckpt"):
        with pytest.raises(CheckpointError, match=re.escape(name)):
            read_ckpt(tmp_path / name)


def test_ckpt_deflated_members_still_load(tmp_path):
    torch = pytest.importorskip("torch")
    good = torch_saved(tmp_path, "good.ckpt", {"w": torch.arange(6.0).reshape(2, 3)})
    with zipfile.ZipFile(good) as z, zipfile.ZipFile(tmp_path / "deflated.ckpt", "w", zipfile.ZIP_DEFLATED) as out:
        for name in z.namelist():
            out.writestr(name, z.read(name))
    np.testing.assert_array_equal(read_ckpt(tmp_path / "deflated.ckpt")["w"], np.arange(6.0, dtype=np.float32).reshape(2, 3))


def test_bad_config_json_names_the_file(tiny_sd, tmp_path):
    folder = shutil.copytree(tiny_sd.folder, tmp_path / "model")
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"unet/config\.json: cannot read it as JSON"):
        load_checkpoint(folder)


def test_unreadable_files_say_so(tmp_path):
    (tmp_path / "folder.ckpt").mkdir()
    (tmp_path / "folder.safetensors").mkdir()
    for name in ("folder.ckpt", "folder.safetensors"):
        with pytest.raises(CheckpointError, match=re.escape(name) + r": cannot read the file \(.*Is a directory"):
            (read_ckpt if name.endswith(".ckpt") else read_safetensors)(tmp_path / name)
