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
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinysd.backend import get_backend
from tinysd.controlnet import Control, build_controlnet, read_controlnet
from tinysd.rng import Generator
from tinysd.pngmeta import sampler_fields
from tinysd.schedulers import SCHEDULERS, canonical_name, make_scheduler
from tinysd.text_encoder import CLIPTextModel
from tinysd.tokenizer import CLIPTokenizer
from tinysd.unet import UNet2DConditionModel
from tinysd.vae import AutoencoderKL
from tinysd.weights import load_checkpoint

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
VAE_SCALE = 8   # the VAE shrinks H and W by 8


def load(source=DEFAULT_MODEL, backend=None, *, variant=None, config=None, controlnet=None):
    """A ready pipeline from a model id, a diffusers folder or a single .safetensors/.ckpt file.

    backend: 'numpy' (reference), 'cpu' (Numba kernels) or 'cuda'; None picks 'cpu' if it runs.
    variant: 'fp16' reads a diffusers folder's `*.fp16.safetensors` (computed in float32).
    config: for a single file whose model is not SD v1.5-shaped, a diffusers folder (or
    {part: config dict}) giving the configs, as diffusers' `from_single_file(config=...)`.
    controlnet: a ControlNet (folder, single file or packaged name) or a list of them; each is
    checked against the model's U-Net before anything is built (tinysd.controlnet).
    """
    ckpt = load_checkpoint(source, variant=variant, config=config)
    controlnets = [read_controlnet(c, ckpt.configs["unet"], model_name(source))
                   for c in ([] if controlnet is None else controlnet if isinstance(controlnet, (list, tuple)) else [controlnet])]
    backend = get_backend(backend)
    where = str(ckpt.source)

    def build(cls, part):
        return cls(ckpt.configs[part]).set_backend(backend).load_state_dict(
            ckpt.state_dicts[part], source=f"{where} ({part})")

    tokenizer = CLIPTokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else CLIPTokenizer()
    sd = StableDiffusion(tokenizer, build(CLIPTextModel, "text_encoder"), build(UNet2DConditionModel, "unet"),
                         build(AutoencoderKL, "vae"), ckpt.configs["scheduler"], backend)
    sd.model_name = model_name(source)
    sd.controlnets = [build_controlnet(c, backend) for c in controlnets]
    return sd


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
    num_timesteps = 0        # U-Net steps of the generation running (or last run), for progress bars

    def __init__(self, tokenizer, text_encoder, unet, vae, scheduler_config, backend):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.controlnets = []    # tinysd.controlnet.ControlNetModel, applied when a call passes control_image
        self.scheduler_config = dict(scheduler_config)
        self.scheduler = make_scheduler(self.default_sampler, self.scheduler_config)
        self.ops = backend

    @property
    def default_sampler(self):
        """The sampler name of the model's own scheduler (scheduler/scheduler_config.json)."""
        name = canonical_name(self.scheduler_config.get("_class_name", "PNDMScheduler"))
        karras = f"{name}_karras"
        return karras if self.scheduler_config.get("use_karras_sigmas") and karras in SCHEDULERS else name

    # -- the parts of one generation --------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, num_images_per_prompt=1, guidance=True):
        """Text -> context (B·n, 77, D); with guidance, [uncond; cond] stacked in one batch."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cond = self._embed(prompts, num_images_per_prompt)
        if not guidance:
            return cond
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        return self.ops.concat([self._embed(negatives, num_images_per_prompt), cond], axis=0)

    def _embed(self, prompts, n):
        ids = self.tokenizer(prompts)                         # (B, 77)
        return self.text_encoder(np.repeat(ids, n, axis=0))   # each prompt's n images side by side

    def predict_noise(self, latents, t, context, guidance_scale, control=None):
        """ε for `latents` at t; with guidance, ε_uncond + s·(ε_cond − ε_uncond) from one batch.
        `control(x, t, context)`, a ControlNet's per-step hook, gives the U-Net's extra residuals."""
        guidance = guidance_scale > 1.0
        x = np.concatenate([latents, latents]) if guidance else latents
        residuals = control(x, t, context) if control is not None else {}
        eps = self.ops.numpy(self.unet(self.ops.asarray(x), t, context, **residuals))
        if not guidance:
            return eps
        eps_uncond, eps_cond = np.split(eps, 2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def decode(self, latents):
        """Latents -> images (B, H, W, 3) in [0, 1]; undoes the 0.18215 scaling first."""
        x = self.ops.numpy(self.vae.decode(latents / self.vae.scaling_factor))
        return np.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def encode(self, images, generator):
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents z = 0.18215·(μ + σ·noise)."""
        dist = self.vae.encode(images)
        return self.vae.scaling_factor * dist.sample(generator.randn(dist.mean.shape))

    # -- generation -----------------------------------------------------------------------------------
    def __call__(self, prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5,
                 height=None, width=None, seed=None, generator=None, latents=None, scheduler=None, eta=0.0,
                 output_type="pil", callback=None, image=None, strength=None, mask_image=None,
                 num_images_per_prompt=1, control_image=None, controlnet_conditioning_scale=None,
                 control_guidance_start=0.0, control_guidance_end=1.0, guess_mode=False, control_preprocess=None):
        """Generate images; the arguments are diffusers' `StableDiffusionPipeline` ones.

        txt2img by default; img2img with `image=` (and `strength`, default 0.8); inpainting with
        `image=` and `mask_image=` (white = repaint; `strength` default 1.0). `seed` (or a
        `tinysd.rng.Generator`) fixes the noise as `torch.Generator("cpu").manual_seed(seed)` does.
        `callback(step, timestep, latents)` runs after every step; if it takes a
        `pred_original_sample` argument it also gets the sampler's x̂₀.
        With ControlNets loaded (`load_controlnet`): `control_image` (one per ControlNet), each with
        its `controlnet_conditioning_scale` (default 1.0, 0.8 for img2img, 0.5 for inpainting) and
        `control_guidance_start`/`_end` (fractions of the steps), and `guess_mode`, as diffusers'
        StableDiffusionControlNet(Img2Img|Inpaint)Pipeline;
        `control_preprocess` ("canny", "canny:50:150", ... see tinysd.hints) makes the hint first.
        Returns PipelineOutput with `.images` per `output_type`: "pil", "np" or "latent".
        """
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type {output_type!r}: choose 'pil', 'np' or 'latent'")
        if mask_image is not None and image is None:
            raise ValueError("inpainting needs `image=` as well as `mask_image=`")
        if generator is None:
            seed = secrets.randbits(63) if seed is None else int(seed)
            generator = Generator(seed)
        else:
            seed = None
        control = None
        if control_image is not None or self.controlnets:      # checked, images read, before any model work
            default_scale = 1.0 if image is None else 0.8 if mask_image is None else 0.5   # as diffusers' pipelines
            control = Control(self.controlnets, control_image, controlnet_conditioning_scale, control_guidance_start,
                              control_guidance_end, guess_mode, control_preprocess, default_scale)
        if image is not None:
            image = preprocess_image(image, height, width)
            height, width = image.shape[2:]
        elif control is not None:
            height, width = control.default_size(height, width)
        default_size = self.unet.config.get("sample_size", 64) * VAE_SCALE
        height, width = height or default_size, width or default_size
        check_size(height, width)

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images_per_prompt
        guidance = guidance_scale > 1.0
        if control is not None:
            control.prepare(self.ops, batch, num_images_per_prompt, guidance, height, width)
        context = self.encode_prompt(prompts, negative_prompt, num_images_per_prompt, guidance)

        sched, sched_name = self._scheduler(scheduler)
        sched.set_timesteps(num_inference_steps)
        timesteps = sched.timesteps
        shape = (batch, 4, height // VAE_SCALE, width // VAE_SCALE)

        mask = masked_latents = image_latents = None
        if mask_image is not None:
            mask, masked_image = preprocess_mask(mask_image, image)
            strength = 1.0 if strength is None else strength
        elif image is not None:
            strength = 0.8 if strength is None else strength

        if image is None:
            if latents is None:
                latents = generator.randn(shape)
            latents = np.asarray(latents, dtype=np.float32) * np.float32(sched.init_noise_sigma)
            noise = None
        else:
            timesteps = strength_timesteps(sched, num_inference_steps, strength)
            pure_noise = mask is not None and strength >= 1.0      # inpainting from scratch
            nine_channel = self.unet.in_channels == 9
            if not (pure_noise and nine_channel):                   # the 9-channel U-Net sees the image
                image_latents = repeat_to(self.encode(image, generator), batch)   # through its input
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

        latents = self._denoise(latents, timesteps, sched, context, guidance_scale, eta, generator, callback,
                                mask=mask, masked_latents=masked_latents, image_latents=image_latents, noise=noise,
                                control=control and control.hook(len(timesteps)))
        parameters = {"Steps": num_inference_steps, **sampler_fields(sched_name), "CFG scale": float(guidance_scale),
                      "Seed": seed, "Size": f"{width}x{height}", "Model": self.model_name,
                      "Denoising strength": float(strength) if image is not None else None,
                      **(control.parameters() if control else {})}
        if output_type == "latent":
            return PipelineOutput(latents, seed, parameters=parameters)
        images = self.decode(latents)
        if output_type == "pil":
            images = to_pil(images)
        return PipelineOutput(images, seed, parameters=parameters)

    def _denoise(self, latents, timesteps, sched, context, guidance_scale, eta, generator, callback,
                 mask=None, masked_latents=None, image_latents=None, noise=None, control=None):
        """The reverse-diffusion loop: z_T -> z_0, one sampler step per timestep (`control`: the
        ControlNets' per-step hook, tinysd.controlnet.ControlHook)."""
        wants_x0 = callback is not None and "pred_original_sample" in inspect.signature(callback).parameters
        nine_channel = self.unet.in_channels == 9
        self.num_timesteps = len(timesteps)
        for i, t in enumerate(timesteps):
            x = sched.scale_model_input(latents, t)
            if nine_channel:
                x = np.concatenate([x, mask, masked_latents], axis=1)
            eps = self.predict_noise(x, t, context, guidance_scale, control=control and control.step(i))
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


def strength_timesteps(sched, num_inference_steps, strength):
    """img2img skips the first (1 − strength) of the schedule: start from the image noised to t_start."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    init = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init, 0) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start)
    timesteps = sched.timesteps[t_start:]
    if len(timesteps) == 0:
        raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step")
    return timesteps


def repeat_to(x, batch):
    """Repeat a batch of encoded images to `batch` rows (one image for several prompts)."""
    return np.concatenate([x] * (batch // x.shape[0])) if batch != x.shape[0] else x


def check_size(height, width):
    for name, v in (("height", height), ("width", width)):
        if int(v) != v or v <= 0 or v % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {v}")


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
