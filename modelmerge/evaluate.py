"""Interpolation curves, loss barrier and its area (the seed paper's definitions)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from modelmerge.merge import interpolate


@dataclass(frozen=True)
class Curve:
    """Loss and accuracy of ``(1-α)·A + α·B`` along a grid of α.

    Attributes:
        alphas: the grid, ascending from 0 to 1.
        losses, accuracies: the metric at each α.
        barrier: ``max_α [L(α) - ((1-α) L(0) + α L(1))]``.
        auc: ``∫_0^1 [L(α) - ((1-α) L(0) + α L(1))] dα`` (trapezoid rule).
    """

    alphas: list[float]
    losses: list[float]
    accuracies: list[float]
    barrier: float
    auc: float

    def to_dict(self) -> dict:
        return asdict(self)


def excess_over_line(alphas: Sequence[float], values: Sequence[float]) -> np.ndarray:
    """``L(α) - ((1-α) L(α_0) + α L(α_1))``, with the ends at the first and last α."""
    a = np.asarray(alphas, dtype=float)
    v = np.asarray(values, dtype=float)
    line = (1 - a) * v[0] + a * v[-1]
    return v - line


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """The loss barrier: the largest excess of the curve over the straight line."""
    return float(np.max(excess_over_line(alphas, losses)))


def barrier_auc(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """Area between the curve and the straight line (trapezoid rule)."""
    ex = excess_over_line(alphas, losses)
    a = np.asarray(alphas, dtype=float)
    return float(np.sum((ex[1:] + ex[:-1]) * np.diff(a)) / 2.0)


def interpolation_curve(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    metric: Callable[[Mapping[str, torch.Tensor]], tuple[float, float]],
    alphas: int | Sequence[float] = 11,
) -> Curve:
    """Evaluate ``metric`` (state -> (loss, accuracy)) along the interpolation from A to B.

    Args:
        a, b: state dicts of one architecture, B already aligned to A (or not, for the naive curve).
        metric: returns (mean loss, accuracy) of a state dict on the evaluation data.
        alphas: a number of evenly spaced points in [0, 1], or the points themselves.
    """
    grid = np.linspace(0.0, 1.0, alphas).tolist() if isinstance(alphas, int) else list(alphas)
    losses, accs = [], []
    for alpha in grid:
        loss, acc = metric(interpolate(a, b, alpha))
        losses.append(float(loss))
        accs.append(float(acc))
    return Curve(grid, losses, accs, loss_barrier(grid, losses), barrier_auc(grid, losses))
