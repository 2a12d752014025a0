"""safetensors, read from its specification (the reference library's Rust `read_metadata` and
`validate` give the rules): see `read_safetensors`."""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from tinysd.readers import (MAX_BYTES, MAX_DIMS, CheckpointError, _bf16_to_f32, _claimed_bytes, _is_int,
                            _Malformed, _short)


SAFETENSORS_DTYPES = {   # the format's dtype names -> NumPy; BF16 is read as its bits and widened below
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "C64": "<c8",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "b1",
}
SAFETENSORS_MAX_HEADER = 100_000_000   # bytes, the reference library's limit
SAFETENSORS_MAX_DEPTH = 127            # JSON nesting serde_json (the reference parser) allows; a header needs 3


def read_safetensors(path):
    """{name: array} from a .safetensors file: views into one read-only memmap of the file (BF16 is
    widened to a float32 copy). The format, and the rules checked here (those of the reference
    library, `safetensors`' Rust `read_metadata` and `validate`):

    - bytes 0..8: N, the header's length, little-endian u64; N ≤ 100,000,000 and 8 + N ≤ file size;
    - bytes 8..8+N: the header, UTF-8 JSON (spaces may pad it), an object; in it no key appears twice,
      nesting is at most 127 deep, and every number is an integer (no fractions, no exponents, no
      NaN or Infinity);
    - the header's `__metadata__`, if present, maps strings to strings (or is null);
    - every other key names a tensor: {"dtype": one of SAFETENSORS_DTYPES, "shape": [n ≥ 0, ...],
      "data_offsets": [begin, end]}, byte offsets into the data section (other fields are ignored,
      as the reference library ignores them);
    - end − begin = product(shape) × the dtype's size;
    - the data section is bytes 8+N.. to the end of the file, and the tensors, sorted by offsets,
      tile it exactly: the first begins at 0, each begins where the previous ended, the last ends at
      the end of the file (no gap, no overlap, no bytes left over).

    Anything else raises one CheckpointError naming the file, the tensor and the rule.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = _safetensors_header_length(f.read(8), size)
            header = _safetensors_header(f.read(n))
    except _Malformed as e:
        raise CheckpointError(f"{path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({_short(e)})") from None
    try:
        entries = _safetensors_layout(header, data_size=size - 8 - n)
    except _Malformed as e:
        raise CheckpointError(f"{path}: {e}") from None
    if size - 8 - n == 0:
        data = np.zeros(0, np.uint8)
    else:
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(size - 8 - n,)).view(np.ndarray)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot map the data section ({_short(e)})") from None
    return {name: _safetensors_array(data, dtype, shape, begin, end) for name, dtype, shape, begin, end in entries}


def _safetensors_header_length(prefix, size):
    if len(prefix) < 8:
        raise _Malformed(f"not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
    (n,) = struct.unpack("<Q", prefix)
    if n > SAFETENSORS_MAX_HEADER:
        raise _Malformed(f"safetensors header length {n} is over the format's limit of {SAFETENSORS_MAX_HEADER} bytes")
    if n > size - 8:
        raise _Malformed(f"truncated safetensors header: it claims {n} bytes, the file has {size - 8} "
                         f"after the length field")
    return n


# A JSON string (escapes included); an unterminated one runs to the end, so a match never fails
# and the scan stays linear.
_JSON_STRING = re.compile(r'"(?:[^"\\]+|\\.)*(?:"|\\?\Z)', re.S)


def _json_depth(text):
    """How deeply the JSON text nests [ and { (strings skipped), without parsing it: the running
    sum of +1 per opening and −1 per closing bracket, in chunks of a million brackets."""
    brackets = re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub('""', text)).encode()
    deepest = depth = 0
    for start in range(0, len(brackets), 1 << 20):
        chunk = np.frombuffer(brackets[start: start + (1 << 20)], np.uint8)
        levels = depth + np.cumsum(np.where((chunk == ord("[")) | (chunk == ord("{")), 1, -1))
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def _json_object(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Malformed(f"safetensors header has the key {_short(repr(twice))} twice")
    return obj


def _json_int(text):
    if text == "-0":                             # a float to the reference parser (serde_json)
        _json_not_integer(text)
    if len(text.lstrip("-")) > 20:              # u64 has at most 20 digits
        raise _Malformed(f"safetensors header has the number {_short(text)}, larger than any offset or size")
    return int(text)


def _json_not_integer(text):
    raise _Malformed(f"safetensors header has the number {_short(text)}, not an integer")


def _safetensors_header(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed(f"safetensors header is not UTF-8 ({e.reason} at byte {8 + e.start})") from None
    depth = _json_depth(text)
    if depth > SAFETENSORS_MAX_DEPTH:
        raise _Malformed(f"safetensors header nests {depth} levels deep, over the limit of {SAFETENSORS_MAX_DEPTH}")
    try:
        header = json.loads(text, object_pairs_hook=_json_object, parse_int=_json_int,
                            parse_float=_json_not_integer, parse_constant=_json_not_integer)
    except json.JSONDecodeError as e:
        raise _Malformed(f"safetensors header is not valid JSON ({_short(e)})") from None
    if not isinstance(header, dict):
        raise _Malformed(f"safetensors header is a JSON {type(header).__name__}, expected an object")
    return header


def _utf8(text, what):
    """A JSON string must be text the reference library can hold: no lone UTF-16 surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Malformed(f"{what} {_short(ascii(text))} is not valid Unicode (a lone surrogate)") from None


def _safetensors_layout(header, data_size):
    """[(name, dtype, shape, begin, end)] from the parsed header, every rule of the layout checked."""
    metadata = header.get("__metadata__")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _Malformed("safetensors __metadata__ must map strings to strings")
        for key, value in metadata.items():
            _utf8(key, "__metadata__ key")
            _utf8(value, "__metadata__ value")
    entries = [_safetensors_entry(name, info) for name, info in header.items() if name != "__metadata__"]
    end, previous = 0, None
    for name, dtype, shape, begin, stop in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != end:
            where = f"where {_short(repr(previous))} ends" if previous is not None else "at the data section's start"
            raise _Malformed(f"tensor {_short(repr(name))}: its data begins at byte {begin}, not {end} {where} "
                             f"({'a gap' if begin > end else 'an overlap'} in the data section)")
        if stop > data_size:
            raise _Malformed(f"truncated data section: tensor {_short(repr(name))} needs bytes [{begin}, {stop}) "
                             f"but the file has only {data_size} data bytes")
        end, previous = stop, name
    if end != data_size:
        last = f" ({_short(repr(previous))} ends at byte {end} of {data_size})" if previous is not None else ""
        raise _Malformed(f"{data_size - end} bytes left over after the last tensor's data{last}")
    return entries


def _safetensors_entry(name, info):
    _utf8(name, "tensor name")
    tensor = f"tensor {_short(repr(name))}"
    if not isinstance(info, dict):
        raise _Malformed(f"{tensor}: its header entry is a JSON {type(info).__name__}, expected an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise _Malformed(f"{tensor}: its header entry has no {field!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _Malformed(f"{tensor}: unknown or unsupported dtype {_short(repr(dtype))} "
                         f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise _Malformed(f"{tensor}: shape {_short(shape)} is not a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise _Malformed(f"{tensor}: shape has {len(shape)} dimensions, over NumPy's limit of {MAX_DIMS}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and 0 <= o < 2**64 for o in offsets)):
        raise _Malformed(f"{tensor}: data_offsets {_short(offsets)} is not [begin, end] in bytes")
    begin, end = offsets
    itemsize = int(SAFETENSORS_DTYPES[dtype][-1])          # "<f4" -> 4
    if _claimed_bytes(shape, itemsize) > MAX_BYTES:
        raise _Malformed(f"{tensor}: shape {_short(shape)} of {dtype} is larger than any array can be")
    nbytes = math.prod(shape) * itemsize
    if end - begin != nbytes:
        raise _Malformed(f"{tensor} ({dtype}, shape {shape}) needs {nbytes} bytes, its offsets [{begin}, {end}) "
                         f"give {end - begin}")
    return name, dtype, tuple(shape), begin, end


def _safetensors_array(data, dtype, shape, begin, end):
    array = data[begin:end].view(SAFETENSORS_DTYPES[dtype]).reshape(shape)
    return _bf16_to_f32(array) if dtype == "BF16" else array
