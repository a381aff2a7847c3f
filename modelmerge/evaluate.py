"""Interpolation curves, loss barrier and its area (the seed paper's definitions)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
    with np.errstate(invalid="ignore", over="ignore"):  # an infinite loss gives NaN here, which callers report
        line = (1 - a) * v[0] + a * v[-1]
        return v - line


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """The loss barrier: the largest excess of the curve over the straight line."""
    return float(np.max(excess_over_line(alphas, losses)))


def barrier_auc(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """Area between the curve and the straight line (trapezoid rule)."""
    ex = excess_over_line(alphas, losses)
    a = np.asarray(alphas, dtype=float)
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.sum((ex[1:] + ex[:-1]) * np.diff(a)) / 2.0)


def interpolation_curve(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    metric: Callable[[Mapping[str, torch.Tensor]], tuple[float, float]],
    alphas: int | Sequence[float] = 11,
    merge: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], float], Mapping[str, torch.Tensor]]
    = interpolate,
    on_point: Callable[[int, int], None] | None = None,
) -> Curve:
    """Evaluate ``metric`` (state -> (loss, accuracy)) along the interpolation from A to B.

    Args:
        a, b: state dicts of one architecture, B already aligned to A (or not, for the naive curve).
        metric: returns (mean loss, accuracy) of a state dict on the evaluation data.
        alphas: a number of evenly spaced points in [0, 1], or the points themselves.
        merge: builds the model at α from (a, b, α) (default: plain interpolation; e.g. with REPAIR).
        on_point: called with (points done, points) after each α.
    """
    grid = np.linspace(0.0, 1.0, alphas).tolist() if isinstance(alphas, int) else list(alphas)
    losses, accs = [], []
    for i, alpha in enumerate(grid):
        loss, acc = metric(merge(a, b, alpha))
        losses.append(float(loss))
        accs.append(float(acc))
        if on_point is not None:
            on_point(i + 1, len(grid))
    return Curve(grid, losses, accs, loss_barrier(grid, losses), barrier_auc(grid, losses))


@torch.no_grad()
def evaluate_model(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (inputs -> logits ``[B, classes]``) on ``(x, y)``.

    An ``nn.Module`` is put in eval mode first.
    """
    if isinstance(model, torch.nn.Module):
        model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return loss / len(x), correct / len(x)
