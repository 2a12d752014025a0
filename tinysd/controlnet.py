"""ControlNet (Zhang, Rao & Agrawala 2023): steer the U-Net with a picture of the structure wanted.

    sd = tinysd.load("shapes", controlnet="shapes-canny")          # or tinysd/data/shapes-canny.safetensors
    edges = tinysd.controlnet.canny(photo, 100, 200)                # or any edge / depth / pose map
    image = sd("a red circle", control_image=edges, seed=0).images[0]

A ControlNet is a trainable copy of the U-Net's down path and mid block, fed the noisy latent
z_t, the timestep and the prompt like the U-Net, plus the control image c (a hint: edges,
depth, pose ...), which a small conv stack E maps from pixels to the latent grid:

    h_0 = conv_in(z_t) + E(c)                     E: 3×3 convs with SiLU, three of stride 2 (512 -> 64)
    h_1 .. h_n, h_mid = the copied down blocks and mid block, keeping every skip as the U-Net does
    r_k = Z_k(h_k),  r_mid = Z_mid(h_mid)         Z: 1×1 convs initialised to zero ("zero convolutions")

and the frozen U-Net adds them, scaled by the conditioning scale s, to its own skip connections
and mid-block output (tinysd.unet.UNet2DConditionModel, `down_block_additional_residuals`):

    skip_k <- skip_k + s·r_k,   mid <- mid + s·r_mid

At the start of training every Z is zero, so the model is unchanged and the control grows in
from there. Several ControlNets add their residuals. `guess_mode` runs the ControlNet on the
conditional half of the guidance batch only and scales r_k from 0.1 (first skip) to 1.0 (mid),
log-spaced, so the control dominates even with an empty prompt.

Weights: diffusers folders (`ControlNetModel.save_pretrained`: config.json and
diffusion_pytorch_model[.fp16].safetensors) and the original single files
(control_v11p_sd15_canny.pth / .safetensors: keys under `control_model.`, renamed here; `.pth`
read by tinysd.weights' safe unpickler). The sizes come from the weights; a ControlNet made for
another model (SD 2.x, SD-XL, other widths) is refused with both named.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from tinysd import single_file
from tinysd.hints import canny  # noqa: F401  (tinysd.controlnet.canny, the edge map most ControlNets use)
from tinysd.nn import Conv2d, Module
from tinysd.unet import SUPPORTED, TimestepEmbedding, UNetMidBlock2DCrossAttn, down_path, timestep_embedding

ORIGINAL_PREFIX = "control_model."
# ControlNets shipped inside the package, by name (see training/train_shapes_controlnet.py).
PACKAGED = {"shapes-canny": Path(__file__).parent / "data" / "shapes-canny"}
WEIGHT_NAME = "diffusion_pytorch_model"
# diffusers' ControlNetModel defaults for SD 1.5 (lllyasviel/control_v11p_sd15_canny's config.json);
# a single file carries no config, so its sizes are read off the weights into a copy of this.
SD15_CONFIG = {
    "in_channels": 4, "conditioning_channels": 3, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "downsample_padding": 1, "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False,
    "controlnet_conditioning_channel_order": "rgb", "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "global_pool_conditions": False,
}


class ControlNetError(ValueError):
    """A ControlNet file that cannot be read, or that does not fit the loaded model."""


# The model


class ControlNetConditioningEmbedding(Module):
    """E(c): the hint (B, 3, H, W) in [0, 1] -> features (B, C0, H/8, W/8) added after conv_in.

    conv_in 3×3 and SiLU, then for each width a 3×3 conv and a stride-2 3×3 conv, each with
    SiLU, then conv_out 3×3 to the U-Net's first width (zero-initialised in training).
    """

    def __init__(self, conditioning_channels, block_out_channels, embedding_channels):
        widths = list(block_out_channels)
        self.conv_in = Conv2d(conditioning_channels, widths[0], 3, padding=1)
        self.blocks = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            self.blocks += [Conv2d(w_in, w_in, 3, padding=1), Conv2d(w_in, w_out, 3, stride=2, padding=1)]
        self.conv_out = Conv2d(widths[-1], embedding_channels, 3, padding=1)

    def __call__(self, cond):
        h = self.ops.silu(self.conv_in(cond))
        for conv in self.blocks:
            h = self.ops.silu(conv(h))
        return self.conv_out(h)


class ControlNetModel(Module):
    """`controlnet(latents, t, context, cond, conditioning_scale)` -> (down residuals, mid residual).

    The U-Net's down path and mid block, built from tinysd.unet's blocks, plus the hint encoder
    and the zero convolutions (`controlnet_down_blocks`, `controlnet_mid_block`), named as in
    diffusers' ControlNetModel. Returns one residual per skip connection of the U-Net (conv_in's
    output, each ResNet/attention layer, each downsampler: 12 for SD v1) and one for the mid block.
    """

    name = None          # "Model" in A1111's ControlNet fields: the file's or folder's name
    short_hash = None    # A1111's 8-hex model hash of the weights file

    def __init__(self, config):
        cfg = self.config = dict(config)
        check_supported(cfg)
        widths = list(cfg["block_out_channels"])
        n_levels = len(widths)
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n_levels
        groups, eps, ctx_dim = cfg.get("norm_num_groups", 32), cfg.get("norm_eps", 1e-5), cfg["cross_attention_dim"]
        temb_ch = widths[0] * 4
        self.flip_sin_to_cos, self.freq_shift = cfg.get("flip_sin_to_cos", True), cfg.get("freq_shift", 0)

        self.conv_in = Conv2d(cfg.get("in_channels", 4), widths[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(widths[0], temb_ch)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.get("conditioning_channels", 3), cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256)),
            widths[0])

        self.down_blocks = down_path(cfg, widths, heads, temb_ch)
        self.controlnet_down_blocks = [Conv2d(widths[0], widths[0], 1)]       # one per skip: conv_in's, then each layer's
        for out_ch, block in zip(widths, self.down_blocks):
            self.controlnet_down_blocks += [Conv2d(out_ch, out_ch, 1) for _ in block.resnets + block.downsamplers]
        self.mid_block = UNetMidBlock2DCrossAttn(widths[-1], temb_ch, heads[-1], ctx_dim, groups, eps)
        self.controlnet_mid_block = Conv2d(widths[-1], widths[-1], 1)

    @property
    def in_channels(self):
        return self.config.get("in_channels", 4)

    def __call__(self, latents, t, context, controlnet_cond, conditioning_scale=1.0, guess_mode=False):
        """latents (B, 4, h, w), t, context (B, 77, D), controlnet_cond (B, 3, 8h, 8w) in [0, 1]
        -> ([r_0 .. r_n] one per U-Net skip, r_mid), each already times the conditioning scale."""
        B = latents.shape[0]
        t = np.broadcast_to(np.asarray(t, dtype=np.float32).reshape(-1), (B,))
        temb = self.time_embedding(self.ops.asarray(
            timestep_embedding(t, self.conv_in.weight.shape[0], self.flip_sin_to_cos, self.freq_shift)))
        if self.config.get("controlnet_conditioning_channel_order", "rgb") == "bgr":
            controlnet_cond = self.ops.concat([controlnet_cond[:, i:i + 1] for i in (2, 1, 0)], axis=1)

        h = self.conv_in(latents) + self.controlnet_cond_embedding(controlnet_cond)     # h_0 = conv_in(z_t) + E(c)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips += block_skips
        h = self.mid_block(h, temb, context)

        down = [zero_conv(skip) for zero_conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        scales = residual_scales(len(down), conditioning_scale, guess_mode and not self.config.get("global_pool_conditions"))
        down = [r * s for r, s in zip(down, scales)]
        mid = mid * scales[-1]
        if self.config.get("global_pool_conditions"):     # "shuffle"-style nets: one vector per channel
            down, mid = [self._spatial_mean(r) for r in down], self._spatial_mean(mid)
        return down, mid

    def _spatial_mean(self, x):
        return self.ops.asarray(self.ops.numpy(x).mean(axis=(2, 3), keepdims=True))


def residual_scales(n_down, conditioning_scale, guess_mode):
    """The factor of each down residual and (last) of the mid residual: s everywhere, or in guess
    mode s·10^(−1 + k/n) for k = 0..n, from 0.1·s at the first skip to s at the mid block."""
    if guess_mode:
        exponents = np.linspace(-1.0, 0.0, n_down + 1, dtype=np.float32)
        return [float(conditioning_scale) * float(np.float32(10.0) ** e) for e in exponents]
    return [float(conditioning_scale)] * (n_down + 1)


def check_supported(cfg):
    """Refuse configs whose blocks tinysd does not have (SD 2.x's linear projections, SD-XL's extra embeddings)."""
    bad = [b for b in cfg["down_block_types"] if b not in SUPPORTED["down_block_types"]]
    problems = [f"down_block_types {bad}"] if bad else []
    if cfg.get("use_linear_projection"):
        problems.append("use_linear_projection=True (SD 2.x)")
    for key in ("addition_embed_type", "class_embed_type", "num_class_embeds", "encoder_hid_dim"):
        if cfg.get(key) is not None:
            problems.append(f"{key}={cfg[key]!r}" + (" (SD-XL)" if key == "addition_embed_type" else ""))
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid_block_type={cfg['mid_block_type']!r}")
    if cfg.get("transformer_layers_per_block", 1) not in (1, [1] * len(cfg["down_block_types"])):
        problems.append(f"transformer_layers_per_block={cfg['transformer_layers_per_block']!r} (SD-XL)")
    if problems:
        raise ControlNetError(f"ControlNet config not supported: {'; '.join(problems)}; tinysd runs SD v1 ControlNets")


# Reading the weights


@dataclass
class ControlNetCheckpoint:
    config: dict       # diffusers ControlNetModel config
    state: dict        # diffusers key -> array (memory-mapped where possible)
    name: str          # the file's stem or the folder's name
    short_hash: str    # A1111's model hash (8 hex digits)
    source: str


def resolve(source):
    """A local Path for a ControlNet: a packaged name ("shapes-canny"), else a file or folder."""
    if str(source) in PACKAGED:
        path = PACKAGED[str(source)]
        if not path.exists():
            raise ControlNetError(f"the packaged ControlNet {source!r} is not in this installation ({path} is missing); "
                                  f"train it with training/train_shapes_controlnet.py")
        return path
    path = Path(source).expanduser()
    if not path.exists():
        raise ControlNetError(f"ControlNet {str(source)!r}: no such file or folder (pass a diffusers ControlNet folder, "
                              f"a control_*.safetensors/.pth file, or a packaged name: {', '.join(PACKAGED)})")
    return path


def model_hash(path):
    """AUTOMATIC1111's short model hash, which its ControlNet extension writes beside the name:
    the first 8 hex digits of sha256 over the 64 KiB at offset 1 MiB of the file."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def is_controlnet_state(state):
    """Whether a state dict holds a ControlNet (original or diffusers names), not a whole model."""
    return any(k.startswith(ORIGINAL_PREFIX) or k.startswith("input_hint_block.")
               or k.startswith("controlnet_cond_embedding.") for k in state)


def is_controlnet_folder(path):
    """Whether `path` is a diffusers ControlNet folder (config.json of a ControlNetModel)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "ControlNet" in json.loads(config.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return False


def read_controlnet(source, unet_config=None, model_name="the loaded model", variant=None):
    """ControlNetCheckpoint from a folder, a single file or a packaged name; with `unet_config`,
    also checks that it fits that U-Net (before anything is built)."""
    from tinysd.weights import read_weights

    path = resolve(source)
    if path.is_dir():
        if not is_controlnet_folder(path):
            raise ControlNetError(f"{path}: no config.json of a ControlNetModel; not a diffusers ControlNet folder")
        config = {**SD15_CONFIG, **json.loads((path / "config.json").read_text())}   # missing entries: SD 1.5's
        candidates = [path / f"{WEIGHT_NAME}.{variant}.safetensors"] if variant else [
            path / f"{WEIGHT_NAME}.safetensors", path / f"{WEIGHT_NAME}.fp16.safetensors", path / f"{WEIGHT_NAME}.bin"]
        weights = next((c for c in candidates if c.exists()), None)
        if weights is None:
            raise ControlNetError(f"{path}: no ControlNet weights: looked for {', '.join(c.name for c in candidates)}")
        state = read_weights(weights)
        if unet_config is not None:
            check_fits(config, unet_config, str(path), model_name)
    else:
        weights = path
        raw = read_weights(path)
        if not is_controlnet_state(raw):
            raise ControlNetError(f"{path}: not a ControlNet (no keys under {ORIGINAL_PREFIX!r} or input_hint_block.*)")
        config, state = from_original(raw, str(path), unet_config, model_name)
    return ControlNetCheckpoint(config, state, path.stem if path.is_file() else path.name, model_hash(weights), str(path))


def build_controlnet(ckpt, backend):
    """The ControlNetModel of a checkpoint, on `backend`, its weights checked key by key."""
    net = ControlNetModel(ckpt.config).set_backend(backend).load_state_dict(ckpt.state, source=ckpt.source)
    net.name, net.short_hash = ckpt.name, ckpt.short_hash
    return net


def load_controlnet(source, backend=None, unet_config=None, model_name="the loaded model", variant=None):
    """A ready ControlNetModel from a folder, a single file or a packaged name."""
    from tinysd.backend import get_backend

    return build_controlnet(read_controlnet(source, unet_config, model_name, variant), get_backend(backend))


def family(config):
    """The model family a U-Net or ControlNet config belongs to, where its shapes tell."""
    dim = config["cross_attention_dim"]
    if config.get("addition_embed_type") or dim == 2048:
        return "SD-XL"
    if config.get("use_linear_projection") or dim == 1024:
        return "SD 2.x"
    return "SD 1.x" if dim == 768 else ""


def describe(config):
    """"widths 320/640/1280/1280, 2 layers per block, cross-attention 768 (SD 1.x)" for an error message."""
    name = family(config)
    return (f"widths {'/'.join(str(w) for w in config['block_out_channels'])}, {config.get('layers_per_block', 2)} "
            f"layers per block, cross-attention {config['cross_attention_dim']}" + (f" ({name})" if name else ""))


def check_fits(config, unet_config, source, model_name):
    """Raise ControlNetError naming both when the ControlNet's down path is not the U-Net's."""
    keys = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")
    mismatch = [k for k in keys if list(np.atleast_1d(config.get(k, SD15_CONFIG[k])))
                != list(np.atleast_1d(unet_config.get(k, SD15_CONFIG[k])))]
    if mismatch or family(config) != family(unet_config):
        raise ControlNetError(f"ControlNet {source} ({describe(config)}) does not fit {model_name} "
                              f"({describe(unet_config)}): a ControlNet works only with the model family it was trained for")


# The original single-file layout


def _index(key, prefix):
    return int(key[len(prefix):].split(".")[0])


def original_sizes(state, source):
    """A diffusers config for an original-layout ControlNet, every size read off the weights."""
    def shape(key):
        if key not in state:
            raise ControlNetError(f"{source}: no {ORIGINAL_PREFIX}{key}; not an SD ControlNet in the original layout")
        return tuple(int(n) for n in state[key].shape)

    hint = sorted({_index(k, "input_hint_block.") for k in state if k.startswith("input_hint_block.")})
    ops = [_index(k, "input_blocks.") for k in state if k.startswith("input_blocks.") and ".0.op.weight" in k]
    if len(hint) < 2 or not ops:
        raise ControlNetError(f"{source}: no hint encoder (input_hint_block.*) or no downsampler (input_blocks.N.0.op); "
                              f"not an SD ControlNet in the original layout")
    L = min(ops) - 1                                                 # input_blocks.{L+1}.0.op closes level 0
    levels = len({_index(k, "input_blocks.") for k in state if k.startswith("input_blocks.")}) // max(L + 1, 1)
    if L < 1 or levels < 2:
        raise ControlNetError(f"{source}: input_blocks.{min(ops)}.0.op would leave {L} layers per block and {levels} "
                              f"levels; not an SD ControlNet in the original layout")
    attn2 = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in state if k.endswith(".1.proj_in.weight")), None)
    if attn2 is None or proj_in is None:
        raise ControlNetError(f"{source}: the ControlNet has no cross-attention (attn2.to_k, proj_in)")
    config = dict(SD15_CONFIG)
    config.update({
        "in_channels": shape("input_blocks.0.0.weight")[1],
        "conditioning_channels": shape(f"input_hint_block.{hint[0]}.weight")[1],
        "conditioning_embedding_out_channels": [shape(f"input_hint_block.{hint[0]}.weight")[0]]
        + [shape(f"input_hint_block.{i}.weight")[0] for i in hint[2:-1:2]],
        "block_out_channels": [shape(f"input_blocks.{1 + i * (L + 1)}.0.out_layers.3.weight")[0] for i in range(levels)],
        "layers_per_block": L,
        "down_block_types": ["CrossAttnDownBlock2D" if f"input_blocks.{1 + i * (L + 1)}.1.proj_in.weight" in state
                             else "DownBlock2D" for i in range(levels)],
        "cross_attention_dim": shape(attn2)[1],
        "use_linear_projection": len(shape(proj_in)) == 2,
    })
    if any(k.startswith("label_emb.") for k in state):
        config["addition_embed_type"] = "text_time"
    if any(".transformer_blocks.1." in k for k in state):
        config["transformer_layers_per_block"] = 2
    return config


def from_original(raw, source, unet_config=None, model_name="the loaded model"):
    """(config, diffusers state dict) from an original-layout ControlNet.

    The keys under `control_model.` (or bare, as some repacks store them); other keys (a whole
    SD model saved alongside, in ControlNet 1.0's files) are ignored. The hint encoder's convs
    input_hint_block.{0, 2, .., 2m} are its conv_in, blocks.0 .. blocks.{m−2} and conv_out; the zero
    convs are zero_convs.k.0 and middle_block_out.0; the down path and mid block keep the U-Net's
    original names and are renamed by tinysd.single_file's U-Net mapping.
    """
    prefixed = any(k.startswith(ORIGINAL_PREFIX) for k in raw)
    state = {k[len(ORIGINAL_PREFIX):]: v for k, v in raw.items() if k.startswith(ORIGINAL_PREFIX)} if prefixed else raw
    try:
        config = original_sizes(state, source)
    except (IndexError, ValueError) as e:                 # a key with too few dimensions, a number that is not one
        if isinstance(e, ControlNetError):
            raise
        raise ControlNetError(f"{source}: malformed ControlNet weights ({type(e).__name__}: {e})") from None
    if unet_config is not None:
        check_fits(config, unet_config, source, model_name)
        for key in ("attention_head_dim", "num_attention_heads"):        # head counts leave no trace in the weights
            if unet_config.get(key) is not None:
                config[key] = unet_config[key]
    check_supported(config)
    hint = sorted({_index(k, "input_hint_block.") for k in state if k.startswith("input_hint_block.")})
    hint_names = {hint[0]: "conv_in", hint[-1]: "conv_out", **{i: f"blocks.{n}" for n, i in enumerate(hint[1:-1])}}
    out, rest = {}, {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "input_hint_block":
            out[f"controlnet_cond_embedding.{hint_names[int(parts[1])]}.{parts[-1]}"] = value
        elif parts[0] == "zero_convs":
            out[f"controlnet_down_blocks.{parts[1]}.{parts[-1]}"] = value
        elif parts[0] == "middle_block_out":
            out[f"controlnet_mid_block.{parts[-1]}"] = value
        else:
            rest[key] = value
    up = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in config["down_block_types"][::-1]]
    try:
        out.update(single_file.convert_unet(rest, dict(config, up_block_types=up), source))
    except single_file.SingleFileError as e:
        raise ControlNetError(str(e).replace(single_file.PREFIXES["unet"], ORIGINAL_PREFIX)) from None
    return config, out


# In the pipeline: the control images and the per-step hook


def as_list(value, n, name):
    """A per-ControlNet argument as a list of n: one value for all, or a list of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}={list(value)!r} has {len(value)} entries for {n} ControlNet(s): "
                             f"give one value for all, or one per ControlNet")
        return list(value)
    return [value] * n


def control_images(control_image, n):
    """control_image as one list of images per ControlNet (n of them)."""
    if n == 1:
        return [list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]]
    return [[im] for im in control_image]


def check_control(nets, control_image, scale, start, end, guess_mode, preprocess, n_prompts):
    """The ControlNet arguments of `StableDiffusion.__call__`, checked by its `check_inputs` before
    any model work: a TypeError (wrong kind) or ValueError (wrong value) naming the argument."""
    from tinysd.hints import parse_preprocessor
    from tinysd.pipeline import check_image, check_number, show

    n = len(nets)
    if n == 0:
        given = {"control_image": control_image is not None, "controlnet_conditioning_scale": scale is not None,
                 "control_guidance_start": start != 0.0, "control_guidance_end": end != 1.0,
                 "guess_mode": guess_mode is not False, "control_preprocess": preprocess is not None}
        name = next((k for k, v in given.items() if v), None)
        if name is not None:
            raise ValueError(f"{name} needs a ControlNet: tinysd.load(model, controlnet=PATH) or sd.load_controlnet(PATH)")
        return
    if control_image is None:
        raise ValueError(f"{n} ControlNet(s) loaded ({', '.join(net.name or '?' for net in nets)}): pass control_image=, "
                         f"or sd.unload_controlnet() to generate without")
    if n > 1:
        if not isinstance(control_image, (list, tuple)) or len(control_image) != n:
            raise ValueError(f"control_image: {n} ControlNets need a list of {n} control images, one per ControlNet, "
                             f"got {show(control_image)}")
        if any(isinstance(im, (list, tuple)) for im in control_image):
            raise ValueError("control_image: with several ControlNets, give one image per ControlNet (not lists of images)")
    for k, images in enumerate(control_images(control_image, n)):
        if len(images) not in (1, n_prompts):
            raise ValueError(f"control_image: {len(images)} control images for {n_prompts} prompt(s): "
                             f"give one image, or one per prompt")
        for i, im in enumerate(images):
            check_image("control_image" + (f"[{k}]" if n > 1 else f"[{i}]" if len(images) > 1 else ""), im)
    for s in as_list(scale, n, "controlnet_conditioning_scale"):
        if s is not None:
            check_number("controlnet_conditioning_scale", s, hint=" (None: the pipeline's default)")
    starts, ends = as_list(start, n, "control_guidance_start"), as_list(end, n, "control_guidance_end")
    for a, b in zip(starts, ends):
        check_number("control_guidance_start", a, 0.0, 1.0, hint=" (a fraction of the steps)")
        check_number("control_guidance_end", b, 0.0, 1.0, hint=" (a fraction of the steps)")
        if not a < b:
            raise ValueError(f"control_guidance_start {a} and control_guidance_end {b}: need 0 <= start < end <= 1")
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise TypeError(f"guess_mode must be True or False, got {show(guess_mode)}")
    for spec in as_list(preprocess, n, "control_preprocess"):
        if spec is not None and not isinstance(spec, str):
            raise TypeError(f"control_preprocess must be a preprocessor name such as 'canny' or 'canny:50:150' "
                            f"(or None), got {show(spec)}")
        if spec is not None:
            parse_preprocessor(spec)


@dataclass
class ControlUnit:
    """One ControlNet with its control image(s) and settings, as A1111 calls it a "unit"."""
    net: ControlNetModel
    images: list             # PIL images: one, or one per prompt
    scale: float
    start: float
    end: float
    preprocess: str | None   # a tinysd.hints preprocessor spec, or None: the image is the hint


class Control:
    """The control inputs of one generation: checked before any model work, prepared once the
    size and the steps are known, then asked by the denoising loop for each step's residuals."""

    def __init__(self, nets, control_image, scale=None, start=0.0, end=1.0, guess_mode=False, preprocess=None,
                 default_scale=1.0):
        """The arguments as `check_control` has passed them; the control images are read here."""
        from tinysd.pipeline import load_image

        n = len(nets)
        scales, starts, ends, specs = (as_list(v, n, name) for v, name in (
            (scale, "controlnet_conditioning_scale"), (start, "control_guidance_start"),
            (end, "control_guidance_end"), (preprocess, "control_preprocess")))
        scales = [default_scale if s is None else s for s in scales]      # None: the pipeline's default
        self.units = [ControlUnit(net, [load_image(im) for im in ims], float(s), float(a), float(b), spec)
                      for net, ims, s, a, b, spec in zip(nets, control_images(control_image, n), scales, starts, ends,
                                                         specs)]
        self.guess_mode = bool(guess_mode or nets[0].config.get("global_pool_conditions"))

    def default_size(self, height, width):
        """txt2img without height/width: the first control image's size, rounded down to a multiple of 8."""
        first = self.units[0].images[0]
        return height or first.height - first.height % 8, width or first.width - first.width % 8

    def prepare(self, ops, batch, num_images_per_prompt, guidance, height, width):
        """The hints at height×width, batched as the U-Net's input (doubled for guidance unless in
        guess mode), on the backend once; and each unit's A1111 fields."""
        self.hints, self.fields = [], []
        for unit in self.units:
            hint, fields = prepare_hint(unit, height, width, batch, num_images_per_prompt)
            if guidance and not self.guess_mode:
                hint = np.concatenate([hint, hint])     # the same hint for the unconditional half
            self.hints.append(ops.asarray(hint))
            self.fields.append(fields)
        self.ops, self.guidance = ops, guidance

    def hook(self, num_steps):
        """The per-step hook of a denoising loop of `num_steps` U-Net steps (see ControlHook)."""
        return ControlHook(self.units, self.hints, self.guess_mode, self.guidance, num_steps, self.ops)

    def parameters(self):
        """{"ControlNet 0": "Module: canny, Model: name [hash], Weight: 1.0, ..."}: what A1111's
        ControlNet extension writes in a PNG's parameters for each unit."""
        mode = "ControlNet is more important" if self.guess_mode else "Balanced"
        out = {}
        for i, (unit, fields) in enumerate(zip(self.units, self.fields)):
            entry = {"Module": fields["Module"], "Model": f"{unit.net.name} [{unit.net.short_hash}]",
                     "Weight": unit.scale, "Resize Mode": "Just Resize", "Low Vram": False,
                     **{k: fields[k] for k in ("Processor Res", "Threshold A", "Threshold B") if k in fields},
                     "Guidance Start": unit.start, "Guidance End": unit.end,
                     "Pixel Perfect": unit.preprocess is not None, "Control Mode": mode}
            out[f"ControlNet {i}"] = ", ".join(f"{k}: {v}" for k, v in entry.items())
        return out


def prepare_hint(unit, height, width, batch, num_images_per_prompt):
    """One unit's control image(s) -> (B, 3, height, width) float32 in [0, 1] and its A1111 fields.

    As diffusers' control image processor: RGB, resized (Lanczos) to the generation size, /255,
    channels first; one image repeats for the whole batch, one per prompt repeats for that
    prompt's images. A preprocessor (tinysd.hints) runs on the resized picture, so its edges are
    one output pixel wide (A1111's "pixel perfect").
    """
    from PIL import Image

    from tinysd.hints import preprocess
    from tinysd.pipeline import load_image

    arrays, fields = [], {"Module": "none"}
    for pil in unit.images:
        if pil.size != (width, height):
            pil = pil.resize((width, height), resample=Image.LANCZOS)
        if unit.preprocess is not None:
            hint, fields = preprocess(np.asarray(pil), unit.preprocess)
            pil = load_image(hint)
            if pil.size != (width, height):                  # e.g. the tile hint, shrunk on purpose
                pil = pil.resize((width, height), resample=Image.LANCZOS)
        arrays.append((np.asarray(pil, dtype=np.float32) / 255.0).transpose(2, 0, 1))
    images = np.stack(arrays)
    if len(images) == 1:
        images = np.repeat(images, batch, axis=0)
    elif len(images) * num_images_per_prompt == batch:
        images = np.repeat(images, num_images_per_prompt, axis=0)
    else:
        raise ValueError(f"{len(images)} control images for {batch // num_images_per_prompt} prompt(s): "
                         f"give one image, or one per prompt")
    return np.ascontiguousarray(images), fields


class ControlHook:
    """Per step i: every ControlNet's residuals for the U-Net call, summed over ControlNets.

    ControlNet k acts at step i of n only inside its window, start_k ≤ i/n and (i+1)/n ≤ end_k
    (diffusers' `controlnet_keep`); outside it (or at scale 0) it is not run at all, which equals
    adding zeros. With guidance the U-Net batch is [uncond; cond]; in guess mode the ControlNets
    see only the cond half and the uncond half gets zero residuals.
    """

    def __init__(self, units, hints, guess_mode, guidance, num_steps, ops):
        self.units, self.hints, self.guess_mode, self.guidance, self.ops = units, hints, guess_mode, guidance, ops
        self.keep = [[1.0 - float(i / num_steps < u.start or (i + 1) / num_steps > u.end) for u in units]
                     for i in range(num_steps)]

    def step(self, i):
        """The hook for step i: `hook(x, t, context)` -> the U-Net's extra keyword arguments."""
        return partial(self.residuals, i)

    def residuals(self, i, x, t, context):
        """x: the U-Net's input batch (host, (B, C, h, w); the 9-channel inpainting U-Net's input
        starts with the 4 latent channels, all a ControlNet sees), context: its (B, 77, D) context."""
        cond_only = self.guess_mode and self.guidance
        if cond_only:
            half = x.shape[0] // 2
            x, context = x[half:], context[half:]
        down = mid = None
        for unit, hint, keep in zip(self.units, self.hints, self.keep[i]):
            scale = unit.scale * keep
            if scale == 0.0:
                continue
            sample = self.ops.asarray(np.ascontiguousarray(x[:, :unit.net.in_channels]))
            d, m = unit.net(sample, t, context, hint, scale, self.guess_mode)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if down is None:
            return {}
        if cond_only:
            down = [self._zeros_before(r) for r in down]
            mid = self._zeros_before(mid)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _zeros_before(self, r):
        return self.ops.concat([self.ops.asarray(np.zeros(r.shape, np.float32)), r], axis=0)
