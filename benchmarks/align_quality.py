"""Alignment quality on held-out pairs: naive, weight matching and the learned aligner.

For each family, trains 2 x PAIRS fresh models with seeds that no training zoo
uses (50_000 and up), aligns each pair with every method through
`modelmerge.alignment.align` (the code behind `modelmerge align`), and reports the
loss barrier and its AUC on the test split (11 alphas; mean ± standard error),
wins against weight matching, and seconds per pair. One run, one machine.

    python benchmarks/align_quality.py --family digits-mlp --aligner pretrained-name-or-folder --pairs 10

Methods: naive (no alignment), wm (weight matching), am (activation matching on the
training split), learned (the aligner only),
learned+wm, learned+lmc (--refine lmc), auto+data (auto with --data).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
from datetime import date

import torch

from modelmerge.alignment import align
from modelmerge.data import load_dataset
from modelmerge.evaluate import interpolation_curve
from modelmerge.network import resolve_network
from modelmerge.zoo.train import TrainConfig, train_models

FAMILIES = {
    "digits-mlp": ({"family": "mlp", "widths": [64, 128, 128, 128, 10], "activation": "relu"}, "digits"),
    "mnist1d-mlp": ({"family": "mlp", "widths": [40, 128, 128, 128, 10], "activation": "relu"}, "mnist1d"),
    "digits-mlp-unseen-width": ({"family": "mlp", "widths": [64, 80, 160, 80, 10], "activation": "relu"}, "digits"),
    # 6 Linear layers of width 100: a depth and width no training zoo has
    "digits-mlp-deep": ({"family": "mlp", "widths": [64, 100, 100, 100, 100, 100, 10], "activation": "relu"},
                        "digits"),
    # the other depths auto trusts, at widths no training zoo has: 2 and 5 Linear layers
    "digits-mlp-2": ({"family": "mlp", "widths": [64, 200, 10], "activation": "relu"}, "digits"),
    "mnist1d-mlp-5": ({"family": "mlp", "widths": [40, 80, 80, 80, 80, 10], "activation": "relu"}, "mnist1d"),
    "digits-cnn": ({"family": "cnn", "input_shape": [1, 8, 8], "channels": [16, 32], "hidden": [64],
                    "batchnorm": False, "kernel": 3, "num_classes": 10, "activation": "relu"}, "digits"),
    "digits-cnn-bn": ({"family": "cnn", "input_shape": [1, 8, 8], "channels": [16, 32], "hidden": [64],
                       "batchnorm": True, "kernel": 3, "num_classes": 10, "activation": "relu"}, "digits"),
}
METHODS = ("naive", "wm", "am", "learned", "learned+wm", "learned+lmc", "auto+data")
HELD_OUT_SEED = 50_000


def run_method(method, a, b, record, aligner, dataset_name, seed):
    if method == "naive":
        return b, {}
    kw = dict(record=record, seed=seed)
    if method == "wm":
        r = align(a, b, method="weight-matching", **kw)
    elif method == "learned":
        r = align(a, b, method="deep-align", aligner=aligner, **kw)
    elif method == "learned+wm":
        r = align(a, b, method="deep-align", aligner=aligner, refine="wm", **kw)
    elif method == "am":
        r = align(a, b, method="activation-matching", data=dataset_name, **kw)
    elif method == "learned+lmc":
        r = align(a, b, method="deep-align", aligner=aligner, refine="lmc", data=dataset_name, **kw)
    else:
        r = align(a, b, method="auto", aligner=aligner, data=dataset_name, **kw)
    return r.aligned, r.seconds


def mean_se(xs):
    m = statistics.mean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return m, se


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES, required=True)
    ap.add_argument("--aligner", help="bundled aligner name or trained folder (default: the bundled default)")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed-base", type=int, default=HELD_OUT_SEED,
                    help="first model seed (default: the held-out 50000; 70000+ are the dev pairs choices are made on)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write every pair's barrier per method to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    record, dataset_name = FAMILIES[args.family]
    methods = args.methods.split(",")
    data = load_dataset(dataset_name)
    seeds = list(range(args.seed_base, args.seed_base + 2 * args.pairs))
    models = train_models(record, data, seeds, TrainConfig(epochs=args.epochs))
    # BatchNorm families: statistics recomputed on the train split for every model measured
    metric = resolve_network(models[0].state, record=record).metric(data, "test",
                                                                    reset_bn=bool(record.get("batchnorm")))
    rows = {m: {"barrier": [], "auc": [], "seconds": [], "learned_s": [], "wm_s": []} for m in methods}
    for i in range(args.pairs):
        a, b = models[2 * i].state, models[2 * i + 1].state
        for m in methods:
            aligned, secs = run_method(m, a, b, record, args.aligner, dataset_name, seed=i)
            curve = interpolation_curve(a, aligned, metric, 11)
            rows[m]["barrier"].append(curve.barrier)
            rows[m]["auc"].append(curve.auc)
            rows[m]["seconds"].append(secs.get("align", 0.0) if secs else 0.0)
            rows[m]["learned_s"].append(secs.get("learned", float("nan")))
            rows[m]["wm_s"].append(secs.get("weight_matching", float("nan")))
        print(f"pair {i}: " + ", ".join(f"{m} {rows[m]['barrier'][-1]:.4f}" for m in methods), flush=True)
    if args.json:  # every pair's barrier per method, and the summary a model card's "holdout" keeps
        import json

        summary = {}
        if "learned" in rows and "wm" in rows:
            lm, lse = mean_se(rows["learned"]["barrier"])
            wm_m, wm_se = mean_se(rows["wm"]["barrier"])
            summary = {"learned": round(lm, 4), "learned_se": round(lse, 4), "weight_matching": round(wm_m, 4),
                       "weight_matching_se": round(wm_se, 4),
                       "wins": f"{sum(x < y for x, y in zip(rows['learned']['barrier'], rows['wm']['barrier']))}/"
                               f"{args.pairs}",
                       "learned_seconds": round(statistics.mean(rows["learned"]["learned_s"]), 4),
                       "weight_matching_seconds": round(statistics.mean(rows["wm"]["wm_s"]), 4)}
            if "auto+data" in rows:
                summary["auto_data"] = round(statistics.mean(rows["auto+data"]["barrier"]), 4)
        with open(args.json, "w") as f:
            json.dump({"barriers": {m: rows[m]["barrier"] for m in methods}, "summary": summary}, f)
    print(f"\n### {args.family} — {date.today()} — {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print("command: `python benchmarks/align_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]) + "`\n")
    print(f"held-out seeds {seeds[0]}..{seeds[-1]}; test accuracy of the models "
          f"{min(m.test_acc for m in models):.3f}..{max(m.test_acc for m in models):.3f}\n")
    print("| method | barrier (mean ± se) | vs WM | AUC (mean ± se) | wins vs WM | align s / pair |")
    print("|---|---|---|---|---|---|")
    wm = rows.get("wm")
    for m in methods:
        b_m, b_se = mean_se(rows[m]["barrier"])
        a_m, a_se = mean_se(rows[m]["auc"])
        ratio = f"{b_m / statistics.mean(wm['barrier']):.2f}x" if wm else "-"
        wins = (f"{sum(x < y for x, y in zip(rows[m]['barrier'], wm['barrier']))}/{args.pairs}"
                if wm and m != "wm" else "-")
        print(f"| {m} | {b_m:.4f} ± {b_se:.4f} | {ratio} | {a_m:.4f} ± {a_se:.4f} | {wins} | "
              f"{statistics.mean(rows[m]['seconds']):.3f} |")
    if "learned" in rows and wm:
        learned = statistics.mean(rows["learned"]["learned_s"])
        wm_t = statistics.mean(wm["wm_s"])
        print(f"\nlearned stage (forward + Hungarian) {learned:.3f} s vs weight matching {wm_t:.3f} s per pair: "
              f"ratio {learned / wm_t:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
