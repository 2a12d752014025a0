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


NOTEBOOKS["08_controlnet.ipynb"] = [
    md("""
    # 8 · ControlNet: steering the composition with an edge map

    A prompt says *what* to draw; a **ControlNet** says *where*, with a picture of the structure
    wanted: an edge map, a depth map, a pose skeleton. It is a trainable copy of the U-Net's
    down path and mid block that reads the noisy latent, the timestep, the prompt, and the hint
    c, which a small conv stack E brings from pixels to the latent grid:

        h_0 = conv_in(z_t) + E(c)
        r_k = Z_k(h_k)  for every skip connection h_k of the copy,   r_mid = Z_mid(h_mid)

    The Z are 1×1 convolutions that start at zero, so training starts from the unchanged model.
    The frozen U-Net adds s·r_k to its own skip connections and s·r_mid to its mid block
    (s: `controlnet_conditioning_scale`). Code: `tinysd/controlnet.py` (the model, the files,
    the per-step hook), `tinysd/hints.py` (Canny and the other hints), the residual entry in
    `UNet2DConditionModel.__call__` (`tinysd/unet.py`).

    This notebook uses the packaged "shapes" model and "shapes-canny", a Canny ControlNet trained
    for it by this project (`training/train_shapes_controlnet.py`); with SD v1.5 the same calls
    take `control_v11p_sd15_canny`.
    """),
    code("""
    import sys
    import numpy as np
    import matplotlib.pyplot as plt
    import tinysd
    from tinysd import hints
    from _model import TRAINING, show

    sys.path.insert(0, str(TRAINING))
    import shapes_data as data

    sd = tinysd.load("shapes", backend="numpy", controlnet="shapes-canny")
    net = sd.controlnets[0]
    print('Running on the packaged "shapes" model with its Canny ControlNet "shapes-canny" (tinysd/data/).')
    parts = {"hint encoder E": net.controlnet_cond_embedding,
             "down path + mid block (copied)": [net.conv_in, net.time_embedding, *net.down_blocks, net.mid_block],
             "zero convolutions Z": [*net.controlnet_down_blocks, net.controlnet_mid_block]}
    for name, modules in parts.items():
        modules = modules if isinstance(modules, list) else [modules]
        print(f"{name:32s} {sum(m.num_parameters() for m in modules) / 1e6:6.2f} M parameters")
    print(f"{'the U-Net it steers':32s} {sd.unet.num_parameters() / 1e6:6.2f} M parameters")
    """),
    md("""
    ## The hint: Canny edges

    `canny(image, low, high)` is OpenCV's `cv2.Canny`, pixel for pixel, written out in NumPy:
    Sobel gradients (|∂x| + |∂y|, the strongest colour channel), non-maximum suppression along
    the gradient's direction (rounded to 0°, 45°, 90°, 135°), and the double threshold with
    hysteresis: pixels above `high` are edges, pixels above `low` join them when connected.
    The scene below is one the ControlNet never saw in training: a yellow star at the bottom.
    """),
    code("""
    from scipy import ndimage

    star = data.Scene((data.make_thing(np.random.default_rng(3), "star", "yellow", "bottom", "large"),), "gray")
    picture = data.render(star)
    dx, dy = hints.sobel(picture)
    magnitude = (np.abs(dx) + np.abs(dy)).max(axis=2)
    edges = hints.canny(picture, 100, 200)
    show([picture, magnitude, magnitude > 100, edges],
         ["scene (64×64)", "Sobel |∂x| + |∂y|", "above low (100)", "Canny: thin, connected"], cmap="gray", size=2.4)
    print("edge pixels:", int((edges > 0).sum()))
    """),
    md("""
    ## With and without the edge map

    The prompt names colour and shape but not the place. Without the ControlNet the model puts
    the star wherever its prior prefers; with the edge map it follows the edges.
    """),
    code("""
    prompt, seeds = "a yellow star", range(5)
    kw = dict(num_inference_steps=20, scheduler="dpmpp_2m", output_type="np")
    with_edges = [sd(prompt, control_image=edges, seed=s, **kw).images[0] for s in seeds]
    free = tinysd.load("shapes", backend="numpy")
    without = [free(prompt, seed=s, **kw).images[0] for s in seeds]
    show(without, [f"no control, seed {s}" for s in seeds], size=1.8)
    show(with_edges, [f"edges, seed {s}" for s in seeds], size=1.8)
    """),
    md("""
    ## Moving the edges moves the object

    The same edges, shifted: the star follows them to every place, including the places the
    prompt never names. `control_preprocess="canny"` makes the edge map inside the pipeline.
    """),
    code("""
    places = ["left", "top", "center", "right", "bottom"]
    scenes = [data.Scene((data.make_thing(np.random.default_rng(3), "star", "yellow", p, "large"),), "gray")
              for p in places]
    moved = [sd(prompt, control_image=data.render(sc), control_preprocess="canny", seed=0, **kw).images[0]
             for sc in scenes]
    show([hints.canny(data.render(sc)) for sc in scenes], [f"edges: {p}" for p in places], cmap="gray", size=1.8)
    show(moved, [f"drawn: {p}" for p in places], size=1.8)
    """),
    md("""
    ## What each part adds where

    E(c) turns the 64×64 edges into 64 feature maps on the 8×8 latent grid, added to the copy's
    first activation. The zero convolutions then hand the U-Net one residual per skip connection
    (12 for SD v1's layout: conv_in, two layers and a downsampler per level, the last level
    without one) and one for the mid block. Below: where E puts its energy, and how large each
    residual is compared with the U-Net's own skip it is added to, at a few timesteps.
    """),
    code("""
    from tinysd.rng import Generator

    hint = edges.astype(np.float32)[None, None].repeat(3, axis=1) / 255       # (1, 3, 64, 64) in [0, 1]
    e = net.controlnet_cond_embedding(hint)                                     # (1, 64, 8, 8)
    context = sd.encode_prompt(prompt, guidance=False)
    latents = Generator(0).randn((1, 4, 8, 8))

    def skips_of_unet(x, t):
        # the U-Net's own skip connections and mid-block output, run block by block
        from tinysd.unet import timestep_embedding
        temb = sd.unet.time_embedding(timestep_embedding(np.array([t], np.float32), sd.unet.time_proj_dim))
        h = sd.unet.conv_in(x)
        skips = [h]
        for block in sd.unet.down_blocks:
            h, more = block(h, temb, context)
            skips += more
        return skips + [sd.unet.mid_block(h, temb, context)]

    timesteps = [999, 700, 400, 100]
    ratio = np.zeros((len(timesteps), 13))
    for i, t in enumerate(timesteps):
        down, mid = net(latents, t, context, hint)
        for k, (r, skip) in enumerate(zip(down + [mid], skips_of_unet(latents, t))):
            ratio[i, k] = np.linalg.norm(r) / np.linalg.norm(skip)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), gridspec_kw={"width_ratios": [1, 3]})
    axes[0].imshow(np.abs(e[0]).mean(axis=0), cmap="magma")
    axes[0].set_title("|E(c)|, channel mean (8×8)", fontsize=10)
    axes[0].set_axis_off()
    names = ["conv_in"] + [f"{lvl}.{j}" for lvl in range(4) for j in ("0", "1", "down")][:11] + ["mid"]
    im = axes[1].imshow(ratio, cmap="viridis", aspect="auto")
    axes[1].set_xticks(range(13), names, rotation=45, fontsize=8)
    axes[1].set_yticks(range(len(timesteps)), [f"t={t}" for t in timesteps])
    axes[1].set_title("‖r_k‖ / ‖U-Net skip_k‖: how much the control changes each skip", fontsize=10)
    fig.colorbar(im, ax=axes[1])
    plt.tight_layout()
    plt.show()
    """),
    md("""
    Which residuals carry the layout? Switch groups of zero convolutions off (set to zero, as
    before training) and draw again: only the full-resolution skips (level 0), only the coarse
    ones (levels 1-3 and the mid block), all of them.
    """),
    code("""
    def draw_with(keep):
        saved = [(z.weight, z.bias) for z in net.controlnet_down_blocks + [net.controlnet_mid_block]]
        for k, z in enumerate(net.controlnet_down_blocks + [net.controlnet_mid_block]):
            if k not in keep:
                z.weight, z.bias = z.weight * 0, z.bias * 0
        try:
            return sd(prompt, control_image=edges, seed=1, **kw).images[0]
        finally:
            for z, (w, b) in zip(net.controlnet_down_blocks + [net.controlnet_mid_block], saved):
                z.weight, z.bias = w, b

    groups = {"none": [], "level 0 (8×8)": [0, 1, 2], "levels 1-3 + mid": list(range(3, 13)), "all": list(range(13))}
    show([edges] + [draw_with(keep) for keep in groups.values()], ["edges"] + list(groups), size=1.9)
    """),
    md("""
    In this run the coarse residuals (levels 1-3 and the mid block, on the 4×4 to 1×1 grids)
    carry the layout: with them alone the star goes onto the edges; the full-resolution ones
    alone leave it where the model draws it without control.
    """),
    md("""
    ## Scale, window and guess mode

    `controlnet_conditioning_scale` multiplies every residual; `control_guidance_start`/`_end`
    apply the ControlNet only on a fraction of the steps; `guess_mode=True` runs it on the
    conditional half of the guidance batch only, with the residuals scaled from 0.1 (first skip)
    to 1 (mid block), and works even with an empty prompt. With SD v1.5 the composition is mostly
    settled in the first steps; this small model settles it late: below, the ControlNet on the
    first 30% of the steps alone leaves the star where the model's prior puts it, on the last 50%
    alone it moves the star onto the edges. (A prompt-less guess mode run draws the shape in a
    colour of its own choosing: the edges say where and what, not which colour.)
    """),
    code("""
    runs = {"scale 0.3": dict(controlnet_conditioning_scale=0.3), "scale 1": {},
            "scale 2": dict(controlnet_conditioning_scale=2.0),
            "steps 0-30%": dict(control_guidance_end=0.3), "steps 50-100%": dict(control_guidance_start=0.5),
            "guess mode, no prompt": dict(guess_mode=True)}
    pictures = [sd("" if "no prompt" in name else prompt, control_image=edges, seed=2, **kw, **extra).images[0]
                for name, extra in runs.items()]
    show(pictures, list(runs), size=1.8)
    out = sd(prompt, control_image=edges, seed=2, **kw)
    print(out.parameters["ControlNet 0"])
    """),
    md("""
    The last line is what a PNG written by `python -m tinysd ... --control-net shapes-canny
    --control-image edges.png` carries, as AUTOMATIC1111's ControlNet extension writes it.
    Depth, pose and segmentation hints need networks of their own (MiDaS, OpenPose, ...): make
    them with those tools and pass the picture as `control_image`.
    """),
]


def latent_space_notebook():
    """09_latent_space: interpolation and arithmetic in the three latent spaces, measured; live controls."""
    return [
        md("""
        # 9 · The latent space: interpolation, arithmetic, live controls

        Three spaces feed the picture, and each can be walked through and added up:

        - the **start noise** z_T, n = 4·h·w standard normal numbers: one point per seed;
        - the **text context**, 77 rows of D numbers: one point per prompt (notebook 1);
        - the **VAE latent** z₀ = 0.18215·E(x): the picture itself, 8× smaller, in 4 channels (notebook 5).

        The articles this project grew from say that interpolating between latent vectors gives
        meaningful transitions, and that vector arithmetic adds and subtracts concepts. This
        notebook tries both in each space, measures on the shapes model how often the arithmetic
        does what is claimed, and ends with live controls. The helpers are in `tinysd/latent.py`
        (`slerp`, `mix_embeds`, `word_direction`, ...); they feed the pipeline through its own
        arguments `latents=` and `prompt_embeds=`. The live controls are in `notebooks/_live.py`.
        """, MODEL_NOTE, """
        This notebook runs on the `cpu` backend (Numba kernels), so that a picture redraws fast
        enough to move a slider; its first picture compiles the kernels, or loads them from
        Numba's cache.
        """),
        code("""
        import numpy as np
        import matplotlib.pyplot as plt
        from _model import load_demo, show

        demo = load_demo(backend="cpu")
        sd = demo.sd
        print(demo.describe())
        """),
        code("""
        import os
        import sys

        from tinysd.latent import (attribute_direction, embed, lerp, mix_embeds, renormalize, seed_noise, slerp,
                                   word_direction)
        from tinysd.rng import Generator

        steps, sampler = demo.steps, "dpmpp_2m"
        # TINYSD_NOTEBOOK_QUICK=1 (tests/test_notebooks.py sets it): the measured sections count a
        # quarter of their cases, with the same code; the committed outputs count all of them
        quick = os.environ.get("TINYSD_NOTEBOOK_QUICK", "") not in ("", "0")


        def draw(contexts, latents, **kwargs):
            \"\"\"One picture per row of contexts (B, 77, D) and start noises (B, 4, h, w): (B, H, W, 3) in [0, 1].\"\"\"
            return sd(prompt_embeds=contexts, latents=latents, num_inference_steps=steps, scheduler=sampler,
                      output_type="np", **kwargs).images


        if demo.shapes:     # training/evaluate_shapes.py reads colour, shape and position off a picture
            from _model import TRAINING
            sys.path.insert(0, str(TRAINING))
            import evaluate_shapes
            import shapes_data

            def measure(picture):
                \"\"\"evaluate_shapes' reading of a picture in [0, 1]: {'colour', 'shape', 'position', ...}.\"\"\"
                return evaluate_shapes.measure((picture * 255).round().astype(np.uint8))

            def background(picture):
                \"\"\"The background's name: the nearest of shapes_data.BACKGROUNDS to the border's median colour.\"\"\"
                rgb = evaluate_shapes.background_colour((picture * 255).round().astype(np.uint8))
                return evaluate_shapes.nearest(rgb, shapes_data.BACKGROUNDS)

            def reading(picture):
                m = measure(picture)
                return f"{m['colour']} {m['shape']}\\n{m['position']}, {background(picture)}"
        else:
            def reading(picture):
                return ""

        n = seed_noise(sd, 0).size
        print(f"start noise: {seed_noise(sd, 0).shape}, n = {n} numbers; {steps} steps of {sampler}")
        """),
        md("""
        ## 1 · Between two seeds: slerp, not lerp

        A seed's start noise is a draw of n independent N(0, 1) numbers. In n dimensions such
        draws sit, with overwhelming probability, in a thin shell of radius √n: ‖z‖² is a sum of n
        squares, mean n, standard deviation √(2n), so ‖z‖ ≈ √n ± 0.7. Two independent draws are
        nearly orthogonal (cos θ ≈ ±1/√n). The straight line between them cuts through the inside
        of the shell: its midpoint (z₀ + z₁)/2 has variance ½ per number and norm ≈ √(n/2), noise
        of a size the model never starts from. Spherical interpolation turns z₀ into z₁ along the
        great circle:

        $$\\mathrm{slerp}(z_0, z_1; t) = \\frac{\\sin((1-t)\\theta)}{\\sin\\theta} z_0 + \\frac{\\sin(t\\theta)}{\\sin\\theta} z_1,
        \\qquad \\cos\\theta = \\frac{z_0 \\cdot z_1}{\\lVert z_0\\rVert \\lVert z_1\\rVert}$$

        and keeps the norm at ≈ √n all the way.
        """),
        code("""
        z0, z1 = seed_noise(sd, 0), seed_noise(sd, 1)
        a, b = Generator(10).randn((1000, n)), Generator(11).randn((1000, n))     # 1000 pairs of draws
        norms = lambda x: np.linalg.norm(x.reshape(len(x), -1), axis=1)
        mid_lerp = lerp(a, b, 0.5)
        mid_slerp = np.stack([slerp(x, y, 0.5) for x, y in zip(a, b)])
        cos = np.sum(a * b, axis=1) / (norms(a) * norms(b))

        fig, axes = plt.subplots(1, 2, figsize=(13, 3.4))
        bins = np.linspace(0.6 * np.sqrt(n / 2), 1.15 * np.sqrt(n), 80)
        for x, label in ((a, "draws"), (mid_lerp, "lerp midpoints"), (mid_slerp, "slerp midpoints")):
            axes[0].hist(norms(x), bins=bins, alpha=0.6, label=label)
        for value, name in ((np.sqrt(n), "√n"), (np.sqrt(n / 2), "√(n/2)")):
            axes[0].axvline(value, color="k", lw=0.8, ls="--")
            axes[0].text(value, axes[0].get_ylim()[1] * 0.9, f" {name}", fontsize=9)
        axes[0].set_xlabel(f"‖z‖ (n = {n})")
        axes[0].legend(fontsize=8)
        ts = np.linspace(0, 1, 41)
        axes[1].plot(ts, norms(lerp(z0, z1, ts)), label="lerp")
        axes[1].plot(ts, norms(slerp(z0, z1, ts)), label="slerp")
        axes[1].axhline(np.sqrt(n), color="k", lw=0.8, ls="--")
        axes[1].set_xlabel("t (seed 0 → seed 1)")
        axes[1].set_ylabel("‖z‖")
        axes[1].legend(fontsize=8)
        plt.show()
        print(f"draws: ‖z‖ = {norms(a).mean():.2f} ± {norms(a).std():.2f} (√n = {np.sqrt(n):.2f}); "
              f"cos θ between two draws: {cos.mean():+.3f} ± {cos.std():.3f} (1/√n = {1 / np.sqrt(n):.3f})")
        print(f"midpoints: lerp {norms(mid_lerp).mean():.2f} (√(n/2) = {np.sqrt(n / 2):.2f}), "
              f"slerp {norms(mid_slerp).mean():.2f}")
        """),
        md("""
        The pictures along both paths, one prompt, with the noise's norm under each:
        """),
        code("""
        prompt = demo.prompt("a lighthouse on a cliff at sunset, oil painting", "a yellow star on the left")
        context = embed(sd, prompt)                        # (1, 77, D)
        ts = np.linspace(0, 1, 7)
        along = {}
        for name, interpolate in (("slerp", slerp), ("lerp", lerp)):
            path = interpolate(z0, z1, ts)[:, 0]           # (7, 4, h, w)
            along[name] = draw(np.repeat(context, len(ts), axis=0), path)
            show(along[name], [f"{name} t={t:.2f}\\n‖z‖ = {np.linalg.norm(z):.1f}" for t, z in zip(ts, path)], size=1.7)
        print("mean |slerp picture − lerp picture| per t, in 1/255:",
              np.round(255 * np.abs(along["slerp"] - along["lerp"]).mean(axis=(1, 2, 3)), 1))
        """),
        md("""
        One path is one example. The midpoints of 16 more seed pairs (seeds 10 and 11, 12 and
        13, ...), drawn both ways and read by `evaluate_shapes.measure` (object colour, shape,
        position) and the background's colour:
        """),
        code("""
        if demo.shapes:
            pairs = [(10 + 2 * i, 11 + 2 * i) for i in range(4 if quick else 16)]
            first = np.concatenate([seed_noise(sd, a) for a, _ in pairs])
            second = np.concatenate([seed_noise(sd, b) for _, b in pairs])
            prompts = [f"a {c} {s} {w}" for c, s, w in zip(["red", "green", "blue", "yellow", "purple"] * 4,
                                                          ["circle", "square", "triangle", "star"] * 5,
                                                          ["on the left", "at the top", "in the center", "at the bottom"] * 4)]
            ctx = embed(sd, prompts[:len(pairs)])
            mids = {"slerp": np.concatenate([slerp(a[None], b[None], 0.5) for a, b in zip(first, second)]),
                    "lerp": lerp(first, second, 0.5)}
            read = {name: [reading(p) for p in draw(ctx, z)] for name, z in mids.items()}
            same = sum(x == y for x, y in zip(read["slerp"], read["lerp"]))
            print(f"lerp and slerp midpoints read the same (colour, shape, position, background) in {same} of {len(pairs)}")
            for x, y, prompt in zip(read["slerp"], read["lerp"], prompts):
                if x != y:
                    print(f"  {prompt!r}: slerp {x.replace(chr(10), ', ')} | lerp {y.replace(chr(10), ', ')}")
        """),
        md("""
        What the norm does, on its own: the same three seeds' noise scaled by s before sampling
        (s = 0.71 is the lerp midpoint's shrinkage):
        """),
        code("""
        scales = [0.0, 0.35, 0.71, 1.0, 1.41]
        seeds = [2, 3, 4]
        noise = np.concatenate([seed_noise(sd, s) for s in seeds])
        scaled = np.concatenate([noise * s for s in scales])                   # scale-major: (15, 4, h, w)
        pictures = draw(np.repeat(context, len(scaled), axis=0), scaled)
        for i, seed in enumerate(seeds):
            row = pictures[i::len(seeds)]
            show(row, [f"seed {seed}, × {s}\\n{reading(p)}" for s, p in zip(scales, row)], size=1.8)
        """),
        md("""
        What this shows, on the shapes model (the committed outputs): the norms behave exactly as the
        argument says (lerp midpoints at √(n/2) ≈ 11.3, slerp's at √n ≈ 16), but the pictures barely
        care. Along the seed 0 → seed 1 path, lerp and slerp pictures differ by at most 0.5/255 on
        average; of the 16 midpoint pairs, 14 read the same, and the 2 others differ only in the
        background's colour. The scaled noises say why: the object follows the prompt from noise × 0
        to × 1, and what the norm of the start noise changes is the background (seed 2: white, then
        grey, then black). Too much noise does break the picture (× 1.41 leaves coloured specks all
        over it for 2 of 3 seeds, and the reading mistakes the star for a circle); too little only
        moves the background. So slerp is the right way to walk between seeds (it
        keeps the start noise where the model was trained, and costs nothing), but on this small model
        lerp's shrunken midpoints are not visibly worse; the articles' blurry lerp midpoints are a claim
        about trained SD v1 (n = 16 384) that this notebook does not test.
        """),
        md("""
        ## 2 · Between two prompts

        The context is the other input the pictures depend on. `mix_embeds` interpolates two
        prompts' contexts row by row (all 77 rows, padding included: notebook 1 showed the
        padding rows carry the prompt too), with lerp or with a slerp of each row; the seed stays.
        """),
        code("""
        prompt_a = demo.prompt("a photograph of a red sports car", "a red circle at the top")
        prompt_b = demo.prompt("a photograph of a blue bicycle", "a blue square at the bottom")
        context_a, context_b = embed(sd, prompt_a), embed(sd, prompt_b)
        ts = np.linspace(0, 1, 9)
        start = np.repeat(seed_noise(sd, 0), len(ts), axis=0)
        for spherical in (False, True):
            print(f"{prompt_a!r} → {prompt_b!r}, " + ("slerp of each row" if spherical else "lerp"))
            pictures = draw(mix_embeds(context_a, context_b, ts, spherical=spherical)[:, 0], start)
            show(pictures, [f"t={t:.2f}\\n{reading(p)}" for t, p in zip(ts, pictures)], size=1.5)
        """),
        md("""
        On the shapes model the walk between two prompts is not a morph: up to t = 0.38 it draws
        prompt a's red circle at the top, from t = 0.75 on prompt b's blue square at the bottom, and in
        between (t = 0.5 to 0.62) a picture of neither: a purple object (red and blue mixed), mostly on
        the left, a place neither prompt names. Lerp and a slerp of each row differ only at t = 0.5 (a
        square against a small circle): CLIP's rows have similar norms, so the two mixes are close. The
        background switches from grey to white at t = 0.25 with the same seed: the context decides the
        background too, not only the noise.
        """),
        md("""
        ## 3 · Arithmetic on text embeddings

        "A red circle" − "red" + "blue" = "a blue circle"? Taken literally, with each text encoded on
        its own, the rows do not line up: in `context("red")` the word sits in row 1 and the end
        token in row 2, where "a red circle on the left" has "red" in row 2 and "circle" in row 3.
        And CLIP's rows are not word vectors: row j has read every token up to j (notebook 1), so
        "red"'s influence is spread over every later row, the padding included.

        What can be subtracted is the difference a word makes inside a prompt.
        `word_direction(sd, "red", "blue", templates)` is the mean over template prompts of
        context(template with "blue") − context(template with "red"), row by row; templates and
        prompt have the same tokens elsewhere in number, so rows line up. The templates here use
        the *other* shapes ("a {} square on the left", ...), never the prompt itself: otherwise
        the arithmetic would land on "a blue circle" by construction.
        """),
        code("""
        base, source, target = demo.prompt(("a photograph of a red car", "red", "blue"),
                                           ("a red circle on the left", "red", "blue"))
        noun, others = demo.prompt(("car", ["house", "bicycle", "dress"]), ("circle", ["square", "triangle", "star"]))
        templates = [base.replace(source, "{}").replace(noun, other) for other in others]
        print("prompt:   ", sd.tokenizer.tokenize(base))
        print("word:     ", sd.tokenizer.tokenize(source))
        print("templates:", templates)

        naive = embed(sd, base) - embed(sd, source) + embed(sd, target)
        direction = word_direction(sd, source, target, templates)
        aligned = embed(sd, base) + direction
        literal = embed(sd, base.replace(source, target))

        fig, ax = plt.subplots(figsize=(10, 2.6))
        ax.plot(np.linalg.norm((embed(sd, target) - embed(sd, source))[0], axis=1), ".-",
                label=f"context({target!r}) − context({source!r}): the literal difference")
        ax.plot(np.linalg.norm(direction[0], axis=1), ".-", label="word_direction: the aligned difference")
        ax.set_xlabel("context row")
        ax.set_ylabel("‖difference‖")
        ax.legend(fontsize=8)
        plt.show()

        labels = [base, f"− {source!r} + {target!r}\\n(literal)", f"+ {source}→{target}\\n(aligned)",
                  base.replace(source, target)]
        pictures = draw(np.concatenate([embed(sd, base), naive, aligned, literal]), np.repeat(z0, 4, axis=0))
        show(pictures, [f"{label}\\n{reading(p)}" for label, p in zip(labels, pictures)], size=2.4)
        """),
        md("""
        ### How often does it work?

        On the shapes model the answer can be counted. Each case takes a prompt "a {colour}
        {shape} {place}" and swaps one word, the colour (all 20 ordered pairs of the 5 colours,
        twice each, with shapes and places cycling) or the shape (all 12 ordered pairs of the 4
        shapes, 3 times each): 76 cases, one seed each. Three contexts per case:

        - **prompt**: the target prompt itself ("a blue circle on the left"): what the model
          draws when asked directly, the ceiling;
        - **literal**: context(prompt) − context(source word) + context(target word);
        - **aligned**: context(prompt) + `word_direction` over templates with the other shapes
          (for a colour swap) or the other colours (for a shape swap).

        `evaluate_shapes.measure` reads each picture; a case works when the swapped attribute
        is the target's and the other one is kept.
        """),
        code("""
        if demo.shapes:
            colours, shapes, places = list(shapes_data.COLOURS), list(shapes_data.SHAPES), list(shapes_data.POSITIONS)
            cases = []           # (kind, source, target, colour, shape, place words, seed)
            for kind, words, repeats in (("colour", colours, 2), ("shape", shapes, 3)):
                pairs = [(s, t) for s in words for t in words if s != t for _ in range(repeats)]
                for i, (s, t) in enumerate(pairs):
                    colour = s if kind == "colour" else colours[i % len(colours)]
                    shape = s if kind == "shape" else shapes[i % len(shapes)]
                    place = shapes_data.PLACE_WORDS[places[(3 * i) % len(places)]]
                    cases.append((kind, s, t, colour, shape, place, 100 + len(cases)))
            cases = cases[::4] if quick else cases

            def contexts(case):
                kind, s, t, colour, shape, place, seed = case
                prompt = f"a {colour} {shape} {place}"
                if kind == "colour":
                    templates = [f"a {{}} {other} {place}" for other in shapes if other != shape]
                else:
                    templates = [f"a {other} {{}} {place}" for other in colours if other != colour]
                return {"prompt": embed(sd, prompt.replace(s, t)),
                        "literal": embed(sd, prompt) - embed(sd, s) + embed(sd, t),
                        "aligned": embed(sd, prompt) + word_direction(sd, s, t, templates)}

            def score(case, m):
                \"\"\"Whether the picture read as `m` took the target word and kept the other attribute.\"\"\"
                kind, s, t, colour, shape, place, seed = case
                want = {"colour": colour, "shape": shape, kind: t}
                return {"changed": m[kind] == t, "kept": all(m[k] == v for k, v in want.items() if k != kind),
                        "both": all(m[k] == v for k, v in want.items())}

            per_case = [contexts(case) for case in cases]
            # how far each edit lands from the target prompt's context, relative to where it started
            source = [embed(sd, f"a {case[3]} {case[4]} {case[5]}") for case in cases]
            for method in ("literal", "aligned"):
                ratio = [np.linalg.norm(c[method] - c["prompt"]) / np.linalg.norm(s - c["prompt"])
                         for c, s in zip(per_case, source)]
                print(f"{method:8} ‖edit − target‖ / ‖source − target‖: mean {np.mean(ratio):.2f} "
                      f"(min {np.min(ratio):.2f}, max {np.max(ratio):.2f})")
            start = np.concatenate([seed_noise(sd, case[-1]) for case in cases])
            results, pictures, readings = {}, {}, {}
            for method in ("prompt", "literal", "aligned"):
                pictures[method] = draw(np.concatenate([c[method] for c in per_case]), start)
                readings[method] = [measure(p) for p in pictures[method]]
                results[method] = [score(case, m) for case, m in zip(cases, readings[method])]

            print(f"{'':9}" + "".join(f"{kind + ' swaps':>33}" for kind in ("colour", "shape")))
            print(f"{'':9}" + f"{'changed':>11}{'kept':>11}{'both':>11}" * 2)
            for method, rows in results.items():
                line = f"{method:9}"
                for kind in ("colour", "shape"):
                    mine = [r for r, case in zip(rows, cases) if case[0] == kind]
                    for key in ("changed", "kept", "both"):
                        hits = sum(r[key] for r in mine)
                        line += f"{hits:>5}/{len(mine)} {hits / len(mine):4.0%}"
                print(line)
            for method in ("literal", "aligned"):     # how close each edit's picture is to the prompt's own picture
                agree = sum(all(m[k] == q[k] for k in ("colour", "shape")) for m, q in zip(readings[method], readings["prompt"]))
                print(f"{method:8} pictures read (colour, shape) as the prompt's picture in {agree}/{len(cases)}; "
                      f"mean |difference| {255 * np.abs(pictures[method] - pictures['prompt']).mean():.1f}/255")
        else:
            print("The measured check reads the shapes model's pictures (TINYSD_NOTEBOOK_MODEL=shapes runs it).")
        """),
        code("""
        if demo.shapes:     # a few cases of each kind: rows literal / aligned, the reading under each picture
            for kind in ("colour", "shape"):
                some = [i for i, case in enumerate(cases) if case[0] == kind][::7][:6]
                fig, axes = plt.subplots(2, len(some), figsize=(1.9 * len(some), 4.8))
                for col, i in enumerate(some):
                    kind_, s, t, colour, shape, place, seed = cases[i]
                    for row, method in enumerate(("literal", "aligned")):
                        m = readings[method][i]
                        axes[row, col].imshow(pictures[method][i], interpolation="nearest")
                        axes[row, col].set_title(f"{colour} {shape}, {s}→{t}\\n{method}: {m['colour']} {m['shape']}",
                                                 fontsize=8)
                        axes[row, col].set_axis_off()
                fig.suptitle(f"{kind} swaps", y=1.0)
                fig.tight_layout()
                plt.show()
        """),
        md("""
        Measured on the shapes model, 76 cases, one seed each (the table above, read by
        `training/evaluate_shapes.py`'s colour and shape checks):

        - The target prompt itself ("prompt") gets the colour and shape right in 37/40 colour cases
          (92%) and 34/36 shape cases (94%): the ceiling.
        - **Literal arithmetic**, context(prompt) − context("red") + context("blue") as the articles
          write it, works for colours about half the time: the new colour appears in 35/40 (88%), but
          the shape survives in only 26/40, so both are right in 22/40 (55%). For shapes it fails:
          1/36 (3%) draw the new shape; the model keeps drawing the old one. The edited context
          is still, on average, 0.88 times as far from the target prompt's as the unedited one
          was: the context of a word on its own is not what that word adds inside a prompt.
        - **Aligned arithmetic**, + `word_direction` over templates with the other shapes (or
          colours), does as well as the target prompt: 37/40 (92%) and 34/36 (94%). The edited
          context is 0.24 times as far from the target's as the unedited one; its pictures read
          (colour, shape) as the prompt's own pictures in 72 of 76 cases and differ from them by
          12.6/255 on average (the literal edits: 24 of 76, 35/255). That is arithmetic, since no template holds the prompt, but a
          narrow one: the templates differ from the prompt in one word at the same place, so the
          direction is nearly the prompt pair's own difference.

        So "red circle − red + blue = blue circle" works here only when "red" and "blue" are taken
        inside prompts like the one edited; the word on its own does not carry over.
        """),
        md("""
        ## 4 · Arithmetic on the start noise

        The GAN papers' arithmetic (Radford et al. 2016: "smiling woman" − "neutral woman" +
        "neutral man") works on start noises: average the noises of samples that show an attribute,
        subtract the average of samples that do not, add the difference to a new sample. The
        averaging keeps what the samples share and shrinks their independent noise as 1/√count.

        The shapes model's prompts above never name the background, so the noise picks it:
        white, grey or black. The 76 "prompt" pictures of section 3 give the direction: the mean
        start noise of those drawn on black minus the mean of those drawn on white. It is tried
        on 24 new seeds and new prompts, added (towards black) and subtracted (towards white),
        and the sum rescaled to norm √n (`renormalize`), back on the shell of section 1.
        """),
        code("""
        if demo.shapes:
            drawn = [background(p) for p in pictures["prompt"]]
            counts = {name: drawn.count(name) for name in shapes_data.BACKGROUNDS}
            print("backgrounds of section 3's prompt pictures:", counts)
            black = np.array([d == "black" for d in drawn])
            white = np.array([d == "white" for d in drawn])
            d_black = attribute_direction(start[black], start[white])            # (1, 4, h, w)
            print(f"direction: ‖d‖ = {np.linalg.norm(d_black):.2f} (a draw: {np.sqrt(n):.1f}); "
                  f"per-channel mean {np.round(d_black.mean(axis=(0, 2, 3)), 2)}")

            test_seeds = list(range(1000, 1008 if quick else 1024))
            test_prompts = [f"a {colours[(i * 2) % 5]} {shapes[(i * 3) % 4]} {shapes_data.PLACE_WORDS[places[i % 5]]}"
                            for i in range(len(test_seeds))]
            z = np.concatenate([seed_noise(sd, s) for s in test_seeds])
            ctx = embed(sd, test_prompts)
            variants = {"as drawn": z, "+ d (to black)": renormalize(z + d_black), "− d (to white)": renormalize(z - d_black)}
            noise_pictures = {}
            for name, latents in variants.items():
                noise_pictures[name] = draw(ctx, latents)
                got = [background(p) for p in noise_pictures[name]]
                readings = [measure(p) for p in noise_pictures[name]]
                as_prompted = sum(m["colour"] == q.split()[1] and m["shape"] == q.split()[2]
                                  for m, q in zip(readings, test_prompts))
                print(f"{name:15} backgrounds {', '.join(f'{bg} {got.count(bg)}' for bg in shapes_data.BACKGROUNDS)}; "
                      f"colour and shape as prompted {as_prompted}  (of {len(test_seeds)})")
            for name in variants:
                show(noise_pictures[name][:8], [f"{name}\\n{reading(p)}" for p in noise_pictures[name][:8]], size=1.5)
        """),
        md("""
        Measured on the shapes model: the background is the one thing these prompts leave to the
        noise, and there the arithmetic works. With the same 24 seeds and prompts, black backgrounds
        go from 5 (as drawn) to 18 with + d, and white ones from 12 to 21 with − d (0 white after + d,
        0 black after − d); the object follows the prompt as before (23, 24 and 23 of 24). The
        direction is 16 black against 36 white samples, ‖d‖ = 5.4 against a draw's 16: a nudge,
        not a new noise. What the noise does not decide (the object's colour and shape, which follow
        the prompt) no noise direction changes.
        """),
        md("""
        ## 5 · The VAE latent, edited per channel

        The VAE latent is the picture itself, compressed: one latent pixel per 8×8 patch, 4
        numbers each. Shifting one channel everywhere by a few standard deviations and decoding
        shows what that channel carries:
        """),
        code("""
        from tinysd.pipeline import preprocess_image

        picture = demo.picture()
        z_vae = sd.vae.scaling_factor * sd.vae.encode(preprocess_image(picture)).mean     # (1, 4, h, w)
        std = z_vae.std(axis=(0, 2, 3))
        shifts = [-3, -1.5, 0, 1.5, 3]
        for c in range(4):
            one_hot = (np.arange(4) == c).astype(np.float32)[None, :, None, None]
            edited = np.concatenate([z_vae + np.float32(k * std[c]) * one_hot for k in shifts])
            show(sd.decode(edited), [f"channel {c} {k:+g}σ" for k in shifts], size=1.6)
        """),
        md("""
        On the shapes model's VAE, what a whole-channel shift moves is mostly the background, which
        most latent pixels hold: channel 0 down and channel 1 up darken it to grey and black, the other
        way they tint it; channels 2 and 3 up turn it grey or mauve. The square and the triangle keep
        their colours under every shift (their sizes move a little): an object's colour is not one
        channel but a combination of the four, in the latent pixels it covers. The next cell edits
        those pixels only, adding the difference between the latents of two colours.
        """),
        code("""
        if demo.shapes:
            def colour_vector(colour):
                \"\"\"The latent (4 numbers) at the centre of a large square of `colour`, drawn and encoded.\"\"\"
                thing = shapes_data.Thing("square", colour, "center", "large", (32, 32), 13.0)
                z = sd.vae.encode(preprocess_image(shapes_data.render(shapes_data.Scene((thing,), "white")))).mean
                h = z.shape[2] // 2
                return sd.vae.scaling_factor * z[0, :, h - 1:h + 1, h - 1:h + 1].mean(axis=(1, 2))

            vectors = {c: colour_vector(c) for c in colours}
            blue = np.abs(picture.astype(int) - shapes_data.COLOURS["blue"]).sum(axis=-1) < 60     # the square's pixels
            cover = blue.reshape(8, 8, 8, 8).mean(axis=(1, 3))            # share of each latent pixel it covers
            where = cover > 0.25
            recoloured = []
            for colour in colours:
                z = z_vae.copy()
                z[0][:, where] += (vectors[colour] - vectors["blue"])[:, None]
                recoloured.append(sd.decode(z)[0])
            # per pixel, the nearest named colour (objects' and backgrounds'): how much of the square took the
            # new colour, and how far the rest of the picture moved from the unedited decode
            palette = {**shapes_data.COLOURS, **shapes_data.BACKGROUNDS}
            unedited = sd.decode(z_vae)[0]
            objects = evaluate_shapes.object_mask(picture) | blue
            titles = []
            for colour, p in zip(colours, recoloured):
                names = [evaluate_shapes.nearest(rgb, palette) for rgb in 255 * p[blue]]
                share = names.count(colour) / len(names)
                rest = 255 * np.abs(p - unedited)[~objects].mean()
                titles.append(f"blue → {colour}\\n{share:.0%} of square {colour}\\nrest moved {rest:.0f}/255")
            show([picture] + recoloured, ["the picture"] + titles, size=1.8)
            print(f"edited {where.sum()} of {where.size} latent pixels; colour vectors:",
                  {c: [round(float(x), 1) for x in v] for c, v in vectors.items()})
        """),
        md("""
        Measured on the shapes model, per picture: the share of the square's pixels whose nearest
        named colour is the new one, and how far the rest of the picture moved (mean, in 1/255,
        outside both objects). Editing the 6 latent pixels under the square recolours it when the
        step is small: blue → purple turns 97% of the square purple and moves the rest by 5/255.
        The far colours go wrong: green 66% (the square loses its shape), red and yellow 55%, and
        those two smear the background by 28 and 39/255. A likely reason: the decoder's
        convolutions mix each latent pixel with its neighbours, and a large jump in a few latent
        pixels gives values the VAE never saw in a picture, whose error spreads. The VAE latent
        can be edited by hand, but only by small steps.
        """),
        md("""
        ## 6 · Live controls

        In Jupyter with ipywidgets (`pip install -e ".[notebooks]"`), the cells below are
        controls: move one and the picture is drawn again. Without them, or in the committed file
        (run with `TINYSD_NOTEBOOK_STATIC=1`), each shows a static grid instead: one row per
        control, the others at their defaults. The callbacks are `Redraw`, `DenoisingSteps` and
        (in notebook 3) `WordMaps` in `notebooks/_live.py`.

        The panel: guidance scale, steps, sampler, seed, img2img strength (1 is txt2img from the
        seed; below 1, img2img of the picture of section 5) and the position between the two
        prompts of section 2.
        """),
        code("""
        from _live import Choice, DenoisingSteps, Redraw, live

        redraw = Redraw(sd, prompt_a, prompt_b, picture)
        live(redraw,
             guidance_scale=Choice([1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0], default=7.5, grid=[1.0, 3.0, 7.5, 15.0]),
             num_inference_steps=Choice(sorted({2, 5, 10, 20, 30, 50, steps}), default=steps, grid=[2, 5, 10, steps, 50]),
             scheduler=Choice(["dpmpp_2m", "ddim", "euler", "euler_a", "pndm", "heun", "dpmpp_2m_karras"],
                              default=sampler, grid=["dpmpp_2m", "ddim", "euler_a", "heun"]),
             seed=Choice(range(100), default=0, grid=[0, 1, 2, 3]),
             strength=Choice([0.2, 0.4, 0.6, 0.8, 1.0], default=1.0),
             mix=Choice([round(t, 2) for t in np.linspace(0, 1, 21)], default=0.0, grid=[0.0, 0.25, 0.5, 0.75, 1.0]))
        """),
        md("""
        The denoising steps as a slider: x̂₀, the sampler's guess of the final picture after
        each step (notebook 4), decoded when the slider reaches it.
        """),
        code("""
        denoising = DenoisingSteps(sd, prompt_a, seed=0, num_inference_steps=steps)
        last = len(denoising) - 1
        live(denoising, step=Choice(range(len(denoising)), default=last, labels=[f"step {i + 1}" for i in range(last + 1)],
                                    grid=sorted({0, 1, 2, 4, last // 2, last})))
        """),
        md("""
        How long one redraw takes here (warm: the kernels compiled, the prompts encoded), the best
        and the median of 5, with the machine's load. `benchmarks/bench_shapes.py` measures the
        same per sampler.
        """),
        code("""
        import time

        seconds = []
        for seed in range(5):
            began = time.perf_counter()
            redraw(seed=seed, num_inference_steps=steps)
            seconds.append(time.perf_counter() - began)
        print(f"redraw, {steps} steps {sampler}, {demo.size}×{demo.size}, {sd.ops.name} backend: "
              f"best {min(seconds):.2f} s, median {np.median(seconds):.2f} s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        """),
        md("""
        ## What held up, measured on the shapes model

        | claim | measured here (committed outputs) |
        |---|---|
        | slerp keeps the noise's norm, lerp does not | yes: midpoints at ‖z‖ ≈ 16.0 against 11.3 (√n = 16) |
        | so lerp's midpoints make worse pictures | not visible on this model: 14 of 16 midpoints read the same, the rest differ in background only |
        | interpolating prompts gives meaningful transitions | a jump, with a mixed picture (purple, elsewhere) between the two prompts' pictures |
        | "red circle" − "red" + "blue" = "blue circle" (contexts) | taken literally: 22/40 colour swaps (55%), 1/36 shape swaps (3%) |
        | the same, with the word's difference inside aligned prompts | 37/40 (92%) and 34/36 (94%), as often as the target prompt itself |
        | arithmetic on start noises (background black / white) | black 5 → 18 of 24 seeds, white 12 → 21 of 24, objects unchanged |
        | editing VAE latent pixels recolours an object | a near colour (blue → purple, 97% of the square), not far ones (55-66%, smeared) |

        Success is read off the pictures by `training/evaluate_shapes.py` (colour and shape of the
        object, background colour), one seed per case; the counts are small, so a rate is good to
        a few percent at best.

        A redraw of the live panel (20 steps of DPM++ 2M, 64×64, `cpu` backend, warm) costs 0.28 s
        of CPU time: `python benchmarks/bench_shapes.py --blas-threads 1` measured best 0.28 s wall,
        0.28 s CPU (DDIM and Euler a 0.29 s CPU, Heun, 39 U-Net calls, 0.56 s). The outputs here
        were made on a shared 2-core machine at a load average of 10 to 12, where the median wall
        time was 0.71 s (the cell above) to 0.83 s (the benchmark): the 0.5 s target holds when
        the cores are free, not under that load. diffusers, on the same folder in the same
        benchmark run (`--backends diffusers,cpu`, one torch thread), took 1.31 s wall and 0.46 s
        CPU per redraw, against tinysd's 0.70 s and 0.28 s.
        """),
    ]


NOTEBOOKS["09_latent_space.ipynb"] = latent_space_notebook()


NOTEBOOKS["10_bigger_pictures.ipynb"] = [
    md("""
    # 10 · Bigger pictures

    SD v1 was trained on 512×512 pictures (the shapes model on 64×64). Asked straight for a
    picture twice that size it does not draw the subject larger: it fills the canvas with more
    of it. Three well-known ways get a larger picture by drawing at the model's size first:

    - **hires fix** (AUTOMATIC1111's): draw at W×H, upscale the latents (or the decoded picture),
      and repaint at 2W×2H by img2img, so the composition comes from the first pass;
    - **outpainting**: extend the canvas and paint only the new border, by inpainting;
    - **SD upscale**: upscale a picture and repaint it tile by tile, each tile at the model's size.

    And a VAE that decodes a large latent in overlapping **tiles**, so memory stays one tile's.
    Code: `tinysd/upscale.py` (hires fix, SD upscale), `tinysd/outpaint.py`, `tinysd/vae.py`.
    """, MODEL_NOTE),
    SETUP,
    md("""
    ## Hires fix

    The first pass is a plain txt2img. A *latent* upscaler ("Latent": bilinear on the 4 latent
    channels, exactly `torch.nn.functional.interpolate`) gives a blurred latent; an *image*
    upscaler ("Lanczos") decodes, resizes the picture and encodes it again. The second pass is
    img2img from that start, its noise drawn from the same seed, and A1111 counts its steps its
    own way: `hr_second_pass_steps` = N steps, the last N of a schedule of N / strength steps.
    """),
    code("""
    from tinysd.pngmeta import infotext
    from tinysd.upscale import HiresFix

    prompt = demo.prompt("a castle on a hill at sunset, detailed", "a red circle above a blue square")
    seed, steps, size = 3, demo.steps, demo.size
    base = dict(num_inference_steps=steps, seed=seed, scheduler="euler")
    first = sd(prompt, output_type="latent", **base).images
    hires = HiresFix(hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=steps // 2, denoising_strength=0.5)
    upscaled = hires.upscale_latents(first, size, size)          # (1, 4, 16, 16) for the shapes model
    total, strength = hires.steps(steps)
    print(f"first pass latents {first.shape}, upscaled {upscaled.shape}: the second pass runs the last "
          f"{hires.hr_second_pass_steps} steps of a {total}-step schedule")

    latent_fix = sd(prompt, output_type="np", enable_hr=True, hr_scale=2, hr_second_pass_steps=steps // 2,
                    denoising_strength=0.5, **base)
    lanczos_fix = sd(prompt, output_type="np", enable_hr=True, hr_scale=2, hr_upscaler="Lanczos",
                     hr_second_pass_steps=steps // 2, denoising_strength=0.3, **base)
    straight = sd(prompt, output_type="np", height=2 * size, width=2 * size, **base)
    show([sd.decode(first)[0], sd.decode(upscaled)[0], latent_fix.images[0], lanczos_fix.images[0],
          straight.images[0]],
         [f"first pass {size}²", "latents upscaled, decoded", "hires fix: Latent, 0.5", "hires fix: Lanczos, 0.3",
          f"straight at {2 * size}²"], size=2.4)
    print(infotext(prompt, "", latent_fix.parameters))
    """),
    md("""
    Drawn straight at 128×128, the shapes model (trained on 64×64 pictures) fills the canvas
    with a grid of small shapes on grey. The hires fix starts from the first pass's circle and
    square: with the Lanczos upscaler at strength 0.3 it keeps them (and adds two small
    squares); the bilinear latent upscale is blurred, so at 0.5 the second pass repaints more
    and fills the canvas with shapes of its own. This is why A1111's latent upscalers are used
    with a denoising strength of 0.5 or more and the image upscalers with less. The last line is
    the PNG `parameters` text the CLI writes (`python -m tinysd "..." --hr-scale 2 --hr-steps 10
    --hr-denoise 0.5`).
    """),
    md("""
    ## Outpainting

    `sd.outpaint(prompt, picture, right=32, up=16)` pads the canvas with the picture's edge
    pixels stretched outward plus noise, builds A1111's outpainting mask (white on the new
    border, reaching a few pixels into the picture and feathered by a Gaussian blur), and
    inpaints it. With `keep_unmasked=True` (its default) the picture's own pixels are pasted
    back where the mask is black, blended where it is grey.
    """),
    code("""
    from PIL import Image
    from tinysd.outpaint import outpaint_canvas

    picture = demo.picture()
    scene = demo.prompt("a portrait in a garden, oil painting", "a blue square to the left of a green triangle")
    sides = dict(right=size // 2, up=size // 4)
    canvas, mask = outpaint_canvas(Image.fromarray(picture), **sides, mask_blur=2, seed=seed)
    raw = sd.outpaint(scene, picture, **sides, mask_blur=2, keep_unmasked=False, output_type="np", **base)
    wide = sd.outpaint(scene, picture, **sides, mask_blur=2, output_type="np", **base)
    show([picture, canvas, mask, raw.images[0], wide.images[0]],
         ["picture", "canvas: edge stretched + noise", "mask (yellow: paint)", "inpainted",
          "original pasted back"], size=2.4, cmap="viridis")
    print(wide.images[0].shape, wide.parameters)
    """),
    md("""
    The shapes model continues the light background and adds a small triangle in the new space.
    Inside the picture the plain inpainting ("inpainted") went through the VAE and comes back
    soft, the square rounded; with the original pasted back the square and triangle keep their
    pixels, and the feathered seam hides the join.
    """),
    md("""
    ## Keep what was not masked

    Inpainting keeps the *latent* outside the mask, but the picture the VAE decodes from it
    changes there too: the decoder's convolutions and its attention see the repainted half. Here
    the right half is repainted and the left half measured, for four seeds, as the mean |change|
    in 1/255 steps; a plain VAE round trip of the picture is the floor a latent can reach.
    """),
    code("""
    from tinysd.pipeline import preprocess_image
    from tinysd.rng import Generator

    half = np.zeros((size, size), np.uint8)
    half[:, size // 2:] = 255
    left = (slice(None), slice(0, size // 2))
    repaint = demo.prompt("a vase of flowers", "a blue square to the left of a red circle")

    def change(image):
        return np.abs(np.asarray(image, np.float64)[left] * 255 - picture[left]).mean()

    rows = []
    for s in range(4):
        kw = dict(image=picture, mask_image=half, num_inference_steps=steps, seed=s, scheduler="ddim",
                  output_type="np")
        round_trip = sd.decode(sd.encode(preprocess_image(picture), Generator(s)))[0]
        rows.append([change(sd(repaint, **kw).images[0]), change(sd(repaint, keep_unmasked=True, **kw).images[0]),
                     change(round_trip)])
    for s, (plain, kept, trip) in enumerate(rows):
        print(f"seed {s}: inpainted {plain:6.2f}/255   keep_unmasked {kept:.4f}/255   VAE round trip {trip:5.2f}/255")
    print("mean:   inpainted {:6.2f}/255   keep_unmasked {:.4f}/255   VAE round trip {:5.2f}/255".format(
          *np.mean(rows, axis=0)))
    """),
    md("""
    Without it the kept half moves by 9-10/255 on three seeds and by 103/255 on seed 0, where
    the repainted half is dark and the decoder darkens the background of the whole picture; a
    plain VAE round trip moves it by 6.4/255. With `keep_unmasked=True` the unmasked half is
    the picture itself (0/255, up to float rounding). It is off by default in Python, where
    `sd(...)` returns what diffusers' inpainting pipeline returns, and on by default on the
    command line (`--no-keep-unmasked` turns it off).
    """),
    md("""
    ## SD upscale

    `sd.upscale(prompt, picture, scale=2)` is A1111's "SD upscale" script: Lanczos to twice the
    size, then img2img tile by tile (a tile is the model's own size, here 64×64), each tile with
    seed + k, and the tiles pasted back with their overlaps faded in linearly (A1111's
    `combine_grid`). However large the picture, the model only ever sees one tile.
    """),
    code("""
    from tinysd.upscale import split_grid, upscale_by

    small = (lanczos_fix.images[0][::2, ::2] * 255).round().astype(np.uint8)      # a 64×64 picture
    detail = demo.prompt("a detailed photograph, sharp focus", "")                 # one prompt for every tile
    big = sd.upscale(detail, small, scale=2, tile_size=size, overlap=size // 4, strength=0.3, **base)
    tiles = split_grid(upscale_by(Image.fromarray(small), 2), size, size, size // 4)
    print(f"{sd.num_tiles} tiles at x = {[t.x for t in tiles[0]]}, y = {[row[0].y for row in tiles]}")
    show([small, upscale_by(Image.fromarray(small), 2), big.images[0]],
         ["picture", "Lanczos ×2", "SD upscale ×2"], size=3)
    """),
    md("""
    The prompt is the same for every tile, so it should describe what any part of the picture
    may hold: given "a red circle above a blue square", the shapes model draws a circle and a
    square in every tile. Here it is empty. Each tile is repainted without seeing the picture
    around it, and the shapes model, trained on whole scenes on a light background, gives the
    tiles that are mostly one blue shape a grey background. This is the weakness of SD upscale
    that a ControlNet "tile" model addresses (`tile_arguments`, the hook for it, passes the tile
    to each call); with SD v1.5's 512-pixel tiles of a photograph it is much milder.
    """),
    md("""
    ## The tiled VAE

    `sd.enable_vae_tiling()` decodes (and encodes) in tiles of `vae.tile_latent_min_size`
    latents a quarter overlapping, each tile's overlap faded into its neighbour's: diffusers'
    rule, to the same numbers. By default tinysd tiles only where the untiled pass would need
    more than `vae.tiling_budget` (4 GiB): the decoder's widest activations, estimated by
    `vae.peak_bytes`, pass it above about 1180×1180 pixels for SD v1's VAE.
    """),
    code("""
    import json
    from pathlib import Path

    import tinysd
    from tinysd.vae import AutoencoderKL

    z = sd(prompt, output_type="latent", enable_hr=True, hr_scale=2, hr_upscaler="Lanczos",
           hr_second_pass_steps=steps // 2, denoising_strength=0.3, **base).images
    sd.disable_vae_tiling()
    untiled = sd.decode(z)[0]
    sd.enable_vae_tiling()          # tiles of 8 latents (64 pixels) for this VAE, every 6 latents
    tiled = sd.decode(z)[0]
    sd.vae.use_tiling = None        # back to the default: tile above the memory budget
    difference = np.abs(tiled - untiled)
    show([untiled, tiled, difference.max(axis=2)], ["untiled", "tiled", "|difference|"], size=2.6, cmap="magma")
    print(f"largest difference {difference.max() * 255:.1f}/255, mean {difference.mean() * 255:.2f}/255")

    config = Path(tinysd.__file__).parent / "data" / "sd-v1-5" / "vae" / "config.json"
    sd15 = AutoencoderKL(json.loads(config.read_text()))                       # the shapes only: no weights
    for side in (512, 768, 1024, 1536, 2048):
        gb = sd15.peak_bytes("decoder", 1, side, side) / 1e9
        print(f"SD v1.5 decode {side}×{side}: about {gb:4.1f} GB untiled -> "
              f"{'tiled' if sd15.tiles('decoder', (1, 4, side // 8, side // 8)) else 'untiled'} by default")
    """),
    md("""
    On the shapes model the tiled decode is far from the untiled one: each tile's decoder sees
    only its own 8×8 latents (its attention and its group norms too), and this small VAE,
    trained on whole 64×64 scenes, picks the background colour from the whole latent: tiles that
    hold mostly one shape come out dark. SD's VAE tiles at 512 pixels, a whole scene's worth of
    context per tile, where the seams are faint; still, a tiled decode is not the untiled one,
    which is why tinysd keeps the untiled decode wherever it fits in memory.
    `benchmarks/bench_large.py` measures a 2048×2048 decode both ways on SD v1.5-sized weights.
    """),
]


NOTEBOOKS["11_training.ipynb"] = [
    md("""
    # 11 · Training: the loss, the backward pass, a LoRA

    Sampling runs the U-Net forward; training teaches it what to predict. Take a training picture's
    latent z₀, pick a timestep t and a noise ε, noise the latent to

        z_t = √ᾱ_t · z₀ + √(1 − ᾱ_t) · ε,

    and ask the U-Net for ε back: the loss is L = ‖ε − ε_θ(z_t, t, c)‖², averaged, with c the
    caption's context. Its gradient flows back through every layer by the chain rule. tinysd
    writes that backward pass out by hand: each op in `tinysd/backend.py` has an `*_backward`
    beside it, and each block a `backward(saved, grad)` beside its `__call__` that undoes the
    forward's steps in reverse (no autograd engine; the tests check every gradient against
    torch.autograd). `tinysd/train.py` adds the noise schedule, the loss, AdamW, and LoRA and
    textual-inversion training.

    This notebook always runs on the packaged "shapes" model with the plain NumPy backend:
    training even a LoRA for SD v1.5 takes hours on a CPU, the shapes model's takes seconds.
    """),
    code("""
    import sys

    import numpy as np
    import matplotlib.pyplot as plt
    import tinysd
    from _model import TRAINING, shapes_picture, show
    from tinysd.pipeline import preprocess_image
    from tinysd.rng import Generator
    from tinysd.train import NoiseSchedule, diffusion_loss, named_modules

    sys.path.insert(0, str(TRAINING))      # training/shapes_data.py draws the shapes model's pictures
    import shapes_data

    sd = tinysd.load("shapes", backend="numpy")
    print('Running on the packaged "shapes" model (tinysd.load("shapes"), NumPy backend), whatever the other notebooks use.')
    schedule = NoiseSchedule(sd.scheduler_config)
    print(f"U-Net {sd.unet.num_parameters() / 1e6:.1f} M parameters, text encoder "
          f"{sd.text_encoder.num_parameters() / 1e6:.1f} M; {schedule.num_train_timesteps} training timesteps")
    """),
    md("""
    ## The forward diffusion as training data

    A training example is a picture's latent noised to a random t: the further along, the
    less of the picture is left (√ᾱ_t) and the more noise (√(1 − ᾱ_t)). Decoded, for one
    picture of the training set's kind:
    """),
    code("""
    pixels = shapes_picture()                                  # (64, 64, 3) uint8
    z0 = sd.encode(preprocess_image(pixels), Generator(0))      # (1, 4, 8, 8), scaled by 0.18215
    eps = np.random.default_rng(0).standard_normal(z0.shape).astype(np.float32)
    ts = [0, 100, 300, 500, 700, 999]
    noised = [schedule.add_noise(z0, eps, np.array([t])) for t in ts]
    show([sd.decode(z)[0] for z in noised],
         [f"t={t}: √ᾱ={np.sqrt(schedule.alphas_cumprod[t]):.2f}" for t in ts], size=1.8)
    """),
    md("""
    ## One training step, taken apart

    The caption through the text encoder, the noised latent through the U-Net (with `saved`, a
    dict in which the forward keeps the activations its backward needs), the loss and its
    gradient ∂L/∂ε̂ = 2(ε̂ − ε)/n, then `unet.backward`, which returns ∂L/∂z_t and ∂L/∂context
    and leaves each parameter's gradient in its module's `.grads`.
    """),
    code("""
    caption = "a blue square to the left of a green triangle"
    ids = sd.tokenizer(caption)                                 # (1, 77) token ids
    text_saved, unet_saved = {}, {}
    context = sd.text_encoder(ids, saved=text_saved)            # (1, 77, 64)
    t = np.array([500])
    z_t = schedule.add_noise(z0, eps, t)
    prediction = sd.unet(z_t, t, context, saved=unet_saved)     # ε̂, (1, 4, 8, 8)
    loss, grad = diffusion_loss(prediction, eps, np.ones(1))    # L and ∂L/∂ε̂
    dz, dcontext = sd.unet.backward(unet_saved, grad)
    sd.text_encoder.backward(text_saved, dcontext)              # on into the text encoder's weights
    print(f"loss {loss:.4f};  ∂L/∂z_t {dz.shape},  ∂L/∂context {dcontext.shape}")
    """),
    md("""
    Where the gradient lands. The backward visits the blocks in the reverse order of the
    forward: conv_out, the up path, the middle, the down path, conv_in. The up blocks took the
    down blocks' outputs as skip connections, so each down block's gradient is the sum of what
    came down the path and what came back along its skips. The text reaches the U-Net only
    through the cross-attentions' keys and values (attn2.to_k, to_v): their gradients are the
    ones that flow on into the text encoder. (On the shapes model's 8×8 latents the deepest
    level is 1×1, and far less gradient reaches it than the outer levels.)
    """),
    code("""
    def block_of(name):
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]

    norms, cross = {}, {}
    for name, module in named_modules(sd.unet):
        for key, g in getattr(module, "grads", {}).items():
            if g is None:
                continue
            norms[block_of(name)] = norms.get(block_of(name), 0.0) + float(np.sum(np.square(g)))
            if ".attn2.to_k" in name or ".attn2.to_v" in name:
                cross[block_of(name)] = cross.get(block_of(name), 0.0) + float(np.sum(np.square(g)))
    backward_order = list(reversed(list(norms)))
    fig, ax = plt.subplots(figsize=(9, 2.8))
    ax.bar(range(len(norms)), [np.sqrt(norms[b]) for b in backward_order], label="all parameters")
    ax.bar(range(len(norms)), [np.sqrt(cross.get(b, 0.0)) for b in backward_order], label="cross-attention k, v")
    ax.set_xticks(range(len(norms)), backward_order, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("‖∂L/∂θ‖")
    ax.set_yscale("log")
    ax.set_title("parameter gradients, in the order the backward reaches them")
    ax.legend()
    plt.show()
    """),
    md("""
    The gradient with respect to the input latent, and with respect to each of the 77 context
    vectors: the caption's words, the start and end tokens, and the padding after them (SD v1
    cross-attends to all 77 positions, so the padding gets gradient too).
    """),
    code("""
    n_words = int(np.argmax(ids[0] == ids[0, -1])) + 1      # start, the words, the end token (padding repeats it)
    per_token = np.linalg.norm(dcontext[0], axis=-1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 2.8), gridspec_kw={"width_ratios": [1, 3]})
    axes[0].imshow(np.linalg.norm(dz[0], axis=0), cmap="magma")
    axes[0].set_title("‖∂L/∂z_t‖ per latent pixel", fontsize=9)
    axes[0].set_axis_off()
    axes[1].bar(range(77), per_token)
    axes[1].axvline(n_words - 0.5, color="gray", ls=":")
    axes[1].set_xlabel("context position (dotted: end of the caption, padding after it)")
    axes[1].set_title("‖∂L/∂context‖ per token", fontsize=9)
    plt.show()
    sd.unet.zero_grad()
    sd.text_encoder.zero_grad()
    """),
    md("""
    ## A LoRA, trained live

    A LoRA freezes the model and adds to chosen linear layers a low-rank update,
    y = W x + (α/r) · B A x with A (r × in) and B (out × r), B starting at zero so that the
    model starts unchanged (`tinysd.train.LoRALinear`). Here rank 4 on every attention
    projection of the U-Net: 16 pictures of a large purple star, each captioned with a word the
    model never saw, "a zorb in the center". Before training the word means nothing to the model:
    """),
    code("""
    import tempfile
    from pathlib import Path

    from PIL import Image
    from tinysd.train import TrainConfig, remove_lora, train_lora

    folder = Path(tempfile.mkdtemp()) / "zorb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):          # kohya's layout: NAME.png beside NAME.txt
        background = str(rng.choice(list(shapes_data.BACKGROUNDS)))
        star = shapes_data.make_thing(rng, "star", "purple", "center", "large")
        Image.fromarray(shapes_data.render(shapes_data.Scene((star,), background))).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("a zorb in the center")

    prompt, seeds = "a zorb in the center", [0, 1, 2]
    before = [sd(prompt, seed=s, num_inference_steps=20).images[0] for s in seeds]
    show(before, [f"before, seed {s}" for s in seeds])
    """),
    md("""
    `train_lora` encodes the pictures once with the VAE, then runs AdamW steps: each draws a
    batch of pictures, timesteps and noise from the step's seed, runs the loss forward and
    backward as above, and updates only the adapters' A and B.
    """),
    code("""
    import time

    start = time.perf_counter()
    adapters, losses = train_lora(sd, folder, TrainConfig(steps=20, batch_size=8, learning_rate=1.2e-2, seed=0),
                                  rank=4, progress=False)
    trained = sum(a.lora_down.weight.size + a.lora_up.weight.size for a in adapters.values())
    print(f"{len(adapters)} adapters, {trained} trained numbers; {len(losses)} steps in {time.perf_counter() - start:.0f} s")
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.plot(losses, ".-")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    plt.show()
    """),
    md("""
    The same prompt and seeds with the adapters in the model, and again after `remove_lora`
    gives the layers back:
    """),
    code("""
    after = [sd(prompt, seed=s, num_inference_steps=20).images[0] for s in seeds]
    show(after, [f"with the LoRA, seed {s}" for s in seeds])
    remove_lora(sd.unet, adapters)
    again = sd(prompt, seed=0, num_inference_steps=20).images[0]
    print("without it again, seed 0 is the picture from before:", np.array_equal(np.asarray(again), np.asarray(before[0])))
    """),
    md("""
    `save_lora(path, adapters)` writes the adapters as a kohya `.safetensors` file, which
    `tinysd --lora` and diffusers' `load_lora_weights` both read (the tests check that diffusers
    draws the same picture from it). The command line does all of the above on a folder:

        python -m tinysd train-lora DATA --model shapes --rank 4 --steps 200 -o zorb.safetensors

    and `train-embedding` learns a new token's vector instead (textual inversion), with the
    whole model frozen. `training/train_shapes_lora.py` and `training/train_shapes_embedding.py`
    run longer versions with a pixel-level evaluation.
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
