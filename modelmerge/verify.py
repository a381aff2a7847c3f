"""Checking that a permuted checkpoint still computes the same function."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from modelmerge.errors import VerificationError
from modelmerge.network import Network, output_tensors


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify_permuted`.

    Attributes:
        coverage: the spec covers every parameter with consistent sizes.
        forward: which forward compared outputs (:attr:`Network.forward_kind`):
            ``"model"`` (``--model``'s), ``"record"`` (the architecture record's
            model), ``"chain"`` (the generic forward of the inferred chain), or
            None when no forward is known.
        max_abs_diff: |output(B) - output(permuted B)| at its largest over the random inputs, for the
            output tensor nearest its tolerance.
        tolerance: the largest difference accepted for that tensor (float round-off, on its scale).
        assumed: the forward was assumed (a bare checkpoint read as a plain chain), so
            equal outputs check the spec against that reading, not the real model.
    """

    coverage: bool
    forward: str | None = None
    max_abs_diff: float | None = None
    tolerance: float | None = None
    assumed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.forward is None:
            return "NOT verified: the spec covers every parameter, but no forward is known to compare outputs"
        if self.assumed:
            return (f"outputs equal under an ASSUMED plain-chain forward (max |diff| {self.max_abs_diff:.2e}); "
                    "not a check of the real model: a state dict shows neither skip connections nor how it "
                    "flattens conv maps")
        return f"verified: outputs equal via the {self.forward} forward (max |diff| {self.max_abs_diff:.2e})"


#: the smallest tolerance: float32 round-off of outputs that are all (near) zero
_FLOOR = 1e-12
#: how many times its own float32 round-off an output may differ by (two summation orders differ by ~2x)
_NOISE_MARGIN = 100.0
#: the largest float64 copy of the weights the round-off reference makes (a 7B-parameter model's would be 56 GB)
_PRECISE_BYTES = 1 << 30


def _round_off(network: Network, state: Mapping[str, torch.Tensor], x: torch.Tensor,
               y32: list[torch.Tensor]) -> list[float]:
    """Per output tensor, the largest difference between the float32 outputs ``y32`` and the same forward
    in float64: the round-off a correct permutation may add. Zeros when the forward cannot run in float64,
    or when a float64 copy of the weights (the reference needs one) would take more than 1 GiB."""
    if sum(t.numel() for t in state.values() if t.is_floating_point()) * 8 > _PRECISE_BYTES:
        return [0.0] * len(y32)
    try:
        y64 = output_tensors(network.forward(state, x, precise=True))
    except Exception:  # noqa: BLE001 - a model making float32 tensors of its own: no estimate, rtol alone
        return [0.0] * len(y32)
    out = []
    for a, b in zip(y32, y64 if len(y64) == len(y32) else [None] * len(y32)):
        if b is None or a.shape != b.shape or not a.is_floating_point():
            out.append(0.0)
            continue
        gap = (a.double() - b.double()).abs()
        gap = gap[gap.isfinite()]
        out.append(float(gap.max()) if gap.numel() else 0.0)
    return out


def verify_permuted(
    original: Mapping[str, torch.Tensor],
    permuted: Mapping[str, torch.Tensor],
    network: Network,
    *,
    samples: int = 32,
    seed: int = 0,
    rtol: float = 1e-4,
) -> Verification:
    """Check ``permuted`` is ``original`` with hidden units reordered.

    Always checks the network's spec covers ``permuted``. With a forward, random
    inputs (independent of any other model) go through both and every tensor of
    the outputs (tuples, lists and dicts are walked) must agree to float
    tolerance ``rtol * max|that output|``, each tensor on its own scale, or 100 times that
    output's float32 round-off (measured against the same forward in float64, for models up
    to 128M floating-point values) where that is larger, plus 1e-12.

    Raises:
        SpecError: the spec does not cover the state dict.
        VerificationError: the outputs differ (the permutation or spec is wrong).
    """
    network.check(permuted, "permuted checkpoint")
    if network.forward_kind is None:
        return Verification(coverage=True)
    x = network.random_inputs(samples, torch.Generator().manual_seed(seed))
    y0, y1 = output_tensors(network.forward(original, x)), output_tensors(network.forward(permuted, x))
    if not y0 or [t.shape for t in y0] != [t.shape for t in y1]:
        raise VerificationError("the model's forward returns no tensor to compare (or differently shaped ones); "
                                "pass a --model whose forward returns tensors")
    noise = _round_off(network, original, x, y0)
    # each output tensor against its own scale: one large output (a sum, a loss) must not lend its
    # tolerance to a small one (logits) beside it
    worst = (0.0, 0.0, rtol, -1)  # (diff / tol, diff, tol, output index)
    for i, (a, b) in enumerate(zip(y0, y1)):
        if not a.is_floating_point():  # integer outputs (e.g. predicted labels) must match exactly
            diff, tol = (0.0 if torch.equal(a, b) else float("inf")), 0.0
        elif a.numel():
            a, b = a.double(), b.double()
            same = (a == b) | (a.isnan() & b.isnan())  # equal infinities (masked scores) and NaNs agree
            gap = (a - b).abs()[~same]
            # an infinity or NaN on one side only is a difference no tolerance covers
            diff = float(gap.max()) if gap.numel() else 0.0
            diff = float("inf") if math.isnan(diff) else diff
            finite = a[a.isfinite()]
            # relative to the output's own size: an absolute floor (the old ``1 +``) let a wrong answer
            # pass on outputs much smaller than 1 (a regressor's); the tiny floor admits all-zero outputs.
            # An output that is a small difference of large terms rounds off more than its size says:
            # float32's measured round-off of this forward (against float64), with a wide margin, covers it
            tol = max(rtol * (float(finite.abs().max()) if finite.numel() else 0.0), _NOISE_MARGIN * noise[i]) + _FLOOR
        else:
            continue
        ratio = diff / tol if tol else (0.0 if diff == 0 else float("inf"))
        if ratio > worst[0] or worst[3] < 0:
            worst = (ratio, diff, tol, i)
    _, diff, tol, which = worst
    if not diff <= tol:
        assumed = " under the assumed plain-chain forward (pass --model for the real one)" \
            if network.forward_kind == "chain" else ""
        where = f"output {which + 1} of {len(y0)} differs" if len(y0) > 1 else "outputs differ"
        if any(t.is_floating_point() and not bool(t.isfinite().all()) for t in y0):
            # NaN and infinities from overflow: what differs is the overflow, not the spec's reading
            raise VerificationError(
                f"the permuted model's {where} from the original's by {diff:.3g}, and the original's outputs are "
                "not finite on the verification inputs: its weights or activations overflow float32, so no "
                "answer can be verified; rescale the checkpoints (or use ones from before training diverged)")
        raise VerificationError(
            f"the permuted model's {where} from the original's by {diff:.3g} (tolerance {tol:.3g})"
            f"{assumed}; the spec does not describe this network, pass a correct --spec"
        )
    return Verification(coverage=True, forward=network.forward_kind, max_abs_diff=diff, tolerance=tol,
                        assumed=network.forward_kind == "chain")
