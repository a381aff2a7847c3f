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


def _reference_weight_matching(a, b, spec, seed=0, max_iter=100):
    """The plain float64 coordinate descent (no caching, no skipping): the answers to match."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from modelmerge.matching import _counts
    from modelmerge.permutation import identity_permutation, permute_param

    def rows(t, ax, n):
        return t.movedim(ax, 0).reshape(n, -1).to(torch.float64).numpy()

    perm = identity_permutation(spec)
    groups = list(spec.groups)
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        improved = False
        for gi in rng.permutation(len(groups)):
            g, n = groups[gi], spec.groups[groups[gi]]
            cost = np.zeros((n, n))
            for p, ax in spec.members(g):
                if _counts(p, a[p]):
                    pb = permute_param(b[p], spec.axes[p], perm, except_axis=ax)
                    cost += rows(a[p], ax, n) @ rows(pb, ax, n).T
            _, cols = linear_sum_assignment(cost, maximize=True)
            old, new = cost[np.arange(n), perm[g].numpy()].sum(), cost[np.arange(n), cols].sum()
            if new - old > 1e-12 * max(1.0, abs(old)):
                perm[g], improved = torch.as_tensor(cols), True
        if not improved:
            break
    return perm


def _resnet(seed, width=8):
    from modelmerge.examples.models import ResNetish

    torch.manual_seed(seed)
    model = ResNetish(width=width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model


def test_recovers_planted_permutation_residual_cnn_in_small_blocks(monkeypatch):
    """Residual (tied) groups, block axes into the head; tiny column blocks exercise the sliced assembly."""
    from modelmerge import matching
    from modelmerge.trace import trace_spec

    monkeypatch.setattr(matching, "_BLOCK", 37)
    monkeypatch.setattr(matching, "_CHECK_BLOCK", 11)
    model = _resnet(seed=7, width=16)
    state = model.state_dict()
    spec = trace_spec(model).spec
    perm = random_permutation(spec, torch.Generator().manual_seed(8))
    b = apply_permutation(state, spec, perm)
    found, info = weight_matching(state, b, spec, seed=2)
    expected = invert_permutation(perm)
    assert all(torch.equal(found[g], expected[g]) for g in spec.groups)
    assert info.converged


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_answers_as_plain_float64_descent(seed):
    """Float32 costs checked in float64, caching and skipping: the same answer as the plain algorithm."""
    from modelmerge.trace import trace_spec

    for a, b, spec in (
        (mlp((10, 32, 32, 4), seed=seed).state_dict(), mlp((10, 32, 32, 4), seed=seed + 10).state_dict(), None),
        (_resnet(seed).state_dict(), _resnet(seed + 10).state_dict(), trace_spec(_resnet(seed)).spec),
    ):
        spec = spec or infer_spec(a)
        expected = _reference_weight_matching(a, b, spec, seed=seed)
        found, info = weight_matching(a, b, spec, seed=seed)
        no_cache, _ = weight_matching(a, b, spec, seed=seed, cache_bytes=0)
        assert all(torch.equal(found[g], expected[g]) for g in spec.groups)
        assert all(torch.equal(no_cache[g], found[g]) for g in spec.groups)
        assert info.converged


def test_progress_reports_every_visit():
    a = mlp((10, 32, 32, 32, 4), seed=0).state_dict()
    b = mlp((10, 32, 32, 32, 4), seed=1).state_dict()
    spec = infer_spec(a)
    seen = []
    _, info = weight_matching(a, b, spec, on_progress=lambda done, total: seen.append((done, total)))
    assert [d for d, _ in seen] == list(range(1, len(spec.groups) * info.iterations + 1))
    assert all(d <= t <= len(spec.groups) * 100 for d, t in seen)


def test_float64_check_and_updates_give_the_same_answers(monkeypatch):
    """Forcing the float64 check of every change, and in-place updates of every cached part, changes nothing."""
    from modelmerge import matching
    from modelmerge.trace import trace_spec

    a, b = _resnet(5, width=16).state_dict(), _resnet(6, width=16).state_dict()
    spec = trace_spec(_resnet(5, width=16)).spec
    expected = _reference_weight_matching(a, b, spec, seed=4)
    monkeypatch.setattr(matching, "_U32", 1.0)  # the round-off bound never decides: always recheck
    monkeypatch.setattr(matching, "_CHECK_BLOCK", 50)
    monkeypatch.setattr(matching, "_UPDATE_FRACTION", 1.0)
    monkeypatch.setattr(matching, "_MAX_UPDATES", 1000)
    monkeypatch.setattr(matching, "_CACHE_MIN_COLUMNS", 2)
    found, info = weight_matching(a, b, spec, seed=4)
    assert all(torch.equal(found[g], expected[g]) for g in spec.groups)
    assert info.converged


def test_permute_param_in_slices_equals_whole(monkeypatch):
    """Large tensors permuted along two axes are filled a slice at a time: same values."""
    from modelmerge import permutation

    t = torch.randn(30, 20, 3)
    perm = {"a": torch.randperm(30), "b": torch.randperm(10)}
    whole = permutation.permute_param(t, ("a", "b", None), perm)
    monkeypatch.setattr(permutation, "_SLICE", 100)
    sliced = permutation.permute_param(t, ("a", "b", None), perm)
    assert torch.equal(sliced, whole) and sliced.is_contiguous()
    assert torch.equal(whole, t[perm["a"]][:, permutation.axis_index(perm["b"], 20)])


def test_save_copies_only_shared_tensors(tmp_path):
    """Tied weights (one storage, two names) and non-contiguous tensors are saved; the rest is not copied."""
    from safetensors.torch import load_file

    from modelmerge.checkpoint import _unshared, save_checkpoint

    w = torch.randn(4, 3)
    state = {"a.weight": w, "b.weight": w, "c.weight": torch.randn(3, 4).t(), "d.bias": torch.randn(4)}
    prepared = _unshared(state)
    assert prepared["a.weight"].data_ptr() == w.data_ptr()  # not copied
    assert prepared["d.bias"].data_ptr() == state["d.bias"].data_ptr()
    assert prepared["b.weight"].data_ptr() != w.data_ptr() and prepared["c.weight"].is_contiguous()
    out = save_checkpoint(state, tmp_path / "tied.safetensors")
    back = load_file(str(out))
    assert all(torch.equal(back[k], v) for k, v in state.items())


class _HiddenSkip(torch.nn.Module):
    """A parameter-free skip around a square layer: its hidden group acts on both axes of l2.weight."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2, self.l3 = torch.nn.Linear(10, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        return self.l3(h + torch.relu(self.l2(h)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_group_on_both_axes_of_a_weight_never_lowers_the_objective(seed):
    """Its linear cost holds one axis fixed while the answer moves both: each change is checked on
    the exact objective, so the sweeps rise monotonically and stop (they used to cycle and end lower)."""
    from modelmerge.network import resolve_network

    ma, mb = _HiddenSkip(seed), _HiddenSkip(seed + 50)
    a, b = ma.state_dict(), mb.state_dict()
    net = resolve_network(a, module=ma, input_shape=(10,))
    axes = net.spec.axes["l2.weight"]
    assert axes[0] == axes[1] is not None
    seen = []
    _, info = weight_matching(a, b, net.spec, max_iter=100, on_sweep=lambda i, obj: seen.append(obj))
    assert all(y >= x - 1e-9 for x, y in zip([info.objective_before, *seen], seen))
    assert info.converged and info.objective_after == pytest.approx(seen[-1])
    short, _ = weight_matching(a, b, net.spec, max_iter=2)
    assert info.objective_after >= alignment_objective(a, b, net.spec, short) - 1e-9
