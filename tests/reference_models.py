"""Seeded random SD-v1-shaped reference models, written in both published checkpoint layouts.

Every parity test compares tinysd against diffusers/transformers running these models. The
real SD v1 weights (2-4 GB) cannot be downloaded here, so the reference libraries build the
same topology with random weights and save them exactly as the published checkpoints are laid
out:

    folder/                      diffusers layout (`pipe.save_pretrained`), fp32 and the fp16 variant
    single.safetensors           original single file (`v1-5-pruned-emaonly.safetensors` key names)
    single.ckpt                  the same as a PyTorch zip pickle, `{"state_dict": ...}` (`sd-v1-4.ckpt`)

The single file uses the original (CompVis/ldm) key names; `diffusers_to_original` below ports
diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, and tests/test_weights.py
checks it against diffusers' own converters in the other direction.

    from tests.reference_models import build_reference          # tiny, CI-sized
    ref = build_reference(tmp_path)                             # .pipe, .folder, .single_ckpt, ...
    full = build_reference(tmp_path, size="sd-v1-5", write=False)  # 860M-parameter UNet, for scripts
"""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The published SD v1.5 configs and tokenizer files (vocab.json, merges.txt), as the package ships them.
SD15_CONFIGS = Path(__file__).resolve().parents[1] / "tinysd" / "data" / "sd-v1-5"

# Narrow SD v1: the same block types, depths and U-Net head count (8), widths divided by 10-20.
# CLIP keeps its head size 64 (2 heads of 64), as a single file's loader must infer heads from it.
TINY_UNET = dict(block_out_channels=[32, 64, 64, 64], cross_attention_dim=128, sample_size=8)
TINY_VAE = dict(block_out_channels=[32, 64, 64, 64], sample_size=64)
TINY_TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, projection_dim=128)


def sd15_config(part):
    """The published SD v1.5 config.json of `part` (unet, vae, text_encoder, scheduler)."""
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return json.loads((SD15_CONFIGS / part / name).read_text())


def tokenizer_dir():
    """The published SD v1.5 tokenizer folder (vocab.json, merges.txt), shipped in the package."""
    return SD15_CONFIGS / "tokenizer"


@dataclass
class Reference:
    """A reference pipeline and where its checkpoints were written."""
    pipe: object                     # diffusers StableDiffusion(Inpaint)Pipeline, float32, CPU
    configs: dict                    # part -> config dict (unet, vae, text_encoder, scheduler)
    state_dicts: dict                # part -> {diffusers/transformers key: np.ndarray float32}
    folder: Path | None = None       # diffusers layout, fp32 + fp16 variant
    single_safetensors: Path | None = None
    single_ckpt: Path | None = None
    original: dict = field(default_factory=dict, repr=False)   # original key -> np.ndarray

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def scheduler(self):
        return self.pipe.scheduler


def randomize_(model, seed):
    """Overwrite every parameter with seeded normals of a sensible scale, in place.

    diffusers zero-initialises some layers (conv_out, proj_out, ...) and sets norms to 1/0, so
    with default init a wrong key or a skipped weight could go unnoticed. Here each weight
    differs from every other: matrices/kernels ~ N(0, 1/fan_in) (keeps activations O(1)),
    norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def build_models(size="tiny", in_channels=4, seed=0):
    """(unet, vae, text_encoder) with SD v1.5's configs, narrowed when size == "tiny"."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, text_cfg = sd15_config("unet"), sd15_config("vae"), sd15_config("text_encoder")
    if size == "tiny":
        unet_cfg.update(TINY_UNET)
        vae_cfg.update(TINY_VAE)
        text_cfg.update(TINY_TEXT)
    elif size != "sd-v1-5":
        raise ValueError(f"size must be 'tiny' or 'sd-v1-5', got {size!r}")
    unet_cfg["in_channels"] = in_channels
    torch.manual_seed(seed)
    unet = randomize_(UNet2DConditionModel.from_config(unet_cfg), seed + 1).eval()
    vae = randomize_(AutoencoderKL.from_config(vae_cfg), seed + 2).eval()
    text_cfg = {k: v for k, v in text_cfg.items() if k not in ("architectures", "model_type")}
    text_encoder = randomize_(CLIPTextModel(CLIPTextConfig(**text_cfg)), seed + 3).eval()
    return unet, vae, text_encoder


def text_model_keys(state):
    """transformers >= 5 drops CLIPTextModel's `text_model.` prefix; published files keep it."""
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out


def numpy_state(model):
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def build_reference(out_dir=None, size="tiny", inpainting=False, seed=0, write=True):
    """Build the reference pipeline; with `write`, save it in all three layouts under out_dir."""
    pytest_skip_if_missing()
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, text_encoder = build_models(size, in_channels=9 if inpainting else 4, seed=seed)
    scheduler = PNDMScheduler.from_config(sd15_config("scheduler"))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir()))
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = Reference(
        pipe=pipe,
        configs={"unet": dict(unet.config), "vae": dict(vae.config),
                 "text_encoder": text_encoder.config.to_dict(), "scheduler": dict(scheduler.config)},
        state_dicts={"unet": numpy_state(unet), "vae": numpy_state(vae),
                     "text_encoder": text_model_keys(numpy_state(text_encoder))},
    )
    ref.original = diffusers_to_original(ref.state_dicts)
    if write:
        write_checkpoints(ref, Path(out_dir))
    return ref


def pytest_skip_if_missing():
    """Skip (under pytest) when the reference stack is absent (CI treats such a skip as a failure)."""
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")


def write_checkpoints(ref, out_dir):
    """The diffusers folder (fp32 + fp16 variant), the single .safetensors and the single .ckpt."""
    import torch
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    ref.folder = out_dir / "diffusers"
    # fp16 first: each save rewrites the config.json files, and the last one must say float32.
    copy.deepcopy(ref.pipe).to(dtype=torch.float16).save_pretrained(ref.folder, variant="fp16")
    ref.pipe.save_pretrained(ref.folder, safe_serialization=True)
    # transformers >= 5 writes tokenizer.json only; the published folders ship vocab.json + merges.txt.
    shutil.rmtree(ref.folder / "tokenizer")
    shutil.copytree(tokenizer_dir(), ref.folder / "tokenizer")

    single = dict(ref.original, **single_file_extras())
    ref.single_safetensors = out_dir / "single.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in single.items()}, str(ref.single_safetensors))
    ref.single_ckpt = out_dir / "single.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in single.items()},
                "global_step": 840000, "epoch": 6}, ref.single_ckpt)
    return ref


def single_file_extras():
    """Keys the published single files carry besides the three models; a loader must ignore them."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return {
        "betas": betas.astype(np.float32),
        "alphas_cumprod": np.cumprod(1 - betas).astype(np.float32),
        "model_ema.decay": np.array(0.9999, dtype=np.float32),
        "model_ema.num_updates": np.array(840000, dtype=np.int32),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
    }


# ---- diffusers -> original key names (port of diffusers' convert_diffusers_to_original_stable_diffusion.py)

UNET_TOP = {  # diffusers -> original
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_prefixes():
    """(diffusers prefix, original prefix) for SD v1's four levels, 2 down / 3 up layers each."""
    pairs = list(UNET_TOP.items())
    for i in range(4):
        for j in range(2):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            if i < 3:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1."))
        for j in range(3):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            if i > 0:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        if i < 3:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}."))
    pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    for j in range(2):
        pairs.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}."))
    return pairs


def vae_prefixes():
    pairs = [("conv_norm_out.", "norm_out."), ("mid_block.attentions.0.", "mid.attn_1.")]
    for i in range(4):
        for j in range(2):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        if i < 3:
            pairs.append((f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."))
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"up.{3 - i}.upsample."))
        for j in range(3):  # decoder up blocks are numbered in reverse in the original
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}."))
    for j in range(2):
        pairs.append((f"mid_block.resnets.{j}.", f"mid.block_{j + 1}."))
    return pairs


VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def diffusers_to_original(state_dicts):
    """{original single-file key: array} from {part: {diffusers key: array}}."""
    out = {}
    for key, value in state_dicts["unet"].items():
        if "resnets" in key:
            for hf, sd in UNET_RESNET.items():
                key = key.replace(hf, sd)
        out["model.diffusion_model." + _swap(key, unet_prefixes())] = value
    for key, value in state_dicts["vae"].items():
        new = _swap(key, vae_prefixes()).replace("conv_shortcut", "nin_shortcut")
        if "mid.attn_1." in new:
            new = _swap(new, list(VAE_ATTN.items()))
            if value.ndim == 2:  # Linear (C, C) -> the original's 1x1 conv (C, C, 1, 1)
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    for key, value in state_dicts["text_encoder"].items():
        out["cond_stage_model.transformer." + key] = value
    return out


def _swap(key, pairs):
    """Replace each diffusers part with its original counterpart (as the diffusers script does)."""
    for hf, sd in pairs:
        key = key.replace(hf, sd)
    return key
