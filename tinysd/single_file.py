"""Original single-file SD v1 checkpoints -> diffusers key names.

The published single files (`v1-5-pruned-emaonly.safetensors`, `sd-v1-4.ckpt`) hold all three
models under the names of the original CompVis/ldm code:

    model.diffusion_model.*           U-Net: input_blocks.N.M / middle_block.M / output_blocks.N.M
    first_stage_model.*               VAE:   encoder.down.i / decoder.up.i (numbered in reverse)
    cond_stage_model.transformer.*    CLIP text encoder: transformers' names, with or without `text_model.`

tinysd's modules carry diffusers' names (`down_blocks.1.attentions.0`), so a single file is
renamed once here. Everything else in the file (EMA copies `model_ema.*`, the schedule buffers
`betas`, `alphas_cumprod`, ...) is not needed for inference and is ignored.

The U-Net's flat block list, for SD v1 (L = layers_per_block = 2):

    time_embed.0 / .2               time_embedding.linear_1 / linear_2 (+ cond_proj, LCM U-Nets)
    input_blocks.0.0                conv_in
    input_blocks.{1 + i(L+1) + j}   down_blocks.i.resnets.j (.0) and .attentions.j (.1)
    input_blocks.{(i+1)(L+1)}.0.op  down_blocks.i.downsamplers.0.conv
    middle_block.0 / .1 / .2        mid_block.resnets.0 / attentions.0 / resnets.1
    output_blocks.{i(L+1) + j}      up_blocks.i.resnets.j (.0) and .attentions.j (.1)
    output_blocks.{i(L+1) + L}.1|2  up_blocks.i.upsamplers.0 (.2 when the level has attention)
"""
from __future__ import annotations

import re

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
NAMES = {"unet": "U-Net", "vae": "VAE", "text_encoder": "text encoder"}


class SingleFileError(ValueError):
    """A single-file checkpoint that cannot be mapped onto SD v1's three models."""


def split_components(state, source):
    """{part: {key without its prefix: array}} for unet, vae, text_encoder; other keys dropped.

    Raises SingleFileError naming the missing part(s) and the prefix that was looked for.
    """
    parts = {part: {} for part in PREFIXES}
    for key, value in state.items():
        for part, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
    missing = [part for part, sd in parts.items() if not sd]
    if missing:
        what = ", ".join(f"the {NAMES[p]} (no keys under {PREFIXES[p]!r})" for p in missing)
        raise SingleFileError(
            f"{source} is not a complete SD v1 single-file checkpoint: it lacks {what}. "
            f"Pass a file with all three models, or a diffusers folder.")
    return parts


# What a file that is not a whole SD v1 model is


# (test on the top-level keys, description and the option that takes it), first match wins
FILE_KINDS = (
    (lambda keys: any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k
                      or ".lora.down." in k or "_lora.down." in k or ".hada_w1_a" in k or ".lokr_w1" in k
                      for k in keys),
     "a LoRA", "pass it with --lora PATH[:WEIGHT] (Python: sd.load_lora_weights(path))"),
    (lambda keys: "string_to_param" in keys or "emb_params" in keys or "clip_l" in keys,
     "a textual-inversion embedding",
     "put it in --embeddings-dir and write its file name in the prompt (Python: sd.load_textual_inversion(path))"),
    (lambda keys: any(k.startswith(("control_model.", "controlnet_cond_embedding.", "input_hint_block.")) for k in keys),
     "a ControlNet", "pass it with --control-net PATH"),
    (lambda keys: any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys)
     or (keys and all(re.match(r"\d+\.", k) for k in keys)),
     "a TAESD tiny autoencoder", "pass it with --taesd PATH"),
    (lambda keys: any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks."))
                      for k in keys),
     "a standalone VAE", "pass it with --vae PATH next to a model (Python: tinysd.load(model, vae=path))"),
    (lambda keys: any(k.startswith("conditioner.embedders.") for k in keys),
     "an SD-XL checkpoint", "tinysd implements SD v1 (1.4, 1.5 and their fine-tunes)"),
    (lambda keys: any(k.startswith("cond_stage_model.model.") for k in keys),
     "an SD 2.x checkpoint (OpenCLIP text encoder)", "tinysd implements SD v1 (1.4, 1.5 and their fine-tunes)"),
)


def file_kind(state):
    """(what the file is, the option that takes it) for a checkpoint's top-level dict that is not
    a whole SD v1 model, or None if its keys match no known kind. A single embedding vector
    ({token: (768,)}: diffusers' learned_embeds.bin) counts as a textual-inversion embedding."""
    keys = [k for k in state if isinstance(k, str)]
    for test, what, option in FILE_KINDS:
        if test(keys):
            return what, option
    if len(keys) == 1 and getattr(state[keys[0]], "ndim", 0) in (1, 2):
        return FILE_KINDS[1][1:]
    return None


# U-Net


RESNET = {  # original ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1", "in_layers.2": "conv1",
    "out_layers.0": "norm2", "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut",
}


# An LCM-distilled U-Net's guidance-embedding projection (`time_cond_proj_dim`) has no
# CompVis name: diffusers' convert_diffusers_to_original_stable_diffusion.py leaves its
# diffusers name as is, other converters spell it after `time_embed.0`. Both load.
COND_PROJ = ("time_embedding.cond_proj", "time_embed.cond_proj")


def unet_block_names(config):
    """{original module prefix: diffusers module prefix} for a U-Net of this config."""
    L = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    names = {
        "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
        "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
        **{name: "time_embedding.cond_proj" for name in COND_PROJ},
    }
    for i in range(levels):
        for j in range(L):
            n = 1 + i * (L + 1) + j
            names[f"input_blocks.{n}.0"] = f"down_blocks.{i}.resnets.{j}"
            names[f"input_blocks.{n}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            names[f"input_blocks.{(i + 1) * (L + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
        has_attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(L + 1):
            n = i * (L + 1) + j
            names[f"output_blocks.{n}.0"] = f"up_blocks.{i}.resnets.{j}"
            names[f"output_blocks.{n}.1"] = f"up_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            names[f"output_blocks.{i * (L + 1) + L}.{2 if has_attention else 1}"] = f"up_blocks.{i}.upsamplers.0"
    return names


def convert_unet(state, config, source="single file"):
    """U-Net keys (prefix already removed) -> diffusers UNet2DConditionModel keys."""
    names = unet_block_names(config)
    out, unknown = {}, []
    for key, value in state.items():
        parts = key.split(".")
        for n in (4, 3, 2):  # longest module prefix first: input_blocks.3.0.op before input_blocks.3.0
            module = ".".join(parts[:n])
            if module in names:
                rest = ".".join(parts[n:])
                if ".resnets." in names[module]:
                    layer, param = rest.rsplit(".", 1)
                    rest = f"{RESNET.get(layer, layer)}.{param}"
                out[f"{names[module]}.{rest}"] = value
                break
        else:
            unknown.append(PREFIXES["unet"] + key)
    _raise_unknown(unknown, "U-Net", source)
    return out


# VAE


VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def convert_vae(state, config, source="single file"):
    """VAE keys (prefix removed) -> diffusers AutoencoderKL keys.

    The mid-block attention's q/k/v/proj_out are 1x1 convs (C, C, 1, 1) in the original and
    Linear layers (C, C) in diffusers: the same numbers, reshaped (a view, no copy).
    """
    levels = len(config["block_out_channels"])
    out, unknown = {}, []
    for key, value in state.items():
        new = _vae_key(key, levels)
        if new is None:
            unknown.append(PREFIXES["vae"] + key)
            continue
        if ".mid_block.attentions.0." in new and new.endswith("weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    _raise_unknown(unknown, "VAE", source)
    return out


def _vae_key(key, levels):
    top = re.fullmatch(r"(quant_conv|post_quant_conv|(?:encoder|decoder)\.(?:conv_in|conv_out))\.(weight|bias)", key)
    if top:
        return key
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key)
    if m:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{VAE_ATTENTION[m[2]]}.{m[3]}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.(.+)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.{m[2]}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key)  # decoder.up.3 is the first up block
    if m:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_vae_resnet(m[3])}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.(.+)", key)
    if m:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.{m[2]}"
    return None


def _vae_resnet(rest):
    return rest.replace("nin_shortcut", "conv_shortcut")


# Text encoder


def convert_text_encoder(state):
    """transformers CLIPTextModel keys, always starting `text_model.`; `position_ids` dropped.

    Older files (and transformers >= 5) omit the `text_model.` level; the published diffusers
    folders have it, and so do tinysd's names.
    """
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):  # a buffer (0..76), not a weight
            continue
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out


def _raise_unknown(unknown, name, source):
    if unknown:
        raise SingleFileError(
            f"{source}: {len(unknown)} {name} key(s) do not fit SD v1's layout: "
            + ", ".join(unknown[:6]) + (" ..." if len(unknown) > 6 else ""))


# Configs


def configs_for(parts, base, source="single file"):
    """Configs for a single file's weights: `base` (SD v1.5's) with every size read from the shapes.

    A single file carries no config. The SD v1 topology (block types, ResNet/attention layout,
    norms, activations) comes from `base`; the sizes are read off the weights, so fine-tunes,
    the 9-channel inpainting U-Net (latent 4 + mask 1 + masked-image latent 4) and narrower
    test models all load. Head counts leave no trace in the shapes: the U-Net keeps SD v1's 8
    heads (`attention_head_dim`), and CLIP's heads are hidden_size / 64, as in every CLIP.
    """
    configs = {part: dict(cfg) for part, cfg in base.items()}
    configs["unet"].update(unet_sizes(parts["unet"], source))
    configs["vae"].update(vae_sizes(parts["vae"], source))
    configs["text_encoder"].update(text_encoder_sizes(convert_text_encoder(parts["text_encoder"]), source))
    return configs


def _count(state, pattern):
    """How many distinct integers fill the {} in `pattern` among the keys."""
    regex = re.compile(re.escape(pattern).replace(r"\{\}", r"(\d+)") + r"\.")
    return len({m[1] for key in state if (m := regex.match(key))})


def unet_sizes(state, source):
    shape = lambda key: _shape({"unet": state}, "unet", key, source)  # noqa: E731
    levels_x_blocks = _count(state, "input_blocks.{}")   # conv_in + levels·L resnets + (levels-1) ops = levels·(L+1)
    first_op = min((int(k.split(".")[1]) for k in state if k.endswith(".0.op.weight")), default=None)
    if first_op is None:
        raise SingleFileError(f"{source}: the U-Net has no downsampler (input_blocks.N.0.op); not SD v1's layout")
    L = first_op - 1                                                  # input_blocks.{L+1}.0.op closes level 0
    levels = levels_x_blocks // (L + 1)
    widths = [shape(f"input_blocks.{1 + i * (L + 1)}.0.out_layers.3.weight")[0] for i in range(levels)]
    down = ["CrossAttnDownBlock2D" if f"input_blocks.{1 + i * (L + 1)}.1.proj_in.weight" in state else "DownBlock2D"
            for i in range(levels)]
    up = ["CrossAttnUpBlock2D" if f"output_blocks.{i * (L + 1)}.1.proj_in.weight" in state else "UpBlock2D"
          for i in range(levels)]
    attn2 = next((k for k in state if k.endswith("attn2.to_k.weight")), None)
    if attn2 is None:
        raise SingleFileError(f"{source}: the U-Net has no cross-attention (attn2.to_k); not SD v1's layout")
    proj_in = next(k for k in state if k.endswith(".1.proj_in.weight"))
    cond_proj = next((f"{name}.weight" for name in COND_PROJ if f"{name}.weight" in state), None)
    return {
        "in_channels": shape("input_blocks.0.0.weight")[1], "out_channels": shape("out.2.weight")[0],
        "block_out_channels": widths, "layers_per_block": L,
        "down_block_types": down, "up_block_types": up,
        "cross_attention_dim": shape(attn2)[1],
        "use_linear_projection": len(shape(proj_in)) == 2,            # SD v1: a 1x1 conv (4-D)
        "time_cond_proj_dim": shape(cond_proj)[1] if cond_proj else None,   # LCM-distilled U-Nets
    }


def vae_sizes(state, source):
    shape = lambda key: _shape({"vae": state}, "vae", key, source)  # noqa: E731
    levels = _count(state, "encoder.down.{}")
    return {
        "in_channels": shape("encoder.conv_in.weight")[1], "out_channels": shape("decoder.conv_out.weight")[0],
        "latent_channels": shape("post_quant_conv.weight")[0],
        "block_out_channels": [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)],
        "layers_per_block": _count(state, "encoder.down.0.block.{}"),
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def text_encoder_sizes(state, source):
    shape = lambda key: _shape({"text_encoder": state}, "text_encoder", key, source)  # noqa: E731
    vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
    if hidden % 64:
        raise SingleFileError(
            f"{source}: the text encoder's hidden size {hidden} is not a multiple of CLIP's head size 64, so "
            f"its head count cannot be inferred; pass config=<a diffusers folder with the model's configs>")
    return {
        "vocab_size": vocab, "hidden_size": hidden, "num_attention_heads": hidden // 64,
        "max_position_embeddings": shape("text_model.embeddings.position_embedding.weight")[0],
        "intermediate_size": shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_hidden_layers": _count(state, "text_model.encoder.layers.{}"),
    }


def _shape(parts, part, key, source):
    if key not in parts[part]:
        raise SingleFileError(f"{source}: the {NAMES.get(part, part)} has no {key!r}")
    return tuple(int(n) for n in parts[part][key].shape)


def convert(state, base_configs, source="single file", derive_sizes=True):
    """(configs, state_dicts) in diffusers/transformers names from a whole single-file state.

    derive_sizes: read the sizes off the weights (see configs_for); False uses base_configs as given.
    """
    parts = split_components(state, source)
    configs = configs_for(parts, base_configs, source) if derive_sizes else {p: dict(c) for p, c in base_configs.items()}
    state_dicts = {
        "unet": convert_unet(parts["unet"], configs["unet"], source),
        "vae": convert_vae(parts["vae"], configs["vae"], source),
        "text_encoder": convert_text_encoder(parts["text_encoder"]),
    }
    return configs, state_dicts
