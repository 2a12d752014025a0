"""tinysd.weights and tinysd.single_file against checkpoints written by the reference libraries.

The tiny_sd fixture's files are written by diffusers/transformers (folder) and by torch /
safetensors (single files, original key names); the expected arrays are the reference
models' own state dicts.
"""
import json
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
