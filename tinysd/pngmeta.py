"""Generation parameters in a PNG, written and read the way AUTOMATIC1111's web UI does.

A1111 stores them as one text chunk named `parameters` (tEXt; iTXt where the text is not
latin-1), three parts on separate lines:

    a cat in space
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly

The prompt may span several lines; the "Negative prompt:" line is left out when there is none.
The last line is `Key: value` pairs joined by ", "; a value holding ',', ':' or a newline is
written as a JSON string. Other tools (A1111's "PNG Info" tab, ComfyUI, civitai) read it back.
"""
from __future__ import annotations

import json
import re

# tinysd sampler name -> A1111's display name. A1111 >= 1.9 reads "X Karras" as sampler X with
# the Karras schedule; PNDM with skipped PRK steps is the PLMS sampler.
A1111_SAMPLER_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "lms_karras": "LMS Karras",
    "euler": "Euler",
    "euler_karras": "Euler Karras",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "lcm": "LCM",
    "tcd": "TCD",        # not in A1111 itself; the name Forge and ComfyUI give it
}

# One `Key: value` of the last line: the value is a JSON string or runs to the next comma.
PARAM = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
INT_KEYS = ("Steps", "Seed", "Batch size", "Batch pos", "Clip skip", "Hires steps", "Mask blur", "SD upscale overlap")
FLOAT_KEYS = ("CFG scale", "Denoising strength", "Hires upscale")


def quote(value):
    """A value as written in the parameters line: JSON-quoted if it holds ',', ':' or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


# The order A1111 writes its fields in; a generation's fields are written in this order, others after.
A1111_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
               "VAE hash", "VAE", "Batch size", "Batch pos", "Denoising strength", "Clip skip",
               # extra_generation_params, in the order A1111 adds them: img2img's, the hires fix's and SD
               # upscale's before any prompt is read, then the networks' and the prompt's
               "Mask blur", "Hires sampler", "Hires prompt", "Hires negative prompt", "Hires upscale",
               "Hires resize", "Hires steps", "Hires upscaler", "SD upscale overlap", "SD upscale upscaler",
               "Lora hashes", "TI hashes", "Pad conds")


def infotext(prompt, negative_prompt, fields):
    """The A1111 `parameters` text: the prompt, the negative prompt, and `fields` ({A1111 key:
    value}; None values left out) on the last line in A1111's order."""
    rank = {key: i for i, key in enumerate(A1111_ORDER)}
    keys = sorted((k for k, v in fields.items() if v is not None), key=lambda k: rank.get(k, len(rank)))
    line = ", ".join(f"{k}: {quote(fields[k])}" for k in keys)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def sampler_fields(sampler):
    """{"Sampler": A1111's display name} of a tinysd sampler name (e.g. 'euler_a' -> 'Euler a')."""
    return {"Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler)}


def format_parameters(prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height,
                      model=None, denoising_strength=None, batch_size=1, batch_pos=0):
    """The A1111 `parameters` text for one image. `sampler` is a tinysd name (e.g. 'euler_a').

    In a batch every image keeps the batch's seed and gets its `Batch pos`: diffusers draws the
    whole batch's noise from one generator, so image i is not A1111's `seed + i`.
    """
    fields = {
        "Steps": steps,
        **sampler_fields(sampler),
        "CFG scale": float(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
        "Denoising strength": float(denoising_strength) if denoising_strength is not None else None,
    }
    return infotext(prompt, negative_prompt, batch_fields(fields, batch_size, batch_pos))


def batch_fields(fields, batch_size, batch_pos):
    """`fields` with A1111's "Batch size"/"Batch pos" for image `batch_pos` of a batch (none for 1),
    and "Model" cleaned as A1111 cleans it."""
    fields = dict(fields)
    if fields.get("Model"):
        fields["Model"] = str(fields["Model"]).replace(",", "").replace(":", "")
    if batch_size > 1:
        fields.update({"Batch size": batch_size, "Batch pos": batch_pos})
    return fields


def parse_parameters(text):
    """The `parameters` text -> dict: "Prompt", "Negative prompt" and every key of the last line.

    The keys of INT_KEYS become ints, those of FLOAT_KEYS floats, Size a (width, height) tuple;
    other values stay strings.
    """
    *lines, last = text.strip().split("\n")
    if len(PARAM.findall(last)) < 3:          # no parameters line: all of it is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PARAM.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = json.loads(value)
        params[key] = _typed(key, value)
    return params


def _typed(key, value):
    if key in INT_KEYS:
        return int(value)
    if key in FLOAT_KEYS:
        return float(value)
    if key == "Size":
        width, height = value.split("x")
        return int(width), int(height)
    return value


def png_info(parameters):
    """A PngInfo carrying `parameters` (for `PIL.Image.save(path, pnginfo=...)`)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)    # tEXt, or iTXt where the text is not latin-1
    return info


def read_parameters(path):
    """The generation parameters of a PNG written by tinysd (or A1111) as a dict; see
    `parse_parameters`. Raises ValueError if the file has no `parameters` chunk."""
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", {}).get("parameters")
    if text is None:
        raise ValueError(f"{path}: no 'parameters' text chunk")
    return parse_parameters(text)
