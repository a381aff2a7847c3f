"""Model soups across seeds: `modelmerge merge` of N digits MLPs (or CNNs), as a user runs it.

Trains N models from held-out seeds (60 000 and up; no training zoo uses them),
saves them with their architecture record, then runs the real command
(subprocess) with each recipe and reports the test accuracy of the soup against
the mean individual accuracy and the naive (unaligned) average.

    python benchmarks/soup.py --models 4 --family digits-mlp
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from modelmerge.archs import record_to_json
from modelmerge.checkpoint import save_checkpoint
from modelmerge.data import load_dataset
from modelmerge.zoo.train import TrainConfig, train_models

FAMILIES = {
    "digits-mlp": {"family": "mlp", "widths": [64, 128, 128, 128, 10], "activation": "relu"},
    "digits-cnn-bn": {"family": "cnn", "input_shape": [1, 8, 8], "channels": [16, 32], "hidden": [64],
                      "batchnorm": True, "kernel": 3, "num_classes": 10, "activation": "relu"},
}
RECIPES = {
    "weight-matching (MergeMany)": [],
    "weight-matching + REPAIR": ["--repair"],
    "auto (each to the first model)": ["--method", "auto"],
    "auto + REPAIR": ["--method", "auto", "--repair"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES, default="digits-mlp")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    record = FAMILIES[args.family]
    seeds = list(range(60_000, 60_000 + args.models))
    models = train_models(record, load_dataset("digits"), seeds, TrainConfig(epochs=args.epochs))
    extra = ["--reset-bn"] if record.get("batchnorm") else []
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for m in models:
            p = Path(tmp) / f"m{m.seed}.safetensors"
            save_checkpoint(m.state, p, {"modelmerge.arch": record_to_json(record)})
            paths.append(str(p))
        for name, flags in RECIPES.items():
            out = subprocess.run([sys.executable, "-m", "modelmerge", "merge", *paths, "-o", f"{tmp}/soup.safetensors",
                                  "--data", "digits", "--json", "--force", "--threads", "1", *extra, *flags],
                                 check=True, capture_output=True, text=True)
            rows[name] = json.loads(out.stdout)
    first = next(iter(rows.values()))
    individual = [first["scores"][f"model {i}"]["accuracy"] for i in range(1, len(paths) + 1)]
    mean_acc = statistics.mean(individual)
    print(f"### Soup of {args.models} {args.family} models — {date.today()} — {platform.machine()}, 1 thread, "
          f"torch {torch.__version__}")
    print(f"command: `python benchmarks/soup.py --family {args.family} --models {args.models}`\n")
    print(f"seeds {seeds[0]}..{seeds[-1]}; individual test accuracy {min(individual):.4f}..{max(individual):.4f} "
          f"(mean {mean_acc:.4f}); naive average {first['scores']['naive average']['accuracy']:.4f}"
          + (" (BatchNorm statistics recomputed everywhere)" if extra else "") + "\n")
    print("| recipe | soup accuracy | vs mean individual | soup loss | sweeps | align s |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        s = r["scores"]["soup"]
        print(f"| {name} | {s['accuracy']:.4f} | {100 * (s['accuracy'] - mean_acc):+.1f} pts | {s['loss']:.4f} | "
              f"{r['sweeps'] or '-'} | {r['seconds']['align']:.2f} |")


if __name__ == "__main__":
    main()
