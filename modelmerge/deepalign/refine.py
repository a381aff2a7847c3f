"""Refining an alignment with a short straight-through LMC optimisation (needs data).

Starting from an answer (a learned aligner's affinities, or any permutation),
per-layer permutation logits are optimised so that the interpolations
``(1-α)·A + α·P(B)`` have low task loss: the hard Hungarian permutation in the
forward pass, Sinkhorn's gradient in the backward pass. The best hard answer
seen (by the loss at α = 0.5 on held-out batches), the starting one included,
is returned, so refinement never makes the measured loss worse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from modelmerge.deepalign.losses import lmc_loss, soft_permute, straight_through
from modelmerge.deepalign.model import hungarian, perm_matrix
from modelmerge.errors import ModelMergeError
from modelmerge.spec import Chain, PermutationSpec
from modelmerge.zoo.data import Dataset


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


def refine_lmc(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    chain: Chain,
    data: Dataset,
    init: Mapping[str, torch.Tensor],
    *,
    record: Mapping | None = None,
    init_logits: Mapping[str, torch.Tensor] | None = None,
    steps: int = 50,
    lr: float = 0.05,
    batch: int = 256,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], RefineInfo]:
    """Improve a permutation of B's units by minimising the interpolation loss.

    Args:
        a, b: state dicts.
        spec, chain: the chain's spec (its groups are the hidden layers).
        data: task data shaped for the model (see :func:`modelmerge.zoo.train.fit_inputs`).
        init: starting permutation (group -> LongTensor).
        record: architecture record (else a plain Linear chain is run as a ReLU MLP).
        init_logits: starting affinities per group ``[n, n]`` (default: from ``init``).
        steps, lr, batch, seed: optimisation settings.

    Returns:
        ``(perm, info)``.
    """
    record, key_map = builder_layout(chain, a, record)
    gen = torch.Generator().manual_seed(seed)
    groups = [chain.group(i) for i in range(len(chain.layers) - 1)]
    # builder-named, stacked (N = 4 alphas) states; the spec renamed along
    sa = {bk: a[k].float()[None] for bk, k in key_map.items()}
    sb = {bk: b[k].float()[None] for bk, k in key_map.items()}
    bspec = PermutationSpec(spec.groups, {bk: spec.axes[k] for bk, k in key_map.items()})
    alphas = torch.tensor([0.2, 0.4, 0.6, 0.8])
    rep = lambda s: {k: v.expand(len(alphas), *v.shape[1:]) for k, v in s.items()}  # noqa: E731
    sa4, sb4 = rep(sa), rep(sb)
    # select on a held-back slice of the training split: the test split stays for evaluation
    n_fit = max(1, len(data.x_train) - batch)
    x_eval, y_eval = data.x_train[n_fit:], data.y_train[n_fit:]
    if len(x_eval) == 0:
        raise ModelMergeError("LMC refinement needs more than one training example")

    def eval_loss(perm):
        mats = {g: perm_matrix(perm[g])[None] for g in groups}
        with torch.no_grad():
            return float(lmc_loss(record, sa, soft_permute(sb, bspec, mats), x_eval[None], y_eval[None],
                                  torch.tensor([0.5])))

    logits = {}
    for g in groups:
        base = init_logits[g] if init_logits is not None else 10.0 * perm_matrix(init[g])
        logits[g] = base.detach().float().clone()[None].requires_grad_(True)
    opt = torch.optim.Adam(list(logits.values()), lr=lr)
    best = {g: init[g].clone() for g in groups}
    best_loss = start = eval_loss(best)
    for _ in range(steps):
        mats, perms = straight_through([logits[g] for g in groups])
        aligned = soft_permute(sb4, bspec, {g: m.expand(len(alphas), -1, -1) for g, m in zip(groups, mats)})
        idx = torch.randint(n_fit, (len(alphas), batch), generator=gen)
        loss = lmc_loss(record, sa4, aligned, data.x_train[idx], data.y_train[idx], alphas)
        opt.zero_grad()
        loss.backward()
        opt.step()
        cand = {g: hungarian(logits[g][0]) for g in groups}
        cand_loss = eval_loss(cand)
        if cand_loss < best_loss:
            best, best_loss = cand, cand_loss
    return dict(best), RefineInfo(steps, start, best_loss)
