"""Activation matching (Git Re-Basin's data-driven method): match units by how they respond to data.

Both networks run their real forward (``--model``'s, the record's, or the
generic forward of a bare chain) on the same training examples. For every
permutation group, each layer whose *output* units are that group (a Linear,
Conv, BatchNorm or LayerNorm with the group on its weight's first axis)
contributes the Pearson correlation of A's and B's units over the examples
(and positions, for conv maps and token sequences). A group produced by
several layers (a residual stream, a conv and its BatchNorm) sums their
correlations. One assignment per group maximises the summed correlation.

Activations are read *before* any activation function that follows a layer
(that function is not in the module graph); for a BatchNorm'd conv they are the
BatchNorm's outputs. Groups that no such layer produces keep B's order, and the
answer says so.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from modelmerge.activations import NO_FORWARD, run_with_taps, units_last
from modelmerge.deepalign.model import hungarian
from modelmerge.errors import ModelMergeError, preview
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


def _standardised(acts: torch.Tensor) -> torch.Tensor:
    acts = acts - acts.mean(0)
    return acts / (acts.pow(2).mean(0).sqrt() + 1e-8)


def correlations(network: Network, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                 x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per group, ``[n, n]`` summed correlation of A's unit ``i`` with B's unit ``j`` on inputs ``x``."""
    acts_a: dict[str, list[torch.Tensor]] = {}
    acts_b: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(x), _BATCH):
        for acts, state in ((acts_a, a), (acts_b, b)):
            for group, outs in unit_activations(network, state, x[start:start + _BATCH]).items():
                acts.setdefault(group, []).append(outs)
    out = {}
    for group, batches in acts_a.items():
        total = None
        for layer in range(len(batches[0])):  # per producing layer, all batches' samples together
            za = _standardised(torch.cat([bt[layer] for bt in batches]))
            zb = _standardised(torch.cat([bt[layer] for bt in acts_b[group]]))
            corr = za.T @ zb / len(za)
            total = corr if total is None else total + corr
        out[group] = total
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
    perm, missing = {}, []
    for group, n in ctx.network.spec.groups.items():
        if group not in corr:
            perm[group] = torch.arange(n)
            missing.append(group)
            continue
        perm[group] = hungarian(corr[group])
    note = f"activation matching: no layer's outputs reveal group(s) {preview(missing, 5)}; they keep B's order"
    notes = (note,) if missing else ()
    return Answer("activation-matching", perm, "activation_matching", time.perf_counter() - t, notes=notes)


def _unavailable(ctx: Context) -> str | None:
    net = ctx.network
    if ctx.data is None:
        return "activation matching needs --data (a dataset name or file)"
    if net.module is None and not (net.forward_kind == "chain" and net.chain is not None):
        return f"activation matching {NO_FORWARD}"
    return None


register(Method("activation-matching", "align", True, _run, _unavailable))
