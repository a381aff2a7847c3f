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
    (lambda s: {**s, "0.bias": s["0.bias"].to(torch.complex64)}, CheckpointError, "complex tensor"),
    (lambda s: {0: s["0.weight"]}, ModelMergeError, "not a parameter name"),
])
def test_bad_state_dicts_are_the_packages_own_errors(bad, error, needle):
    a, b = _pair()
    for call in (lambda x: align(x, b, method="weight-matching"), lambda x: interpolate(x, b, 0.5),
                 lambda x: interpolate(b, x, 0.5)):
        with pytest.raises(error, match=needle):
            call(bad(a))


def test_nan_weights_stop_an_alignment_but_not_a_merge():
    """A merge computes through a NaN (no pass over the values: loaded checkpoints were checked,
    and interpolate runs 11 times per curve); an alignment would match on garbage, so it refuses."""
    a, b = _pair()
    bad = {**a, "0.bias": torch.full((16,), float("nan"))}
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        align(bad, b, method="weight-matching")
    assert torch.isnan(interpolate(bad, b, 0.5)["0.bias"]).all()


def test_bad_scalar_arguments_are_the_packages_own_errors():
    a, b = _pair()
    with pytest.raises(ModelMergeError, match="alpha must be a number"):
        interpolate(a, b, None)  # type: ignore[arg-type]
    with pytest.raises(ModelMergeError, match="max_iter must be"):
        align(a, b, method="weight-matching", max_iter=-3)


def test_a_checkpoint_brings_its_architecture_record():
    """align(ck_a, ck_b) read a recorded checkpoint as a bare chain (assumed forward) where the
    command line used its record (found by a review)."""
    from modelmerge.checkpoint import load_checkpoint
    from modelmerge.examples import example_paths

    a, b = (load_checkpoint(p) for p in example_paths())
    assert a.arch is not None
    result = align(a, b, method="weight-matching")
    assert result.network.forward_kind == "record" and not result.verification.assumed


def test_merge_many_and_weight_matching_check_their_inputs():
    from modelmerge.matching import weight_matching
    from modelmerge.network import resolve_network
    from modelmerge.soup import merge_many

    a, b = _pair()
    net = resolve_network(a)
    with pytest.raises(ModelMergeError, match="max_iter"):
        merge_many([a, b], net, max_iter=0)
    with pytest.raises(CheckpointError, match="NaN"):
        merge_many([a, {**b, "0.bias": torch.full((16,), float("nan"))}], net)
    soup = merge_many([Checkpoint(state=a), {k: t.requires_grad_() if t.is_floating_point() else t
                                             for k, t in mlp(WIDTHS, seed=1).state_dict(keep_vars=True).items()}], net)
    assert not any(t.requires_grad for t in soup.soup.values())
    with pytest.raises(ModelMergeError, match="max_iter"):
        weight_matching(a, b, net.spec, max_iter=None)  # type: ignore[arg-type]
    with pytest.raises(ModelMergeError, match="not finite"):
        weight_matching(a, {**b, "0.weight": torch.full((16, 12), float("nan"))}, net.spec)
