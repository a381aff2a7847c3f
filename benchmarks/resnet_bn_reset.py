"""Residual networks: traced specs, alignment and BatchNorm reset on digits (issue: architectures).

Trains two ResNet-style digits models (modelmerge.examples.models:ResNetish,
two stages, BatchNorm, identity and 1x1 projection shortcuts) from different
seeds, then runs the real commands:

    modelmerge align A B -o B_al --model modelmerge.examples.models:ResNetish
    modelmerge evaluate A B     --model ... --dataset digits          (naive)
    modelmerge evaluate A B_al  --model ... --dataset digits          (aligned)
    modelmerge evaluate A B_al  --model ... --dataset digits --reset-bn
    modelmerge evaluate A B_al  --model ... --dataset digits --reset-bn --repair
    (and the same after --method activation-matching --data digits)

    python benchmarks/resnet_bn_reset.py --epochs 15 --width 16
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from modelmerge.checkpoint import save_checkpoint
from modelmerge.data import digits
from modelmerge.evaluate import evaluate_model
from modelmerge.examples.models import ResNetish

MODEL = "modelmerge.examples.models:ResNetish"


def train(seed: int, width: int, epochs: int):
    torch.manual_seed(seed)
    model, data = ResNetish(width=width), digits()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(order) - 63, 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), evaluate_model(model.eval(), data.x_test, data.y_test)


def cli(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "modelmerge", *map(str, args)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--width", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    kwargs = json.dumps({"width": args.width})
    with tempfile.TemporaryDirectory() as tmp:
        paths, accs = [], []
        for seed in (1, 2):
            model, (loss, acc) = train(seed, args.width, args.epochs)
            p = Path(tmp) / f"resnet{seed}.safetensors"
            save_checkpoint(model.state_dict(), p)
            paths.append(p)
            accs.append(acc)
        a, b = paths
        al = Path(tmp) / "b_aligned.safetensors"
        common = ["--model", MODEL, "--model-kwargs", kwargs]
        report = cli("align", a, b, "-o", al, *common, "--json")
        ev = ["--dataset", "digits", *common, "--json"]
        naive = cli("evaluate", a, b, *ev)
        aligned = cli("evaluate", a, al, *ev)
        reset = cli("evaluate", a, al, *ev, "--reset-bn")
        naive_reset = cli("evaluate", a, b, *ev, "--reset-bn")
        repaired = cli("evaluate", a, al, *ev, "--repair")
        reset_repaired = cli("evaluate", a, al, *ev, "--reset-bn", "--repair")
        am = Path(tmp) / "b_am.safetensors"
        cli("align", a, b, "-o", am, *common, "--method", "activation-matching", "--data", "digits", "--json")
        am_reset_repaired = cli("evaluate", a, am, *ev, "--reset-bn", "--repair")
    print(f"### ResNet-style digits models — {date.today()} — {platform.machine()}, 1 thread, torch {torch.__version__}")
    print(f"command: `python benchmarks/resnet_bn_reset.py --epochs {args.epochs} --width {args.width}`\n")
    print(f"test accuracy A {accs[0]:.3f}, B {accs[1]:.3f}; spec {report['spec']['source']} with "
          f"{len(report['spec']['groups'])} groups; verified with the {report['verified']['forward']} forward "
          f"(max |diff| {report['verified']['max_abs_diff']:.1e}); align {report['seconds']['align']:.2f} s\n")
    print("| interpolation | loss barrier | vs naive + BN reset | AUC | merged (α=0.5) loss | merged accuracy |\n"
          "|---|---|---|---|---|---|")
    for name, c in (("naive", naive), ("naive + BN reset", naive_reset), ("aligned (WM)", aligned),
                    ("aligned + BN reset", reset), ("aligned + REPAIR", repaired),
                    ("aligned + BN reset + REPAIR", reset_repaired),
                    ("activation matching + BN reset + REPAIR", am_reset_repaired)):
        mid = len(c["alphas"]) // 2
        print(f"| {name} | {c['barrier']:.4f} | {c['barrier'] / naive_reset['barrier']:.2f}x | {c['auc']:.4f} | "
              f"{c['losses'][mid]:.4f} | {c['accuracies'][mid]:.3f} |")


if __name__ == "__main__":
    main()
