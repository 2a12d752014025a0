"""Textual inversion (tinysd.embeddings) against diffusers' `load_textual_inversion`, on the tiny
seeded model, with embedding files written here by torch / safetensors in the layouts found in
the wild: A1111 .pt (string_to_param as a dict or a torch.nn.ParameterDict), EasyNegative-style
.safetensors ("emb_params"), diffusers learned_embeds.bin / .safetensors (and their folder).
"""
import copy
import hashlib
import mmap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import tinysd  # noqa: E402
from tinysd.embeddings import load_dir  # noqa: E402
from torch_util import assert_close  # noqa: E402

WIDTH = 128          # the tiny text encoder's hidden size
SIZE, STEPS, SEED = 64, 4, 1234


def vectors(n, seed, width=WIDTH):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


# Writers, one per layout. Each returns (path to give the loaders, {what diffusers can load instead}).
def a1111_pt(folder, name, vec, parameter_dict=False, stored_name=True):
    """As A1111's Embedding.save: torch.save of string_to_token/string_to_param/name/step/...;
    string_to_param is a ParameterDict in files trained with older A1111 versions."""
    params = {"*": torch.nn.Parameter(vec)}
    data = {"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict(params) if parameter_dict else params,
            "name": name if stored_name else None, "step": 1500, "sd_checkpoint": "cc6cb27103",
            "sd_checkpoint_name": "v1-5-pruned-emaonly"}
    path = folder / f"{name}-file.pt"
    torch.save(data, path)
    return path


def emb_params(folder, name, vec):
    path = folder / f"{name}.safetensors"
    safetensors_torch.save_file({"emb_params": vec.contiguous()}, str(path))
    return path


def learned_embeds_bin(folder, token, vec):
    """sd-concepts-library's learned_embeds.bin: {token: (768,)} for one vector."""
    (folder / token.strip("<>")).mkdir()
    path = folder / token.strip("<>") / "learned_embeds.bin"
    torch.save({token: vec[0].clone() if len(vec) == 1 else vec.clone()}, path)
    return path


def learned_embeds_safetensors(folder, token, vec):
    """diffusers' textual_inversion.py training script: {token: (n, 768)} in learned_embeds.safetensors."""
    (folder / token.strip("<>")).mkdir()
    path = folder / token.strip("<>") / "learned_embeds.safetensors"
    safetensors_torch.save_file({token: vec.contiguous()}, str(path))
    return path


FORMATS = {   # label: (writer, token the file stores, vectors, token to pass)
    "a1111 .pt": (a1111_pt, "mything", 2, None),
    "a1111 .pt, ParameterDict": (lambda f, t, v: a1111_pt(f, t, v, parameter_dict=True), "olderthing", 3, None),
    "emb_params .safetensors": (emb_params, "easyneg", 4, "easyneg"),
    "learned_embeds.bin": (learned_embeds_bin, "<cat-toy>", 1, None),
    "learned_embeds.safetensors": (learned_embeds_safetensors, "<my-style>", 2, None),
    "diffusers folder": (lambda f, t, v: learned_embeds_safetensors(f, t, v).parent, "<a-folder>", 2, None),
}


@pytest.fixture
def pair(tiny_sd):
    """A fresh tinysd pipeline and diffusers pipeline (copies of the shared text encoder and tokenizer)."""
    ours = tinysd.load(tiny_sd.folder, backend="numpy")
    saved = diffusers.PNDMScheduler.from_pretrained(tiny_sd.folder, subfolder="scheduler").config
    ref = diffusers.StableDiffusionPipeline(**dict(
        tiny_sd.pipe.components, text_encoder=copy.deepcopy(tiny_sd.text_encoder),
        tokenizer=copy.deepcopy(tiny_sd.tokenizer), scheduler=diffusers.EulerDiscreteScheduler.from_config(saved)))
    ref.set_progress_bar_config(disable=True)
    return ours, ref


def reference_load(ref, path, vec, token, label):
    if "ParameterDict" in label:
        # diffusers' loader reads .pt with torch.load(weights_only=True), which refuses ParameterDict:
        # it gets the same vectors as the A1111 state dict it reads for plain-dict files
        ref.load_textual_inversion({"string_to_param": {"*": vec}, "name": token}, token=token)
    else:
        ref.load_textual_inversion(str(path), token=token)


def reference_encode(ref, prompt, negative):
    with torch.no_grad():
        cond, uncond = ref.encode_prompt(prompt, "cpu", 1, True, negative)
    return torch.cat([uncond, cond]).numpy()


@pytest.mark.parametrize("label", list(FORMATS))
def test_formats_match_diffusers(label, pair, tmp_path):
    ours, ref = pair
    writer, token, n, given = FORMATS[label]
    vec = vectors(n, seed=len(label))
    path = writer(tmp_path, token, vec)
    ti = ours.load_textual_inversion(path, token=given)
    reference_load(ref, path, vec, given or token, label)
    assert ti.token == token and ti.tokens == [token] + [f"{token}_{i}" for i in range(1, n)]
    assert ti.ids == ref.tokenizer.convert_tokens_to_ids(ti.tokens) == list(range(49408, 49408 + n))
    prompt, negative = f"a photo of {token} on a table", f"{token}, blurry"
    assert_close(ours.encode_prompt(prompt, negative), reference_encode(ref, prompt, negative), rtol=1e-4, name=label)


def test_multi_vector_embedding_end_to_end_matches_diffusers(pair, tmp_path):
    ours, ref = pair
    vec = vectors(3, seed=11)
    path = a1111_pt(tmp_path, "mything", vec)
    ours.load_textual_inversion(path)
    ref.load_textual_inversion(str(path))
    kwargs = dict(prompt="a mything in the garden", negative_prompt="mything, blurry", num_inference_steps=STEPS,
                  height=SIZE, width=SIZE, output_type="latent")
    out = ours(seed=SEED, scheduler="euler", **kwargs)
    with torch.no_grad():
        ref_latents = ref(generator=torch.Generator("cpu").manual_seed(SEED), **kwargs).images
        ref_image = (ref.vae.decode(ref_latents / ref.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert_close(out.images, ref_latents.numpy(), rtol=1e-3, name="final latents")
    mad = float(np.abs(ours.decode(out.images) - ref_image.permute(0, 2, 3, 1).numpy()).mean())
    assert mad <= 0.5 / 255, f"final image mean abs difference {mad * 255:.3f}/255 > 0.5/255"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert out.parameters["TI hashes"] == f"mything: {sha[:12]}"      # A1111's field: name and short sha256


def test_default_and_given_tokens(pair, tmp_path):
    ours, _ = pair
    assert ours.load_textual_inversion(a1111_pt(tmp_path, "stored", vectors(1, 0))).token == "stored"
    nameless = a1111_pt(tmp_path, "nameless", vectors(1, 1), stored_name=False)
    assert ours.load_textual_inversion(nameless).token == "nameless-file"        # the file's name
    assert ours.load_textual_inversion(emb_params(tmp_path, "EasyThing", vectors(2, 2))).token == "EasyThing"
    given = ours.load_textual_inversion(learned_embeds_bin(tmp_path, "<stored>", vectors(1, 3)), token="<given>")
    assert given.token == "<given>" and list(ours.textual_inversions) == ["stored", "nameless-file", "EasyThing", "<given>"]


def is_memory_mapped(a):
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def test_the_loaded_token_rows_stay_as_they_are(pair, tmp_path):
    """The checkpoint's token table is not copied or changed: the new rows sit beside it."""
    ours, _ = pair
    table = ours.text_encoder.text_model.embeddings.token_embedding.weight
    before = np.array(table)
    ours.load_textual_inversion(emb_params(tmp_path, "easyneg", vectors(8, 4)))
    after = ours.text_encoder.text_model.embeddings.token_embedding
    assert after.weight is table and is_memory_mapped(table) and np.array_equal(table, before)
    assert ours.text_encoder.num_tokens == 49408 + 8 == len(ours.tokenizer)


def torch_pickle_with(tmp_path, obj, name="evil.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


class Shell:
    def __reduce__(self):
        import os
        return os.system, ("echo owned",)


BAD_FILES = {
    "SD 2.x width": (lambda d: emb_params(d, "wide", vectors(2, 0, width=1024)),
                     "the embedding's vectors are 1024 wide (an SD 2.x embedding?); this model's text encoder takes 128"),
    "token in the vocabulary": (lambda d: emb_params(d, "cat", vectors(1, 0)), "'cat' is already in the tokenizer's vocabulary"),
    "loaded already": (lambda d: emb_params(d, "loaded", vectors(1, 0)), "'loaded' is already in the tokenizer's vocabulary"),
    "a vector's token taken": (lambda d: emb_params(d, "loaded_1", vectors(1, 0)), "'loaded_1' is already"),
    "truncated safetensors": (lambda d: _truncate(emb_params(d, "cut", vectors(2, 0))), "truncated"),
    "not a pickle": (lambda d: _write(d / "junk.pt", b"\x00garbage" * 9), "not a PyTorch zip checkpoint"),
    "a LoRA": (lambda d: _lora(d), "holds 2 entries"),
    "SD-XL embedding": (lambda d: _sdxl(d), "is an SD-XL embedding"),
    "two terms": (lambda d: torch_pickle_with(d, {"string_to_param": {"*": vectors(1, 0), "x": vectors(1, 1)}}, "two.pt"),
                  "string_to_param must hold exactly one embedding"),
    "code in the pickle": (lambda d: torch_pickle_with(d, {"string_to_param": {"*": Shell()}}), "not on the allow-list"),
    "not finite": (lambda d: emb_params(d, "nan", torch.full((1, WIDTH), float("nan"))), "non-finite"),
    "integer tensor": (lambda d: _write_st(d / "ints.safetensors", {"emb_params": torch.ones(1, WIDTH, dtype=torch.int32)}),
                       "must be float vectors"),
    "missing": (lambda d: d / "absent.pt", "not found"),
}


def _write(path, data):
    path.write_bytes(data)
    return path


def _write_st(path, tensors):
    safetensors_torch.save_file(tensors, str(path))
    return path


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _lora(folder):
    return _write_st(folder / "lora.safetensors", {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(4, 128),
                                                     "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(256, 4)})


def _sdxl(folder):
    return _write_st(folder / "xl.safetensors", {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)})


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_name_the_file_and_change_nothing(case, pair, tmp_path):
    ours, _ = pair
    ours.load_textual_inversion(emb_params(tmp_path, "loaded", vectors(2, 9)))    # tokens loaded, loaded_1
    state = (len(ours.tokenizer), ours.text_encoder.num_tokens, dict(ours.textual_inversions))
    writer, message = BAD_FILES[case]
    path = writer(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        ours.load_textual_inversion(path)
    assert str(path) in str(error.value) and message in str(error.value), str(error.value)
    assert (len(ours.tokenizer), ours.text_encoder.num_tokens, dict(ours.textual_inversions)) == state
    assert ours.tokenizer.encode("loaded loaded_1 cat") == [49408, 49409, 2368]


def test_a_token_that_reads_as_a_loaded_one_is_refused(pair, tmp_path):
    ours, _ = pair
    ours.load_textual_inversion(emb_params(tmp_path, "mystyle", vectors(1, 0)))
    with pytest.raises(ValueError, match="reads as 'mystyle' once normalized"):
        ours.load_textual_inversion(emb_params(tmp_path, "MyStyle", vectors(1, 1)))


def test_load_dir_loads_every_embedding_by_file_name_and_skips_bad_ones(pair, tmp_path):
    ours, _ = pair
    (tmp_path / "sub").mkdir()
    a1111_pt(tmp_path, "stored-name", vectors(2, 0))                 # file stem: stored-name-file
    emb_params(tmp_path / "sub", "easyneg", vectors(3, 1))
    emb_params(tmp_path, "wide", vectors(1, 2, width=768))
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "empty.pt").write_bytes(b"")
    warnings = []
    loaded = load_dir(ours, tmp_path, warn=warnings.append)
    assert [ti.token for ti in loaded] == ["stored-name-file", "easyneg"]
    assert len(warnings) == 1 and "wide.safetensors" in warnings[0] and "768 wide" in warnings[0]
