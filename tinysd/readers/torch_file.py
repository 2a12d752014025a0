"""PyTorch's zip checkpoints (.ckpt, .pt, .bin), read without torch and without running pickle
code: see `read_ckpt`."""
from __future__ import annotations

import inspect
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from tinysd.readers import (MAX_BYTES, MAX_DIMS, CheckpointError, _bf16_to_f32, _claimed_bytes, _is_int,
                            _Malformed, _short)


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
