"""Seeded random ControlNets built by diffusers, and the original (ControlNet 1.x / A1111) key layout.

    net = random_controlnet(tiny_sd.unet, seed=0)        # diffusers ControlNetModel, every parameter random
    original = controlnet_to_original(numpy_state(net))   # {"control_model.input_hint_block.0.weight": ...}

The published single files (`control_v11p_sd15_canny.pth`, `.safetensors`) keep lllyasviel's
names under `control_model.`:

    input_hint_block.{0, 2, 4, ..., 14}   controlnet_cond_embedding.conv_in, .blocks.0-5, .conv_out
    time_embed.0 / .2, input_blocks.*, middle_block.*   the U-Net's down path and mid block (SD names)
    zero_convs.{k}.0                      controlnet_down_blocks.{k}
    middle_block_out.0                    controlnet_mid_block

diffusers ships only the other direction (`diffusers.loaders.single_file_utils.convert_controlnet_checkpoint`);
`controlnet_to_original` is its inverse, and tests/test_controlnet.py checks that converting
back with diffusers' function gives every original tensor again.
"""
from __future__ import annotations

from reference_models import UNET_RESNET, _swap, randomize_, unet_prefixes

ORIGINAL_PREFIX = "control_model."


def random_controlnet(unet, seed=0, conditioning_embedding_out_channels=(16, 32, 96, 256)):
    """`ControlNetModel.from_unet(unet)` with every parameter overwritten by seeded noise, so the
    zero convolutions (and the hint encoder's last conv) are not zero."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_embedding_out_channels)
    return randomize_(net, seed).eval()


def controlnet_to_original(state):
    """{original single-file key: array} of a diffusers ControlNet state dict (SD v1 topology)."""
    n_hint = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks."))
    out = {}
    for key, value in state.items():
        if key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            if rest.startswith("conv_in."):
                new = "input_hint_block.0." + rest[len("conv_in."):]
            elif rest.startswith("conv_out."):
                new = f"input_hint_block.{2 * (n_hint + 1)}." + rest[len("conv_out."):]
            else:
                _, k, param = rest.split(".")
                new = f"input_hint_block.{2 * (int(k) + 1)}.{param}"
        elif key.startswith("controlnet_down_blocks."):
            _, k, param = key.split(".")
            new = f"zero_convs.{k}.0.{param}"
        elif key.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + key.split(".")[-1]
        else:
            if "resnets" in key:
                for hf, sd in UNET_RESNET.items():
                    key = key.replace(hf, sd)
            new = _swap(key, unet_prefixes())
        out[ORIGINAL_PREFIX + new] = value
    return out
