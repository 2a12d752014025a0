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
  each tensor is a view into one `np.memmap` of the file.
- .ckpt: a PyTorch zip archive, `<top>/data.pkl` (the pickled dict) and `<top>/data/<key>`
  (each storage's raw bytes). The pickle is read by an Unpickler that knows only the handful of
  globals a state dict needs, so no code from the file ever runs.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
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
    """A name or message from a file, shortened to one line for an error message."""
    text = " ".join(str(value).split())
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
SAFETENSORS_MAX_DEPTH = 128            # JSON nesting, serde_json's limit (a valid header needs 3)
MAX_DIMS = 64                          # NumPy's limit on an array's number of dimensions
MAX_BYTES = 1 << 62                    # no array, not even an empty or a broadcast one, claims more


def read_safetensors(path):
    """{name: array} from a .safetensors file: views into one read-only memmap of the file (BF16 is
    widened to a float32 copy). The format, and the rules checked here (those of the reference
    library, `safetensors`' Rust `read_metadata` and `validate`):

    - bytes 0..8: N, the header's length, little-endian u64; N ≤ 100,000,000 and 8 + N ≤ file size;
    - bytes 8..8+N: the header, UTF-8 JSON (spaces may pad it), an object; in it no key appears twice,
      nesting is at most 128 deep, and every number is an integer (no fractions, no exponents, no
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
            data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n, shape=(size - 8 - n,))
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
        raise _Malformed(f"{data_size - end} bytes left over after the last tensor's data"
                         + (f" ({_short(repr(previous))} ends at byte {end} of {data_size})" if previous is not None else ""))
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
    """bfloat16 is the top half of a float32: shift the 16 bits up (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# .ckpt (PyTorch zip pickle)


TORCH_STORAGES = {  # torch's typed storage classes -> the NumPy dtype of their bytes
    "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2", "DoubleStorage": "<f8",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}
TORCH_DTYPES = {  # torch.float32 & co., as torch.save writes a dtype that is a value in the dict
    "float32": "<f4", "float": "<f4", "float16": "<f2", "half": "<f2", "float64": "<f8", "double": "<f8",
    "bfloat16": "<u2", "int64": "<i8", "long": "<i8", "int32": "<i4", "int": "<i4", "int16": "<i2",
    "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
}
NUMPY_DTYPES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}
TORCH_FILE_VERSIONS = range(1, 11)     # the `version` record torch.load accepts
MAX_PICKLE_BYTES = 256 << 20           # data.pkl of an SD checkpoint is < 1 MB; this bounds the unpickler's memory
DEFLATE_MAX_RATIO = 1032               # deflate's largest possible expansion
MAX_NESTING = 100                      # containers in the pickle nested deeper than this are refused


class _Opaque:
    """Base of every object the unpickler hands to the pickle program: it has no attributes to
    set, and the pickle's BUILD (which sets an object's state) is refused unless a subclass
    defines what its state may be."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Malformed(f"the pickle tries to set the state of {self!r}, which is not allowed")

    def __repr__(self):
        return type(self).__name__.strip("_")


class _Global(_Opaque):
    """An allow-listed global: calling it runs `build`, which checks every argument it gets."""

    __slots__ = ("qualname", "build")

    def __init__(self, qualname, build=None):
        self.qualname, self.build = qualname, build

    def __call__(self, *args):
        if self.build is None:
            raise _Malformed(f"the pickle tries to call {self.qualname}, which is not allowed")
        return self.build(*args)

    def __repr__(self):
        return self.qualname


class _StorageType(_Opaque):
    """torch.FloatStorage & co. in the pickle: only its name (and so its dtype) is used."""

    __slots__ = ("name", "dtype")

    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(TORCH_STORAGES[name])


class _Storage(_Opaque):
    """A storage's bytes, viewed as its dtype (a 1-D array over the file's memmap)."""

    __slots__ = ("type", "array")

    def __init__(self, type, array):
        self.type, self.array = type, array

    def value(self):
        return _bf16_to_f32(self.array) if self.type.name == "BFloat16Storage" else self.array


class _Value(_Opaque):
    """A finished value (a tensor, a NumPy scalar, a dtype) kept out of reach of BUILD until the end."""

    __slots__ = ("content",)

    def __init__(self, content):
        self.content = content

    def value(self):
        return self.content


class _DType(_Opaque):
    """numpy.dtype(name, align, copy), then BUILD with its state: plain numeric dtypes only."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, align=False, copy=False):
        if not (isinstance(name, str) and name in NUMPY_DTYPES and isinstance(align, bool) and isinstance(copy, bool)):
            raise _Malformed(f"the pickle asks for numpy.dtype{_short((name, align, copy))}; only plain numeric "
                             f"dtypes are allowed")
        self.name, self.dtype = name, None

    def __setstate__(self, state):
        # (version 3, byte order, subarray, names, fields, itemsize, alignment, flags) for a plain dtype
        if (self.dtype is not None or not isinstance(state, tuple) or len(state) != 8 or state[0] != 3
                or state[1] not in ("<", ">", "|", "=") or state[2:5] != (None, None, None)
                or state[5:7] != (-1, -1) or not _is_int(state[7])):
            raise _Malformed(f"numpy dtype {self.name!r} with an unexpected state in the pickle")
        self.dtype = np.dtype(self.name).newbyteorder("=" if state[1] == "|" else state[1])

    def value(self):
        if self.dtype is None:
            raise _Malformed(f"numpy dtype {self.name!r} is used before its state is set")
        return self.dtype


class _NDArray(_Opaque):
    """numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b'), then BUILD with the array's
    state (version, shape, dtype, Fortran order, raw bytes): a plain numeric array, its bytes
    exactly shape × itemsize."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if self.array is not None or not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Malformed("numpy array with an unexpected state in the pickle")
        if len(state) == 5:
            if state[0] != 1:
                raise _Malformed(f"numpy array state version {_short(state[0])} in the pickle, expected 1")
            state = state[1:]
        shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS and all(_is_int(n) and n >= 0 for n in shape)):
            raise _Malformed(f"numpy array with shape {_short(shape)} in the pickle")
        if not isinstance(dtype, _DType) or not isinstance(fortran, bool) or not isinstance(raw, bytes):
            raise _Malformed("numpy array state in the pickle is not (shape, dtype, order, bytes)")
        dtype = dtype.value()
        if _claimed_bytes(shape, dtype.itemsize) > MAX_BYTES or len(raw) != math.prod(shape) * dtype.itemsize:
            raise _Malformed(f"numpy array of shape {shape} and dtype {dtype} in the pickle has {len(raw)} bytes, "
                             f"needs {math.prod(shape) * dtype.itemsize}")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")

    def value(self):
        if self.array is None:
            raise _Malformed("numpy array is used before its state is set")
        return self.array


class _ParameterDict(_Opaque):
    """torch.nn.ParameterDict, as torch.save writes it (a module: NEWOBJ, then BUILD with its
    __dict__): becomes the plain dict of its `_parameters`."""

    __slots__ = ("parameters",)

    def __setstate__(self, state):
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if getattr(self, "parameters", None) is not None or not isinstance(parameters, dict):
            raise _Malformed("torch.nn.ParameterDict with an unexpected state in the pickle")
        if not all(isinstance(k, str) and (v is None or isinstance(v, _Value)) for k, v in parameters.items()):
            raise _Malformed("torch.nn.ParameterDict whose _parameters are not named tensors")
        self.parameters = {k: v for k, v in parameters.items() if v is not None}

    def value(self):
        if getattr(self, "parameters", None) is None:
            raise _Malformed("torch.nn.ParameterDict is used before its state is set")
        return self.parameters


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """A tensor is a strided view of its storage: element [i, j, ...] = storage[offset + Σ index·stride].

    The numbers come from the file, so they are proved to stay inside the storage before the view
    is made: offset, sizes and strides are integers ≥ 0, one stride per dimension, and the element
    farthest from the start, storage[offset + Σ (size−1)·stride], lies inside the storage. With
    every stride ≥ 0 every element lies between the first and that one. The view is made by
    np.ndarray(buffer=...), which checks the same bounds again.
    """
    if not isinstance(storage, _Storage):
        raise _Malformed("_rebuild_tensor_v2 called on something that is not a storage")
    if not (_is_int(offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(_is_int(n) for n in (*size, *stride))):
        raise _Malformed(f"tensor offset {_short(offset)}, size {_short(size)}, stride {_short(stride)} are not integers")
    array, size, stride = storage.array, tuple(size), tuple(stride)
    what = f"tensor of size {_short(size)} with strides {_short(stride)} at offset {offset}"
    if len(size) != len(stride) or len(size) > MAX_DIMS:
        raise _Malformed(f"{what}: needs one stride per dimension, at most {MAX_DIMS} dimensions")
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise _Malformed(f"{what}: offset, sizes and strides must be ≥ 0")
    if _claimed_bytes(size, array.itemsize) > MAX_BYTES:
        raise _Malformed(f"{what}: larger than any array can be")
    if 0 in size:
        view = np.zeros(size, array.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= len(array):
            raise _Malformed(f"{what}: reaches element {last} of a storage of {len(array)} elements")
        strides = [s * array.itemsize if n > 1 else 0 for n, s in zip(size, stride)]   # a stride of a size-1 dimension is never used
        view = np.ndarray(size, array.dtype, buffer=array, offset=offset * array.itemsize, strides=strides)
    if storage.type.name == "BFloat16Storage":
        view = _bf16_to_f32(view)
    view.flags.writeable = False
    return _Value(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """torch.nn.Parameter(data): the tensor itself."""
    if not (isinstance(data, _Value) and isinstance(data.content, np.ndarray)):
        raise _Malformed("_rebuild_parameter called on something that is not a tensor")
    return data


def _reconstruct(subtype, shape, dtype_code):
    if subtype is not NUMPY_NDARRAY or shape != (0,) or dtype_code not in (b"b", "b"):
        raise _Malformed(f"numpy _reconstruct{_short((subtype, shape, dtype_code))} in the pickle; only "
                         f"_reconstruct(numpy.ndarray, (0,), b'b') is allowed")
    return _NDArray()


def _numpy_scalar(dtype, data):
    """numpy.core.multiarray.scalar(dtype, bytes), as Lightning pickles NumPy numbers."""
    if not (isinstance(dtype, _DType) and isinstance(data, bytes) and len(data) == dtype.value().itemsize):
        raise _Malformed("numpy scalar with unexpected arguments in the pickle")
    return _Value(np.frombuffer(data, dtype.value(), count=1)[0])


def _codecs_encode(text, encoding="utf-8"):
    """Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Malformed(f"_codecs.encode with unexpected arguments in the pickle")
    return text.encode("latin1")


def _torch_size(sizes=()):
    if not (isinstance(sizes, (tuple, list)) and all(_is_int(n) and n >= 0 for n in sizes)):
        raise _Malformed(f"torch.Size{_short(sizes)} in the pickle")
    return tuple(sizes)


NUMPY_NDARRAY = _Global("numpy.ndarray")      # only ever an argument of _reconstruct
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): dict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,             # protocol-2 pickles name Python 2's module
    ("torch._utils", "_rebuild_tensor_v2"): _Global("torch._utils._rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Global("torch._utils._rebuild_parameter", _rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"):
        _Global("torch._utils._rebuild_parameter_with_state", _rebuild_parameter),
    ("torch.nn.modules.container", "ParameterDict"): _ParameterDict,
    ("torch", "Size"): _Global("torch.Size", _torch_size),
    ("numpy", "ndarray"): NUMPY_NDARRAY,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _Global("_codecs.encode", _codecs_encode),
    # Lightning keys its callback states by the callback class; the class itself is never called.
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"):
        _Global("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    **{(module, name): _Global(f"{module}.{name}", build)
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name, build in (("_reconstruct", _reconstruct), ("scalar", _numpy_scalar))},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch.save'd object, resolving only ALLOWED_GLOBALS, torch's storage types and
    dtypes: nothing named in the file is imported, and nothing but the functions above is called."""

    def __init__(self, file, load_storage):
        super().__init__(file)
        self.load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch" and name in TORCH_STORAGES:
            return _StorageType(name)
        if module == "torch" and name in TORCH_DTYPES:
            return _Value(np.dtype(TORCH_DTYPES[name]))
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        raise _Malformed(f"the pickle references the global {_short(module)}.{_short(name)}, which is not on the "
                         f"allow-list of what a checkpoint needs; refusing to load it")

    def persistent_load(self, pid):
        # torch.save writes each storage as ("storage", storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and _is_int(pid[4]) and pid[4] >= 0):
            raise _Malformed(f"unexpected persistent id in the pickle: {_short(pid)}")
        _, storage_type, key, _location, numel = pid
        return _Storage(storage_type, self.load_storage(key, storage_type.dtype, numel))


def _resolve(root):
    """The unpickled object with every stand-in (_Value, _DType, _NDArray, _ParameterDict,
    _Storage) replaced by its value. Refuses cycles and nesting deeper than MAX_NESTING."""
    done, open_ = {}, set()

    def visit(obj, depth):
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, bytearray, _Global, type)):
            return obj
        if id(obj) in done:
            return done[id(obj)][1]
        if id(obj) in open_:
            raise _Malformed("the pickle's objects contain themselves (a cycle); a checkpoint has none")
        if depth > MAX_NESTING:
            raise _Malformed(f"the pickle's objects nest more than {MAX_NESTING} levels deep")
        open_.add(id(obj))
        if isinstance(obj, (_Value, _DType, _NDArray, _ParameterDict, _Storage)):
            value = obj.value()
            value = visit(value, depth) if isinstance(value, dict) else value
        elif type(obj) is dict:
            for key in obj:
                if not isinstance(key, (bool, int, float, str, bytes, tuple, _Global)) and key is not None:
                    raise _Malformed(f"the pickle uses a {type(key).__name__.strip('_')} as a dict key")
                obj[key] = visit(obj[key], depth + 1)
            value = obj
        elif type(obj) is list:
            obj[:] = [visit(v, depth + 1) for v in obj]
            value = obj
        elif type(obj) is tuple:
            value = tuple(visit(v, depth + 1) for v in obj)
        elif type(obj) in (set, frozenset):
            if not all(isinstance(v, (bool, int, float, str, bytes)) or v is None for v in obj):
                raise _Malformed("the pickle puts something other than numbers and strings in a set")
            value = obj
        else:
            raise _Malformed(f"the pickle makes an unexpected {type(obj).__name__}")
        open_.discard(id(obj))
        done[id(obj)] = obj, value       # holding obj keeps its id from being reused by a new object
        return value

    return visit(root, 0)


# What a malformed archive or pickle can raise from zipfile, zlib, the unpickler and NumPy (the
# unpickler's opcodes raise TypeError, KeyError, AttributeError, ... on nonsense programs).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, pickle.UnpicklingError, EOFError, OSError, ValueError,
                struct.error, RuntimeError, OverflowError, LookupError, TypeError, AttributeError, MemoryError)


def read_ckpt(path):
    """The unpickled object of a PyTorch zip checkpoint (.ckpt, .pt, .bin), tensors as read-only
    NumPy arrays. No torch, and no code from the file runs.

    The format (torch.save's, read by torch.load), and the rules checked here:
    - a zip archive whose entries sit in one folder, <top>/ (the first entry's);
    - <top>/version (or <top>/.data/version): the format version, an integer 1..10;
    - <top>/byteorder, if present: "little" (big-endian files are not supported);
    - <top>/data.pkl: a pickle (≤ MAX_PICKLE_BYTES) of the saved object. Its program may name only
      ALLOWED_GLOBALS and torch's storage and dtype types; tensors are
      _rebuild_tensor_v2(storage, offset, size, stride), each checked against its storage;
    - <top>/data/<key>: the raw little-endian bytes of each storage, exactly numel × itemsize
      bytes, stored (memory-mapped from the file, no copy) or deflated (decompressed).

    Anything else raises one CheckpointError naming the file and the rule.
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            raise _Malformed("not a PyTorch zip checkpoint (files saved by PyTorch < 1.6 in the legacy format are "
                             "not supported; re-save them, or use a .safetensors file)")
        with zipfile.ZipFile(path) as archive:
            return _read_archive(path, archive)
    except _Malformed as e:
        raise CheckpointError(f"{path}: {e}") from None
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: malformed checkpoint: its structure nests too deeply") from None
    except _READ_ERRORS as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(e).__name__}: {_short(e, 200)})") from None


def _read_archive(path, archive):
    names = archive.namelist()
    top = names[0].split("/")[0] + "/" if names and "/" in names[0] else None
    if top is None or f"{top}data.pkl" not in names:
        raise _Malformed("no <top>/data.pkl in the zip archive; not a torch.save checkpoint")
    _check_version(archive, top, names)
    if f"{top}byteorder" in names and _read_member(archive, f"{top}byteorder", 16) != b"little":
        raise _Malformed("the checkpoint is not little-endian (its byteorder record says otherwise); "
                         "big-endian checkpoints are not supported")
    whole = np.memmap(path, dtype=np.uint8, mode="r")      # one map of the file; storages are views of it
    storages = {}

    def load_storage(key, dtype, numel):
        if key not in storages:
            storages[key] = _zip_member_array(archive, whole, f"{top}data/{key}", dtype, numel)
        stored = storages[key]
        if stored.dtype != dtype or len(stored) != numel:
            raise _Malformed(f"storage {_short(key)} is used as {numel} × {dtype} and as {len(stored)} × {stored.dtype}")
        return stored

    program = _read_member(archive, f"{top}data.pkl", MAX_PICKLE_BYTES)
    return _resolve(_StateDictUnpickler(io.BytesIO(program), load_storage).load())


def _check_version(archive, top, names):
    record = next((f"{top}{n}" for n in (".data/version", "version") if f"{top}{n}" in names), None)
    if record is None:
        raise _Malformed("no <top>/version record in the zip archive; not a torch.save checkpoint")
    text = _read_member(archive, record, 32).strip()
    if not (text.isdigit() and int(text) in TORCH_FILE_VERSIONS):
        raise _Malformed(f"unsupported checkpoint format version {_short(text)} (torch.load reads "
                         f"{TORCH_FILE_VERSIONS.start}..{TORCH_FILE_VERSIONS.stop - 1})")


def _read_member(archive, name, limit):
    """A small zip member's bytes (data.pkl, version, byteorder), at most `limit` of them; zipfile
    checks the CRC-32."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise _Malformed(f"{name} has {info.file_size} bytes, over the limit of {limit}")
    _check_member(info)
    with archive.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise _Malformed(f"{name} holds {len(data)} bytes, its zip entry says {info.file_size}")
    return data


def _check_member(info):
    if info.flag_bits & 0x1:
        raise _Malformed(f"{info.filename} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _Malformed(f"{info.filename} uses zip compression method {info.compress_type}; "
                         f"checkpoints are stored or deflated")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 64:
        raise _Malformed(f"{info.filename} claims {info.file_size} bytes from {info.compress_size} deflated ones, "
                         f"more than deflate can hold")


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
    _check_member(info)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        return np.frombuffer(_read_member(archive, name, nbytes), dtype=dtype)
    start = _stored_data_start(whole, info)
    if info.compress_size != nbytes or start + nbytes > len(whole):
        raise _Malformed(f"storage {name!r} runs past the end of the file")
    return whole[start: start + nbytes].view(dtype)


def _stored_data_start(whole, info):
    """Where a stored member's bytes begin: after its local file header (30 fixed bytes, with the
    name and "extra" lengths at 26..29, then the name and the extra field)."""
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
            f"once while online")


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
        configs[part] = json.loads(file.read_text())
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
    configs, state_dicts = single_file.convert(read_weights(path), base, source=str(path), derive_sizes=config is None)
    return Checkpoint(configs, state_dicts, None, str(path))


def load_checkpoint(source=DEFAULT_MODEL, *, variant=None, config=None, cache_dir=None, local_files_only=False):
    """Configs and state dicts from a model id, a diffusers folder, or a .safetensors/.ckpt file."""
    path = resolve(source, variant=variant, cache_dir=cache_dir, local_files_only=local_files_only)
    if path.is_dir():
        return load_diffusers_folder(path, variant)
    return load_single_file(path, config)
