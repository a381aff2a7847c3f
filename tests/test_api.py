"""The Python API on what library callers pass: state dicts of every origin, and bad ones.

Found by a black-box sweep of the API: raw AttributeError/RuntimeError/scipy ValueError
tracebacks for non-tensors, meta tensors, tensors requiring gradients and NaN weights;
complex tensors silently half-merged; Checkpoint objects not accepted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import mlp

from modelmerge.alignment import align
from modelmerge.checkpoint import Checkpoint
from modelmerge.errors import CheckpointError, ModelMergeError
from modelmerge.merge import interpolate

WIDTHS = [12, 16, 16, 4]


def _pair():
    return mlp(WIDTHS, seed=0).state_dict(), mlp(WIDTHS, seed=1).state_dict()


def test_checkpoints_and_tensors_that_require_gradients_are_accepted_and_left_alone():
    a_model = mlp(WIDTHS, seed=0)
    a, b = dict(a_model.named_parameters()), mlp(WIDTHS, seed=1).state_dict()
    assert all(t.requires_grad for t in a.values())
    before = {k: t.detach().clone() for k, t in a.items()}
    result = align(a, b, method="weight-matching")
    assert not any(t.requires_grad for t in result.aligned.values())
    assert all(torch.equal(a[k].detach(), before[k]) for k in a)  # never modified
    merged = interpolate(a, result.aligned, 0.5)
    assert not any(t.requires_grad for t in merged.values())
    from_checkpoints = align(Checkpoint(state=mlp(WIDTHS, seed=0).state_dict()), Checkpoint(state=b),
                             method="weight-matching")
    assert all(torch.equal(from_checkpoints.aligned[k], result.aligned[k]) for k in b)


@pytest.mark.parametrize(("bad", "error", "needle"), [
    (lambda s: {**s, "0.weight": s["0.weight"].tolist()}, ModelMergeError, "is a list, not a tensor"),
    (lambda s: [1, 2], ModelMergeError, "must be a state dict"),
    (lambda s: {**s, "0.weight": torch.empty(16, 12, device="meta")}, CheckpointError, "meta tensor"),
    (lambda s: {**s, "0.bias": torch.full((16,), float("nan"))}, CheckpointError, "NaN or infinite"),
    (lambda s: {**s, "0.bias": s["0.bias"].to(torch.complex64)}, CheckpointError, "complex tensor"),
])
def test_bad_state_dicts_are_the_packages_own_errors(bad, error, needle):
    a, b = _pair()
    for call in (lambda x: align(x, b, method="weight-matching"), lambda x: interpolate(x, b, 0.5),
                 lambda x: interpolate(b, x, 0.5)):
        with pytest.raises(error, match=needle):
            call(bad(a))


def test_bad_scalar_arguments_are_the_packages_own_errors():
    a, b = _pair()
    with pytest.raises(ModelMergeError, match="alpha must be a number"):
        interpolate(a, b, None)  # type: ignore[arg-type]
    with pytest.raises(ModelMergeError, match="max_iter must be"):
        align(a, b, method="weight-matching", max_iter=-3)
