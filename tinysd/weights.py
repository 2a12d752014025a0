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

Two file formats, both read from their specifications without torch by `tinysd.readers`:
safetensors (`read_safetensors`) and PyTorch's zip pickles (`read_ckpt`: .ckpt, .pt, .bin). A
malformed file is one CheckpointError naming the file and the rule it breaks.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinysd import single_file
from tinysd.readers import CheckpointError, _short, read_ckpt, read_safetensors  # noqa: F401  (also tinysd.weights.*)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_CONFIGS = Path(__file__).parent / "data" / "sd-v1-5"
PARTS = ("unet", "vae", "text_encoder")
SINGLE_FILES = (".safetensors", ".ckpt")
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# Models shipped inside the package, by name: ordinary diffusers folders (see training/).
PACKAGED = {"shapes": Path(__file__).parent / "data" / "shapes"}


class ModelNotFoundError(FileNotFoundError):
    """A model id that is neither a local path nor reachable in (or cached from) the hub."""


@dataclass
class Checkpoint:
    configs: dict          # "unet", "vae", "text_encoder", "scheduler" -> config dict
    state_dicts: dict      # "unet", "vae", "text_encoder" -> {diffusers/transformers key: np.ndarray}
    tokenizer_dir: Path | None   # a tokenizer/ folder (vocab.json, merges.txt), None for single files
    source: str


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
