"""Where a CNN aligner beats weight matching: learned answer alone over many conv-chain shapes.

For each shape, trains 2 x PAIRS fresh models (seeds SEED..; the default 70 000 is outside every
zoo and the held-out benchmark seeds, so choices such as `auto`'s trusted depths can be made on
it) and reports the learned answer's mean barrier over weight matching's, and wins. The aligner
is called directly, so depths outside its trusted list are measured too.

    python benchmarks/cnn_reach.py --aligners deepalign-cnn-v2 --pairs 6
    python benchmarks/cnn_reach.py --aligners deepalign-cnn-v2,./my-cnn-aligner --shapes pool-16-32,nopool-24-48
"""

from __future__ import annotations

import argparse
import statistics
from datetime import date

import torch

from modelmerge.alignment import align
from modelmerge.data import load_dataset
from modelmerge.deepalign.pretrained import load_aligner
from modelmerge.evaluate import interpolation_curve
from modelmerge.network import resolve_network
from modelmerge.permutation import apply_permutation
from modelmerge.zoo.train import TrainConfig, train_models

BASE = {"family": "cnn", "input_shape": [1, 8, 8], "kernel": 3, "num_classes": 10, "activation": "relu"}
MNIST1D = {"input_shape": [1, 40]}
#: name -> (record changes, dataset): pooled and unpooled maps, BatchNorm, 1-D convs, depths 2 to 6
SHAPES = {
    "pool-16-32": ({"channels": [16, 32], "hidden": [64]}, "digits"),
    "pool-32": ({"channels": [32], "hidden": [64]}, "digits"),
    "pool-8-16-32": ({"channels": [8, 16, 32], "hidden": [64]}, "digits"),
    "bn-8-16-32": ({"channels": [8, 16, 32], "hidden": [64], "batchnorm": True}, "digits"),
    "nopool-16-32": ({"channels": [16, 32], "hidden": [64], "pool": False}, "digits"),
    "nopool-24-48": ({"channels": [24, 48], "hidden": [32], "pool": False}, "digits"),
    "bn-nopool-16-32": ({"channels": [16, 32], "hidden": [64], "batchnorm": True, "pool": False}, "digits"),
    "conv1d-16-32": (dict(channels=[16, 32], hidden=[64], **MNIST1D), "mnist1d"),
    "conv1d-bn-32-64": (dict(channels=[32, 64], hidden=[64], batchnorm=True, **MNIST1D), "mnist1d"),
    "depth2-16": ({"channels": [16], "hidden": []}, "digits"),
    "depth2-bn-32": ({"channels": [32], "hidden": [], "batchnorm": True}, "digits"),
    "depth6-8-16-16-32": ({"channels": [8, 16, 16, 32], "hidden": [64]}, "digits"),
    "depth6-bn-16-16-32-32": ({"channels": [16, 16, 32, 32], "hidden": [32], "batchnorm": True}, "digits"),
    # inputs no CNN zoo had (every zoo is 1-channel digits 8x8 or mnist1d 40): larger images, 3 channels
    "pool-16-32@16x16": ({"channels": [16, 32], "hidden": [64], "input_shape": [1, 16, 16]}, "digits@16x16"),
    "bn-16-32@16x16": ({"channels": [16, 32], "hidden": [64], "batchnorm": True, "input_shape": [1, 16, 16]},
                       "digits@16x16"),
    "pool-16-32@3ch": ({"channels": [16, 32], "hidden": [64], "input_shape": [3, 8, 8]}, "digits@3ch"),
}


def dataset(name: str):
    """A dataset by name; ``digits@16x16`` is digits upsampled bilinearly to 16x16, ``digits@3ch`` digits as
    three channels of different contrast and offset (inputs no CNN zoo had)."""
    import torch.nn.functional as F

    from modelmerge.data import Dataset

    base, _, variant = name.partition("@")
    data = load_dataset(base)
    if not variant:
        return data
    if variant == "16x16":
        f = lambda x: F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    elif variant == "3ch":
        f = lambda x: torch.cat([x, 1.0 - x, 0.5 * x + 0.25], 1)
    else:
        raise SystemExit(f"unknown dataset variant {variant!r}")
    return Dataset(name, f(data.x_train), data.y_train, f(data.x_test), data.y_test)


def barrier(a, aligned, metric) -> float:
    return interpolation_curve(a, aligned, metric, 11).barrier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aligners", default="deepalign-cnn-v2", help="comma-separated bundled names or folders")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=70_000)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.aligners.split(",")
    aligners = {n: load_aligner(n)[0] for n in names}
    print(f"### CNN reach — {date.today()} — seeds {args.seed}.., {args.pairs} pairs per shape, one thread\n")
    print("| shape | layers | " + " | ".join(f"{n}: learned / WM (wins)" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    means = {n: [] for n in names}
    for shape in args.shapes.split(","):
        changes, data_name = SHAPES[shape]
        record, data = {**BASE, **changes}, dataset(data_name)
        seeds = list(range(args.seed, args.seed + 2 * args.pairs))
        states = [m.state for m in train_models(record, data, seeds, TrainConfig(epochs=args.epochs))]
        net = resolve_network(states[0], record=record)
        metric = net.metric(data, "test", reset_bn=bool(record.get("batchnorm")))
        pairs = [(states[2 * i], states[2 * i + 1]) for i in range(args.pairs)]
        wm = [barrier(a, align(a, b, record=record, method="weight-matching").aligned, metric) for a, b in pairs]
        cells = []
        for n, model in aligners.items():
            learned = []
            for a, b in pairs:
                perms = model.align(net.weight_space(a), net.weight_space(b))
                perm = {net.chain.group(layer): p for layer, p in enumerate(perms)}
                learned.append(barrier(a, apply_permutation(b, net.spec, perm), metric))
            ratio = statistics.mean(learned) / statistics.mean(wm)
            means[n].append(ratio)
            cells.append(f"{ratio:.2f}x ({sum(x < y for x, y in zip(learned, wm))}/{args.pairs})")
        print(f"| {shape} | {len(net.chain.layers)} | " + " | ".join(cells) + " |", flush=True)
    print("| mean of the ratios | | " + " | ".join(f"{statistics.mean(v):.3f}" for v in means.values()) + " |")


if __name__ == "__main__":
    main()
