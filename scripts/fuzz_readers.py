"""Fuzz tinysd's checkpoint readers (tinysd.weights.read_safetensors / read_ckpt) with mutated
files, and compare every mutant with the official readers.

    nice -n 10 python scripts/fuzz_readers.py --mutants 100000            # both formats
    python scripts/fuzz_readers.py --format ckpt --mutants 2000 --seed 3 --out fuzz-out
    python scripts/fuzz_readers.py --replay fuzz-out ckpt 1234           # one mutant again, verbose

Seeds: small real files written by the reference savers (safetensors.numpy.save_file,
safetensors.torch.save_file, torch.save): a state dict with several dtypes, views and an empty
tensor, an A1111 textual-inversion embedding (.pt with a dict or a ParameterDict, .safetensors
with emb_params), kohya and diffusers LoRA files, and a .pt holding NumPy arrays, a set and a
torch.Size. Mutant i of a format is a pure function of (--seed, format, i), so any line of the
table can be reproduced with --replay.

Mutations. safetensors: byte flips, truncations, extensions, edits of the 8-byte header length,
and edits of the header JSON (data_offsets, shapes, dtypes, duplicate keys, nesting, huge
numbers, NaN/Infinity, floats, __metadata__, unknown fields, invalid UTF-8 and surrogates,
whitespace and trailing bytes). ckpt: byte flips (which break zip CRCs), truncations, edits of
zip fields (compression method, flags, sizes, offsets, name lengths), member edits (missing,
duplicated, renamed, deflated, resized members, version and byteorder records), and pickle
edits re-zipped with correct CRCs (integers: storage offsets, sizes, strides, numel, memo
indices; strings: storage keys and types; globals swapped for forbidden or other allowed ones;
opcodes deleted, duplicated, swapped, inserted; bytes flipped).

Each mutant is loaded by tinysd and by the official reader in separate long-lived worker
processes, so a crash (a signal) or a hang (--timeout seconds) is caught and attributed. The
official readers: safetensors.numpy.load_file (safetensors.torch.load_file for the dtypes NumPy
lacks, BF16 and F8), and torch.load(weights_only=True) with the same extra globals tinysd allows
(ParameterDict, NumPy arrays and scalars), so that the comparison is about the format, not the
allow-list.

The table: mutants; crashes; hangs; exceptions other than CheckpointError (all tinysd's, to be 0);
files tinysd loads that the official reader rejects; files the official reader loads that tinysd
rejects; files both load with different contents; each class broken down by the reason given
(the message with names and numbers blanked). Interesting mutants are written to --out.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import select
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {"safetensors": ".safetensors", "ckpt": ".ckpt"}


# Seeds: small real files from the reference savers


def make_seeds(folder):
    """Write the seed files into `folder`; returns {format: [paths]}."""
    import torch
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    st = {
        "state_dict": ({"conv.weight": f32(2, 3, 3, 3), "conv.bias": f32(2), "norm.weight": f32(5).astype(np.float16),
                        "ids": np.arange(4, dtype=np.int64), "mask": np.array([True, False, True]),
                        "empty": np.zeros((0, 3), np.float32), "scale": np.array(0.5, np.float32)}, {"format": "pt"}),
        "embedding": ({"emb_params": f32(2, 16)}, None),
        "lora": ({f"lora_unet_down_blocks_0_attentions_0_proj_in.{k}": v for k, v in
                  (("lora_down.weight", f32(4, 16).astype(np.float16)), ("lora_up.weight", f32(16, 4).astype(np.float16)),
                   ("alpha", np.array(4, np.float16)))}
                 | {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": f32(4, 8).astype(np.float16)},
                 {"ss_network_dim": "4", "ss_network_alpha": "4"}),
    }
    paths = {"safetensors": [], "ckpt": []}
    for name, (tensors, metadata) in st.items():
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata=metadata)
        paths["safetensors"].append(folder / f"{name}.safetensors")
    save_torch({"w": torch.randn(3, 4, generator=g).bfloat16(), "b": torch.randn(4, generator=g)},
               str(folder / "bf16.safetensors"))
    paths["safetensors"].append(folder / "bf16.safetensors")

    base = torch.randn(3, 4, generator=g)
    ckpts = {
        "state_dict": {"state_dict": {"model.conv.weight": torch.randn(2, 3, 3, 3, generator=g), "model.conv.bias": base[0],
                                      "half": base.half(), "bf16": base.bfloat16(), "ids": torch.arange(4),
                                      "transposed": base.t(), "column": base[:, 1], "expanded": base[:1].expand(3, 4),
                                      "mask": base > 0, "empty": torch.zeros(0, 2)},
                       "global_step": 7, "epoch": np.int64(3)},
        "embedding_a1111": {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 16, generator=g).requires_grad_()},
                            "name": "emb", "step": 100, "sd_checkpoint": "e6e8e1fc", "sd_checkpoint_name": "v1-5"},
        "embedding_parameterdict": {"string_to_token": {"*": torch.tensor(265)}, "name": "emb", "step": 5,
                                    "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, 16, generator=g))})},
        "lora_diffusers": {"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.randn(4, 16, generator=g),
                           "unet.down_blocks.0.attentions.0.proj_in.lora.up.weight": torch.randn(16, 4, generator=g).half()},
        "numpy": {"array": np.arange(6.0).reshape(2, 3), "fortran": np.asfortranarray(np.ones((2, 3), np.float32)),
                  "scalar": np.float32(2), "set": {1, 2}, "size": torch.Size([2, 3])},
    }
    for name, obj in ckpts.items():
        torch.save(obj, folder / f"{name}.ckpt")
        paths["ckpt"].append(folder / f"{name}.ckpt")
    return paths


# Mutations


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 65535, 2**31 - 1, 2**31, 2**32, 2**53, 2**62, 2**63 - 1, 2**63,
               2**64 - 1, 2**64, 10**30]


def interesting_int(rng, near=None):
    r = rng.random()
    if near is not None and r < 0.4:
        return near + rng.choice([-8, -4, -2, -1, 1, 2, 4, 8, 16])
    if r < 0.55:
        return -rng.choice(INTERESTING[1:])
    if r < 0.9:
        return rng.choice(INTERESTING)
    return rng.randrange(-2**40, 2**40)


def flip_bytes(raw, rng, lo=0, hi=None):
    data = bytearray(raw)
    hi = len(data) if hi is None else hi
    if hi <= lo:
        return bytes(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 4, 8])):
        i = rng.randrange(lo, hi)
        data[i] = rng.randrange(256) if rng.random() < 0.5 else data[i] ^ (1 << rng.randrange(8))
    return bytes(data)


def truncate(raw, rng, marks=()):
    if marks and rng.random() < 0.5:
        return raw[: max(0, rng.choice(marks) + rng.randint(-3, 3))]
    return raw[: rng.randrange(len(raw))]


def extend(raw, rng):
    return raw + bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 3, 8, 16, 100])))


# -- safetensors


def split_safetensors(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8: 8 + n], raw[8 + n:]


def pack_safetensors(text, data, rng=None, length=None):
    header = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if rng is not None and rng.random() < 0.7:
        header += b" " * (-len(header) % 8)                 # the reference writer pads to 8 bytes
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def mutate_safetensors(raw, rng):
    n, header, data = split_safetensors(raw)
    kind = rng.choice(["flip", "flip_header", "truncate", "extend", "length", "json", "json", "json", "json", "text"])
    if kind == "flip":
        return flip_bytes(raw, rng), kind
    if kind == "flip_header":
        return flip_bytes(raw, rng, 8, 8 + n), kind
    if kind == "truncate":
        return truncate(raw, rng, marks=(8, 8 + n, len(raw))), kind
    if kind == "extend":
        return extend(raw, rng), kind
    if kind == "length":
        new = max(0, min(2**64 - 1, interesting_int(rng, near=n) if rng.random() < 0.8 else rng.randrange(2**64)))
        return struct.pack("<Q", new) + raw[8:], kind
    if kind == "text":
        return mutate_header_text(header.decode(), data, rng)
    return mutate_header_json(json.loads(header), data, rng)


def mutate_header_json(header, data, rng):
    tensors = [k for k in header if k != "__metadata__"]
    name = rng.choice(tensors) if tensors else None
    info = header[name] if name else None
    edit = rng.choice(["offsets", "offsets", "swap_offsets", "overlap", "shape", "shape", "dtype", "delete_field",
                       "delete_tensor", "unknown_field", "metadata", "nesting", "number", "top_level", "many_dims"])
    if info is None and edit not in ("metadata", "top_level"):
        edit = "metadata"
    if edit == "offsets":
        i = rng.randrange(2)
        r = rng.random()
        info["data_offsets"][i] = (interesting_int(rng, near=info["data_offsets"][i]) if r < 0.7 else
                                   rng.choice([1.0 * info["data_offsets"][i], 1e300, str(info["data_offsets"][i]), None, -0.0]))
        if rng.random() < 0.2:
            info["data_offsets"] = info["data_offsets"][:rng.choice([0, 1])] + [0] * rng.choice([0, 1, 2])
    elif edit == "swap_offsets" and len(tensors) > 1:
        other = header[rng.choice([t for t in tensors if t != name])]
        info["data_offsets"], other["data_offsets"] = other["data_offsets"], info["data_offsets"]
    elif edit == "overlap":
        shift = rng.choice([1, 2, 3, 4, 8, -1, -2, -4])
        info["data_offsets"] = [o + shift for o in info["data_offsets"]] if rng.random() < 0.5 else \
            [info["data_offsets"][0] + shift, info["data_offsets"][1]]
    elif edit == "shape":
        shape = info["shape"]
        r = rng.random()
        if shape and r < 0.6:
            shape[rng.randrange(len(shape))] = (interesting_int(rng, near=shape[0]) if rng.random() < 0.7 else
                                                rng.choice([1e300, 1.5, 2.0, "2", None, [2], -1e300]))
        elif r < 0.8:
            shape.append(rng.choice([1, 0, 2, 2**32]))
        elif shape:
            shape.pop(rng.randrange(len(shape)))
        else:
            info["shape"] = rng.choice([None, "[]", {}, [[]]])
    elif edit == "many_dims":
        info["shape"] = [1] * rng.choice([63, 64, 65, 200]) + info["shape"]
    elif edit == "dtype":
        info["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64",
                                    "BOOL", "C64", "F8_E4M3", "F8_E5M2", "F4", "F17", "f32", "", "F32 ", 0, None, ["F32"]])
    elif edit == "delete_field":
        del info[rng.choice(list(info))]
    elif edit == "delete_tensor":
        del header[name]
    elif edit == "unknown_field":
        info[rng.choice(["foo", "offsets", "dtype2"])] = rng.choice([1, 1.5, "x", [1, [2]], {"a": 1}, None, 10**25])
    elif edit == "metadata":
        header["__metadata__"] = rng.choice([None, {"format": 1}, {"format": ["pt"]}, {"a": {"b": "c"}}, ["format"],
                                             "pt", {"format": "pt", "x": None}, {"\ud800": "x"}, {"format": "pt"}])
    elif edit == "nesting":                      # written as text below: json.dumps itself recurses
        info[rng.choice(["shape", "data_offsets", "extra"])] = "NESTED"
    elif edit == "number":
        text = json.dumps(header)
        numbers = list(re.finditer(r"-?\d+", text))
        if numbers:
            m = rng.choice(numbers)
            token = rng.choice(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" * 30, "-0", "1E3", "0x10",
                                "1.0", "99999999999999999999", "18446744073709551616", "-1"])
            return pack_safetensors(text[: m.start()] + token + text[m.end():], data, rng), "json:number"
    elif edit == "top_level":
        header = rng.choice([[header], "x", 1, None, {"a": header}])
    text = json.dumps(header, separators=(",", ":"), allow_nan=True)
    if edit == "nesting":
        depth = rng.choice([10, 126, 127, 128, 129, 1000, 100000])
        text = text.replace('"NESTED"', "[" * depth + "1" + "]" * depth)
    if rng.random() < 0.1:                                                # forget to fix the length
        return pack_safetensors(text, data, length=max(0, len(text) + rng.choice([-3, -1, 1, 3]))), f"json:{edit}"
    return pack_safetensors(text, data, rng), f"json:{edit}"


def mutate_header_text(text, data, rng):
    edit = rng.choice(["duplicate", "bom", "trailing", "whitespace", "bad_utf8", "surrogate", "cut_json", "nul_pad"])
    if edit == "duplicate":
        entries = list(re.finditer(r'"[^"]+":\{[^{}]*\}', text))
        if entries:
            m = rng.choice(entries)
            text = text[: m.end()] + "," + m.group() + text[m.end():]
    elif edit == "bom":
        text = "\ufeff" + text
    elif edit == "trailing":
        text = text.rstrip() + rng.choice(["}", ",", "x", "{}", "\0", " \t\n\r"])
    elif edit == "whitespace":
        text = rng.choice([" ", "\n", "\t", "\r\n", "\x0b"]) + text
    elif edit == "bad_utf8":
        raw = bytearray(text.encode())
        quotes = [m.start() for m in re.finditer('"', text)]
        i = rng.choice(quotes) + 1 if quotes else 0
        raw[i:i] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82"])
        return pack_safetensors(bytes(raw), data, rng), f"text:{edit}"
    elif edit == "surrogate":
        text = text.replace('"', '"\\ud800', 1) if rng.random() < 0.5 else text.replace('":"', '":"\\udfff', 1)
    elif edit == "cut_json":
        text = text[: rng.randrange(len(text))]
    elif edit == "nul_pad":
        return pack_safetensors(text.rstrip().encode() + b"\0" * rng.randint(1, 7), data), f"text:{edit}"
    return pack_safetensors(text, data, rng), f"text:{edit}"


# -- ckpt


class CkptSeed:
    """A torch.save file taken apart once: its zip members and its pickle's opcodes."""

    def __init__(self, raw):
        import io
        import pickletools

        self.raw = raw
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            self.members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
            self.infos = z.infolist()
        self.pkl_name = next(n for n, _ in self.members if n.endswith("/data.pkl"))
        self.pkl = dict(self.members)[self.pkl_name]
        ops = list(pickletools.genops(self.pkl))
        self.ops = [(op.name, arg, pos, (ops[k + 1][2] if k + 1 < len(ops) else len(self.pkl)))
                    for k, (op, arg, pos) in enumerate(ops)]

    def rezip(self, members):
        import io
        import warnings
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z, warnings.catch_warnings():
            warnings.simplefilter("ignore")             # "Duplicate name": the point of the mutation
            for name, data, *compress in members:
                z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data,
                           compress_type=compress[0] if compress else zipfile.ZIP_STORED)
        return out.getvalue()

    def with_pickle(self, pkl):
        return self.rezip([(n, pkl if n == self.pkl_name else d) for n, d in self.members])


def encode_int(value):
    if -2**31 <= value < 2**31:
        return b"J" + struct.pack("<i", value)                             # BININT
    body = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(body)]) + body                              # LONG1


def encode_str(text):
    body = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(body)) + body                      # BINUNICODE


GLOBALS = [("os", "system"), ("builtins", "eval"), ("builtins", "getattr"), ("posix", "system"),
           ("subprocess", "Popen"), ("torch._utils", "_rebuild_tensor"), ("torch", "FloatStorage"),
           ("torch", "HalfStorage"), ("torch", "BFloat16Storage"), ("torch", "LongStorage"), ("torch", "BoolStorage"),
           ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
           ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
           ("numpy", "dtype"), ("__builtin__", "set"), ("torch", "Size"), ("torch.nn.modules.container", "ParameterDict"),
           ("torch", "float32"), ("numpy", "frombuffer"), ("_codecs", "encode"), ("copyreg", "_reconstructor")]


def mutate_pickle(seed, rng):
    """(new pickle bytes, kind): one edit of the seed's pickle program."""
    pkl, ops = seed.pkl, seed.ops
    edit = rng.choice(["int", "int", "int", "int", "memo", "string", "global", "delete", "duplicate", "swap",
                       "insert", "flip"])
    if edit == "int":
        candidates = [o for o in ops if o[0] in ("BININT", "BININT1", "BININT2", "LONG1", "INT")]
        if candidates:
            name, arg, start, end = rng.choice(candidates)
            return pkl[:start] + encode_int(interesting_int(rng, near=int(arg))) + pkl[end:], "pickle:int"
    if edit == "memo":
        candidates = [o for o in ops if o[0] in ("BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT")]
        if candidates:
            name, arg, start, end = rng.choice(candidates)
            code = b"j" if "GET" in name else b"r"
            return pkl[:start] + code + struct.pack("<I", rng.choice([0, 1, arg + 1, arg - 1, 2**31, 4096]) % 2**32) \
                + pkl[end:], "pickle:memo"
    if edit == "string":
        candidates = [o for o in ops if o[0] in ("BINUNICODE", "SHORT_BINUNICODE")]
        if candidates:
            name, arg, start, end = rng.choice(candidates)
            new = rng.choice(["0", "1", "2", "99", "", "../data.pkl", "cpu", "cuda:0", "storage", arg * 2, arg[:-1],
                              "\ud800", "x" * 300])
            return pkl[:start] + encode_str(new) + pkl[end:], "pickle:string"
    if edit == "global":
        candidates = [o for o in ops if o[0] == "GLOBAL"]
        if candidates:
            name, arg, start, end = rng.choice(candidates)
            module, attr = rng.choice(GLOBALS)
            return pkl[:start] + f"c{module}\n{attr}\n".encode() + pkl[end:], "pickle:global"
    if edit in ("delete", "duplicate", "swap", "insert"):
        k = rng.randrange(1, len(ops) - 1)
        _, _, start, end = ops[k]
        if edit == "delete":
            return pkl[:start] + pkl[end:], "pickle:delete"
        if edit == "duplicate":
            return pkl[:end] + pkl[start:end] + pkl[end:], "pickle:duplicate"
        if edit == "swap":
            _, _, s2, e2 = ops[k + 1]
            return pkl[:start] + pkl[s2:e2] + pkl[start:end] + pkl[e2:], "pickle:swap"
        opcode = rng.choice(b"().0NQRbehjstu}]\x85\x86\x87\x81\x88\x89\x8c\x93\x94\x95")
        return pkl[:start] + bytes([opcode]) + pkl[start:], "pickle:insert"
    return flip_bytes(pkl, rng, 2), "pickle:flip"


def mutate_members(seed, rng):
    members = [[n, d] for n, d in seed.members]
    top = seed.pkl_name.split("/")[0]
    edit = rng.choice(["drop", "duplicate", "rename", "deflate", "resize", "version", "byteorder", "junk", "reorder",
                       "deflate_all"])
    if edit == "drop":
        members.pop(rng.randrange(len(members)))
    elif edit == "duplicate":
        m = rng.choice(members)
        members.append([m[0], flip_bytes(m[1], rng) if m[1] and rng.random() < 0.5 else m[1]])
    elif edit == "rename":
        m = rng.choice(members)
        m[0] = rng.choice([m[0].replace(top, "other", 1), m[0] + "x", m[0].split("/", 1)[-1], "/" + m[0], m[0].upper()])
    elif edit == "deflate":
        m = rng.choice(members)
        m.append(zipfile.ZIP_DEFLATED)
    elif edit == "deflate_all":
        for m in members:
            m.append(zipfile.ZIP_DEFLATED)
    elif edit == "resize":
        m = rng.choice([m for m in members if "/data/" in m[0]] or members)
        m[1] = m[1][: rng.randrange(len(m[1]) + 1)] if rng.random() < 0.5 else m[1] + b"\0" * rng.choice([1, 2, 4, 8])
    elif edit == "version":
        for m in members:
            if m[0].endswith("/version"):
                m[1] = rng.choice([b"0\n", b"1\n", b"10\n", b"11\n", b"99", b"-3", b"3x", b"", b"abc", b" 3 ", b"3" * 30])
    elif edit == "byteorder":
        for m in members:
            if m[0].endswith("/byteorder"):
                m[1] = rng.choice([b"big", b"littl", b"", b"little\n", b"LITTLE", b"little" * 3])
    elif edit == "junk":
        members.insert(rng.randrange(len(members) + 1), [f"{top}/{rng.choice(['data/99', 'junk', '../x', 'data.pkl2'])}",
                                                          b"junk" * rng.randrange(4)])
    elif edit == "reorder":
        rng.shuffle(members)
    return seed.rezip(members), f"zip:{edit}"


ZIP_FIELDS = {   # (offset in the record, struct format)
    "local": {"version": (4, "<H"), "flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"),
              "compressed": (18, "<I"), "size": (22, "<I"), "name_len": (26, "<H"), "extra_len": (28, "<H")},
    "central": {"version": (6, "<H"), "flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"),
                "compressed": (20, "<I"), "size": (24, "<I"), "name_len": (28, "<H"), "extra_len": (30, "<H"),
                "offset": (42, "<I")},
    "end": {"entries_disk": (8, "<H"), "entries": (10, "<H"), "cd_size": (12, "<I"), "cd_offset": (16, "<I")},
}
SIGNATURES = {"local": b"PK\x03\x04", "central": b"PK\x01\x02", "end": b"PK\x05\x06"}


def mutate_zip_field(raw, rng):
    record = rng.choice(["local", "local", "central", "central", "end"])
    starts = [m.start() for m in re.finditer(re.escape(SIGNATURES[record]), raw)]
    if not starts:
        return flip_bytes(raw, rng), "zip_field:none"
    at = rng.choice(starts)
    field = rng.choice(list(ZIP_FIELDS[record]))
    offset, fmt = ZIP_FIELDS[record][field]
    size = struct.calcsize(fmt)
    if at + offset + size > len(raw):
        return raw, f"zip_field:{record}.{field}"
    (old,) = struct.unpack_from(fmt, raw, at + offset)
    limit = 2 ** (8 * size)
    choices = {"method": [8, 12, 14, 93, 99, 1], "flags": [old | 1, old | 8, old | 0x40, old ^ 0x800, 0xFFFF],
               "version": [old + 1, 45, 63, 0xFFFF]}.get(field, [])
    new = rng.choice(choices) if choices and rng.random() < 0.7 else interesting_int(rng, near=old)
    return raw[: at + offset] + struct.pack(fmt, new % limit) + raw[at + offset + size:], f"zip_field:{record}.{field}"


def mutate_ckpt(seed, rng):
    kind = rng.choice(["flip", "truncate", "extend", "zip_field", "zip_field", "members", "pickle", "pickle",
                       "pickle", "pickle", "pickle"])
    raw = seed.raw
    if kind == "flip":
        return flip_bytes(raw, rng), kind
    if kind == "truncate":
        return truncate(raw, rng, marks=[i.header_offset for i in seed.infos] + [len(raw)]), kind
    if kind == "extend":
        return extend(raw, rng), kind
    if kind == "zip_field":
        return mutate_zip_field(raw, rng)
    if kind == "members":
        return mutate_members(seed, rng)
    pkl, kind = mutate_pickle(seed, rng)
    return seed.with_pickle(pkl), kind


def mutant(fmt, seeds, base_seed, index):
    """The index-th mutant of a format: (bytes, kind, seed name); a pure function of its arguments."""
    rng = random.Random(f"{base_seed}:{fmt}:{index}")
    name = rng.choice(sorted(seeds))
    seed = seeds[name]
    raw, kind = mutate_safetensors(seed, rng) if fmt == "safetensors" else mutate_ckpt(seed, rng)
    return raw, kind, name


def load_seeds(paths):
    return {fmt: {Path(p).name: (Path(p).read_bytes() if fmt == "safetensors" else CkptSeed(Path(p).read_bytes()))
                  for p in ps} for fmt, ps in paths.items()}


# Loading, in worker processes


def canonical(obj, seen=None):
    """A JSON-able summary of a loaded object (arrays by dtype, shape and a hash of their bytes),
    the same for tinysd's result and torch's / safetensors' for equal contents."""
    seen = set() if seen is None else seen
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.nn.ParameterDict):        # its parameters, as A1111 (and tinysd) read them
            obj = dict(obj._parameters)
        elif isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.dtype == torch.bfloat16:
                t = t.float()
            try:
                obj = t.numpy()
            except (TypeError, RuntimeError):
                return ["tensor", str(t.dtype), list(t.shape)]
        elif isinstance(obj, torch.storage.TypedStorage):   # a bare storage: its elements, as tinysd gives them
            return canonical(torch.empty(0, dtype=obj.dtype).set_(obj), seen)
        elif isinstance(obj, torch.dtype):
            return ["dtype", str(obj).replace("torch.", "")]
        elif isinstance(obj, torch.Size):
            obj = tuple(obj)
    if isinstance(obj, np.ndarray):
        head = ["array", obj.dtype.str, list(obj.shape)]
        if obj.nbytes <= 1 << 24:
            return head + [hashlib.sha1(np.ascontiguousarray(obj).tobytes()).hexdigest()]
        return head + ["large", [obj.flat[i].item() for i in range(min(16, obj.size))]]   # no copy of a broadcast view
    if isinstance(obj, np.generic):
        return ["scalar", obj.dtype.str, repr(obj.item())]
    if isinstance(obj, np.dtype):
        return ["dtype", obj.name]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj if not isinstance(obj, float) or obj == obj else "nan"
    if isinstance(obj, (bytes, bytearray)):
        return ["bytes", hashlib.sha1(obj).hexdigest()]
    if id(obj) in seen:
        return ["cycle"]
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [[canonical(k, seen), canonical(v, seen)] for k, v in obj.items()]
        return ["dict", sorted(items, key=lambda kv: json.dumps(kv[0], default=str))]   # order is not content
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, [canonical(v, seen) for v in obj]]
    if isinstance(obj, (set, frozenset)):
        return ["set", sorted(repr(v) for v in obj)]
    if type(obj).__name__ == "_Global":                    # tinysd's stand-in for an allow-listed global
        return ["global", obj.qualname]
    if isinstance(obj, type) or callable(obj):             # the global itself, as torch returns it
        return ["global", f"{obj.__module__}.{obj.__qualname__}"]
    return ["object", type(obj).__qualname__]


def digest(obj):
    return hashlib.sha1(json.dumps(canonical(obj), default=str).encode()).hexdigest()


def make_loader(reader):
    """path -> loaded object, for reader 'tinysd' or 'official'."""
    if reader == "tinysd":
        from tinysd.weights import read_ckpt, read_safetensors
        return lambda path: (read_safetensors if path.endswith(".safetensors") else read_ckpt)(path)
    import warnings

    import safetensors
    import safetensors.numpy
    import safetensors.torch
    import torch

    warnings.filterwarnings("ignore")
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    torch.serialization.add_safe_globals([      # what tinysd allows beyond torch's defaults, under both NumPy names
        torch.nn.modules.container.ParameterDict, np.ndarray, np.dtype, set,
        *((getattr(multiarray, f), f"{m}.{f}") for m in ("numpy.core.multiarray", "numpy._core.multiarray")
          for f in ("_reconstruct", "scalar")),
        *(type(np.dtype(c)) for c in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"))])

    def load(path):
        if path.endswith(".safetensors"):
            try:
                return safetensors.numpy.load_file(path)
            except safetensors.SafetensorError:
                raise
            except Exception:          # a dtype NumPy lacks (BF16, F8): the torch flavour reads it
                return safetensors.torch.load_file(path)
        return torch.load(path, weights_only=True, map_location="cpu")
    return load


def worker(reader):
    """Read paths from stdin, one per line; answer one JSON line each on stdout."""
    load = make_loader(reader)
    from tinysd.weights import CheckpointError
    out = sys.stdout
    sys.stdout = sys.stderr                     # nothing else may write to the answer channel
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        try:
            answer = {"ok": True, "digest": digest(load(line.rstrip("\n")))}
        except CheckpointError as e:
            answer = {"ok": False, "type": "CheckpointError", "message": str(e)}
        except BaseException as e:              # noqa: B036 -- reported, not swallowed: the table counts it
            answer = {"ok": False, "type": type(e).__name__, "message": f"{e}"[:2000]}
        print(json.dumps(answer), file=out, flush=True)


class Worker:
    """One long-lived loader process; load() returns its answer, or {"crash": signal/status} or
    {"hang": True}, restarting the process after either."""

    def __init__(self, reader, timeout):
        self.reader, self.timeout, self.proc = reader, timeout, None

    def start(self):
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", self.reader],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, text=True, bufsize=1)
        ready = self._answer(timeout=300)
        if not ready.get("ready"):
            raise RuntimeError(f"the {self.reader} worker did not start: {ready}")

    def send(self, path):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()

    def receive(self):
        answer = self._answer(self.timeout)
        if "crash" in answer or "hang" in answer:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        return answer

    def _answer(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return {"hang": True}
        line = self.proc.stdout.readline()
        if not line:
            return {"crash": self.proc.wait()}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


# The campaign


def reason(message):
    """A message with its file name, quoted names and numbers blanked, to group like with like."""
    message = message.split("\n")[0]
    message = re.sub(r"^\S+\.(safetensors|ckpt): ", "", message)
    message = re.sub(r"/\S+\.(safetensors|ckpt)", "FILE", message)
    message = re.sub(r"'([^']*)'|`([^`]*)`|\"([^\"]*)\"",          # keep class and attribute names
                     lambda m: m[0] if re.fullmatch(r"[A-Z_]\w{2,}", m[1] or m[2] or m[3] or "") else "'…'", message)
    message = re.sub(r"-?\d+(\.\d+)?", "N", message)
    return message[:110]


def campaign(fmt, count, base_seed, seeds, readers=("tinysd", "official"), timeout=10.0, out=None, start=0,
             progress=None):
    """Load `count` mutants of a format with each reader; returns (Counter of classes, examples)."""
    scratch = Path(tempfile.mkdtemp(prefix="tinysd-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    workers = {r: Worker(r, timeout) for r in readers}
    counts, examples = collections.Counter(), collections.defaultdict(list)
    t0 = time.time()
    try:
        for index in range(start, start + count):
            raw, kind, seed_name = mutant(fmt, seeds[fmt], base_seed, index)
            path = scratch / f"m{index}{FORMATS[fmt]}"
            path.write_bytes(raw)
            for w in workers.values():
                w.send(str(path))
            answers = {r: w.receive() for r, w in workers.items()}
            path.unlink()
            counts["mutants"] += 1
            for cls, why in classify(answers):
                counts[cls] += 1
                counts[(cls, why)] += 1
                if len(examples[(cls, why)]) < 3:
                    examples[(cls, why)].append((index, kind, seed_name))
                    if out is not None and cls not in ("both reject", "both load, same content"):
                        folder = Path(out) / fmt / re.sub(r"\W+", "_", cls)
                        folder.mkdir(parents=True, exist_ok=True)
                        (folder / f"{index}-{seed_name}").write_bytes(raw)
            if progress and (index - start + 1) % progress == 0:
                rate = (index - start + 1) / (time.time() - t0)
                print(f"  {fmt}: {index - start + 1} mutants, {rate:.0f}/s, "
                      f"{sum(counts[c] for c in BAD)} bad", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            try:
                w.close()
            except Exception:
                w.proc.kill()
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()
    return counts, examples


BAD = ("crash", "hang", "exception other than CheckpointError")


def classify(answers):
    """[(class, reason)] for one mutant's answers."""
    mine = answers.get("tinysd")
    theirs = answers.get("official")
    found = []
    if "crash" in mine:
        found.append(("crash", f"exit status {mine['crash']}"))
    elif "hang" in mine:
        found.append(("hang", "timeout"))
    elif not mine["ok"] and mine["type"] != "CheckpointError":
        found.append(("exception other than CheckpointError", f"{mine['type']}: {reason(mine['message'])}"))
    if theirs is None:
        return found
    if "crash" in theirs or "hang" in theirs:
        found.append(("official reader crashed or hung", str(theirs)))
        return found
    if "crash" in mine or "hang" in mine:
        return found
    if mine["ok"] and not theirs["ok"]:
        found.append(("tinysd loads, official rejects", f"{theirs['type']}: {reason(theirs['message'])}"))
    elif theirs["ok"] and not mine["ok"]:
        found.append(("official loads, tinysd rejects", reason(mine["message"])))
    elif mine["ok"] and theirs["ok"]:
        found.append(("both load, same content" if mine["digest"] == theirs["digest"] else
                      "both load, different content", ""))
    else:
        found.append(("both reject", ""))
    return found


CLASSES = ("crash", "hang", "exception other than CheckpointError", "tinysd loads, official rejects",
           "official loads, tinysd rejects", "both load, different content", "official reader crashed or hung",
           "both load, same content", "both reject")


def print_table(results, top=12):
    fmts = list(results)
    print(f"\n{'':40}" + "".join(f"{f:>14}" for f in fmts))
    print(f"{'mutants':40}" + "".join(f"{results[f][0]['mutants']:>14}" for f in fmts))
    for cls in CLASSES:
        print(f"{cls:40}" + "".join(f"{results[f][0][cls]:>14}" for f in fmts))
    for f in fmts:
        counts, examples = results[f]
        for cls in CLASSES[:7]:
            reasons = sorted(((n, k[1]) for k, n in counts.items() if isinstance(k, tuple) and k[0] == cls), reverse=True)
            if reasons:
                print(f"\n{f}: {cls} (by reason; example mutants: index/kind/seed)")
                for n, why in reasons[:top]:
                    ex = ", ".join(f"{i}/{k}/{s}" for i, k, s in examples[(cls, why)])
                    print(f"  {n:8}  {why}  [{ex}]")
                if len(reasons) > top:
                    print(f"  {sum(n for n, _ in reasons[top:]):8}  ({len(reasons) - top} other reasons)")


def replay(out, fmt, index, base_seed):
    seeds = load_seeds({f: sorted((Path(out) / "seeds").glob(f"*{FORMATS[f]}")) for f in FORMATS})
    raw, kind, seed_name = mutant(fmt, seeds[fmt], base_seed, index)
    path = Path(out) / f"replay-{index}{FORMATS[fmt]}"
    path.write_bytes(raw)
    print(f"mutant {index} of {fmt}: {kind} of {seed_name}, {len(raw)} bytes, written to {path}")
    for reader in ("tinysd", "official"):
        try:
            result = make_loader(reader)(str(path))
            print(f"{reader}: loads: {json.dumps(canonical(result))[:600]}")
        except BaseException as e:               # noqa: B036 -- shown to the user
            print(f"{reader}: {type(e).__name__}: {e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", type=int, default=10000, help="mutants per format")
    parser.add_argument("--format", choices=["both", *FORMATS], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first mutant index")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a load counts as a hang")
    parser.add_argument("--out", default="fuzz-out", help="seeds and interesting mutants go here")
    parser.add_argument("--no-official", action="store_true", help="load with tinysd only")
    parser.add_argument("--json", help="also write the counts here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--replay", nargs=2, metavar=("FORMAT", "INDEX"), help="rerun one mutant (uses --out's seeds)")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.replay:
        return replay(args.out, args.replay[0], int(args.replay[1]), args.seed)
    paths = make_seeds(Path(args.out) / "seeds")
    seeds = load_seeds(paths)
    readers = ("tinysd",) if args.no_official else ("tinysd", "official")
    results = {}
    t0 = time.time()
    for fmt in (FORMATS if args.format == "both" else [args.format]):
        results[fmt] = campaign(fmt, args.mutants, args.seed, seeds, readers, args.timeout, args.out, args.start,
                                progress=max(1000, args.mutants // 20))
    print(f"seed {args.seed}, mutants {args.start}..{args.start + args.mutants - 1} per format, "
          f"{time.time() - t0:.0f} s")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({f: {(k if isinstance(k, str) else " | ".join(k)): n
                                                   for k, n in c.items()} for f, (c, _) in results.items()}, indent=1))
    return 1 if any(results[f][0][c] for f in results for c in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
