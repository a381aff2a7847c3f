"""Does an aligner fit its training pairs better than held-out ones? (underfitting vs overfitting)

For every zoo, splits the networks exactly as `train-aligner` does (seed 0, 10 % validation),
then compares the aligner's barrier to weight matching's on pairs of *training* networks and on
pairs of *validation* networks (test split, 11 alphas). Ratios alike on both sides mean the
aligner is short of capacity, not of data. One thread.

    python benchmarks/fit_gap.py deepalign-mlp-v3 ZOO [ZOO ...] [--pairs 6]

Pass the zoos in the order of the training command: the split of each depends on its position.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from modelmerge.alignment import align
from modelmerge.archs import fit_inputs
from modelmerge.data import load_dataset
from modelmerge.evaluate import interpolation_curve
from modelmerge.network import resolve_network


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("aligner")
    ap.add_argument("zoos", nargs="+")
    ap.add_argument("--pairs", type=int, default=6, help="pairs per side and zoo at most")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| zoo | training pairs: learned / WM | validation pairs: learned / WM |")
    print("|---|---|---|")
    sides = {"train": [], "val": []}
    for i, folder in enumerate(args.zoos):  # the zoo's index in the list seeds its split, as in training
        index = json.loads((Path(folder) / "zoo.json").read_text())
        record, files = index["arch"], [m["file"] for m in index["models"]]
        order = np.random.default_rng([0, i]).permutation(len(files))
        n_val = max(2, round(len(files) * 0.1))
        split = {"val": order[:n_val].tolist(), "train": order[n_val:].tolist()}
        data = fit_inputs(record, load_dataset(index["dataset"]))
        net = resolve_network(load_file(str(Path(folder) / files[0])), record=record)
        metric = net.metric(data, "test", reset_bn=bool(record.get("batchnorm")))
        cells = []
        for side in ("train", "val"):
            pool = split[side]
            learned, wm = [], []
            for p in range(min(args.pairs, len(pool) // 2)):
                a, b = (load_file(str(Path(folder) / files[j])) for j in pool[2 * p:2 * p + 2])
                for method, out in (("weight-matching", wm), ("deep-align", learned)):
                    r = align(a, b, record=record, method=method,
                              aligner=args.aligner if method == "deep-align" else None)
                    out.append(interpolation_curve(a, r.aligned, metric, 11).barrier)
            if statistics.mean(wm) > 1e-6:
                ratio = statistics.mean(learned) / statistics.mean(wm)
                sides[side].append(ratio)
                cells.append(f"{ratio:.3f} ({len(wm)} pairs)")
            else:  # no barrier to remove (e.g. the teacher task): no ratio
                cells.append(f"- (weight matching's barrier {statistics.mean(wm):.1e})")
        print(f"| {Path(folder).name} | {cells[0]} | {cells[1]} |", flush=True)
    if sides["train"] and sides["val"]:
        print(f"| mean over zoos with a ratio | {statistics.mean(sides['train']):.3f} | "
              f"{statistics.mean(sides['val']):.3f} |")


if __name__ == "__main__":
    main()
