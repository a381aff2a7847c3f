"""Zoo training speed: vectorised over models vs. one model at a time (one run, same machine).

    python benchmarks/zoo_speed.py --looped 5 --batched 50 --full 200

Looped = a plain nn.Module + torch.optim.Adam loop per model (what one would
write by hand); batched = modelmerge.zoo.train.train_models on N models at
once. Same architecture (digits MLP 64-128-128-128-10), data, epochs, batch
size and thread count. --full also times `modelmerge zoo -n FULL` end to end.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date

import torch
import torch.nn.functional as F

from modelmerge.archs import build
from modelmerge.data import digits
from modelmerge.zoo.train import TrainConfig, train_models

RECORD = {"family": "mlp", "widths": [64, 128, 128, 128, 10], "activation": "relu"}


def looped(data, seeds, cfg):
    x, y = data.x_train.flatten(1), data.y_train
    for s in seeds:
        model = build(RECORD, seed=s)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(s)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(len(x) // cfg.batch_size):
                idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--looped", type=int, default=5)
    ap.add_argument("--batched", type=int, default=50)
    ap.add_argument("--full", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    data, cfg = digits(), TrainConfig(epochs=args.epochs)
    per = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        looped(data, list(range(args.looped)), cfg)
        per[("looped", threads)] = (time.perf_counter() - t) / args.looped
        t = time.perf_counter()
        train_models(RECORD, data, list(range(args.batched)), cfg)
        per[("batched", threads)] = (time.perf_counter() - t) / args.batched
    print(f"# zoo_speed — {date.today()} — {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"command: python benchmarks/zoo_speed.py --looped {args.looped} --batched {args.batched} "
          f"--full {args.full} --epochs {args.epochs}\n")
    print("| mode | models | threads | seconds per model |\n|---|---|---|---|")
    for (mode, threads), sec in per.items():
        label = "looped (plain nn.Module + Adam)" if mode == "looped" else "batched (modelmerge train_models)"
        print(f"| {label} | {args.looped if mode == 'looped' else args.batched} | {threads} | {sec:.3f} |")
    best_loop = min(v for (m, _), v in per.items() if m == "looped")
    best_batch = min(v for (m, _), v in per.items() if m == "batched")
    print(f"\nspeed-up, each at its best thread count: {best_loop / best_batch:.1f}x (target >= 5x); "
          f"same threads: 1 -> {per[('looped', 1)] / per[('batched', 1)]:.1f}x, "
          f"2 -> {per[('looped', 2)] / per[('batched', 2)]:.1f}x")
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "modelmerge", "zoo", "--widths", "64,128,128,128,10",
                            "--dataset", "digits", "-n", str(args.full), "-o", f"{tmp}/zoo",
                            "--epochs", str(args.epochs)],
                           check=True, capture_output=True)
            print(f"`modelmerge zoo -n {args.full}` end to end: {time.perf_counter() - t:.1f} s (target < 300 s)")


if __name__ == "__main__":
    main()
