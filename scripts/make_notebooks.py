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
    colour scale). In trained SD v1 the start token takes much of every pixel's attention (a
    "sink"), and the maps of the nouns outline where their objects are drawn.

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
    pieces = sd.tokenizer.tokenize(prompt)
    finest = max(recorder.maps)
    side = int(np.sqrt(finest))
    attn = recorder.maps[finest].reshape(side, side, 77)
    attn = attn / attn.sum(axis=-1, keepdims=True)                   # a distribution per pixel
    positions = list(range(1, len(pieces) + 2))
    names = pieces + ["<|endoftext|>"]
    maps = [attn[:, :, j] for j in positions]
    show([image] + maps, ["picture"] + [f"{name}\\n{m.mean():.1%} of attention" for name, m in zip(names, maps)],
         cmap="magma", size=1.8)
    print(f"<|startoftext|> takes {attn[:, :, 0].mean():.1%}, the {76 - len(pieces)} padding rows "
          f"{attn[:, :, len(pieces) + 2:].sum(axis=-1).mean():.1%}")
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

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                   record_timing=False).execute()
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
