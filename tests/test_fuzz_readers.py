"""Fuzzing tinysd's checkpoint readers: seeded mutants of small real files, each loaded in a
worker process so that a crash (a signal) or a hang is reported as a failure, not a dead pytest.

The mutations, the seed files and the workers are scripts/fuzz_readers.py's, which runs the long
campaigns (≥ 100,000 mutants per format). Here a few thousand per format, with the official
readers alongside (safetensors.numpy.load_file, torch.load(weights_only=True)):

- only CheckpointError ever escapes tinysd: no crash, no hang, no other exception;
- a file tinysd loads, the official reader loads too, with the same contents — except for
  ParameterDicts whose `_keys` (written since torch 1.12) is missing or broken: tinysd needs only
  their `_parameters`, as A1111's loader does.
"""
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = 2000          # per format; both readers: about 20 s per format on this machine
SEED = 13               # the number; any seed works


def _import(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _import(ROOT / "scripts" / "fuzz_readers.py", "fuzz_readers")

# torch cannot rebuild a ParameterDict whose module bookkeeping (`_keys`, which torch < 1.12 did not
# write) is missing or broken; tinysd reads only its `_parameters`, as A1111's loader does.
EXPLAINED = re.compile(r"'ParameterDict' object has no attribute '_keys'|Index given to ParameterDict cannot be used")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    return fuzz.load_seeds(fuzz.make_seeds(tmp_path_factory.mktemp("fuzz-seeds")))


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_mutants_raise_only_checkpoint_error(fmt, seeds, tmp_path):
    counts, examples = fuzz.campaign(fmt, MUTANTS, SEED, seeds, out=tmp_path)

    def show(cls):
        return {why: n for (c, why), n in ((k, n) for k, n in counts.items() if isinstance(k, tuple)) if c == cls}

    assert counts["mutants"] == MUTANTS
    for cls in fuzz.BAD:          # crash, hang, exception other than CheckpointError
        assert counts[cls] == 0, f"{cls}: {show(cls)} (mutants kept in {tmp_path})"
    assert counts["both load, different content"] == 0, show("both load, different content")
    unexplained = {why: n for why, n in show("tinysd loads, official rejects").items() if not EXPLAINED.search(why)}
    assert not unexplained, f"tinysd loads files the official reader rejects: {unexplained}"
    assert counts["both load, same content"] > MUTANTS // 20       # the mutants are not all trivially broken
