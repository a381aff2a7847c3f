"""Weight matching (Ainsworth et al., Git Re-Basin): coordinate descent over groups.

Maximises ``sum_p <A_p, P(B)_p>`` over the permutations of a spec's groups.
Each step fixes every group but one and solves that group exactly as a linear
assignment problem on the cost ``C[i, j] = sum over the axes the group touches
of <A's slice i, B's slice j (other axes already permuted)>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from modelmerge.permutation import (
    Permutation,
    check_permutation,
    identity_permutation,
    permute_param,
)
from modelmerge.spec import PermutationSpec


@dataclass(frozen=True)
class MatchInfo:
    """What a weight-matching run did.

    Attributes:
        objective_before: ``sum_p <A_p, P0(B)_p>`` at the initial permutation.
        objective_after: the same at the answer.
        iterations: sweeps over all groups that were run.
        converged: True if the last sweep improved no group.
    """

    objective_before: float
    objective_after: float
    iterations: int
    converged: bool


_STATISTICS = ("running_mean", "running_var")


def _counts(name: str, t: torch.Tensor) -> bool:
    """Whether a tensor enters the objective: floating-point weights, not BatchNorm statistics.

    Statistics are still permuted; leaving them out of the objective was measured to
    give better merges of BatchNorm ResNets (docs/benchmarks.md), and matches Git
    Re-Basin, whose Flax models keep them apart from the parameters.
    """
    return t.is_floating_point() and not name.endswith(_STATISTICS)


def _matrix(t: torch.Tensor, axis: int, n: int) -> np.ndarray:
    # (..., n*k, ...) -> (n, k * rest): rows are the group's units, blocks kept together
    return t.movedim(axis, 0).reshape(n, -1).to(torch.float64).numpy()


def alignment_objective(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """``sum_p <A_p, P(B)_p>`` over floating-point parameters, BatchNorm statistics excluded."""
    perm = perm if perm is not None else identity_permutation(spec)
    total = 0.0
    for p, ax in spec.axes.items():
        if _counts(p, a[p]):
            pb = permute_param(b[p], ax, perm)
            total += float(torch.sum(a[p].to(torch.float64) * pb.to(torch.float64)))
    return total


def weight_matching(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    seed: int = 0,
    max_iter: int = 100,
    init: Mapping[str, torch.Tensor] | None = None,
    on_sweep: Callable[[int, float], None] | None = None,
) -> tuple[Permutation, MatchInfo]:
    """Find permutations of B's units that match A's, by coordinate descent.

    Args:
        a, b: state dicts covered by ``spec`` (same keys and shapes).
        spec: the permutation spec.
        seed: seeds the random order in which groups are visited.
        max_iter: maximum number of sweeps over all groups.
        init: starting permutation (default: identity), e.g. a learned aligner's answer.
        on_sweep: called after each sweep with (sweep index, objective so far).

    Returns:
        ``(perm, info)``: unit ``i`` of aligned B is unit ``perm[g][i]`` of B.

    Raises:
        SpecError: ``spec`` does not fit the state dicts, or ``init`` is invalid.
    """
    spec.check(a, "first checkpoint")
    spec.check(b, "second checkpoint")
    perm = {g: p.clone() for g, p in (init or identity_permutation(spec)).items()}
    check_permutation(spec, perm)
    groups = list(spec.groups)
    members = {
        g: [(p, ax) for p, ax in spec.members(g) if _counts(p, a[p])] for g in groups
    }
    a_rows = {(p, ax): _matrix(a[p], ax, spec.groups[g]) for g in groups for p, ax in members[g]}
    before = alignment_objective(a, b, spec, perm)
    rng = np.random.default_rng(seed)
    sweeps, converged = 0, not groups
    while groups and sweeps < max_iter:
        sweeps += 1
        improved = False
        for gi in rng.permutation(len(groups)):
            g = groups[gi]
            n = spec.groups[g]
            cost = np.zeros((n, n))
            for p, ax in members[g]:
                pb = permute_param(b[p], spec.axes[p], perm, except_axis=ax)
                cost += a_rows[(p, ax)] @ _matrix(pb, ax, n).T
            rows, cols = linear_sum_assignment(cost, maximize=True)
            old = float(cost[np.arange(n), perm[g].numpy()].sum())
            new = float(cost[rows, cols].sum())
            if new - old > 1e-12 * max(1.0, abs(old)):
                perm[g] = torch.as_tensor(cols, dtype=torch.long)
                improved = True
        if on_sweep is not None:
            on_sweep(sweeps, alignment_objective(a, b, spec, perm))
        if not improved:
            converged = True
            break
    after = alignment_objective(a, b, spec, perm)
    return perm, MatchInfo(before, after, sweeps, converged)
