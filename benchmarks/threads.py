"""The real `modelmerge align` command beside the library call, idle and beside one busy process.

Trains two digits MLPs 64-128-128-128-10 (seeds 60001, 60002), saves them with
their architecture record, then, idle and with one busy neighbour (a process
doing NumPy 512x512 matmuls in a loop on 2 BLAS threads, killed at the end):

* CLI: `python -m modelmerge align A B -o OUT --method weight-matching --force --json`
  in a subprocess, as a user runs it; its alignment stage is `seconds.align`.
* CLI, old threads: the same command with `set_threads` limiting torch only
  (the behaviour before `modelmerge.threads`), for comparison.
* library: `modelmerge.alignment.align(..., method="weight-matching")` in this
  process inside `modelmerge.limit_threads(1)` (warm: after one warm-up call); the
  same as the first call in a fresh process (what the CLI's stage is, cold);
  and with torch at 1 thread but the BLAS pools unlimited (the old behaviour).
* CLI `align --data digits` (auto: learned, weight matching and LMC refinement
  ranked by the merge's loss) at the default `--refine-steps` (100) and at 20,
  wall time per pair against `align --method weight-matching`.
* `python -c 'import torch'`: the process start-up inside every CLI wall time.

Medians over --repeats runs. Prints a markdown table.

    python benchmarks/threads.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

import modelmerge as mm
from modelmerge.alignment import align
from modelmerge.archs import record_to_json
from modelmerge.checkpoint import META_PREFIX, save_checkpoint
from modelmerge.data import digits
from modelmerge.zoo.train import TrainConfig, train_models

RECORD = {"family": "mlp", "widths": [64, 128, 128, 128, 10], "activation": "relu"}
SEEDS = [60_001, 60_002]
BUSY = ("import numpy as np\n"
        "a = np.random.default_rng(0).random((512, 512))\n"
        "while True:\n"
        "    a = a @ a\n"
        "    a /= abs(a).max()\n")
# the real CLI with set_threads limiting torch only, as before modelmerge.threads
OLD_CLI = ("import sys, torch, modelmerge.threads as t\n"
           "def old(threads=None, default=1):\n"
           "    n = t.resolve_threads(threads, default); torch.set_num_threads(n); return n\n"
           "t.set_threads = old\n"
           "from modelmerge.cli import main\n"
           "sys.argv[0] = 'modelmerge'; main()\n")


def train_pair(folder: Path) -> tuple[Path, Path]:
    with mm.limit_threads(os.cpu_count() or 1):
        models = train_models(RECORD, digits(), SEEDS, TrainConfig(epochs=30))
    paths = []
    for m in models:
        meta = {META_PREFIX + "arch": record_to_json(RECORD), META_PREFIX + "seed": str(m.seed),
                META_PREFIX + "dataset": "digits"}
        paths.append(save_checkpoint(m.state, folder / f"mlp_{m.seed}.safetensors", meta, force=True))
    return paths[0], paths[1]


def cli(a: Path, b: Path, out: Path, extra: list[str], old: bool = False) -> tuple[float, float]:
    """Wall seconds of one `modelmerge align` process and its `seconds.align`."""
    head = [sys.executable, "-c", OLD_CLI] if old else [sys.executable, "-m", "modelmerge"]
    cmd = head + ["align", str(a), str(b), "-o", str(out), "--force", "--json", *extra]
    env = {k: v for k, v in os.environ.items() if k != "MODELMERGE_THREADS"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return wall, json.loads(done.stdout)["seconds"]["align"]


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


COLD_LIBRARY = ("import sys, modelmerge as mm\n"
                "from modelmerge.alignment import align\n"
                "a, b = (mm.load_checkpoint(p) for p in sys.argv[1:3])\n"
                "with mm.limit_threads(1):\n"
                "    r = align(a.state, b.state, record=a.arch, method='weight-matching')\n"
                "print(r.seconds['align'])\n")


def cold_library(a: Path, b: Path) -> float:
    """`align()`'s alignment stage on its first call in a fresh process (as in the CLI)."""
    done = subprocess.run([sys.executable, "-c", COLD_LIBRARY, str(a), str(b)], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip().splitlines()[-1])


def library(a, b, blas_limited: bool) -> float:
    if blas_limited:
        with mm.limit_threads(1):
            r = align(a, b, record=RECORD, method="weight-matching")
    else:  # torch at one thread, BLAS pools at their defaults (one per core)
        with threadpool_limits(limits=os.cpu_count() or 1):
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                r = align(a, b, record=RECORD, method="weight-matching")
            finally:
                torch.set_num_threads(before)
    return r.seconds["align"]


def measure(pa: Path, pb: Path, out: Path, repeats: int, data_repeats: int) -> dict[str, dict[str, float]]:
    a = mm.load_checkpoint(str(pa)).state
    b = mm.load_checkpoint(str(pb)).state
    library(a, b, True)  # warm-up: lazy imports, first-call costs
    rows: dict[str, dict[str, float]] = {}

    def add(name, runs):
        walls = [w for w, _ in runs if w is not None]
        rows[name] = {"wall": statistics.median(walls) if walls else float("nan"),
                      "align": statistics.median(s for _, s in runs)}  # nan when not measured

    wm = ["--method", "weight-matching"]
    add("CLI --method weight-matching", [cli(pa, pb, out, wm) for _ in range(repeats)])
    add("CLI --method weight-matching, old threads (torch only)",
        [cli(pa, pb, out, wm, old=True) for _ in range(repeats)])
    add("library align(), mm.limit_threads(1)", [(None, library(a, b, True)) for _ in range(repeats)])
    add("library align(), mm.limit_threads(1), first call in a fresh process",
        [(None, cold_library(pa, pb)) for _ in range(repeats)])
    add("library align(), torch 1 thread, BLAS unlimited", [(None, library(a, b, False)) for _ in range(repeats)])
    add("`python -c 'import torch'` (start-up share of every CLI wall time)",
        [(_wall([sys.executable, "-c", "import torch"]), float("nan")) for _ in range(repeats)])
    add("CLI --data digits (auto, --refine-steps 100)",
        [cli(pa, pb, out, ["--data", "digits"]) for _ in range(data_repeats)])
    add("CLI --data digits (auto, --refine-steps 20)",
        [cli(pa, pb, out, ["--data", "digits", "--refine-steps", "20"]) for _ in range(data_repeats)])
    return rows


def fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"  # nan: not measured for this row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="runs per weight-matching row (median)")
    ap.add_argument("--data-repeats", type=int, default=3, help="runs per --data row (median)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pa, pb = train_pair(folder)
        out = folder / "out.safetensors"
        results = {"idle": measure(pa, pb, out, args.repeats, args.data_repeats)}
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
        busy = subprocess.Popen([sys.executable, "-c", BUSY], env=env)
        try:
            time.sleep(2.0)  # let it start its threads
            results["one busy process"] = measure(pa, pb, out, args.repeats, args.data_repeats)
        finally:
            busy.kill()
            busy.wait()
    print(f"\n### Threads under load — {date.today()} — {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}")
    print(f"command: `python benchmarks/threads.py --repeats {args.repeats} --data-repeats {args.data_repeats}`"
          f" (medians)\n")
    print("1-minute load average (other processes included) at the start "
          f"{load_before[0]:.2f}, at the end {os.getloadavg()[0]:.2f}\n")
    names = list(results["idle"])
    print("| run | idle: align stage s | idle: wall s | busy: align stage s | busy: wall s |")
    print("|---|---|---|---|---|")
    for n in names:
        i, b = results["idle"][n], results["one busy process"][n]
        print(f"| {n} | {fmt(i['align'])} | {fmt(i['wall'])} | {fmt(b['align'])} | {fmt(b['wall'])} |")
    busy_rows = results["one busy process"]
    lib = busy_rows["library align(), mm.limit_threads(1)"]["align"]
    cli_wm = busy_rows["CLI --method weight-matching"]
    cold = busy_rows["library align(), mm.limit_threads(1), first call in a fresh process"]["align"]
    print(f"\nbusy: CLI alignment stage / library one-thread = {cli_wm['align'] / lib:.2f}x (warm library), "
          f"{cli_wm['align'] / cold:.2f}x (library's first call in a fresh process) (target <= 1.5)")
    for steps in (100, 20):
        d = busy_rows[f"CLI --data digits (auto, --refine-steps {steps})"]
        print(f"busy: `align --data digits --refine-steps {steps}` / `align --method weight-matching`: wall "
              f"{d['wall'] / cli_wm['wall']:.2f}x (target <= 2), alignment stage {d['align'] / cli_wm['align']:.1f}x")


if __name__ == "__main__":
    main()
