"""Refining an alignment with data: a short straight-through LMC optimisation.

The straight-through estimator of Git Re-Basin (Ainsworth et al., 2023): free
weights ``θ`` start at A's; each step projects ``θ`` onto B's permutation
orbit by weight matching (warm-started from the previous answer, the first
time from the answer being refined), runs the α = 0.5 merge of A and the
projected B with ``θ``'s gradient passed straight through the projection, and
takes an Adam step on ``θ``. The permutation is thus re-chosen globally at
every step by a fast matcher, which measured far better here than optimising
per-layer Sinkhorn logits (digits MLPs: 0.48x vs 0.62x weight matching's
barrier, docs/benchmarks.md). The best hard answer seen, the starting one
included, is returned, scored by the merge's loss on :func:`selection_batch`,
so refinement never makes that loss worse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from modelmerge.deepalign.losses import lmc_loss
from modelmerge.errors import ModelMergeError
from modelmerge.matching import weight_matching
from modelmerge.permutation import apply_permutation
from modelmerge.spec import Chain, PermutationSpec
from modelmerge.zoo.data import Dataset

#: examples of the training split that score candidate answers (a seeded subset beyond this)
SELECTION_LIMIT = 4096


@dataclass(frozen=True)
class RefineInfo:
    steps: int
    loss_before: float
    loss_after: float


def builder_layout(chain: Chain, state: Mapping[str, torch.Tensor], record: Mapping | None):
    """The record and a key map to the builder's names (``0.weight``...) for stacked forwards.

    Returns:
        ``(record, key_map)`` with ``key_map[builder_key] = state_key``.

    Raises:
        ModelMergeError: no record and not a plain Linear chain.
    """
    if record is not None:
        return record, {k: k for k in state}
    if any(layer.kind != "linear" or layer.norms for layer in chain.layers):
        raise ModelMergeError("LMC refinement needs an architecture record or a plain Linear MLP checkpoint")
    widths = [state[chain.layers[0].weight].shape[1]] + [state[layer.weight].shape[0] for layer in chain.layers]
    key_map = {}
    for i, layer in enumerate(chain.layers):
        key_map[f"{2 * i}.weight"] = layer.weight
        if layer.bias is None:
            raise ModelMergeError("LMC refinement of a bare checkpoint needs biases on every layer")
        key_map[f"{2 * i}.bias"] = layer.bias
    return {"family": "mlp", "widths": widths, "activation": "relu"}, key_map


def selection_batch(data: Dataset, limit: int = SELECTION_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples that score candidate answers: the training split, or a seeded subset of ``limit``.

    The whole split rather than a small held-back batch: differences between good
    answers are a few hundredths of a nat, below a 256-example batch's noise
    (measured: the held-back batch picked worse answers on held-out pairs). The
    test split stays for evaluation.
    """
    x, y = data.x_train, data.y_train
    if len(x) == 0:
        raise ModelMergeError("the dataset has no training examples to score alignments with")
    if len(x) > limit:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:limit]
        x, y = x[idx], y[idx]
    return x, y


def refine_lmc(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    chain: Chain,
    data: Dataset,
    init: Mapping[str, torch.Tensor],
    *,
    record: Mapping | None = None,
    steps: int = 100,
    lr: float = 1e-2,
    batch: int = 512,
    seed: int = 0,
    max_iter: int = 20,
) -> tuple[dict[str, torch.Tensor], RefineInfo]:
    """Improve a permutation of B's units by minimising the α = 0.5 merge's loss (see the module doc).

    Args:
        a, b: state dicts.
        spec, chain: the chain's spec (its groups are the hidden layers).
        data: task data shaped for the model (see :func:`modelmerge.zoo.train.fit_inputs`).
        init: starting permutation (group -> LongTensor), e.g. the learned answer.
        record: architecture record (else a plain Linear chain is run as a ReLU MLP).
        steps: optimisation steps (one weight-matching projection each).
        lr: Adam learning rate on the free weights.
        batch: training examples per step.
        seed: seeds the batches and the matcher's group order.
        max_iter: weight-matching sweeps per projection at most.

    Returns:
        ``(perm, info)``.

    Raises:
        ModelMergeError: no record and not a plain Linear chain, or no training data.
    """
    record, key_map = builder_layout(chain, a, record)
    x_sel, y_sel = selection_batch(data)
    gen = torch.Generator().manual_seed(seed)
    used = list(key_map.values())  # the tensors the forward reads
    a_run = {bk: a[k].float()[None] for bk, k in key_map.items()}
    half = torch.tensor([0.5])

    def merged_loss(b_state, x, y) -> torch.Tensor:
        b_run = {bk: b_state[k].float()[None] for bk, k in key_map.items()}
        return lmc_loss(record, a_run, b_run, x[None], y[None], half)

    def score(perm) -> float:
        with torch.no_grad():
            return float(merged_loss(apply_permutation(b, spec, perm), x_sel, y_sel))

    # free weights: every float tensor of A (the matcher reads them all), trained where the forward reads them
    theta = {k: (v.detach().float().clone() if v.is_floating_point() else v) for k, v in a.items()}
    trained = [theta[k].requires_grad_(True) for k in used if theta[k].is_floating_point()]
    opt = torch.optim.Adam(trained, lr=lr)
    perm = {g: p.clone() for g, p in init.items()}
    best, best_loss = perm, score(perm)
    start, last = best_loss, None
    for step in range(steps):
        frozen = {k: v.detach() for k, v in theta.items()}
        perm, _ = weight_matching(frozen, b, spec, seed=seed + step, max_iter=max_iter, init=perm)
        projected = apply_permutation(b, spec, perm)
        # straight through: the forward sees the projection, the gradient reaches θ
        st = {k: theta[k] + (projected[k].float() - theta[k]).detach() for k in used}
        idx = torch.randint(len(data.x_train), (min(batch, len(data.x_train)),), generator=gen)
        loss = merged_loss(st, data.x_train[idx], data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        key = tuple(tuple(p.tolist()) for p in perm.values())
        if key != last:  # the projection often repeats: score only new answers
            last = key
            cand = score(perm)
            if cand < best_loss:
                best, best_loss = {g: p.clone() for g, p in perm.items()}, cand
    return dict(best), RefineInfo(steps, start, best_loss)
