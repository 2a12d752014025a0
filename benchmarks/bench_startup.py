"""How long the first picture takes: a fresh install (empty Numba cache) and the next run (cache filled).

    python benchmarks/bench_startup.py                           # both rows, 3 runs each, the minimum
    python benchmarks/bench_startup.py --rows shapes --repeat 5 --json startup.json
    python benchmarks/bench_startup.py --rows shapes --kernels --importtime   # where the time goes
    python benchmarks/bench_startup.py --python main=/tmp/venv-main/bin/python --python branch=.venv/bin/python

Rows:
- shapes: the whole command `python -m tinysd "a red circle" --model shapes --seed 1` (the packaged
  64×64 model, 20 steps), wall time of the process, and its phases as the CLI reports them with
  TINYSD_TIMINGS=1: imports (model code and kernels), load (weights), picture (the pipeline call,
  kernels compiled or read from the cache on first use), save; "python" is the rest (interpreter
  start, argument parsing, exit). "cpu" is the CPU seconds of the whole process (all threads),
  "picture_cpu" those of the picture: on a shared machine they move far less than wall seconds.
- full: SD v1.5-sized random weights (built once by benchmarks/bench_cpu.py's model_folder, about
  4 GB under --workdir): load, the first U-Net step (CFG batch 2, 64×64 latents) and a warm step
  (the second), in a fresh process; the target is (load + first step) ≤ 2 ×
  a warm step even with an empty cache.

"Cold" runs each get a new empty NUMBA_CACHE_DIR (what a fresh install has: Numba compiles every
kernel on its first call); "warm" runs use the one that the last cold run filled. Python's own
bytecode caches are warm in both. Every run is its own process; each figure is the minimum over
--repeat runs, printed beside the 1-minute load average when it started (the machine may be shared).
--python LABEL=PATH (repeatable) measures the tinysd that each interpreter imports (e.g. a venv with
main installed, and one with a branch), their runs interleaved so that a busy machine slows them alike;
the measured processes start in an empty folder, so the interpreter's own install is what they import.
--kernels adds, for one cold run of each row, the seconds Numba spent compiling each kernel
(numba's compile events, nested compiles counted in their caller); --importtime the slowest imports
(python -X importtime).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle"
CLI = ["-m", "tinysd", PROMPT, "--model", "shapes", "--seed", "1"]     # after the interpreter

# Runs in the measured process with --kernels: the top-level compile of each kernel, in seconds.
COMPILE_LISTENER = r"""
import atexit, json, sys, time
from numba.core import event

class Compiles(event.Listener):
    # wall and CPU seconds of each top-level compile, in the thread that compiles
    def __init__(self):
        self.depth, self.start, self.seconds = 0, (0.0, 0.0), {}
    def on_start(self, ev):
        self.depth += 1
        if self.depth == 1:
            self.start = (time.perf_counter(), time.thread_time())
    def on_end(self, ev):
        self.depth -= 1
        if self.depth == 0:
            f = ev.data["dispatcher"].py_func
            name = f.__module__.rsplit(".", 1)[-1] + "." + f.__qualname__
            wall, cpu = self.seconds.get(name, (0.0, 0.0))
            self.seconds[name] = (wall + time.perf_counter() - self.start[0], cpu + time.thread_time() - self.start[1])

_compiles = Compiles()
event.register("numba:compile", _compiles)
atexit.register(lambda: print("COMPILES " + json.dumps(_compiles.seconds), file=sys.stderr))
"""

# The full-size row's process: prints one JSON line of seconds.
FULL_WORKER = r"""
import json, sys, time
clock = lambda: (time.perf_counter(), time.process_time())      # wall, CPU of all threads
t0 = clock()
import numpy as np
import tinysd
from tinysd.backend import get_backend
backend = get_backend("cpu")
t1 = clock()
sd = tinysd.load(sys.argv[1], backend=backend)
t2 = clock()
rng = np.random.default_rng(0)
latents = rng.standard_normal((2, 4, 64, 64)).astype(np.float32)
context = rng.standard_normal((2, 77, 768)).astype(np.float32)
t = np.array([500, 500])

def step():
    start = clock()
    sd.ops.numpy(sd.unet(sd.ops.asarray(latents), t, sd.ops.asarray(context)))
    end = clock()
    return end[0] - start[0], end[1] - start[1]

first = step()
warm = step()
print("RESULT " + json.dumps({"imports": t1[0] - t0[0], "load": t2[0] - t1[0], "load_cpu": t2[1] - t1[1],
                              "first_step": first[0], "first_step_cpu": first[1],
                              "warm_step": warm[0], "warm_step_cpu": warm[1]}))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="shapes,full", help="comma-separated: shapes, full (default both)")
    p.add_argument("--cache", default="cold,warm", help="comma-separated: cold, warm (default both)")
    p.add_argument("--repeat", type=int, default=3, help="runs per row and cache state; the minimum is shown (default 3)")
    p.add_argument("--kernels", action="store_true", help="one more cold run per row: compile seconds per kernel")
    p.add_argument("--importtime", action="store_true", help="the slowest imports of the CLI (python -X importtime)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/tinysd-bench"),
                   help="where the SD v1.5-sized random model folder is kept (as bench_cpu.py)")
    p.add_argument("--json", type=Path, help="also write every run here")
    p.add_argument("--python", action="append", metavar="LABEL=PATH", default=[],
                   help="an interpreter whose tinysd to measure (repeatable; default: this one, as 'this')")
    args = p.parse_args(argv)
    args.row_list = [r.strip() for r in args.rows.split(",") if r.strip()]
    if set(args.row_list) - {"shapes", "full"} or not args.row_list:
        p.error(f"--rows: choose from shapes, full; got {args.rows!r}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.states = [c.strip() for c in args.cache.split(",") if c.strip()]
    if set(args.states) - {"cold", "warm"} or "cold" not in args.states:
        p.error(f"--cache: cold, or cold,warm (the warm runs use the cache a cold run filled); got {args.cache!r}")
    args.pythons = {}
    for item in args.python or [f"this={sys.executable}"]:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            p.error(f"--python: expected LABEL=PATH, got {item!r}")
        args.pythons[label] = path
    return args


def run(cmd, cache_dir, extra_env=None):
    """Run cmd with Numba's cache in cache_dir, in an empty folder (so that the interpreter's own
    tinysd is imported, not one in the current folder); (wall seconds, CPU seconds of the process
    (all its threads), stdout, stderr, load average at start)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), TINYSD_TIMINGS="1", **(extra_env or {}))
    load_avg = os.getloadavg()[0]
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="tinysd-startup-cwd-") as cwd:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, cpu, proc.stdout, proc.stderr, load_avg


def compiles(stderr):
    line = next((ln for ln in stderr.splitlines() if ln.startswith("COMPILES ")), None)
    return json.loads(line[len("COMPILES "):]) if line else {}


# -- the shapes CLI ---------------------------------------------------------------------------------------
def cli_run(python, cache_dir, out_dir, kernels=False):
    cmd = [python] + CLI + ["-o", str(out_dir / "startup.png")]
    if kernels:      # the same main(), with the compile listener installed first
        cmd = [python, "-c", COMPILE_LISTENER + "\nfrom tinysd.cli import main\nsys.exit(main())"] + cmd[3:]
    wall, cpu, _, err, load_avg = run(cmd, cache_dir)
    m = re.search(r"tinysd: timings: (.*)", err)
    if not m:
        raise SystemExit(f"no timings line from the CLI:\n{err[-2000:]}")
    phases = {}
    for name, phase_wall, phase_cpu in re.findall(r"(\w+) ([\d.]+) s / ([\d.]+) s CPU", m[1]):
        phases[name], phases[name + "_cpu"] = float(phase_wall), float(phase_cpu)
    phases["python"] = wall - sum(v for k, v in phases.items() if not k.endswith("_cpu"))
    return {"wall": wall, "cpu": cpu, **phases, "load_average": load_avg,
            "compiles": compiles(err) if kernels else None}


def full_run(python, cache_dir, folder, kernels=False):
    code = (COMPILE_LISTENER if kernels else "") + FULL_WORKER
    wall, cpu, out, err, load_avg = run([python, "-c", code, str(folder)], cache_dir)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the full-size worker printed no result:\n{out[-2000:]}\n{err[-2000:]}")
    r = json.loads(line[len("RESULT "):])
    r["ratio"] = (r["load"] + r["first_step"]) / r["warm_step"]
    r["ratio_cpu"] = (r["load_cpu"] + r["first_step_cpu"]) / r["warm_step_cpu"]
    return {"wall": wall, "cpu": cpu, **r, "load_average": load_avg, "compiles": compiles(err) if kernels else None}


def measure(row, args, tmp):
    """{label: {"cold": [runs], "warm": [runs]} (+ "kernels": one cold run's compile seconds)}, the
    interpreters' runs interleaved (cold 1 of each, cold 2 of each, ..., then the warm ones)."""
    if row == "full":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_cpu import model_folder
        folder = model_folder(args.workdir)
        one = lambda python, cache, kernels=False: full_run(python, cache, folder, kernels)   # noqa: E731
    else:
        one = lambda python, cache, kernels=False: cli_run(python, cache, tmp, kernels)        # noqa: E731
    runs = {label: {"cold": [], "warm": []} for label in args.pythons}
    for i in range(args.repeat):
        for label, python in args.pythons.items():
            runs[label]["cold"].append(one(python, tmp / f"{row}-{label}-cold-{i}"))
            print(f"  {row} {label} cold {i + 1}/{args.repeat}: {runs[label]['cold'][-1]['wall']:.2f} s", flush=True)
    for i in range(args.repeat if "warm" in args.states else 0):     # in the cache the last cold run filled
        for label, python in args.pythons.items():
            runs[label]["warm"].append(one(python, tmp / f"{row}-{label}-cold-{args.repeat - 1}"))
            print(f"  {row} {label} warm {i + 1}/{args.repeat}: {runs[label]['warm'][-1]['wall']:.2f} s", flush=True)
    if args.kernels:
        for label, python in args.pythons.items():
            runs[label]["kernels"] = one(python, tmp / f"{row}-{label}-kernels", kernels=True)["compiles"]
    return runs


# -- reports ----------------------------------------------------------------------------------------------
def best(runs, key):
    """The minimum of key over the runs, and the load average when that run started."""
    r = min(runs, key=lambda r: r[key])
    return r[key], r["load_average"]


def print_table(title, cols, by_label):
    """One line per interpreter and cache state: the minimum of each column [load average]."""
    print(title)
    width = max(len(label) for label in by_label) + 6
    print(f"{'':{width}s}" + "".join(f"{c:>16s}" for c in cols))
    for state in ("cold", "warm"):
        for label, runs in by_label.items():
            if not runs[state]:
                continue
            print(f"{label + ' ' + state:{width}s}" + "".join("{:>9.2f} [{:>4.1f}]".format(*best(runs[state], c))
                                                             for c in cols))


def print_tables(results):
    if "shapes" in results:
        print_table(f"\n`python -m tinysd \"{PROMPT}\" --model shapes` (64×64, 20 steps), seconds, "
                    "minimum of the runs [1-min load average at its start]",
                    ("wall", "cpu", "imports", "load", "picture", "picture_cpu", "save", "python"), results["shapes"])
    if "full" in results:
        print_table("\nSD v1.5-sized U-Net (random weights), CFG batch 2 at 64×64, seconds; ratio = (load + first "
                    "step) / warm step, target ≤ 2; *_cpu: CPU seconds of all threads",
                    ("load", "first_step", "warm_step", "ratio", "load_cpu", "first_step_cpu", "warm_step_cpu",
                     "ratio_cpu"), results["full"])
    for row, by_label in results.items():
        for label, runs in by_label.items():
            if runs.get("kernels"):
                wall, cpu = (sum(v[i] for v in runs["kernels"].values()) for i in (0, 1))
                print(f"\n{row} ({label}), one cold run: {wall:.2f} s compiling ({cpu:.2f} s CPU), per kernel, "
                      "wall (CPU) seconds, nested compiles counted in their caller:")
                for name, (w, c) in sorted(runs["kernels"].items(), key=lambda kv: -kv[1][0]):
                    print(f"  {w:7.2f} ({c:5.2f})  {name}")


def print_importtime():
    """Seconds of import per package (numpy, numba, scipy, ...: the self time of all its modules)
    and of tinysd's slowest modules."""
    code = "import tinysd.cli, tinysd.pipeline; from tinysd.backend import get_backend; get_backend()"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, cwd=REPO)
    packages, own = {}, {}
    for m in re.finditer(r"import time:\s+(\d+) \|\s+\d+ \| *(\S+)", proc.stderr):
        self_us, name = int(m[1]), m[2]
        top = name.split(".")[0]
        packages[top] = packages.get(top, 0) + self_us
        if top == "tinysd":
            own[name] = self_us
    print(f"\nimports of the CLI and the cpu backend (python -X importtime): {sum(packages.values()) / 1e6:.3f} s")
    for name, us in sorted(packages.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {us / 1e6:6.3f} s  {name}")
    for name, us in sorted(own.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {us / 1e6:6.3f} s    {name}")


def main(argv=None):
    args = parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tinysd-startup-") as tmp:
        for row in args.row_list:
            print(f"{row} ...", flush=True)
            results[row] = measure(row, args, Path(tmp))
    print(f"\n{os.cpu_count()} CPUs, {args.repeat} runs per figure; " +
          ", ".join(f"{label}: {python}" for label, python in args.pythons.items()))
    print_tables(results)
    if args.importtime:
        print_importtime()
    if args.json:
        args.json.write_text(json.dumps({"repeat": args.repeat, "cpus": os.cpu_count(), "pythons": args.pythons,
                                         "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
