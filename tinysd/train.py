"""Training in NumPy: the diffusion loss, AdamW, and the loop (LoRA and textual inversion use them).

Stable Diffusion learns to predict the noise in a noised latent (Ho et al. 2020):

    t ~ U{0, …, 999},  ε ~ N(0, I),  z_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε
    L = ‖ε − ε_θ(z_t, t, c)‖²  (mean over the entries)

with SD v1's noise schedule (`scaled_linear`, β from 0.00085 to 0.012; `tinysd.schedule`).
v-prediction models learn v = √ᾱ_t ε − √(1 − ᾱ_t) z_0 instead (Salimans & Ho 2022); min-SNR
weighting (Hang et al. 2023) scales sample i's loss by min(SNR_i, γ)/SNR_i (ε) or
min(SNR_i, γ)/(SNR_i + 1) (v), SNR_t = ᾱ_t/(1 − ᾱ_t), so that the nearly clean timesteps do
not dominate.

One step: the forward with `saved={}` keeps the activations, ∂L/∂ε̂ = 2·w·(ε̂ − target)/n
enters `unet.backward`, which adds every trained parameter's gradient into its module's
`.grads` and returns ∂L/∂context for the text encoder's backward. `AdamW` then updates the
trained arrays in place (torch's update rule, operation for operation, so a run equals
torch.optim.AdamW's bit for bit); micro-batches accumulate gradients before one update.

Randomness: every draw of step s comes from generators seeded by (seed, s) (`step_generators`),
ε from `tinysd.rng.Generator`, the torch-compatible stream (`torch.randn(shape,
generator=torch.Generator().manual_seed(step_seed(seed, s)))` draws the same numbers). A run's
state is its step, the trained arrays and the optimizer's moments (`save_state`), and a resumed
run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinysd.nn import Linear, Module
from tinysd.rng import Generator
from tinysd.rng import _fma32 as fma32     # a·b + c rounded once, as the vfmadd instruction
from tinysd.schedule import cumulative_alphas, make_betas

SD_V1_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


# -- the noise schedule and the loss ----------------------------------------------------------------------

class NoiseSchedule:
    """ᾱ_t of the training schedule, and the forward diffusion q(z_t | z_0).

    `NoiseSchedule(sd.scheduler_config)` reads a diffusers scheduler config (SD v1:
    scaled_linear, 0.00085 -> 0.012, 1000 steps, ε-prediction).
    """

    def __init__(self, config=None):
        cfg = {**SD_V1_SCHEDULE, **(config or {})}
        self.num_train_timesteps = int(cfg["num_train_timesteps"])
        betas = make_betas(self.num_train_timesteps, cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"],
                           cfg.get("trained_betas"))
        self.alphas_cumprod = cumulative_alphas(betas)                     # float32, as diffusers
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r}: training supports 'epsilon' and 'v_prediction'")

    def _coefficients(self, t, ndim):
        """(√ᾱ_t, √(1 − ᾱ_t)) per sample, shaped to broadcast over (B, C, H, W); float32."""
        abar = self.alphas_cumprod[np.asarray(t)].reshape(-1, *([1] * (ndim - 1)))
        return abar ** np.float32(0.5), (np.float32(1) - abar) ** np.float32(0.5)

    def add_noise(self, z0, noise, t):
        """z_t = √ᾱ_t · z_0 + √(1 − ᾱ_t) · ε (diffusers' DDPMScheduler.add_noise)."""
        a, s = self._coefficients(t, np.ndim(z0))
        return a * z0 + s * noise

    def velocity(self, z0, noise, t):
        """v = √ᾱ_t · ε − √(1 − ᾱ_t) · z_0 (diffusers' get_velocity)."""
        a, s = self._coefficients(t, np.ndim(z0))
        return a * noise - s * z0

    def target(self, z0, noise, t):
        """What the U-Net learns to output: ε, or v for a v-prediction model."""
        return noise if self.prediction_type == "epsilon" else self.velocity(z0, noise, t)

    def snr(self, t):
        """SNR_t = ᾱ_t / (1 − ᾱ_t), float64."""
        abar = self.alphas_cumprod[np.asarray(t)].astype(np.float64)
        return abar / (1 - abar)

    def loss_weights(self, t, min_snr_gamma=None):
        """Per-sample weights of the loss: 1, or min-SNR-γ's min(SNR, γ)/SNR (ε), /(SNR + 1) (v)."""
        if min_snr_gamma is None:
            return np.ones(np.size(t))
        snr = self.snr(t)
        return np.minimum(snr, min_snr_gamma) / (snr if self.prediction_type == "epsilon" else snr + 1)


def diffusion_loss(prediction, target, weights):
    """L = mean_i w_i · mean((ε̂_i − target_i)²), and ∂L/∂ε̂ = 2 w_i (ε̂_i − target_i) / n
    (n = all entries of the batch). Returns (loss as a float, gradient in the prediction's dtype)."""
    diff = np.asarray(prediction) - target
    w = np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * (diff.ndim - 1)))
    loss = float((w * diff.astype(np.float64) ** 2).mean())
    return loss, (2 * w * diff / diff.size).astype(diff.dtype)


def step_seed(seed, step, stream=0):
    """The seed of step `step`'s draws: independent of every other step, so a resumed run draws
    what an uninterrupted one would have."""
    return int(np.random.SeedSequence((seed, stream, step)).generate_state(1, np.uint64)[0] >> 1)


def step_generators(seed, step):
    """(NumPy generator for indices and timesteps, torch-compatible generator for the normals)."""
    return np.random.default_rng((seed, 1, step)), Generator(step_seed(seed, step))


# -- parameters and the optimiser -------------------------------------------------------------------------

def named_modules(module, prefix=""):
    """(dotted name, module) for the whole tree, the root first (named "")."""
    yield prefix.rstrip("."), module
    for name, child in module.children():
        yield from named_modules(child, f"{prefix}{name}.")


@dataclass(eq=False)
class Parameter:
    """One trained array: attribute `name` of `module` (with `rows`, only those rows of it: the
    token rows textual inversion adds). `value` is updated in place; `grad` is what the
    backward accumulated in `module.grads[name]`, or None if nothing reached it."""
    key: str
    module: Module
    name: str
    rows: slice | None = None

    @property
    def value(self):
        array = getattr(self.module, self.name)
        return array if self.rows is None else array[self.rows]

    @property
    def grad(self):
        g = self.module.__dict__.get("grads", {}).get(self.name)
        return g if g is None or self.rows is None else g[self.rows]

    def make_writable(self):
        """Weights read from a file can be memory-mapped read-only: train a copy of them."""
        array = getattr(self.module, self.name)
        if not array.flags.writeable:
            object.__setattr__(self.module, self.name, self.module.ops.asarray(np.array(array)))


def trainable_parameters(model, prefix=""):
    """Every parameter of `model` whose module is not frozen, as `Parameter`s."""
    params = []
    for name, module in named_modules(model, prefix):
        if module.frozen:
            continue
        for pname in module.__dict__.get("_param_names", []):
            params.append(Parameter(f"{name}.{pname}" if name else pname, module, pname))
    for p in params:
        p.make_writable()
    return params


class AdamW:
    """AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's defaults and update, per array:

        θ ← θ·(1 − lr·λ)                               decoupled weight decay
        m ← m + (1 − β₁)(g − m)                         (torch's lerp, one fused multiply-add)
        v ← β₂ v + (1 − β₂) g²                          (the second product fused with the sum)
        θ ← θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)

    in float32 with the scalars rounded to float32 where torch's kernels round them, in torch's
    order. The one difference: torch's CPU float32 sqrt (MKL's vsSqrt) is not correctly rounded
    (1 ulp off √v in ~16% of entries here), NumPy's is; with torch's sqrt put in `sqrt`, the same
    gradients give the same parameters bit for bit (tests/test_train.py). Parameters that got no
    gradient this step are skipped, as torch skips a parameter whose .grad is None.
    """

    sqrt = staticmethod(np.sqrt)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.state = {}                # key -> {"step": int, "exp_avg": m, "exp_avg_sq": v}

    def step(self, lr=None):
        lr = self.lr if lr is None else lr
        beta1, beta2 = self.betas
        f32 = np.float32
        for p in self.params:
            grad = p.grad
            if grad is None:
                continue
            theta, grad = p.value, np.asarray(grad, dtype=np.float32)
            st = self.state.setdefault(p.key, {"step": 0, "exp_avg": np.zeros(theta.shape, np.float32),
                                               "exp_avg_sq": np.zeros(theta.shape, np.float32)})
            st["step"] += 1
            m, v, t = st["exp_avg"], st["exp_avg_sq"], st["step"]
            if self.weight_decay:
                theta *= f32(1 - lr * self.weight_decay)
            m[...] = fma32(f32(1 - beta1), grad - m, m)                     # torch's lerp_
            v *= f32(beta2)
            v[...] = fma32(f32(1 - beta2) * grad, grad, v)                  # torch's addcmul_, contracted
            bias_correction1, bias_correction2 = 1 - beta1 ** t, 1 - beta2 ** t
            denom = self.sqrt(v) / f32(bias_correction2 ** 0.5) + f32(self.eps)
            theta += f32(-lr / bias_correction1) * m / denom

    def state_arrays(self):
        """The moments as {"exp_avg/KEY": m, "exp_avg_sq/KEY": v}, and {"KEY": step}."""
        arrays = {f"{k}/{key}": st[k] for key, st in self.state.items() for k in ("exp_avg", "exp_avg_sq")}
        return arrays, {key: st["step"] for key, st in self.state.items()}

    def load_state_arrays(self, arrays, steps):
        self.state = {key: {"step": int(step), "exp_avg": np.array(arrays[f"exp_avg/{key}"], np.float32),
                            "exp_avg_sq": np.array(arrays[f"exp_avg_sq/{key}"], np.float32)}
                      for key, step in steps.items()}


def clip_grad_norm(params, max_norm):
    """Scale every gradient by max_norm / (‖g‖ + 1e-6) when the global norm ‖g‖ exceeds it
    (torch.nn.utils.clip_grad_norm_). Returns ‖g‖."""
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g *= np.float32(coef)
    return total


# -- the loop ---------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """What a run does; saved with its state, so a resume can check it continues the same run."""
    steps: int
    batch_size: int = 1
    gradient_accumulation_steps: int = 1      # micro-batches per update: an effective batch of their sum
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0                  # linear warm-up, then constant
    weight_decay: float = 1e-2                # AdamW's decoupled decay (torch's default)
    max_grad_norm: float | None = 1.0         # clip the global gradient norm (None: no clipping)
    min_snr_gamma: float | None = None        # min-SNR-γ loss weighting (5 is the paper's choice)
    seed: int = 0

    def lr_at(self, step):
        if step < self.lr_warmup_steps:
            return self.learning_rate * (step + 1) / self.lr_warmup_steps
        return self.learning_rate


def train(micro_step, params, config, state_path=None, resume=False, save_every=0, progress=True, desc="training"):
    """Run `config.steps` optimiser steps and return the loss of each.

    `micro_step(step, micro, grad_scale) -> loss` does one micro-batch's forward and backward
    (its gradients accumulate into the parameters' `.grads`), with its loss's gradient scaled by
    `grad_scale` = 1/gradient_accumulation_steps, so that the update sees the mean over the
    micro-batches. With `state_path`, the run's state is written there every `save_every` steps
    and at the end; `resume` continues from it (trained arrays, optimiser moments, losses).
    """
    from tqdm import tqdm

    optimizer = AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    start, losses = 0, []
    if resume:
        if state_path is None or not Path(state_path).is_file():
            raise FileNotFoundError(f"nothing to resume: no training state at {state_path}")
        start, losses = load_state(state_path, params, optimizer, config)
    accumulation = config.gradient_accumulation_steps
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=desc, unit="step",
               dynamic_ncols=True, disable=not progress)
    for step in bar:
        for p in params:                                   # zero_grad: the next backward allocates afresh
            p.module.__dict__.get("grads", {}).pop(p.name, None)
        loss = sum(micro_step(step, micro, 1 / accumulation) for micro in range(accumulation)) / accumulation
        if config.max_grad_norm is not None:
            clip_grad_norm(params, config.max_grad_norm)
        optimizer.step(config.lr_at(step))
        losses.append(loss)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if state_path is not None and ((save_every and (step + 1) % save_every == 0) or step + 1 == config.steps):
            save_state(state_path, step + 1, params, optimizer, config, losses)
    return losses


def save_state(path, step, params, optimizer, config, losses):
    """The run's state as one .safetensors file: every trained array (`param/KEY`), AdamW's
    moments (`exp_avg/KEY`, `exp_avg_sq/KEY`), and in the metadata the step, the loss log, the
    optimiser's step counts and the config. Written to a temporary file, then renamed."""
    from safetensors.numpy import save_file

    arrays, adam_steps = optimizer.state_arrays()
    tensors = {f"param/{p.key}": np.ascontiguousarray(p.value) for p in params}
    tensors.update({k: np.ascontiguousarray(v) for k, v in arrays.items()})
    metadata = {"step": str(step), "losses": json.dumps(losses), "adam_steps": json.dumps(adam_steps),
                "config": json.dumps(vars(config))}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_state(path, params, optimizer, config):
    """Restore what `save_state` wrote into `params` and `optimizer`; returns (step, losses).
    Raises ValueError when the file is of another run (other parameters or config)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "step" not in metadata:
        raise ValueError(f"{path}: not a tinysd training state (no step in its metadata)")
    saved_config = json.loads(metadata["config"])
    changed = [k for k, v in vars(config).items() if k != "steps" and saved_config.get(k) != v]
    if changed:
        raise ValueError(f"{path}: saved by a run with other settings ({', '.join(changed)}); "
                         "resume with the same ones (only the step count may grow)")
    missing = [p.key for p in params if f"param/{p.key}" not in tensors]
    if missing:
        raise ValueError(f"{path}: holds no {missing[0]!r} (a state of another model or adapter?)")
    for p in params:
        value = tensors[f"param/{p.key}"]
        if value.shape != p.value.shape:
            raise ValueError(f"{path}: {p.key!r} is {value.shape} there, {p.value.shape} here")
    for p in params:
        p.value[...] = tensors[f"param/{p.key}"]
    optimizer.load_state_arrays(tensors, json.loads(metadata["adam_steps"]))
    return int(metadata["step"]), json.loads(metadata["losses"])


def plot_losses(losses, path, title="training loss"):
    """The loss per step (faint) and its moving average, log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(losses, dtype=np.float64)
    window = max(1, len(values) // 25)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(values, alpha=0.3, lw=0.7, label="per step")
    ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=f"mean of {window}")
    ax.set(title=title, xlabel="step", ylabel="loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- data: a folder of pictures with their captions -------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image_folder(folder, size):
    """Pictures and captions in kohya's layout: NAME.txt beside each NAME.png/.jpg/... .

    Each picture is centre-cropped to a square and resized to size × size (the model's native
    size: 512 for SD v1, 64 for the shapes model). Returns (images (N, 3, size, size) float32 in
    [-1, 1], captions). Raises ValueError naming the folder or the picture when there are no
    pictures, a caption file is missing or empty, or a picture cannot be read.
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder (training data is a folder of pictures with NAME.txt captions)")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"{folder}: no pictures ({', '.join(IMAGE_SUFFIXES)}) in it")
    images, captions = [], []
    for path in paths:
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            raise ValueError(f"{path}: no caption file {caption_path.name} beside it")
        caption = caption_path.read_text(encoding="utf-8").strip()
        if not caption:
            raise ValueError(f"{caption_path}: the caption is empty")
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                pixels = np.asarray(im, dtype=np.float32)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the picture ({e})") from None
        images.append(pixels.transpose(2, 0, 1) / 127.5 - 1)
        captions.append(caption)
    return np.stack(images), captions


class LatentDataset:
    """The training pictures as the VAE's latent distributions N(mean, std²), encoded once, and
    their captions' token ids. `latents(idx, generator)` samples z_0 = s·(mean + std·n) for the
    pictures `idx` (s the VAE's scaling factor, n from the torch-compatible generator).

    `fit_steps` > 0 replaces each encoder mean by a latent the decoder turns into the picture
    (`fit_latents`, std 0): for content the VAE's encoder never saw, which it maps to what it
    knows (the shapes model's encoder turns orange into yellow; its decoder can draw orange).
    """

    def __init__(self, sd, images, captions, batch=8, fit_steps=0, progress=False):
        means, stds = [], []
        for i in range(0, len(images), batch):
            dist = sd.vae.encode(images[i:i + batch])
            means.append(dist.mean)
            stds.append(dist.std)
        self.mean, self.std = np.concatenate(means), np.concatenate(stds)
        if fit_steps:
            self.mean = fit_latents(sd, images, self.mean, fit_steps, progress=progress)
            self.std = np.zeros_like(self.std)
        self.captions = list(captions)
        self.ids = np.concatenate([sd.tokenizer(c) for c in self.captions])       # (N, 77)
        self.scaling_factor = np.float32(sd.vae.scaling_factor)

    def __len__(self):
        return len(self.captions)

    def latents(self, idx, generator):
        noise = generator.randn(self.mean[idx].shape)
        return self.scaling_factor * (self.mean[idx] + self.std[idx] * noise)


def fit_latents(sd, images, start, steps, lr=0.1, batch=16, progress=False):
    """Latents z (N, 4, h, w) with decode(z) ≈ images, by `steps` AdamW steps on
    ‖decode(z) − x‖² through the frozen decoder (`Decoder.backward`), from `start` (the encoder's
    means). float32, unscaled (as `vae.encode(x).mean`)."""
    from tqdm import tqdm

    vae, ops = sd.vae, sd.vae.ops
    vae.freeze()
    holder = Module()
    fitted = []
    for i in tqdm(range(0, len(images), batch), desc="fitting latents", disable=not progress):
        x = ops.asarray(images[i:i + batch])
        object.__setattr__(holder, "z", ops.asarray(np.array(start[i:i + batch], np.float32)))
        optimizer = AdamW([Parameter("z", holder, "z")], lr=lr, weight_decay=0.0)
        for _ in range(steps):
            saved = {}
            diff = vae.decoder(vae.post_quant_conv(holder.z), saved=saved) - x
            grad = vae.decoder.backward(saved, ops.asarray(2 * ops.numpy(diff) / diff.size))
            holder.grads = {"z": vae.post_quant_conv.backward(holder.z, grad)}
            optimizer.step()
        fitted.append(np.array(ops.numpy(holder.z), np.float32))
    return np.concatenate(fitted)


def diffusion_micro_step(sd, data, config, schedule, text_encoder_trained=False):
    """`micro_step(step, micro, grad_scale) -> loss` for `train`: one micro-batch of the
    ε- (or v-) prediction loss through the U-Net, then back through it (and through the text
    encoder when it is trained: LoRA on its layers, textual inversion's new rows).

    Draws, all from micro-step k = step·accumulation + micro's generators: the pictures and
    timesteps (NumPy), then the latent sample's noise and ε (torch-compatible, in that order).
    With the text encoder frozen, each caption's context is computed once and reused.
    """
    ops = sd.unet.ops
    contexts = {}

    def context_of(i):
        if i not in contexts:
            contexts[i] = ops.numpy(sd.text_encoder(data.ids[i:i + 1]))[0]
        return contexts[i]

    def micro_step(step, micro, grad_scale):
        rng, gen = step_generators(config.seed, step * config.gradient_accumulation_steps + micro)
        idx = rng.integers(0, len(data), config.batch_size)
        t = rng.integers(0, schedule.num_train_timesteps, config.batch_size)
        z0 = data.latents(idx, gen)
        noise = gen.randn(z0.shape)
        text_saved = {}
        if text_encoder_trained:
            context = sd.text_encoder(data.ids[idx], saved=text_saved)
        else:
            context = ops.asarray(np.stack([context_of(i) for i in idx]))
        saved = {}
        prediction = sd.unet(ops.asarray(schedule.add_noise(z0, noise, t)), t, context, saved=saved)
        loss, grad = diffusion_loss(ops.numpy(prediction), schedule.target(z0, noise, t),
                                    schedule.loss_weights(t, config.min_snr_gamma))
        _, dcontext = sd.unet.backward(saved, ops.asarray(grad * np.float32(grad_scale)))
        if text_encoder_trained:
            sd.text_encoder.backward(text_saved, dcontext)
        return loss

    return micro_step


# -- LoRA --------------------------------------------------------------------------------------------------

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")          # every attention's projections
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class LoRALinear(Module):
    """A frozen Linear plus a trained low-rank update (Hu et al. 2021):

        y = W x + b + (α/r) · B A x,    A = lora_down (r, in), B = lora_up (out, r)

    A starts as kohya's (uniform ±1/√in), B at zero, so training starts from the base model.
    It stands in the module tree where the Linear stood (`add_lora`), so the attention that
    calls it is unchanged; its backward is the base's plus the two small factors'.
    """

    def __init__(self, base, rank, alpha, rng):
        out_features, in_features = base.weight.shape
        self.base, self.rank, self.alpha = base, rank, float(alpha)
        self.ops = base.ops
        self.lora_down = Linear(in_features, rank, bias=False)
        self.lora_up = Linear(rank, out_features, bias=False)
        bound = 1 / math.sqrt(in_features)
        for layer, value in ((self.lora_down, rng.uniform(-bound, bound, (rank, in_features))),
                             (self.lora_up, np.zeros((out_features, rank)))):
            layer.ops = base.ops
            layer.weight = base.ops.asarray(value.astype(np.float32))

    @property
    def scale(self):
        return self.alpha / self.rank

    def __call__(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x)) * self.scale

    def backward(self, x, grad):
        down = self.lora_down(x)                                  # (…, r): recomputed, r is small
        ddown = self.lora_up.backward(down, grad * self.scale)
        return self.base.backward(x, grad) + self.lora_down.backward(x, ddown)

    def delta(self):
        """ΔW = (α/r) · B A, the update a LoRA loader adds to W (out, in), float32."""
        up, down = (np.asarray(self.ops.numpy(w), np.float32) for w in (self.lora_up.weight, self.lora_down.weight))
        return np.float32(self.scale) * (up @ down)


def _replace(root, dotted, new):
    *path, last = dotted.split(".")
    parent = root
    for part in path:
        parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
    if isinstance(parent, list):
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def add_lora(model, kohya_prefix, targets, rank, alpha=None, seed=0):
    """Wrap every Linear of `model` named `….<target>` in a LoRALinear; returns {kohya name:
    adapter}, e.g. "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    (kohya's names: the module path with "_" for ".", after "lora_unet_" or "lora_te_").
    Freeze the model first: the adapters' factors are then its only trained parameters."""

    rng = np.random.default_rng(seed)
    alpha = rank if alpha is None else alpha
    adapters = {}
    for name, module in list(named_modules(model)):
        if isinstance(module, Linear) and any(name == t or name.endswith("." + t) for t in targets):
            adapter = LoRALinear(module, rank, alpha, rng)
            _replace(model, name, adapter)
            adapters[f"{kohya_prefix}_{name.replace('.', '_')}"] = adapter
    if not adapters:
        raise ValueError(f"no Linear named {', '.join(targets)} in {type(model).__name__}")
    return adapters


def remove_lora(model, adapters):
    """Put the base Linears back where `add_lora` put the adapters."""
    for name, module in list(named_modules(model)):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.base)


def lora_parameters(adapters):
    """The adapters' factors as `Parameter`s, keyed by their kohya names."""
    return [Parameter(f"{name}.{part}.weight", getattr(adapter, part), "weight")
            for name, adapter in adapters.items() for part in ("lora_down", "lora_up")]


def lora_state_dict(adapters):
    """kohya's keys: NAME.lora_down.weight (r, in), NAME.lora_up.weight (out, r), NAME.alpha ()."""
    state = {}
    for name, adapter in adapters.items():
        state[f"{name}.lora_down.weight"] = np.ascontiguousarray(adapter.ops.numpy(adapter.lora_down.weight), np.float32)
        state[f"{name}.lora_up.weight"] = np.ascontiguousarray(adapter.ops.numpy(adapter.lora_up.weight), np.float32)
        state[f"{name}.alpha"] = np.array(adapter.alpha, np.float32)
    return state


def save_lora(path, adapters, metadata=None):
    """Write the adapters as a kohya LoRA .safetensors (what A1111, kohya's scripts and diffusers'
    `load_lora_weights` read), with kohya's `ss_network_*` metadata."""
    from safetensors.numpy import save_file

    first = next(iter(adapters.values()))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(first.rank),
            "ss_network_alpha": str(first.alpha), "ss_training_comment": "trained with tinysd.train"}
    save_file(lora_state_dict(adapters), str(path), metadata={**meta, **(metadata or {})})


def check_backward(ops):
    """Fail before any model work on a backend without backward ops: a one-number SiLU backward
    (the cuda backend raises NotImplementedError naming the op and saying where to train)."""
    one = np.zeros(1, np.float32)
    ops.silu_backward(one, one)


def train_lora(sd, data_dir, config, rank=4, alpha=None, text_encoder=False, state_path=None, resume=False,
               save_every=0, progress=True, fit_steps=0):
    """Train LoRA adapters on `sd`'s U-Net attention projections (and, with `text_encoder`, its
    text encoder's) on a folder of captioned pictures (`fit_steps`: see LatentDataset). The
    adapters stay in the model (the pipeline draws with them); returns (adapters, losses).
    `save_lora` writes them."""
    check_backward(sd.unet.ops)
    size = 8 * sd.unet.config.get("sample_size", 64)
    images, captions = read_image_folder(data_dir, size)
    data = LatentDataset(sd, images, captions, fit_steps=fit_steps, progress=progress)
    schedule = NoiseSchedule(sd.scheduler_config)
    sd.unet.freeze()
    sd.text_encoder.freeze()
    adapters = add_lora(sd.unet, "lora_unet", UNET_LORA_TARGETS, rank, alpha, seed=config.seed)
    if text_encoder:
        adapters.update(add_lora(sd.text_encoder, "lora_te", TEXT_LORA_TARGETS, rank, alpha, seed=config.seed + 1))
    try:
        losses = train(diffusion_micro_step(sd, data, config, schedule, text_encoder), lora_parameters(adapters),
                       config, state_path, resume, save_every, progress, desc="LoRA")
    except BaseException:
        remove_lora(sd.unet, adapters)
        remove_lora(sd.text_encoder, adapters)
        raise
    return adapters, losses


# -- textual inversion -----------------------------------------------------------------------------------

def add_concept_token(sd, token, num_vectors=1, init_word=None, seed=0):
    """Add `token` (n vectors: token, token_1, …, as diffusers names them) to the tokenizer and
    the text encoder's table, starting from the mean row of `init_word`'s pieces (or small
    random vectors), and make those rows the only trained parameter. Returns that Parameter."""
    tokens = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
    sd.tokenizer.check_new_tokens(tokens)
    table = sd.text_encoder.text_model.embeddings.token_embedding
    weight = np.asarray(sd.text_encoder.ops.numpy(table.weight), np.float32)
    if init_word:
        pieces = sd.tokenizer.encode(init_word, added_tokens=False)
        if not pieces:
            raise ValueError(f"init word {init_word!r} has no tokens")
        start = weight[pieces].mean(axis=0)
    else:
        start = np.random.default_rng(seed).standard_normal(weight.shape[1]).astype(np.float32) * weight.std()
    ids = sd.tokenizer.add_tokens(tokens)
    rows = sd.text_encoder.add_tokens(np.repeat(start[None], num_vectors, axis=0))
    assert rows == ids, (rows, ids)
    sd.unet.freeze()
    sd.text_encoder.freeze()
    table.train_added = True
    first = rows[0] - table.weight.shape[0]
    return Parameter(token, table, "added", slice(first, first + num_vectors))


def train_textual_inversion(sd, data_dir, token, config, num_vectors=1, init_word=None, state_path=None,
                            resume=False, save_every=0, progress=True, fit_steps=0):
    """Learn `num_vectors` token vectors for `token` from a folder of captioned pictures whose
    captions say `token` (U-Net and text encoder frozen). The token stays loaded in `sd`;
    returns (vectors (n, width), losses). `save_embedding` writes them."""
    from tinysd.embeddings import expand_multi_vector

    check_backward(sd.unet.ops)
    size = 8 * sd.unet.config.get("sample_size", 64)
    images, captions = read_image_folder(data_dir, size)
    for caption in captions:
        if token not in caption:
            raise ValueError(f"{data_dir}: the caption {caption!r} does not say {token!r}; every caption of a "
                             "textual-inversion set names the concept")
    param = add_concept_token(sd, token, num_vectors, init_word, config.seed)
    data = LatentDataset(sd, images, [expand_multi_vector(c, sd.tokenizer) for c in captions], fit_steps=fit_steps,
                         progress=progress)
    schedule = NoiseSchedule(sd.scheduler_config)
    losses = train(diffusion_micro_step(sd, data, config, schedule, text_encoder_trained=True), [param], config,
                   state_path, resume, save_every, progress, desc="embedding")
    return np.array(param.value, np.float32), losses


def save_embedding(path, vectors, token=None, format="a1111"):
    """Write learned vectors (n, width): "a1111" as {"emb_params": vectors} (the .safetensors
    embeddings A1111 and civitai use; the token is the file's name), "diffusers" as {token:
    vectors} (diffusers' learned_embeds.safetensors)."""
    from safetensors.numpy import save_file

    vectors = np.ascontiguousarray(vectors, np.float32)
    if format == "a1111":
        save_file({"emb_params": vectors}, str(path))
    elif format == "diffusers":
        if not token:
            raise ValueError("a diffusers embedding file stores its token: pass token=...")
        save_file({token: vectors}, str(path))
    else:
        raise ValueError(f"format {format!r}: 'a1111' or 'diffusers'")
