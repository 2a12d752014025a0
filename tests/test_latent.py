"""tinysd.latent (slerp, prompt mixing, context and noise arithmetic) and the live controls of
notebooks/_live.py, run headlessly: each callback draws pictures for a few values, the static
grid has one row per control, and the widget panel redraws when a control moves."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import geometric_slerp

import tinysd
from tinysd.latent import (attribute_direction, context_direction, embed, gaussian_radius, lerp, mix_embeds,
                           renormalize, seed_noise, slerp, word_direction)
from tinysd.rng import Generator
from tinysd.weights import PACKAGED

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3           # enough to exercise the loop; the pictures' quality is not under test here


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """The shapes model's matrices are too small for BLAS threads to pay; on a busy machine their
    spinning makes these tests 10-20× slower (tests/test_notebooks.py sets OPENBLAS_NUM_THREADS=1
    for the same reason). threadpoolctl, where installed, limits them here."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def sd():
    if not (PACKAGED["shapes"] / "model_index.json").exists():
        pytest.skip("the packaged shapes model is absent")
    return tinysd.load("shapes", backend="numpy")


@pytest.fixture(scope="module")
def live(monkeypatch_module):
    """notebooks/_live.py, imported as the notebooks import it (matplotlib without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        spec = importlib.util.spec_from_file_location("notebook_live", ROOT / "notebooks" / "_live.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["notebook_live"] = module          # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "notebooks"))
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def unit(v):
    return v / np.linalg.norm(v)


# -- slerp ----------------------------------------------------------------------------------------------
def test_slerp_endpoints_and_dtype():
    a, b = Generator(0).randn((1, 4, 8, 8)), Generator(1).randn((1, 4, 8, 8))
    np.testing.assert_allclose(slerp(a, b, 0.0), a, rtol=0, atol=1e-6)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, rtol=0, atol=1e-6)
    assert slerp(a, b, 0.3).dtype == np.float32 and slerp(a, b, 0.3).shape == a.shape
    path = slerp(a, b, np.linspace(0, 1, 5))
    assert path.shape == (5, 1, 4, 8, 8)
    np.testing.assert_allclose(path[2], slerp(a, b, 0.5), rtol=0, atol=1e-7)
    assert slerp(a.astype(np.float64), b.astype(np.float64), 0.5).dtype == np.float64


@pytest.mark.parametrize("n", [3, 16, 256])
def test_slerp_matches_scipy_geometric_slerp_on_unit_vectors(n):
    """scipy.spatial.geometric_slerp walks the great circle of the unit sphere: an independent computation."""
    rng = np.random.default_rng(n)
    a, b = unit(rng.standard_normal(n)), unit(rng.standard_normal(n))
    ts = np.linspace(0, 1, 11)
    np.testing.assert_allclose(slerp(a, b, ts), geometric_slerp(a, b, ts), rtol=0, atol=1e-12)


def test_slerp_of_equal_norms_rotates_at_constant_speed_and_keeps_the_norm():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(64), rng.standard_normal(64)
    b *= np.linalg.norm(a) / np.linalg.norm(b)
    theta = np.arccos(a @ b / (a @ a))
    for t in (0.1, 0.25, 0.5, 0.9):
        v = slerp(a, b, t)
        assert np.linalg.norm(v) == pytest.approx(np.linalg.norm(a), rel=1e-12)
        assert np.arccos(np.clip(unit(v) @ unit(a), -1, 1)) == pytest.approx(t * theta, rel=1e-9)


def test_gaussian_noise_norms_slerp_keeps_them_lerp_shrinks_the_midpoint():
    """n standard normals have norm ≈ √n; the lerp midpoint of two draws ≈ √(n/2), slerp's ≈ √n."""
    n = 4 * 64 * 64
    a, b = Generator(0).randn((200, n)), Generator(1).randn((200, n))
    norms = np.linalg.norm(a, axis=1)
    assert gaussian_radius((4, 64, 64)) == pytest.approx(np.sqrt(n))
    assert abs(norms.mean() / np.sqrt(n) - 1) < 0.002 and norms.std() < 1.0
    mid_lerp = np.linalg.norm(lerp(a, b, 0.5), axis=1)
    mid_slerp = np.array([np.linalg.norm(slerp(x, y, 0.5)) for x, y in zip(a, b)])
    assert abs(mid_lerp.mean() / np.sqrt(n / 2) - 1) < 0.01
    assert abs(mid_slerp.mean() / np.sqrt(n) - 1) < 0.01
    ends = (norms + np.linalg.norm(b, axis=1)) / 2
    assert np.abs(mid_slerp / ends - 1).max() < 0.02


def test_slerp_falls_back_to_lerp_for_nearly_parallel_vectors():
    a = Generator(0).randn((1, 4, 8, 8))
    b = a * 1.5 + 1e-4 * Generator(1).randn(a.shape)          # cos θ ≈ 1
    for t in (0.0, 0.3, 1.0):
        np.testing.assert_array_equal(slerp(a, b, t), lerp(a, b, t))
    np.testing.assert_array_equal(slerp(a, a, 0.5), a)
    zero = np.zeros_like(a)
    assert np.isfinite(slerp(zero, a, 0.5)).all()
    np.testing.assert_allclose(slerp(a, -a, 0.25), 0.5 * a, atol=1e-6)   # antiparallel: the straight line


def test_slerp_along_an_axis_is_slerp_of_each_row():
    a, b = Generator(0).randn((2, 5, 16)), Generator(1).randn((2, 5, 16))
    rows = slerp(a, b, 0.4, axis=-1)
    for i in range(2):
        for j in range(5):
            np.testing.assert_allclose(rows[i, j], slerp(a[i, j], b[i, j], 0.4), rtol=1e-6, atol=1e-7)


def test_interpolation_arguments_are_checked():
    a = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(3, 2\)"):
        slerp(a, np.zeros((3, 2)), 0.5)
    with pytest.raises(ValueError, match="1-D array"):
        lerp(a, a, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="finite"):
        slerp(a, a, np.nan)
    with pytest.raises(ValueError, match="batch, tokens, width"):
        mix_embeds(a, a, 0.5)


def test_renormalize_and_attribute_direction():
    z = Generator(0).randn((3, 4, 8, 8)) * np.array([0.5, 1.0, 2.0], np.float32)[:, None, None, None]
    r = renormalize(z)
    np.testing.assert_allclose(np.linalg.norm(r.reshape(3, -1), axis=1), 16.0, rtol=1e-6)
    np.testing.assert_allclose(r[0] / np.linalg.norm(r[0]), z[0] / np.linalg.norm(z[0]), atol=1e-6)
    with pytest.raises(ValueError, match="zero sample"):
        renormalize(np.zeros((1, 4)))
    with_, without = Generator(1).randn((5, 4, 2, 2)), Generator(2).randn((3, 4, 2, 2))
    d = attribute_direction(with_, without)
    assert d.shape == (1, 4, 2, 2)
    np.testing.assert_allclose(d[0], with_.mean(0) - without.mean(0), rtol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        attribute_direction(with_[:0], without)


# -- contexts and the pipeline ---------------------------------------------------------------------------
def test_seed_noise_is_the_pipelines_start_noise(sd):
    z = seed_noise(sd, 7)
    assert z.shape == (1, 4, 8, 8)
    kw = dict(num_inference_steps=STEPS, output_type="latent", scheduler="euler")     # init_noise_sigma ≠ 1
    np.testing.assert_array_equal(sd("a red circle", latents=z, **kw).images, sd("a red circle", seed=7, **kw).images)
    assert seed_noise(sd, 7, 128, 64).shape == (1, 4, 16, 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        seed_noise(sd, 0, 60)


def test_mix_embeds_shapes_and_endpoints(sd):
    a, b = embed(sd, "a red circle on the left"), embed(sd, "a blue square on the right")
    width = sd.unet.config["cross_attention_dim"]
    assert a.shape == (1, 77, width) and a.dtype == np.float32
    for spherical in (False, True):
        np.testing.assert_allclose(mix_embeds(a, b, 0.0, spherical), a, atol=1e-6)
        np.testing.assert_allclose(mix_embeds(a, b, 1.0, spherical), b, atol=1e-6)
        assert mix_embeds(a, b, np.linspace(0, 1, 4), spherical).shape == (4, 1, 77, width)
    np.testing.assert_allclose(mix_embeds(a, b, 0.25), 0.75 * a + 0.25 * b, rtol=1e-6, atol=1e-6)
    row_norms = np.linalg.norm(mix_embeds(a, b, 0.5, spherical=True), axis=-1)
    ends = (np.linalg.norm(a, axis=-1) + np.linalg.norm(b, axis=-1)) / 2
    assert np.abs(row_norms / ends - 1).max() < 0.05


def test_prompt_embeds_mixed_at_the_ends_give_the_prompts_pictures(sd):
    """sd(prompt_embeds=mix(...)) at t = 0 is sd(prompt_a), at t = 1 sd(prompt_b), same seed."""
    pa, pb = "a red circle on the left", "a blue square on the right"
    a, b = embed(sd, pa), embed(sd, pb)
    kw = dict(num_inference_steps=STEPS, seed=3, output_type="np")
    for t, prompt in ((0.0, pa), (1.0, pb)):
        for spherical in (False, True):
            mixed = sd(prompt_embeds=mix_embeds(a, b, t, spherical), **kw).images
            np.testing.assert_allclose(mixed, sd(prompt, **kw).images, rtol=0, atol=1e-6)
    half = sd(prompt_embeds=mix_embeds(a, b, 0.5), **kw).images
    assert np.abs(half - sd(pa, **kw).images).mean() > 1e-3


def test_context_direction_is_per_token_and_checks_alignment(sd):
    templates = ["a {} square", "a {} star on the left"]
    d = word_direction(sd, "red", "blue", templates)
    assert d.shape == (1, 77, sd.unet.config["cross_attention_dim"])
    assert np.abs(d[0, :2]).max() == 0          # causal: rows before the word do not change
    assert np.abs(d[0, 2]).max() > 0
    expected = np.mean([embed(sd, t.format("blue")) - embed(sd, t.format("red")) for t in templates], axis=0)
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-6)
    # with the prompt itself as the one template, the arithmetic lands exactly on the target prompt
    edited = embed(sd, "a red circle") + word_direction(sd, "red", "blue", "a {} circle")
    np.testing.assert_allclose(edited, embed(sd, "a blue circle"), atol=1e-5)
    assert np.abs(word_direction(sd, "red", "red", templates)).max() == 0
    with pytest.raises(ValueError, match="do not align"):
        context_direction(sd, ["a red square"], ["a dark blue square"])
    with pytest.raises(ValueError, match="exactly once"):
        word_direction(sd, "red", "blue", ["a square"])
    with pytest.raises(ValueError, match="as many target prompts"):
        context_direction(sd, ["a red square"], [])


# -- live controls, headless -----------------------------------------------------------------------------
def assert_picture(picture, size=64):
    picture = np.asarray(picture)
    assert picture.shape == (size, size, 3) and np.isfinite(picture).all()


def scene():
    """A 64×64 picture to start img2img from: a blue square on white."""
    picture = np.full((64, 64, 3), 245, np.uint8)
    picture[20:44, 10:34] = (30, 60, 220)
    return picture


def test_redraw_callback_draws_for_every_control(sd, live):
    redraw = live.Redraw(sd, "a red circle on the left", "a blue square on the right", scene())
    base = dict(guidance_scale=7.5, num_inference_steps=STEPS, scheduler="ddim", seed=0, strength=1.0, mix=0.0)
    first = redraw(**base)
    assert_picture(first)
    kw = dict(num_inference_steps=STEPS, scheduler="ddim", seed=0, output_type="np")
    np.testing.assert_allclose(first, sd("a red circle on the left", **kw).images[0], atol=1e-6)
    np.testing.assert_allclose(redraw(**{**base, "mix": 1.0}), sd("a blue square on the right", **kw).images[0],
                               atol=1e-6)
    for name, value in [("guidance_scale", 1.0), ("num_inference_steps", STEPS + 2), ("scheduler", "euler_a"),
                        ("seed", 1), ("strength", 0.7), ("mix", 0.5)]:
        picture = redraw(**{**base, name: value})
        assert_picture(picture)
        assert np.abs(picture - first).mean() > 1e-4, f"changing {name} to {value} did not change the picture"
    with pytest.raises(ValueError, match="needs the picture"):
        live.Redraw(sd, "a", "b")(strength=0.5, num_inference_steps=STEPS)


def test_denoising_steps_callback(sd, live):
    steps = live.DenoisingSteps(sd, "a yellow star", seed=0, num_inference_steps=STEPS)
    assert len(steps) == STEPS
    pictures = [steps(i) for i in range(STEPS)]
    for picture, caption in pictures:
        assert_picture(picture)
        assert caption.startswith("x̂₀ at t=")
    assert np.abs(pictures[0][0] - pictures[-1][0]).mean() > 1e-4
    np.testing.assert_allclose(steps(STEPS - 1)[0], sd.decode(steps.latents[-1])[0])


def test_word_maps_callback(live):
    attention = np.abs(Generator(0).randn((8, 8, 77)))
    attention /= attention.sum(-1, keepdims=True)
    maps = live.WordMaps(attention, ["a</w>", "blue</w>", "square</w>"])
    choice = maps.choice()
    assert choice.values == [1, 2, 3, 4] and choice.labels == ["1: a</w>", "2: blue</w>", "3: square</w>",
                                                               "4: <|endoftext|>"]
    rows = live.static_grid(maps, {"word": choice})
    assert [title for _, title in rows[0][1]] == [f"{label}\n{attention[:, :, i].mean():.1%} of attention"
                                                  for i, label in zip(choice.values, choice.labels)]
    for (picture, _), i in zip(rows[0][1], choice.values):
        np.testing.assert_array_equal(picture, attention[:, :, i])
        assert live.to_rgb(picture).shape == (8, 8, 3)
    assert live.png(maps(2)[0])[:4] == b"\x89PNG"


def test_static_grid_has_a_row_per_control(live):
    calls = []

    def draw(a, b):
        calls.append((a, b))
        return np.full((4, 4), a + b, np.float32), f"sum {a + b}"

    rows = live.static_grid(draw, {"a": live.Choice([1, 2, 3]), "b": live.Choice([10, 20], default=20)})
    assert [name for name, _ in rows] == ["a", "b"]
    assert [title for _, title in rows[0][1]] == ["a=1\nsum 21", "a=2\nsum 22", "a=3\nsum 23"]
    assert calls == [(1, 20), (2, 20), (3, 20), (1, 10), (1, 20)]
    assert live.live(draw, static=True, a=[1, 2], b=live.Choice([10])) is None     # shows the grid, returns nothing
    assert live.to_rgb(np.zeros((4, 4))).shape == (4, 4, 3) and live.to_rgb(np.ones((2, 2, 3))).max() == 255


def test_static_when_asked_or_without_a_kernel(live, monkeypatch):
    monkeypatch.setenv(live.STATIC_ENV, "1")
    assert not live.widgets_available()
    monkeypatch.delenv(live.STATIC_ENV)
    assert not live.widgets_available()          # pytest is no IPython kernel


def test_widget_panel_redraws_when_a_control_moves(sd, live):
    pytest.importorskip("ipywidgets")
    redraw = live.Redraw(sd, "a red circle on the left", "a blue square on the right", scene())
    panel = live.live(redraw, static=False, guidance_scale=live.Choice([1.0, 7.5], default=7.5),
                      num_inference_steps=live.Choice([1, STEPS], default=STEPS), scheduler=["ddim", "euler"],
                      seed=live.Choice(range(4)), strength=live.Choice([0.5, 1.0], default=1.0),
                      mix=live.Choice([0.0, 0.5, 1.0]))
    assert isinstance(panel, live.Panel)
    assert type(panel.controls["seed"]).__name__ == "SelectionSlider"
    assert type(panel.controls["scheduler"]).__name__ == "Dropdown"
    first = panel.image.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and panel.caption.value.endswith(" s)")
    seen = {first}
    for name, value in [("seed", 2), ("mix", 1.0), ("scheduler", "euler"), ("strength", 0.5)]:
        panel.controls[name].value = value
        assert panel.image.value not in seen, f"moving {name} did not redraw"
        seen.add(panel.image.value)
    panel.controls["num_inference_steps"].value = 1          # strength 0.5 of 1 step leaves none: said, not raised
    assert panel.caption.value.startswith("cannot draw this") and panel.image.value in seen
    assert "application/vnd.jupyter.widget-view+json" in panel._repr_mimebundle_()


def test_choice_defaults_and_checks(live):
    c = live.Choice([1.0, 3.0, 7.5, 15.0], default=7.5)
    assert c.grid == [1.0, 3.0, 7.5, 15.0] and c.label(7.5) == "7.5"
    assert live.Choice(range(21)).grid == [0, 5, 10, 15, 20]
    with pytest.raises(ValueError, match="not one of the values"):
        live.Choice([1, 2], default=3)
