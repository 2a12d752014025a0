"""The CLIP tokenizer: a prompt -> 77 token ids, equal to transformers' CLIPTokenizer.

    tok = CLIPTokenizer()
    tok("a photo of a cat")     # (1, 77) int64: 49406 320 1125 539 320 2368 49407 49407 ...

The steps, one function each below, in the order transformers (through `tokenizers`) runs them:

1. split_special_tokens: "<|startoftext|>" and "<|endoftext|>" written in the text become their
   ids directly. They are matched first, exactly as written (case-sensitive).
2. normalize: Unicode NFC, every run of white space -> one " ", lower case (char by char).
   Added tokens (textual inversion, `add_tokens`) are then matched in the normalized text, as
   normalized themselves ("<Cat-Toy>" finds "<cat-toy>"), anywhere, even inside a word
   ("xtoky" -> x, tok, y), the longest one at the leftmost place; the text between them goes on.
3. pre_tokenize: CLIP's regex cuts the text into words (runs of letters), single digits and runs
   of other symbols, dropping white space; GPT-2's byte-level regex then cuts each piece again,
   which changes only special-token text that step 1 missed, such as "<|ENDOFTEXT|>".
4. byte-level: the UTF-8 bytes of each piece become printable characters (GPT-2's table), so
   any text is spelled with the vocabulary's 256 base symbols and nothing is ever unknown.
5. bpe: the last symbol of a word gets the end-of-word mark "</w>", then the adjacent pair with
   the lowest merge rank is merged until no pair is in the merge list (Sennrich et al. 2016,
   "Neural Machine Translation of Rare Words with Subword Units"). Each symbol is one token.
6. CLIPTokenizer.__call__: [<|startoftext|>] + ids + [<|endoftext|>], cut to 77 tokens (the end
   token kept, the dropped text named in a warning, as diffusers' pipeline does) and padded
   with <|endoftext|>.

The clean-up is that of transformers' CLIPTokenizer from version 5 on (CLIPTokenizerFast in 4.x).
OpenAI's original CLIP also runs ftfy and html.unescape, and transformers 4.x's slow
CLIPTokenizer without ftfy splits CJK characters apart: neither is reproduced here.
"""
from __future__ import annotations

import functools
import gzip
import itertools
import json
import math
import operator
import re
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
CLIP_BPE_FILE = DATA / "bpe_simple_vocab_16e6.txt.gz"   # OpenAI's merge list, as shipped with CLIP

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# 49408 tokens = 256 bytes + the same 256 ending a word + 48894 merges + 2 special tokens.
N_MERGES = 49152 - 256 - 2

# The two regexes in the reference's syntax (Oniguruma, through `tokenizers`). The GPT-2 one
# is tokenizers' ByteLevel pattern with \s written as [\s] and \S as [^\s], which means the
# same and leaves every class inside brackets, so `python_regex` can translate it by text.
CLIP_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}]+| ?[\p{N}]+| ?[^\s\p{L}\p{N}]+"
                r"|[\s]+(?![^\s])|[\s]+")

# Unicode's White_Space property, which is what \s means in the reference. Python's \s also
# matches \x1c-\x1f, which the reference keeps as symbols, so the set is spelled out.
WHITE_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def unicode_class(major: str) -> str:
    r"""The body of an `re` character class for \p{L} (major "L") or \p{N} (major "N").

    Python's `re` has no \p{..}, and its nearest classes differ: \d is only the decimal
    digits Nd (not "½" or "²", which are No), and str.isnumeric() is true for CJK numerals
    such as "一", which are letters (Lo). So list the code points whose general category
    starts with `major`, as ranges.
    """
    return _unicode_classes()[major]


@functools.lru_cache(maxsize=None)
def _unicode_classes() -> dict[str, str]:
    """{"L": class body, "N": class body}, from one pass over all of Unicode (0.1 s): the runs
    of code points with the same major category, found by groupby over the categories."""
    ranges, cp = {"L": [], "N": []}, 0
    majors = map(operator.itemgetter(0), map(unicodedata.category, map(chr, range(sys.maxunicode + 1))))
    for major, run in itertools.groupby(majors):
        n = len(list(run))
        if major in ranges:
            ranges[major].append((cp, cp + n - 1))
        cp += n
    return {major: "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in runs)
            for major, runs in ranges.items()}


def python_regex(pattern: str) -> re.Pattern:
    r"""Compile a reference pattern with Python's `re`: \p{L}, \p{N}, \s become explicit classes."""
    for name, body in ((r"\p{L}", unicode_class("L")), (r"\p{N}", unicode_class("N")),
                       (r"\s", WHITE_SPACE)):
        pattern = pattern.replace(name, body)
    return re.compile(pattern)


@functools.lru_cache(maxsize=None)
def _compiled_patterns():
    return (python_regex(CLIP_PATTERN), python_regex(GPT2_PATTERN),
            python_regex(r"[\s]+"), re.compile(f"({re.escape(BOS_TOKEN)}|{re.escape(EOS_TOKEN)})"))


def split_special_tokens(text: str) -> list[str]:
    """'a<|endoftext|>b' -> ['a', '<|endoftext|>', 'b']: special tokens at the odd indices."""
    return _compiled_patterns()[3].split(text)


def normalize(text: str) -> str:
    """NFC, each white-space run -> " ", lower case one character at a time.

    Char by char, like the reference: str.lower() on a whole string would turn a word-final
    "Σ" into "ς"; the reference (and this) gives "σ".
    """
    text = unicodedata.normalize("NFC", text)
    text = _compiled_patterns()[2].sub(" ", text)
    return "".join(map(str.lower, text))


def pre_tokenize(text: str) -> list[str]:
    """Normalized text -> pieces: "a cat's 1920s!!" -> ['a', 'cat', "'s", '1', '9', '2', '0', 's', '!!']."""
    clip, gpt2 = _compiled_patterns()[:2]
    return [sub for piece in clip.findall(text) for sub in gpt2.findall(piece)]


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte -> a printable character (printable bytes map to themselves).

    The 188 printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') keep their character; the other 68
    (controls, space, ...) take the characters from U+0100 on, in order, so the BPE never sees
    white space or control characters and every byte has a symbol of its own. The dict's order
    (printable bytes first) is the order of the vocabulary's first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one byte-level word: 'cafÃ©' -> ['cafÃ©</w>'].

    Start from single characters, the last one marked as the end of the word, and merge the
    adjacent pair of lowest rank (earliest learned) everywhere in the word; repeat until no
    adjacent pair is in `ranks`.
    """
    symbols = [*word[:-1], word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        symbols = _merge(symbols, best)
    return symbols


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace each occurrence of `pair`, left to right, by the joined symbol."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def load_clip_bpe(path=CLIP_BPE_FILE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI's bpe_simple_vocab_16e6.txt.gz -> (vocab, merges), as CLIP builds them.

    The file holds only merges (after a header line); the vocabulary follows from them: the
    256 byte symbols, the same with "</w>", each merge's joined symbol in rank order, then the
    start and end tokens. This is the published vocab.json, id for id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        next(f)
        merges = [_parse_merge(line, path, n) for n, line in enumerate(itertools.islice(f, N_MERGES), 2)]
    if len(merges) != N_MERGES:
        raise ValueError(f"{path}: {len(merges)} merges, CLIP needs {N_MERGES}")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    vocab = {token: i for i, token in enumerate(tokens + [BOS_TOKEN, EOS_TOKEN])}
    return vocab, merges


def load_vocab_merges(folder) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A diffusers/transformers tokenizer folder -> (vocab, merges).

    Reads vocab.json + merges.txt (the published SD folders), or else tokenizer.json (what
    transformers ≥ 5 saves). `folder` may also be a model folder holding a tokenizer/ folder.
    """
    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not (folder / "vocab.json").is_file() and (folder / "tokenizer.json").is_file():
        return _load_tokenizer_json(folder / "tokenizer.json")
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: a tokenizer folder holds "
                                    "vocab.json and merges.txt (or tokenizer.json)")
    with open(folder / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    merges_file = folder / "merges.txt"         # made once: a Path for each of 49K lines took longer than the reading
    with open(merges_file, encoding="utf-8") as f:
        merges = [_parse_merge(line, merges_file, n) for n, line in enumerate(f, 1)
                  if line.strip() and not line.startswith("#version")]
    return vocab, merges


def _load_tokenizer_json(path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE model inside a `tokenizers` tokenizer.json: its vocab and its merges, which are
    stored as "a b" strings or as [a, b] pairs depending on the version that wrote them."""
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model or "merges" not in model:
        raise ValueError(f"{path}: not a BPE tokenizer (expected model.type 'BPE' with vocab and merges)")
    merges = [tuple(m) if isinstance(m, list) else _parse_merge(m, path, n)
              for n, m in enumerate(model["merges"], 1)]
    return model["vocab"], merges


def _parse_merge(line: str, path, line_no: int) -> tuple[str, str]:
    pair = tuple(line.split())
    if len(pair) != 2:
        raise ValueError(f"{path}, line {line_no}: expected two symbols, got {line.strip()!r}")
    return pair


def _tokenizers_pipeline(vocab, merges):
    """The same steps built with the `tokenizers` package (Rust), as transformers builds them."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                        end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=EOS_TOKEN))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (BOS_TOKEN, EOS_TOKEN)])
    return tok


class CLIPTokenizer:
    """Text -> CLIP token ids, as transformers.CLIPTokenizer for Stable Diffusion v1.

    CLIPTokenizer() uses the vocabulary shipped in the package; CLIPTokenizer.from_folder(path)
    reads a tokenizer folder. fast=True runs the steps in the `tokenizers` package instead of
    the Python below (same ids, tested); the Python is the reference and the default.
    """

    model_max_length = 77   # CLIP's text transformer has 77 positions

    def __init__(self, vocab: dict[str, int] | None = None,
                 merges: list[tuple[str, str]] | None = None, *, fast: bool = False):
        if (vocab is None) != (merges is None):
            raise ValueError("give both vocab and merges, or neither (for the shipped vocabulary)")
        if vocab is None:
            vocab, merges = load_clip_bpe()
        for token in (BOS_TOKEN, EOS_TOKEN):
            if token not in vocab:
                raise ValueError(f"the vocabulary has no {token!r} token")
        self.encoder = vocab                                    # token -> id
        self.decoder = {i: token for token, i in vocab.items()}  # id -> token
        self.bpe_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_token_id = vocab[BOS_TOKEN]
        self.eos_token_id = vocab[EOS_TOKEN]
        self.pad_token_id = self.eos_token_id   # SD v1 pads with the end token
        self.special_ids = {self.bos_token_id, self.eos_token_id}
        self.fast = fast
        self._fast = _tokenizers_pipeline(vocab, list(self.bpe_ranks)) if fast else None
        self._cache: dict[str, list[str]] = {}
        # Added tokens (textual inversion): content -> id, from len(vocab) on; the vocabulary
        # files stay as shipped. Matched by their normalized text, longest first.
        self.added_tokens_encoder: dict[str, int] = {}
        self._added_by_text: dict[str, int] = {}
        self._added_pattern = None

    def __len__(self):
        return len(self.encoder) + len(self.added_tokens_encoder)

    def check_new_tokens(self, tokens: list[str]):
        """Raise ValueError if any of `tokens` cannot be added (see `add_tokens`); changes nothing."""
        seen = dict(self._added_by_text)
        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise ValueError(f"a token must be a non-empty str with a visible character, not {token!r}")
            if token in self.encoder or token in self.added_tokens_encoder:
                raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary; choose another token")
            text = normalize(token)
            if text in seen:
                raise ValueError(f"token {token!r} reads as {text!r} once normalized, as an added token already does")
            seen[text] = 0

    def add_tokens(self, tokens: list[str]) -> list[int]:
        """Add tokens after the vocabulary (ids len(self), len(self)+1, ...), as transformers'
        `add_tokens` does for textual inversion: each is matched in the normalized text before
        BPE. Tokens already in the vocabulary are refused (as diffusers' `load_textual_inversion`)."""
        tokens = list(tokens)
        self.check_new_tokens(tokens)
        ids = list(range(len(self), len(self) + len(tokens)))
        if self._fast is not None:
            from tokenizers import AddedToken

            self._fast.add_tokens([AddedToken(t, normalized=True, special=False) for t in tokens])
        for token, i in zip(tokens, ids):
            self.added_tokens_encoder[token] = i
            self._added_by_text[normalize(token)] = i
            self.decoder[i] = normalize(token)
        longest_first = sorted(self._added_by_text, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, longest_first)))
        return ids

    @classmethod
    def from_folder(cls, path, *, fast: bool = False) -> "CLIPTokenizer":
        """A diffusers tokenizer/ folder (vocab.json + merges.txt), or the model folder above it."""
        return cls(*load_vocab_merges(path), fast=fast)

    def _bpe(self, piece: str) -> list[str]:
        """BPE of one pre-tokenized piece, cached (prompts repeat words)."""
        if piece not in self._cache:
            if len(self._cache) >= 10_000:
                self._cache.clear()
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            self._cache[piece] = bpe(word, self.bpe_ranks)
        return self._cache[piece]

    def _tokens(self, text: str, added: bool) -> list[tuple[str, int]]:
        """Text -> (piece, id) pairs, without start/end tokens (steps 1-5 of the module docstring)."""
        _check_text(text)
        if self._fast is not None and (added or not self.added_tokens_encoder):
            encoding = self._fast.encode(text, add_special_tokens=False)
            return list(zip(encoding.tokens, encoding.ids))
        unk = self.eos_token_id   # unreachable with a byte-level vocabulary; as the reference
        pairs = []
        for i, part in enumerate(split_special_tokens(text)):
            if i % 2:
                pairs.append((part, self.encoder[part]))
                continue
            for j, piece in enumerate(self._split_added(normalize(part)) if added else [normalize(part)]):
                if j % 2:
                    pairs.append((piece, self._added_by_text[piece]))
                else:
                    pairs += [(s, self.encoder.get(s, unk)) for p in pre_tokenize(piece) for s in self._bpe(p)]
        return pairs

    def _split_added(self, text: str) -> list[str]:
        """'x<cat-toy>y' -> ['x', '<cat-toy>', 'y']: added tokens at the odd indices. The pattern
        lists them longest first, so at the leftmost match the longest one wins."""
        if self._added_pattern is None:
            return [text]
        return re.split(f"({self._added_pattern.pattern})", text)

    def tokenize(self, text: str, added_tokens: bool = True) -> list[str]:
        """Text -> BPE pieces, without start/end tokens: 'a cat' -> ['a</w>', 'cat</w>'].

        An added token comes out as its normalized text. added_tokens=False tokenizes as if
        none had been added (A1111 finds embedding names in the plain tokens, `tinysd.prompt`).
        """
        return [piece for piece, _ in self._tokens(text, added_tokens)]

    def encode(self, text: str, added_tokens: bool = True) -> list[int]:
        """Text -> token ids, without start/end tokens: 'a cat' -> [320, 2368]."""
        return [i for _, i in self._tokens(text, added_tokens)]

    def __call__(self, prompt: str | list[str]) -> np.ndarray:
        """A prompt -> (1, 77) int64 ids; a list of B prompts -> (B, 77).

        Each row is [<|startoftext|>, ids..., <|endoftext|>, pad...]. Longer prompts keep their
        first 75 tokens and warn, naming the text dropped.
        """
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"prompt must be a str or a non-empty list of str, not {prompt!r}")
        return np.array([self._frame(self.encode(p)) for p in prompts], dtype=np.int64)

    def _frame(self, ids: list[int]) -> list[int]:
        room = self.model_max_length - 2   # between the start and end tokens
        if len(ids) > room:
            warnings.warn("The following part of your input was truncated because CLIP can only "
                          f"handle sequences up to {self.model_max_length} tokens: "
                          f"{self.decode(ids[room:])!r}", stacklevel=3)
            ids = ids[:room]
        ids = [self.bos_token_id, *ids, self.eos_token_id]
        return ids + [self.pad_token_id] * (self.model_max_length - len(ids))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Token ids -> text: bytes back from their symbols, each "</w>" -> " ", ends stripped.

        Lower case and single spaces: the normalization is not undone.
        """
        ids = np.asarray(ids).reshape(-1).tolist()
        unknown = [i for i in ids if i not in self.decoder]
        if unknown:
            raise ValueError(f"token ids not in the vocabulary (size {len(self.decoder)}): {unknown[:5]}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        added = set(self.added_tokens_encoder.values())
        parts = []        # runs of vocabulary tokens (bytes, decoded together), an added token as its text
        for is_added, run in itertools.groupby(ids, key=added.__contains__):
            symbols = [self.decoder[i] for i in run]
            parts += symbols if is_added else [
                bytes(self.byte_decoder[c] for c in "".join(symbols)).decode("utf-8", errors="replace")]
        return "".join(parts).replace(END_OF_WORD, " ").strip()


def _check_text(text):
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, not {type(text).__name__}")
