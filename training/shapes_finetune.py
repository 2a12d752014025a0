"""What train_shapes_lora.py and train_shapes_embedding.py share: writing a kohya-style folder of
captioned shapes pictures, scoring prompts with evaluate_shapes' pixel measurements, and
noting how busy the machine was while a run took its time."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import evaluate_shapes  # noqa: E402
import shapes_data  # noqa: E402


def write_folder(folder, pictures, captions):
    """NAME.png with NAME.txt beside it, as kohya's scripts (and tinysd.train) read a data set."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, (picture, caption) in enumerate(zip(pictures, captions)):
        Image.fromarray(picture).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption + "\n")
    return folder


def score(sd, prompts, seeds, steps=20, guidance=7.5, sampler="dpmpp_2m"):
    """evaluate_shapes.evaluate over (colour, shape, position, prompt) rows: (rows, pictures, accuracy)."""
    rows, pictures = evaluate_shapes.evaluate(sd, prompts, seeds, steps, guidance, sampler)
    return rows, pictures, evaluate_shapes.accuracy(rows)


class Clock:
    """Wall time and the machine's mean load (1-minute load average, sampled at each `tick`)."""

    def __init__(self):
        self.began, self.loads = time.time(), []
        self.tick()

    def tick(self):
        self.loads.append(os.getloadavg()[0])

    def report(self):
        self.tick()
        return {"minutes": round((time.time() - self.began) / 60, 2), "load_average": round(float(np.mean(self.loads)), 1),
                "cores": os.cpu_count()}


def write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=1))


def loss_by_tenth(losses):
    """The mean loss over each tenth of the run (one step's loss is too noisy to read)."""
    return [round(float(np.mean(part)), 5) for part in np.array_split(np.asarray(losses), 10) if len(part)]


def table(title, results):
    """Print {label: accuracy dict} as a small table."""
    print(title)
    for label, acc in results.items():
        print(f"  {label:38s} " + "  ".join(f"{k} {v:4.0%}" for k, v in acc.items()))


__all__ = ["shapes_data", "evaluate_shapes", "write_folder", "score", "Clock", "write_json", "table", "loss_by_tenth"]
