"""Textual inversion: embedding files -> new tokens, each with its own row in the token table.

    sd.load_textual_inversion("EasyNegative.safetensors")           # token "EasyNegative"
    sd("a cat", negative_prompt="EasyNegative")

A textual-inversion embedding (Gal et al. 2022, "An Image is Worth One Word") is n learned
vectors of the text encoder's width (768 for SD v1) standing for a new word. Loading one adds
n tokens after the vocabulary (ids 49408, 49409, ...): the tokenizer's added-token map gets
their names, the token table gets their vectors (`CLIPTextModel.add_tokens`); the shipped
vocabulary files and the checkpoint's rows never change. n > 1 vectors are named as diffusers
names them: token, token_1, ..., token_{n-1}.

The files found in the wild, read without torch:

- AUTOMATIC1111 `.pt`: a torch.save'd dict {"string_to_param": {"*": (n, 768)}, "name": ...,
  "step", "sd_checkpoint", ...}; string_to_param may be a pickled torch.nn.ParameterDict.
- `.safetensors` with one tensor "emb_params" (n, 768) (EasyNegative and most of civitai).
- diffusers `learned_embeds.bin` / `.safetensors`: {token: (768,) or (n, 768)}, or a folder
  holding one of them.

The token, unless given, is the one the file stores: the diffusers key, the A1111 "name" (or
the file's name when it has none). An "emb_params" file stores none, so its token is the file's
name (diffusers would call it "emb_params"). A1111 itself always uses the file's name: the
command line passes it as the token.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinysd.weights import CheckpointError, read_ckpt, read_safetensors

SUFFIXES = (".pt", ".bin", ".safetensors")
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")


@dataclass(eq=False)
class TextualInversion:
    """One loaded embedding: its token, its vectors (n, D), and the file it came from."""
    token: str
    vectors: np.ndarray
    path: Path
    sha256: str = ""                                 # of the whole file, as A1111's "TI hashes" uses
    ids: list[int] = field(default_factory=list)    # the token ids of its vectors, once loaded

    @property
    def tokens(self) -> list[str]:
        """token, token_1, ..., token_{n-1}: diffusers' names for the n vectors."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, len(self.vectors))]

    @property
    def shorthash(self) -> str:
        return self.sha256[:12]


def read_embedding(path, token=None) -> TextualInversion:
    """An embedding file (or a diffusers folder holding one) -> TextualInversion, not yet loaded.

    Raises ValueError naming the file when it is not one of the formats above.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in DIFFUSERS_NAMES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: a textual-inversion folder holds {' or '.join(DIFFUSERS_NAMES)}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"textual-inversion file not found: {path}")
    try:
        data = read_safetensors(path) if path.suffix == ".safetensors" else read_ckpt(path)
        stored, vectors = _token_and_vectors(data, path)
    except (CheckpointError, ValueError) as e:
        message = str(e)
        raise ValueError(message if str(path) in message else f"{path}: {message}") from None
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, vectors.shape[-1])
    if not np.isfinite(vectors).all():
        raise ValueError(f"{path}: the embedding holds non-finite values (inf or NaN)")
    token = token if token is not None else stored if stored is not None else path.stem
    return TextualInversion(token, vectors, path, _sha256(path))


def _token_and_vectors(data, path):
    """(stored token or None, vectors) of an unpickled or safetensors dict."""
    if not isinstance(data, dict):
        raise ValueError(f"holds a {type(data).__name__}, not a textual-inversion embedding")
    if "string_to_param" in data:                                  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError("string_to_param must hold exactly one embedding ('*')")
        name = data.get("name")
        return (name if isinstance(name, str) and name else None), _vectors(next(iter(params.values())))
    if "clip_l" in data or "clip_g" in data:
        raise ValueError("is an SD-XL embedding (clip_l/clip_g vectors); tinysd runs SD v1, whose text "
                         "encoder takes one set of 768-wide vectors")
    tensors = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if len(tensors) != 1 or len(tensors) != len(data):
        keys = ", ".join(list(map(str, data))[:4]) + (" ..." if len(data) > 4 else "")
        raise ValueError(f"holds {len(data)} entries ({keys}); a textual-inversion embedding holds one "
                         "tensor (or A1111's string_to_param). A LoRA goes to --lora / load_lora_weights")
    (key, vectors), = tensors.items()
    return (None if key == "emb_params" else key), _vectors(vectors)


def _vectors(x):
    if not isinstance(x, np.ndarray) or x.ndim not in (1, 2) or x.size == 0 or x.dtype.kind != "f":
        shape = getattr(x, "shape", None)
        raise ValueError(f"the embedding must be float vectors of shape (n, width) or (width,), "
                         f"got {type(x).__name__} {shape}")
    return x


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_textual_inversion(sd, path, token=None) -> TextualInversion:
    """Read an embedding and add its tokens to `sd` (tokenizer and text encoder), all or nothing.

    Refused, with the file named: a width other than the text encoder's, a token already in
    the vocabulary or already loaded, a file that is not an embedding.
    """
    ti = read_embedding(path, token)
    width = sd.text_encoder.hidden_size
    if ti.vectors.shape[1] != width:
        hint = " (an SD 2.x embedding?)" if ti.vectors.shape[1] == 1024 else ""
        raise ValueError(f"{ti.path}: the embedding's vectors are {ti.vectors.shape[1]} wide{hint}; this model's "
                         f"text encoder takes {width}")
    try:
        sd.tokenizer.check_new_tokens(ti.tokens)
    except ValueError as e:
        raise ValueError(f"{ti.path}: {e} (pass token=... to load it under another name)") from None
    ti.ids = sd.tokenizer.add_tokens(ti.tokens)
    rows = sd.text_encoder.add_tokens(ti.vectors)
    assert rows == ti.ids, (rows, ti.ids)       # both tables grow together
    sd.textual_inversions[ti.token] = ti
    return ti


def load_dir(sd, folder, warn=None) -> list[TextualInversion]:
    """Load every embedding file under `folder` (recursively, as A1111's embeddings folder),
    each under its file name, as an A1111 prompt names it. A file that cannot be loaded is
    skipped with one line to `warn` (default: stderr), as A1111 skips it."""
    warn = warn or (lambda line: print(line, file=sys.stderr))
    loaded = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix.lower() not in SUFFIXES or path.stat().st_size == 0:
                continue
            try:
                loaded.append(load_textual_inversion(sd, path, token=path.stem))
            except (ValueError, OSError) as e:
                message = " ".join(str(e).split())
                warn(f"tinysd: warning: skipped embedding {message if str(path) in message else f'{path}: {message}'}")
    return loaded


def hashes_field(used) -> str | None:
    """A1111's "TI hashes" value for the embeddings a generation used: "name: shorthash, ..."."""
    names = [f"{ti.token.replace(':', '').replace(',', '')}: {ti.shorthash}" for ti in used]
    return ", ".join(names) or None


def expand_multi_vector(prompt: str, tokenizer) -> str:
    """diffusers' `maybe_convert_prompt`: where the prompt has the token of an n-vector embedding,
    write "token token_1 ... token_{n-1}" instead (a plain text replacement), so that all n
    vectors are used. As in diffusers, a token is looked for as the tokenizer reads it
    (normalized, so lower case): a token spelled with capitals is not expanded."""
    added = tokenizer.added_tokens_encoder
    for token in dict.fromkeys(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            n = 1
            while f"{token}_{n}" in added:
                n += 1
            prompt = prompt.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, n)]))
    return prompt


def used_in(ids, textual_inversions) -> list[TextualInversion]:
    """The embeddings whose tokens occur in the token ids `ids`."""
    present = set(np.asarray(ids).ravel().tolist())
    return [ti for ti in textual_inversions if present.intersection(ti.ids)]
