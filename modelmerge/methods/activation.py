"""Activation matching (Git Re-Basin's data-driven method): match units by how they respond to data.

Both networks run their real forward (``--model``'s, the record's, or the
generic forward of a bare chain) on the same training examples. For every
permutation group, each layer whose *output* units are that group (a Linear,
Conv, BatchNorm or LayerNorm with the group on its weight's first axis)
contributes the Pearson correlation of A's and B's units over the examples
(and positions, for conv maps and token sequences). A group produced by
several layers (a residual stream, a conv and its BatchNorm) sums their
correlations. One assignment per group maximises the summed correlation
(:func:`~modelmerge.matching.solve_structured`: the groups of a head set are
solved together, so heads move as wholes and the answer stays valid).

Activations are read *before* any activation function that follows a layer
(that function is not in the module graph); for a BatchNorm'd conv they are the
BatchNorm's outputs. Groups that no such layer produces keep B's order, and the
answer says so (a group of a head set still moves with its heads).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from modelmerge.activations import NO_FORWARD, run_with_taps, units_last
from modelmerge.errors import ModelMergeError, preview
from modelmerge.matching import solve_structured
from modelmerge.methods.base import Answer, Context, Method, register
from modelmerge.network import Network

#: training examples whose activations are correlated (a seeded subset beyond this)
EXAMPLES = 1024
_BATCH = 256


def unit_activations(network: Network, state: Mapping[str, torch.Tensor], x: torch.Tensor
                     ) -> dict[str, list[torch.Tensor]]:
    """Per group, the outputs of each layer producing it: ``[samples, units]`` each (float64).

    Raises:
        ModelMergeError: the network has no forward to run.
    """
    found: dict[str, list[torch.Tensor]] = {}

    def tap(p, out):
        found.setdefault(p.group, []).append(units_last(out.detach(), p.axis).to(torch.float64))

    run_with_taps(network, state, x, tap)
    return found


def correlations(network: Network, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per group, ``[n, n]`` summed correlation of A's unit ``i`` with B's unit ``j`` on inputs ``x``.

    Streamed over batches of inputs: per producing layer only running sums (of
    each side, their squares and the A-B products) are kept, so memory does not
    grow with the number of examples or positions.
    """
    sums: dict[tuple[str, int], list] = {}  # (group, layer) -> [count, sum A, sum B, sum A^2, sum B^2, A^T B]
    for start in range(0, len(x), _BATCH):
        batch = x[start:start + _BATCH]
        acts_a, acts_b = unit_activations(network, a, batch), unit_activations(network, b, batch)
        for group, outs in acts_a.items():
            for layer, (ua, ub) in enumerate(zip(outs, acts_b[group])):
                acc = sums.setdefault((group, layer), [0, 0.0, 0.0, 0.0, 0.0, 0.0])
                acc[0] += len(ua)
                acc[1] += ua.sum(0)
                acc[2] += ub.sum(0)
                acc[3] += ua.pow(2).sum(0)
                acc[4] += ub.pow(2).sum(0)
                acc[5] += ua.T @ ub
    out: dict[str, torch.Tensor] = {}
    for (group, _), (n, sa, sb, qa, qb, cross) in sums.items():
        mu_a, mu_b = sa / n, sb / n
        sd_a = (qa / n - mu_a**2).clamp_min(0).sqrt() + 1e-8
        sd_b = (qb / n - mu_b**2).clamp_min(0).sqrt() + 1e-8
        corr = (cross / n - mu_a[:, None] * mu_b[None, :]) / (sd_a[:, None] * sd_b[None, :])
        out[group] = corr if group not in out else out[group] + corr
    return out


def _inputs(ctx: Context) -> torch.Tensor:
    x = ctx.task().x_train
    if len(x) == 0:
        raise ModelMergeError("the dataset has no training examples to match activations on")
    if len(x) > EXAMPLES:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(ctx.seed))[:EXAMPLES]]
    return x


def _run(ctx: Context, start: Answer | None) -> Answer:
    why = _unavailable(ctx)
    if why is not None:
        raise ModelMergeError(f"{why}; or use --method weight-matching")
    t = time.perf_counter()
    corr = correlations(ctx.network, ctx.a, ctx.b, _inputs(ctx))
    spec = ctx.network.spec
    solved = solve_structured(spec, {g: c for g, c in corr.items() if g in spec.groups})
    perm = {g: solved[g] if g in solved else torch.arange(n) for g, n in spec.groups.items()}
    missing = [g for g in spec.groups if g not in corr]
    notes = ()
    if missing:
        headed = [g for g in missing if spec.head_of(g) is not None]
        note = f"activation matching: no layer's outputs reveal group(s) {preview(missing, 5)}; they keep B's order"
        if headed:
            note += f" (within their heads: {preview(headed, 5)} move with their head sets)"
        notes = (note,)
    return Answer("activation-matching", perm, "activation_matching", time.perf_counter() - t, notes=notes)


def _unavailable(ctx: Context) -> str | None:
    net = ctx.network
    if ctx.data is None:
        return "activation matching needs --data (a dataset name or file)"
    if net.module is None and not (net.forward_kind == "chain" and net.chain is not None):
        return f"activation matching {NO_FORWARD}"
    return None


register(Method("activation-matching", "align", True, _run, _unavailable))
