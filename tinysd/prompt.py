"""AUTOMATIC1111's prompt syntax: weights, BREAK, and prompts of any length in 75-token chunks.

    a (red:1.3) car, [blurry], ((masterpiece)) BREAK a second chunk

- `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:w)` multiplies it by w;
  brackets nest and multiply. `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are the characters themselves.
  An unclosed bracket still applies, to the end of the prompt; a closing one without an
  opening one is text. Runs of equal weight merge (`parse_prompt_attention`).
- The prompt's tokens go into chunks of 75, each framed as CLIP's 77 positions
  [<|startoftext|>, 75 tokens padded with <|endoftext|>, <|endoftext|>]. A chunk that fills up
  at most 20 tokens after a comma ends after that comma, and the words after it move on to the
  next chunk; `BREAK` (capitals, as a word) ends the chunk at once (`tokenize_line`).
- An embedding is found by its name's tokens and takes as many positions as it has vectors,
  all in one chunk.
- The text encoder encodes each chunk on its own; each output token is multiplied by its
  weight, and the chunk rescaled to the mean it had before (`emphasis`):

      z' = (z ⊙ w) · mean(z) / mean(z ⊙ w)

  The chunks' outputs, concatenated, are the context: 77·k tokens for k chunks.

The rules are those of A1111's modules/prompt_parser.py (`parse_prompt_attention`),
modules/sd_hijack_clip.py (`tokenize_line`, comma backtrack 20, its default) and
modules/sd_emphasis.py ("Original", its default emphasis); tests/test_prompt.py checks them
against outputs of that code. Two differences, both outside what a single prompt sees in A1111:
the mean is taken per prompt (A1111 takes it over the prompts it encodes together, which for
one prompt, or copies of one, is the same), and an embedding that the comma backtrack moves to
the next chunk moves with its vectors (A1111 leaves them behind in the previous chunk's
padding, and the moved positions read as the token "!"). Not here: prompt editing
`[a:b:0.5]`, alternation `[a|b]` and `AND` (they stay plain text), which A1111 handles before
these rules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

CHUNK_LENGTH = 75          # tokens per chunk, between the start and end tokens
COMMA_BACKTRACK = 20       # A1111's comma_padding_backtrack default
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"

# One piece of the prompt, tried in this order: escapes, brackets, ":w)" closing a weighted
# round bracket (the weight in group 1), other closers, plain text, a lone ":".
ATTENTION = re.compile(r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\     # escaped bracket or backslash; a lone backslash
  | \( | \[                                  # opening brackets
  | :\s*([+-]?[.\d]+)\s*\)                   # ":1.3)" closes a round bracket with weight 1.3
  | \) | ]                                   # closing brackets
  | [^\\()\[\]:]+                            # text
  | :                                        # a colon that weighs nothing
""", re.X)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """A prompt -> [[text, weight], ...], A1111's rules (see the module docstring).

    >>> parse_prompt_attention("an (important) word")
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]

    A BREAK in the text is the entry ["BREAK", -1]. Inside brackets its weight is multiplied
    too, and then (as in A1111) it is no longer a break but the word "BREAK" with that weight.
    """
    parts = []                   # [text, weight]; weights are multiplied in place as brackets close
    open_round, open_square = [], []   # where each open bracket's span starts in `parts`

    def multiply(start, factor):
        for part in parts[start:]:
            part[1] *= factor

    for match in ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            parts.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(parts))
        elif piece == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            multiply(open_round.pop(), _weight(weight, piece))
        elif piece == ")" and open_round:
            multiply(open_round.pop(), ROUND)
        elif piece == "]" and open_square:
            multiply(open_square.pop(), SQUARE)
        else:
            for i, words in enumerate(BREAK_WORD.split(piece)):
                if i:
                    parts.append([BREAK, -1])
                parts.append([words, 1.0])
    for start in open_round:     # unclosed brackets apply to the end of the prompt
        multiply(start, ROUND)
    for start in open_square:
        multiply(start, SQUARE)
    return _merge_equal_weights(parts or [["", 1.0]])


def _weight(text, piece):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"prompt: the weight in {piece!r} is not a number") from None


def _merge_equal_weights(parts):
    merged = [parts[0]]
    for text, weight in parts[1:]:
        if weight == merged[-1][1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return merged


@dataclass
class Chunk:
    """One encoder input: 77 token ids [start, 75 tokens or padding, end] and their weights."""
    ids: list[int]
    weights: list[float]


def empty_chunk(tokenizer) -> Chunk:
    """The empty prompt's chunk: [start, end × 76], every weight 1 (padding for shorter prompts)."""
    return Chunk([tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (CHUNK_LENGTH + 1), [1.0] * (CHUNK_LENGTH + 2))


def tokenize_line(line: str, tokenizer, embeddings=()) -> tuple[list[Chunk], list]:
    """A prompt -> (its chunks, the embeddings it uses), A1111's rules (module docstring).

    `embeddings`: loaded textual inversions (`tinysd.embeddings.TextualInversion`, with .token
    and .ids), found in the prompt by the tokens of their names, as A1111 finds them.
    """
    lookup = _embedding_lookup(tokenizer, embeddings)
    comma = tokenizer.encoder.get(",</w>")
    chunks, used = [], []
    tokens, weights = [], []      # the chunk being filled
    last_comma = -1               # where in it the last comma is

    def close_chunk():
        nonlocal tokens, weights, last_comma
        pad = CHUNK_LENGTH - len(tokens)
        chunks.append(Chunk([tokenizer.bos_token_id, *tokens, *[tokenizer.eos_token_id] * pad, tokenizer.eos_token_id],
                            [1.0, *weights, *[1.0] * pad, 1.0]))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(line):
        if text == BREAK and weight == -1:
            close_chunk()
            continue
        ids = tokenizer.encode(text, added_tokens=False)
        position = 0
        while position < len(ids):
            if ids[position] == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK_LENGTH and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                moved = tokens[last_comma + 1:], weights[last_comma + 1:]   # the words after the comma
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                close_chunk()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK_LENGTH:
                close_chunk()
            found = _embedding_at(lookup, ids, position)
            if found is None:
                tokens.append(ids[position])
                weights.append(weight)
                position += 1
                continue
            name_length, ti = found
            if len(tokens) + len(ti.ids) > CHUNK_LENGTH:    # an embedding is never split
                close_chunk()
            tokens += ti.ids
            weights += [weight] * len(ti.ids)
            used += [] if any(u is ti for u in used) else [ti]
            position += name_length
    if tokens or not chunks:
        close_chunk()
    return chunks, used


def _embedding_lookup(tokenizer, embeddings):
    """first token of a name -> [(the name's tokens, embedding)], longest names first."""
    lookup = {}
    for ti in embeddings:
        if len(ti.ids) > CHUNK_LENGTH:
            raise ValueError(f"embedding {ti.token!r} has {len(ti.ids)} vectors, more than a chunk's {CHUNK_LENGTH}")
        name = tokenizer.encode(ti.token, added_tokens=False)
        if name:
            lookup.setdefault(name[0], []).append((name, ti))
    for matches in lookup.values():
        matches.sort(key=lambda m: len(m[0]), reverse=True)
    return lookup


def _embedding_at(lookup, ids, position):
    """(length of the name in tokens, embedding) if an embedding's name starts at ids[position]."""
    for name, ti in lookup.get(ids[position], ()):
        if ids[position:position + len(name)] == name:
            return len(name), ti
    return None


def emphasis(z, weights):
    """A1111's "Original" emphasis on one chunk's encoder output z (77, D) with its 77 weights:
    z' = (z ⊙ w) · mean(z) / mean(z ⊙ w)  (the rescale keeps the chunk's mean, float32)."""
    z = np.asarray(z, dtype=np.float32)
    original_mean = z.mean()
    z = z * np.asarray(weights, dtype=np.float32)[:, None]
    return z * (original_mean / z.mean())
