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

import json
import os
import pickle
import struct
import zipfile
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


# safetensors


SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",   # bf16 is read as bits, widened below
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}


def read_safetensors(path):
    """{name: array} from a .safetensors file; views into a read-only memmap (bf16 -> float32 copy).

    Raises CheckpointError naming the file when the header is cut, is not JSON, or a tensor's
    bytes lie outside the data section or do not match its dtype and shape.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors header: it claims {n} bytes, "
                                  f"the file has {size - 8} after the length field")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,)) if data_size else np.zeros(0, np.uint8)
    return {name: _safetensors_tensor(path, name, info, data) for name, info in header.items()}


def _safetensors_tensor(path, name, info, data):
    try:
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r} ({e!r})") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end > len(data):
        raise CheckpointError(f"{path}: truncated data section: tensor {name!r} needs bytes [{begin}, {end}) "
                              f"but the file has only {len(data)} data bytes")
    if end - begin != nbytes or begin < 0:
        raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']}, shape {list(shape)}) needs {nbytes} bytes, "
                              f"its offsets [{begin}, {end}) give {end - begin}")
    array = data[begin:end].view(dtype).reshape(shape)
    return _bf16_to_f32(array) if info["dtype"] == "BF16" else array


def _bf16_to_f32(bits):
    """bfloat16 is the top half of a float32: shift the 16 bits up (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# .ckpt (PyTorch zip pickle)


TORCH_STORAGES = {  # torch's typed storage classes -> the NumPy dtype of their bytes
    "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2", "DoubleStorage": "<f8",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


class _Storage:
    """Stands in for torch.XStorage in the pickle: only its name (and so its dtype) is used."""

    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(TORCH_STORAGES[name])


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """A tensor is a strided view of its storage: element [i, j, ...] = storage[offset + sum(index * stride)]."""
    array, name = storage
    size, stride = tuple(size), tuple(stride)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
    if offset < 0 or last >= len(array):
        raise CheckpointError(f"tensor of shape {size} at offset {offset} with strides {stride} "
                              f"reaches past its storage of {len(array)} elements")
    view = np.lib.stride_tricks.as_strided(array[offset:], shape=size,
                                           strides=[s * array.itemsize for s in stride], writeable=False)
    return _bf16_to_f32(view) if name == "BFloat16Storage" else view


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _numpy_scalar(dtype, data):
    """numpy.core.multiarray.scalar, as PyTorch Lightning pickles NumPy numbers: just bytes -> value."""
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes):
        raise CheckpointError("numpy scalar with unexpected arguments in the pickle")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(name, align=False, copy=False):
    if not isinstance(name, str):
        raise CheckpointError("numpy dtype with unexpected arguments in the pickle")
    return np.dtype(name)


def _codecs_encode(text, encoding="utf-8"):
    """Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise CheckpointError(f"_codecs.encode with unexpected encoding {encoding!r} in the pickle")
    return text.encode("latin1")


class _Marker:
    """An inert stand-in for a class that checkpoints use only as a dict key (never called)."""

    def __init__(self, qualname):
        self.qualname = qualname

    def __call__(self, *args, **kwargs):
        raise CheckpointError(f"the pickle tries to call {self.qualname}, which is not allowed")

    def __repr__(self):
        return f"<{self.qualname}>"


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("_codecs", "encode"): _codecs_encode,
    # Lightning keys its callback states by the callback class; the class itself is never called.
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"):
        _Marker("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a torch.save'd dict, resolving only ALLOWED_GLOBALS and torch storage types."""

    def __init__(self, file, load_storage, path):
        super().__init__(file)
        self.load_storage, self.path = load_storage, path

    def find_class(self, module, name):
        if module == "torch" and name in TORCH_STORAGES:
            return _Storage(name)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[module, name]
        raise CheckpointError(f"{self.path}: the pickle references the global {module}.{name}, which is not "
                              f"on the allow-list of what a state dict needs; refusing to load it")

    def persistent_load(self, pid):
        # torch.save writes each storage as ("storage", storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise CheckpointError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
        _, storage, key, _location, numel = pid
        return self.load_storage(storage, str(key), int(numel)), storage.name


def read_ckpt(path):
    """The unpickled dict of a PyTorch zip checkpoint, tensors as read-only NumPy arrays.

    No torch, and no code from the file runs: only allow-listed globals are resolved. Stored
    (uncompressed) storages are memory-mapped straight from the zip.
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a PyTorch zip checkpoint (files saved by PyTorch < 1.6 in the legacy "
                              f"format are not supported; re-save them, or use a .safetensors file)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not pickles:
            raise CheckpointError(f"{path}: no <top>/data.pkl in the zip archive; not a torch.save checkpoint")
        top = pickles[0][: -len("data.pkl")]                 # e.g. "archive/", the name torch.save chose
        if f"{top}byteorder" in archive.namelist() and archive.read(f"{top}byteorder").strip() != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoint, not supported")
        whole = np.memmap(path, dtype=np.uint8, mode="r")      # one map of the file; storages are views
        storages = {}

        def load_storage(storage, key, numel):
            if key not in storages:
                storages[key] = _zip_member_array(path, archive, whole, f"{top}data/{key}", storage.dtype, numel)
            return storages[key]

        with archive.open(pickles[0]) as f:
            try:
                return _StateDictUnpickler(f, load_storage, path).load()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path}: cannot unpickle {pickles[0]}: {e!r}") from None


def _zip_member_array(path, archive, whole, name, dtype, numel):
    """numel elements of `dtype` from a zip member: a view of `whole` (the file's memmap) when
    stored uncompressed, as torch.save does, else a decompressed copy."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{path}: storage {name!r} is missing from the archive") from None
    if info.file_size < numel * dtype.itemsize:
        raise CheckpointError(f"{path}: storage {name!r} has {info.file_size} bytes, needs {numel * dtype.itemsize}")
    if info.compress_type != zipfile.ZIP_STORED:
        return np.frombuffer(archive.read(name), dtype=dtype, count=numel)
    # Local file header: 30 fixed bytes (name and "extra" lengths at 26..29), the name, the extra, the data.
    name_len, extra_len = struct.unpack("<HH", bytes(whole[info.header_offset + 26: info.header_offset + 30]))
    offset = info.header_offset + 30 + name_len + extra_len
    return whole[offset: offset + numel * dtype.itemsize].view(dtype)


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


def refuse_controlnet(source):
    """A ControlNet folder or packaged name passed as the model: say what it is and which option
    takes it (a ControlNet file is recognised by single_file.file_kind)."""
    from tinysd import controlnet

    if str(source) in controlnet.PACKAGED or controlnet.is_controlnet_folder(Path(str(source)).expanduser()):
        raise CheckpointError(f"{source} is a ControlNet, not a Stable Diffusion model: pass it with --control-net "
                              f"PATH (Python: tinysd.load(model, controlnet={str(source)!r}))")


def load_checkpoint(source=DEFAULT_MODEL, *, variant=None, config=None, cache_dir=None, local_files_only=False):
    """Configs and state dicts from a model id, a diffusers folder, or a .safetensors/.ckpt file."""
    refuse_controlnet(source)
    path = resolve(source, variant=variant, cache_dir=cache_dir, local_files_only=local_files_only)
    if path.is_dir():
        return load_diffusers_folder(path, variant)
    return load_single_file(path, config)
