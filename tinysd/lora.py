"""LoRA: low-rank weight updates, read from kohya/A1111, diffusers and PEFT files, patched into
the weights of the text encoder and the U-Net.

A LoRA stores, for some Linear and Conv2d layers, a thin pair `down` (r × in) and `up` (out × r),
r ≪ in, out, and a scalar α. Applied with the weight w the user picks:

    W' = W + w · (α / r) · up @ down

A conv kernel (out, in, kh, kw) takes the same update on its flattened (out, in·kh·kw) form:
`down` is a kh×kw conv to r channels and `up` a 1×1 conv (kohya's LoCon, PEFT's Conv2d LoRA), and
a 1×1 conv after a kh×kw conv is the kh×kw conv with kernel up @ down. Several LoRAs add their
updates: W' = W + Σ_i w_i (α_i / r_i) up_i @ down_i.

The file formats found in the wild, all read here (each key on its own, so they may mix):

    kohya / A1111    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight, .lora_up.weight, .alpha
                     lora_unet_input_blocks_1_1_proj_in...  (the same U-Net, original CompVis names)
                     lora_te_text_model_encoder_layers_0_self_attn_q_proj...   (also lora_te1_)
    PEFT / diffusers unet.down_blocks.0.attentions.0.proj_in.lora_A.weight, .lora_B.weight,
                     α in the safetensors metadata ("lora_adapter_metadata": unet.lora_alpha, ...)
                     text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
    old diffusers    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight
                     unet.down_blocks.0.attentions.0.proj_in.lora.down.weight, ...lora_linear_layer.down.weight

An underscored kohya name is mapped back to a layer through a table built from the model's own
layer names (every dotted path with '.' -> '_'), never guessed: module names hold underscores
themselves (`to_q`, `time_emb_proj`, `transformer_blocks`). α absent means α = r (scale 1), as
kohya and diffusers read it.

A loaded LoRA changes only the weights: each patched parameter is re-derived from the array it
was loaded from (`Module.patch_parameter`), so unloading gives back the loaded weights bit for
bit, and the whole file is parsed and checked against the model before any weight changes.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinysd import single_file
from tinysd.nn import Conv2d, Linear
from tinysd.weights import CheckpointError, read_ckpt, read_safetensors

COMPONENTS = ("text_encoder", "unet")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",
                  "lora_A.weight": "down", "lora_B.weight": "up"}
# Dotted (diffusers/PEFT) key endings -> role. "_lora." is the attention processors' spelling,
# `to_q_lora.down.weight`, where the layer name is glued to "lora".
DOTTED_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
PROCESSOR_NAMES = {  # attention-processor layer names -> the layer, per component
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# Adapters of other kinds, recognised so the error can name them: (test on a key, what it is).
UNSUPPORTED = (
    (lambda k: ".hada_" in k, "LoHa (LyCORIS)"),
    (lambda k: ".lokr_" in k, "LoKr (LyCORIS)"),
    (lambda k: k.endswith(".dora_scale") or ".lora_magnitude_vector" in k, "DoRA"),
    (lambda k: ".oft_" in k or k.endswith(".oft_blocks"), "OFT"),
    (lambda k: k.endswith(".on_input"), "IA3 (LyCORIS)"),
    (lambda k: k.endswith((".a1.weight", ".b1.weight")), "GLoRA (LyCORIS)"),
    (lambda k: k.endswith((".diff", ".diff_b")), "a full-weight difference (LyCORIS 'diff')"),
    (lambda k: k.endswith((".w_norm", ".b_norm")), "LyCORIS norm layers"),
    (lambda k: k.endswith(".lora_mid.weight"), "LoCon with a Tucker core ('lora_mid')"),
    (lambda k: k.endswith(".lora_B.bias"), "a LoRA with biases (PEFT lora_bias)"),
    (lambda k: k.startswith("bundle_emb."), "textual-inversion embeddings bundled in a LoRA"),
)
OTHER_MODELS = (  # (test on a key, the model the LoRA was made for)
    (lambda k: k.startswith(("lora_te2_", "text_encoder_2.")), "SD-XL (it has keys for SD-XL's second text encoder)"),
    (lambda k: "label_emb" in k or "add_embedding" in k, "SD-XL (it has keys for SD-XL's size embedding)"),
    (lambda k: k.startswith(("transformer.", "lora_transformer_", "diffusion_model.")),
     "a transformer (DiT) model such as SD 3 or Flux"),
)
WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")   # in a diffusers LoRA folder
PROMPT_TAG = re.compile(r"<(\w+):([^>]+)>")        # A1111's extra-network syntax
LORA_FILE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model: named, with the mismatch."""


@dataclass
class LoraLayer:
    """One layer's update: W' = W + w · scale · up @ down, scale = α / r."""
    key: str              # the parameter it patches, e.g. "down_blocks.0.attentions.0.proj_in.weight"
    down: np.ndarray      # (r, in) or (r, in, kh, kw)
    up: np.ndarray        # (out, r) or (out, r, 1, 1)
    scale: float          # α / r

    @property
    def rank(self):
        return self.down.shape[0]

    def delta(self, shape, weight=1.0):
        """weight · scale · up @ down, float32, reshaped to the parameter's `shape`."""
        up = np.asarray(self.up, dtype=np.float32).reshape(self.up.shape[0], self.rank)
        down = np.asarray(self.down, dtype=np.float32).reshape(self.rank, -1)
        d = up @ down                                  # (out, in·kh·kw)
        d *= np.float32(weight * self.scale)
        return d.reshape(shape)


@dataclass
class Lora:
    """A LoRA file read and checked against a model: its layers per component."""
    name: str
    path: Path | None
    layers: dict                                    # component -> [LoraLayer]
    metadata: dict = field(default_factory=dict)    # the safetensors `__metadata__`
    _hash: str | None = None

    @property
    def shorthash(self):
        """A1111's short hash of the file ("Lora hashes" in a PNG), or None for an in-memory dict."""
        if self._hash is None and self.path is not None:
            self._hash = lora_hash(self.path, self.metadata)
        return self._hash[:12] if self._hash else None


# Reading


def read_lora_state(source):
    """({key: array or number}, safetensors metadata) of a LoRA file, a diffusers LoRA folder
    (pytorch_lora_weights.safetensors) or a dict. `.pt`/`.bin`/`.ckpt` go through the safe
    unpickler of tinysd.weights (no code from the file runs)."""
    if isinstance(source, dict):
        return dict(source), {}
    path = weights_file(source)
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path), safetensors_metadata(path)
    state = read_ckpt(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise LoraError(f"{path}: holds a {type(state).__name__}, expected a dict of LoRA tensors by name")
    return state, {}


def weights_file(source):
    """The file to read: `source` itself, or the LoRA weights inside a diffusers LoRA folder."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise LoraError(f"{path}: a folder without {' or '.join(WEIGHT_FILES)}; pass the LoRA file itself")
    if not path.is_file():
        raise LoraError(f"no such LoRA file: {path}")
    return path


def safetensors_metadata(path):
    """The string map under "__metadata__" in a safetensors header (empty if none)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


def looks_like_lora(keys):
    """Whether state-dict keys are a LoRA's (for "this is a LoRA, not a model" messages)."""
    return any(_kohya_split(k) or _dotted_split(k) or any(test(k) for test, _ in UNSUPPORTED) for k in keys)


# Layer names


def target_layers(model):
    """{dotted path: layer} of every Linear and Conv2d in `model`: the layers a LoRA can patch."""
    out = {}

    def walk(module, prefix):
        for name, child in module.children():
            path = prefix + name
            if isinstance(child, (Linear, Conv2d)):
                out[path] = child
            walk(child, path + ".")

    walk(model, "")
    return out


def original_unet_names(paths, config):
    """{diffusers layer path: the original (CompVis) U-Net's name}, e.g. down_blocks.0.attentions.0.proj_in
    -> input_blocks.1.1.proj_in, down_blocks.0.resnets.0.conv1 -> input_blocks.1.0.in_layers.2
    (the inverse of tinysd.single_file's renaming)."""
    blocks = {new: old for old, new in single_file.unet_block_names(config).items()}
    resnet = {new: old for old, new in single_file.RESNET.items()}
    out = {}
    for path in paths:
        parts = path.split(".")
        for n in range(len(parts), 0, -1):            # longest block prefix first
            prefix = ".".join(parts[:n])
            if prefix in blocks:
                rest = ".".join(parts[n:])
                if ".resnets." in prefix:
                    rest = resnet.get(rest, rest)
                out[path] = blocks[prefix] + ("." + rest if rest else "")
                break
    return out


def kohya_table(paths, aliases=()):
    """{underscored name: dotted path} for `paths` and their `aliases` ({path: other dotted name}).

    kohya writes a layer path with every '.' replaced by '_'; the table is built from the model's
    own paths so that the way back is a lookup. Two layers with one underscored name would make it
    ambiguous: that is checked here, once.
    """
    table, aliases = {}, dict(aliases)
    for path in paths:
        for name in {path, aliases.get(path, path)}:
            flat = name.replace(".", "_")
            if table.setdefault(flat, path) != path:
                raise AssertionError(f"kohya name {flat!r} is both {table[flat]!r} and {path!r}")
    return table


class LayerNames:
    """Every name a LoRA file may give a layer of this model -> (component, dotted path)."""

    def __init__(self, models):
        self.layers = {c: target_layers(models[c]) for c in COMPONENTS}
        unet_original = original_unet_names(self.layers["unet"], models["unet"].config)
        self.kohya = {"unet": kohya_table(self.layers["unet"], unet_original),
                      "text_encoder": kohya_table(self.layers["text_encoder"])}

    def kohya_layer(self, component, flat):
        return self.kohya[component].get(flat)

    def dotted_layer(self, component, path, processor):
        """The layer of a dotted (diffusers/PEFT) module path, or None."""
        path = path.replace(".processor.", ".")
        if processor:                                  # ...attn1.to_q(_lora) -> ...attn1.to_q
            head, _, last = path.rpartition(".")
            path = f"{head}.{PROCESSOR_NAMES[component].get(last, last)}" if head else last
        if component == "text_encoder" and not path.startswith("text_model."):
            path = "text_model." + path                # transformers >= 5 saves CLIP without `text_model.`
        return path if path in self.layers[component] else None


# Parsing a state dict


def _kohya_split(key):
    """(component, underscored layer name, role, the key's layer part) of a kohya key, else None."""
    name, _, rest = key.partition(".")
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix) and rest in KOHYA_SUFFIXES:
            return component, name[len(prefix):], KOHYA_SUFFIXES[rest], name
    return None


def _dotted_split(key):
    """(component or None, dotted module path, role, processor spelling, the key's layer part) of
    a diffusers/PEFT key, else None."""
    for suffix, role in DOTTED_SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    component, path = None, stem
    for prefix in ("unet.", "text_encoder."):
        if path.startswith(prefix):
            component, path = prefix[:-1], path[len(prefix):]
    return component, path, role, suffix.startswith("_lora"), stem


def _fail(source, message):
    raise LoraError(f"{source}: {message}")


def _summary(items, n=4):
    items = list(items)
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def parse_lora(state, names, source):
    """{(component, layer path): {"down", "up", "alpha", "name"}} from a LoRA state dict.

    Raises LoraError naming the file for adapters of other kinds (LoHa, LoKr, DoRA, ...), LoRAs
    of other models (SD-XL, ...), keys that match no layer of this model, and incomplete pairs.
    """
    keys = list(state)
    for test, what in UNSUPPORTED:
        hits = [k for k in keys if test(k)]
        if hits:
            _fail(source, f"{what} is not supported (key {hits[0]!r}); tinysd applies plain LoRA (down/up pairs) only")
    for test, what in OTHER_MODELS:
        hits = [k for k in keys if test(k)]
        if hits:
            _fail(source, f"a LoRA for {what}, not for SD v1 (key {hits[0]!r})")
    entries, unmatched, not_lora = {}, [], []
    for key in keys:
        kohya = _kohya_split(key)
        dotted = None if kohya else _dotted_split(key)
        if kohya:
            component, flat, role, stem = kohya
            path = names.kohya_layer(component, flat)
            hits = [(component, path)] if path else []
        elif dotted:
            component, path, role, processor, stem = dotted
            components = [component] if component else list(COMPONENTS)   # no prefix: old diffusers files
            hits = [(c, p) for c in components if (p := names.dotted_layer(c, path, processor))]
        else:
            not_lora.append(key)
            continue
        if not hits:
            unmatched.append(key)
            continue
        entry = entries.setdefault(hits[0], {"name": stem})
        if role in entry:
            _fail(source, f"two {role} weights for the layer {hits[0][1]} ({entry[role + '_key']!r} and {key!r})")
        value = state[key]
        if role != "alpha" and not (isinstance(value, np.ndarray) and value.dtype.kind == "f"):
            _fail(source, f"{key!r} is not a float tensor")
        entry[role], entry[role + "_key"] = value, key
    if not_lora and not entries and not unmatched:
        _fail(source, f"not a LoRA file: none of its {len(keys)} keys is a LoRA weight (e.g. {not_lora[0]!r})")
    if not_lora:
        _fail(source, f"{len(not_lora)} key(s) are not LoRA weights: {_summary(not_lora)}")
    if unmatched:
        _fail(source, f"{len(unmatched)} of its {len(keys)} keys match no layer of this model: {_summary(unmatched)}"
                      f"{_model_hint(unmatched)}")
    for (component, path), entry in entries.items():
        missing = [r for r in ("down", "up") if r not in entry]
        if missing:
            have = next(entry[r + "_key"] for r in ("down", "up", "alpha") if r in entry)
            _fail(source, f"{have!r} has no matching {' and '.join(missing)} weight")
    return entries


def _model_hint(keys):
    if any(re.search(r"transformer_blocks[._][1-9]", k) for k in keys):
        return " (more than one transformer block per attention: a LoRA for SD-XL, not SD v1)"
    return ""


# Scales


def peft_scales(metadata, source):
    """{component: (lora_alpha, alpha_pattern, use_rslora)} from diffusers' LoRA
    metadata (the PEFT LoraConfig of each component, saved by `save_lora_weights`)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    out = {}
    try:
        config = json.loads(raw)
        for component in COMPONENTS:
            if f"{component}.lora_alpha" in config:
                get = lambda name, default: config.get(f"{component}.{name}") or default   # noqa: E731
                if get("use_dora", False):
                    _fail(source, "DoRA is not supported (its metadata says use_dora); tinysd applies plain LoRA only")
                patterns = {str(k): float(v) for k, v in dict(get("alpha_pattern", {})).items()}
                for pattern in patterns:
                    re.compile(pattern)
                out[component] = (float(config[f"{component}.lora_alpha"]), patterns, bool(get("use_rslora", False)))
    except (TypeError, ValueError, AttributeError, re.error) as e:
        if isinstance(e, LoraError):
            raise
        _fail(source, f"malformed lora_adapter_metadata ({type(e).__name__}: {e})")
    return out


def pattern_value(patterns, path, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching the end of the layer's
    path (CLIP's paths with or without the `text_model.` level, which transformers >= 5 drops)."""
    paths = [path, path.removeprefix("text_model.")]
    for pattern, value in patterns.items():
        if any(re.match(rf"(.*\.)?({pattern})$", p) for p in paths):
            return value
    return default


def layer_scale(entry, component, path, rank, peft, source):
    """α / r of one layer: α from its `alpha` key; else from the PEFT metadata (α / √r with
    rsLoRA); else 1 (α = r), as kohya, A1111 and diffusers read a LoRA without α."""
    if "alpha" in entry:
        alpha = np.asarray(entry["alpha"], dtype=np.float64)
        if alpha.size != 1 or not np.isfinite(alpha).all():
            _fail(source, f"{entry['alpha_key']!r} should be one finite number, got shape {alpha.shape}")
        return float(alpha.reshape(())) / rank
    config = peft.get(component)
    if config is None:
        return 1.0
    lora_alpha, alpha_pattern, rslora = config
    alpha = float(pattern_value(alpha_pattern, path, lora_alpha))
    return alpha / (rank ** 0.5 if rslora else rank)


# Checking shapes


def shape_mismatch(entry, weight_shape, component, path):
    """Why down (r, in[, kh, kw]) and up (out, r[, 1, 1]) do not give a (out, in[, kh, kw]) update
    of this layer, or None if they do."""
    down, up = entry["down"], entry["up"]
    where = f"{entry['name']!r} (down {tuple(down.shape)}, up {tuple(up.shape)})"
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or (up.ndim == 4 and up.shape[2:] != (1, 1)):
        return f"{where}: not the shapes of a LoRA pair"
    r = down.shape[0]
    if up.shape[1] != r:
        return f"{where}: down has rank {r}, up has rank {up.shape[1]}"
    out, fan_in = weight_shape[0], int(np.prod(weight_shape[1:]))
    fits = up.shape[0] == out and int(np.prod(down.shape[1:])) == fan_in
    if len(weight_shape) == 4 and down.ndim == 4:
        fits = fits and tuple(down.shape[1:]) == tuple(weight_shape[1:])
    if len(weight_shape) == 4 and down.ndim == 2:
        fits = fits and weight_shape[2:] == (1, 1)      # a linear LoRA on a 1×1 conv (proj_in/out)
    if len(weight_shape) == 2 and down.ndim == 4:
        fits = fits and down.shape[2:] == (1, 1)
    if not fits:
        return f"{where} does not fit the {component} layer {path} of weight {tuple(weight_shape)}"
    return None


def _width_hint(entries):
    """Which model a LoRA of other sizes was made for, where its widths say so."""
    for (component, path), entry in entries.items():
        width = entry["down"].shape[1] if entry["down"].ndim >= 2 else None
        if component == "text_encoder" and width == 1024:
            return "; its 1024-wide text-encoder layers are SD 2.x's"
        if component == "unet" and path.endswith(("attn2.to_k", "attn2.to_v")) and width in (1024, 2048):
            return f"; its {width}-wide cross-attention is {'SD 2.x' if width == 1024 else 'SD-XL'}'s"
    return ""


def read_lora(source, models, name):
    """Read a LoRA file and check every layer of it against `models` ({"unet", "text_encoder"})
    before anything is applied. Raises LoraError naming the file and the mismatch."""
    label = "LoRA state dict" if isinstance(source, dict) else str(source)
    try:
        state, metadata = read_lora_state(source)
    except CheckpointError as e:
        raise LoraError(f"cannot read LoRA: {e}") from None
    if not state:
        _fail(label, "no tensors in the file")
    names = LayerNames(models)
    entries = parse_lora(state, names, label)
    shapes = {key: tuple(int(n) for n in names.layers[key[0]][key[1]].weight.shape) for key in entries}
    mismatches = [m for key, entry in entries.items() if (m := shape_mismatch(entry, shapes[key], *key))]
    if mismatches:
        _fail(label, f"{len(mismatches)} of its {len(entries)} layer(s) do not fit this model: {mismatches[0]}"
                     f"{_width_hint(entries) or '; the LoRA was made for a model of other sizes'}")
    peft = peft_scales(metadata, label)
    layers = {c: [] for c in COMPONENTS}
    for (component, path), entry in entries.items():
        scale = layer_scale(entry, component, path, entry["down"].shape[0], peft, label)
        layers[component].append(LoraLayer(path + ".weight", entry["down"], entry["up"], scale))
    path = None if isinstance(source, dict) else weights_file(source)
    return Lora(name, path, layers, metadata)


# A1111's file hash


def lora_hash(path, metadata=None):
    """The sha256 A1111 shows for a LoRA (its "Lora hashes" field keeps the first 12 hex digits):
    the file's `sshs_model_hash` metadata if it has one, else for .safetensors the "addnet" hash
    (kohya's: sha256 of the bytes after the 8-byte length and the JSON header), else the
    sha256 of the whole file."""
    path = Path(path)
    if metadata and metadata.get("sshs_model_hash"):
        return str(metadata["sshs_model_hash"])
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix.lower() == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The loaded adapters of a pipeline


class LoraAdapters:
    """The LoRAs loaded into a text encoder and U-Net, and which are active with what weights.

    Every change (load, set_adapters, delete, unload) re-derives the affected weights from the
    loaded ones: W' = W + Σ (active LoRAs, in load order) w · (α/r) · up @ down, summed in
    float32. A weight no active LoRA touches is the loaded array again, bit for bit.
    """

    def __init__(self, models):
        self.models = models              # {"unet": ..., "text_encoder": ...}
        self.loras = {}                   # adapter name -> Lora, in load order
        self.weights = {}                 # active adapter name -> {component: weight}
        self.patched = set()              # (component, key) currently differing from the loaded weight

    def load(self, source, adapter_name=None):
        """Read, check and apply a LoRA; it becomes the one active adapter (weight 1), as the
        last-loaded adapter is in diffusers. Raises LoraError and changes nothing if it does not fit."""
        name = adapter_name if adapter_name is not None else f"default_{len(self.loras)}"
        if name in self.loras:
            raise ValueError(f"adapter name {name!r} is already in use; pass another adapter_name")
        lora = read_lora(source, self.models, name)
        before = (dict(self.loras), dict(self.weights))
        self.loras[name] = lora
        self._update({name: {c: 1.0 for c in COMPONENTS}}, before)
        return lora

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Make exactly `adapter_names` active, with `adapter_weights` (one number, or one per
        adapter: a number or {"unet": w, "text_encoder": w}; default 1.0), as diffusers."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.loras]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} not loaded; loaded adapters: {list(self.loras)}")
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names repeat: {names}")
        if adapter_weights is None or isinstance(adapter_weights, (int, float, dict)):
            adapter_weights = [adapter_weights] * len(names)
        adapter_weights = list(adapter_weights)
        if len(adapter_weights) != len(names):
            raise ValueError(f"{len(adapter_weights)} adapter_weights for {len(names)} adapters")
        weights = {n: component_weights(w) for n, w in zip(names, adapter_weights)}
        self._update(weights, (dict(self.loras), dict(self.weights)))

    def delete(self, adapter_names):
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.loras]
        if unknown:
            raise ValueError(f"adapter(s) {unknown} not loaded; loaded adapters: {list(self.loras)}")
        before = (dict(self.loras), dict(self.weights))
        for n in names:
            del self.loras[n]
        self._update({n: w for n, w in self.weights.items() if n not in names}, before)

    def unload(self):
        """Forget every LoRA: all weights are the loaded ones again."""
        before = (dict(self.loras), dict(self.weights))
        self.loras = {}
        self._update({}, before)

    def active(self):
        return list(self.weights)

    def parameters(self):
        """The PNG fields of the active adapters, as A1111 writes them: {"Lora hashes": "name: hash, ..."}
        (each adapter's name without ':' and ',', and its file's short hash), or {} when there are none."""
        items = [(name.replace(":", "").replace(",", ""), self.loras[name].shorthash) for name in self.weights]
        text = ", ".join(f"{n}: {h}" for n, h in items if n and h)
        return {"Lora hashes": text} if text else {}

    def _update(self, weights, before):
        """Activate `weights` and re-derive every weight whose patch changes; on any failure
        (e.g. out of memory) put back the state `before` (loras, weights), then re-raise."""
        old_weights, self.weights = self.weights, weights
        try:
            self._apply()
        except BaseException:
            self.loras, self.weights = before[0], old_weights
            self._apply()
            raise

    def _apply(self):
        """Re-derive every weight an active LoRA patches or one patched before, one at a time
        (one update in memory at once): W + Σ w·(α/r)·up@down, the LoRAs in load order."""
        updates = {}                                   # (component, key) -> [(layer, weight)], load order
        for name, lora in self.loras.items():
            for component in COMPONENTS:
                w = self.weights.get(name, {}).get(component, 0.0)
                for layer in lora.layers[component] if w else ():
                    updates.setdefault((component, layer.key), []).append((layer, w))
        for component, key in sorted(self.patched | set(updates)):
            model, delta = self.models[component], None
            for layer, w in updates.get((component, key), ()):
                d = layer.delta(model.host_array(key).shape, w)
                delta = d if delta is None else np.add(delta, d, out=delta)
            model.patch_parameter(key, delta)
            self.patched.discard((component, key))
            if delta is not None:
                self.patched.add((component, key))


def component_weights(weight):
    """One adapter's weight -> {component: weight}; diffusers' per-component dict form allowed."""
    if weight is None:
        return {c: 1.0 for c in COMPONENTS}
    if isinstance(weight, dict):
        unknown = set(weight) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"adapter weight keys {sorted(unknown)}: use 'unet' and 'text_encoder' "
                             f"(block-wise U-Net weights are not supported)")
        return {c: float(weight.get(c, 1.0)) for c in COMPONENTS}
    return {c: float(weight) for c in COMPONENTS}


# A1111's prompt tags


@dataclass
class LoraTag:
    """<lora:NAME:TE_WEIGHT:UNET_WEIGHT> (A1111): the text encoder's weight, the U-Net's (default: the same)."""
    name: str
    text_encoder: float = 1.0
    unet: float = 1.0
    text: str = ""


def prompt_lora_tags(prompt):
    """(the prompt without its <lora:...> tags, [LoraTag]) as A1111 reads them: `<lora:name>`,
    `<lora:name:w>`, `<lora:name:te:unet>`, `te=`/`unet=` by name; the tag's text is removed and
    nothing else (the spaces and commas around it stay). Raises ValueError for a malformed tag or
    another extra-network type."""
    tags = []

    def found(match):
        kind, args = match[1], match[2]
        if kind not in ("lora", "lyco"):
            raise ValueError(f"prompt tag {match[0]}: only <lora:...> tags are supported")
        positional, named = [], {}
        for item in args.split(":"):
            key, eq, value = item.partition("=")
            if eq:
                named[key.strip()] = value
            else:
                positional.append(item)
        unknown = set(named) - {"te", "unet"}
        if not positional or not positional[0] or unknown or len(positional) > 3:
            raise ValueError(f"prompt tag {match[0]}: expected <lora:NAME>, <lora:NAME:WEIGHT> or "
                             f"<lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
        try:
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            raise ValueError(f"prompt tag {match[0]}: the weight is not a number") from None
        tags.append(LoraTag(positional[0], te, unet, match[0]))
        return ""

    return PROMPT_TAG.sub(found, prompt), tags


def find_lora_file(name, folder):
    """NAME.safetensors (or .pt, .ckpt, .bin) in `folder`, as A1111 finds a tag's LoRA."""
    for suffix in LORA_FILE_SUFFIXES:
        path = Path(folder) / f"{name}{suffix}"
        if path.is_file():
            return path
    return None
