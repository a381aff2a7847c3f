"""The learned aligner's symmetries, width-agnosticism and family checks."""

from __future__ import annotations

import pytest
import torch
from conftest import VGGish, aligner_answer, check_equivariance, mlp

from modelmerge.deepalign.model import AlignerConfig, DeepAlign, OutOfFamilyError


class PositionBiased(DeepAlign):
    """The negative control: unit indices leak into the affinity (prefers matching unit i with unit i)."""

    def forward(self, a, b):
        scores = super().forward(a, b)
        pos = [torch.linspace(0, 1, s.shape[-1], dtype=s.dtype) for s in scores]
        return [s - 10.0 * (p[:, None] - p[None, :]).abs() for s, p in zip(scores, pos)]


V2 = {"channels": 16, "readout_hidden": 64, "output_dims": 8}  # the v2 shape, small


def _aligner(equivariant=True, family="mlp", seed=0, weighted_costs=False, v2=False, edge_cost=0):
    torch.manual_seed(seed)
    cfg = AlignerConfig(family=family, weighted_costs=weighted_costs, edge_cost=edge_cost, **(V2 if v2 else {}))
    model = (DeepAlign if equivariant else PositionBiased)(cfg).double().eval()
    if v2:  # trained aligners have non-zero probe modulation: exercise it
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def _pair(widths, seed):
    return mlp(widths, seed=seed).double().state_dict(), mlp(widths, seed=seed + 100).double().state_dict()


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_permuting_inputs_permutes_the_answer(seed, v2):
    gen = torch.Generator().manual_seed(seed)
    widths = [int(torch.randint(8, 40, (1,), generator=gen)) for _ in range(3)]
    a, b = _pair([int(torch.randint(5, 30, (1,), generator=gen))] + widths + [7], seed)
    assert check_equivariance(_aligner(seed=seed, v2=v2), a, b, seed)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_swapping_a_and_b_transposes_the_answer(seed, v2):
    a, b = _pair([20, 24, 16, 5], seed)
    aligner = _aligner(seed=seed, v2=v2)
    k_ab, k_ba = aligner_answer(aligner, a, b), aligner_answer(aligner, b, a)
    for p, q in zip(k_ab, k_ba):
        assert torch.equal(torch.argsort(p), q)  # transpose of a permutation matrix = its inverse


def test_weighted_costs_variant_keeps_both_symmetries():
    a, b = _pair([20, 24, 16, 5], 3)
    aligner = _aligner(weighted_costs=True, seed=3)
    assert check_equivariance(aligner, a, b, 3)
    assert all(torch.equal(torch.argsort(p), q)
               for p, q in zip(aligner_answer(aligner, a, b), aligner_answer(aligner, b, a)))


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_edge_cost_variant_keeps_both_symmetries(family):
    """The learned edge-matching term (switched on by the perturbation) keeps both symmetries."""
    if family == "mlp":
        a, b = _pair([20, 24, 16, 18, 5], 4)
    else:
        a, b = VGGish(seed=0).double().state_dict(), VGGish(seed=1).double().state_dict()
    aligner = _aligner(family=family, seed=4, v2=True, edge_cost=4)
    assert aligner.unroll_edge.abs().min() > 0  # the term is on
    assert check_equivariance(aligner, a, b, 4)
    assert all(torch.equal(torch.argsort(p), q)
               for p, q in zip(aligner_answer(aligner, a, b), aligner_answer(aligner, b, a)))
    assert not check_equivariance(_aligner(equivariant=False, family=family, seed=4, v2=True, edge_cost=4), a, b, 4)


def test_edge_cost_term_changes_the_answer():
    """Switched on, the term moves the logits: it is read, not dead code."""
    a, b = _pair([20, 24, 16, 18, 5], 5)
    aligner = _aligner(seed=5, v2=True, edge_cost=4)
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import to_weight_space

    wa, wb = (to_weight_space(infer_chain(s), s) for s in (a, b))
    with torch.no_grad():
        on = aligner(wa, wb)
        aligner.unroll_edge.zero_()
        off = aligner(wa, wb)
    assert all(not torch.allclose(x, y) for x, y in zip(on, off))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_negative_control_breaks_equivariance(v2):
    a, b = _pair([20, 24, 16, 5], 0)
    assert not check_equivariance(_aligner(equivariant=False, v2=v2), a, b, 0)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_cnn_family_equivariance(v2):
    a = VGGish(seed=0).double().state_dict()
    b = VGGish(seed=1).double().state_dict()
    assert check_equivariance(_aligner(family="cnn", v2=v2), a, b, 3)


def test_output_side_columns_are_the_downstream_product():
    """Column i of layer m's output-side matrix is W_L...W_{m+1}[:, i] up to one positive scale."""
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import to_weight_space

    a, _ = _pair([6, 5, 4, 3, 2], 0)
    ws = to_weight_space(infer_chain(a), a)
    cols = DeepAlign.output_side(ws)
    w = [a[f"{i}.weight"] for i in (0, 2, 4, 6)]
    expected = [(w[3] @ w[2] @ w[1]).T, (w[3] @ w[2]).T, w[3].T]
    assert [c.shape[1:] for c in cols] == [e.shape for e in expected]
    for c, e in zip(cols, expected):
        ratio = c[0] / e
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio)) and ratio.flatten()[0] > 0


@pytest.mark.parametrize("widths", [[64, 32, 32, 10], [40, 96, 96, 10], [64, 256, 256, 10], [40, 32, 96, 256, 3]])
def test_one_aligner_serves_any_width_and_input_size(widths):
    aligner = _aligner()
    a, b = _pair(widths, 1)
    perms = aligner_answer(aligner, a, b)
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
        aligner_answer(_aligner(family="cnn"), a, b)
    c = VGGish().double().state_dict()
    with pytest.raises(OutOfFamilyError, match="CNN"):
        aligner_answer(_aligner(), c, c)


def _bundled():
    from modelmerge.deepalign.pretrained import list_aligners

    return [w.name for w in list_aligners()]


@pytest.mark.parametrize("name", _bundled())
def test_every_bundled_aligner_keeps_both_symmetries(name):
    """The shipped weights, not just fresh ones: permuting inputs permutes the answer; swapping transposes it."""
    from modelmerge.deepalign.pretrained import load_aligner

    model, _ = load_aligner(name)
    model = model.double()
    if model.config.family == "mlp":
        a, b = _pair([40, 32, 24, 16, 10], 7)
    else:
        a, b = VGGish(seed=5).double().state_dict(), VGGish(seed=6).double().state_dict()
    assert check_equivariance(model, a, b, 7)
    assert all(torch.equal(torch.argsort(p), q) for p, q in zip(aligner_answer(model, a, b), aligner_answer(model, b, a)))


def test_fast_paths_compute_the_reference_values():
    """The forward's faster forms (LayerNorm as matrix products, one-tap embedding, Sinkhorn over
    layers in one batch) give what the plain forms give."""
    import torch.nn.functional as F

    from modelmerge.deepalign.model import _Mix, _sinkhorn_layers, _sym_sinkhorn

    g = torch.Generator().manual_seed(0)
    mix = _Mix(16).double()
    with torch.no_grad():
        mix.norm.weight.normal_(generator=g)
        mix.norm.bias.normal_(generator=g)
    for shape in ((2, 5, 7, 16), (2, 48, 48, 16)):  # below and above the size where the matrix form is used
        old, upd = torch.randn(shape, generator=g).double(), 3 + torch.randn(shape, generator=g).double()
        assert torch.allclose(mix(old, upd), old + F.relu(mix.norm(upd)), atol=1e-12)

    # inference on large edge tensors folds the LayerNorm's centring into lin_e and runs in place
    from modelmerge.deepalign.model import EquivariantLayer

    layer = EquivariantLayer(16).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(generator=g)
    for shape in ((2, 5, 7, 16), (2, 48, 48, 16)):
        e = torch.randn(shape, generator=g).double()
        row, col = torch.randn(2, shape[1], 16, generator=g).double(), torch.randn(2, shape[2], 16, generator=g).double()
        ref = e + F.relu(layer.mix_e.norm(layer.lin["e"](e) + row[:, :, None] + col[:, None]))
        with torch.no_grad():
            assert torch.allclose(layer._edge_update(e.clone(), row, col), ref, atol=1e-10)
        assert torch.allclose(layer._edge_update(e, row, col), ref, atol=1e-10)  # the autograd form

    logits = [torch.randn(2, n, n, generator=g).double() for n in (6, 4, 6, 6)]
    for got, s in zip(_sinkhorn_layers(logits), logits):  # by width (autograd on)
        assert torch.allclose(got, _sym_sinkhorn(s), atol=1e-12)
    # at inference, padded to the widest: large logits too (rows whose best entry dwarfs the rest)
    logits = [torch.randn(2, n, n, generator=g).double() * scale for n, scale in ((6, 1), (4, 30), (9, 3), (6, 1))]
    with torch.no_grad():
        for got, s in zip(_sinkhorn_layers(logits), logits):
            assert got.shape == s.shape and torch.isfinite(got).all()
            assert torch.allclose(got, _sym_sinkhorn(s), atol=1e-12)
        # float32, and a layer wider than the padding threshold among small ones (batches by width)
        for widths in ((16, 32, 64), (16, 130, 16)):
            logits = [torch.randn(3, n, n, generator=g) * 10 for n in widths]
            for got, s in zip(_sinkhorn_layers(logits), logits):
                assert torch.isfinite(got).all() and torch.allclose(got, _sym_sinkhorn(s), atol=1e-5)

    from modelmerge.deepalign.model import _adaptive_mean

    for spatial, size in (((8, 8), (2, 2)), ((8, 8), (3, 5)), ((7, 9), (2, 4)), ((3, 2), (5, 4)), ((12,), (5,)),
                          ((6,), (6,)), ((4,), (7,))):  # overlapping windows when the output is larger
        x = torch.randn(3, 4, *spatial, generator=g).double()
        pool = F.adaptive_avg_pool2d if len(size) == 2 else F.adaptive_avg_pool1d
        assert torch.allclose(_adaptive_mean(x, size), pool(x, size), atol=1e-12)

    model = _aligner(v2=True)
    a, _ = _pair([5, 7, 6, 3], seed=3)
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import stacked_weight_space

    ws = stacked_weight_space(infer_chain(a), {k: v[None] for k, v in a.items()})
    E, _ = model._embed(ws)
    w = ws.weights[1] / ws.weights[1].pow(2).mean().sqrt()  # the middle layer, RMS-normalised
    stats = torch.stack([w.mean(-1), w.pow(2).mean(-1).sqrt(), w.amax(-1), w.amin(-1)], -1)
    ref = model.tap_stats(stats) + model.edge_role.weight[1] + model.edge_kind.weight[0]
    assert torch.allclose(E[1], ref, atol=1e-12)


def test_probe_responses_of_a_dead_unit_have_finite_gradients():
    """A pruned unit (zero weights and bias) has constant responses; standardising them must not
    put NaN into the gradients (a square root at zero would)."""
    model = _aligner(v2=True)
    a, b = _pair([12, 10, 8, 3], seed=4)
    a["0.weight"][3] = 0.0
    a["0.bias"][3] = 0.0
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import to_weight_space

    chain = infer_chain(a)
    sum(s.sum() for s in model(to_weight_space(chain, a), to_weight_space(chain, b))).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_auto_falls_back_to_weight_matching_when_the_aligner_would_not_fit_in_memory(monkeypatch):
    """The learned aligner's edge features grow with every weight matrix (~1.6 GiB for 2048-wide layers):
    an MLP wide enough ran the machine out of memory with no word. auto now says so and uses weight
    matching; --method deep-align refuses in one line."""
    import modelmerge as mm
    from modelmerge.methods import learned
    from modelmerge.network import resolve_network

    a, b = mlp((12, 16, 16, 5), seed=0).state_dict(), mlp((12, 16, 16, 5), seed=1).state_dict()
    ws = resolve_network(a, assume_chain=True).weight_space(a)
    model = DeepAlign(AlignerConfig())
    wider = resolve_network(mlp((12, 64, 64, 5)).state_dict(), assume_chain=True).weight_space(
        mlp((12, 64, 64, 5)).state_dict())
    assert model.memory_needed(wider) > model.memory_needed(ws) > 0
    assert mm.align(a, b).method == "deep-align"  # enough memory: the learned answer
    monkeypatch.setattr(learned, "available_memory", lambda: 1 << 20)
    res = mm.align(a, b)
    assert res.method == "weight-matching" and any("would need" in n for n in res.notes), res.notes
    with pytest.raises(OutOfFamilyError, match="would need .* GiB"):
        mm.align(a, b, method="deep-align")


def test_random_probes_draw_afresh_in_training_only():
    """train-aligner --random-probes: a new probe draw per training forward (so the aligner cannot fit
    one draw, which an unseen input size changes), the fixed draw for every answer."""
    from modelmerge.network import resolve_network

    a, b = mlp((12, 16, 16, 5), seed=0).state_dict(), mlp((12, 16, 16, 5), seed=1).state_dict()
    net = resolve_network(a, assume_chain=True)
    wa, wb = net.weight_space(a), net.weight_space(b)
    model = DeepAlign(AlignerConfig(readout_hidden=32, output_dims=4))
    model.random_probes = True
    model.train()
    with torch.no_grad():
        first, second = model(wa, wb)[0], model(wa, wb)[0]
    assert not torch.equal(first, second)
    model.eval()
    fixed = [model(wa, wb)[0] for _ in range(2)]
    assert torch.equal(*fixed)
    model.random_probes = False
    model.train()
    with torch.no_grad():
        assert torch.equal(model(wa, wb)[0], fixed[0])  # without the option, training sees the fixed draw too


def test_an_input_size_no_training_zoo_had_is_said():
    """At input sizes its zoos never had (digits cropped to 36 pixels, pooled to 16), the bundled MLP aligner
    measured on par with weight matching, not better: the answer says so; at a trained size it does not."""
    import modelmerge as mm

    for n_in, said in ((36, True), (64, False)):
        a, b = mlp((n_in, 16, 16, 10), seed=0).state_dict(), mlp((n_in, 16, 16, 10), seed=1).state_dict()
        res = mm.align(a, b)
        assert res.method == "deep-align"
        assert any("32/40/64 inputs, not 36" in n for n in res.notes) == said, res.notes


def test_a_cgroup_memory_limit_bounds_the_available_memory(tmp_path):
    """A container's limit is what kills it, and MemAvailable does not see it (a review)."""
    from modelmerge.methods.learned import _cgroup_room

    assert _cgroup_room(str(tmp_path)) is None  # no limit files: no limit
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_room(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text(f"{4 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{1 << 30}\n")
    assert _cgroup_room(str(tmp_path)) == 3 << 30


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_unrolled_costs_are_weight_matchings_per_layer_terms(kind):
    """The unrolled iterations' cost (precomputed constants, batched products) is, per hidden layer,
    ``W_A,in P_{l-1} W_B,in^T + W_A,out^T P_{l+1} W_B,out + b_A b_B^T`` summed over kernel taps and
    flattened positions, standardised; weighted terms and first-layer importance too."""
    from torch import nn

    from modelmerge.deepalign.model import _CrossCosts, _standardise
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import stacked_weight_space

    def net(seed):
        torch.manual_seed(seed)
        if kind == "mlp":
            return mlp((7, 5, 6, 4, 3), seed=seed).double().state_dict()
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(5 * 16, 6), nn.ReLU(), nn.Linear(6, 3)).double().state_dict()

    states = [net(s) for s in (0, 1, 2, 3)]  # two pairs, stacked
    chain = infer_chain(states[0])
    a = stacked_weight_space(chain, {k: torch.stack([states[0][k], states[2][k]]) for k in states[0]})
    b = stacked_weight_space(chain, {k: torch.stack([states[1][k], states[3][k]]) for k in states[0]})
    g = torch.Generator().manual_seed(0)
    soft = [torch.rand(2, n, n, generator=g, dtype=torch.float64) for n in a.widths[1:-1]]
    importance = torch.rand(2, a.widths[0], generator=g, dtype=torch.float64)
    weights = torch.tensor([0.7, 1.3, 0.4], dtype=torch.float64)
    wa, wb = a.weights, b.weights
    last = len(wa) - 1
    for imp, wts in ((None, None), (importance, weights)):
        got = _CrossCosts(a, b, imp)(soft, wts)
        for l in range(1, last + 1):
            p_in = torch.diag_embed(imp) if (l == 1 and imp is not None) else (
                torch.eye(a.widths[0], dtype=torch.float64).expand(2, -1, -1) if l == 1 else soft[l - 2])
            p_out = torch.eye(a.widths[-1], dtype=torch.float64).expand(2, -1, -1) if l == last else soft[l]
            c_in = sum(wa[l - 1][..., t] @ p_in @ wb[l - 1][..., t].transpose(1, 2) for t in range(wa[l - 1].shape[-1]))
            c_out = sum(wa[l][..., t].transpose(1, 2) @ p_out @ wb[l][..., t] for t in range(wa[l].shape[-1]))
            c_bias = a.biases[l - 1][:, :, None] * b.biases[l - 1][:, None, :]
            ref = (_standardise(c_in + c_out + c_bias) if wts is None else _standardise(
                wts[0] * _standardise(c_in) + wts[1] * _standardise(c_out) + wts[2] * _standardise(c_bias)))
            assert torch.allclose(got[l - 1], ref, atol=1e-10), (kind, l)
    if kind == "cnn":  # the test covers kernel taps and a flattening layer's positions
        assert wa[0].shape[-1] == 9 and wa[2].shape[-1] == 16


def test_one_hidden_layer_skips_the_unrolled_sinkhorns(monkeypatch):
    """With one hidden layer no soft permutation enters the unrolled costs (its neighbours are the fixed
    inputs and outputs), so the forward skips the Sinkhorns; deeper networks still run one per iteration."""
    from modelmerge.deepalign import model as m
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import stacked_weight_space

    calls = []
    real = m._sinkhorn_layers
    monkeypatch.setattr(m, "_sinkhorn_layers", lambda logits: calls.append(len(logits)) or real(logits))
    aligner = _aligner(v2=True)
    for widths, expected in (([5, 7, 3], []), ([5, 7, 6, 3], [2] * aligner.config.unroll)):
        a, b = _pair(widths, seed=4)
        chain = infer_chain(a)
        wa, wb = (stacked_weight_space(chain, {k: v[None] for k, v in s.items()}) for s in (a, b))
        calls.clear()
        with torch.no_grad():
            scores = aligner(wa, wb)
        assert calls == expected and all(torch.isfinite(s).all() for s in scores)


def test_answers_are_ordinary_tensors_after_the_inference_mode_forward():
    """The forward runs in inference mode (fewer per-operation costs); its answers must still be ordinary
    tensors: callers index, clone and modify permutations in place outside it."""
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import stacked_weight_space

    a, b = _pair([5, 7, 6, 3], seed=5)
    chain = infer_chain(a)
    wa, wb = (stacked_weight_space(chain, {k: v[None] for k, v in s.items()}) for s in (a, b))
    perms = _aligner(v2=True).align(wa, wb)
    assert [p.shape[0] for p in perms] == [7, 6] and not any(p.is_inference() for p in perms)
    perms[0][0] = perms[0][0]  # in place: refused on inference tensors
    assert sorted(perms[1].tolist()) == list(range(6))
