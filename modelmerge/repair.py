"""REPAIR (Jordan et al., 2022): give a merge's units the statistics its endpoints' units had.

Averaging aligned networks shrinks the spread of hidden activations ("variance
collapse"), which is much of the loss barrier of deep and normalised networks.
REPAIR measures, on training data, the per-unit mean and standard deviation of
every producer's output (see :mod:`modelmerge.activations`: Linear, Conv,
BatchNorm and LayerNorm layers whose outputs are a permutation group) in each
endpoint, and rescales the merge's units to the interpolated statistics
``mu_t = sum_i w_i mu_i``, ``sigma_t = sum_i w_i sigma_i``.

The correction runs in one forward pass of the merge, in layer order: at each
producer the merge's own output statistics (given the corrections upstream)
give a per-unit scale ``s = sigma_t / sigma`` and shift ``mu_t - s * mu``,
applied to the output at once (so downstream producers see it) and folded
exactly into that layer's weight (scaled along its output axis) and bias
(``b' = s * b + shift``). A producer without a bias gets the scale only. No
parameter is added, so the repaired merge loads into the same model class.

For two endpoints at ``alpha`` the weights are ``(1 - alpha, alpha)``; at
``alpha`` 0 or 1 the merge *is* an endpoint and is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from modelmerge.activations import Producer, producers, run_with_taps, units_last
from modelmerge.errors import ModelMergeError
from modelmerge.network import Network

#: training examples the statistics are measured on (a seeded subset beyond this)
EXAMPLES = 1024


def repair_inputs(network: Network, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The examples REPAIR measures on: ``x`` or a seeded subset of :data:`EXAMPLES`."""
    if len(x) == 0:
        raise ModelMergeError("--repair: the data has no training examples to measure statistics on; pass more data")
    if len(x) > EXAMPLES:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:EXAMPLES]]
    return x


def _moments(out: torch.Tensor, p: Producer) -> tuple[torch.Tensor, torch.Tensor]:
    u = units_last(out.detach(), p.axis).to(torch.float64)
    return u.mean(0), u.std(0, unbiased=False)


def unit_statistics(network: Network, state: Mapping[str, torch.Tensor], x: torch.Tensor
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per producer (by name), its output units' mean and standard deviation on ``x`` (float64)."""
    stats = {}

    def tap(p: Producer, out: torch.Tensor) -> None:
        if p.name not in stats:  # a module called twice: its first call, as the correction uses
            stats[p.name] = _moments(out, p)

    run_with_taps(network, state, x, tap)
    return stats


class Repair:
    """REPAIR for merges of fixed endpoints: their statistics are measured once, at construction.

    Args:
        network: the resolved network (a module, a record or a bare chain).
        endpoints: the models merged, in one frame (A and aligned B; a soup's aligned models).
        x: training inputs shaped for the network (see :func:`repair_inputs`).

    Raises:
        ModelMergeError: no forward to run, or no producer to repair.
    """

    def __init__(self, network: Network, endpoints: Sequence[Mapping[str, torch.Tensor]], x: torch.Tensor) -> None:
        if not producers(network):
            raise ModelMergeError("--repair: no Linear/Conv/norm layer produces a permutation group's units, so "
                                  "there is nothing to rescale")
        self.network, self.x, self.n = network, x, len(endpoints)
        self.stats = [unit_statistics(network, end, x) for end in endpoints]

    def __call__(self, merged: Mapping[str, torch.Tensor], weights: Sequence[float]) -> dict[str, torch.Tensor]:
        """``merged`` (the endpoints mixed with ``weights``, summing to 1) with its statistics repaired.

        Returns:
            A new state dict (the merge's keys and dtypes); a copy of ``merged`` when one
            weight is 1 (the merge is that endpoint).
        """
        if len(weights) != self.n:
            raise ModelMergeError("repair: one weight per endpoint")
        if any(w == 1.0 for w in weights):  # the merge is that endpoint (mix gives the ends exactly)
            return {k: v.clone() for k, v in merged.items()}
        targets: dict[str, list[torch.Tensor]] = {}
        for w, stats in zip(weights, self.stats):
            for name, (mu, sd) in stats.items():
                t = targets.setdefault(name, [torch.zeros_like(mu), torch.zeros_like(sd)])
                t[0] += w * mu
                t[1] += w * sd
        return _rescaled(self.network, merged, targets, self.x)


def repair(network: Network, merged: Mapping[str, torch.Tensor], endpoints: Sequence[Mapping[str, torch.Tensor]],
           weights: Sequence[float], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``merged`` with every producer's unit statistics reset to the endpoints' weighted ones
    (one-off form of :class:`Repair`).

    Args:
        network: the resolved network (a module, a record or a bare chain).
        merged: the merge's state dict (e.g. an interpolation of A and aligned B).
        endpoints: the models merged, in one frame.
        weights: their shares of the merge (same order; summing to 1).
        x: training inputs shaped for the network (see :func:`repair_inputs`).

    Raises:
        ModelMergeError: no forward to run, or no producer to repair.
    """
    return Repair(network, endpoints, x)(merged, weights)


def merge_pair(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float, *,
               network: Network | None = None, reset_x: torch.Tensor | None = None,
               repairer: Repair | None = None) -> dict[str, torch.Tensor]:
    """``(1 - alpha) A + alpha B``, then BatchNorm statistics recomputed on ``reset_x`` (if given),
    then REPAIR (if given; built on ``[a, b]``). The one place the commands build a merge."""
    from modelmerge.merge import interpolate

    merged = interpolate(a, b, alpha)
    if reset_x is not None:
        merged = network.reset_bn(merged, reset_x)
    if repairer is not None:
        merged = repairer(merged, [1.0 - alpha, alpha])
    return merged


def _rescaled(network, merged, targets, x):
    out = {k: v.clone() for k, v in merged.items()}
    folds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tap(p: Producer, y: torch.Tensor) -> torch.Tensor | None:
        if p.name not in targets or p.name in folds:  # a module called twice is corrected once
            return None
        mu, sd = _moments(y, p)
        mu_t, sd_t = targets[p.name]
        scale = torch.where(sd > 1e-12, sd_t / sd.clamp_min(1e-12), torch.ones_like(sd))
        shift = mu_t - scale * mu if p.bias is not None else torch.zeros_like(mu)
        folds[p.name] = (scale, shift)
        shape = [1] * y.ndim
        shape[p.axis] = -1
        return y * scale.view(shape).to(y.dtype) + shift.view(shape).to(y.dtype)

    run_with_taps(network, merged, x, tap)
    for p in producers(network):
        if p.name not in folds:
            continue
        scale, shift = folds[p.name]
        w = out[p.weight]
        out[p.weight] = (w.double() * scale.view(-1, *([1] * (w.ndim - 1)))).to(w.dtype)
        if p.bias is not None:
            b = out[p.bias]
            out[p.bias] = (b.double() * scale + shift).to(b.dtype)
    return out
