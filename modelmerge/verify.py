"""Checking that a permuted checkpoint still computes the same function."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from modelmerge.errors import VerificationError
from modelmerge.forward import Forward
from modelmerge.spec import PermutationSpec


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify_permuted`.

    Attributes:
        coverage: the spec covers every parameter with consistent sizes.
        forward: which forward compared outputs: ``"record"`` (the real model of
            the checkpoint's architecture record), ``"chain"`` (the generic forward
            built from the state dict), or None when no forward is known.
        max_abs_diff: largest |output(B) - output(permuted B)| over the random inputs.
        tolerance: the largest difference accepted (float round-off).
    """

    coverage: bool
    forward: str | None = None
    max_abs_diff: float | None = None
    tolerance: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.forward is None:
            return "spec covers every parameter (no forward known to compare outputs)"
        return f"outputs equal via {self.forward} forward (max |diff| {self.max_abs_diff:.2e})"


def verify_permuted(
    original: Mapping[str, torch.Tensor],
    permuted: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    forward: Forward | None = None,
    *,
    samples: int = 32,
    seed: int = 0,
    rtol: float = 1e-4,
) -> Verification:
    """Check ``permuted`` is ``original`` with hidden units reordered.

    Always checks the spec covers ``permuted``. With a ``forward``, random inputs
    (independent of any other model) go through both and the outputs must agree
    to float tolerance ``rtol * (1 + max|output|)``.

    Raises:
        SpecError: the spec does not cover the state dict.
        VerificationError: the outputs differ (the permutation or spec is wrong).
    """
    spec.check(permuted, "permuted checkpoint")
    if forward is None:
        return Verification(coverage=True)
    x = forward.make_input(samples, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y0 = forward.run(original, x)
        y1 = forward.run(permuted, x)
    diff = float((y0 - y1).abs().max())
    tol = rtol * (1.0 + float(y0.abs().max()))
    if not diff <= tol:
        raise VerificationError(
            f"the permuted model's outputs differ from the original's by {diff:.3g} "
            f"(tolerance {tol:.3g}); the spec does not describe this network, pass a correct --spec"
        )
    return Verification(coverage=True, forward=forward.kind, max_abs_diff=diff, tolerance=tol)
