"""Core acceptance: weight matching removes the loss barrier between digits MLPs.

Trains pairs of independent digits MLPs 64-128-128-128-10, aligns each pair
with the real `modelmerge align` command, and reports the loss barrier and its
AUC of the naive and the aligned interpolation on the test split. Also times
weight matching with 1 and 2 torch threads on the same pairs (one run).

    python benchmarks/core_barrier.py --pairs 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from modelmerge.archs import record_to_json
from modelmerge.checkpoint import load_checkpoint, save_checkpoint
from modelmerge.data import digits
from modelmerge.evaluate import interpolation_curve
from modelmerge.matching import weight_matching
from modelmerge.network import resolve_network
from modelmerge.spec import infer_spec
from modelmerge.zoo.train import TrainConfig, train_models

RECORD = {"family": "mlp", "widths": [64, 128, 128, 128, 10], "activation": "relu"}


def time_wm(a, b, spec, threads, repeats=3):
    torch.set_num_threads(threads)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        weight_matching(a, b, spec, seed=0)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = digits()
    models = train_models(RECORD, data, list(range(100, 100 + 2 * args.pairs)), TrainConfig(epochs=args.epochs))
    metric = resolve_network(models[0].state, record=RECORD).metric(data, "test")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            ma, mb = models[2 * i], models[2 * i + 1]
            pa, pb, po = (Path(tmp) / f"{n}{i}.safetensors" for n in ("a", "b", "b_aligned"))
            for m, p in ((ma, pa), (mb, pb)):
                save_checkpoint(m.state, p, {"modelmerge.arch": record_to_json(RECORD)})
            cmd = [sys.executable, "-m", "modelmerge", "align", str(pa), str(pb), "-o", str(po), "--json",
                   "--method", "weight-matching"]
            report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            aligned = load_checkpoint(po).state
            naive = interpolation_curve(ma.state, mb.state, metric, 11)
            after = interpolation_curve(ma.state, aligned, metric, 11)
            spec = infer_spec(ma.state)
            t1, t2 = time_wm(ma.state, mb.state, spec, 1), time_wm(ma.state, mb.state, spec, 2)
            torch.set_num_threads(1)
            rows.append((ma.seed, mb.seed, naive.barrier, after.barrier, naive.auc, after.auc,
                         report["seconds"]["align"], t1, t2, ma.test_acc, mb.test_acc))
    print(f"# core_barrier — {date.today()} — {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"command: python benchmarks/core_barrier.py --pairs {args.pairs} --epochs {args.epochs}\n")
    print("| pair (seeds) | test acc A / B | barrier naive | barrier aligned | ratio | AUC naive | AUC aligned | align s (CLI) | WM s 1 thread | WM s 2 threads |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s_a, s_b, bn, ba, an, aa, sec, t1, t2, acc_a, acc_b in rows:
        print(f"| {s_a}/{s_b} | {acc_a:.3f} / {acc_b:.3f} | {bn:.4f} | {ba:.4f} | {ba / bn:.3f} | {an:.4f} | {aa:.4f} | "
              f"{sec:.3f} | {t1:.3f} | {t2:.3f} |")
    ratio = statistics.mean(r[3] for r in rows) / statistics.mean(r[2] for r in rows)
    thr = statistics.mean(r[8] for r in rows) / statistics.mean(r[7] for r in rows)
    print(f"\nmean barrier aligned / naive = {ratio:.3f} (target <= 0.10); "
          f"mean WM time 2 threads / 1 thread = {thr:.2f}")


if __name__ == "__main__":
    main()
