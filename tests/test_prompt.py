"""AUTOMATIC1111's prompt syntax (tinysd.prompt): the parser and the chunking against outputs of
A1111's own code, and weighted, chunked conditioning end to end against diffusers given the
same rules' `prompt_embeds` computed on transformers' CLIPTextModel. Clip skip against diffusers.

tests/data/a1111_prompt_chunks.json holds A1111's `tokenize_line` output for the prompts of
the chunking tests (its "source" field says how it was written). A1111's code is not copied
here: its license (AGPL-3.0) is not tinysd's.
"""
import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tinysd.embeddings import TextualInversion
from tinysd.prompt import emphasis, parse_prompt_attention, tokenize_line
from tinysd.tokenizer import CLIPTokenizer

A1111 = json.loads((Path(__file__).parent / "data" / "a1111_prompt_chunks.json").read_text())
CASES = {case["label"]: case for case in A1111["cases"]}

# The doctest of A1111's parse_prompt_attention (modules/prompt_parser.py): its documented examples.
DOCUMENTED = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]
# More rules: the values printed by running that function (commit 28bd8e142d5f) on these prompts.
RECORDED = [
    ("((a) (b:1.5) [c]) [[d]]", [["a", 1.2100000000000002], [" ", 1.1], ["b", 1.6500000000000001], [" ", 1.1],
                                 ["c ", 1.0], ["d", 0.8264462809917354]]),
    ("(x: 1.5 )", [["x", 1.5]]),
    ("(x:-1)", [["x", -1.0]]),
    ("[x:1.5]", [["x:1.5", 0.9090909090909091]]),
    ("a) b] c", [["a) b] c", 1.0]]),
    ("a\\\\b \\ c \\d", [["a\\b  c d", 1.0]]),
    ("one BREAK two", [["one", 1.0], ["BREAK", -1], ["two", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),
    ("BREAKfast xBREAK", [["BREAKfast xBREAK", 1.0]]),
    ("a:b (c:d:1.2)", [["a:b ", 1.0], ["c:d", 1.2]]),
    ("((a:2):3)", [["a", 6.0]]),
    ("", [["", 1.0]]),
]


@pytest.mark.parametrize("text, expected", DOCUMENTED + RECORDED)
def test_parser_equals_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parser_rejects_a_weight_that_is_not_a_number():
    with pytest.raises(ValueError, match=r"the weight in ':1\.2\.3\)' is not a number"):
        parse_prompt_attention("(a:1.2.3)")


@pytest.fixture(scope="module")
def tokenizer_with_embeddings():
    """The shipped tokenizer with A1111's test embeddings added (their vectors do not matter here)."""
    tok = CLIPTokenizer()
    embeddings = {}
    for name, n in A1111["embeddings"].items():
        ti = TextualInversion(name, np.zeros((n, 1), np.float32), Path(f"{name}.pt"))
        ti.ids = tok.add_tokens(ti.tokens)
        embeddings[name] = ti
    return tok, embeddings


def a1111_ids(chunk, ids_of):
    """A recorded chunk's tokens with each embedding's placeholders (0) replaced by its token ids."""
    tokens = list(chunk["tokens"])
    for offset, name in chunk["fixes"]:
        n = A1111["embeddings"][name]
        assert tokens[offset + 1:offset + 1 + n] == [0] * n
        tokens[offset + 1:offset + 1 + n] = ids_of(name)
    return tokens


@pytest.mark.parametrize("label", list(CASES))
def test_chunks_equal_a1111(label, tokenizer_with_embeddings):
    tok, embeddings = tokenizer_with_embeddings
    case = CASES[label]
    chunks, used = tokenize_line(case["prompt"], tok, embeddings.values())
    assert [c.ids for c in chunks] == [a1111_ids(c, lambda name: embeddings[name].ids) for c in case["chunks"]]
    assert [c.weights for c in chunks] == [c["multipliers"] for c in case["chunks"]]
    assert [ti.token for ti in used] == list(dict.fromkeys(name for c in case["chunks"] for _, name in c["fixes"]))


def test_an_embedding_moved_by_the_comma_backtrack_keeps_its_vectors(tokenizer_with_embeddings):
    """60 words, a comma, then 15 tokens with an 8-vector embedding: the chunk breaks after the
    comma and the embedding moves on with its words. (A1111 leaves the embedding's vectors
    behind, in the padding of the chunk it left, and the moved positions read as token 0, "!":
    a slip of its comma backtrack that tinysd does not copy.)"""
    tok, embeddings = tokenizer_with_embeddings
    easy = embeddings["easynegative"]
    chunks, used = tokenize_line("cat " * 60 + ", dog easynegative " + "dog " * 6, tok, embeddings.values())
    dog, pad = tok.encode("dog")[0], tok.eos_token_id
    assert len(chunks) == 2 and chunks[0].ids[62:] == [pad] * 15
    assert chunks[1].ids[1:17] == [dog, *easy.ids, *[dog] * 6, pad] and used == [easy]


def test_emphasis_weights_tokens_and_keeps_the_mean():
    z = np.random.default_rng(0).normal(1.0, 1.0, (77, 16)).astype(np.float32)
    w = np.ones(77)
    w[5:9] = [1.1, 1.21, 0.5, 2.0]
    out = emphasis(z, w)
    assert abs(float(out.mean()) - float(z.mean())) <= 1e-6 * float(np.abs(z).mean())
    ratio = out / z
    np.testing.assert_allclose(ratio / ratio[0, 0], np.broadcast_to(w[:, None], z.shape), rtol=1e-5)
    np.testing.assert_array_equal(emphasis(z, np.ones(77)), z)     # weights 1: the chunk unchanged


# -- end to end, against diffusers ------------------------------------------------------------------
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import tinysd  # noqa: E402
from torch_util import assert_close  # noqa: E402

SIZE, STEPS, SEED = 64, 4, 1234


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory, tiny_sd):
    """A1111's test embeddings as EasyNegative-style .safetensors files (one "emb_params" tensor)
    of seeded random vectors, as wide as the tiny model's text encoder."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("embeddings")
    width = tiny_sd.configs["text_encoder"]["hidden_size"]
    gen = torch.Generator().manual_seed(7)
    for name, n in A1111["embeddings"].items():
        save_file({"emb_params": torch.randn(n, width, generator=gen) * 0.5}, str(folder / f"{name}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def pipes(tiny_sd, embedding_files):
    """(tinysd, diffusers) with the embeddings loaded under their file names, as A1111 names them;
    the diffusers pipeline on copies of the shared text encoder and tokenizer."""
    ours = tinysd.load(tiny_sd.folder, backend="numpy")
    components = dict(tiny_sd.pipe.components, text_encoder=copy.deepcopy(tiny_sd.text_encoder),
                      tokenizer=copy.deepcopy(tiny_sd.tokenizer),
                      scheduler=diffusers.EulerAncestralDiscreteScheduler.from_config(saved_scheduler_config(tiny_sd)))
    ref = diffusers.StableDiffusionPipeline(**components)
    ref.set_progress_bar_config(disable=True)
    for name in A1111["embeddings"]:
        ours.load_textual_inversion(embedding_files / f"{name}.safetensors", token=name)
        ref.load_textual_inversion(str(embedding_files / f"{name}.safetensors"), token=name)
    return ours, ref


def saved_scheduler_config(tiny):
    """The scheduler config as a diffusers user reads it from the saved model (as test_pipeline.py)."""
    return diffusers.PNDMScheduler.from_pretrained(tiny.folder, subfolder="scheduler").config


def hidden_state(text_encoder, ids, clip_skip):
    """The text encoder's output for `ids`, skipping the last `clip_skip` layers: hidden_states[-(N+1)]
    through the final layer norm (diffusers' clip_skip, A1111's CLIP_stop_at_last_layers N + 1)."""
    with torch.no_grad():
        out = text_encoder(torch.tensor(ids), output_hidden_states=True)
        if not clip_skip:
            return out.last_hidden_state
        return text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


def a1111_conditioning(ref, label, clip_skip=None):
    """A1111's conditioning of a recorded prompt on the reference's modules: each recorded chunk
    encoded on its own, multiplied by its weights and rescaled to its mean (emphasis "Original",
    modules/sd_emphasis.py), the chunks concatenated: (1, 77·k, D)."""
    ids_of = lambda name: ref.tokenizer.convert_tokens_to_ids(   # noqa: E731
        [name] + [f"{name}_{i}" for i in range(1, A1111["embeddings"][name])])
    zs = []
    for chunk in CASES[label]["chunks"]:
        z = hidden_state(ref.text_encoder, [a1111_ids(chunk, ids_of)], clip_skip)
        original_mean = z.mean()
        z = z * torch.tensor(chunk["multipliers"]).reshape(1, -1, 1)
        zs.append(z * (original_mean / z.mean()))
    return torch.cat(zs, dim=1)


def diffusers_decode(pipe, latents):
    return pipe.vae.decode(torch.from_numpy(latents) / pipe.vae.config.scaling_factor).sample


def run_both(ours, ref, ours_kwargs, ref_kwargs):
    out = ours(num_inference_steps=STEPS, height=SIZE, width=SIZE, seed=SEED, scheduler="euler_a",
               output_type="latent", **ours_kwargs)
    with torch.no_grad():
        ref_latents = ref(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
                          generator=torch.Generator("cpu").manual_seed(SEED), **ref_kwargs).images.numpy()
    assert_close(out.images, ref_latents, rtol=1e-3, name="final latents")
    with torch.no_grad():
        ref_image = (diffusers_decode(ref, ref_latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    mad = float(np.abs(ours.decode(out.images) - ref_image).mean())
    assert mad <= 0.5 / 255, f"final image mean abs difference {mad * 255:.3f}/255 > 0.5/255"
    return out


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_weighted_chunked_prompt_matches_diffusers_given_a1111s_conditioning(pipes, embedding_files, clip_skip):
    """A 3-chunk prompt (weights, comma backtrack, an embedding) and a 1-chunk negative prompt
    with embeddings: tinysd with prompt_weighting=True against diffusers given A1111's
    conditioning as prompt_embeds, the negative padded with the empty prompt's chunks."""
    ours, ref = pipes
    prompt, negative = CASES["three chunks"], CASES["negative"]
    cond = a1111_conditioning(ref, "three chunks", clip_skip)
    empty = a1111_conditioning(ref, "empty", clip_skip)
    uncond = torch.cat([a1111_conditioning(ref, "negative", clip_skip)] + [empty] * 2, dim=1)
    assert cond.shape[1] == uncond.shape[1] == 3 * 77
    out = run_both(ours, ref, dict(prompt=prompt["prompt"], negative_prompt=negative["prompt"], prompt_weighting=True,
                                   clip_skip=clip_skip),
                   dict(prompt_embeds=cond, negative_prompt_embeds=uncond))
    short = lambda name: hashlib.sha256((embedding_files / f"{name}.safetensors").read_bytes()).hexdigest()[:12]  # noqa: E731
    used = ["badhandv4", "easynegative", "bad_prompt_version2", "bad_prompt"]   # the prompt's, then the negative's
    assert out.parameters["TI hashes"] == ", ".join(f"{name}: {short(name)}" for name in used)
    assert out.parameters["Pad conds"] is True
    assert out.parameters.get("Clip skip") == (None if clip_skip is None else clip_skip + 1)


def test_encode_prompt_equals_a1111s_conditioning(pipes):
    """The context itself, module tolerance: BREAK, a 75-vector embedding over three chunks."""
    ours, ref = pipes
    for label in ("break", "75-vector embedding", "documented"):
        context = ours.encode_prompt(CASES[label]["prompt"], guidance=False, prompt_weighting=True)
        assert_close(context, a1111_conditioning(ref, label).numpy(), rtol=1e-4, name=label)


def clip_skip_reference(ref, prompt, negative, clip_skip):
    """diffusers' `clip_skip`. With transformers >= 5 it fails ("'CLIPTextModel' object has no attribute
    'text_model'"); then the prompt's embeddings come from its definition on the reference's own text
    encoder (hidden_states[-(clip_skip+1)] through final_layer_norm, passed as prompt_embeds), and
    diffusers encodes the negative prompt itself, without clip skip, as its encode_prompt does."""
    kwargs = dict(prompt=prompt, negative_prompt=negative, clip_skip=clip_skip)
    try:
        with torch.no_grad():
            ref.encode_prompt(prompt, "cpu", 1, True, negative, clip_skip=clip_skip)
    except AttributeError as e:
        assert "text_model" in str(e)
        ids = ref.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        kwargs = dict(prompt_embeds=hidden_state(ref.text_encoder, [ids], clip_skip), negative_prompt=negative)
    return kwargs


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(pipes, clip_skip):
    ours, ref = pipes
    prompt, negative = "a red circle on the left", "blurry"
    out = run_both(ours, ref, dict(prompt=prompt, negative_prompt=negative, clip_skip=clip_skip),
                   clip_skip_reference(ref, prompt, negative, clip_skip))
    assert out.parameters["Clip skip"] == clip_skip + 1 and "Pad conds" not in out.parameters


def test_prompt_embeds_of_any_length_match_diffusers(pipes):
    """prompt_embeds / negative_prompt_embeds as diffusers takes them; 2·77 tokens: the U-Net's
    cross-attention takes any context length."""
    ours, ref = pipes
    gen = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 1, 154, 128, generator=gen)
    run_both(ours, ref, dict(prompt_embeds=cond.numpy(), negative_prompt_embeds=uncond.numpy()),
             dict(prompt_embeds=cond, negative_prompt_embeds=uncond))


def test_plain_prompts_keep_diffusers_truncation(pipes):
    ours, _ = pipes
    with pytest.warns(UserWarning, match="truncated"):
        context = ours.encode_prompt("a cat, " * 40, "blurry")
    assert context.shape == (2, 77, 128)
    assert ours.encode_prompt("a cat, " * 40, "blurry", prompt_weighting=True).shape == (2, 2 * 77, 128)   # 120 tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="a", prompt_embeds=np.zeros((1, 77, 128))), "not both"),
    (dict(prompt="a", negative_prompt="b", negative_prompt_embeds=np.zeros((1, 77, 128))), "not both"),
    (dict(prompt_embeds=np.zeros((1, 77, 768))), r"prompt_embeds must have shape \(batch, tokens, 128\)"),
    (dict(prompt_embeds=np.zeros((1, 77, 128)), negative_prompt_embeds=np.zeros((1, 154, 128))), "one shape"),
    (dict(prompt="a", clip_skip=3), "clip_skip must be an integer from 0 to 2"),
    (dict(prompt="(a:1.2.3)", prompt_weighting=True), "is not a number"),
])
def test_bad_prompt_arguments(pipes, kwargs, message):
    ours, _ = pipes
    with pytest.raises(ValueError, match=message):
        ours(num_inference_steps=1, seed=0, output_type="latent", **kwargs)


def test_no_prompt_and_no_prompt_embeds(pipes):
    with pytest.raises(TypeError, match=r"got None \(or give prompt_embeds=\)"):
        pipes[0](num_inference_steps=1, seed=0, output_type="latent")
