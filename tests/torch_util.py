"""Small helpers for parity tests that build reference modules with torch."""
from __future__ import annotations

import numpy as np


def randomize_(module, seed, scale=0.2):
    """Overwrite every parameter of a torch module with seeded N(0, scale²) values.

    diffusers zero-initialises some layers (conv_out, proj_out) and norms start at 1/0: random
    values everywhere make a parity test exercise every weight. Norm weights get 1 + noise.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return module.eval()


def random_lora_(model, seed):
    """Give every lora_A/lora_B of a peft-injected model seeded values: both non-zero, so W changes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g) / np.prod(p.shape[1:]) ** 0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / p.shape[1] ** 0.5)
    return model


def state_dict_numpy(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def to_numpy(x):
    return x.detach().cpu().numpy()


def assert_close(actual, expected, rtol=1e-4, name="output"):
    """|actual − expected|_max ≤ rtol · max|expected|: error relative to the output's scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = float(np.abs(actual - expected).max())
    scale = float(np.abs(expected).max())
    assert err <= rtol * scale, f"{name}: max abs error {err:.3g} > {rtol:g} × scale {scale:.3g}"
    return err / scale


def sd_v15_config(part):
    """The published SD v1.5 config.json of `part` (unet, vae, text_encoder, scheduler)."""
    import json
    from importlib.resources import files

    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return json.loads(files("tinysd").joinpath("data", "sd-v1-5", part, name).read_text())
