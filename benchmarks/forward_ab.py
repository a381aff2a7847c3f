"""The aligner's forward now against an older revision of `modelmerge/deepalign/model.py`, in one process.

Loads the old module from git, gives it the bundled aligner's weights, checks that both give
the same Hungarian answers on a trained pair of each family, and times the two forwards
interleaved (medians of ROUNDS x 10 calls, one thread), with weight matching beside them.

    python benchmarks/forward_ab.py --rev 7ea806d --families digits-mlp,mnist1d-mlp,digits-mlp-deep,digits-cnn
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import align_quality as aq  # noqa: E402

from modelmerge.data import load_dataset  # noqa: E402
from modelmerge.deepalign.pretrained import default_aligner, load_aligner  # noqa: E402
from modelmerge.matching import weight_matching  # noqa: E402
from modelmerge.network import resolve_network  # noqa: E402
from modelmerge.zoo.train import TrainConfig, train_models  # noqa: E402


def old_module(rev: str):
    text = subprocess.run(["git", "show", f"{rev}:modelmerge/deepalign/model.py"], check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "model_old.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("model_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["model_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def per_call(f, k: int = 10) -> float:
    t = time.perf_counter()
    for _ in range(k):
        f()
    return (time.perf_counter() - t) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True)
    ap.add_argument("--families", default="digits-mlp,digits-cnn")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--aligner", help="bundled name or folder (default: the family's default aligner)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = old_module(args.rev)
    print("| family | same answers | forward new / old (median) | new s | old s | weight matching s |")
    print("|---|---|---|---|---|---|")
    for fam in args.families.split(","):
        record, dname = aq.FAMILIES[fam]
        models = train_models(record, load_dataset(dname), [90_000, 90_001], TrainConfig(epochs=30))
        a, b = models[0].state, models[1].state
        net = resolve_network(a, record=record)
        wa, wb = net.weight_space(a), net.weight_space(b)
        name = args.aligner or getattr(default_aligner(net.family, net.depth), "name", None)
        if name is None:
            raise SystemExit(f"{fam}: no bundled aligner covers it; pass --aligner")
        new, card = load_aligner(name)
        ref = old.DeepAlign(old.AlignerConfig.from_dict(card["config"]))
        ref.load_state_dict(new.state_dict())
        ref.eval()
        same = all(torch.equal(x, y) for x, y in zip(new.align(wa, wb), ref.align(wa, wb)))
        rows = []
        for _ in range(args.rounds):
            rows.append((per_call(lambda: new.align(wa, wb)), per_call(lambda: ref.align(wa, wb)),
                         per_call(lambda: weight_matching(a, b, net.spec, seed=0), 5)))
        med = [statistics.median(r[i] for r in rows) for i in range(3)]
        ratio = statistics.median(r[0] / r[1] for r in rows)
        print(f"| {fam} | {same} | {ratio:.2f} | {med[0]:.4f} | {med[1]:.4f} | {med[2]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
