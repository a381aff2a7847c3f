"""Weight matching at real model sizes: time and peak memory of the real CLI (issue: robust, part 2).

For each model of ``benchmarks/scale_models.py`` (ResNet-50, ResNeXt-50 32x4d,
ViT-B/16 for 32x32 images, VGG-11 with BatchNorm; 10 classes) two random-init
checkpoints (different seeds, BatchNorm running statistics randomised too;
``--bn-affine`` also its weight and bias) are saved as safetensors in a temporary folder, then the real
commands run as child processes, one at a time:

    modelmerge align A B -o B_al --model benchmarks.scale_models:CLASS --method weight-matching --json
    modelmerge interpolate A B_al -o MERGED            (with --interpolate)
    modelmerge evaluate A B_al --dataset RANDOM.npz --model … --alphas 3   (with --evaluate: 64 random
                                                        inputs of the model's shape, 10 classes)

Each child's peak RSS is read from its own rusage (``os.wait4``), so one
child's peak never hides another's. A child running past ``--timeout`` is
killed and reported as "timeout". Prints a Markdown table.

    python benchmarks/scale.py                         # all four models
    python benchmarks/scale.py --models resnet50 vgg11_bn --timeout 1200 --interpolate
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_checkpoint(cls, seed: int, path: Path, bn_affine: bool = False) -> int:
    """Save a random-init model as safetensors; return the file size in bytes.

    BatchNorm running statistics are randomised (so that verification sees them
    permuted); with ``bn_affine`` its weight and bias too (by default they keep
    their init, 1 and 0, as in a freshly built torchvision model).
    """
    import torch
    from safetensors.torch import save_file
    from torch import nn

    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                if bn_affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    del model
    gc.collect()
    return path.stat().st_size


def run_child(args: list[str], timeout: float, cwd: Path) -> dict:
    """Run ``python -m modelmerge ARGS``; return rc, wall seconds, peak RSS (bytes), stdout, stderr tail."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        # one thread everywhere: torch (--threads) and the BLAS pools, also in versions that did not limit them
        env = {**os.environ, **{v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
        proc = subprocess.Popen([sys.executable, "-m", "modelmerge", *map(str, args)], stdout=out, stderr=err,
                                cwd=cwd, env=env)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        # ru_maxrss is in KiB on Linux
        return {"rc": proc.returncode, "timeout": timed_out, "wall": wall, "rss": usage.ru_maxrss * 1024,
                "stdout": out.read(), "stderr": err.read()[-2000:]}


def bench(name: str, folder: Path, timeout: float, max_iter: int, interpolate: bool, bn_affine: bool,
          evaluate: bool = False) -> dict:
    from benchmarks.scale_models import MODELS

    target, shape = MODELS[name]
    module, _, attr = target.partition(":")
    cls = getattr(__import__(module, fromlist=[attr]), attr)
    a, b = folder / f"{name}_a.safetensors", folder / f"{name}_b.safetensors"
    size = make_checkpoint(cls, 1, a, bn_affine) + make_checkpoint(cls, 2, b, bn_affine)
    row = {"model": name, "size": size}
    out = folder / f"{name}_b_aligned.safetensors"
    res = run_child(["align", a, b, "-o", out, "--model", target, "--input-shape", shape, "--method",
                     "weight-matching", "--max-iter", max_iter, "--threads", 1, "--json", "--force"], timeout, ROOT)
    row.update(align_wall=res["wall"], align_rss=res["rss"], status="ok")
    if res["timeout"]:
        row["status"] = "timeout"
    elif res["rc"] != 0:
        row["status"] = f"failed (rc {res['rc']}): {res['stderr'].strip().splitlines()[-1:]}"
    else:
        rep = json.loads(res["stdout"])
        groups = rep["spec"]["groups"]
        row.update(groups=len(groups), units=sum(groups.values()), total=rep["seconds"]["total"],
                   wm=rep["seconds"].get("weight_matching"), iterations=rep["iterations"],
                   converged=rep["converged"], before=rep["objective"]["before"], after=rep["objective"]["after"])
        if interpolate:
            merged = folder / f"{name}_merged.safetensors"
            res = run_child(["interpolate", a, out, "-o", merged, "--force"], timeout, ROOT)
            row["interp_rss"] = res["rss"] if res["rc"] == 0 else None
            merged.unlink(missing_ok=True)
        if evaluate:
            import numpy as np

            data = folder / f"{name}_data.npz"
            dims = [int(d) for d in shape.split(",")]
            np.savez(data, x=np.random.default_rng(0).standard_normal((64, *dims)).astype("float32"),
                     y=np.arange(64) % 10)
            res = run_child(["evaluate", a, out, "--dataset", data, "--model", target, "--input-shape", shape,
                             "--alphas", 3, "--threads", 1, "--json"], timeout, ROOT)
            row["eval_rss"] = res["rss"] if res["rc"] == 0 else None
            data.unlink(missing_ok=True)
    for p in (a, b, out):
        p.unlink(missing_ok=True)
    return row


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def table(rows: list[dict], interpolate: bool, evaluate: bool = False) -> str:
    head = ["model", "groups / units", "A+B MiB", "align s (total)", "weight_matching s", "sweeps",
            "objective before -> after", "align peak RSS MiB", "RSS / (A+B)"]
    if interpolate:
        head.append("interpolate peak RSS MiB")
    if evaluate:
        head.append("evaluate peak RSS MiB (/ (A+B))")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = r["status"] == "ok"
        cells = [
            r["model"],
            f"{r['groups']} / {r['units']:,}" if ok else "-",
            _mb(r["size"]),
            f"{r['total']:.1f}" if ok else f"{r['status']} ({r['align_wall']:.0f} s)",
            f"{r['wm']:.1f}" if ok and r.get("wm") is not None else "-",
            (f"{r['iterations']}" + ("" if r["converged"] else " (max)")) if ok else "-",
            f"{r['before']:.5g} -> {r['after']:.5g}" if ok else "-",
            _mb(r["align_rss"]) + (" (at kill)" if r["status"] == "timeout" else ""),
            f"{r['align_rss'] / r['size']:.2f}x",
        ]
        if interpolate:
            cells.append(_mb(r.get("interp_rss")))
        if evaluate:
            rss = r.get("eval_rss")
            cells.append("-" if rss is None else f"{_mb(rss)} ({rss / r['size']:.2f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.scale_models import MODELS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per align run before it is killed")
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--interpolate", action="store_true", help="also measure `interpolate A B_aligned` peak RSS")
    ap.add_argument("--evaluate", action="store_true", help="also measure `evaluate A B_aligned` peak RSS")
    ap.add_argument("--bn-affine", action="store_true",
                    help="also randomise BatchNorm weight and bias (a harder, near rank-one cost; see the docs)")
    ap.add_argument("--folder", type=Path, default=None, help="where to write checkpoints (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="modelmerge-scale-") as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            row = bench(name, folder, args.timeout, args.max_iter, args.interpolate, args.bn_affine, args.evaluate)
            rows.append(row)
            print(f"{name}: {row}", file=sys.stderr, flush=True)
    print(f"#### Real model sizes - {date.today()} - {platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, 1 thread")
    print(f"command: `python benchmarks/scale.py {' '.join(sys.argv[1:])}`\n")
    print(table(rows, args.interpolate, args.evaluate))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
