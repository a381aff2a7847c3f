"""Weight matching recovers planted permutations and only ever improves its objective."""

from __future__ import annotations

import pytest
import torch
from conftest import VGGish, mlp

from modelmerge.matching import alignment_objective, weight_matching
from modelmerge.permutation import apply_permutation, invert_permutation, random_permutation
from modelmerge.spec import infer_spec


def _planted(state, seed):
    spec = infer_spec(state)
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    return spec, perm, apply_permutation(state, spec, perm)


@pytest.mark.parametrize("width", [16, 48, 128, 256])
def test_recovers_planted_permutation_mlp(width):
    state = mlp((20, width, width, width, 10), seed=width).state_dict()
    spec, perm, b = _planted(state, seed=width)
    found, info = weight_matching(state, b, spec, seed=0)
    # aligned B = B permuted by `found` must be A again: found inverts the planted perm
    expected = invert_permutation(perm)
    for g in spec.groups:
        assert torch.equal(found[g], expected[g]), f"group {g}: not every unit recovered"
    assert info.converged and info.objective_after > info.objective_before


@pytest.mark.parametrize("conv1d", [False, True])
def test_recovers_planted_permutation_cnn(conv1d):
    state = VGGish(seed=4, conv1d=conv1d).state_dict()
    spec, perm, b = _planted(state, seed=5)
    found, _ = weight_matching(state, b, spec, seed=1)
    aligned = apply_permutation(b, spec, found)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


def test_objective_never_drops_and_init_is_used():
    a = mlp((10, 32, 32, 4), seed=0).state_dict()
    b = mlp((10, 32, 32, 4), seed=1).state_dict()
    spec = infer_spec(a)
    seen = []
    perm, info = weight_matching(a, b, spec, seed=0, on_sweep=lambda i, obj: seen.append(obj))
    assert all(y >= x - 1e-9 for x, y in zip([info.objective_before] + seen, seen))
    assert info.objective_after == pytest.approx(alignment_objective(a, b, spec, perm))
    # starting from the answer, nothing is left to improve
    again, info2 = weight_matching(a, b, spec, seed=3, init=perm)
    assert info2.iterations == 1 and info2.objective_before == pytest.approx(info.objective_after)
    assert all(torch.equal(again[g], perm[g]) for g in perm)


def test_max_iter_is_respected():
    a = mlp((10, 64, 64, 64, 4), seed=0).state_dict()
    b = mlp((10, 64, 64, 64, 4), seed=1).state_dict()
    _, info = weight_matching(a, b, infer_spec(a), max_iter=1)
    assert info.iterations == 1
