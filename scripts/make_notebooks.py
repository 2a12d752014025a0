"""Write the read-along notebooks in notebooks/ and execute them in place, keeping their outputs.

    python scripts/make_notebooks.py                  # all of them
    python scripts/make_notebooks.py 03 05            # those whose file name starts so
    python scripts/make_notebooks.py --no-execute     # sources only (outputs dropped)

The notebooks are defined here, cell by cell, so a change to one is a reviewable diff of Python
text; the .ipynb files are the generated, executed result a reader opens (with pictures).
They run on SD v1.5 where it is already downloaded, else on the packaged "shapes" model
(notebooks/_model.py; TINYSD_NOTEBOOK_MODEL=shapes forces it). tests/test_notebooks.py checks
that the committed files match these sources and that each runs top to bottom.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


def md(*parts):
    return ("markdown", "\n\n".join(textwrap.dedent(p).strip() for p in parts))


def code(text):
    return ("code", textwrap.dedent(text).strip())


SETUP = code("""
    import numpy as np
    import matplotlib.pyplot as plt
    from _model import load_demo, photo, show

    demo = load_demo()
    sd = demo.sd
    print(demo.describe())
""")

MODEL_NOTE = """
The first cell loads the model: SD v1.5 if it is in your Hugging Face cache (nothing is
downloaded), else the "shapes" model that ships with tinysd: SD v1's architecture, narrower,
trained by this project on 64×64 pictures of coloured shapes (`training/`). It draws a picture
in about a second from captions like "a red circle on the left": the colour and the shape
follow the prompt, the position only some of the time. `demo.prompt(sd15_text, shapes_text)`
picks the prompt the running model can draw.
"""

NOTEBOOKS = {}

NOTEBOOKS["01_tokenizer_and_text_encoder.ipynb"] = [
    md("""
    # 1 · Tokenizer and text encoder

    Stable Diffusion reads the prompt in two moves. The **tokenizer** cuts the text into
    byte-pair-encoding (BPE) pieces and numbers them; CLIP's **text transformer** turns the 77
    numbers into 77 vectors, the *context* that every cross-attention layer of the U-Net reads.

        prompt ──tokenizer──> ids (77) ──CLIP text transformer──> context (77 × D)

    D is 768 for SD v1. Code: `tinysd/tokenizer.py`, `tinysd/text_encoder.py`.
    """, MODEL_NOTE),
    SETUP,
    md("""
    ## BPE pieces

    CLIP lower-cases the text, splits it into words and punctuation, then merges the bytes of
    each word pair by pair, in the order of the 48 894 merges it learned. Common words end up as
    one piece, rare ones as several. `</w>` marks the end of a word.
    """),
    code("""
    prompt = demo.prompt("A photograph of an astronaut riding a horse, trending on ArtStation",
                         "a small blue square above a green triangle on a black background")
    pieces = sd.tokenizer.tokenize(prompt)
    ids = sd.tokenizer(prompt)              # (1, 77) int64: start, the pieces' ids, end, padding
    for piece, i in zip(pieces, ids[0, 1:]):
        print(f"{piece:>12} -> {i}")
    """),
    md("""
    ## 77 positions, most of them padding

    Every prompt becomes exactly 77 ids: `<|startoftext|>`, the pieces, `<|endoftext|>`, and
    then padding up to 77. SD v1 pads with the end token itself. The empty prompt, which
    classifier-free guidance uses as the "unconditional" text, is start, end and 75 pads.
    """),
    code("""
    tok = sd.tokenizer
    n = len(pieces)
    print("first 20 ids:", ids[0, :20].tolist())
    print(f"start {tok.bos_token_id}, end {tok.eos_token_id}, padding {tok.pad_token_id}")
    print(f"{n} pieces + start + end = {n + 2} real positions, {77 - n - 2} padding")
    print("decoded:", repr(tok.decode(ids[0], skip_special_tokens=True)))
    print("empty prompt:", tok("")[0, :6].tolist(), "...")

    kind = np.full(77, 3)                   # 0 start, 1 piece, 2 end, 3 padding
    kind[0], kind[1:n + 1], kind[n + 1] = 0, 1, 2
    colors = plt.matplotlib.colors.ListedColormap(["tab:green", "tab:blue", "tab:red", "lightgray"])
    fig, ax = plt.subplots(figsize=(10, 1.1))
    ax.imshow(kind[None], cmap=colors, vmin=0, vmax=3, aspect="auto")
    ax.set_yticks([])
    ax.set_xlabel("position")
    ax.set_title("start (green) · pieces (blue) · end (red) · padding (grey)", fontsize=10)
    plt.show()
    """),
    md("""
    Longer prompts keep their first 75 pieces and warn, as transformers' tokenizer does:
    """),
    code("""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        long_ids = tok("a cat on a sofa, " * 20)
    print(long_ids.shape, "|", str(caught[0].message)[:120], "...")
    """),
    md("""
    ## The context: 77 vectors

    The text transformer adds a learned position embedding to each token embedding and runs
    pre-norm transformer layers over the 77 positions. The result, `last_hidden_state`, is the
    context: one row per position.
    """),
    code("""
    context = sd.ops.numpy(sd.text_encoder(ids))   # (1, 77, D); .numpy() whatever the backend
    print("context:", context.shape, context.dtype)

    lim = np.percentile(np.abs(context), 99)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    im = ax.imshow(context[0].T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.axvline(n + 1.5, color="k", lw=1)
    ax.set_xlabel("position (the line: after <|endoftext|>)")
    ax.set_ylabel("channel")
    fig.colorbar(im, ax=ax)
    plt.show()
    """),
    md("""
    ## Padding is not empty

    CLIP's attention is *causal*: position i sees positions ≤ i only. So the first rows of two
    prompts that start alike are identical, and the padding rows, which come last, have seen
    the whole prompt. They are not blank: SD v1 cross-attends to all 77 rows, padding included.
    """),
    code("""
    a, b = demo.prompt(("a cat sitting on a sofa", "a cat sitting on a rocket"),
                       ("a red circle on the left", "a red circle on the right"))
    ctx_a = sd.ops.numpy(sd.text_encoder(tok(a)))[0]
    ctx_b = sd.ops.numpy(sd.text_encoder(tok(b)))[0]
    diff = np.abs(ctx_a - ctx_b).max(axis=1)
    shared = next(i for i, (x, y) in enumerate(zip(tok.tokenize(a), tok.tokenize(b))) if x != y)
    print("shared prefix: start +", shared, "pieces")
    print("max |difference| per row, first 10:", np.round(diff[:10], 4))

    fig, axes = plt.subplots(1, 2, figsize=(12, 3))
    axes[0].bar(range(77), diff)
    axes[0].set_title(f"|context({a!r}) − context({b!r})| per position", fontsize=9)
    axes[0].set_xlabel("position")
    axes[1].plot(np.linalg.norm(context[0], axis=1), ".-")
    axes[1].axvline(n + 1, color="tab:red", lw=1)
    axes[1].set_title("‖context row‖ of the first prompt (red: the end token)", fontsize=9)
    axes[1].set_xlabel("position")
    plt.show()
    """),
    md("""
    ## What the U-Net gets

    With classifier-free guidance the pipeline encodes the empty (or negative) prompt and the
    prompt together and stacks them: a batch of two contexts, [unconditional; conditional].
    """),
    code("""
    both = sd.ops.numpy(sd.encode_prompt(prompt))
    print("encode_prompt:", both.shape, "= [context of '', context of the prompt]")
    print("second row equals the context above:", np.array_equal(both[1], context[0]))
    """),
]

NOTEBOOKS["02_noise_schedules.ipynb"] = [
    md("""
    # 2 · Noise schedules

    Training noises a clean latent x₀ in T = 1000 small steps of variance β_t. The steps
    compose into one closed form, so any noise level is one line away:

    $$x_t = \\sqrt{\\bar\\alpha_t}\\,x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\varepsilon,\\qquad
    \\bar\\alpha_t = \\prod_{s\\le t}(1-\\beta_s),\\qquad \\varepsilon\\sim\\mathcal N(0, I)$$

    The signal-to-noise ratio is SNR(t) = ᾱ_t / (1 − ᾱ_t). SD v1 uses the `scaled_linear`
    schedule: √β evenly spaced from √0.00085 to √0.012, then squared. Code:
    `tinysd/schedule.py` (the tables), `tinysd/schedulers.py` (the samplers).
    """, MODEL_NOTE, """
    Only the scheduler config matters here, and it is the same for both.
    """),
    SETUP,
    md("## β_t, ᾱ_t and the SNR"),
    code("""
    from tinysd.schedule import cumulative_alphas, make_betas
    from tinysd.schedulers import make_scheduler

    ddpm = make_scheduler("ddpm", sd.scheduler_config)   # the model's scheduler_config.json
    cfg = ddpm.config
    print(f"{cfg.beta_schedule}: β from {cfg.beta_start} to {cfg.beta_end}, T = {cfg.num_train_timesteps}")

    t = np.arange(cfg.num_train_timesteps)
    betas = {"scaled_linear (SD v1)": ddpm.betas,
             "linear, same ends": make_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, "linear")}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
    for name, beta in betas.items():
        abar = cumulative_alphas(beta)
        axes[0].plot(t, beta, label=name)
        axes[1].plot(t, abar)
        axes[2].semilogy(t, abar / (1 - abar))
    for ax, title in zip(axes, ["β_t", "ᾱ_t: the signal's share of the variance", "SNR(t) = ᾱ/(1−ᾱ)"]):
        ax.set_title(title)
        ax.set_xlabel("t")
    axes[0].legend()
    plt.show()

    abar = ddpm.alphas_cumprod
    for step in (0, 250, 500, 750, 999):
        print(f"t={step:3d}  ᾱ={abar[step]:.5f}  √ᾱ={abar[step] ** 0.5:.3f}  √(1−ᾱ)={(1 - abar[step]) ** 0.5:.3f}"
              f"  SNR={abar[step] / (1 - abar[step]):.4g}")
    """),
    md("""
    Even at t = 999 the signal keeps √ᾱ ≈ 0.07 of its amplitude: SD v1's last training step is
    not pure noise (a known flaw, Lin et al. 2023, "Common diffusion noise schedules and sample
    steps are flawed"), while sampling starts from pure noise.

    ## A picture noised to several t

    The closed form, applied with the scheduler's `add_noise`. Stable Diffusion noises the
    4-channel *latent*, not pixels; the arithmetic is the same, and pixels are easier to look at.
    """),
    code("""
    from tinysd.pipeline import preprocess_image
    from tinysd.rng import Generator

    x0 = preprocess_image(photo(256))                 # (1, 3, 256, 256) in [-1, 1]
    noise = Generator(0).randn(x0.shape)              # ε, the same for every t
    ts = [0, 100, 200, 300, 500, 999]
    noisy = [ddpm.add_noise(x0, noise, step) for step in ts]
    show([np.clip(x[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) for x in noisy], [f"t = {s}" for s in ts], size=1.5)

    step = 300
    by_hand = np.sqrt(abar[step]) * x0 + np.sqrt(1 - abar[step]) * noise
    print("add_noise equals √ᾱ x₀ + √(1−ᾱ) ε: max |difference| =", np.abs(by_hand - noisy[ts.index(step)]).max())
    """),
    md("""
    ## Variance preserving

    Since √ᾱ² + √(1−ᾱ)² = 1, a signal of unit variance keeps unit variance at every t: that is
    why the VAE's latents are scaled to unit variance (notebook 5). Measured on unit-variance
    data:
    """),
    code("""
    data, eps = Generator(1).randn((1, 4, 64, 64)), Generator(2).randn((1, 4, 64, 64))
    measured = [ddpm.add_noise(data, eps, s).std() for s in t[::50]]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.plot(t, np.sqrt(abar), label="√ᾱ_t (signal)")
    ax.plot(t, np.sqrt(1 - abar), label="√(1−ᾱ_t) (noise)")
    ax.plot(t[::50], measured, "k.", label="std of x_t, measured")
    ax.set_xlabel("t")
    ax.legend()
    plt.show()
    """),
    md("""
    ## Which t a sampler visits

    Sampling walks back down the schedule in a few steps. Each sampler picks its own subset of
    the 1000 training timesteps (σ-samplers may pick fractional ones); `set_timesteps(n)`
    computes them. With SD v1's `leading` spacing and `steps_offset` 1, DDIM and PNDM start at
    t = 901, not 999. PNDM repeats one step (its first is a two-call Heun step) and Heun
    visits every t but the last twice.
    """),
    code("""
    names = ["ddim", "pndm", "euler", "euler_karras", "heun", "dpmpp_2m_karras"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for name in names:
        sampler = make_scheduler(name, sd.scheduler_config)
        sampler.set_timesteps(10)
        ts_ = np.asarray(sampler.timesteps, dtype=float)
        ax.plot(ts_, ".-", label=f"{name} ({len(ts_)} U-Net calls)")
    ax.set_xlabel("U-Net call")
    ax.set_ylabel("t")
    ax.set_title("10 sampler steps")
    ax.legend(fontsize=8)
    plt.show()
    """),
]

NOTEBOOKS["03_inside_the_unet.ipynb"] = [
    md("""
    # 3 · Inside the U-Net

    The U-Net ε_θ(z_t, t, c) predicts the noise in the latent z_t at timestep t, given the
    text context c. It goes down four levels (ResNet blocks, and spatial transformers with
    cross-attention in the first three), through a middle block, and up again, each up level
    concatenating the skip connections kept on the way down. Code: `tinysd/unet.py`,
    `tinysd/resnet.py`, `tinysd/attention.py`.
    """, MODEL_NOTE),
    SETUP,
    md("""
    ## Block by block

    The cell below runs the forward pass one block at a time, exactly as `UNet2DConditionModel.__call__`
    does, printing each output's shape, and checks that the result equals `unet(...)`.
    """),
    code("""
    from tinysd.rng import Generator
    from tinysd.unet import timestep_embedding

    unet = sd.unet
    size = demo.size                                     # 512 px: 64×64 latents; the shapes model's 64 px: 8×8
    latents = Generator(0).randn((1, unet.in_channels, size // 8, size // 8))
    context = sd.encode_prompt(demo.prompt("a cat in space", "a yellow star"), guidance=False)   # (1, 77, D)
    t = 500

    sinusoid = timestep_embedding(np.array([t]), unet.time_proj_dim, unet.flip_sin_to_cos, unet.freq_shift)
    temb = unet.time_embedding(unet.ops.asarray(sinusoid))
    print(f"{'time_embedding':18} {tuple(temb.shape)}")
    h = unet.conv_in(unet.ops.asarray(latents))
    skips = [h]
    print(f"{'conv_in':18} {tuple(h.shape)}")
    for i, block in enumerate(unet.down_blocks):
        h, block_skips = block(h, temb, context)
        skips += block_skips
        print(f"{'down_blocks.%d' % i:18} {str(tuple(h.shape)):18} {type(block).__name__}, keeps {len(block_skips)} skips")
    h = unet.mid_block(h, temb, context)
    print(f"{'mid_block':18} {tuple(h.shape)}")
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        block_skips, skips = skips[-n:], skips[:-n]
        h = block(h, block_skips, temb, context, size=skips[-1].shape[2:] if skips else None)
        print(f"{'up_blocks.%d' % i:18} {str(tuple(h.shape)):18} {type(block).__name__}, used {n} skips")
    eps = unet.conv_out(unet.conv_norm_out(h, silu=True))
    print(f"{'conv_out':18} {tuple(eps.shape)}")

    whole = unet(unet.ops.asarray(latents), t, context)
    print("max |block by block − unet(...)| =", np.abs(sd.ops.numpy(eps) - sd.ops.numpy(whole)).max())
    """),
    md("""
    ## Where the parameters are

    `Module.named_parameters()` walks the tree with the checkpoint's key names;
    `num_parameters()` sums their sizes. SD v1's U-Net has 860 M.
    """),
    code("""
    from tinysd.attention import Transformer2DModel
    from tinysd.resnet import ResnetBlock2D

    counts = {name: child.num_parameters() for name, child in unet.children()}
    total = unet.num_parameters()
    print(f"total {total:,} parameters")
    by_kind = {kind.__name__: sum(m.num_parameters() for m in unet.modules() if isinstance(m, kind))
               for kind in (ResnetBlock2D, Transformer2DModel)}
    for kind, count in by_kind.items():
        print(f"  in {kind:18} {count:>13,}  ({count / total:.0%})")
    print("  a key:", next(k for k, _ in unet.named_parameters() if "attn2.to_k" in k))

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.barh(list(counts)[::-1], list(counts.values())[::-1])
    ax.set_xlabel("parameters")
    plt.show()
    """),
    md("""
    ## The timestep embedding

    t enters as sinusoids of geometrically spaced frequencies (as positions do in "Attention is
    all you need"), cos first for SD v1; an MLP (`time_embedding`) maps them to 4× the base
    width, and every ResNet block adds a projection of it between its two convolutions.

    $$\\mathrm{emb}(t) = [\\cos(t f_0), …, \\cos(t f_{k-1}), \\sin(t f_0), …],\\qquad f_i = 10000^{-i/k}$$
    """),
    code("""
    ts = np.arange(1000)
    emb = timestep_embedding(ts, unet.time_proj_dim, unet.flip_sin_to_cos, unet.freq_shift)   # (1000, dim)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3))
    axes[0].imshow(emb.T, aspect="auto", cmap="RdBu_r", interpolation="nearest")
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("channel (cos half, then sin half)")
    half = unet.time_proj_dim // 2
    for i in (half // 4, half // 2, 3 * half // 4):
        period = 2 * np.pi * 10000 ** (i / half)
        axes[1].plot(ts, emb[:, i], label=f"channel {i}: cos, period {period:.0f}")
    axes[1].set_xlabel("t")
    axes[1].legend(fontsize=8)
    plt.show()
    """),
    md("""
    ## Cross-attention: which pixels look at which word

    In every spatial transformer, `attn2` takes its queries from the latent's pixels and its
    keys and values from the 77 context rows: softmax(QKᵀ/√d) is, for each pixel, a
    distribution over the tokens. To see it, wrap the backend: a subclass whose `attention`
    records that softmax when the keys are 77 text rows, then calls the parent. Setting it with
    `unet.set_backend` changes no model code and copies nothing.
    """),
    code("""
    class CrossAttentionRecorder(type(unet.ops)):
        \"\"\"The model's backend, plus: sum softmax(QKᵀ/√d) of cross-attention calls, per resolution.\"\"\"

        def __init__(self):
            super().__init__()
            self.maps = {}     # number of pixels -> (pixels, 77) attention of the prompt, summed
            self.calls = {}    # (Nq, Nk) -> how many attention calls had that shape

        def attention(self, q, k, v, heads, causal=False):
            key = (q.shape[1], k.shape[1])
            self.calls[key] = self.calls.get(key, 0) + 1
            if k.shape[1] == 77:                            # keys from the text: cross-attention
                self.record(self.numpy(q)[-1], self.numpy(k)[-1], heads)   # last row: the prompt
            return super().attention(q, k, v, heads, causal)

        def record(self, q, k, heads):
            d = q.shape[-1] // heads
            qh = q.reshape(len(q), heads, d).transpose(1, 0, 2)          # (heads, pixels, d)
            kh = k.reshape(len(k), heads, d).transpose(1, 2, 0)          # (heads, d, 77)
            s = qh @ kh / np.sqrt(d)
            p = np.exp(s - s.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            self.maps[len(q)] = self.maps.get(len(q), 0) + p.mean(axis=0)

    prompt = demo.prompt("a red apple on a wooden table", "a blue square above a green triangle")
    recorder = CrossAttentionRecorder()
    original = unet.ops
    unet.set_backend(recorder)
    try:
        image = sd(prompt, num_inference_steps=demo.steps, seed=0, height=size, width=size, output_type="np").images[0]
    finally:
        unet.set_backend(original)
    for (nq, nk), count in sorted(recorder.calls.items(), reverse=True):
        kind = "cross" if nk == 77 else "self"
        print(f"{kind}-attention  {nq:5d} pixels × {nk:4d} keys: {count} calls")
    """),
    md("""
    Averaged over heads, layers and steps at the finest resolution, one map per piece of the
    prompt and one for the end token; bright pixels attend to that token (each map has its own
    colour scale). In Jupyter with ipywidgets (`pip install -e ".[notebooks]"`) a menu of the
    prompt's words picks the map; in the committed file, all of them in a row
    (`notebooks/_live.py`). In trained SD v1 the start token takes much of every pixel's
    attention (a "sink"), and the maps of the nouns outline where their objects are drawn.

    The shapes model's finest cross-attention runs on its 8×8 latent, so each map pixel covers
    8×8 picture pixels: coarse, but readable. There the colour words light up their own object
    ("blue" the blue shape, "green" the green one) and the first "a" the background. (With this
    seed the model drew the two the other way up, and the square star-like: prompts with two
    objects are harder for it than prompts with one, see `training/README.md`.) Since
    CLIP's attention is causal (notebook 1), a later word's row has read the words before it, so
    words such as "triangle" or "above" need not point at their own object only. Most of the
    attention goes to the padding rows, which have read the whole prompt.
    """),
    code("""
    from _live import WordMaps, live

    pieces = sd.tokenizer.tokenize(prompt)
    finest = max(recorder.maps)
    side = int(np.sqrt(finest))
    attn = recorder.maps[finest].reshape(side, side, 77)
    attn = attn / attn.sum(axis=-1, keepdims=True)                   # a distribution per pixel
    print(f"<|startoftext|> takes {attn[:, :, 0].mean():.1%}, the {76 - len(pieces)} padding rows "
          f"{attn[:, :, len(pieces) + 2:].sum(axis=-1).mean():.1%}")
    show([image], ["picture"], size=1.8)
    word_maps = WordMaps(attn, pieces)         # word_maps(word=position) -> (that token's map, its share)
    live(word_maps, word=word_maps.choice())
    """),
]

NOTEBOOKS["04_sampling_loop.ipynb"] = [
    md("""
    # 4 · The sampling loop

    Generation runs the noising of notebook 2 backwards. Start from Gaussian noise z_T; at each
    of the sampler's timesteps the U-Net predicts the noise ε, and the sampler steps to a less
    noisy latent. Classifier-free guidance predicts ε twice per step, without and with the text,
    and extrapolates: ε = ε_uncond + s·(ε_cond − ε_uncond). Code: `StableDiffusion.__call__` and
    `_denoise` in `tinysd/pipeline.py`, the samplers in `tinysd/schedulers.py`.
    """, MODEL_NOTE),
    SETUP,
    md("""
    ## Watching the steps

    `callback(step, t, latents, pred_original_sample)` runs after every step. The sampler's
    x̂₀ = (z_t − √(1−ᾱ_t) ε) / √ᾱ_t is its current guess of the final latent; decoding both the
    latent z_t and x̂₀ shows the picture emerge. DDIM keeps z_t at unit variance, so both decode.
    """),
    code("""
    prompt = demo.prompt("a lighthouse on a cliff at sunset, oil painting", "a blue square above a green triangle")
    seed, steps = 0, demo.steps
    trace = []

    def callback(step, t, latents, pred_original_sample):
        trace.append((t, latents.copy(), pred_original_sample.copy()))

    out = sd(prompt, num_inference_steps=steps, seed=seed, scheduler="ddim", callback=callback, output_type="np")
    ts = [t for t, _, _ in trace]
    z = np.concatenate([lat for _, lat, _ in trace])
    x0 = np.concatenate([x for _, _, x in trace])
    keep = np.linspace(0, steps - 1, min(steps, 5)).round().astype(int)
    # one picture at a time: at 512×512 a decode holds about 1 GB of activations
    show([sd.decode(z[i:i + 1])[0] for i in keep], [f"z_t after t={ts[i]:.0f}" for i in keep], size=2)
    show([sd.decode(x0[i:i + 1])[0] for i in keep], [f"x̂₀ at t={ts[i]:.0f}" for i in keep], size=2)
    print("the last latent decoded is the output:", np.abs(sd.decode(z[-1:])[0] - out.images[0]).max())
    """),
    code("""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.plot(ts, z.std(axis=(1, 2, 3)), ".-", label="std of z_t")
    ax.plot(ts, x0.std(axis=(1, 2, 3)), ".-", label="std of x̂₀")
    ax.invert_xaxis()
    ax.set_xlabel("t (sampling goes right)")
    ax.legend()
    plt.show()
    """),
    md("""
    ## Classifier-free guidance

    The guidance scale s sets how far past the conditional prediction to extrapolate. s = 1 is
    the conditional prediction alone (and skips the unconditional half of the batch); SD v1's
    usual 7.5 trades variety for fidelity to the prompt; very large s over-saturates.
    """),
    code("""
    scales = [1.0, 3.0, 7.5, 15.0]
    pictures = [sd(prompt, num_inference_steps=steps, seed=seed, scheduler="ddim", guidance_scale=s,
                   output_type="np").images[0] for s in scales]
    show(pictures, [f"guidance {s}" for s in scales], size=2.2)
    """),
    md("""
    ## Samplers at equal steps

    Same prompt, seed and number of steps, different samplers. They differ in how they use the
    predictions: DDIM is a deterministic first-order step, PNDM and DPM-Solver++ reuse earlier
    predictions (multistep), Euler ancestral adds fresh noise every step, Heun calls the U-Net
    twice per step. The counts below are U-Net calls (each a batch of two with guidance).
    """),
    code("""
    samplers = ["ddim", "pndm", "euler", "euler_a", "heun", "dpmpp_2m_karras"]
    pictures, calls = [], []
    for name in samplers:
        count = []
        result = sd(prompt, num_inference_steps=steps, seed=seed, scheduler=name, output_type="np",
                    callback=lambda i, t, lat: count.append(i))
        pictures.append(result.images[0])
        calls.append(len(count))
    show(pictures, [f"{n}\\n{c} U-Net calls" for n, c in zip(samplers, calls)], size=1.9)
    """),
]

NOTEBOOKS["05_vae.ipynb"] = [
    md("""
    # 5 · The VAE: pixels ↔ latents

    The diffusion runs on latents 8× smaller than the picture on each side, with 4 channels:
    for 512×512×3 pixels, 64×64×4 numbers, 48× fewer. The VAE's encoder maps a picture to a
    Gaussian q(z|x) (a mean and a standard deviation per latent value); its decoder maps a latent
    back to pixels. The pipeline multiplies the encoded latent by 0.18215 and divides by it
    before decoding, so the diffusion sees latents of about unit variance. Code: `tinysd/vae.py`,
    `StableDiffusion.encode` / `decode` in `tinysd/pipeline.py`.
    """, MODEL_NOTE, """
    The picture to encode is a photograph for SD v1.5. The shapes model's VAE has only ever seen
    pictures of shapes, so it gets one like its training data, drawn by `training/shapes_data.py`.
    """),
    SETUP,
    md("## Encode"),
    code("""
    from tinysd.pipeline import preprocess_image
    from tinysd.rng import Generator

    pixels = demo.picture()                            # (H, W, 3) uint8
    x = preprocess_image(pixels)                       # (1, 3, H, W) in [-1, 1]
    posterior = sd.vae.encode(x)                       # q(z|x) = N(mean, std²)
    z = sd.encode(x, Generator(0))                     # 0.18215 · (mean + std · noise)
    scale = sd.vae.scaling_factor
    print(f"pixels {x.shape} -> latent {z.shape}: {x.size / z.size:.0f}× fewer numbers")
    print(f"std of the posterior mean {posterior.mean.std():.3f}, typical posterior std {np.median(posterior.std):.4f}")
    print(f"scaling_factor {scale}: std of the scaled latent {z.std():.3f}")
    """),
    md("""
    The 4 latent channels as images. With SD v1.5's VAE they look like a coarse, oddly coloured
    version of the picture: the latent is still spatial, one latent pixel per 8×8 patch. The
    shapes model's latent is 8×8 in all, so each object covers only a few latent pixels.
    """),
    code("""
    show([z[0, c] for c in range(4)], [f"channel {c}" for c in range(4)], cmap="RdBu_r", size=2.2)
    """),
    md("""
    ## Where 0.18215 comes from

    Rombach et al. (2022) scale the latent by 1/σ, with σ the standard deviation of the encoded
    training latents; for SD v1's VAE that is 1/5.49 = 0.18215. The shapes model's training
    rescaled its VAE's latents so that the same factor holds (`training/README.md`). One picture
    gives a rough estimate of the same number:
    """),
    code("""
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.hist(posterior.mean.ravel(), bins=60, alpha=0.6, density=True, label="posterior mean")
    ax.hist(z.ravel(), bins=60, alpha=0.6, density=True, label=f"× {scale}")
    ax.legend()
    plt.show()
    print(f"1 / std of this picture's posterior mean: {1 / posterior.mean.std():.4f} (SD v1 uses {scale})")
    """),
    md("## Decode: the round trip"),
    code("""
    x_hat = sd.decode(z)[0]                              # (H, W, 3) in [0, 1]; divides by 0.18215 first
    original = pixels / 255.0
    err = np.abs(x_hat - original).mean(axis=-1)
    psnr = 10 * np.log10(1 / np.mean((x_hat - original) ** 2))
    show([original, x_hat, err], ["original", "decode(encode(x))", f"|error|, PSNR {psnr:.1f} dB"], size=2.8)
    """),
    md("""
    ## What each channel carries

    Decode the latent with one channel set to zero at a time:
    """),
    code("""
    ablated = []
    for c in range(4):
        z_c = z.copy()
        z_c[:, c] = 0
        ablated.append(sd.decode(z_c)[0])
    show(ablated, [f"channel {c} zeroed" for c in range(4)], size=2.2)
    """),
]

NOTEBOOKS["06_img2img_and_inpainting.ipynb"] = [
    md("""
    # 6 · img2img and inpainting

    **img2img** starts the sampling loop part-way: encode a picture, noise its latent to the
    timestep where a fraction `strength` of the schedule is left, and denoise from there with
    the prompt. **Inpainting** (with SD v1's ordinary U-Net) denoises from noise, but after each
    step puts back the known region: the encoded picture noised to the next timestep, outside
    the mask. Code: `StableDiffusion.__call__`, `strength_timesteps` and `_denoise` in
    `tinysd/pipeline.py`.
    """, MODEL_NOTE),
    SETUP,
    md("""
    ## Strength

    With n steps, img2img skips the first n·(1 − strength) of the sampler's timesteps and noises
    the picture to the first one it keeps.
    """),
    code("""
    from tinysd.pipeline import strength_timesteps
    from tinysd.schedulers import make_scheduler

    picture = demo.picture()                           # a photograph, or for the shapes model a drawn scene
    prompt = demo.prompt("a portrait of an astronaut, oil painting", "a red square to the left of a yellow triangle")
    seed, steps = 0, demo.steps
    strengths = [0.2, 0.4, 0.6, 0.8, 1.0]
    for s in strengths:
        sampler = make_scheduler("ddim", sd.scheduler_config)
        sampler.set_timesteps(steps)
        ts = strength_timesteps(sampler, steps, s)
        print(f"strength {s}: {len(ts)} of {steps} steps, starting at t = {ts[0]}")

    outputs = [sd(prompt, image=picture, strength=s, num_inference_steps=steps, seed=seed, scheduler="ddim",
                  output_type="np").images[0] for s in strengths]
    show([picture] + outputs, ["input"] + [f"strength {s}" for s in strengths], size=1.9)
    """),
    md("""
    The shapes model keeps the layout here at every strength (a square on the left, a triangle
    on the right) but takes up the prompt's colours quickly: half-way at strength 0.2, fully from
    0.4; the background turns grey from 0.6 and black at 1.0.
    """),
    md("""
    ## Inpainting

    White in the mask means "repaint". The region outside the mask is, in the final latent,
    exactly the encoded picture (the pipeline's first random draw is the VAE's, so
    `sd.encode(x, Generator(seed))` reproduces it); only the VAE's decoder blends the border.
    """),
    code("""
    from tinysd.pipeline import preprocess_image
    from tinysd.rng import Generator

    size = demo.size
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: 3 * size // 4, size // 8: size // 2] = 255     # a box on the left: repaint it
    kw = dict(image=picture, mask_image=mask, num_inference_steps=steps, seed=seed, scheduler="ddim")
    repaint = demo.prompt("a bunch of red roses", "a red circle to the left of a green triangle")
    latent = sd(repaint, output_type="latent", **kw).images
    result = sd.decode(latent)[0]

    known = sd.encode(preprocess_image(picture), Generator(seed))   # the encoded picture, as the pipeline drew it
    changed = np.abs(latent - known).max(axis=1)[0]                 # (h, w): 0 where the latent was kept
    show([picture, mask, result, changed], ["input", "mask (white: repaint)", "inpainted",
         "|final latent − encoded input|"], size=2.3, cmap="gray")
    print("largest change outside the mask:", changed[mask[::8, ::8] == 0].max())
    """),
    md("""
    On the shapes model the box is only 4×3 latent pixels. With this seed it draws a red shape
    there (more diamond than circle); 6 of seeds 0-7 draw red in the box, two a second green
    triangle: the model does not always tie each word to its place (`training/README.md`).
    """),
]

NOTEBOOKS["07_kernels.ipynb"] = [
    md("""
    # 7 · Kernels: NumPy beside Numba

    The model files compute through a handful of primitive ops (`tinysd/backend.py`): conv2d,
    linear, attention, group_norm, layer_norm, the activations. `NumpyBackend` writes each in
    plain NumPy to be read; the `cpu` backend (`tinysd.kernels.cpu.CpuBackend`) replaces the hot
    ones with Numba-compiled kernels (and the `cuda` backend with numba.cuda kernels where a GPU
    is present). Each must equal its NumPy twin; this notebook measures how closely, and how
    fast, on this machine.
    """, MODEL_NOTE),
    SETUP,
    code("""
    import os
    import time

    import numba
    from tinysd.backend import get_backend

    try:
        import tinysd.kernels  # noqa: F401  registers 'cpu' and 'cuda' where they import
    except ImportError as e:
        print("tinysd.kernels does not import here:", e)
    # after the import: asking for the thread count starts OpenMP, whose settings the import makes
    print(f"{os.cpu_count()} CPU cores, Numba runs {numba.get_num_threads()} threads")
    backends = {}
    for name in ("numpy", "cpu", "cuda"):
        try:
            backends[name] = get_backend(name)
        except (ImportError, RuntimeError, ValueError) as e:
            print(f"{name}: not available here ({str(e).split('. ')[0]})")
    print("measured:", ", ".join(backends))
    """),
    md("""
    ## The ops, one by one

    Shapes from one SD v1 U-Net level at 512×512 (64×64 latents, 320 channels) would take
    minutes in plain NumPy on a laptop; these are the same ops at a quarter of that size.
    Each backend's first call is timed apart: it compiles the Numba kernels, or loads them from
    Numba's on-disk cache (`cache=True`) after the first run on a machine. Then the best of a
    few runs.
    """),
    code("""
    rng = np.random.default_rng(0)

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    B, C, H, W, heads = 2, 128, 32, 32, 8
    x_img, x_tok, ctx, x_ff = randn(B, C, H, W), randn(B, H * W, C), randn(B, 77, C), randn(B, H * W, 8 * C)
    conv_w, conv_b = randn(C, C, 3, 3) / np.float32(np.sqrt(9 * C)), randn(C)
    lin_w, lin_b = randn(4 * C, C) / np.float32(np.sqrt(C)), randn(4 * C)
    gamma, beta = 1 + 0.1 * randn(C), 0.1 * randn(C)
    ops = {   # name -> f(backend, to_device) -> output
        "conv2d 3×3": lambda b, a: b.conv2d(a(x_img), a(conv_w), a(conv_b), 1, 1),
        "linear": lambda b, a: b.linear(a(x_tok), a(lin_w), a(lin_b)),
        "group_norm + SiLU": lambda b, a: b.group_norm(a(x_img), 32, a(gamma), a(beta), 1e-5, silu=True),
        "layer_norm": lambda b, a: b.layer_norm(a(x_tok), a(gamma), a(beta), 1e-5),
        "self-attention": lambda b, a: b.attention(a(x_tok), a(x_tok), a(x_tok), heads),
        "cross-attention": lambda b, a: b.attention(a(x_tok), a(ctx), a(ctx), heads),
        "geglu": lambda b, a: b.geglu(a(x_ff)),
    }

    def timed(backend, op, repeat=5):
        \"\"\"(output as NumPy, first-call seconds, best-of-`repeat` seconds); inputs moved outside the timing.\"\"\"
        cache = {}
        to_device = lambda arr: cache.setdefault(id(arr), backend.asarray(arr))
        start = time.perf_counter()
        out = backend.numpy(op(backend, to_device))
        first = time.perf_counter() - start
        best = np.inf
        for _ in range(repeat):
            start = time.perf_counter()
            backend.numpy(op(backend, to_device))
            best = min(best, time.perf_counter() - start)
        return out, first, best

    rows = []
    for name, op in ops.items():
        ref, _, t_ref = timed(backends["numpy"], op)
        row = {"op": name, "numpy ms": 1e3 * t_ref}
        for bname, backend in backends.items():
            if bname == "numpy":
                continue
            out, first, best = timed(backend, op)
            row[f"{bname} ms"] = 1e3 * best
            row[f"{bname} first call s"] = first
            row[f"{bname} max rel err"] = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
        rows.append(row)

    columns = list(rows[0])
    print("".join(f"{c:>22}" for c in columns))
    for row in rows:
        print("".join(f"{row[c]:>22.4g}" if isinstance(row[c], float) else f"{row[c]:>22}" for c in columns))
    print("(max rel err: largest |difference| over the output's largest |value|)")
    """),
    code("""
    others = [b for b in backends if b != "numpy"]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    xs = np.arange(len(rows))
    width = 0.8 / len(backends)
    for i, bname in enumerate(backends):
        ax.bar(xs + i * width, [r[f"{bname} ms"] for r in rows], width, label=bname)
    ax.set_xticks(xs + width * (len(backends) - 1) / 2, [r["op"] for r in rows], rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (best of 5)")
    ax.legend()
    plt.show()
    for bname in others:
        speedup = [r["numpy ms"] / r[f"{bname} ms"] for r in rows]
        print(f"{bname}: " + ", ".join(f"{r['op']} {s:.1f}×" for r, s in zip(rows, speedup)))
    """),
    md("""
    ## The whole U-Net, one step

    The same U-Net call (a guidance batch of two) on each backend: the model code is shared, only
    `set_backend` differs.
    """),
    code("""
    from tinysd.rng import Generator

    unet = sd.unet
    latents = Generator(0).randn((2, unet.in_channels, demo.size // 8, demo.size // 8))
    context = sd.ops.numpy(sd.encode_prompt(demo.prompt("a cat in space", "a yellow star")))
    original = unet.ops
    results = {}
    try:
        for bname, backend in backends.items():
            unet.set_backend(backend)
            call = lambda: backend.numpy(unet(backend.asarray(latents), 500, backend.asarray(context)))
            eps, first, best = timed(backend, lambda b, a: call(), repeat=2)
            results[bname] = eps
            print(f"{bname:6} first call {first:7.3f} s, then {best:7.3f} s", end="")
            if bname != "numpy":
                print(f", max |ε − ε_numpy| = {np.abs(eps - results['numpy']).max():.2e}", end="")
            print()
    finally:
        unet.set_backend(original)
    """),
]


def build(name):
    """The notebook `name` from NOTEBOOKS, without outputs."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(source, id=f"cell-{i:02d}"))   # stable ids: regenerating gives small diffs
    return nb


def execute(nb, cwd, timeout=600):
    """Run every cell in a fresh kernel with `cwd` as working directory; outputs stay in `nb`."""
    from nbclient import NotebookClient

    # TINYSD_NOTEBOOK_STATIC: live controls (notebooks/_live.py) draw static grids, pictures a reader sees without a kernel
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                   record_timing=False).execute(env={**os.environ, "TINYSD_NOTEBOOK_STATIC": "1"})
    return nb


def write(nb, path):
    import nbformat

    nbformat.write(nb, str(path), version=4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="file-name prefixes, e.g. 03 (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write the sources without running them")
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.only or any(n.startswith(p) for p in args.only)]
    if not names:
        parser.error(f"no notebook starts with {args.only}; there are: {', '.join(NOTEBOOKS)}")
    for name in names:
        nb = build(name)
        start = time.perf_counter()
        if not args.no_execute:
            execute(nb, NOTEBOOK_DIR)
        write(nb, NOTEBOOK_DIR / name)
        print(f"{name}: {len(nb.cells)} cells, {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
