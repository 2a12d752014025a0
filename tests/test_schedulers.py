"""Samplers against diffusers' schedulers, built as a diffusers user builds them:
`Cls.from_config(PNDMScheduler.from_pretrained(<SD v1.5 scheduler folder>).config, **extra)`."""
import numpy as np
import pytest

from tinysd import schedule
from tinysd.schedulers import SCHEDULERS, SD15_CONFIG, canonical_name, make_scheduler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # diffusers' np.array(tensor)

TWINS = {  # name -> (diffusers class name, from_config extras)
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
NOISY = ("ddpm", "ddim", "euler_a", "lcm", "tcd")   # samplers whose step draws from the generator
STEPS = (1, 4, 20, 50)
SHAPE = (1, 4, 8, 8)


def test_every_name_has_a_twin():
    assert set(TWINS) == set(SCHEDULERS)


def reference(name):
    cls_name, extra = TWINS[name]
    pndm = diffusers.PNDMScheduler.from_pretrained(str(SD15_CONFIG.parent))
    return getattr(diffusers, cls_name).from_config(pndm.config, **extra)


class TorchGen:
    """tinysd's generator interface (.randn(shape) -> float32) over a torch CPU generator."""

    def __init__(self, seed):
        self.g = torch.Generator("cpu").manual_seed(seed)

    def randn(self, shape):
        return torch.randn(shape, generator=self.g).numpy()


def rel_err(ours, ref):
    ref = np.asarray(ref, dtype=np.float64)
    return np.abs(np.asarray(ours, dtype=np.float64) - ref).max() / max(np.abs(ref).max(), 1e-6)


def test_tables_bit_exact():
    """β and ᾱ equal torch's float32 tables exactly, including torch.linspace's rounding."""
    ref = reference("ddim")
    ours = make_scheduler("ddim")
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    for args in [(0.0001, 0.02, 1000), (0.3, 0.7, 7), (0.00085**0.5, 0.012**0.5, 1001)]:
        np.testing.assert_array_equal(schedule.linspace_f32(*args),
                                      torch.linspace(*args, dtype=torch.float32).numpy())


@pytest.mark.parametrize("name", list(TWINS))
@pytest.mark.parametrize("n", STEPS)
def test_timesteps(name, n):
    ours, ref = make_scheduler(name), reference(name)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_t.dtype
    if name in ("lms_karras", "euler_karras"):
        # fractional t from log σ; torch's AVX-512 float32 sqrt is 1 ulp off on ~20% of the σ table
        np.testing.assert_allclose(ours.timesteps, ref_t, rtol=0, atol=1e-4)
    else:
        np.testing.assert_array_equal(ours.timesteps, ref_t)
    if hasattr(ours, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-6)
    assert ours.order == ref.order
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)


def fake_unet(x, t, a):
    """A deterministic stand-in for the UNet's ε: tanh(x·a + t/1000)."""
    return np.tanh(x * a + np.float32(t) / 1000).astype(np.float32)


def run_both(name, n, seed=0, eta=None, begin=None, make_gen=TorchGen):
    """Run our loop and diffusers' side by side from the same latents; yield per-step results."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.5, SHAPE).astype(np.float32)
    ours, ref = make_scheduler(name), reference(name)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    timesteps = ours.timesteps
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    if begin is None:                          # text-to-image: pure noise
        x = noise * np.float32(ours.init_noise_sigma)
        x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    else:                                      # image-to-image: noise a clean latent to timesteps[begin]
        x0 = rng.standard_normal(SHAPE).astype(np.float32) * 0.5
        timesteps = timesteps[begin:]
        t0 = timesteps[:1]
        for s in (ours, ref):
            if hasattr(ref, "set_begin_index"):
                s.set_begin_index(begin)
        x = ours.add_noise(x0, noise, t0)
        x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t0))
        assert rel_err(x, x_ref) < 1e-6
    gen, gen_ref = make_gen(seed + 1), torch.Generator("cpu").manual_seed(seed + 1)
    ours_kw, ref_kw = {"generator": gen}, {}
    if name in NOISY:
        ref_kw["generator"] = gen_ref
    if eta is not None:
        ours_kw["eta"] = ref_kw["eta"] = eta
    for t in timesteps:
        t_ref = torch.tensor(t)
        inp = ours.scale_model_input(x, t)
        inp_ref = ref.scale_model_input(x_ref, t_ref)
        assert rel_err(inp, inp_ref) < 1e-5
        out = ours.step(fake_unet(inp, t, a), t, x, **ours_kw)
        out_ref = ref.step(torch.from_numpy(fake_unet(inp_ref.numpy(), t, a)), t_ref, x_ref, **ref_kw)
        x0_ref = getattr(out_ref, "pred_original_sample", None)
        if name.startswith("dpmpp"):
            x0_ref = ref.model_outputs[-1]      # DPM-Solver++ keeps its x̂₀ there
        if name == "lcm":
            x0_ref = out_ref.denoised           # LCM's x̂₀ with the boundary condition
        yield out, out_ref.prev_sample, x0_ref
        x, x_ref = out.prev_sample, out_ref.prev_sample


@pytest.mark.parametrize("name", list(TWINS))
@pytest.mark.parametrize("n", STEPS)
def test_loop_matches_diffusers(name, n):
    steps = 0
    for out, prev_ref, x0_ref in run_both(name, n):
        assert out.prev_sample.dtype == np.float32 and out.pred_original_sample.dtype == np.float32
        assert rel_err(out.prev_sample, prev_ref) < 1e-5, f"step {steps}"
        if x0_ref is not None:
            assert rel_err(out.pred_original_sample, x0_ref) < 1e-5, f"step {steps}"
        steps += 1
    s = make_scheduler(name)
    s.set_timesteps(n)
    assert steps == len(s.timesteps)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_eta(eta):
    last = None
    for out, prev_ref, x0_ref in run_both("ddim", 20, eta=eta):
        assert rel_err(out.prev_sample, prev_ref) < 1e-5
        assert rel_err(out.pred_original_sample, x0_ref) < 1e-5
        last = out.prev_sample
    no_noise = [o.prev_sample for o, _, _ in run_both("ddim", 20, eta=0.0)][-1]
    assert (np.abs(last - no_noise).max() > 1e-3) == (eta > 0)   # η > 0 does draw noise


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "lcm", "tcd"])
def test_ancestral_noise_depends_on_seed(name):
    a = [o.prev_sample for o, _, _ in run_both(name, 4, seed=0)][-1]
    b = [o.prev_sample for o, _, _ in run_both(name, 4, seed=0)][-1]
    c = [o.prev_sample for o, _, _ in run_both(name, 4, seed=5)][-1]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "lcm", "tcd"])
def test_seeded_with_tinysd_rng(name):
    """The same seed through tinysd.rng.Generator gives diffusers' picture."""
    rng = pytest.importorskip("tinysd.rng")
    for out, prev_ref, _ in run_both(name, 20, make_gen=rng.Generator):
        assert rel_err(out.prev_sample, prev_ref) < 1e-5


@pytest.mark.parametrize("name", list(TWINS))
def test_img2img_from_begin_index(name):
    """add_noise at timesteps[begin] and the loop from there, as diffusers' img2img runs it."""
    n = 10
    begin = 4 * make_scheduler(name).order
    for out, prev_ref, x0_ref in run_both(name, n, begin=begin):
        assert rel_err(out.prev_sample, prev_ref) < 1e-5


@pytest.mark.parametrize("name", list(TWINS))
def test_add_noise(name):
    ours, ref = make_scheduler(name), reference(name)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    rng = np.random.default_rng(3)
    x0, noise = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = ours.timesteps[[0, 7]]
    x = ours.add_noise(x0, noise, t)
    x_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    assert x.dtype == np.float32
    assert rel_err(x, x_ref) < 1e-6


@pytest.mark.parametrize("alias, name", [
    ("DPM++ 2M Karras", "dpmpp_2m_karras"), ("dpm++ 2m", "dpmpp_2m"), ("Euler a", "euler_a"),
    ("EULER", "euler"), ("LMS Karras", "lms_karras"), ("PLMS", "pndm"), ("k_euler_a", "euler_a"),
    ("EulerAncestralDiscreteScheduler", "euler_a"), ("DPMSolverMultistepScheduler", "dpmpp_2m"),
    ("pndmscheduler", "pndm"), ("Heun", "heun"), ("euler-karras", "euler_karras"),
    ("LCM", "lcm"), ("LCMScheduler", "lcm"), ("TCD", "tcd"), ("TCDScheduler", "tcd"),
])
def test_names(alias, name):
    assert canonical_name(alias) == name
    s = make_scheduler(alias)
    cls, extra = SCHEDULERS[name]
    assert type(s) is cls
    assert getattr(s.config, "use_karras_sigmas", False) == extra.get("use_karras_sigmas", False)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        make_scheduler("euler_b")
    assert "euler_b" in str(e.value)
    for name in SCHEDULERS:
        assert name in str(e.value)


def test_bad_config_and_steps():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_scheduler("euler", {"beta_schedule": "cosine"})
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("ddim", {"prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="skip_prk_steps"):
        make_scheduler("pndm", {"skip_prk_steps": False})
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_scheduler("euler", {"timestep_spacing": "uniform"})
    s = make_scheduler("euler")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(np.zeros(SHAPE), 999.0, np.zeros(SHAPE))
    for n in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(n)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="shape"):
        s.step(np.zeros((1, 4, 8, 8)), s.timesteps[0], np.zeros((1, 4, 8, 9)))
    with pytest.raises(ValueError, match="timestep"):
        s.scale_model_input(np.zeros(SHAPE), 123.0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_scheduler("ddim", "/nowhere/scheduler_config.json")


def test_config_keys_follow_diffusers_from_config():
    """A key in the file is inherited (here trailing spacing); a key left out takes the class default."""
    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
           "steps_offset": 1, "timestep_spacing": "trailing"}
    for name in ("euler", "ddim", "dpmpp_2m"):
        cls_name, extra = TWINS[name]
        ref = getattr(diffusers, cls_name).from_config(cfg, **extra)
        ours = make_scheduler(name, cfg)
        ref.set_timesteps(7)
        ours.set_timesteps(7)
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


# LCM and TCD: the distillation grid, strength, γ


@pytest.mark.parametrize("name", ["lcm", "tcd"])
@pytest.mark.parametrize("n, strength, original", [(4, 1.0, 50), (8, 0.5, 50), (1, 0.3, 50), (25, 1.0, 50),
                                                   (6, 0.75, 20), (3, 1.0, 1000), (10, 0.99, 37)])
def test_consistency_timesteps_with_strength_and_grid(name, n, strength, original):
    """set_timesteps(n, strength) as diffusers' LCM pipelines call it for img2img, on grids of
    `original_inference_steps` points (50 by default; others from the scheduler config)."""
    cfg = dict(reference(name).config, original_inference_steps=original)
    ours, ref = make_scheduler(name, cfg), getattr(diffusers, TWINS[name][0]).from_config(cfg)
    ours.set_timesteps(n, strength=strength)
    ref.set_timesteps(n, strength=strength)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())


def test_lcm_four_steps_and_scalings():
    s = make_scheduler("lcm")
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 759, 499, 259]
    ref = reference("lcm")
    for t in (0, 1, 19, 259, 999):
        ours = s.boundary_condition_scalings(t)
        theirs = ref.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        np.testing.assert_array_equal(np.float32(ours), np.float32([float(x) for x in theirs]))
    assert s.boundary_condition_scalings(0) == (1.0, 0.0)        # f(x, 0) = x: the boundary condition


@pytest.mark.parametrize("eta", [0.0, 0.1, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("n", [2, 4, 8, 50])
def test_tcd_gamma(eta, n):
    """γ sets the intermediate s = ⌊(1−γ) t'⌋ (float32, as torch) and the re-noising; 0 draws nothing."""
    last = None
    for out, prev_ref, _ in run_both("tcd", n, eta=eta):
        assert rel_err(out.prev_sample, prev_ref) < 1e-5
        last = out.prev_sample
    no_noise = [o.prev_sample for o, _, _ in run_both("tcd", n, eta=0.0)][-1]
    if n > 1:
        assert (np.abs(last - no_noise).max() > 1e-3) == (eta > 0)


def test_lcm_noise_comes_from_the_generator_in_diffusers_order():
    """n − 1 draws of the latent's shape (none on the last step), from the same stream."""
    draws = []

    class Recorder:
        def randn(self, shape):
            draws.append(tuple(shape))
            return np.zeros(shape, np.float32)

    s = make_scheduler("lcm")
    s.set_timesteps(4)
    x = np.ones(SHAPE, np.float32)
    for t in s.timesteps:
        x = s.step(np.zeros(SHAPE, np.float32), t, x, generator=Recorder()).prev_sample
    assert draws == [SHAPE] * 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_inference_steps=51), "original_inference_steps 50"),
    (dict(num_inference_steps=30, strength=0.5), "strength 0.5 leaves 25"),
    (dict(num_inference_steps=4, strength=0.0), "strength must be in"),
])
def test_lcm_bad_steps(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler("lcm").set_timesteps(**kwargs)
    s = make_scheduler("tcd")
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="gamma"):
        s.step(np.zeros(SHAPE), s.timesteps[0], np.zeros(SHAPE), eta=1.5)
