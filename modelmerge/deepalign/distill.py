"""Refined answers as training targets for an aligner (``train-aligner --distill``).

The LMC loss alone gives the aligner a weak signal: one straight-through
gradient of a merge's loss per pair. With task data, ``auto --data`` finds much
better answers than any data-free method (the LMC refinement, started from the
best of weight matching and the starting aligner). Computing those answers for
some *training* pairs of every zoo once, before training, turns them into a
per-unit target: the cross-entropy of each affinity row against the refined
match, added to the LMC loss. No labelled alignments are needed; the targets
come from data and the refinement, never from validation networks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from modelmerge.deepalign.model import DeepAlign


@dataclass
class Targets:
    """Refined answers for pairs of one zoo's training networks.

    Attributes:
        pairs: ``[P, 2]`` zoo indices (A, B).
        perms: per hidden layer ``[P, n_l]``: B's unit for A's unit ``i``.
    """

    pairs: torch.Tensor
    perms: list[torch.Tensor]

    def to_dict(self) -> dict:
        return {"pairs": self.pairs, "perms": self.perms}


def refined_targets(zoo, train_idx: list[int], dataset, pairs: int, seed: int,
                    start: DeepAlign | None = None) -> Targets:
    """Refined answers for ``pairs`` random pairs of ``train_idx`` (the zoo's training networks).

    Each pair: weight matching's answer and ``start``'s (if given) are scored by the
    α = 0.5 merge's loss on the training split, and the best is refined by the LMC
    refinement (:func:`modelmerge.methods.lmc.refine_lmc`), exactly as ``auto --data`` does.

    Args:
        zoo: a :class:`modelmerge.deepalign.train.Zoo`.
        train_idx: indices of its training networks.
        dataset: its task data (shaped for its record).
        pairs: number of pairs.
        seed: seeds the pair choice and the refinement.
        start: an aligner whose answer is a candidate start (e.g. the one being fine-tuned).

    Returns:
        The targets.
    """
    from modelmerge.matching import weight_matching
    from modelmerge.methods.lmc import refine_lmc, score
    from modelmerge.network import resolve_network
    from modelmerge.weightspace import stacked_weight_space

    rng = np.random.default_rng([seed, 7])
    chosen = np.array([rng.choice(train_idx, 2, replace=False) for _ in range(pairs)])
    groups = [zoo.chain.group(l) for l in range(len(zoo.chain.layers) - 1)]
    out: list[list[torch.Tensor]] = [[] for _ in groups]
    network = None
    for n, (i, j) in enumerate(chosen):
        a, b = zoo.take(torch.tensor(int(i))), zoo.take(torch.tensor(int(j)))
        if network is None:
            network = resolve_network(a, record=zoo.record)
            data = network.shape_data(dataset)
        candidates = [weight_matching(a, b, zoo.spec, seed=seed + n)[0]]
        if start is not None:
            with torch.no_grad():
                ws = [stacked_weight_space(zoo.chain, {k: v[None] for k, v in s.items()}) for s in (a, b)]
                candidates.append(dict(zip(groups, start.align(*ws))))
        best = min(candidates, key=lambda p: score(network, a, b, p, data))
        perm, _ = refine_lmc(a, b, network, data, best, seed=seed + n)
        for l, g in enumerate(groups):
            out[l].append(perm[g])
    return Targets(torch.as_tensor(chosen, dtype=torch.long), [torch.stack(p) for p in out])


def load_or_make(path, parts, pairs: int, seed: int, start: DeepAlign | None, log: Callable[[str], None]
                 ) -> list[Targets | None]:
    """Targets for every zoo of a run, read from ``path`` when it holds them (same zoos, pairs
    and seed), else computed and written there (so a resumed run does not recompute them).
    A zoo without task data gets None."""
    from pathlib import Path

    from modelmerge.checkpoint import atomic_path

    key = {"zoos": [str(p.zoo.folder) for p in parts], "pairs": pairs, "seed": seed}
    path = Path(path)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a cache: an unreadable one is recomputed and replaced
            saved = {}
            log(f"distill: {path} is unreadable; computing the targets again")
        if isinstance(saved, dict) and saved.get("key") == key:
            return [None if t is None else Targets(t["pairs"], t["perms"]) for t in saved["targets"]]
    t0 = time.perf_counter()
    targets: list[Targets | None] = []
    for k, part in enumerate(parts):
        if part.dataset is None:
            targets.append(None)
            continue
        targets.append(refined_targets(part.zoo, part.train_idx, part.dataset, pairs, seed + k, start))
        log(f"distill: zoo {k + 1}/{len(parts)} refined ({time.perf_counter() - t0:.0f} s)")
    with atomic_path(path) as tmp:
        torch.save({"key": key, "targets": [None if t is None else t.to_dict() for t in targets]}, tmp)
    return targets
