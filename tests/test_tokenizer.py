"""The CLIP tokenizer against transformers' CLIPTokenizer, called as diffusers' pipeline calls it."""
import hashlib
import random
import shutil
import unicodedata
import warnings

from pathlib import Path

import numpy as np
import pytest

from tinysd.tokenizer import CLIPTokenizer, bytes_to_unicode, normalize, pre_tokenize

# The published SD v1.5 configs and tokenizer files, shipped in the package (checked below by sha256).
SD_FOLDER = Path(__file__).resolve().parents[1] / "tinysd" / "data" / "sd-v1-5"
TOKENIZER_FOLDER = SD_FOLDER / "tokenizer"
# sha256 of stable-diffusion-v1-5's tokenizer/vocab.json and merges.txt as published on the hub.
PUBLISHED_SHA256 = {
    "vocab.json": "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69",
    "merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
}

LONG = "a photograph of an astronaut riding a horse on mars, highly detailed, " * 8
PROMPTS = [
    "a cat", "A photo of an astronaut riding a horse on Mars", "portrait, oil on canvas!!! (masterpiece)",
    "1920s jazz club", "pi is 3.14", "2024-01-01 12:30", "café crème", "Ærøskøbing naïve façade",
    "a dog 🐶 and a cat 😺 👍🏽", "猫が好き", "東京タワー at night", "서울의 밤", "don't", "it's", "'sam's'",
    "we're they've I'm you'll he'd", "  leading", "trailing   ", "many    spaces", "tabs\tand\nnew\r\nlines",
    "UPPER CASE", "ΟΔΟΣ İstanbul ß", "<|startoftext|>a cat<|endoftext|>", "x <|ENDOFTEXT|>!!",
    "a</w>b", "", " ", "½ ² Ⅻ ①", "e\u0301 vs \u00e9", "non\u00a0breaking\u3000space\u2028line",
    "file\x1cseparator", "zero\u200bwidth", LONG, LONG + "<|endoftext|>",
]
# Characters picked to hit every branch: each white-space kind, the near-white-space ones the
# reference keeps as symbols (\x1c-\x1f, U+200B, U+180E), letters that change length when
# lower-cased, combining marks, numbers that are not decimal digits, emoji sequences.
POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") * 3
        + list(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200a\u200b\u2028\u2029"
               "\u202f\u205f\u3000\u180e\ufeff")
        + list("'\"!?.,;:-_()[]{}<>|/\\@#$%^&*+=~`")
        + list("éèçàüßÀÉİıΣσςΟΔñÑ½²³¼Ⅻⅻ①٣०一二猫が好きテスト한국어😀👍🏽🇫🇷\u0301\u0307\u200d\ufffdﬁẞǅ")
        + ["'s", "'t", "'re", "'ll", "'d", "'m", "'ve", "<|startoftext|>", "<|endoftext|>",
           "<|ENDOFTEXT|>", "e\u0301"])


def random_prompts(n, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    # transformers >= 5: CLIPTokenizer is the `tokenizers` one; 4.x calls that one ...Fast.
    cls = (transformers.CLIPTokenizer if int(transformers.__version__.split(".")[0]) >= 5
           else transformers.CLIPTokenizerFast)
    return cls.from_pretrained(TOKENIZER_FOLDER)


def reference_ids(reference, prompts):
    """As diffusers' StableDiffusionPipeline.encode_prompt tokenizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array(reference(prompts, padding="max_length", max_length=77,
                                  truncation=True).input_ids)


@pytest.fixture(scope="module", params=["plain", "fast"])
def tok(request):
    return CLIPTokenizer(fast=request.param == "fast")


@pytest.mark.filterwarnings("ignore:The following part of your input was truncated")
def test_ids_equal_reference(tok, reference):
    ids = tok(PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, reference_ids(reference, PROMPTS))
    for prompt in PROMPTS[:3]:
        np.testing.assert_array_equal(tok(prompt), reference_ids(reference, [prompt]))


@pytest.mark.filterwarnings("ignore:The following part of your input was truncated")
def test_random_text_equals_reference(tok, reference):
    prompts = random_prompts(500)
    mismatched = [p for p, a, b in zip(prompts, tok(prompts), reference_ids(reference, prompts))
                  if not np.array_equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]!r}"


def test_every_character_class(reference):
    """Each assigned code point, between letters and digits: the Unicode classes \\p{L}, \\p{N}
    and white space emulated with `re` split, normalize and lower-case as the reference.

    Code points unassigned in Python's Unicode database (14.0 in Python 3.11) are left out: the
    reference knows newer versions, and this module can only follow Python's.
    """
    tok = CLIPTokenizer()
    code_points = [c for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Co", "Cs")]
    code_points = [c for c in code_points if c < 0x10000 or c % 16 == 0]   # astral: a sample
    texts = ["".join(f"a{chr(c)}1{chr(c)}{chr(c)}b " for c in code_points[i:i + 64])
             for i in range(0, len(code_points), 64)]
    expected = reference(texts, add_special_tokens=False).input_ids
    mismatched = [t for t, e in zip(texts, expected) if tok.encode(t) != e]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} blocks differ, first {mismatched[0]!r}"


def test_steps_equal_reference_steps(reference):
    """normalize and pre_tokenize on their own, against the reference's normalizer and pre-tokenizer."""
    backend = reference.backend_tokenizer
    encode_bytes = bytes_to_unicode()
    for text in PROMPTS + random_prompts(200, seed=1):
        text = text.replace("<|startoftext|>", "").replace("<|endoftext|>", "")
        normalized = backend.normalizer.normalize_str(text)
        assert normalize(text) == normalized
        pieces = ["".join(encode_bytes[b] for b in p.encode("utf-8")) for p in pre_tokenize(normalized)]
        assert pieces == [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


def test_tokenize_encode_decode_equal_reference(tok, reference):
    for prompt in PROMPTS[:-2]:
        assert tok.tokenize(prompt) == reference.tokenize(prompt), prompt
        assert tok.encode(prompt) == reference(prompt, add_special_tokens=False).input_ids, prompt
        ids = reference_ids(reference, [prompt])[0]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_special_ids(tok, reference):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert tok.model_max_length == reference.model_max_length == 77
    assert tok.encode("a <|endoftext|>") == tok.encode("a") + [reference.eos_token_id]


def test_truncation_warns_naming_the_dropped_text(tok, reference):
    """As diffusers: keep 75 tokens and the end token, warn with the decoded rest."""
    prompt = LONG + "zebra giraffe"
    untruncated = reference(prompt).input_ids
    assert len(untruncated) > 77
    dropped = reference.batch_decode([untruncated[76:-1]])[0]   # diffusers' removed_text
    with pytest.warns(UserWarning, match="truncated") as record:
        ids = tok(prompt)
    assert repr(dropped) in str(record[0].message) and "giraffe" in dropped
    assert ids[0, -1] == tok.eos_token_id
    np.testing.assert_array_equal(ids, reference_ids(reference, [prompt]))


def test_no_warning_at_exactly_75_tokens(tok):
    prompt = " ".join(["cat"] * 75)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok(prompt)
    assert ids[0, -1] == tok.eos_token_id and (ids[0, 1:-1] == tok.encode("cat")[0]).all()
    with pytest.warns(UserWarning, match="'cat'"):
        tok(prompt + " cat")


def test_shipped_tokenizer_files_are_the_published_ones():
    for name, digest in PUBLISHED_SHA256.items():
        assert hashlib.sha256((TOKENIZER_FOLDER / name).read_bytes()).hexdigest() == digest, name


def test_shipped_vocabulary_equals_folder():
    shipped = CLIPTokenizer()
    for path in (TOKENIZER_FOLDER, SD_FOLDER):
        folder = CLIPTokenizer.from_folder(path)
        assert folder.encoder == shipped.encoder and folder.bpe_ranks == shipped.bpe_ranks


def test_tokenizer_json_folder_equals_shipped(reference, tmp_path):
    """A folder saved by transformers ≥ 5 holds tokenizer.json only: same vocabulary and merges."""
    reference.save_pretrained(tmp_path)
    if (tmp_path / "vocab.json").exists():
        pytest.skip("this transformers saves vocab.json + merges.txt")
    folder, shipped = CLIPTokenizer.from_folder(tmp_path), CLIPTokenizer()
    assert folder.encoder == shipped.encoder and folder.bpe_ranks == shipped.bpe_ranks


def test_bad_input(tmp_path):
    tok = CLIPTokenizer()
    with pytest.raises(TypeError, match="prompt must be"):
        tok(123)
    with pytest.raises(TypeError, match="prompt must be"):
        tok([])
    with pytest.raises(TypeError, match="text must be a str"):
        tok(["a cat", None])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([49408])
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="no '<|startoftext|>'"):
        CLIPTokenizer({"a</w>": 0}, [])
    with pytest.raises(ValueError, match="both vocab and merges"):
        CLIPTokenizer({"a</w>": 0})
    shutil.copy(TOKENIZER_FOLDER / "vocab.json", tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nt h e\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        CLIPTokenizer.from_folder(tmp_path)


# Added tokens (textual inversion): matched in the normalized text before BPE, as transformers' add_tokens.
ADDED = ["<cat-toy>", "EasyNeg", "EasyNeg_1", "qqz", "qqzzw", "Σx", " sp ", "<|ENDOFTEXT|>z", "a b"]
ADDED_TEXTS = ["a <cat-toy> b", "a <Cat-Toy>b", "xeasynegy", "EASYNEG_1 easyneg", "qqzz qqzzw qqzzwq", "ΣX",
               "a sp b", "<|endoftext|>z", "<|ENDOFTEXT|>z", "A  B\tc", "easyneg, a photo of <cat-toy><cat-toy>"]


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_added_tokens_equal_reference(fast):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(TOKENIZER_FOLDER)
    plain = [reference(t, add_special_tokens=False).input_ids for t in ADDED_TEXTS]
    reference.add_tokens(ADDED)
    tok = CLIPTokenizer(fast=fast)
    assert tok.add_tokens(ADDED) == reference.convert_tokens_to_ids(ADDED) and len(tok) == len(reference)
    for text, before in zip(ADDED_TEXTS, plain):
        assert tok.tokenize(text) == reference.tokenize(text), text
        assert tok.encode(text) == reference(text, add_special_tokens=False).input_ids, text
        assert tok.encode(text, added_tokens=False) == before, text         # as if none were added
    np.testing.assert_array_equal(tok(ADDED_TEXTS), reference_ids(reference, ADDED_TEXTS))
    ids = reference("easyneg a <cat-toy>, qqzzw b").input_ids
    assert tok.decode(ids) == reference.decode(ids)


def test_added_tokens_refused():
    tok = CLIPTokenizer()
    tok.add_tokens(["<mine>"])
    for token, message in [("cat</w>", "already in the tokenizer's vocabulary"), ("cat", "already in"),
                           ("<mine>", "already in"), ("<MINE>", "reads as '<mine>' once normalized"),
                           ("  ", "non-empty str"), (3, "non-empty str")]:
        with pytest.raises(ValueError, match=message):
            tok.add_tokens(["<fine>", token])
    assert len(tok) == 49409 and tok.encode("<fine>") == tok.encode("<fine>", added_tokens=False)
