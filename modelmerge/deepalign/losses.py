"""Training losses for DEEP-ALIGN, on stacked batches of network pairs.

* **LMC** (the one that matters, measured): the task loss of
  ``(1-α)·A + α·P(B)`` at random α, with ``P`` the hard Hungarian permutation
  in the forward pass and the Sinkhorn matrix's gradient in the backward pass
  (straight-through).
* **L2**: ``Σ_p ||P_soft(B)_p - A_p||²`` (no data needed).
* **planted**: cross-entropy of the affinity rows against a planted permutation
  between a network and an augmented, permuted copy of itself (no data needed).

Stacked state dicts map a name to ``[N, *shape]`` (one entry per pair).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from modelmerge.deepalign.model import hungarian, perm_matrix, sinkhorn
from modelmerge.merge import mix
from modelmerge.spec import PermutationSpec
from modelmerge.stacked import stacked_forward

Stacked = Mapping[str, torch.Tensor]


def apply_along(t: torch.Tensor, axis: int, P: torch.Tensor) -> torch.Tensor:
    """Apply ``P [N, n, n]`` (rows: new units) to axis ``axis`` of ``t [N, ...]``, in blocks.

    An axis of length ``n*k`` moves in contiguous blocks of ``k`` (flattened conv maps).
    """
    n_batch, n = t.shape[0], P.shape[-1]
    moved = t.movedim(axis, 1)  # (N, n*k, *rest)
    shape = moved.shape
    out = torch.bmm(P, moved.reshape(n_batch, n, -1))  # (N, n, k*rest)
    return out.reshape(shape).movedim(1, axis)


def soft_permute(state: Stacked, spec: PermutationSpec, P: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Differentiable :func:`~modelmerge.permutation.apply_permutation` with matrices ``P[g] [N, n, n]``."""
    out = {}
    for name, t in state.items():
        if t.is_floating_point():
            for axis, g in enumerate(spec.axes[name]):
                if g is not None:
                    t = apply_along(t, axis + 1, P[g].to(t.dtype))
        out[name] = t
    return out


def straight_through(logits: list[torch.Tensor], iters: int = 20) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hard permutation matrices with Sinkhorn gradients, and the hard permutations.

    Args:
        logits: per hidden layer, affinity ``[N, n, n]``.

    Returns:
        ``(P_st, perms)``: ``P_st[l] = P_hard + P_soft - P_soft.detach()``; ``perms[l] [N, n]``.
    """
    mats, perms = [], []
    for s in logits:
        soft = sinkhorn(s, iters)
        hard_perm = torch.stack([hungarian(x) for x in s])
        hard = torch.stack([perm_matrix(p, s.dtype) for p in hard_perm])
        mats.append(hard + soft - soft.detach())
        perms.append(hard_perm)
    return mats, perms


def interpolate_stacked(a: Stacked, b: Stacked, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(1-α_n)·a_n + α_n·b_n`` per pair ``n``; ``alpha [N]``."""
    return {k: mix(ta, b[k], alpha.to(ta.dtype).view(-1, *([1] * (ta.ndim - 1)))) if ta.is_floating_point()
            else ta for k, ta in a.items()}


def lmc_loss(
    record: Mapping, a: Stacked, b_aligned: Stacked, x: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor
) -> torch.Tensor:
    """Mean task loss of the interpolations ``(1-α)·A + α·aligned B`` (BatchNorm on batch statistics).

    Args:
        record: architecture record (the forward).
        a, b_aligned: stacked states ``[N, ...]``.
        x, y: one batch per pair, ``[N, B, *input]`` and ``[N, B]``.
        alpha: ``[N]``.
    """
    merged = interpolate_stacked(a, b_aligned, alpha)
    # BatchNorm runs on the batch's statistics: the merge judged as after a BatchNorm reset, since
    # interpolated running statistics are wrong for any merge (variance collapse) however well aligned
    logits = stacked_forward(record, merged, x, train=bool(record.get("batchnorm")))
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def l2_loss(a: Stacked, b_aligned: Stacked) -> torch.Tensor:
    """``Σ_p ||aligned B_p - A_p||²`` averaged over pairs, relative to ``Σ_p ||A_p||²``."""
    num = sum(((b_aligned[k] - t) ** 2).flatten(1).sum(1) for k, t in a.items() if t.is_floating_point())
    den = sum((t ** 2).flatten(1).sum(1) for t in a.values() if t.is_floating_point())
    return (num / den.clamp_min(1e-12)).mean()


def planted_loss(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each affinity row against the planted match ``targets[l] [N, n]``."""
    return torch.stack([F.cross_entropy(s.flatten(0, 1), t.flatten()) for s, t in zip(logits, targets)]).mean()


def augment(state: Stacked, generator: torch.Generator, noise: float = 0.01, dropout: float = 0.05) -> dict:
    """A perturbed copy for planted pairs: Gaussian noise at ``noise`` × each tensor's std, and dropout."""
    out = {}
    for k, t in state.items():
        if t.is_floating_point() and t.ndim > 1:
            std = t.flatten(1).std(1).view(-1, *([1] * (t.ndim - 1)))
            t = t + noise * std * torch.randn(t.shape, generator=generator, dtype=t.dtype)
            keep = (torch.rand(t.shape, generator=generator) >= dropout).to(t.dtype)
            t = t * keep
        out[k] = t
    return out
