"""Permuting hidden units along an inferred spec preserves the real network's function."""

from __future__ import annotations

import pytest
import torch
from conftest import NamedMLP, VGGish, mlp, vgg_input

from modelmerge.errors import SpecError
from modelmerge.permutation import (
    apply_permutation,
    axis_index,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from modelmerge.spec import infer_spec

MODELS = {
    "mlp": (lambda: mlp((12, 16, 16, 5)), lambda: torch.randn(7, 12)),
    "mlp-layernorm": (lambda: mlp((12, 16, 16, 5), layernorm=True), lambda: torch.randn(7, 12)),
    "named-mlp": (lambda: NamedMLP(), lambda: torch.randn(7, 10)),
    "cnn-bn-flatten": (lambda: VGGish(), lambda: vgg_input()),
    "cnn1d-bn-flatten": (lambda: VGGish(conv1d=True), lambda: vgg_input(conv1d=True)),
}


def _outputs(model, state, x):
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_permutation_preserves_function(name, seed):
    build, make_x = MODELS[name]
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = make_x()
    spec = infer_spec(state)
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    permuted = apply_permutation(state, spec, perm)
    assert any(not torch.equal(permuted[k], state[k]) for k in state)  # something moved
    torch.testing.assert_close(_outputs(model, permuted, x), _outputs(model, state, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_wrong_permutation_changes_function(name):
    """Negative control: permuting a layer's outputs without its consumer's inputs breaks the model."""
    build, make_x = MODELS[name]
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = make_x()
    spec = infer_spec(state)
    group = next(iter(spec.groups))
    perm = random_permutation(spec, torch.Generator().manual_seed(0))
    p, ax = spec.members(group)[0]  # the producing layer's weight, output axis
    broken = dict(apply_permutation(state, spec, identity_permutation(spec)))
    broken[p] = state[p].index_select(ax, perm[group])  # only half of the job
    assert not torch.allclose(_outputs(model, broken, x), _outputs(model, state, x), atol=1e-4)


def test_input_is_not_mutated():
    state = mlp().state_dict()
    before = {k: v.clone() for k, v in state.items()}
    spec = infer_spec(state)
    apply_permutation(state, spec, random_permutation(spec, torch.Generator().manual_seed(0)))
    assert all(torch.equal(before[k], state[k]) for k in state)


def test_invert_and_compose():
    state = mlp((6, 9, 7, 3)).state_dict()
    spec = infer_spec(state)
    g = torch.Generator().manual_seed(3)
    p, q = random_permutation(spec, g), random_permutation(spec, g)
    once = apply_permutation(apply_permutation(state, spec, q), spec, p)
    both = apply_permutation(state, spec, compose_permutations(p, q))
    assert all(torch.equal(once[k], both[k]) for k in state)
    back = apply_permutation(apply_permutation(state, spec, p), spec, invert_permutation(p))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_axis_index_moves_whole_blocks():
    idx = axis_index(torch.tensor([2, 0, 1]), 6)
    assert idx.tolist() == [4, 5, 0, 1, 2, 3]


def test_invalid_permutation_is_refused():
    state = mlp().state_dict()
    spec = infer_spec(state)
    bad = identity_permutation(spec)
    g = next(iter(bad))
    bad[g] = torch.zeros_like(bad[g])
    with pytest.raises(SpecError, match="not a permutation"):
        apply_permutation(state, spec, bad)
