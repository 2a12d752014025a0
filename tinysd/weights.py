"""Finding and reading SD v1 checkpoints, without torch.

    ckpt = load_checkpoint("stable-diffusion-v1-5/stable-diffusion-v1-5")  # model id, folder or file
    ckpt.configs["unet"]           # diffusers' config.json as a dict (also vae, text_encoder, scheduler)
    ckpt.state_dicts["unet"]       # diffusers key -> np.ndarray, memory-mapped where possible

Two published layouts:

- the diffusers folder: unet/, vae/, text_encoder/ each with a config.json and a safetensors
  file (fp32, or the `.fp16.safetensors` variant), plus tokenizer/ and scheduler/;
- the original single file (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`) with all three
  models under the original names, renamed by `tinysd.single_file`; its configs are SD v1.5's,
  shipped in tinysd/data/sd-v1-5/.

Two file formats, both read here from their specifications:

- safetensors: 8 bytes little-endian header length N, N bytes of JSON
  {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the raw little-endian data;
  each tensor is a view into one `np.memmap` of the file (read_safetensors).
- .ckpt (also .pt, .bin): a PyTorch zip archive, `<top>/data.pkl` (the pickled object) and
  `<top>/data/<key>` (each storage's raw bytes). The pickle is run by a small unpickler of our
  own that knows the opcodes torch.save writes and resolves only the handful of globals that
  checkpoints, embeddings and LoRA files need, so no code from the file ever runs (read_ckpt).

Every rule of each format is one check, and a file that breaks one raises one CheckpointError
naming the file and the rule: no other exception, no crash (scripts/fuzz_readers.py and
tests/test_fuzz_readers.py load mutated files by the hundred thousand to keep it so).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import reprlib
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinysd import single_file

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_CONFIGS = Path(__file__).parent / "data" / "sd-v1-5"
PARTS = ("unet", "vae", "text_encoder")
SINGLE_FILES = (".safetensors", ".ckpt")
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# Models shipped inside the package, by name: ordinary diffusers folders (see training/).
PACKAGED = {"shapes": Path(__file__).parent / "data" / "shapes"}


class CheckpointError(ValueError):
    """A checkpoint file that is malformed, truncated, or asks for something not allowed."""


class ModelNotFoundError(FileNotFoundError):
    """A model id that is neither a local path nor reachable in (or cached from) the hub."""


@dataclass
class Checkpoint:
    configs: dict          # "unet", "vae", "text_encoder", "scheduler" -> config dict
    state_dicts: dict      # "unet", "vae", "text_encoder" -> {diffusers/transformers key: np.ndarray}
    tokenizer_dir: Path | None   # a tokenizer/ folder (vocab.json, merges.txt), None for single files
    source: str


# Reading a file: every rule of the format is one check, and every failure is one CheckpointError


class _Malformed(Exception):
    """A broken rule, raised deep inside a reader; the reader's entry point adds the file's name
    and turns it into CheckpointError."""


def _short(value, limit=80):
    """A name, value or message from a file, shortened to one line for an error message (reprlib
    bounds the work on deeply nested values)."""
    text = value if isinstance(value, str) else str(value) if isinstance(value, BaseException) else reprlib.repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


# safetensors


SAFETENSORS_DTYPES = {   # the format's dtype names -> NumPy; BF16 is read as its bits and widened below
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "C64": "<c8",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "b1",
}
SAFETENSORS_MAX_HEADER = 100_000_000   # bytes, the reference library's limit
SAFETENSORS_MAX_DEPTH = 127            # JSON nesting serde_json (the reference parser) allows; a header needs 3
MAX_DIMS = 64                          # NumPy's limit on an array's number of dimensions
MAX_BYTES = 1 << 62                    # no array, not even an empty or a broadcast one, claims more


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


def _claimed_bytes(shape, itemsize):
    """The bytes NumPy reserves room for: the product of the dimensions (zeros counted as ones)."""
    return math.prod(max(n, 1) for n in shape) * itemsize


def _safetensors_array(data, dtype, shape, begin, end):
    array = data[begin:end].view(SAFETENSORS_DTYPES[dtype]).reshape(shape)
    return _bf16_to_f32(array) if dtype == "BF16" else array


def _bf16_to_f32(bits):
    """bfloat16 is the top half of a float32: shift the 16 bits up (exact). In place on the copy,
    so a 0-d array stays an array."""
    widened = bits.astype(np.uint32)
    widened <<= 16
    return widened.view(np.float32)


# .ckpt (PyTorch zip pickle)


TORCH_STORAGES = {  # torch's typed storage classes -> the NumPy dtype of their bytes
    "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2", "DoubleStorage": "<f8",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "b1",
}
TORCH_DTYPES = {  # torch.float32 & co., as torch.save writes a dtype that is a value in the dict
    "float32": "<f4", "float": "<f4", "float16": "<f2", "half": "<f2", "float64": "<f8", "double": "<f8",
    "int64": "<i8", "long": "<i8", "int32": "<i4", "int": "<i4", "int16": "<i2", "short": "<i2",
    "int8": "i1", "uint8": "u1", "bool": "b1",
}
TORCH_BF16 = np.dtype(TORCH_STORAGES["BFloat16Storage"])   # bfloat16's bits, as uint16
NUMPY_DTYPES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}
TORCH_FILE_VERSIONS = range(1, 11)     # the `version` record torch.load accepts
MAX_PICKLE_BYTES = 256 << 20           # data.pkl of an SD checkpoint is < 1 MB; this bounds the unpickler's memory
DEFLATE_MAX_RATIO = 1032               # deflate's largest possible expansion
MAX_NESTING = 100                      # containers in the pickle nested deeper than this are refused


class _Global:
    """An allow-listed global. `build` checks every argument it gets before it makes anything;
    `is_class` says whether NEWOBJ may instantiate it (else only REDUCE may call it)."""

    def __init__(self, qualname, build=None, is_class=False):
        self.qualname, self.build, self.is_class = qualname, build, is_class
        if build is not None:       # (fewest, most) positional arguments build takes
            parameters = inspect.signature(build).parameters.values()
            self.arity = sum(p.default is p.empty for p in parameters), len(parameters)

    def __repr__(self):
        return self.qualname


class _StorageType:
    """torch.FloatStorage & co. in the pickle: only its name (and so its dtype) is used."""

    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(TORCH_STORAGES[name])

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """A storage: its elements as a 1-D array (a view of the file's memmap; bfloat16 widened to a
    float32 copy), and its type name."""

    def __init__(self, name, array):
        self.name, self.array = name, array

    def value(self):
        return self.array


class _DType:
    """numpy.dtype(name, align, copy), then BUILD with its state: plain numeric dtypes only."""

    def __init__(self, name, align=False, copy=False):
        if not (isinstance(name, str) and name in NUMPY_DTYPES and isinstance(align, bool) and isinstance(copy, bool)):
            raise _Malformed(f"the pickle asks for numpy.dtype{_short((name, align, copy))}; only plain numeric "
                             f"dtypes are allowed")
        self.name, self.dtype = name, None

    def build(self, state):
        # (version 3, byte order, subarray, names, fields, itemsize, alignment, flags), as NumPy
        # writes it for a plain numeric dtype
        if not (self.dtype is None and isinstance(state, tuple) and len(state) == 8 and _equal(state[0], 3)
                and isinstance(state[1], str) and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None
                and _equal(state[5], -1) and _equal(state[6], -1) and _equal(state[7], 0)):
            raise _Malformed(f"numpy dtype {self.name!r} with an unexpected state in the pickle")
        self.dtype = np.dtype(self.name).newbyteorder("=" if state[1] == "|" else state[1])

    def value(self):
        if self.dtype is None:
            raise _Malformed(f"numpy dtype {self.name!r} is used before its state is set")
        return self.dtype


class _NDArray:
    """numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b'), then BUILD with the array's
    state (version 1, shape, dtype, Fortran order, raw bytes): a plain numeric array whose bytes
    are exactly product(shape) × itemsize."""

    def __init__(self):
        self.array = None

    def build(self, state):
        if not (self.array is None and isinstance(state, tuple) and len(state) == 5 and _equal(state[0], 1)):
            raise _Malformed("numpy array with an unexpected state in the pickle")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS and all(_is_int(n) and n >= 0 for n in shape)):
            raise _Malformed(f"numpy array with shape {_short(shape)} in the pickle")
        if not (isinstance(dtype, _DType) and isinstance(fortran, bool) and isinstance(raw, bytes)):
            raise _Malformed("numpy array state in the pickle is not (1, shape, dtype, order, bytes)")
        dtype = dtype.value()
        needed = math.prod(shape) * dtype.itemsize
        if _claimed_bytes(shape, dtype.itemsize) > MAX_BYTES or len(raw) != needed:
            raise _Malformed(f"numpy array of shape {shape} and dtype {dtype} in the pickle has {len(raw)} bytes, "
                             f"needs {needed}")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")

    def value(self):
        if self.array is None:
            raise _Malformed("numpy array is used before its state is set")
        return self.array


class _ParameterDict:
    """torch.nn.ParameterDict as torch.save writes it (a module: NEWOBJ, then BUILD with its
    __dict__); it becomes the plain dict of its `_parameters`, the rest of the module's state
    (hooks, `_keys`, which torch < 1.12 did not write) is not needed, as in A1111's loader."""

    def __init__(self):
        self.parameters = None

    def build(self, state):
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if self.parameters is not None or not isinstance(parameters, dict):
            raise _Malformed("torch.nn.ParameterDict with an unexpected state in the pickle")
        if not all(isinstance(k, str) and (v is None or isinstance(v, np.ndarray)) for k, v in parameters.items()):
            raise _Malformed("torch.nn.ParameterDict whose _parameters are not named tensors")
        self.parameters = {k: v for k, v in parameters.items() if v is not None}

    def value(self):
        if self.parameters is None:
            raise _Malformed("torch.nn.ParameterDict is used before its state is set")
        return self.parameters


STAND_INS = (_Storage, _DType, _NDArray, _ParameterDict)    # replaced by their value() at the end


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """A tensor is a strided view of its storage: element [i, j, ...] = storage[offset + Σ index·stride].

    The numbers come from the file, so they are proved to stay inside the storage before the view
    is made: offset, sizes and strides are integers ≥ 0, one stride per dimension, and the element
    farthest from the start, storage[offset + Σ (size−1)·stride], lies inside the storage. With
    every stride ≥ 0 every element lies between the first and that one. (As for torch, every
    number must also fit in 64 bits.) The view is made by np.ndarray(buffer=...), which checks
    the same bounds again; there is no as_strided.
    """
    if not isinstance(storage, _Storage):
        raise _Malformed("_rebuild_tensor_v2 called on something that is not a storage")
    if not (_is_int(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(_is_int(n) for n in (*size, *stride))):
        raise _Malformed(f"tensor offset {_short(offset)}, size {_short(size)}, stride {_short(stride)} "
                         f"are not integers")
    if not (isinstance(requires_grad, bool) and isinstance(backward_hooks, dict)
            and (metadata is None or isinstance(metadata, dict))):
        raise _Malformed("tensor with a requires_grad that is not a bool or backward hooks that are not a dict")
    array = storage.array
    what = _Lazy(lambda: f"tensor of size {_short(size)} with strides {_short(stride)} at offset {offset}")
    if len(size) != len(stride) or len(size) > MAX_DIMS:
        raise _Malformed(f"{what}: needs one stride per dimension, at most {MAX_DIMS} dimensions")
    if not all(0 <= n < 2**63 for n in (offset, *size, *stride)):
        raise _Malformed(f"{what}: offset, sizes and strides must be ≥ 0 (and fit in 64 bits)")
    if _claimed_bytes(size, array.itemsize) > MAX_BYTES:
        raise _Malformed(f"{what}: larger than any array can be")
    if requires_grad and array.dtype.kind not in "fc":
        raise _Malformed(f"{what}: a {storage.name} tensor cannot require gradients")
    if 0 in size:
        view = np.zeros(size, array.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= len(array):
            raise _Malformed(f"{what}: reaches element {last} of a storage of {len(array)} elements")
        # in bytes; a size-1 dimension's stride is never used, so it may be anything in the file
        strides = [s * array.itemsize if n > 1 else 0 for n, s in zip(size, stride)]
        view = np.ndarray(size, array.dtype, buffer=array, offset=offset * array.itemsize, strides=strides)
    view.flags.writeable = False
    return view


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """torch.nn.Parameter(data) (with extra attributes `state`, dropped): the tensor itself."""
    if not (isinstance(data, np.ndarray) and isinstance(requires_grad, bool) and isinstance(backward_hooks, dict)
            and (state is None or isinstance(state, dict))):
        raise _Malformed("_rebuild_parameter with unexpected arguments in the pickle")
    return data


def _ordered_dict():
    """collections.OrderedDict() (its items follow by SETITEMS): a plain dict, which keeps order."""
    return {}


def _set(items=()):
    if not (isinstance(items, list) and all(_is_key(v) for v in items)):
        raise _Malformed("a set of something other than numbers and strings in the pickle")
    return set(items)


def _reconstruct(subtype, shape, dtype_code):
    if not (subtype is NUMPY_NDARRAY and type(shape) is tuple and len(shape) == 1 and _equal(shape[0], 0)
            and isinstance(dtype_code, (bytes, str)) and dtype_code in (b"b", "b")):
        raise _Malformed(f"numpy _reconstruct{_short((subtype, shape, dtype_code))} in the pickle; only "
                         f"_reconstruct(numpy.ndarray, (0,), b'b') is allowed")
    return _NDArray()


def _numpy_scalar(dtype, data):
    """numpy.core.multiarray.scalar(dtype, bytes), as Lightning pickles NumPy numbers."""
    if not (isinstance(dtype, _DType) and isinstance(data, bytes) and len(data) == dtype.value().itemsize):
        raise _Malformed("numpy scalar with unexpected arguments in the pickle")
    return np.frombuffer(data, dtype.value(), count=1)[0]


def _codecs_encode(text, encoding):
    """Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')."""
    if not (isinstance(encoding, str) and encoding in ("latin1", "latin-1") and isinstance(text, str)
            and max(text, default="\0") <= "\xff"):
        raise _Malformed("_codecs.encode with unexpected arguments in the pickle")
    return text.encode("latin1")


def _torch_size(sizes):
    if not (isinstance(sizes, (tuple, list)) and all(_is_int(n) and n >= 0 for n in sizes)):
        raise _Malformed(f"torch.Size({_short(sizes)}) in the pickle")
    return tuple(sizes)


NUMPY_NDARRAY = _Global("numpy.ndarray")      # only ever an argument of _reconstruct
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _Global("collections.OrderedDict", _ordered_dict, is_class=True),
    ("builtins", "set"): _Global("builtins.set", _set, is_class=True),
    ("__builtin__", "set"): _Global("builtins.set", _set, is_class=True),   # protocol 2 names Python 2's module
    ("torch._utils", "_rebuild_tensor_v2"): _Global("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Global("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"):
        _Global("torch._utils._rebuild_parameter_with_state", _rebuild_parameter),
    ("torch.nn.modules.container", "ParameterDict"):
        _Global("torch.nn.modules.container.ParameterDict", _ParameterDict, is_class=True),
    ("torch", "Size"): _Global("torch.Size", _torch_size, is_class=True),
    ("numpy", "ndarray"): NUMPY_NDARRAY,
    ("numpy", "dtype"): _Global("numpy.dtype", _DType, is_class=True),
    ("_codecs", "encode"): _Global("_codecs.encode", _codecs_encode),
    # Lightning keys its callback states by the callback class; the class itself is never called.
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"):
        _Global("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    **{(module, name): _Global(f"{module}.{name}", build)
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name, build in (("_reconstruct", _reconstruct), ("scalar", _numpy_scalar))},
}


def _equal(x, expected):
    """x == expected for an int or str from the pickle, without calling == on anything else
    (an array's == does not answer True or False)."""
    return type(x) is type(expected) and x == expected


def _decode(raw, errors="strict"):
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise _Malformed(f"the pickle has a string that is not UTF-8 ({e.reason})") from None


def _what(x):
    """An object of the pickle, named for an error message."""
    return x.qualname if isinstance(x, _Global) else repr(x) if isinstance(x, _StorageType) else f"a {type(x).__name__}"


def _is_key(x):
    """What a dict key or a set element may be: a number, a string, an allow-listed class (Lightning)."""
    return x is None or isinstance(x, (bool, int, float, str, bytes, _Global))


_INT32, _UINT16, _UINT32, _FLOAT64_BE = (struct.Struct(f) for f in ("<i", "<H", "<I", ">d"))


class _Lazy:
    """A message made only if it is shown."""

    def __init__(self, make):
        self.make = make

    def __str__(self):
        return self.make()


class _Unpickler:
    """The part of the pickle machine that torch.save's files use (protocol 2), the same opcodes
    torch's own weights_only unpickler knows, each one method below. A pickle is a program for a
    stack machine: opcodes push values, build tuples, lists and dicts from the top of the stack,
    remember values in a memo, and call globals. Here only ALLOWED_GLOBALS can be named, torch's
    storage types and dtypes stand for themselves, and nothing is ever imported or called
    but the functions above."""

    def __init__(self, program, load_storage):
        self.program, self.at, self.load_storage = program, 0, load_storage
        self.stack, self.marks, self.memo = [], [], {}

    def load(self):
        program, opcodes = self.program, self.OPCODES
        while self.at < len(program):
            code = program[self.at]
            self.at += 1
            if code == ord("."):                                    # STOP: the value on top is the result
                return self.pop()
            op = opcodes.get(code)
            if op is None:
                raise _Malformed(f"the pickle uses opcode {bytes([code])!r} at byte {self.at - 1}, which torch.save's "
                                 f"protocol 2 does not write (torch.load(weights_only=True) refuses it too)")
            op(self)
        raise _Malformed("the pickle ends without its STOP instruction")

    def read(self, n):
        if self.at + n > len(self.program):
            raise _Malformed("the pickle ends in the middle of an instruction")
        self.at += n
        return self.program[self.at - n: self.at]

    def unpack(self, fmt):          # fmt: a struct.Struct
        return fmt.unpack(self.read(fmt.size))[0]

    def push(self, value):
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Malformed("the pickle takes a value from an empty stack")
        return self.stack.pop()

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Malformed("the pickle uses a value from an empty stack")
        return self.stack[-1]

    def pop_mark(self):
        if not self.marks:
            raise _Malformed("the pickle closes a MARK it never opened")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    # values
    def proto(self):            # PROTO n: the protocol version
        self.read(1)

    def none(self):             # N
        self.push(None)

    def true(self):             # \x88 NEWTRUE
        self.push(True)

    def false(self):            # \x89 NEWFALSE
        self.push(False)

    def binint(self):           # J: 4-byte signed int
        self.push(self.unpack(_INT32))

    def binint1(self):          # K: 1-byte unsigned int
        self.push(self.read(1)[0])

    def binint2(self):          # M: 2-byte unsigned int
        self.push(self.unpack(_UINT16))

    def long1(self):            # \x8a n: an n-byte two's-complement int
        self.push(int.from_bytes(self.read(self.read(1)[0]), "little", signed=True))

    def binfloat(self):         # G: 8-byte big-endian float
        self.push(self.unpack(_FLOAT64_BE))

    def binunicode(self):       # X n: an n-byte UTF-8 string
        self.push(_decode(self.read(self.unpack(_UINT32)), "surrogatepass"))

    def short_binstring(self):  # U n: an n-byte string (Python 2's str), read as UTF-8 as torch.load does
        self.push(_decode(self.read(self.read(1)[0])))

    # containers
    def mark(self):             # (: remember where a variable-length group of values starts
        self.marks.append(len(self.stack))

    def empty_tuple(self):      # )
        self.push(())

    def tuple_(self):           # t: the values since the mark, as a tuple
        self.push(tuple(self.pop_mark()))

    def tuple1(self):           # \x85
        self.push((self.pop(),))

    def tuple2(self):           # \x86
        b, a = self.pop(), self.pop()
        self.push((a, b))

    def tuple3(self):           # \x87
        c, b, a = self.pop(), self.pop(), self.pop()
        self.push((a, b, c))

    def empty_list(self):       # ]
        self.push([])

    def empty_dict(self):       # }
        self.push({})

    def empty_set(self):        # \x8f
        self.push(set())

    def append(self):           # a: list.append(value)
        value = self.pop()
        self.target(list).append(value)

    def appends(self):          # e: list.extend(the values since the mark)
        values = self.pop_mark()
        self.target(list).extend(values)

    def setitem(self):          # s: dict[key] = value
        value, key = self.pop(), self.pop()
        self.setitems_of([key, value])

    def setitems(self):         # u: dict[k1] = v1, dict[k2] = v2, ... from the values since the mark
        self.setitems_of(self.pop_mark())

    def setitems_of(self, items):
        target = self.target(dict)
        if len(items) % 2:
            raise _Malformed("the pickle sets a dict item without a value")
        for key, value in zip(items[::2], items[1::2]):
            if not _is_key(key):
                raise _Malformed(f"the pickle uses a {type(key).__name__.strip('_')} as a dict key")
            target[key] = value

    def target(self, kind):
        obj = self.top()
        if type(obj) is not kind:
            raise _Malformed(f"the pickle adds items to a {type(obj).__name__.strip('_')}, expected a {kind.__name__}")
        return obj

    # the memo
    def binput(self):           # q i: memo[i] = the top value
        self.memo[self.read(1)[0]] = self.top()

    def long_binput(self):      # r i
        self.memo[self.unpack(_UINT32)] = self.top()

    def binget(self):           # h i: push memo[i]
        self.get(self.read(1)[0])

    def long_binget(self):      # j i
        self.get(self.unpack(_UINT32))

    def get(self, i):
        if i not in self.memo:
            raise _Malformed(f"the pickle refers to memo entry {i}, which it never stored")
        self.push(self.memo[i])

    # globals, calls, objects
    def global_(self):          # c module\nname\n: an allow-listed global
        module, name = self.readline(), self.readline()
        if module == "torch" and name in TORCH_STORAGES:
            self.push(_StorageType(name))
        elif module == "torch" and name in TORCH_DTYPES:
            self.push(np.dtype(TORCH_DTYPES[name]))
        elif (module, name) in ALLOWED_GLOBALS:
            self.push(ALLOWED_GLOBALS[module, name])
        else:
            raise _Malformed(f"the pickle references the global {_short(module)}.{_short(name)}, which is not on "
                             f"the allow-list of what a checkpoint needs; refusing to load it")

    def readline(self):
        end = self.program.find(b"\n", self.at, self.at + 256)
        if end < 0:
            raise _Malformed("the pickle names a global without ending the line")
        return _decode(self.read(end + 1 - self.at)[:-1])

    def reduce(self):           # R: callable(*args)
        args, func = self.pop(), self.pop()
        self.push(self.call(func, args, "call"))

    def newobj(self):           # \x81: cls.__new__(cls, *args)
        args, cls = self.pop(), self.pop()
        if not (isinstance(cls, _Global) and cls.is_class):
            raise _Malformed(f"the pickle makes a new {_what(cls)} object, which is not allowed")
        self.push(self.call(cls, args, "make"))

    def call(self, func, args, verb):
        if not (isinstance(func, _Global) and func.build is not None):
            raise _Malformed(f"the pickle tries to {verb} {_what(func)}, which is not allowed")
        if not isinstance(args, tuple):
            raise _Malformed(f"the pickle calls {func} with arguments that are not a tuple")
        fewest, most = func.arity
        if not fewest <= len(args) <= most:
            raise _Malformed(f"the pickle calls {func} with {len(args)} arguments, which it does not take")
        return func.build(*args)

    def build(self):            # b: set the state of the object on top (NumPy arrays and dtypes, ParameterDict)
        state, obj = self.pop(), self.top()
        if isinstance(obj, (_DType, _NDArray, _ParameterDict)):
            obj.build(state)
        elif type(obj) is dict and isinstance(state, dict) and all(isinstance(k, str) for k in state):
            pass     # an OrderedDict's attributes, e.g. state_dict()'s _metadata: not needed
        else:
            raise _Malformed(f"the pickle sets the state of a {type(obj).__name__.strip('_')}, which is not allowed")

    def binpersid(self):        # Q: a storage, ("storage", storage type, key, location, numel)
        pid = self.pop()
        if not (isinstance(pid, tuple) and len(pid) == 5 and _equal(pid[0], "storage")
                and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[3], str) and _is_int(pid[4]) and pid[4] >= 0):
            raise _Malformed(f"unexpected persistent id in the pickle: {_short(pid)}")
        _, storage_type, key, _location, numel = pid
        self.push(_Storage(storage_type.name, self.load_storage(key, storage_type.dtype, numel)))

    OPCODES = {ord(code): op for code, op in {
        "\x80": proto, "N": none, "\x88": true, "\x89": false, "J": binint, "K": binint1, "M": binint2,
        "\x8a": long1, "G": binfloat, "X": binunicode, "U": short_binstring, "(": mark, ")": empty_tuple,
        "t": tuple_, "\x85": tuple1, "\x86": tuple2, "\x87": tuple3, "]": empty_list, "}": empty_dict,
        "\x8f": empty_set, "a": append, "e": appends, "s": setitem, "u": setitems, "q": binput, "r": long_binput,
        "h": binget, "j": long_binget, "c": global_, "R": reduce, "\x81": newobj, "b": build, "Q": binpersid,
    }.items()}


def _resolve(root):
    """The unpickled object with every stand-in (STAND_INS) replaced by its value. Refuses cycles
    and nesting deeper than MAX_NESTING (a checkpoint has neither)."""
    done, open_ = {}, set()

    def visit(obj, depth):
        if _is_key(obj) or isinstance(obj, (np.ndarray, np.generic, np.dtype)):
            return obj
        if id(obj) in done:
            return done[id(obj)][1]
        if id(obj) in open_:
            raise _Malformed("the pickle's objects contain themselves (a cycle)")
        if depth > MAX_NESTING:
            raise _Malformed(f"the pickle's objects nest more than {MAX_NESTING} levels deep")
        open_.add(id(obj))
        if isinstance(obj, STAND_INS):
            value = obj.value()
            value = visit(value, depth) if isinstance(value, dict) else value
        elif type(obj) is dict:
            for key in obj:
                obj[key] = visit(obj[key], depth + 1)
            value = obj
        elif type(obj) is list:
            obj[:] = [visit(v, depth + 1) for v in obj]
            value = obj
        elif type(obj) is tuple:
            value = tuple(visit(v, depth + 1) for v in obj)
        elif type(obj) is set:
            value = obj
        else:
            raise _Malformed(f"the pickle leaves a bare {type(obj).__name__.strip('_')} in the checkpoint")
        open_.discard(id(obj))
        done[id(obj)] = obj, value       # holding obj keeps its id from being reused by a new object
        return value

    return visit(root, 0)


# What a malformed zip archive can raise from zipfile and zlib (the unpickler raises only _Malformed).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, struct.error, NotImplementedError,
               RuntimeError, OverflowError, KeyError, IndexError)


def read_ckpt(path):
    """The unpickled object of a PyTorch zip checkpoint (.ckpt, .pt, .bin), tensors as read-only
    NumPy arrays. No torch, and no code from the file runs.

    The format (torch.save's, read by torch.load), and the rules checked here:
    - a zip archive whose members sit in one folder, <top>/ (the first member's), each stored or
      deflated, none encrypted;
    - <top>/version (or <top>/.data/version): the format version, an integer 1..10;
    - <top>/byteorder, if present: "little" (big-endian files are not supported);
      <top>/.storage_alignment, if present: an integer;
    - <top>/data.pkl: a pickle (≤ MAX_PICKLE_BYTES) of the saved object, read by _Unpickler:
      only ALLOWED_GLOBALS and torch's storage and dtype types may be named; tensors are
      _rebuild_tensor_v2(storage, offset, size, stride), each checked against its storage;
    - <top>/data/<key>: each storage's raw little-endian bytes, exactly numel × itemsize of them,
      memory-mapped from the file when stored (as torch.save writes them), else decompressed.

    Anything else raises one CheckpointError naming the file and the rule.
    """
    path = Path(path)
    try:
        file = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({_short(e)})") from None
    try:
        with file:
            if not zipfile.is_zipfile(file):
                raise _Malformed("not a PyTorch zip checkpoint (files saved by PyTorch < 1.6 in the legacy format "
                                 "are not supported; re-save them, or use a .safetensors file)")
            with zipfile.ZipFile(file) as archive:
                return _read_archive(path, archive)
    except _Malformed as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (UnicodeDecodeError, MemoryError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(e).__name__}: {_short(e, 200)})") from None
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path}: not a readable zip archive ({type(e).__name__}: {_short(e, 200)})") from None


def _read_archive(path, archive):
    infos = archive.infolist()
    top = infos[0].filename.split("/")[0] + "/" if infos and "/" in infos[0].filename else None
    if top is None or f"{top}data.pkl" not in set(archive.namelist()):
        raise _Malformed("no <top>/data.pkl in the zip archive; not a torch.save checkpoint")
    whole = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)   # one map of the file; storages are views of it
    names = set()
    for info in infos:
        if not info.filename.startswith(top):
            raise _Malformed(f"{_short(info.filename)} is not in the archive's folder {top}")
        if info.filename in names:
            raise _Malformed(f"the archive has two members named {_short(info.filename)}")
        names.add(info.filename)
        _check_member(info, len(whole))
        _data_start(whole, info)
    _check_end_records(whole, infos)
    _check_records(archive, top)
    storages = {}

    def load_storage(key, dtype, numel):
        """The storage's elements, read once however many tensors view it. bfloat16 is widened here,
        once per storage, so that no tensor (a broadcast view may claim far more elements than its
        storage has) is ever copied."""
        if key not in storages:
            array = _zip_member_array(archive, whole, f"{top}data/{key}", dtype, numel)
            storages[key] = dtype, numel, _bf16_to_f32(array) if dtype == TORCH_BF16 else array
        stored_dtype, stored_numel, array = storages[key]
        if (stored_dtype, stored_numel) != (dtype, numel):
            raise _Malformed(f"storage {_short(key)} is used as {numel} × {dtype} "
                             f"and as {stored_numel} × {stored_dtype}")
        return array

    program = _read_member(archive, f"{top}data.pkl", MAX_PICKLE_BYTES)
    return _resolve(_Unpickler(program, load_storage).load())


def _check_records(archive, top):
    """The small records torch.load reads before the pickle: version, byteorder, .storage_alignment."""
    names = set(archive.namelist())
    version = next((f"{top}{n}" for n in (".data/version", "version") if f"{top}{n}" in names), None)
    if version is None:
        raise _Malformed("no <top>/version record in the zip archive; not a torch.save checkpoint")
    text = _read_member(archive, version, 32).strip()
    if not (text.isdigit() and int(text) in TORCH_FILE_VERSIONS):
        raise _Malformed(f"unsupported checkpoint format version {_short(text)} (torch.load reads "
                         f"{TORCH_FILE_VERSIONS.start}..{TORCH_FILE_VERSIONS.stop - 1})")
    if f"{top}byteorder" in names and _read_member(archive, f"{top}byteorder", 16) != b"little":
        raise _Malformed("the checkpoint is not little-endian (its byteorder record says otherwise); "
                         "big-endian checkpoints are not supported")
    for record in (".format_version", ".data/serialization_id"):      # read (and CRC-checked) by torch.load too
        if f"{top}{record}" in names:
            _read_member(archive, f"{top}{record}", 64)
    alignment = f"{top}.storage_alignment"
    if alignment in names and not _read_member(archive, alignment, 32).strip().isdigit():
        raise _Malformed("the .storage_alignment record is not an integer")


def _check_end_records(whole, infos):
    """The end of the archive as torch's zip reader (miniz) reads it; Python's zipfile trusts less of
    it. torch.save ends an archive with a zip64 end record, its locator and the classic end record
    (22 bytes, then a comment): they must describe one disk, agree on the number of entries, the
    locator must point at the zip64 record, and the central directory's entries must fill the
    directory exactly, up to the first end record."""
    tail_start = max(0, len(whole) - (22 + 0xFFFF))
    tail = bytes(whole[tail_start:])
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise _Malformed("no zip end-of-central-directory record")
    end = tail_start + at
    disk, cd_disk, here, total, cd_size, cd_offset = struct.unpack_from("<HHHHII", tail, at + 4)
    first_end = end
    if at >= 20 and tail[at - 20: at - 16] == b"PK\x06\x07":                    # the zip64 locator
        z64_disk, z64_offset, disks = struct.unpack_from("<IQI", tail, at - 16)
        first_end = end - 20 - 56
        if (z64_disk != 0 or disks != 1 or z64_offset != first_end
                or bytes(whole[first_end: first_end + 4]) != b"PK\x06\x06"):
            raise _Malformed("the zip64 end-record locator does not point at the zip64 end record")
        record = bytes(whole[first_end + 16: first_end + 56])
        disk, cd_disk, here, total, cd_size, cd_offset = struct.unpack_from("<IIQQQQ", record)
    if disk != 0 or cd_disk != 0:
        raise _Malformed("the zip archive claims to span several disks")
    if not here == total == len(infos):
        raise _Malformed(f"the zip end record counts {here} and {total} entries, "
                         f"the central directory has {len(infos)}")
    at, count = cd_offset, 0                  # each entry: 46 bytes, then its name, extra field and comment
    while at < first_end and count < len(infos):
        entry = bytes(whole[at: at + 46])
        if len(entry) < 46 or entry[:4] != b"PK\x01\x02":
            break
        at += 46 + sum(struct.unpack_from("<HHH", entry, 28))
        count += 1
    if not (count == len(infos) and at == first_end == cd_offset + cd_size):
        raise _Malformed("the zip central directory's entries do not fill it up to its end record")


def _check_member(info, archive_size):
    """A central-directory entry as torch's zip reader (miniz) accepts it."""
    if info.flag_bits & (0x1 | 0x20 | 0x40 | 0x2000):
        raise _Malformed(f"{info.filename} is encrypted or patched (zip flags {info.flag_bits:#x})")
    if info.volume != 0:
        raise _Malformed(f"{info.filename} is on disk {info.volume} of a multi-disk archive")
    if info.external_attr & 0x10 or info.filename.endswith("/"):
        raise _Malformed(f"{info.filename} is marked as a folder, not a file")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _Malformed(f"{info.filename} uses zip compression method {info.compress_type}; "
                         f"checkpoints are stored or deflated")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 64:
        raise _Malformed(f"{info.filename} claims {info.file_size} bytes from {info.compress_size} deflated ones, "
                         f"more than deflate can hold")
    if (info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size) or \
            (info.file_size and not info.compress_size):
        raise _Malformed(f"{info.filename}: its sizes in the central directory disagree "
                         f"({info.compress_size} stored, {info.file_size} uncompressed)")
    if info.header_offset + 30 + info.compress_size > archive_size:
        raise _Malformed(f"{info.filename} runs past the end of the file")


def _read_member(archive, name, limit):
    """A small zip member's bytes (data.pkl, version, byteorder), at most `limit` of them; zipfile
    checks its local header and CRC-32."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise _Malformed(f"{name} has {info.file_size} bytes, over the limit of {limit}")
    with archive.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise _Malformed(f"{name} holds {len(data)} bytes, its zip entry says {info.file_size}")
    return data


def _zip_member_array(archive, whole, name, dtype, numel):
    """numel elements of `dtype` from a zip member: a view of `whole` (the file's memmap) when
    stored uncompressed, as torch.save does, else a decompressed copy. The member must hold
    exactly numel × itemsize bytes (as torch.load requires)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _Malformed(f"storage {name!r} is missing from the archive") from None
    nbytes = numel * dtype.itemsize
    if info.file_size != nbytes:
        raise _Malformed(f"storage {name!r} has {info.file_size} bytes, the pickle says {numel} × {dtype} = {nbytes}")
    if info.compress_type == zipfile.ZIP_DEFLATED:
        return np.frombuffer(_read_member(archive, name, nbytes), dtype=dtype)
    start = _data_start(whole, info)
    if info.compress_size != nbytes or start + nbytes > len(whole):
        raise _Malformed(f"storage {name!r} runs past the end of the file")
    return whole[start: start + nbytes].view(dtype)


def _data_start(whole, info):
    """Where a member's bytes begin: after its local file header (30 fixed bytes starting with
    PK\\3\\4, with the name and "extra" lengths at 26..29, then the name and the extra field);
    the name must be the central directory's."""
    h = info.header_offset
    header = bytes(whole[h: h + 30])
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise _Malformed(f"{info.filename}: no zip local file header where the central directory points")
    (flags,) = struct.unpack_from("<H", header, 6)
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    name = bytes(whole[h + 30: h + 30 + name_len]).decode("utf-8" if flags & 0x800 else "cp437")
    if name != info.orig_filename:
        raise _Malformed(f"{info.filename}: its local file header names {_short(repr(name))}")
    return h + 30 + name_len + extra_len


# Finding a model


def _weights_file(folder, part, variant):
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return Path(folder) / part / (WEIGHT_NAMES[part] + suffix)


def _has_weights(folder, variant):
    return all(_weights_file(folder, part, variant).exists() for part in PARTS)


def hub_patterns(variant=None):
    """The files SD needs from a diffusers repo on the hub: configs, tokenizer, one weights file per model."""
    return (["model_index.json", "scheduler/scheduler_config.json", "tokenizer/*"]
            + [f"{part}/config.json" for part in PARTS]
            + [f"{part}/{_weights_file('', part, variant).name}" for part in PARTS])


def _is_offline():
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def resolve(source=DEFAULT_MODEL, *, variant=None, cache_dir=None, local_files_only=False):
    """A local Path for `source`: a packaged model's name ("shapes", see PACKAGED), an existing
    file or folder as is, else a Hugging Face model id ("org/name", a diffusers repo) or a single
    file in one ("org/name/v1-5-pruned-emaonly.safetensors").

    A model id is looked up in huggingface_hub's cache first (so a model diffusers already
    downloaded is reused): the fp32 weights, or the fp16 variant if only that is cached. If it
    is not cached it is downloaded (progress bars, resumable, checksums verified by
    huggingface_hub). variant="fp16" asks for the half-size files. Offline and not cached:
    ModelNotFoundError saying what to pass instead.
    """
    if str(source) in PACKAGED:
        folder = PACKAGED[str(source)]
        if not (folder / "model_index.json").exists():
            raise ModelNotFoundError(f"the packaged model {source!r} is not in this installation ({folder} is "
                                     f"missing); train it with training/train_{source}.py")
        return folder
    path = Path(source).expanduser()
    if path.exists():
        return path
    source = str(source)
    parts = source.split("/")
    if source.startswith((".", "/", "~")) or len(parts) < 2 or (len(parts) > 2 and not source.endswith(SINGLE_FILES)):
        raise ModelNotFoundError(f"no such file or folder: {source!r} (and it is not a hub model id like "
                                 f"{DEFAULT_MODEL!r} or a file in one like {DEFAULT_MODEL}/v1-5-pruned-emaonly.safetensors)")
    if len(parts) > 2:
        return _hub_file("/".join(parts[:2]), "/".join(parts[2:]), cache_dir, local_files_only)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    for cached_variant in ([variant] if variant else [None, "fp16"]):
        try:
            folder = snapshot_download(source, allow_patterns=hub_patterns(cached_variant), cache_dir=cache_dir,
                                       local_files_only=True)
        except (LocalEntryNotFoundError, ValueError):
            continue
        if _has_weights(folder, cached_variant):
            return Path(folder)
    if local_files_only or _is_offline():
        raise ModelNotFoundError(f"model {source!r} is not in the Hugging Face cache and the hub is not reachable "
                                 f"(offline mode): {_how(source)}.")
    try:
        folder = snapshot_download(source, allow_patterns=hub_patterns(variant), cache_dir=cache_dir)
    except Exception as e:
        raise ModelNotFoundError(f"could not download model {source!r} from the Hugging Face hub "
                                 f"({type(e).__name__}: {e}): {_how(source)}.") from e
    if not _has_weights(folder, variant):
        missing = [str(_weights_file("", p, variant)) for p in PARTS if not _weights_file(folder, p, variant).exists()]
        raise ModelNotFoundError(f"model {source!r} on the hub has no {', '.join(missing)}; it is not an SD v1 "
                                 f"diffusers repo (try variant='fp16', or pass a local file)")
    return Path(folder)


def _how(source):
    return (f"pass a local diffusers folder or a single .safetensors/.ckpt file instead (e.g. "
            f"`python -m tinysd --model path/to/v1-5-pruned-emaonly.safetensors`), or download {source!r} "
            f"once while online; the small model of coloured shapes that ships with tinysd works offline: "
            f"`python -m tinysd \"a red circle\" --model shapes` (tinysd.load(\"shapes\") in Python)")


def _hub_file(repo_id, filename, cache_dir, local_files_only):
    """One file of a hub repo (a single-file checkpoint): the cached copy, else downloaded."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    source = f"{repo_id}/{filename}"
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):
        pass
    if local_files_only or _is_offline():
        raise ModelNotFoundError(f"{source!r} is not in the Hugging Face cache and the hub is not reachable "
                                 f"(offline mode): {_how(source)}.")
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except Exception as e:
        raise ModelNotFoundError(f"could not download {source!r} from the Hugging Face hub "
                                 f"({type(e).__name__}: {e}): {_how(source)}.") from e


# Loading


def read_configs(folder):
    """{part: config dict} from a diffusers folder (scheduler from scheduler/scheduler_config.json)."""
    folder = Path(folder)
    configs = {}
    for part in (*PARTS, "scheduler"):
        file = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
        if not file.exists():
            raise CheckpointError(f"{folder}: missing {part}/{file.name}; not a diffusers SD folder")
        try:
            configs[part] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{file}: cannot read it as JSON ({_short(e)})") from None
        if not isinstance(configs[part], dict):
            raise CheckpointError(f"{file}: holds a JSON {type(configs[part]).__name__}, expected an object")
    return configs


def read_weights(path):
    """{key: array} from a .safetensors file, or a torch zip pickle (.ckpt, .bin, .pt)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = read_ckpt(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]     # Lightning checkpoints wrap the weights
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, np.ndarray)}


def load_diffusers_folder(folder, variant=None):
    """Checkpoint from the diffusers layout; variant None takes fp32 files, falling back to fp16."""
    folder = Path(folder)
    configs = read_configs(folder)
    state_dicts = {}
    for part in PARTS:
        candidates = [_weights_file(folder, part, variant)] if variant else [
            _weights_file(folder, part, None), _weights_file(folder, part, "fp16"),
            folder / part / f"{WEIGHT_NAMES[part]}.bin"]
        file = next((c for c in candidates if c.exists()), None)
        if file is None:
            raise CheckpointError(f"{folder}: no weights for {part}: looked for "
                                  + ", ".join(str(c.relative_to(folder)) for c in candidates))
        state_dicts[part] = read_weights(file)
    state_dicts["text_encoder"] = single_file.convert_text_encoder(state_dicts["text_encoder"])
    tokenizer = folder / "tokenizer"
    return Checkpoint(configs, state_dicts, tokenizer if tokenizer.is_dir() else None, str(folder))


def load_single_file(path, config=None):
    """Checkpoint from an original single file.

    config None: SD v1.5's configs with the sizes read from the weights (tinysd.single_file.configs_for).
    config a diffusers folder, or a dict {part: config dict}: those configs, as given.
    """
    if config is None:
        base = read_configs(SD15_CONFIGS)
    else:
        base = config if isinstance(config, dict) else read_configs(config)
    state = read_weights(path)
    try:
        configs, state_dicts = single_file.convert(state, base, source=str(path), derive_sizes=config is None)
    except single_file.SingleFileError:
        kind = single_file.file_kind(read_raw(path))
        if kind is None:
            raise
        raise single_file.SingleFileError(f"{path} is {kind[0]}, not a Stable Diffusion model: {kind[1]}") from None
    return Checkpoint(configs, state_dicts, None, str(path))


def read_raw(path):
    """The file's top-level object as stored: a .safetensors file's tensors, or a pickle's dict
    with every entry (read_weights keeps only the tensors)."""
    path = Path(path)
    return read_safetensors(path) if path.suffix == ".safetensors" else read_ckpt(path)


def load_vae(source, base_config):
    """(config, state dict, weights file) of a standalone VAE, to use instead of a model's own.

    `source` is a diffusers `vae/` folder (config.json + diffusion_pytorch_model[.fp16].safetensors)
    or one file (.safetensors, .ckpt, .pt, .bin; a Lightning `state_dict` is unwrapped) with the
    original names (`encoder.down.0...`, `quant_conv`, as vae-ft-mse-840000-ema-pruned) or
    diffusers' names (`encoder.down_blocks.0...`). The training leftovers `loss.*` and
    `model_ema.*` are ignored, as A1111 does. Sizes come from the folder's config, else from the
    weights; the rest of the config from `base_config` (the model's own VAE).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        file = next((path / f"diffusion_pytorch_model{ext}" for ext in (".safetensors", ".fp16.safetensors", ".bin")
                     if (path / f"diffusion_pytorch_model{ext}").exists()), None)
        if not (path / "config.json").exists() or file is None:
            raise CheckpointError(f"--vae {path}: a VAE folder needs config.json and diffusion_pytorch_model.safetensors")
        return dict(base_config, **json.loads((path / "config.json").read_text())), read_weights(file), file
    if not path.is_file():
        raise ModelNotFoundError(f"--vae {source}: no such file or folder")
    state = {k: v for k, v in read_weights(path).items() if not k.startswith(("loss.", "model_ema."))}
    prefix = single_file.PREFIXES["vae"]
    if any(k.startswith(prefix) for k in state):            # a VAE cut out of a whole checkpoint
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):
        config = dict(base_config, **single_file.vae_sizes(state, str(path)))
        return config, single_file.convert_vae(state, config, str(path)), path
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        return dict(base_config), state, path
    kind = single_file.file_kind(read_raw(path))
    what = f"it is {kind[0]} ({kind[1]})" if kind else "no encoder.*/decoder.* keys"
    raise CheckpointError(f"--vae {path}: not a VAE: {what}")


def load_checkpoint(source=DEFAULT_MODEL, *, variant=None, config=None, cache_dir=None, local_files_only=False):
    """Configs and state dicts from a model id, a diffusers folder, or a .safetensors/.ckpt file."""
    path = resolve(source, variant=variant, cache_dir=cache_dir, local_files_only=local_files_only)
    if path.is_dir():
        return load_diffusers_folder(path, variant)
    return load_single_file(path, config)
