"""Samplers: turn the UNet's noise prediction ε into the next, less noisy latent.

    s = make_scheduler("dpmpp_2m_karras")          # SD v1.5's scheduler config by default
    s.set_timesteps(25)
    x = noise * s.init_noise_sigma
    for t in s.timesteps:
        eps = unet(s.scale_model_input(x, t), t, context)
        x = s.step(eps, t, x, generator=g).prev_sample

Each class equals the diffusers scheduler of the same name for the same config: same
`timesteps`, same arithmetic in the same float precision, and noise drawn in the same order and
shape, so the same seed gives the same picture. The tables (β, ᾱ, σ, spacings) are in
`tinysd.schedule`. Two families, one in between, and the few-step samplers:

  ᾱ-samplers (DDPM, DDIM, PNDM): the latent is x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε; integer timesteps.
  σ-samplers (LMS, Euler, Euler a, Heun): the latent is x_t/√ᾱ_t = x₀ + σ_t ε, so the initial
      noise is scaled by σ_max (`init_noise_sigma`) and the UNet input by 1/√(σ²+1) = √ᾱ_t
      (`scale_model_input`); timesteps are floats (fractional with Karras σ).
  DPM-Solver++ walks the σ schedule but keeps the latent in ᾱ form, as diffusers does.
  Consistency samplers (LCM, TCD), ᾱ form: each step jumps to x̂₀ and draws fresh noise back
      up to the next timestep, for models distilled to do so in 2–8 steps (LCM U-Nets, LCM-LoRA).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tinysd.schedule import (SPACINGS, cumulative_alphas, karras_sigmas, make_betas, sigma_to_t,
                             sigmas_from, spaced_timesteps)

SD15_CONFIG = Path(__file__).parent / "data" / "sd-v1-5" / "scheduler" / "scheduler_config.json"


@dataclass
class SchedulerOutput:
    prev_sample: np.ndarray            # the latent for the next timestep, float32
    pred_original_sample: np.ndarray   # x̂₀, the model's current guess of the clean latent, float32


def _randn(generator, shape) -> np.ndarray:
    """N(0, I) float32 noise from `generator.randn(shape)` (e.g. tinysd.rng.Generator).

    None draws from a fresh, unseeded NumPy generator: not reproducible.
    """
    if generator is None:
        return np.random.default_rng().standard_normal(shape, dtype=np.float32)
    return np.asarray(generator.randn(tuple(shape)), dtype=np.float32)


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _inputs(eps, sample):
    """(ε, x) as float32 arrays of one shape."""
    eps, sample = _f32(eps), _f32(sample)
    if eps.shape != sample.shape:
        raise ValueError(f"model output shape {eps.shape} does not match sample shape {sample.shape}")
    return eps, sample


class Scheduler:
    """What every sampler shares: its config, the β/ᾱ tables, the timestep list.

    `defaults` are diffusers' defaults for the config keys the class reads; `supported` lists,
    for keys where tinysd implements only some of diffusers' options, the values it accepts.
    """
    order = 1   # UNet calls per step: timesteps[t_start * order:] is where img2img starts
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                    beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                    timestep_spacing="leading", steps_offset=0)
    supported = dict(beta_schedule=("linear", "scaled_linear"), prediction_type=("epsilon",),
                     timestep_spacing=SPACINGS)

    def __init__(self, config: dict | None = None, **overrides):
        """config: a scheduler_config.json dict (keys other classes use are ignored, as in
        diffusers' `from_config`); overrides: keys to set on top (e.g. use_karras_sigmas=True)."""
        self.config = c = self._merge_config(config or {}, overrides)
        self.betas = make_betas(c.num_train_timesteps, c.beta_start, c.beta_end,
                                c.beta_schedule, c.trained_betas)
        self.alphas_cumprod = cumulative_alphas(self.betas)
        self.timesteps = None
        self.num_inference_steps = None
        self._begin_index = None

    @classmethod
    def _merge_config(cls, config: dict, overrides: dict) -> SimpleNamespace:
        unknown = set(overrides) - set(cls.defaults)
        if unknown:
            raise ValueError(f"{cls.__name__} has no option {sorted(unknown)}; "
                             f"its options: {sorted(cls.defaults)}")
        # diffusers writes keys the original file left to defaults under _use_default_values:
        # those take this class's defaults, not the other class's.
        implicit = set(config.get("_use_default_values", []))
        merged = dict(cls.defaults)
        merged.update({k: v for k, v in config.items() if k in cls.defaults and k not in implicit})
        merged.update(overrides)
        for key, allowed in cls.supported.items():
            if merged[key] not in allowed:
                raise ValueError(f"{cls.__name__}: {key}={merged[key]!r} is not implemented "
                                 f"(supported: {', '.join(map(repr, allowed))})")
        T = merged["num_train_timesteps"]
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"num_train_timesteps must be an integer ≥ 2, got {T!r}")
        return SimpleNamespace(**merged)

    def _check_steps(self, n) -> int:
        T = self.config.num_train_timesteps
        if not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be an integer in 1..{T}, got {n!r}")
        return int(n)

    def _require_timesteps(self):
        if self.timesteps is None:
            raise RuntimeError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) first")

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latent noise."""
        return 1.0

    def set_begin_index(self, begin_index: int = 0):
        """Index into `timesteps` of the first step (img2img); the σ-samplers use it."""
        self._begin_index = begin_index

    def scale_model_input(self, sample, t) -> np.ndarray:
        """The UNet's input at timestep t: the latent itself for ᾱ-samplers."""
        return _f32(sample)

    def add_noise(self, x0, noise, t) -> np.ndarray:
        """Forward diffusion to timestep(s) t (scalar or (B,)): x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε."""
        x0, noise = _f32(x0), _f32(noise)
        abar = self.alphas_cumprod[np.atleast_1d(np.asarray(t, dtype=np.int64))]
        abar = abar.reshape(-1, *[1] * (x0.ndim - 1))
        return abar**0.5 * x0 + (1 - abar) ** 0.5 * noise

    def _predict_x0(self, sample, eps, abar):
        """x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t: the forward process solved for x₀."""
        return (sample - (1 - abar) ** 0.5 * eps) / abar**0.5


class DDPMScheduler(Scheduler):
    """Ancestral sampling of DDPM (Ho et al. 2020), eq. 6–7, from t to the previous timestep s:

        x_s = (√ᾱ_s β̃ / (1−ᾱ_t)) x̂₀ + (√α̃ (1−ᾱ_s) / (1−ᾱ_t)) x_t + √((1−ᾱ_s)/(1−ᾱ_t) β̃) z

    with α̃ = ᾱ_t/ᾱ_s, β̃ = 1 − α̃ (one "step" of the skipped chain) and z ~ N(0, I), drawn on
    every step but the one that reaches t = 0. Built for 1000 steps: few steps look noisy.
    """
    defaults = dict(Scheduler.defaults, variance_type="fixed_small", clip_sample=True,
                    clip_sample_range=1.0, thresholding=False, rescale_betas_zero_snr=False)
    supported = dict(Scheduler.supported, variance_type=("fixed_small",), thresholding=(False,),
                     rescale_betas_zero_snr=(False,))

    def set_timesteps(self, num_inference_steps: int):
        c = self.config
        n = self.num_inference_steps = self._check_steps(num_inference_steps)
        self.timesteps = spaced_timesteps(n, c.timestep_spacing, c.num_train_timesteps,
                                          c.steps_offset).astype(np.int64)

    def _previous_timestep(self, t: int) -> int:
        hits = np.flatnonzero(self.timesteps == t)
        if len(hits) == 0:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps")
        i = hits[0]
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        self._require_timesteps()
        eps, sample = _inputs(eps, sample)
        t = int(t)
        s = self._previous_timestep(t)
        abar_t = self.alphas_cumprod[t]
        abar_s = self.alphas_cumprod[s] if s >= 0 else np.float32(1)
        alpha, beta = abar_t / abar_s, 1 - abar_t / abar_s
        x0 = self._predict_x0(sample, eps, abar_t)
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        mean = ((abar_s**0.5 * beta / (1 - abar_t)) * x0
                + (alpha**0.5 * (1 - abar_s) / (1 - abar_t)) * sample)
        if t > 0:
            variance = max((1 - abar_s) / (1 - abar_t) * beta, np.float32(1e-20))
            mean = mean + variance**0.5 * _randn(generator, eps.shape)
        return SchedulerOutput(mean, x0)


class DDIMScheduler(Scheduler):
    """DDIM (Song et al. 2021), eq. 12, from t to s = t − T/n:

        x_s = √ᾱ_s x̂₀ + √(1 − ᾱ_s − σ²) ε + σ z,    σ = η √((1−ᾱ_s)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_s)

    η = 0 is deterministic (an ODE solver); η = 1 is DDPM's ancestral step. Past t = 0 the
    last step uses ᾱ_0 (`set_alpha_to_one=False`, SD v1) or 1.
    """
    defaults = dict(Scheduler.defaults, clip_sample=True, clip_sample_range=1.0,
                    set_alpha_to_one=True, thresholding=False, rescale_betas_zero_snr=False)
    supported = dict(Scheduler.supported, thresholding=(False,), rescale_betas_zero_snr=(False,))
    set_timesteps = DDPMScheduler.set_timesteps

    @property
    def final_alpha_cumprod(self):
        """ᾱ past t = 0: 1, or ᾱ_0 with `set_alpha_to_one=False` (SD v1)."""
        return np.float32(1) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        """eta: η above, 0 when None."""
        self._require_timesteps()
        eps, sample = _inputs(eps, sample)
        t, eta = int(t), eta or 0.0
        s = t - self.config.num_train_timesteps // self.num_inference_steps
        abar_t = self.alphas_cumprod[t]
        abar_s = self.alphas_cumprod[s] if s >= 0 else self.final_alpha_cumprod
        x0 = self._predict_x0(sample, eps, abar_t)
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        std = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)) ** 0.5
        prev = abar_s**0.5 * x0 + (1 - abar_s - std**2) ** 0.5 * eps
        if eta > 0:
            prev = prev + std * _randn(generator, eps.shape)
        return SchedulerOutput(prev, x0)


class PNDMScheduler(Scheduler):
    """PLMS, the pseudo linear multistep method of PNDM (Liu et al. 2022), SD v1's default.

    One DDIM-like transfer from t to s = t − T/n (eq. 9),

        x_s = √(ᾱ_s/ᾱ_t) x_t − (ᾱ_s − ᾱ_t) ε' / (ᾱ_t √(1−ᾱ_s) + √(ᾱ_t (1−ᾱ_t) ᾱ_s)),

    with ε' the Adams–Bashforth combination of the last noise predictions ε₁ (newest) ... ε₄:
    (55ε₁ − 59ε₂ + 37ε₃ − 9ε₄)/24 once four exist, orders 2 and 3 before that. The very first
    step (`skip_prk_steps`: no Runge–Kutta warm-up) is a Heun step, two UNet calls: 981 → 961
    with ε₀, then 981 → 961 again from the same x with (ε₀ + ε₁)/2, ε₁ taken at the first result.
    Hence `timesteps` starts 981, 961, 961, 941, ... (SD v1, 50 steps).
    """
    defaults = dict(Scheduler.defaults, skip_prk_steps=False, set_alpha_to_one=False)
    supported = dict(Scheduler.supported, skip_prk_steps=(True,))
    final_alpha_cumprod = DDIMScheduler.final_alpha_cumprod

    def set_timesteps(self, num_inference_steps: int):
        c = self.config
        n = self.num_inference_steps = self._check_steps(num_inference_steps)
        t = spaced_timesteps(n, c.timestep_spacing, c.num_train_timesteps, c.steps_offset)
        t = t.astype(np.int64)[::-1]                             # ascending, as diffusers builds it
        self.timesteps = np.concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1].copy()
        self.ets, self.counter, self.cur_sample = [], 0, None

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        """pred_original_sample is x̂₀ from ε' (diffusers' PNDM returns none)."""
        self._require_timesteps()
        eps, sample = _inputs(eps, sample)
        t = int(t)
        stride = self.config.num_train_timesteps // self.num_inference_steps
        s = t - stride
        if self.counter == 1:      # the repeated step: redo t+stride → t from the same x
            s, t = t, t + stride
        else:
            self.ets = self.ets[-3:] + [eps]
        e = self.ets
        if self.counter == 0:
            self.cur_sample = sample
        elif self.counter == 1:
            eps = (eps + e[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self.counter += 1
        abar_t = self.alphas_cumprod[t]
        abar_s = self.alphas_cumprod[s] if s >= 0 else self.final_alpha_cumprod
        denom = abar_t * (1 - abar_s) ** 0.5 + (abar_t * (1 - abar_t) * abar_s) ** 0.5
        prev = (abar_s / abar_t) ** 0.5 * sample - (abar_s - abar_t) * eps / denom
        return SchedulerOutput(prev, self._predict_x0(sample, eps, abar_t))


class _SigmaScheduler(Scheduler):
    """Shared by the σ-samplers: the σ schedule, the running step index, input scaling.

    They keep `step_index`, the position in `timesteps`, found from the first t they see
    (or `set_begin_index`), and move it by one per `step`.
    """
    defaults = dict(Scheduler.defaults, timestep_spacing="linspace", use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False)
    supported = dict(Scheduler.supported, use_exponential_sigmas=(False,), use_beta_sigmas=(False,))

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.train_sigmas = sigmas_from(self.alphas_cumprod)   # (T,) ascending in t
        self.sigmas = None
        self._step_index = None

    def set_timesteps(self, num_inference_steps: int):
        """n timesteps (float32) and n+1 noise levels `sigmas` (float32, ending in 0)."""
        c = self.config
        n = self.num_inference_steps = self._check_steps(num_inference_steps)
        t = spaced_timesteps(n, c.timestep_spacing, c.num_train_timesteps, c.steps_offset,
                             round_linspace=False).astype(np.float32)
        sigmas = np.interp(t, np.arange(c.num_train_timesteps), self.train_sigmas)
        if getattr(c, "use_karras_sigmas", False):     # Euler a has no such option
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], n)
            t = sigma_to_t(sigmas, np.log(self.train_sigmas))
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        self.timesteps = t.astype(np.float32)
        self._step_index = self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def init_noise_sigma(self) -> float:
        """σ_max; √(σ_max² + 1) with `leading` spacing (diffusers' choice)."""
        self._require_timesteps()
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing == "leading":
            return float((sigma_max**2 + 1) ** 0.5)
        return float(sigma_max)

    def _index_for_timestep(self, t) -> int:
        hits = np.flatnonzero(self.timesteps == t)
        if len(hits) == 0:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])   # Heun repeats t: take the second

    def _current_index(self, t) -> int:
        self._require_timesteps()
        if self._step_index is None:
            begin = self._begin_index
            self._step_index = begin if begin is not None else self._index_for_timestep(t)
        return self._step_index

    def scale_model_input(self, sample, t) -> np.ndarray:
        """x / √(σ² + 1) = √ᾱ_t (x₀ + σ ε): the ᾱ-form latent the UNet was trained on."""
        sigma = self.sigmas[self._current_index(t)]
        return _f32(sample) / (sigma**2 + 1) ** 0.5

    def _noise_sigmas(self, t, ndim) -> np.ndarray:
        """σ at each timestep of `t` (scalar or (B,)), shaped to broadcast over a latent."""
        t = np.atleast_1d(t)
        if self._begin_index is None:
            idx = [self._index_for_timestep(ti) for ti in t]
        else:
            idx = [self._step_index if self._step_index is not None else self._begin_index] * len(t)
        return self.sigmas[idx].reshape(-1, *[1] * (ndim - 1))

    def add_noise(self, x0, noise, t) -> np.ndarray:
        """x₀ + σ_t ε (σ-form of the forward process)."""
        self._require_timesteps()
        x0, noise = _f32(x0), _f32(noise)
        return x0 + noise * self._noise_sigmas(t, x0.ndim)


class LMSDiscreteScheduler(_SigmaScheduler):
    """Linear multistep (Karras et al. 2022 / k-diffusion `sample_lms`), order up to 4:

        x_{i+1} = x_i + Σ_j c_j d_{i−j},    d = (x − x̂₀)/σ = ε,    c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ

    where ℓ_j is the Lagrange polynomial through the last noise levels σ_i, σ_{i−1}, ...
    that is 1 at σ_{i−j}: the derivative is extrapolated by a polynomial and integrated exactly.
    """
    def set_timesteps(self, num_inference_steps: int):
        super().set_timesteps(num_inference_steps)
        self.derivatives = []

    def _lms_coefficient(self, order: int, i: int, j: int) -> float:
        """c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j,  ℓ_j(σ) = ∏_{k≠j} (σ − σ_{i−k}) / (σ_{i−j} − σ_{i−k})."""
        s, P = self.sigmas.astype(np.float64), np.polynomial.Polynomial
        ell = P([1.0])
        for k in range(order):
            if k != j:
                ell = ell * P([-s[i - k], 1.0]) / (s[i - j] - s[i - k])
        integral = ell.integ()
        return float(integral(s[i + 1]) - integral(s[i]))

    def step(self, eps, t, sample, generator=None, eta=None, order: int = 4) -> SchedulerOutput:
        eps, sample = _inputs(eps, sample)
        i = self._current_index(t)
        sigma = self.sigmas[i]
        x0 = sample - sigma * eps
        self.derivatives = (self.derivatives + [(sample - x0) / sigma])[-order:]
        order = min(i + 1, order)
        coeffs = [self._lms_coefficient(order, i, j) for j in range(order)]
        prev = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        return SchedulerOutput(prev, x0)


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler's method on the probability-flow ODE dx/dσ = (x − x̂₀)/σ = ε (Karras et al. 2022, Alg. 1):

        x_{i+1} = x_i + (σ_{i+1} − σ_i) · (x_i − x̂₀)/σ_i,    x̂₀ = x_i − σ_i ε
    """
    defaults = dict(_SigmaScheduler.defaults, interpolation_type="linear", sigma_min=None,
                    sigma_max=None, timestep_type="discrete", rescale_betas_zero_snr=False,
                    final_sigmas_type="zero")
    supported = dict(_SigmaScheduler.supported, interpolation_type=("linear",), sigma_min=(None,),
                     sigma_max=(None,), timestep_type=("discrete",), rescale_betas_zero_snr=(False,),
                     final_sigmas_type=("zero",))

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        eps, sample = _inputs(eps, sample)
        i = self._current_index(t)
        sigma = self.sigmas[i]
        x0 = sample - sigma * eps
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (self.sigmas[i + 1] - sigma)
        self._step_index += 1
        return SchedulerOutput(prev, x0)


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler a: an Euler step down to σ_down, then fresh noise back up to σ_{i+1}:

        σ_up = √(σ_{i+1}² (σ_i² − σ_{i+1}²) / σ_i²),    σ_down = √(σ_{i+1}² − σ_up²)
        x_{i+1} = x_i + (σ_down − σ_i) · (x_i − x̂₀)/σ_i + σ_up z,    z ~ N(0, I)

    Noise is drawn on every step (σ_up = 0 on the last), as in diffusers.
    """
    defaults = dict(Scheduler.defaults, timestep_spacing="linspace", rescale_betas_zero_snr=False)
    supported = dict(Scheduler.supported, rescale_betas_zero_snr=(False,))

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        eps, sample = _inputs(eps, sample)
        i = self._current_index(t)
        sigma, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        x0 = sample - sigma * eps
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev = sample + (sample - x0) / sigma * (sigma_down - sigma)
        prev = prev + _randn(generator, eps.shape) * sigma_up
        self._step_index += 1
        return SchedulerOutput(prev, x0)


class HeunDiscreteScheduler(_SigmaScheduler):
    """Heun's method (Karras et al. 2022, Alg. 1): an Euler step, then its correction.

        d_i = (x_i − x̂₀(x_i, σ_i))/σ_i,   x' = x_i + (σ_{i+1} − σ_i) d_i               (UNet call 1)
        d'  = (x' − x̂₀(x', σ_{i+1}))/σ_{i+1},  x_{i+1} = x_i + (σ_{i+1} − σ_i)(d_i + d')/2   (call 2)

    Two UNet calls per step (`order = 2`), so `timesteps` holds each t after the first twice and
    `sigmas` each σ. The step into σ = 0 is Euler's alone.
    """
    order = 2
    defaults = dict(_SigmaScheduler.defaults, clip_sample=False, clip_sample_range=1.0)
    supported = dict(_SigmaScheduler.supported, clip_sample=(False,))

    def set_timesteps(self, num_inference_steps: int):
        super().set_timesteps(num_inference_steps)
        s, t = self.sigmas, self.timesteps
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])
        self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)])
        self.prev_derivative = self.dt = self.sample = None

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        eps, sample = _inputs(eps, sample)
        i = self._current_index(t)
        if self.dt is None:        # predictor: Euler from σ_i to σ_{i+1}
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
            x0 = sample - sigma * eps
            derivative = (sample - x0) / sigma
            self.prev_derivative, self.dt, self.sample = derivative, sigma_next - sigma, sample
            prev = sample + derivative * self.dt
        else:                      # corrector: average the slopes at both ends
            sigma_next = self.sigmas[i]
            x0 = sample - sigma_next * eps
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            prev = self.sample + derivative * self.dt
            self.prev_derivative = self.dt = self.sample = None
        self._step_index += 1
        return SchedulerOutput(prev, x0)


class DPMSolverMultistepScheduler(_SigmaScheduler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), "DPM++ 2M": a second-order multistep solver
    in λ = log(α/σ) (half the log-SNR), with VP coefficients α = 1/√(σ²+1) = √ᾱ and σ·α = √(1−ᾱ).

    With data predictions D_i = x̂₀ = (x − σ_VP ε)/α and h = λ_{i+1} − λ_i, r = h_{i−1}/h:

        x_{i+1} = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^{−h} − 1) (D_i + (D_i − D_{i−1}) / (2r))

    (σ here in VP form). First order (D = D_i, i.e. DDIM) on the first step, which has no D_{i−1},
    and on the last, into σ = 0. The latent stays in ᾱ form: init_noise_sigma is 1 and the UNet
    input is not scaled.
    """
    defaults = dict(_SigmaScheduler.defaults, solver_order=2, thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                    algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                    euler_at_final=False, use_lu_lambdas=False, use_flow_sigmas=False,
                    final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
                    rescale_betas_zero_snr=False, use_dynamic_shifting=False)
    supported = dict(_SigmaScheduler.supported, solver_order=(1, 2), thresholding=(False,),
                     algorithm_type=("dpmsolver++",), solver_type=("midpoint",),
                     use_lu_lambdas=(False,), use_flow_sigmas=(False,), final_sigmas_type=("zero",),
                     lambda_min_clipped=(-float("inf"),), variance_type=(None,),
                     rescale_betas_zero_snr=(False,), use_dynamic_shifting=(False,))

    def set_timesteps(self, num_inference_steps: int):
        """Integer timesteps: n+1 spaced points with the last (t ≈ 0) dropped; Karras σ rounded."""
        c = self.config
        n = self._check_steps(num_inference_steps)
        T = c.num_train_timesteps
        if c.timestep_spacing == "trailing":
            t = spaced_timesteps(n, "trailing", T)
        else:
            t = spaced_timesteps(n + 1, c.timestep_spacing, T, c.steps_offset)[:-1]
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(float(self.train_sigmas[0]), float(self.train_sigmas[-1]), n)
            t = sigma_to_t(sigmas, np.log(self.train_sigmas)).round()
        else:
            sigmas = np.interp(t, np.arange(T), self.train_sigmas)
        self.sigmas = np.append(sigmas, 0.0).astype(np.float32)
        self.timesteps = t.astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._step_index = self._begin_index = None

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def scale_model_input(self, sample, t) -> np.ndarray:
        return _f32(sample)

    def _index_for_timestep(self, t) -> int:
        hits = np.flatnonzero(self.timesteps == t)
        if len(hits) == 0:
            return len(self.timesteps) - 1
        return int(hits[1] if len(hits) > 1 else hits[0])

    @staticmethod
    def _alpha_sigma(sigma):
        """σ (VE) -> (α, σ_VP) = (1/√(σ²+1), σ/√(σ²+1))."""
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    def _lambda(self, i):
        alpha, sigma = self._alpha_sigma(self.sigmas[i])
        with np.errstate(divide="ignore"):           # σ = 0 at the end: λ = +∞, e^{−h} = 0
            return alpha, sigma, np.log(alpha) - np.log(sigma)

    def add_noise(self, x0, noise, t) -> np.ndarray:
        """α x₀ + σ_VP ε at the σ of timestep(s) t: the ᾱ-form forward process."""
        self._require_timesteps()
        x0, noise = _f32(x0), _f32(noise)
        alpha, sigma = self._alpha_sigma(self._noise_sigmas(t, x0.ndim))
        return alpha * x0 + sigma * noise

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        eps, sample = _inputs(eps, sample)
        i = self._current_index(t)
        n, c = len(self.timesteps), self.config
        last = i == n - 1                       # final_sigmas_type="zero": first order into σ = 0
        alpha_s, sigma_s, lambda_s = self._lambda(i)
        alpha_t, sigma_t, lambda_t = self._lambda(i + 1)
        x0 = (sample - sigma_s * eps) / alpha_s
        self.model_outputs = self.model_outputs[1:] + [x0]
        h = lambda_t - lambda_s
        if c.solver_order == 1 or self.lower_order_nums < 1 or last:
            prev = (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * x0
        else:
            _, _, lambda_prev = self._lambda(i - 1)
            r = (lambda_s - lambda_prev) / h
            D0, D1 = x0, (1.0 / r) * (x0 - self.model_outputs[-2])
            prev = ((sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * D0
                    - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * D1)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index += 1
        return SchedulerOutput(prev.astype(np.float32), x0)


class LCMScheduler(Scheduler):
    """Latent consistency models (Luo et al. 2023): a few steps of "jump to x₀, noise back down".

    A consistency model f(x_t, t) maps any point of an ODE trajectory straight to its origin x₀.
    The distilled U-Net still predicts ε; the model is its x̂₀ with the boundary condition
    f(x, 0) = x built in (Song et al. 2023, eq. 3, discrete time):

        x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t,    denoised = c_out(t) x̂₀ + c_skip(t) x_t
        c_skip = σ_d² / ((s t)² + σ_d²),   c_out = s t / √((s t)² + σ_d²),   σ_d = 0.5, s = 10

    (`timestep_scaling` s makes c_skip ≈ 0 for every t ≥ 1: denoised is x̂₀ to within 0.25%.)
    Then the next timestep's latent is a fresh forward-process draw from it,

        x_{t'} = √ᾱ_{t'} denoised + √(1−ᾱ_{t'}) z,    z ~ N(0, I),

    and the last step returns `denoised` itself. Timesteps come from the distillation's grid of
    `original_inference_steps` (50) points t = k·T/50 − 1 (19, 39, ..., 999), walked from the
    top with a stride of len(grid)/n indices: 4 steps are 999, 759, 499, 259. With `strength`
    (img2img in diffusers' LCM pipelines) the grid is cut to its lowest strength·50 points first.

    `pred_original_sample` holds `denoised` (diffusers calls it that): the picture the step saw.
    """
    defaults = dict(Scheduler.defaults, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                    set_alpha_to_one=True, thresholding=False, dynamic_thresholding_ratio=0.995,
                    sample_max_value=1.0, timestep_scaling=10.0, rescale_betas_zero_snr=False)
    supported = dict(Scheduler.supported, thresholding=(False,), rescale_betas_zero_snr=(False,))
    final_alpha_cumprod = DDIMScheduler.final_alpha_cumprod
    sigma_data = 0.5

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._step_index = None

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0):
        """n timesteps (int64) from the `original_inference_steps` grid, as diffusers."""
        c = self.config
        T, original = c.num_train_timesteps, c.original_inference_steps
        if not isinstance(original, int) or not 1 <= original <= T:
            raise ValueError(f"original_inference_steps must be an integer in 1..{T}, got {original!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        n = self._check_steps(num_inference_steps)
        if n > original:
            raise ValueError(f"{type(self).__name__}: num_inference_steps {n} is more than "
                             f"original_inference_steps {original}, the grid the timesteps are taken from")
        grid = np.arange(1, int(original * strength) + 1) * (T // original) - 1     # ascending
        if len(grid) < n:
            raise ValueError(f"{type(self).__name__}: strength {strength} leaves {len(grid)} of the "
                             f"{original} grid timesteps, fewer than num_inference_steps {n}")
        index = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = grid[::-1][index].astype(np.int64)
        self.num_inference_steps = n
        self._step_index = self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    def _current_index(self, t) -> int:
        """Position of this step in `timesteps`: set_begin_index's, else where t first appears."""
        self._require_timesteps()
        if self._step_index is None:
            hits = np.flatnonzero(self.timesteps == t)
            if self._begin_index is None and len(hits) == 0:
                raise ValueError(f"timestep {t} is not one of this scheduler's timesteps")
            self._step_index = self._begin_index if self._begin_index is not None else int(hits[0])
        return self._step_index

    def _alpha_cumprod(self, t) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def boundary_condition_scalings(self, t):
        """(c_skip, c_out) at timestep t, float32 as diffusers computes them."""
        st = np.float32(t) * np.float32(self.config.timestep_scaling)
        var = np.float32(self.sigma_data**2)
        return var / (st * st + var), st / (st * st + var) ** np.float32(0.5)

    def _x0(self, eps, sample, abar_t):
        x0 = self._predict_x0(sample, eps, abar_t)
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        """One LCM step; `eta` is not used (the noise scale is fixed by ᾱ of the next timestep)."""
        eps, sample = _inputs(eps, sample)
        i = self._current_index(t)
        t = int(t)
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        c_skip, c_out = self.boundary_condition_scalings(t)
        denoised = c_out * self._x0(eps, sample, self.alphas_cumprod[t]) + c_skip * sample
        if i != self.num_inference_steps - 1:
            abar_next = self._alpha_cumprod(t_next)
            prev = abar_next**0.5 * denoised + (1 - abar_next) ** 0.5 * _randn(generator, eps.shape)
        else:
            prev = denoised
        self._step_index += 1
        return SchedulerOutput(prev, denoised)


class TCDScheduler(LCMScheduler):
    """Trajectory consistency distillation (Zheng et al. 2024), "strategic stochastic sampling":
    LCM's timesteps, but each step goes only part of the way down before re-noising.

    From t with next timestep t', and s = ⌊(1 − γ) t'⌋ (γ = `eta`, 0.3 in diffusers' step,
    0 = deterministic, 1 = LCM-like):

        x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t,              x_s = √ᾱ_s x̂₀ + √(1−ᾱ_s) ε     (DDIM to s)
        x_{t'} = √(ᾱ_{t'}/ᾱ_s) x_s + √(1 − ᾱ_{t'}/ᾱ_s) z,   z ~ N(0, I)         (forward to t')

    The last step (t' = 0) and γ = 0 return x_s without noise. The timesteps, the step index and
    add_noise are LCM's (TCD's own schedule differs only when `original_inference_steps` is
    passed to set_timesteps, which tinysd does not do); there are no c_skip/c_out scalings.
    `pred_original_sample` is x̂₀ (diffusers' TCD returns x_s as `pred_noised_sample`).
    """
    default_eta = 0.3

    def step(self, eps, t, sample, generator=None, eta=None) -> SchedulerOutput:
        eta = self.default_eta if eta is None else float(eta)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"TCD's eta (gamma) must be in [0, 1], got {eta}")
        eps, sample = _inputs(eps, sample)
        i = self._current_index(t)
        t = int(t)
        t_next = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        s = int(np.floor(np.float32(1 - eta) * np.float32(t_next)))   # float32 as torch computes it
        abar_t, abar_next, abar_s = self.alphas_cumprod[t], self._alpha_cumprod(t_next), self.alphas_cumprod[s]
        x0 = self._x0(eps, sample, abar_t)
        x_s = abar_s**0.5 * x0 + (1 - abar_s) ** 0.5 * eps
        if eta > 0 and i != self.num_inference_steps - 1:
            ratio = abar_next / abar_s
            prev = ratio**0.5 * x_s + (1 - ratio) ** 0.5 * _randn(generator, eps.shape)
        else:
            prev = x_s
        self._step_index += 1
        return SchedulerOutput(prev, x0)


SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}
"""--sampler name -> (class, config overrides)."""

ALIASES = {
    "plms": "pndm", "euler_ancestral": "euler_a",
    **{cls.__name__.lower(): name for name, (cls, extra) in SCHEDULERS.items() if not extra},
}
"""Other spellings, after `canonical_name`'s normalization: diffusers class names, PLMS."""


def canonical_name(name: str) -> str:
    """'DPM++ 2M Karras', 'Euler a', 'k_euler_a', 'EulerDiscreteScheduler' -> a SCHEDULERS key."""
    if not isinstance(name, str):
        raise ValueError(f"sampler name must be a string, got {name!r}")
    key = re.sub(r"[\s\-]+", "_", name.strip().lower()).replace("++", "pp")
    key = key.removeprefix("k_")
    key = ALIASES.get(key, key)
    if key not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SCHEDULERS)} (also "
                         "diffusers class names and A1111 names such as 'DPM++ 2M Karras', 'Euler a')")
    return key


def load_config(config=None) -> dict:
    """A scheduler config: a dict as is, a scheduler_config.json path or its folder, None = SD v1.5's."""
    if isinstance(config, dict):
        return config
    path = Path(SD15_CONFIG if config is None else config)
    if path.is_dir():
        path = path / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"scheduler config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"scheduler config {path} is not valid JSON: {e}") from None


def make_scheduler(name: str, config=None) -> Scheduler:
    """The sampler `name` (see SCHEDULERS, canonical_name) for a scheduler config (load_config)."""
    cls, overrides = SCHEDULERS[canonical_name(name)]
    return cls(load_config(config), **overrides)
