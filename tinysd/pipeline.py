"""The whole picture: prompt -> tokenizer -> text encoder -> U-Net ↔ sampler -> VAE -> image.

    sd = tinysd.load("stable-diffusion-v1-5/stable-diffusion-v1-5")
    image = sd("a cat in space", seed=0).images[0]

Reverse diffusion with classifier-free guidance: start from Gaussian noise z_T and at each of
the sampler's timesteps predict the noise twice in one U-Net batch, without and with the text,

    ε = ε_uncond + s·(ε_cond − ε_uncond)

and let the sampler step z_t -> z_{t−1}. img2img starts from the encoded image noised to
`strength`; inpainting keeps the unmasked region from the encoded image at every step (or, for
the 9-channel inpainting U-Net, feeds it the mask and the masked image). Every random draw comes
from one torch-compatible generator, in the order diffusers draws, so the same seed gives the
same picture as diffusers' pipelines.
"""
from __future__ import annotations

import inspect
import math
import numbers
import os
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinysd import embeddings, prompt as a1111_prompt
from tinysd.backend import get_backend
from tinysd.controlnet import Control, build_controlnet, check_control, read_controlnet
from tinysd.outpaint import check_outpaint, outpaint_canvas, overlay_mask, paste_unmasked
from tinysd.rng import Generator
from tinysd.pngmeta import sampler_fields
from tinysd.schedulers import SCHEDULERS, LCMScheduler, canonical_name, make_scheduler
from tinysd.taesd import load_taesd
from tinysd.text_encoder import CLIPTextModel
from tinysd.tokenizer import CLIPTokenizer
from tinysd.unet import UNet2DConditionModel, guidance_scale_embedding
from tinysd.upscale import check_hires, hires_pass, hires_settings, sd_upscale
from tinysd.vae import AutoencoderKL
from tinysd.weights import load_checkpoint, load_vae

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
VAE_SCALE = 8   # the VAE shrinks H and W by 8
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}   # diffusers' pipelines' defaults


def load(source=DEFAULT_MODEL, backend=None, *, variant=None, config=None, vae=None, taesd=None,
         controlnet=None):
    """A ready pipeline from a model id, a diffusers folder or a single .safetensors/.ckpt file.

    backend: 'numpy' (reference), 'cpu' (Numba kernels) or 'cuda'; None picks 'cpu' if it runs.
    variant: 'fp16' reads a diffusers folder's `*.fp16.safetensors` (computed in float32).
    config: for a single file whose model is not SD v1.5-shaped, a diffusers folder (or
    {part: config dict}) giving the configs, as diffusers' `from_single_file(config=...)`.
    vae: a standalone VAE to use instead of the model's own (e.g. vae-ft-mse-840000-ema-pruned):
    a file in the original or diffusers layout, or a diffusers `vae/` folder (weights.load_vae).
    taesd: the tiny autoencoder (`tinysd.taesd.load_taesd`: a folder, hub id, taesd_decoder
    file or (encoder, decoder) pair) for `vae_decoder="taesd"` and previews; loaded first.
    controlnet: a ControlNet (folder, single file or packaged name) or a list of them; each is
    checked against the model's U-Net before anything is built (tinysd.controlnet).
    """
    backend = get_backend(backend)
    tiny = load_taesd(taesd, backend) if taesd is not None else None
    ckpt = load_checkpoint(source, variant=variant, config=config)
    controlnets = [read_controlnet(c, ckpt.configs["unet"], model_name(source))
                   for c in ([] if controlnet is None else controlnet if isinstance(controlnet, (list, tuple)) else [controlnet])]
    vae_fields = {}
    if vae is not None:
        ckpt.configs["vae"], ckpt.state_dicts["vae"], vae_file = load_vae(vae, ckpt.configs["vae"])
        check_vae_fits(ckpt.configs, vae)
        vae_fields = {"VAE hash": file_sha256(vae_file)[:10], "VAE": Path(vae_file).name if Path(vae).is_file()
                      else Path(vae).name}                    # as A1111 writes a VAE file's name and hash
    where = str(ckpt.source)

    def build(cls, part):
        return cls(ckpt.configs[part]).set_backend(backend).load_state_dict(
            ckpt.state_dicts[part], source=f"{where} ({part})")

    tokenizer = CLIPTokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else CLIPTokenizer()
    sd = StableDiffusion(tokenizer, build(CLIPTextModel, "text_encoder"), build(UNet2DConditionModel, "unet"),
                         build(AutoencoderKL, "vae"), ckpt.configs["scheduler"], backend)
    sd.model_name = model_name(source)
    sd.vae_fields = vae_fields
    sd.taesd = tiny
    sd.controlnets = [build_controlnet(c, backend) for c in controlnets]
    return sd


def check_vae_fits(configs, vae):
    """A swapped-in VAE must make the latents the U-Net works on."""
    latent, unet_out = configs["vae"].get("latent_channels", 4), configs["unet"].get("out_channels", 4)
    if latent != unet_out:
        raise ValueError(f"vae {vae}: its latents have {latent} channels, the model's U-Net works on {unet_out}")


def file_sha256(path, chunk=1 << 24):
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_name(source):
    """What A1111 writes as "Model": the checkpoint file's stem, the folder's or the repo's name."""
    path = Path(str(source))
    return path.stem if path.suffix in (".safetensors", ".ckpt") else path.name


@dataclass
class PipelineOutput:
    images: object                       # list of PIL images, or (B, H, W, 3) floats in [0, 1], or latents
    seed: int | None = None              # the seed the noise came from (None if `generator` was passed)
    nsfw_content_detected: list = field(default_factory=list)   # no safety checker: always empty
    # What the generation did, as AUTOMATIC1111 names it in a PNG's `parameters` ("Steps",
    # "Sampler", "CFG scale", "Seed", "Size", "Model", "Denoising strength", ...): tinysd.pngmeta.infotext
    parameters: dict = field(default_factory=dict)


class StableDiffusion:
    model_name = None        # "Model" in the PNG parameters; set by `load`
    taesd = None             # tinysd.taesd.AutoencoderTiny for vae_decoder="taesd" and previews
    vae_fields = {}          # "VAE", "VAE hash" in the PNG parameters for a swapped-in VAE; set by `load`
    num_timesteps = 0        # U-Net steps of the generation running (or last run), for progress bars
    num_tiles = 0            # tiles of the SD upscale running (or last run), for progress bars

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config, backend):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.controlnets = []    # tinysd.controlnet.ControlNetModel, applied when a call passes control_image
        self.scheduler_config = dict(scheduler_config)
        self.scheduler = make_scheduler(self.default_sampler, self.scheduler_config)
        self.ops = backend
        self.textual_inversions = {}      # token -> tinysd.embeddings.TextualInversion, once loaded

    @property
    def default_sampler(self):
        """The sampler name of the model's own scheduler (scheduler/scheduler_config.json)."""
        name = canonical_name(self.scheduler_config.get("_class_name", "PNDMScheduler"))
        if self.is_lcm_model and name not in ("lcm", "tcd"):
            return "lcm"     # a single file carries SD v1.5's PNDM config; this U-Net needs LCM's steps
        karras = f"{name}_karras"
        return karras if self.scheduler_config.get("use_karras_sigmas") and karras in SCHEDULERS else name

    @property
    def is_lcm_model(self):
        """An LCM-distilled U-Net (`time_cond_proj_dim`): guidance enters as an embedding, no CFG batch."""
        return self.unet.config.get("time_cond_proj_dim") is not None

    # -- LoRA (tinysd.lora), with diffusers' method names ------------------------------------------
    @property
    def loras(self):
        """The LoRA adapters loaded into the text encoder and U-Net (`tinysd.lora.LoraAdapters`)."""
        if "_loras" not in self.__dict__:
            from tinysd.lora import LoraAdapters
            self._loras = LoraAdapters({"unet": self.unet, "text_encoder": self.text_encoder})
        return self._loras

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None):
        """Load a LoRA (kohya/A1111, diffusers or PEFT; .safetensors, .pt/.bin, a diffusers LoRA
        folder, or a dict) and make it the active adapter, with weight 1. Its name defaults to
        default_0, default_1, ... Raises tinysd.lora.LoraError, changing nothing, if it does not fit."""
        self.loras.load(pretrained_model_name_or_path_or_dict, adapter_name)

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Use exactly these adapters, each with its weight (a number, or {"unet": w, "text_encoder": w})."""
        self.loras.set_adapters(adapter_names, adapter_weights)

    def get_active_adapters(self):
        return self.loras.active()

    def delete_adapters(self, adapter_names):
        self.loras.delete(adapter_names)

    def unload_lora_weights(self):
        """Remove every LoRA: the weights are the loaded ones again, bit for bit."""
        self.loras.unload()

    # -- the parts of one generation --------------------------------------------------------------
    def load_textual_inversion(self, pretrained_model_name_or_path, token=None):
        """Add a textual-inversion embedding (A1111 .pt, .safetensors, diffusers learned_embeds.bin
        or its folder) as new tokens, as diffusers' `load_textual_inversion` (tinysd.embeddings)."""
        return embeddings.load_textual_inversion(self, pretrained_model_name_or_path, token)

    def encode_prompt(self, prompt, negative_prompt=None, num_images_per_prompt=1, guidance=True, *,
                      prompt_embeds=None, negative_prompt_embeds=None, prompt_weighting=False, clip_skip=None):
        """Text -> context (B·n, L, D); with guidance, [uncond; cond] stacked in one batch.

        Diffusers' plain prompts: L = 77, longer prompts cut (with a warning), `clip_skip` on the
        prompt only (as diffusers). prompt_weighting=True: A1111's rules (tinysd.prompt) with
        `clip_skip` on both; L = 77·k for k chunks, the shorter side padded with the empty
        prompt's chunks. prompt_embeds / negative_prompt_embeds (B, L, D) are used as given.
        """
        return self._encode_prompt(prompt, negative_prompt, num_images_per_prompt, guidance, prompt_embeds,
                                   negative_prompt_embeds, prompt_weighting, clip_skip)[0]

    def _encode_prompt(self, prompt, negative_prompt, n, guidance, prompt_embeds, negative_prompt_embeds,
                       prompt_weighting, clip_skip):
        """(context, {A1111 field: value}): "Clip skip", "TI hashes", "Pad conds" where they apply."""
        prompts, negatives = self._prompt_lists(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        negatives = negatives if guidance else None
        clip_skip = clip_skip or None
        fields = {"Clip skip": clip_skip + 1 if clip_skip and prompts else None}
        if prompt_weighting:
            texts = (prompts or []) + (negatives or [])
            encoded, used, k = self._embed_weighted(texts, clip_skip) if texts else (None, [], [])
            cond = encoded[:len(prompts)] if prompts is not None else None
            uncond = encoded[len(prompts or []):] if negatives is not None else None
            # A1111 pads the shorter of prompt and negative prompt (and says so) with its "Pad conds" option
            fields["Pad conds"] = prompts is not None and negatives is not None and \
                max(k[:len(prompts)]) != max(k[len(prompts):])
        else:
            used = []
            cond = self._embed(prompts, clip_skip, used) if prompts is not None else None
            uncond = self._embed(negatives, None, used) if negatives is not None else None   # as diffusers
        cond = self._embeds(prompt_embeds, "prompt_embeds") if cond is None else cond
        if guidance and uncond is None:
            uncond = self._embeds(negative_prompt_embeds, "negative_prompt_embeds")
        if guidance and uncond.shape != cond.shape:
            raise ValueError(f"the prompt's context has shape {cond.shape} and the negative prompt's {uncond.shape}: "
                             f"pass prompt_embeds and negative_prompt_embeds of one shape")
        fields["TI hashes"] = embeddings.hashes_field(dict.fromkeys(used))
        context = np.concatenate([uncond, cond]) if guidance else cond
        context = np.repeat(context, n, axis=0)        # each prompt's n images side by side
        return self.ops.asarray(context), {k: v for k, v in fields.items() if v}

    def _prompt_lists(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """(prompts, negative prompts) as lists; None where embeddings are given instead."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give either `prompt` or `prompt_embeds`" if prompt is None else
                             "give `prompt` or `prompt_embeds`, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give `negative_prompt` or `negative_prompt_embeds`, not both")
        prompts = None if prompt is None else [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) if prompts is not None else len(self._embeds(prompt_embeds, "prompt_embeds"))
        if negative_prompt_embeds is not None:
            return prompts, None
        negatives = [""] * batch if negative_prompt is None else [negative_prompt] * batch \
            if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != batch:
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts")
        return prompts, negatives

    def _embeds(self, x, name):
        """Given embeddings, checked: (B, L, D) with D the U-Net's cross-attention width."""
        x = np.asarray(x, dtype=np.float32)
        width = self.unet.config["cross_attention_dim"]
        if x.ndim != 3 or x.shape[2] != width or not x.shape[0] or not x.shape[1]:
            raise ValueError(f"{name} must have shape (batch, tokens, {width}), got {x.shape}")
        return x

    def _embed(self, prompts, clip_skip, used):
        """Diffusers' plain prompts -> (B, 77, D); appends the embeddings they use to `used`."""
        prompts = [embeddings.expand_multi_vector(p, self.tokenizer) for p in prompts]
        ids = self.tokenizer(prompts)                         # (B, 77)
        used += embeddings.used_in(ids, self.textual_inversions.values())
        return self.ops.numpy(self.text_encoder(ids, clip_skip))

    def _embed_weighted(self, texts, clip_skip):
        """A1111's prompts (tinysd.prompt) -> ((B, 77·k, D), the embeddings they use, each one's
        chunk count); all padded to the longest one's k chunks with the empty prompt's chunk."""
        lines = [a1111_prompt.tokenize_line(t, self.tokenizer, self.textual_inversions.values()) for t in texts]
        counts = [len(chunks) for chunks, _ in lines]
        chunks = [c for cs, _ in lines for c in cs + [a1111_prompt.empty_chunk(self.tokenizer)] * (max(counts) - len(cs))]
        z = self.ops.numpy(self.text_encoder(np.array([c.ids for c in chunks]), clip_skip))   # (B·k, 77, D)
        z = np.stack([a1111_prompt.emphasis(zc, c.weights) for zc, c in zip(z, chunks)])
        return z.reshape(len(texts), -1, z.shape[-1]), [ti for _, used in lines for ti in used], counts

    def predict_noise(self, latents, t, context, guidance_scale, timestep_cond=None, unet=None, control=None):
        """ε for `latents` at t; with guidance, ε_uncond + s·(ε_cond − ε_uncond) from one batch.

        timestep_cond: an LCM-distilled U-Net's guidance embedding, which replaces the CFG batch.
        unet: the U-Net as this generation calls it (DeepCache's per-step hook), else self.unet.
        control: the ControlNets' per-step hook, control(x, t, context) -> the U-Net's extra residuals
        (`down_block_additional_residuals`, `mid_block_additional_residual`; tinysd.controlnet).
        """
        guidance = guidance_scale > 1.0 and timestep_cond is None
        x = np.concatenate([latents, latents]) if guidance else latents
        residuals = control(x, t, context) if control is not None else {}
        eps = self.ops.numpy((unet or self.unet)(self.ops.asarray(x), t, context, timestep_cond=timestep_cond,
                                                 **residuals))
        if not guidance:
            return eps
        eps_uncond, eps_cond = np.split(eps, 2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def decode(self, latents, decoder="vae"):
        """Latents -> images (B, H, W, 3) in [0, 1]: by the VAE (undoing the 0.18215 scaling
        first), or with decoder="taesd" by the tiny autoencoder (whose scaling factor is 1)."""
        model = self._decoder(decoder)
        x = self.ops.numpy(model.decode(np.asarray(latents, np.float32) / np.float32(model.scaling_factor)))
        return np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def _decoder(self, decoder):
        if decoder not in ("vae", "taesd"):
            raise ValueError(f"vae_decoder {decoder!r}: choose 'vae' or 'taesd'")
        if decoder == "taesd" and (self.taesd is None or "decoder" not in self.taesd.parts):
            raise ValueError("vae_decoder='taesd' needs a TAESD decoder: tinysd.load(model, taesd=PATH) "
                             "(CLI --taesd PATH), or sd.taesd = tinysd.taesd.load_taesd(PATH)")
        return self.vae if decoder == "vae" else self.taesd

    def encode(self, images, generator):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents z = 0.18215·(μ + σ·noise)."""
        dist = self.vae.encode(images)
        return self.vae.scaling_factor * dist.sample(generator.randn(dist.mean.shape))

    def enable_vae_tiling(self):
        """Encode and decode in overlapping tiles whenever a picture is larger than one tile
        (diffusers' rule, tinysd.vae); the default tiles only above the VAE's memory budget."""
        self.vae.use_tiling = True

    def disable_vae_tiling(self):
        """Never tile, however large the picture (the default tiles above the VAE's memory budget)."""
        self.vae.use_tiling = False

    # -- generation -----------------------------------------------------------------------------------
    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5,
                 height=None, width=None, seed=None, generator=None, latents=None, scheduler=None, eta=0.0,
                 output_type="pil", callback=None, image=None, strength=None, mask_image=None,
                 num_images_per_prompt=1, prompt_embeds=None, negative_prompt_embeds=None,
                 prompt_weighting=False, clip_skip=None, vae_decoder="vae", deepcache_interval=None,
                 deepcache_branch=0, control_image=None, controlnet_conditioning_scale=None,
                 control_guidance_start=0.0, control_guidance_end=1.0, guess_mode=False, control_preprocess=None,
                 keep_unmasked=False, enable_hr=False, hr_scale=None, hr_upscaler=None, hr_second_pass_steps=None,
                 hr_resize_x=None, hr_resize_y=None, denoising_strength=None, hr_sampler_name=None, hr_prompt=None,
                 hr_negative_prompt=None):
        """Generate images; the arguments are diffusers' `StableDiffusionPipeline` ones.

        txt2img by default; img2img with `image=` (and `strength`, default 0.8); inpainting with
        `image=` and `mask_image=` (white = repaint; `strength` default 1.0). `seed` (or a
        `tinysd.rng.Generator`) fixes the noise as `torch.Generator("cpu").manual_seed(seed)` does.
        `callback(step, timestep, latents)` runs after every step; if it takes a
        `pred_original_sample` argument it also gets the sampler's x̂₀.
        Prompts as diffusers reads them (77 tokens); prompt_weighting=True reads them as A1111
        does: `(word:1.3)`, `[word]`, BREAK, any length (see `encode_prompt`). `clip_skip=N` skips
        the text encoder's last N layers (diffusers' meaning: A1111's "Clip skip" N + 1).
        `deepcache_interval=N`: DeepCache, the full U-Net every N-th step and between them only its
        shallow branch at `deepcache_branch` on the cached deep features (`DeepCache`).
        With ControlNets loaded (`load_controlnet`): `control_image` (one per ControlNet), each with
        its `controlnet_conditioning_scale` (default 1.0, 0.8 for img2img, 0.5 for inpainting) and
        `control_guidance_start`/`_end` (fractions of the steps), and `guess_mode`, as diffusers'
        StableDiffusionControlNet(Img2Img|Inpaint)Pipeline;
        `control_preprocess` ("canny", "canny:50:150", ... see tinysd.hints) makes the hint first.
        Returns PipelineOutput with `.images` per `output_type`: "pil", "np" or "latent".
        `vae_decoder="taesd"` decodes with the tiny autoencoder (`load(..., taesd=PATH)`).

        LCM: `scheduler="lcm", num_inference_steps=4, guidance_scale=1` with the LCM-LoRA on any
        SD v1.5 model; an LCM-distilled U-Net (`time_cond_proj_dim`) runs as diffusers'
        `LatentConsistencyModelPipeline`: guidance_scale enters as the embedding of w = s − 1,
        one U-Net pass per step, no negative prompt; its img2img takes strength·50 of LCM's grid.

        `image` may also be a list of pictures (one batch), or latents (B, 4, h, w) to start
        img2img from, as diffusers' img2img takes them. `keep_unmasked=True` pastes the image's
        pixels back outside `mask_image` (blending where it is grey), as A1111 and diffusers'
        `apply_overlay` do; False (the default) returns what diffusers' inpainting pipeline returns.

        Hires fix (A1111's txt2img API names): `enable_hr=True` draws at height×width, upscales by
        `hr_scale` (default 2) or to `hr_resize_x`×`hr_resize_y` with `hr_upscaler` ("Latent"
        (default), "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
        "Latent (nearest)", "Latent (nearest-exact)" on the latents; "Lanczos", "Nearest" on the
        decoded picture), then repaints at the new size by img2img from the same seed: A1111's
        `hr_second_pass_steps` steps (0: num_inference_steps) of a schedule stretched to
        steps/`denoising_strength` (default 0.75), with `hr_sampler_name`, `hr_prompt` and
        `hr_negative_prompt` if given (tinysd.upscale.HiresFix).
        """
        self.check_inputs(prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, seed,
                          generator, latents, scheduler, eta, output_type, callback, image, strength, mask_image,
                          num_images_per_prompt, prompt_embeds, negative_prompt_embeds, prompt_weighting, clip_skip,
                          deepcache_interval, deepcache_branch, control_image, controlnet_conditioning_scale,
                          control_guidance_start, control_guidance_end, guess_mode, control_preprocess,
                          keep_unmasked, enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps, hr_resize_x,
                          hr_resize_y, denoising_strength, hr_sampler_name, hr_prompt, hr_negative_prompt)
        if output_type != "latent":
            self._decoder(vae_decoder)           # "vae", or "taesd" with a TAESD loaded
        height, width = (None if v is None else int(v) for v in (height, width))   # 512.0 -> 512, as diffusers
        if generator is None:
            seed = secrets.randbits(63) if seed is None else int(seed)
            generator = Generator(seed)
        else:
            seed = None
        control = None
        if self.controlnets:                                    # the control images are read before any model work
            default_scale = 1.0 if image is None else 0.8 if mask_image is None else 0.5   # as diffusers' pipelines
            control = Control(self.controlnets, control_image, controlnet_conditioning_scale, control_guidance_start,
                              control_guidance_end, guess_mode, control_preprocess, default_scale)
        txt2img, init_latents = image is None, None
        if is_latents(image):          # img2img from latents (B, 4, h, w), as diffusers' img2img takes them
            init_latents, image = np.asarray(image, np.float32), None
            height, width = (VAE_SCALE * side for side in init_latents.shape[2:])
        elif image is not None:
            image = preprocess_images(image, height, width)
            height, width = image.shape[2:]
        elif control is not None:
            height, width = control.default_size(height, width)
        default_size = self.unet.config.get("sample_size", 64) * VAE_SCALE
        height, width = height or default_size, width or default_size
        check_size(height, width)
        if txt2img and self.unet.in_channels == 9:
            # txt2img on an inpainting model, as A1111 runs it: the whole picture is repainted and
            # the masked image the U-Net sees is mid-grey (0 in [-1, 1])
            image, mask_image = np.zeros((1, 3, height, width), np.float32), np.ones((height, width), np.float32)

        guidance = guidance_scale > 1.0 and not self.is_lcm_model
        context, prompt_fields = self._encode_prompt(prompt, negative_prompt, num_images_per_prompt, guidance,
                                                     prompt_embeds, negative_prompt_embeds, prompt_weighting, clip_skip)
        batch = context.shape[0] // (2 if guidance else 1)
        timestep_cond = None
        if self.is_lcm_model:             # as LatentConsistencyModelPipeline: w = s − 1, no CFG batch
            if negative_prompt is not None:
                warnings.warn("an LCM-distilled U-Net runs without classifier-free guidance: negative_prompt "
                              "has no effect", stacklevel=2)
            w = np.full(batch, guidance_scale - 1, dtype=np.float32)
            timestep_cond = guidance_scale_embedding(w, self.unet.config["time_cond_proj_dim"])
        if control is not None:
            control.prepare(self.ops, batch, num_images_per_prompt, guidance, height, width)

        sched, sched_name = self._scheduler(scheduler)
        sched.set_timesteps(num_inference_steps)
        timesteps = sched.timesteps
        shape = (batch, 4, height // VAE_SCALE, width // VAE_SCALE)

        mask = masked_latents = image_latents = None
        if mask_image is not None:
            mask, masked_image = preprocess_mask(mask_image, image)
            strength = DEFAULT_STRENGTH["inpaint"] if strength is None else strength
        elif image is not None:
            strength = DEFAULT_STRENGTH["img2img"] if strength is None else strength

        if image is None and init_latents is None:     # txt2img (on a 9-channel model, image is the grey canvas)
            if latents is None:
                latents = generator.randn(shape)
            latents = np.asarray(latents, dtype=np.float32) * np.float32(sched.init_noise_sigma)
            noise = None
        else:
            timesteps = strength_timesteps(sched, num_inference_steps, strength, within_grid=self.is_lcm_model)
            pure_noise = mask is not None and strength >= 1.0      # inpainting from scratch
            nine_channel = self.unet.in_channels == 9
            if not (pure_noise and nine_channel):                   # the 9-channel U-Net sees the image
                image_latents = repeat_to(self.encode(image, generator) if init_latents is None else init_latents,
                                          batch)                      # through its input
            noise = generator.randn(shape)
            if pure_noise:
                latents = noise * np.float32(sched.init_noise_sigma)
            else:
                latents = sched.add_noise(image_latents, noise, timesteps[:1])
            if mask is not None:
                mask = latent_mask(mask, shape, batch)
                if nine_channel:
                    masked_latents = repeat_to(self.encode(masked_image, generator), batch)
                else:
                    # diffusers encodes the masked image for the 4-channel U-Net too and leaves it
                    # unused; draw its VAE noise all the same so later draws stay aligned with its seed
                    generator.randn((masked_image.shape[0], 4) + shape[2:])

        deepcache = deepcache_interval and DeepCache(self.unet, deepcache_interval, deepcache_branch, sched.timesteps)
        latents = self._denoise(latents, timesteps, sched, context, guidance_scale, eta, generator, callback,
                                mask=mask, masked_latents=masked_latents, image_latents=image_latents, noise=noise,
                                timestep_cond=timestep_cond, unet=deepcache,
                                control=control and control.hook(len(timesteps)))
        parameters = {"Steps": num_inference_steps, **sampler_fields(sched_name), "CFG scale": float(guidance_scale),
                      "Seed": seed, "Size": f"{width}x{height}", "Model": self.model_name,
                      "Denoising strength": None if txt2img else float(strength), **self.vae_fields, **prompt_fields,
                      **self.loras.parameters(),
                      **(deepcache.parameters() if deepcache else {}),
                      **(control.parameters() if control else {})}
        if enable_hr:
            hires = hires_settings(hr_scale=hr_scale, hr_upscaler=hr_upscaler, hr_resize_x=hr_resize_x,
                                   hr_second_pass_steps=hr_second_pass_steps, hr_resize_y=hr_resize_y,
                                   denoising_strength=denoising_strength)
            embeds = dict(prompt_embeds=None if hr_prompt else prompt_embeds,
                          negative_prompt_embeds=None if hr_negative_prompt else negative_prompt_embeds)
            if control:                     # the first pass's scales (the img2img pass's default is 0.8)
                controlnet_conditioning_scale = [unit.scale for unit in control.units]
            return hires_pass(self, hires, latents, parameters, width, height, generator, (prompt, hr_prompt),
                              (negative_prompt, hr_negative_prompt), scheduler=hr_sampler_name or scheduler,
                              guidance_scale=guidance_scale, eta=eta, output_type=output_type, callback=callback,
                              num_images_per_prompt=num_images_per_prompt, prompt_weighting=prompt_weighting,
                              clip_skip=clip_skip, vae_decoder=vae_decoder, deepcache_interval=deepcache_interval,
                              deepcache_branch=deepcache_branch, control_image=control_image,
                              controlnet_conditioning_scale=controlnet_conditioning_scale,
                              control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
                              guess_mode=guess_mode, control_preprocess=control_preprocess, **embeds)
        if output_type == "latent":
            return PipelineOutput(latents, seed, parameters=parameters)
        images = self.decode(latents, decoder=vae_decoder)
        if keep_unmasked and mask_image is not None:
            original = repeat_to((image.transpose(0, 2, 3, 1) + 1) / 2, len(images))   # (B, H, W, 3) in [0, 1]
            images = paste_unmasked(images, original, overlay_mask(mask_image, height, width))
        if output_type == "pil":
            images = to_pil(images)
        return PipelineOutput(images, seed, parameters=parameters)

    def check_inputs(self, prompt, negative_prompt, num_inference_steps, guidance_scale, height, width, seed,
                     generator, latents, scheduler, eta, output_type, callback, image, strength, mask_image,
                     num_images_per_prompt, prompt_embeds=None, negative_prompt_embeds=None, prompt_weighting=False,
                     clip_skip=None, deepcache_interval=None, deepcache_branch=0, control_image=None,
                     controlnet_conditioning_scale=None, control_guidance_start=0.0, control_guidance_end=1.0,
                     guess_mode=False, control_preprocess=None, keep_unmasked=False, enable_hr=False, hr_scale=None,
                     hr_upscaler=None, hr_second_pass_steps=None, hr_resize_x=None, hr_resize_y=None,
                     denoising_strength=None, hr_sampler_name=None, hr_prompt=None, hr_negative_prompt=None):
        """Check `__call__`'s arguments before any model work, in the order of its signature: a bad
        value raises a TypeError (wrong kind) or ValueError (wrong value) naming the argument, the
        value and what is allowed. Values diffusers takes and handles sensibly pass as they do there
        (guidance_scale <= 1 turns guidance off, a mask of another size is resized to the image)."""
        if prompt is None and prompt_embeds is None:
            raise TypeError("prompt must be a string or a list of strings, got None (or give prompt_embeds=)")
        if prompt_embeds is None:
            batch = len(check_prompt("prompt", prompt))
        elif prompt is not None:
            raise ValueError("give `prompt` or `prompt_embeds`, not both")
        else:
            batch = len(self._embeds(prompt_embeds, "prompt_embeds"))
        if negative_prompt is not None:
            if negative_prompt_embeds is not None:
                raise ValueError("give `negative_prompt` or `negative_prompt_embeds`, not both")
            negatives = check_prompt("negative_prompt", negative_prompt)
            if not isinstance(negative_prompt, str) and len(negatives) != batch:
                raise ValueError(f"negative_prompt {show(negative_prompt)} has {len(negatives)} entries for "
                                 f"{batch} prompt(s): pass one string for all, or a list of one per prompt")
        elif negative_prompt_embeds is not None:
            self._embeds(negative_prompt_embeds, "negative_prompt_embeds")
        # at most the training schedule's length (a sampler object passed in checks its own)
        most = None if _is_sampler(scheduler) else self.scheduler_config.get("num_train_timesteps", 1000)
        check_int("num_inference_steps", num_inference_steps, 1, most)
        check_number("guidance_scale", guidance_scale, hint=" (1 or less turns classifier-free guidance off)")
        for name, size in (("height", height), ("width", width)):
            if size is not None:
                check_side(name, size)
        if seed is not None:
            check_int("seed", seed, 0, 2 ** 64 - 1, allowed="an integer in [0, 2**64) (None draws a random one)")
        if generator is not None:
            if not isinstance(generator, Generator):
                raise TypeError(f"generator must be a tinysd.rng.Generator (e.g. Generator(42); or pass seed=42), "
                                f"got {show(generator)}")
            if seed is not None:
                raise ValueError(f"pass seed or generator, not both (got seed={seed!r} and a generator)")
        if scheduler is not None and not _is_sampler(scheduler):
            if not isinstance(scheduler, str):
                raise TypeError(f"scheduler must be a sampler name such as 'euler_a' or a sampler object, "
                                f"got {show(scheduler)}")
            try:
                canonical_name(scheduler)
            except ValueError as e:                          # "unknown sampler 'x'; valid names: ..."
                raise ValueError(f"scheduler: {e}") from None
        check_number("eta", eta, low=0.0, hint=" (DDIM's eta: 0 is deterministic, 1 adds DDPM's noise)")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type {output_type!r}: choose 'pil', 'np' or 'latent'")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable as callback(step, timestep, latents), got {show(callback)}")
        if image is not None:
            check_init_image(image, mask_image, batch * num_images_per_prompt, self.unet.in_channels)
        if strength is not None:
            check_number("strength", strength, low=0.0, high=1.0)
            if image is None:
                raise ValueError(f"strength={strength!r} needs image= (img2img or inpainting); txt2img starts "
                                 f"from pure noise")
        if mask_image is not None:
            check_image("mask_image", mask_image)
            if image is None:
                raise ValueError("inpainting needs `image=` as well as `mask_image=`")
        check_int("num_images_per_prompt", num_images_per_prompt, 1)
        if latents is not None:
            self.check_latents(latents, image, height, width, batch * num_images_per_prompt)
        if not isinstance(prompt_weighting, bool):
            raise TypeError(f"prompt_weighting must be True (A1111's prompt rules) or False (diffusers'), "
                            f"got {show(prompt_weighting)}")
        if clip_skip is not None:
            layers = len(self.text_encoder.text_model.encoder.layers)
            check_int("clip_skip", clip_skip, 0, layers, allowed=f"an integer from 0 to {layers}, the text encoder "
                      f"layers to skip (diffusers' meaning; A1111's 'Clip skip' minus 1)")
        if deepcache_interval is not None:
            check_int("deepcache_interval", deepcache_interval, 1, allowed="an integer >= 1: the full U-Net runs "
                      "every N-th step (None turns DeepCache off)")
        last = self.unet.num_skips - 1
        check_int("deepcache_branch", deepcache_branch, 0, last, allowed=f"an integer from 0 to {last}, DeepCache's "
                  f"branch (0 = the shallowest)")
        if deepcache_branch and deepcache_interval is None:
            raise ValueError(f"deepcache_branch={deepcache_branch} needs deepcache_interval= (DeepCache is off "
                             f"without it)")
        # the sampler must take the step count (LCM: at most its 50-point grid), and a strength too
        # small for the steps leaves no step: try them on a fresh sampler
        sched, _ = self._scheduler(scheduler)
        sched.set_timesteps(num_inference_steps)
        if image is not None:
            if strength is None:
                strength = DEFAULT_STRENGTH["inpaint" if mask_image is not None else "img2img"]
            strength_timesteps(sched, num_inference_steps, strength, within_grid=self.is_lcm_model)
        check_control(self.controlnets, control_image, controlnet_conditioning_scale, control_guidance_start,
                      control_guidance_end, guess_mode, control_preprocess, batch)
        if not isinstance(keep_unmasked, bool):
            raise TypeError(f"keep_unmasked must be True or False, got {show(keep_unmasked)}")
        if keep_unmasked and mask_image is not None and output_type == "latent":
            raise ValueError("keep_unmasked=True pastes pixels back, and output_type='latent' returns no pixels: "
                             "pass output_type='pil' or 'np', or keep_unmasked=False")
        check_hires(self, batch, num_inference_steps, height, width, scheduler, image, enable_hr,
                    dict(hr_scale=hr_scale, hr_upscaler=hr_upscaler, hr_second_pass_steps=hr_second_pass_steps,
                         hr_resize_x=hr_resize_x, hr_resize_y=hr_resize_y, denoising_strength=denoising_strength,
                         hr_sampler_name=hr_sampler_name, hr_prompt=hr_prompt, hr_negative_prompt=hr_negative_prompt))

    # -- bigger pictures ------------------------------------------------------------------------------
    def outpaint(self, prompt, image, left=0, right=0, up=0, down=0, mask_blur=4, keep_unmasked=True, **kwargs):
        """Extend the picture by left/right/up/down pixels and paint the new border (tinysd.outpaint):
        the border starts as the picture's edge stretched outward plus noise, the mask is A1111's
        outpainting mask (white border, feathered `mask_blur`·2 pixels into the picture), and the
        canvas is inpainted (the 9-channel U-Net where loaded, else the blending inpainting) with
        the original pixels pasted back outside the mask unless keep_unmasked=False. `kwargs` are
        `__call__`'s (seed, num_inference_steps, strength, ...)."""
        check_image("image", image)
        picture = load_image(image)
        check_outpaint(picture.size, left, right, up, down, mask_blur)
        for name in ("mask_image", "height", "width", "latents", "enable_hr"):
            value = kwargs.pop(name, None)             # None (enable_hr False) as the CLI passes them: fine
            if value is not None and value is not False:
                raise ValueError(f"outpaint sets {name} itself (the canvas is the picture plus its new border)")
        seed, generator = kwargs.pop("seed", None), kwargs.get("generator")
        if seed is not None:
            check_int("seed", seed, 0, 2 ** 64 - 1, allowed="an integer in [0, 2**64) (None draws a random one)")
        elif generator is None:
            seed = secrets.randbits(63)
        canvas, mask = outpaint_canvas(picture, left, right, up, down, mask_blur,
                                       seed if generator is None else generator.initial_seed)
        out = self(prompt, image=canvas, mask_image=mask, keep_unmasked=keep_unmasked, seed=seed, **kwargs)
        out.parameters["Mask blur"] = mask_blur
        return out

    def upscale(self, prompt, image, scale=2, upscaler="Lanczos", tile_size=None, overlap=None, strength=0.3, **kwargs):
        """A1111's "SD upscale": `image` upscaled by `scale` and repainted tile by tile by img2img at
        `strength` (tinysd.upscale.sd_upscale); memory is one tile's whatever the picture's size."""
        return sd_upscale(self, prompt, image, scale=scale, upscaler=upscaler, tile_size=tile_size, overlap=overlap,
                          strength=strength, **kwargs)

    def check_latents(self, latents, image, height, width, batch):
        """`latents` replaces the txt2img start noise: (batch, 4, height/8, width/8), finite numbers."""
        if image is not None:
            raise ValueError("latents= is the txt2img start noise; img2img and inpainting start from the encoded "
                             "image: pass latents or image, not both")
        try:
            array = np.asarray(latents)
        except (TypeError, ValueError):
            array = None
        if array is None or array.dtype.kind not in "iuf":
            raise TypeError(f"latents must be an array of real numbers, got {show(latents)}")
        size = self.unet.config.get("sample_size", 64) * VAE_SCALE
        expected = (batch, 4, (height or size) // VAE_SCALE, (width or size) // VAE_SCALE)   # 4 latent channels
        if array.shape != expected:
            raise ValueError(f"latents has shape {array.shape}; height={height or size}, width={width or size} and "
                             f"{batch} image(s) need {expected} (batch, 4, height/8, width/8)")
        if not np.isfinite(array).all():
            raise ValueError(f"latents has {int(np.size(array) - np.isfinite(array).sum())} non-finite values "
                             f"(nan or inf)")

    def _denoise(self, latents, timesteps, sched, context, guidance_scale, eta, generator, callback,
                 mask=None, masked_latents=None, image_latents=None, noise=None, timestep_cond=None, unet=None,
                 control=None):
        """The reverse-diffusion loop: z_T -> z_0, one sampler step per timestep (`unet`, `control`: see
        predict_noise; `control` here is the ControlNets' tinysd.controlnet.ControlHook)."""
        wants_x0 = callback is not None and "pred_original_sample" in inspect.signature(callback).parameters
        nine_channel = self.unet.in_channels == 9
        self.num_timesteps = len(timesteps)
        for i, t in enumerate(timesteps):
            x = sched.scale_model_input(latents, t)
            if nine_channel:
                x = np.concatenate([x, mask, masked_latents], axis=1)
            eps = self.predict_noise(x, t, context, guidance_scale, timestep_cond, unet, control and control.step(i))
            out = sched.step(eps, t, latents, generator=generator, eta=eta)
            latents = out.prev_sample
            if mask is not None and not nine_channel:
                # keep the known region: the encoded image, noised to the next timestep
                known = image_latents
                if i < len(timesteps) - 1:
                    known = sched.add_noise(image_latents, noise, timesteps[i + 1:i + 2])
                latents = (1 - mask) * known + mask * latents
            if callback is not None:
                extra = {"pred_original_sample": out.pred_original_sample} if wants_x0 else {}
                callback(i, t, latents, **extra)
        return latents

    def load_controlnet(self, source, variant=None):
        """Add a ControlNet (diffusers folder, control_*.safetensors/.pth file, packaged name, or a
        list): checked against this U-Net, then used by every call that passes `control_image`."""
        sources = source if isinstance(source, (list, tuple)) else [source]
        checkpoints = [read_controlnet(s, self.unet.config, self.model_name or "the loaded model", variant)
                       for s in sources]
        self.controlnets += [build_controlnet(c, self.ops) for c in checkpoints]
        return self

    def unload_controlnet(self):
        """Forget the loaded ControlNets: calls generate without control again."""
        self.controlnets = []
        return self

    def _scheduler(self, scheduler):
        """(a fresh sampler for one generation, its name): samplers keep per-run state."""
        if scheduler is None:
            scheduler = self.default_sampler
        if isinstance(scheduler, str):
            return make_scheduler(scheduler, self.scheduler_config), canonical_name(scheduler)
        return scheduler, type(scheduler).__name__


class DeepCache:
    """DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"), one
    generation's per-step hook: called as the U-Net, it runs the full U-Net every `interval`-th step,
    keeping u_k, the deep features entering the up path's ResNet at `branch` k, and in between
    only the shallow branch on them (UNet2DConditionModel: the down path to skip s_k, the up path
    from U_k). Steps count as the DeepCache package's DeepCacheSDHelper counts them: a U-Net call
    at t is step i, the first index of t in the sampler's timesteps (Heun's and PLMS's second
    call at a timestep counts as its first), and runs the full U-Net when (i − i_0) % interval
    == 0, i_0 the generation's first step (img2img starts part-way). The CFG batch shares one
    cache: u_k holds both halves."""

    def __init__(self, unet, interval, branch, timesteps):
        self.unet, self.interval, self.branch = unet, interval, branch
        self.timesteps = np.asarray(timesteps)
        self.first = self.features = None

    def __call__(self, x, t, context, timestep_cond=None, **control_residuals):
        step = int(np.flatnonzero(self.timesteps == t)[0])
        self.first = step if self.first is None else self.first
        full = (step - self.first) % self.interval == 0
        eps, self.features = self.unet(x, t, context, timestep_cond=timestep_cond, cache_branch=self.branch,
                                       cached=None if full else self.features, **control_residuals)
        return eps

    def parameters(self):
        return {"DeepCache interval": self.interval, "DeepCache branch": self.branch}


def strength_timesteps(sched, num_inference_steps, strength, within_grid=False):
    """img2img skips the first (1 − strength) of the schedule: start from the image noised to t_start.

    within_grid: an LCM-distilled model with a consistency sampler takes all n steps from the lowest
    strength·50 points of LCM's grid instead (diffusers' LatentConsistencyModelImg2ImgPipeline).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if within_grid and isinstance(sched, LCMScheduler):
        sched.set_timesteps(num_inference_steps, strength=strength)
        return sched.timesteps
    init = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init, 0) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start)
    timesteps = sched.timesteps[t_start:]
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step")
    return timesteps


def is_latents(image):
    """img2img's `image` given as latents (B, 4, h, w) rather than as pictures."""
    return isinstance(image, np.ndarray) and image.ndim == 4


def check_init_image(image, mask_image, batch, in_channels):
    """img2img's `image`: a picture, a list of pictures (a batch), or latents (B, 4, h, w)."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list: pass a picture, or a non-empty list of pictures")
        for i, picture in enumerate(image):
            check_image(f"image[{i}]", picture)
        count = len(image)
    elif is_latents(image):
        if image.shape[1] != 4 or image.dtype.kind != "f" or 0 in image.shape:
            raise ValueError(f"image: a 4-d array of shape {image.shape} ({image.dtype}) is taken as latents, which "
                             f"must be floats of shape (B, 4, height/8, width/8)")
        if not np.isfinite(image).all():
            raise ValueError("image: the latents hold non-finite values (nan or inf)")
        if mask_image is not None or in_channels == 9:
            raise ValueError("image: latents start img2img only; inpainting (and a 9-channel U-Net) needs pictures")
        count = image.shape[0]
    else:
        check_image("image", image)
        count = 1
    if batch % count:
        raise ValueError(f"image holds {count} pictures for {batch} image(s) (prompts × num_images_per_prompt): "
                         f"the batch must be a multiple of them")


def preprocess_images(image, height=None, width=None):
    """One picture or a list of them -> (B, 3, H, W) in [−1, 1], each at the first one's size (diffusers)."""
    if not isinstance(image, (list, tuple)):
        return preprocess_image(image, height, width)
    first = preprocess_image(image[0], height, width)
    height, width = first.shape[2:]
    return np.concatenate([first] + [preprocess_image(picture, height, width) for picture in image[1:]])


def repeat_to(x, batch):
    """Repeat a batch of encoded images to `batch` rows (one image for several prompts)."""
    return np.concatenate([x] * (batch // x.shape[0])) if batch != x.shape[0] else x


def show(value, limit=80):
    """A value as an error message shows it: its repr (shortened) and its type."""
    text = repr(value)
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def check_int(name, value, low, high=None, allowed=None):
    """`value` must be an integer (a bool is not one) in [low, high]."""
    if allowed is None:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {show(value)}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")


def check_number(name, value, low=None, high=None, hint=""):
    """`value` must be a finite real number (a bool is not one) in [low, high]."""
    if low is not None and high is not None:
        allowed = f"in [{low:g}, {high:g}]"
    else:
        allowed = "a finite number" + (f" >= {low:g}" if low is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {allowed}{hint}, got {show(value)}")
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}{hint}, got {value}")


def check_side(name, value):
    """An image side in pixels: a positive multiple of 8 (an integral float passes, as in diffusers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive multiple of 8 (pixels, an integer), got {show(value)}")
    if not math.isfinite(value) or int(value) != value or value <= 0 or value % VAE_SCALE:
        raise ValueError(f"{name} must be a positive multiple of 8, got {value}")


def check_prompt(name, prompt):
    """A prompt: a string, or a non-empty list (or tuple) of strings, each valid Unicode text. -> list."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, (list, tuple)):
        texts = list(prompt)
        if not texts:
            raise ValueError(f"{name}={prompt!r} is empty: pass a string or a non-empty list of strings")
    else:
        raise TypeError(f"{name} must be a string or a list of strings, got {show(prompt)}")
    for i, text in enumerate(texts):
        where = name if isinstance(prompt, str) else f"{name}[{i}]"
        if not isinstance(text, str):
            raise TypeError(f"{where} must be a string, got {show(text)}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:     # a lone surrogate (U+D800..U+DFFF) is no character of any text
            raise ValueError(f"{where} {show(text, 40)} holds the surrogate {text[e.start]!r} at index {e.start}, "
                             f"which is not a Unicode character (text decoded with errors='surrogateescape' or "
                             f"from UTF-16 by halves?): pass valid text") from None
    return texts


IMAGE_KINDS = "a PIL image, a file path, or an (H, W, 3) array (uint8, or floats in [0, 1]; (H, W) grey and " \
              "(H, W, 4) RGBA work too)"


def check_image(name, image):
    """An image or mask as `load_image` reads it; a file's contents are checked when it is read."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike, Image.Image)):
        return
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be {IMAGE_KINDS}, got {show(image)}")
    if image.dtype != np.uint8 and image.dtype.kind != "f":
        raise TypeError(f"{name}: an array of dtype {image.dtype}; it must be uint8 (0-255) or floats in [0, 1]")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        hint = (f"; this one looks channel-first: pass {name}.transpose(1, 2, 0)"
                if image.ndim == 3 and image.shape[0] in (1, 3, 4) else "")
        raise ValueError(f"{name}: an array of shape {image.shape}; it must be {IMAGE_KINDS}{hint}")
    if 0 in image.shape:
        raise ValueError(f"{name}: an empty array of shape {image.shape}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(f"{name}: the array holds non-finite values (nan or inf); pixels must be in [0, 1]")


def _is_sampler(scheduler):
    """A sampler object (one of tinysd.schedulers' classes, or one like them), not a name."""
    return hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step")


def check_size(height, width):
    check_side("height", height)
    check_side("width", width)


def load_image(image, mode="RGB"):
    """A PIL image, a path, or an (H, W[, C]) array (uint8, or floats in [0, 1]) -> PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert(mode)
    if isinstance(image, np.ndarray):
        arr = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert(mode)
    try:
        with Image.open(image) as im:
            return im.convert(mode)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {image!r}: {e}") from None


def preprocess_image(image, height=None, width=None):
    """Image -> (1, 3, H, W) float32 in [−1, 1]; resized (Lanczos) to height×width, or its own
    size rounded down to a multiple of 8, as diffusers' VaeImageProcessor does."""
    pil = load_image(image)
    for name, side, given in (("width", pil.width, width), ("height", pil.height, height)):
        if given is None and side < VAE_SCALE:     # its own size, rounded down to a multiple of 8, would be 0
            raise ValueError(f"image is {pil.width}x{pil.height} pixels: its {name}, rounded down to a multiple of 8, "
                             f"is 0; pass a larger image, or height= and width= to resize it")
    width = width or pil.width - pil.width % VAE_SCALE
    height = height or pil.height - pil.height % VAE_SCALE
    check_size(height, width)
    if pil.size != (width, height):
        from PIL import Image
        pil = pil.resize((width, height), resample=Image.LANCZOS)
    x = np.asarray(pil, dtype=np.float32) / 255.0
    return (2.0 * x - 1.0).transpose(2, 0, 1)[None]


def preprocess_mask(mask_image, image):
    """Mask -> binary (1, 1, H, W) (1 = repaint) and the masked image (the repainted region zeroed)."""
    pil = load_image(mask_image, mode="L")
    H, W = image.shape[2:]
    if pil.size != (W, H):
        from PIL import Image
        pil = pil.resize((W, H), resample=Image.LANCZOS)
    mask = (np.asarray(pil, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)[None, None]
    return mask, image * (mask < 0.5)


def latent_mask(mask, shape, batch):
    """Binary image mask (1, 1, H, W) -> latent-size mask (B, 1, h, w), nearest-neighbour."""
    h, w = shape[2:]
    H, W = mask.shape[2:]
    rows = np.floor(np.arange(h) * (H / h)).astype(int)
    cols = np.floor(np.arange(w) * (W / w)).astype(int)
    return np.repeat(mask[:, :, rows][:, :, :, cols], batch, axis=0)


def to_pil(images):
    """(B, H, W, 3) floats in [0, 1] -> PIL images, rounding as diffusers does."""
    from PIL import Image

    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
