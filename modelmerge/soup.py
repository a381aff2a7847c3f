"""Merging many models: align them to one frame, then average (model soups across seeds).

Two ways to find the common frame:

* ``weight-matching`` (default): Git Re-Basin's MergeMany. Every model starts in
  its own order; each sweep visits the models in a seeded random order and
  re-aligns model ``i`` by weight matching to the weighted average of all the
  *others* (as currently aligned), started from its current permutation. It
  stops when a sweep changes nothing (or after ``max_iter`` sweeps). No model is
  privileged: the frame is the one the group converges to.
* any other alignment method (``auto``, ``deep-align``, ``activation-matching``):
  each model is aligned to the first one, pairwise, as ``align`` would (``auto``
  with data also ranks weight matching and the LMC-refined answer); the learned
  aligner reads pairs, so there is no joint version of it.

The soup is ``sum_i w_i * aligned_i`` per floating-point tensor (integer
buffers come from the first model). Every aligned model is verified to compute
its original's function, as ``align`` does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modelmerge.data import Dataset
from modelmerge.errors import ModelMergeError, check_count
from modelmerge.merge import as_state_dict, check_mergeable, check_same_architecture, narrow
from modelmerge.network import Network
from modelmerge.permutation import Permutation, apply_permutation, identity_permutation
from modelmerge.verify import Verification, verify_permuted

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class SoupResult:
    """What :func:`merge_many` found.

    Attributes:
        soup: the weighted average of the aligned models.
        perms: per model, its permutation into the common frame.
        aligned: per model, its weights in the common frame.
        verifications: per model, the check that its aligned weights compute its function.
        sweeps: MergeMany sweeps run (0 for pairwise methods).
        converged: a sweep changed nothing (None for pairwise methods).
        seconds: time spent aligning.
        method: how the frame was found.
    """

    soup: dict[str, torch.Tensor]
    perms: list[Permutation]
    aligned: list[dict[str, torch.Tensor]]
    verifications: list[Verification]
    sweeps: int
    converged: bool | None
    seconds: float
    method: str


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """The soup weights: ``weights`` checked (n of them, finite, >= 0, summing to 1), else uniform.

    Raises:
        ModelMergeError: wrong count, a negative or non-finite weight, or a sum other than 1.
    """
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ModelMergeError(f"--weights has {len(w)} value(s) for {n} models; give one weight per model")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ModelMergeError("--weights must be finite and non-negative (they are the models' shares of the soup)")
    if abs(sum(w) - 1.0) > 1e-6:
        raise ModelMergeError(f"--weights sum to {sum(w):.6g}, not 1; rescale them (e.g. 0.5,0.25,0.25)")
    return w


def average(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i * states[i]`` per floating-point tensor (in at least float32, stored in the first
    model's dtype); other tensors are copied from the first model."""
    first = states[0]
    out = {}
    for k, t in first.items():
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        work = torch.float64 if t.dtype == torch.float64 else torch.float32  # (float8 has no promotion rules)
        acc = sum(w * s[k].to(work) for w, s in zip(weights, states))
        out[k] = narrow(acc, t.dtype)
    return out


def merge_many(
    states: Sequence[State],
    network: Network,
    *,
    weights: Sequence[float] | None = None,
    method: str = "weight-matching",
    data: str | Dataset | None = None,
    aligner: str | None = None,
    max_iter: int = 20,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> SoupResult:
    """Align ``states`` to one frame and average them.

    Args:
        states: two or more state dicts of one architecture (or loaded Checkpoints), not modified.
        network: their resolved network (spec and forward).
        weights: each model's share of the soup (default: equal).
        method: ``"weight-matching"`` (MergeMany) or an ``align`` method (pairwise to the first model).
        data: ``--data`` for methods that read it (``activation-matching``, ``auto``): a name or
            file, or a loaded ``Dataset`` (read once for all the models).
        aligner: ``--aligner`` for ``auto``/``deep-align``.
        max_iter: MergeMany sweeps at most.
        seed: visiting order and verification inputs.
        on_progress: called with (model visits done, estimated total).

    Returns:
        A :class:`SoupResult`.

    Raises:
        ModelMergeError: fewer than two models, bad weights, ``max_iter`` below 1, an unknown
            method, or a state dict that is not one of finite tensors (see :func:`~modelmerge.merge.as_state_dict`).
        MismatchError: the models differ in keys or shapes.
        VerificationError: an aligned model does not compute its original's function.
    """
    n = len(states)
    if n < 2:
        raise ModelMergeError(f"merge needs at least two models, got {n}")
    check_count(max_iter, "max_iter")
    states = [as_state_dict(s, f"model {i}") for i, s in enumerate(states, start=1)]
    w = check_weights(weights, n)
    for i, s in enumerate(states[1:], start=2):
        check_same_architecture(states[0], s, ("model 1", f"model {i}"))
        check_mergeable(states[0], s, ("model 1", f"model {i}"))
    spec = network.spec
    t = time.perf_counter()
    if method == "weight-matching":
        perms, sweeps, converged = _merge_many_wm(states, spec, w, max_iter, seed, on_progress)
    else:
        from modelmerge.alignment import align

        perms, sweeps, converged = [identity_permutation(spec)], 0, None
        for i in range(1, n):
            # align()'s defaults: auto with data also ranks weight matching and the LMC refinement
            r = align(states[0], states[i], network=network, method=method, data=data, aligner=aligner, seed=seed)
            perms.append(r.perm)
            if on_progress is not None:
                on_progress(i, n - 1)
    seconds = time.perf_counter() - t
    aligned = [apply_permutation(s, spec, p) for s, p in zip(states, perms)]
    checks = [verify_permuted(s, al, network, seed=seed) for s, al in zip(states, aligned)]
    return SoupResult(average(aligned, w), perms, aligned, checks, sweeps, converged, seconds, method)


def _merge_many_wm(states, spec, w, max_iter, seed, on_progress):
    from modelmerge.matching import weight_matching

    n = len(states)
    perms = [identity_permutation(spec) for _ in states]
    aligned = [dict(s) for s in states]
    rng = np.random.default_rng(seed)
    total, done = max_iter * n, 0
    for sweep in range(1, max_iter + 1):
        changed = False
        for i in rng.permutation(n).tolist():
            others = [j for j in range(n) if j != i]
            share = sum(w[j] for j in others)
            # equal shares when the others weigh nothing (a model at weight 1 still needs a frame)
            ws = [w[j] / share for j in others] if share > 0 else [1.0 / len(others)] * len(others)
            reference = average([aligned[j] for j in others], ws)
            perm, _ = weight_matching(reference, states[i], spec, seed=seed + sweep, init=perms[i], objective=False)
            if any(not torch.equal(perm[g], perms[i][g]) for g in perm):
                changed = True
                perms[i] = perm
                aligned[i] = apply_permutation(states[i], spec, perm)
            done += 1
            if on_progress is not None:
                on_progress(done, total)
        if not changed:
            if on_progress is not None:  # converged: the visits made are the total (not max_iter's)
                on_progress(done, done)
            return perms, sweep, True
    return perms, max_iter, False
