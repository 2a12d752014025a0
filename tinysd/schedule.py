"""Noise schedules: the tables every sampler in `tinysd.schedulers` reads.

The forward process (DDPM, Ho et al. 2020) noises a latent x₀ over T = 1000 training steps
with variances β_t:

    x_t = √ᾱ_t · x₀ + √(1 − ᾱ_t) · ε,    ᾱ_t = ∏_{s≤t} (1 − β_s),    ε ~ N(0, I)

Dividing by √ᾱ_t gives the "variance exploding" form of Karras et al. (2022):

    x_t / √ᾱ_t = x₀ + σ_t · ε,    σ_t = √((1 − ᾱ_t) / ᾱ_t)

For SD v1 (`scaled_linear`, β from 0.00085 to 0.012) σ runs from 0.029 at t = 0 to 14.6 at
t = 999. The tables are float32 and equal diffusers' bit for bit (they come from torch there),
because a 1-ulp change in ᾱ near t = 0 is a 1e-5 change in σ.
"""
from __future__ import annotations

import numpy as np

SPACINGS = ("linspace", "leading", "trailing")


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=torch.float32), bit for bit.

    torch takes step = (end − start)/(n − 1) in float32, then fills the first half as
    start + i·step and the second half as end − (n−1−i)·step, each a fused multiply-add:
    exact in float64 here, rounded once. (np.linspace rounds differently in ~30% of entries.)
    """
    start, end = np.float32(start), np.float32(end)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n)
    return np.where(i < n // 2, start + step * i, end - step * (n - 1 - i)).astype(np.float32)


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float,
               beta_schedule: str, trained_betas=None) -> np.ndarray:
    """β_t for t = 0..T−1, float32. `scaled_linear` (SD v1): √β evenly spaced, then squared."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=np.float32)
    if beta_schedule == "linear":
        return linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    raise ValueError(f"beta_schedule {beta_schedule!r} is not implemented; "
                     "use 'scaled_linear' (SD v1), 'linear' or trained_betas")


def cumulative_alphas(betas: np.ndarray) -> np.ndarray:
    """ᾱ_t = ∏_{s≤t} (1 − β_s), float32; the product runs in float64, as torch.cumprod does."""
    alphas = np.float32(1) - betas
    return np.cumprod(alphas, dtype=np.float64).astype(np.float32)


def sigmas_from(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t), float32, ascending in t.

    (torch's float32 sqrt is off by 1 ulp from np.sqrt on ~20% of these: 6e-8, harmless.)
    """
    return np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod)


def spaced_timesteps(n: int, spacing: str, num_train_timesteps: int, steps_offset: int = 0,
                     round_linspace: bool = True) -> np.ndarray:
    """n of the T training timesteps, descending, float64 (see Lin et al. 2023, Table 2).

    linspace: evenly from T−1 down to 0 (rounded to integers unless `round_linspace=False`,
              as the σ-samplers have it: 999, 946.4, ...)
    leading:  multiples of T//n, plus `steps_offset` (SD v1: 1, so 981, 961, ..., 1 for n=50)
    trailing: from T−1 down in strides of T/n (999, 979, ..., 19 for n=50)
    """
    T = num_train_timesteps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n)
        return (t.round() if round_linspace else t)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (T // n) + steps_offset)[::-1].astype(np.float64)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not one of {SPACINGS}")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n noise levels from σ_max down to σ_min, evenly spaced in σ^(1/ρ) (Karras et al. 2022, eq. 5):

        σ_i = (σ_max^(1/ρ) + i/(n−1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ

    ρ = 7 spends more steps at low noise, where the detail is decided.
    """
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each σ: linear interpolation of log σ_t between training steps.

    `log_sigmas` (T,) is log σ_t of the training table, ascending; float32 as diffusers has it,
    which sets the rounding of the weights. Returns float64, same shape as `sigmas`.
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.searchsorted(log_sigmas, log_sigma, side="right") - 1   # last t with log σ_t ≤ log σ
    low = np.clip(low, 0, len(log_sigmas) - 2)
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = np.clip(w, 0, 1)
    return (1 - w) * low + w * (low + 1)
