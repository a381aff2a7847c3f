"""The learned aligner's symmetries, width-agnosticism and family checks."""

from __future__ import annotations

import pytest
import torch
from conftest import VGGish, mlp

from modelmerge.deepalign.model import AlignerConfig, DeepAlign, OutOfFamilyError
from modelmerge.permutation import apply_permutation, random_permutation
from modelmerge.spec import infer_chain
from modelmerge.weightspace import to_weight_space


def _answer(aligner, a_state, b_state):
    chain = infer_chain(a_state)
    return aligner.align(to_weight_space(chain, a_state), to_weight_space(chain, b_state))


def _aligner(equivariant=True, family="mlp", seed=0):
    torch.manual_seed(seed)
    return DeepAlign(AlignerConfig(family=family, equivariant=equivariant)).double().eval()


def _pair(widths, seed):
    return mlp(widths, seed=seed).double().state_dict(), mlp(widths, seed=seed + 100).double().state_dict()


def _check_equivariance(aligner, a, b, seed):
    chain = infer_chain(a)
    spec = chain.spec(a)
    gen = torch.Generator().manual_seed(seed)
    g, g2 = random_permutation(spec, gen), random_permutation(spec, gen)
    k = _answer(aligner, a, b)
    k2 = _answer(aligner, apply_permutation(a, spec, g), apply_permutation(b, spec, g2))
    for l in range(len(k)):
        group = chain.group(l)
        # A' unit i = A unit g[i] <-> B unit k[g[i]] = B' unit g2^-1[k[g[i]]]
        expected = torch.argsort(g2[group])[k[l][g[group]]]
        if not torch.equal(k2[l], expected):
            return False
    return True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuting_inputs_permutes_the_answer(seed):
    gen = torch.Generator().manual_seed(seed)
    widths = [int(torch.randint(8, 40, (1,), generator=gen)) for _ in range(3)]
    a, b = _pair([int(torch.randint(5, 30, (1,), generator=gen))] + widths + [7], seed)
    assert _check_equivariance(_aligner(seed=seed), a, b, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_swapping_a_and_b_transposes_the_answer(seed):
    a, b = _pair([20, 24, 16, 5], seed)
    aligner = _aligner(seed=seed)
    k_ab, k_ba = _answer(aligner, a, b), _answer(aligner, b, a)
    for p, q in zip(k_ab, k_ba):
        assert torch.equal(torch.argsort(p), q)  # transpose of a permutation matrix = its inverse


def test_negative_control_breaks_equivariance():
    a, b = _pair([20, 24, 16, 5], 0)
    assert not _check_equivariance(_aligner(equivariant=False), a, b, 0)


def test_cnn_family_equivariance():
    a = VGGish(seed=0).double().state_dict()
    b = VGGish(seed=1).double().state_dict()
    assert _check_equivariance(_aligner(family="cnn"), a, b, 3)


@pytest.mark.parametrize("widths", [[64, 32, 32, 10], [40, 96, 96, 10], [64, 256, 256, 10], [40, 32, 96, 256, 3]])
def test_one_aligner_serves_any_width_and_input_size(widths):
    aligner = _aligner()
    a, b = _pair(widths, 1)
    perms = _answer(aligner, a, b)
    assert [p.numel() for p in perms] == widths[1:-1]
    assert all(torch.equal(torch.sort(p).values, torch.arange(p.numel())) for p in perms)


def test_size_and_parameter_budget():
    aligner = DeepAlign(AlignerConfig())
    assert aligner.num_parameters() <= 2_000_000
    widths_free = all(max(p.shape, default=0) <= 4 * aligner.config.feature_dim + 64 for p in aligner.parameters())
    assert widths_free


def test_out_of_family_is_refused():
    a, b = _pair([20, 24, 5], 0)
    with pytest.raises(OutOfFamilyError, match="MLP"):
        _answer(_aligner(family="cnn"), a, b)
    c = VGGish().double().state_dict()
    with pytest.raises(OutOfFamilyError, match="CNN"):
        _answer(_aligner(), c, c)
