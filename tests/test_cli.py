"""`python -m tinysd`: PNGs with A1111 parameters, the pipeline's pixels, one-line errors, no stray files.

Runs `tinysd.cli.main` in-process on the tiny seeded model of conftest.py (64×64, 2 steps,
numpy backend) and compares with `tinysd.load(folder)(...)` called with the same arguments.
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinysd.cli import main
from tinysd.pngmeta import format_parameters, parse_parameters, read_parameters

FAST = ["--backend", "numpy", "-W", "64", "-H", "64", "--steps", "2"]


@pytest.fixture(scope="module")
def sd(tiny_sd):
    import tinysd

    return tinysd.load(tiny_sd.folder, backend="numpy")


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_image(path, size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinysd: error: "), err
    return err[0]


# -- the parameters text -----------------------------------------------------------------------------
def test_parameters_text_is_a1111s():
    text = format_parameters("a cat in space", "blurry", 20, "euler_a", 7.5, 42, 512, 512,
                             model="v1-5-pruned-emaonly")
    assert text == ("a cat in space\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly")
    assert "Negative prompt" not in format_parameters("x", "", 20, "pndm", 7, 1, 64, 64)


def test_parameters_round_trip_quotes_and_lines():
    text = format_parameters("a cat,\nin space: at night", "blurry, dark", 3, "dpmpp_2m_karras", 5.0, 2 ** 64 - 1,
                             512, 768, model="my, model", denoising_strength=0.75, batch_size=2, batch_pos=1)
    p = parse_parameters(text)
    assert p["Prompt"] == "a cat,\nin space: at night"
    assert p["Negative prompt"] == "blurry, dark"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"]) == (3, "DPM++ 2M Karras", 5.0, 2 ** 64 - 1)
    assert (p["Size"], p["Model"], p["Denoising strength"]) == ((512, 768), "my model", 0.75)
    assert (p["Batch size"], p["Batch pos"]) == (2, 1)
    spelled = parse_parameters('p\nSteps: 1, Sampler: Euler, Note: "a, \\"b\\": c", Seed: 5')
    assert spelled["Note"] == 'a, "b": c' and spelled["Seed"] == 5


def test_read_parameters_needs_the_chunk(tmp_path):
    write_image(tmp_path / "plain.png", (8, 8), 0)
    with pytest.raises(ValueError, match="no 'parameters'"):
        read_parameters(tmp_path / "plain.png")


def test_help_documents_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")        # no line wrapping in the help text
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for default in ("default: 20", "default: 7.5", "pndm for SD v1.5", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        assert default in out
    assert "--model shapes is a small model of coloured shapes that ships with tinysd and works offline" in out


# -- generating ----------------------------------------------------------------------------------------
def test_txt2img_png_carries_parameters_and_the_pipelines_pixels(tiny_sd, sd, tmp_path, capsys):
    out = tmp_path / "cat.png"
    args = ["a cat in space", "-n", "blurry", "--seed", "42", "--sampler", "euler_a", "--cfg-scale", "6",
            "--model", str(tiny_sd.folder), "-o", str(out)] + FAST
    assert main(args) == 0
    assert "seed 42" in capsys.readouterr().out
    p = read_parameters(out)
    assert (p["Prompt"], p["Negative prompt"]) == ("a cat in space", "blurry")
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"]) == (2, "Euler a", 6.0, 42, (64, 64))
    assert p["Model"] == tiny_sd.folder.name and "Denoising strength" not in p
    expected = sd("a cat in space", negative_prompt="blurry", num_inference_steps=2, guidance_scale=6.0,
                  height=64, width=64, seed=42, scheduler="euler_a").images[0]
    np.testing.assert_array_equal(pixels(out), np.asarray(expected))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["cat.png"]       # no temporary file left


def test_defaults_random_seed_named_file_model_sampler(tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["a cat", "--model", str(tiny_sd.folder)] + FAST) == 0
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    p = read_parameters(files[0])
    assert files[0].name == f"tinysd-{p['Seed']}.png"
    assert f"seed {p['Seed']}" in capsys.readouterr().out
    assert p["Sampler"] == "PLMS"          # the model's own scheduler: PNDMScheduler


def test_img2img_batch(tiny_sd, sd, tmp_path):
    init = write_image(tmp_path / "init.png", (70, 66), seed=1)   # its size, rounded down to 64×64, is the default
    out = tmp_path / "out" / "b.png"
    out.parent.mkdir()
    args = ["a dog", "--seed", "7", "--init-image", str(init), "--strength", "0.5", "--batch-size", "2",
            "--sampler", "ddim", "--model", str(tiny_sd.folder), "-o", str(out), "--backend", "numpy", "--steps", "2"]
    assert main(args) == 0
    expected = sd("a dog", num_inference_steps=2, seed=7, scheduler="ddim", image=str(init), strength=0.5,
                  num_images_per_prompt=2).images
    assert sorted(f.name for f in out.parent.iterdir()) == ["b-0.png", "b-1.png"]
    for i in range(2):
        path = out.parent / f"b-{i}.png"
        p = read_parameters(path)
        assert (p["Size"], p["Denoising strength"], p["Batch size"], p["Batch pos"]) == ((64, 64), 0.5, 2, i)
        np.testing.assert_array_equal(pixels(path), np.asarray(expected[i]))
    assert not np.array_equal(pixels(out.parent / "b-0.png"), pixels(out.parent / "b-1.png"))


def test_inpainting(tiny_sd, sd, tmp_path):
    init = write_image(tmp_path / "init.png", (64, 64), seed=2)
    mask = tmp_path / "mask.png"
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 16:48] = 255
    Image.fromarray(m, "L").save(mask)
    out = tmp_path / "inpainted.png"
    args = ["a hat", "--seed", "3", "--init-image", str(init), "--mask", str(mask), "--model", str(tiny_sd.folder),
            "-o", str(out)] + FAST
    assert main(args) == 0
    assert read_parameters(out)["Denoising strength"] == 1.0      # diffusers' inpainting default
    expected = sd("a hat", num_inference_steps=2, height=64, width=64, seed=3, image=str(init),
                  mask_image=str(mask), keep_unmasked=True).images[0]     # on by default in the CLI
    np.testing.assert_array_equal(pixels(out), np.asarray(expected))
    np.testing.assert_array_equal(pixels(out)[m == 0], pixels(init)[m == 0])


# -- A1111's prompts: syntax, long prompts, embeddings by file name, clip skip --------------------------
LONG_PROMPT = ("masterpiece, (a cat:1.3) sitting on a [wooden] chair, mything, soft light, ((intricate fur)), " * 4
               + "BREAK a second (cat:0.8)")


def write_embeddings(folder, tiny_sd):
    """An A1111 .pt (2 vectors) and an EasyNegative-style .safetensors (3 vectors), and a file for
    another model (768 wide), which is skipped."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    width = tiny_sd.configs["text_encoder"]["hidden_size"]
    gen = torch.Generator().manual_seed(0)
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=gen)}, "name": "stored"}, folder / "mything.pt")
    save_file({"emb_params": torch.randn(3, width, generator=gen)}, str(folder / "easyneg.safetensors"))
    save_file({"emb_params": torch.randn(1, 768, generator=gen)}, str(folder / "sd15only.safetensors"))
    return folder


def test_a1111_prompt_embeddings_and_clip_skip(tiny_sd, tmp_path, capsys):
    """The default: A1111's syntax, any length (3 chunks here), embeddings by file name, clip skip
    2 = diffusers' clip_skip=1; the PNG keeps the prompt as typed and A1111's fields."""
    import hashlib

    import tinysd
    from tinysd.embeddings import load_dir

    folder = write_embeddings(tmp_path / "embeddings", tiny_sd)
    out = tmp_path / "long.png"
    args = [LONG_PROMPT, "-n", "easyneg, (blurry:1.2)", "--seed", "5", "--embeddings-dir", str(folder),
            "--clip-skip", "2", "--model", str(tiny_sd.folder), "-o", str(out)] + FAST
    assert main(args) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tinysd:")]
    assert len(warning) == 1 and "sd15only.safetensors" in warning[0] and "768 wide" in warning[0]
    p = read_parameters(out)
    assert (p["Prompt"], p["Negative prompt"], p["Clip skip"], p["Pad conds"]) == (
        LONG_PROMPT, "easyneg, (blurry:1.2)", 2, "True")
    short = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()[:12]
             for name in ("mything.pt", "easyneg.safetensors")}
    assert p["TI hashes"] == f"mything: {short['mything.pt']}, easyneg: {short['easyneg.safetensors']}"
    sd = tinysd.load(tiny_sd.folder, backend="numpy")
    load_dir(sd, folder, warn=lambda line: None)
    expected = sd(LONG_PROMPT, negative_prompt="easyneg, (blurry:1.2)", num_inference_steps=2, height=64, width=64,
                  seed=5, prompt_weighting=True, clip_skip=1)
    np.testing.assert_array_equal(pixels(out), np.asarray(expected.images[0]))
    assert sd.encode_prompt(LONG_PROMPT, prompt_weighting=True).shape[1] == 3 * 77


def test_no_prompt_weighting_reads_the_prompt_as_diffusers(tiny_sd, sd, tmp_path):
    prompt = "a (cat:1.5) in space"
    for flags, name in (([], "a1111.png"), (["--no-prompt-weighting"], "plain.png")):
        assert main([prompt, "--seed", "4", "--model", str(tiny_sd.folder), "-o", str(tmp_path / name)]
                    + flags + FAST) == 0
        assert "Clip skip" not in read_parameters(tmp_path / name)
    expected = sd(prompt, num_inference_steps=2, height=64, width=64, seed=4).images[0]
    np.testing.assert_array_equal(pixels(tmp_path / "plain.png"), np.asarray(expected))
    assert not np.array_equal(pixels(tmp_path / "a1111.png"), pixels(tmp_path / "plain.png"))


# -- mistakes: one line on stderr, a non-zero exit, no file ---------------------------------------------
ERRORS = {
    "unknown sampler": (["--sampler", "nope"], "unknown sampler 'nope'"),
    "size not a multiple of 8": (["-W", "65"], "multiple of 8"),
    "unreadable init image": (["--init-image", "{tmp}/text.png"], "--init-image: cannot read image"),
    "missing init image": (["--init-image", "{tmp}/absent.png"], "--init-image: cannot read image"),
    "unreadable mask": (["--init-image", "{tmp}/ok.png", "--mask", "{tmp}/text.png"], "--mask: cannot read image"),
    "mask without init image": (["--mask", "{tmp}/ok.png"], "--mask needs --init-image"),
    "output folder missing": (["-o", "{tmp}/no/such/folder/x.png"], "does not exist"),
    "output under a file": (["-o", "{tmp}/text.png/x.png"], "does not exist"),
    "output is a folder": (["-o", "{tmp}/dir.png"], "is a folder"),
    "output not png": (["-o", "{tmp}/x.jpg"], "must end in .png"),
    "no weights, no network": (["--model", "nobody/no-such-model"], "not in the Hugging Face cache"),
    "no weights: the shipped model is named": (["--model", "nobody/no-such-model"], '"a red circle" --model shapes'),
    "init image under 8 pixels": (["--init-image", "{tmp}/tiny.png"],
                                  "tiny.png: 1x1 pixels, under 8 pixels a side (sizes are multiples of 8); resize it, "
                                  "or pass -W and -H"),
    "init image under 8 pixels high": (["--init-image", "{tmp}/tiny.png", "-W", "64"], "--init-image"),
    "not a model folder": (["--model", "{tmp}/dir.png"], "not a diffusers SD folder"),
    "single file without a VAE": (["--model", "{tmp}/novae.safetensors"], "it lacks the VAE"),
    "strength leaves no step": (["--init-image", "{tmp}/ok.png", "--strength", "0.1", "--sampler", "ddim"],
                                "leaves no denoising step"),
    "cuda without a GPU": (["--backend", "cuda"], "needs an NVIDIA GPU"),
    "no embeddings folder": (["--embeddings-dir", "{tmp}/absent"], "--embeddings-dir {tmp}/absent: no such folder"),
    "clip skip 0": (["--clip-skip", "0"], "--clip-skip: must be from 1 (the last layer) to 12"),
    "clip skip past the layers": (["--clip-skip", "4"], "clip_skip must be an integer from 0 to 2"),
    "weight not a number": (["--negative-prompt", "(a:1.2.3)"], "the weight in ':1.2.3)' is not a number"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_and_leave_no_file(case, tiny_sd, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "text.png").write_text("not an image")
    write_image(tmp_path / "ok.png", (64, 64), seed=0)
    write_image(tmp_path / "tiny.png", (1, 1), seed=0)
    (tmp_path / "dir.png").mkdir()
    if case == "single file without a VAE":
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in tiny_sd.original.items()
                   if not k.startswith("first_stage_model.")}, str(tmp_path / "novae.safetensors"))
    before = sorted(tmp_path.rglob("*"))
    extra, message = ERRORS[case]
    extra = [a.format(tmp=tmp_path, single=tiny_sd.single_safetensors) for a in extra]
    message = message.format(tmp=tmp_path)
    base = ["a cat", "--seed", "1", "--model", str(tiny_sd.folder), "--backend", "numpy", "--steps", "2"]
    if case == "cuda without a GPU":
        # in a fresh process: this session's numba may be running the CUDA simulator
        if os.path.exists("/dev/nvidiactl"):
            pytest.skip("a GPU is present: --backend cuda works here")
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        r = subprocess.run([sys.executable, "-m", "tinysd", *base, *extra], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
    else:
        assert main(base + extra) != 0
        assert message in one_error_line(capsys)
    assert sorted(tmp_path.rglob("*")) == before


def test_small_init_image_fails_before_the_model_loads(tiny_sd, tmp_path, capsys, monkeypatch):
    import tinysd

    monkeypatch.setattr(tinysd, "load", lambda *a, **k: pytest.fail("the model loaded before the size check"))
    write_image(tmp_path / "tiny.png", (5, 70), seed=0)
    assert main(["a cat", "--init-image", str(tmp_path / "tiny.png"), "-o", str(tmp_path / "x.png")]) == 2
    assert one_error_line(capsys) == (f"tinysd: error: --init-image {tmp_path / 'tiny.png'}: 5x70 pixels, under 8 "
                                      f"pixels a side (sizes are multiples of 8); resize it, or pass -W and -H to set "
                                      f"the output size")


def test_small_init_image_with_a_size_is_resized(tiny_sd, sd, tmp_path):
    init = write_image(tmp_path / "tiny.png", (1, 1), seed=4)
    out = tmp_path / "out.png"
    assert main(["a dog", "--seed", "2", "--init-image", str(init), "--model", str(tiny_sd.folder), "-o", str(out)]
                + FAST) == 0
    expected = sd("a dog", num_inference_steps=2, seed=2, image=str(init), height=64, width=64, strength=0.8).images[0]
    np.testing.assert_array_equal(pixels(out), np.asarray(expected))


def test_readme_first_command_offline_names_the_shipped_model(tmp_path, capsys, monkeypatch):
    """`python -m tinysd "a cat in space"` with no hub and an empty cache: one line that says what works offline."""
    from huggingface_hub import constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    assert main(["a cat in space", "--backend", "numpy"]) == 1
    line = one_error_line(capsys)
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5' is not in the Hugging Face cache" in line
    assert '`python -m tinysd "a red circle" --model shapes`' in line
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point_exits_non_zero_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinysd", "a cat", "--mask", "m.png"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 2
    assert r.stderr.strip() == "tinysd: error: --mask needs --init-image (the picture to inpaint)"


# -- malformed weight files: one line naming the file and the rule, exit 1, never a traceback or a signal --
def bad_model_files(folder, tiny_sd):
    """{case: (file, words of the error)}: cut, mangled and malicious single files."""
    from test_weights import Call, program, tensor_program, write_ckpt
    single = tiny_sd.single_safetensors.read_bytes()
    (n,) = struct.unpack("<Q", single[:8])
    header = single[8: 8 + n]
    duplicated = b"{" + header[1: header.index(b"},") + 2] + header[1:]        # its first entry twice
    entries = json.loads(header)
    first = next(e for e in entries.values() if isinstance(e, dict) and e.get("data_offsets", [1])[0] == 0)
    first["data_offsets"] = [o + 4 for o in first["data_offsets"]]            # 4 bytes later: a hole, then an overlap
    shifted = json.dumps(entries).encode()
    files = {
        "safetensors cut in half": (single[: len(single) // 2], "truncated data section"),
        "safetensors header length past the end": (struct.pack("<Q", len(single)) + single[8:], "truncated safetensors header"),
        "safetensors duplicate key": (struct.pack("<Q", len(duplicated)) + duplicated + single[8 + n:], "twice"),
        "safetensors shifted offsets": (struct.pack("<Q", len(shifted)) + shifted + single[8 + n:], "data begins at byte 4"),
        "safetensors deeply nested": (struct.pack("<Q", 200_002) + b"[" * 100_001 + b"]" * 100_001, "nests 100001 levels"),
        "ckpt negative stride": (tensor_program(3, (4,), (-1,)), "offset, sizes and strides must be ≥ 0"),
        "ckpt os.system": (program(Call(os.system, "echo pwned")), f"the global {os.system.__module__}.system"),
        "ckpt cut in half": (tiny_sd.single_ckpt.read_bytes()[: tiny_sd.single_ckpt.stat().st_size // 2],
                             "not a PyTorch zip checkpoint"),
        "ckpt empty": (b"", "not a PyTorch zip checkpoint"),
    }
    paths = {}
    for case, (data, message) in files.items():
        suffix = ".ckpt" if case.startswith("ckpt") else ".safetensors"
        path = folder / (case.replace(" ", "-").replace(".", "") + suffix)
        if case in ("ckpt negative stride", "ckpt os.system"):
            write_ckpt(path, data, [("0", b"\0" * 16)])
        else:
            path.write_bytes(data)
        paths[case] = (path, message)
    return paths


@pytest.fixture(scope="module")
def bad_models(tiny_sd, tmp_path_factory):
    pytest.importorskip("torch")
    return bad_model_files(tmp_path_factory.mktemp("bad-models"), tiny_sd)


@pytest.mark.parametrize("case", ["safetensors cut in half", "safetensors header length past the end",
                                  "safetensors duplicate key", "safetensors shifted offsets", "safetensors deeply nested",
                                  "ckpt negative stride", "ckpt os.system", "ckpt cut in half", "ckpt empty"])
def test_malformed_model_file_is_one_line(case, bad_models, tmp_path, capsys):
    path, message = bad_models[case]
    assert main(["a cat", "--model", str(path), "-o", str(tmp_path / "x.png")] + FAST) == 1
    line = one_error_line(capsys)
    assert str(path) in line and message in line, line
    assert not list(tmp_path.iterdir())


def test_the_file_that_segfaulted_now_exits_1_with_one_line(bad_models, tmp_path):
    path, message = bad_models["ckpt negative stride"]
    r = subprocess.run([sys.executable, "-m", "tinysd", "a cat", "--model", str(path), "--backend", "numpy"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and message in lines[0] and str(path) in lines[0], (r.returncode, r.stderr)
