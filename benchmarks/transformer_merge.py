"""Aligning transformers trained from different seeds: loss barrier naive vs weight matching (+ LMC).

Settings:

* ``vit-digits``: :class:`modelmerge.examples.blocks.TinyViT` (defaults) on scikit-learn's
  digits (``modelmerge.data.digits``: 8x8 images in [0, 1], fixed split, 1438 train / 359 test);
* ``encoder-mnist1d``: :class:`modelmerge.examples.blocks.EncoderClassifier` (``seq=40``) on
  mnist1d generated locally (``modelmerge.data.mnist1d``: ``make_dataset(get_dataset_args())``,
  never a download; 4000 train / 1000 test), inputs ``[N, 40]``.

For each setting and each pair of seeds, trains two models (AdamW, cosine schedule, batch 64;
cached as safetensors under ``--cache`` so reruns skip training), then measures the loss
barrier on the test split with the project's definition (``modelmerge.evaluate``: 11 α from 0
to 1, ``max_α [L(α) - ((1-α) L(0) + α L(1))]``) of:

* naive: B as trained;
* WM: ``modelmerge.align(a, b, module=<model holding A>, method="weight-matching")``;
* AM: ``method="activation-matching"`` on the setting's training data;
* WM+LMC: weight matching with ``refine="lmc", data=<the setting's Dataset>``;
* auto: ``method="auto"`` with the data (ranks WM, AM and refined answers by the merge's
  training loss; the table says which it chose).

The spec comes from ``modelmerge.trace`` through ``align(module=...)``: whatever the tracer
cannot follow stays unpermuted, and an alignment error is reported in its row. The table shows
the traced spec's number of groups, so "aligned almost nothing" is visible.

    python benchmarks/transformer_merge.py [--fast] [--seeds 0,1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from modelmerge.data import Dataset
from modelmerge.evaluate import evaluate_model, interpolation_curve


@dataclass(frozen=True)
class Setting:
    name: str
    model: str  # class in modelmerge.examples.blocks
    kwargs: dict
    dataset: str  # modelmerge.data loader
    input_shape: tuple[int, ...]
    epochs: int
    fast_epochs: int
    lr: float


SETTINGS = {
    "vit-digits": Setting("vit-digits", "TinyViT", {}, "digits", (1, 8, 8), 40, 8, 3e-3),
    "vit-digits-wide": Setting("vit-digits-wide", "TinyViT", {"dim": 96, "heads": 4, "mlp": 192}, "digits", (1, 8, 8),
                               40, 8, 2e-3),
    "encoder-mnist1d": Setting("encoder-mnist1d", "EncoderClassifier", {"seq": 40}, "mnist1d", (40,), 50, 4, 3e-3),
}
BATCH = 64
WEIGHT_DECAY = 0.01
ALPHAS = 11


def load_data(setting: Setting) -> Dataset:
    from modelmerge import data

    return getattr(data, setting.dataset)().shaped(setting.input_shape)


def build(setting: Setting) -> torch.nn.Module:
    from modelmerge.examples import blocks

    return getattr(blocks, setting.model)(**setting.kwargs)


def train(setting: Setting, data: Dataset, seed: int, epochs: int) -> tuple[dict[str, torch.Tensor], float]:
    """Train one model from ``seed``; returns its state dict and the training seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build(setting)
    opt = torch.optim.AdamW(model.parameters(), lr=setting.lr, weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(data.x_train) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=setting.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, time.perf_counter() - t0


def trained(setting: Setting, data: Dataset, seed: int, epochs: int, cache: Path) -> tuple[dict, float, bool]:
    """The cached model for (setting, seed, epochs), trained now if absent: (state, train seconds, cached)."""
    from safetensors.torch import load_file, save_file

    path = cache / f"{setting.name}-{setting.model}-seed{seed}-e{epochs}-lr{setting.lr:g}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), float(meta.get("train_seconds", "nan")), True
    state, secs = train(setting, data, seed, epochs)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"setting": setting.name, "seed": str(seed), "epochs": str(epochs),
                                         "train_seconds": f"{secs:.3f}"})
    os.replace(tmp, path)
    return state, secs, False


def make_metric(setting: Setting, data: Dataset):
    """state -> (test loss, test accuracy), running the setting's model with those weights."""
    module = build(setting).eval()
    x, y = data.x_test, data.y_test

    def metric(state):
        return evaluate_model(lambda xb: torch.func.functional_call(module, dict(state), (xb,)), x, y)

    return metric


VARIANTS = ("wm", "am", "wm+lmc", "auto")


def run_pair(setting: Setting, data: Dataset, a: dict, b: dict, refine_steps: int, seed: int) -> dict:
    """Barrier of naive, WM and WM+LMC for one pair; errors are caught per method."""
    from modelmerge.alignment import align

    metric = make_metric(setting, data)
    holder = build(setting).eval()
    holder.load_state_dict(a)
    out = {}
    naive = interpolation_curve(a, b, metric, ALPHAS)
    out["acc_a"], out["acc_b"] = naive.accuracies[0], naive.accuracies[-1]
    out["loss_a"], out["loss_b"] = naive.losses[0], naive.losses[-1]
    out["naive"] = {"barrier": naive.barrier, "auc": naive.auc, "mid_acc": naive.accuracies[ALPHAS // 2],
                    "seconds": 0.0}
    variants = {
        "wm": {"method": "weight-matching"},
        "am": {"method": "activation-matching", "data": data},
        "wm+lmc": {"method": "weight-matching", "refine": "lmc", "data": data, "refine_steps": refine_steps},
        "auto": {"method": "auto", "data": data, "refine_steps": refine_steps},
    }
    for key, kw in variants.items():
        t0 = time.perf_counter()
        try:
            r = align(a, b, module=holder, input_shape=setting.input_shape, seed=seed, **kw)
            secs = time.perf_counter() - t0
            curve = interpolation_curve(a, r.aligned, metric, ALPHAS)
            moved = sum(int((p != torch.arange(len(p))).sum()) for p in r.perm.values())
            out[key] = {"barrier": curve.barrier, "auc": curve.auc, "mid_acc": curve.accuracies[ALPHAS // 2],
                        "seconds": secs, "groups": len(r.network.spec.groups),
                        "units": sum(r.network.spec.groups.values()), "units_moved": moved,
                        "method": r.method, "objective": list(r.objective), "notes": list(r.notes),
                        "warnings": list(r.warnings)}
        except Exception as e:  # noqa: BLE001 - report the failure in the row
            out[key] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                        "seconds": time.perf_counter() - t0}
    return out


def fmt_barrier(entry: dict, naive: float) -> tuple[str, str]:
    if "error" in entry:
        return "error", "-"
    ratio = entry["barrier"] / naive if naive > 0 else float("nan")
    return f"{entry['barrier']:.4f}", f"{ratio:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", default="0,1", help="an even number of comma-separated seeds; each pair is one row")
    ap.add_argument("--epochs", type=int, help="override every setting's epochs")
    ap.add_argument("--fast", action="store_true", help="a smoke run: few epochs, 20 LMC steps")
    ap.add_argument("--refine-steps", type=int, help="LMC refinement steps (default 100, --fast 20)")
    ap.add_argument("--cache", default="/tmp/modelmerge-transformer-bench", help="folder of trained models")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write every row to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 2 or len(seeds) % 2:
        ap.error("--seeds needs an even number of seeds (pairs), e.g. 0,1")
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    refine_steps = args.refine_steps or (20 if args.fast else 100)
    cache = Path(args.cache)
    rows = []
    for name in names:
        setting = SETTINGS[name]
        epochs = args.epochs or (setting.fast_epochs if args.fast else setting.epochs)
        data = load_data(setting)
        for i in range(0, len(seeds), 2):
            pair = seeds[i:i + 2]
            states, train_s = [], []
            for s in pair:
                state, secs, cached = trained(setting, data, s, epochs, cache)
                states.append(state)
                train_s.append(secs)
                print(f"{name} seed {s}: {epochs} epochs, {'cached, ' if cached else ''}"
                      f"trained in {secs:.1f} s", flush=True)
            row = {"setting": name, "model": setting.model, "seeds": pair, "epochs": epochs,
                   "train_seconds": train_s, "refine_steps": refine_steps}
            row.update(run_pair(setting, data, states[0], states[1], refine_steps, seed=i // 2))
            print(f"{name} {pair}: acc {row['acc_a']:.3f}/{row['acc_b']:.3f}, barrier naive "
                  f"{row['naive']['barrier']:.4f}, " + ", ".join(
                      f"{k} {row[k].get('barrier', row[k].get('error'))}" for k in VARIANTS), flush=True)
            rows.append(row)
    print(f"\n### transformer merge — {time.strftime('%Y-%m-%d')} — {platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"command: `python benchmarks/transformer_merge.py{' --fast' if args.fast else ''} --seeds {args.seeds}`; "
          f"test split, {ALPHAS} α, LMC {refine_steps} steps\n")
    print("| setting | seeds | epochs | acc A / B | barrier naive | "
          + " | ".join(f"{k} (× naive, s)" for k in VARIANTS) + " | groups (units) | auto chose |")
    print("|---|---|---|---|---|" + "---|" * len(VARIANTS) + "---|---|")
    for r in rows:
        naive = r["naive"]["barrier"]
        cells = []
        for k in VARIANTS:
            value, ratio = fmt_barrier(r[k], naive)
            cells.append(f"{value} ({ratio}, {r[k]['seconds']:.1f})")
        groups = f"{r['wm']['groups']} ({r['wm']['units']})" if "groups" in r["wm"] else "-"
        print(f"| {r['setting']} | {r['seeds'][0]},{r['seeds'][1]} | {r['epochs']} | {r['acc_a']:.3f} / "
              f"{r['acc_b']:.3f} | {naive:.4f} | " + " | ".join(cells) + f" | {groups} | {r['auto'].get('method', '-')} |")
    errors = [(r["setting"], k, r[k]["error"]) for r in rows for k in VARIANTS if "error" in r[k]]
    for setting, key, err in errors:
        print(f"\n{setting} {key}: {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "fast": args.fast, "rows": rows}, f,
                      indent=1, default=str)


if __name__ == "__main__":
    main()
