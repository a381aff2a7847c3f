"""Segmented axes (concatenations, packed projections) and head sets (attention heads, grouped convs).

Property tests on hand-written blocks: structured permutations keep the function,
weight matching recovers planted ones, and broken structure is refused.
"""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modelmerge.errors import SpecError
from modelmerge.matching import alignment_objective, solve_structured, weight_matching
from modelmerge.permutation import (
    apply_permutation,
    check_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    permute_param,
    random_permutation,
    structured_permutation,
)
from modelmerge.spec import HeadSet, PermutationSpec

# --------------------------------------------------------------------------- a transformer block

E, H, D, FF, IN, OUT = 32, 4, 8, 24, 6, 5  # width, heads, head dim, MLP hidden, inputs, outputs


def attn_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    return {
        "emb.weight": r(E, IN), "emb.bias": r(E),
        "ln1.weight": 1 + r(E), "ln1.bias": r(E),
        "attn.in_proj_weight": r(3 * E, E), "attn.in_proj_bias": r(3 * E),
        "attn.out_proj.weight": r(E, E), "attn.out_proj.bias": r(E),
        "ln2.weight": 1 + r(E), "ln2.bias": r(E),
        "fc1.weight": r(FF, E), "fc1.bias": r(FF), "fc2.weight": r(E, FF), "fc2.bias": r(E),
        "head.weight": r(OUT, E), "head.bias": r(OUT),
    }


def attention(s: dict, a: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention with packed in_proj (nn.MultiheadAttention's layout): [B, T, E] -> [B, T, E]."""
    b, t, _ = a.shape
    q, k, v = F.linear(a, s["attn.in_proj_weight"], s["attn.in_proj_bias"]).split(E, -1)
    q, k, v = (x.reshape(b, t, H, D).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
    o = (att @ v).transpose(1, 2).reshape(b, t, E)
    return F.linear(o, s["attn.out_proj.weight"], s["attn.out_proj.bias"])


def attn_forward(s: dict, x: torch.Tensor) -> torch.Tensor:
    h = F.linear(x, s["emb.weight"], s["emb.bias"])
    h = h + attention(s, F.layer_norm(h, (E,), s["ln1.weight"], s["ln1.bias"]))
    m = F.layer_norm(h, (E,), s["ln2.weight"], s["ln2.bias"])
    h = h + F.linear(F.gelu(F.linear(m, s["fc1.weight"], s["fc1.bias"])), s["fc2.weight"], s["fc2.bias"])
    return F.linear(h, s["head.weight"], s["head.bias"])


PACKED = (("qk", E), ("qk", E), ("vo", E))  # q and k rows share a group; v rows are the head outputs


def attn_spec(heads: bool = True) -> PermutationSpec:
    return PermutationSpec(
        groups={"res": E, "qk": E, "vo": E, "mlp": FF},
        axes={
            "emb.weight": ("res", None), "emb.bias": ("res",),
            "ln1.weight": ("res",), "ln1.bias": ("res",),
            "attn.in_proj_weight": (PACKED, "res"), "attn.in_proj_bias": (PACKED,),
            "attn.out_proj.weight": ("res", "vo"), "attn.out_proj.bias": ("res",),
            "ln2.weight": ("res",), "ln2.bias": ("res",),
            "fc1.weight": ("mlp", "res"), "fc1.bias": ("mlp",),
            "fc2.weight": ("res", "mlp"), "fc2.bias": ("res",),
            "head.weight": (None, "res"), "head.bias": (None,),
        },
        heads={"attn": HeadSet(H, ("qk", "vo"))} if heads else {},
    )


def attn_input(seed=1):
    return torch.randn(3, 7, IN, generator=torch.Generator().manual_seed(seed))


def test_hand_written_attention_is_torchs():
    """The test's forward reads the parameters the way nn.MultiheadAttention does (so the spec is real)."""
    s = attn_state(0)
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
    mha.load_state_dict({k[5:]: v for k, v in s.items() if k.startswith("attn.")})
    a = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(attention(s, a), mha(a, a, a, need_weights=False)[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structured_permutation_preserves_attention(seed):
    s, spec, x = attn_state(seed), attn_spec(), attn_input()
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    check_permutation(spec, perm)
    assert not torch.equal(perm["qk"], torch.arange(E)) and not torch.equal(perm["vo"], torch.arange(E))
    permuted = apply_permutation(s, spec, perm)
    assert not torch.equal(permuted["attn.in_proj_weight"], s["attn.in_proj_weight"])
    torch.testing.assert_close(attn_forward(permuted, x), attn_forward(s, x), rtol=1e-5, atol=1e-5)


def test_without_head_set_random_permutation_breaks_attention():
    """Negative control: plain qk/vo groups let units cross heads, which changes the function."""
    s, x = attn_state(0), attn_input()
    plain = attn_spec(heads=False)
    perm = random_permutation(plain, torch.Generator().manual_seed(0))
    with pytest.raises(SpecError, match="head set 'attn'"):
        check_permutation(attn_spec(), perm)
    out = attn_forward(apply_permutation(s, plain, perm), x)
    assert not torch.allclose(out, attn_forward(s, x), atol=1e-3)


def test_segmented_axis_gathers_each_segment():
    """in_proj rows: q and k blocks permuted by qk (each at its own offset), v by vo."""
    s, spec = attn_state(0), attn_spec()
    perm = random_permutation(spec, torch.Generator().manual_seed(4))
    w = permute_param(s["attn.in_proj_weight"], spec.axes["attn.in_proj_weight"], perm)
    q, k, v = s["attn.in_proj_weight"].split(E)
    r = perm["res"]
    expected = torch.cat([q[perm["qk"]], k[perm["qk"]], v[perm["vo"]]])[:, r]
    assert torch.equal(w, expected)


def test_block_and_fixed_segments():
    """A segment longer than its group moves in blocks; a None segment stays put."""
    spec = PermutationSpec({"a": 2, "b": 3}, {"w": ((("a", 4), (None, 2), ("b", 3)),)})
    perm = {"a": torch.tensor([1, 0]), "b": torch.tensor([2, 0, 1])}
    out = permute_param(torch.arange(9), spec.axes["w"], perm)
    assert out.tolist() == [2, 3, 0, 1, 4, 5, 8, 6, 7]
    assert spec.segments("w", 0) == [("a", 0, 4), (None, 4, 2), ("b", 6, 3)]


def test_spec_accessors():
    spec = attn_spec()
    assert spec.segments("attn.in_proj_weight", 0) == [("qk", 0, E), ("qk", E, E), ("vo", 2 * E, E)]
    assert spec.segments("attn.in_proj_weight", 1) == [("res", 0, E)]
    assert spec.segments("head.weight", 0) == []
    assert spec.segments("emb.weight", 0, length=E) == [("res", 0, E)]
    assert ("attn.in_proj_weight", 0) in spec.members("qk")
    assert spec.members("qk").count(("attn.in_proj_weight", 0)) == 1  # two segments, one axis
    assert spec.members("vo") == [("attn.in_proj_weight", 0), ("attn.in_proj_bias", 0), ("attn.out_proj.weight", 1)]
    assert spec.fixed == ["head.bias"]
    assert spec.head_of("vo") == "attn" and spec.head_of("res") is None
    fixed_only = PermutationSpec({"g": 2}, {"w": (((None, 3), (None, 1)),), "v": ("g",)})
    assert fixed_only.fixed == ["w"] and fixed_only.members("g") == [("v", 0)]
    assert spec.segmented and not PermutationSpec({"g": 2}, {"v": ("g",)}).segmented


def test_inverse_and_composition_stay_structured():
    s, spec = attn_state(0), attn_spec()
    g = torch.Generator().manual_seed(5)
    p, q = random_permutation(spec, g), random_permutation(spec, g)
    check_permutation(spec, invert_permutation(p))
    check_permutation(spec, compose_permutations(p, q))
    once = apply_permutation(apply_permutation(s, spec, q), spec, p)
    both = apply_permutation(s, spec, compose_permutations(p, q))
    assert all(torch.equal(once[k], both[k]) for k in s)
    back = apply_permutation(apply_permutation(s, spec, p), spec, invert_permutation(p))
    assert all(torch.equal(back[k], s[k]) for k in s)


def test_alignment_objective_over_segmented_axes():
    a, b, spec = attn_state(0), attn_state(1), attn_spec()
    perm = random_permutation(spec, torch.Generator().manual_seed(6))
    pb = apply_permutation(b, spec, perm)
    direct = sum(float((a[k].double() * pb[k].double()).sum()) for k in a)
    assert alignment_objective(a, b, spec, perm) == pytest.approx(direct, rel=1e-12)


def _assert_recovered(a, spec, seed, wm_seed=0):
    planted = random_permutation(spec, torch.Generator().manual_seed(seed))
    b = apply_permutation(a, spec, planted)
    found, info = weight_matching(a, b, spec, seed=wm_seed)
    check_permutation(spec, found)
    expected = invert_permutation(planted)
    for g in spec.groups:
        assert torch.equal(found[g], expected[g]), f"group {g}: planted permutation not recovered"
    assert info.converged and info.objective_after > info.objective_before
    return found


@pytest.mark.parametrize("seed", [0, 1])
def test_weight_matching_recovers_planted_attention(seed):
    _assert_recovered(attn_state(seed), attn_spec(), seed=10 + seed, wm_seed=seed)


def test_weight_matching_on_unrelated_attention_is_valid_and_improves():
    a, b, spec = attn_state(0), attn_state(7), attn_spec()
    seen = []
    found, info = weight_matching(a, b, spec, seed=1, on_sweep=lambda i, obj: seen.append(obj))
    check_permutation(spec, found)
    assert all(y >= x - 1e-9 for x, y in zip([info.objective_before] + seen, seen))
    assert info.objective_after == pytest.approx(alignment_objective(a, b, spec, found))
    again, info2 = weight_matching(a, b, spec, seed=3, init=found)  # nothing left to improve
    assert info2.iterations == 1 and all(torch.equal(again[g], found[g]) for g in spec.groups)


@pytest.mark.parametrize("seed", range(4))
def test_joint_step_never_lowers_the_objective_when_members_share_a_tensor(seed):
    """Members u and v both act on w: the joint step's linear costs are approximate, the exact gain decides."""
    spec = PermutationSpec({"u": 8, "v": 8}, {"w1": ("u", None), "w": ("u", "v"), "w2": (None, "v")},
                           heads={"h": HeadSet(2, ("u", "v"))})
    g = torch.Generator().manual_seed(seed)

    def state():
        return {"w1": torch.randn(8, 3, generator=g), "w": torch.randn(8, 8, generator=g) * 3,
                "w2": torch.randn(3, 8, generator=g)}

    a, b = state(), state()
    seen = []
    found, info = weight_matching(a, b, spec, seed=seed, max_iter=20, on_sweep=lambda i, obj: seen.append(obj))
    check_permutation(spec, found)
    objs = [info.objective_before] + seen
    assert all(y >= x - 1e-9 for x, y in itertools.pairwise(objs))


def test_weight_matching_refuses_unstructured_init():
    a, spec = attn_state(0), attn_spec()
    bad = random_permutation(attn_spec(heads=False), torch.Generator().manual_seed(0))
    with pytest.raises(SpecError, match="head set"):
        weight_matching(a, a, spec, init=bad)


# --------------------------------------------------------------------------- grouped convolution

CG, C = 4, 16  # conv groups, channels


def gconv_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "c1.weight": torch.randn(C, 3, 3, 3, generator=g) * 0.3, "c1.bias": torch.randn(C, generator=g) * 0.1,
        "c2.weight": torch.randn(C, C // CG, 3, 3, generator=g) * 0.3, "c2.bias": torch.randn(C, generator=g) * 0.1,
        "c3.weight": torch.randn(5, C, 1, 1, generator=g) * 0.3, "c3.bias": torch.randn(5, generator=g) * 0.1,
    }


def gconv_forward(s, x):
    h = F.relu(F.conv2d(x, s["c1.weight"], s["c1.bias"], padding=1))
    h = F.relu(F.conv2d(h, s["c2.weight"], s["c2.bias"], padding=1, groups=CG))
    return F.conv2d(h, s["c3.weight"], s["c3.bias"])


def gconv_spec(rigid=("x",)) -> PermutationSpec:
    """x: c1's outputs, read by c2 per channel group (c2's input axis never moves: x is rigid)."""
    return PermutationSpec(
        groups={"x": C, "y": C},
        axes={
            "c1.weight": ("x", None, None, None), "c1.bias": ("x",),
            "c2.weight": ("y", None, None, None), "c2.bias": ("y",),
            "c3.weight": (None, "y", None, None), "c3.bias": (None,),
        },
        heads={"groups": HeadSet(CG, ("x", "y"), rigid=rigid)},
    )


def test_grouped_conv_function_kept_and_rigid_needed():
    s, x = gconv_state(0), torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    spec = gconv_spec()
    for seed in range(3):
        perm = random_permutation(spec, torch.Generator().manual_seed(seed))
        # rigid: x's units never move within their chunk
        assert torch.equal(perm["x"].reshape(CG, -1) % (C // CG), torch.arange(C // CG).expand(CG, -1))
        torch.testing.assert_close(gconv_forward(apply_permutation(s, spec, perm), x), gconv_forward(s, x))
    # negative controls: without `rigid`, x moves within its chunks while c2's input axis does not
    loose = gconv_spec(rigid=())
    perm = random_permutation(loose, torch.Generator().manual_seed(0))
    assert not torch.allclose(gconv_forward(apply_permutation(s, loose, perm), x), gconv_forward(s, x), atol=1e-3)
    with pytest.raises(SpecError, match="rigid"):
        check_permutation(spec, perm)


def test_weight_matching_recovers_planted_grouped_conv():
    _assert_recovered(gconv_state(3), gconv_spec(), seed=4)


# --------------------------------------------------------------------------- DenseNet-style concatenation


def dense_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    return {
        "c0.weight": r(16, 3, 3, 3), "c0.bias": r(16),
        "c1.weight": r(8, 16, 3, 3), "c1.bias": r(8),
        "c2.weight": r(12, 3 + 16 + 8, 1, 1), "c2.bias": r(12),  # reads cat(input, x0, x1)
        "fc.weight": r(5, 12), "fc.bias": r(5),
    }


def dense_forward(s, x):
    x0 = F.relu(F.conv2d(x, s["c0.weight"], s["c0.bias"], padding=1))
    x1 = F.relu(F.conv2d(x0, s["c1.weight"], s["c1.bias"], padding=1))
    x2 = F.relu(F.conv2d(torch.cat([x, x0, x1], 1), s["c2.weight"], s["c2.bias"]))
    return F.linear(x2.mean((2, 3)), s["fc.weight"], s["fc.bias"])


def dense_spec() -> PermutationSpec:
    return PermutationSpec(
        groups={"g0": 16, "g1": 8, "g2": 12},
        axes={
            "c0.weight": ("g0", None, None, None), "c0.bias": ("g0",),
            "c1.weight": ("g1", "g0", None, None), "c1.bias": ("g1",),
            "c2.weight": ("g2", ((None, 3), ("g0", 16), ("g1", 8)), None, None), "c2.bias": ("g2",),
            "fc.weight": (None, "g2"), "fc.bias": (None,),
        },
    )


def test_concatenation_function_kept():
    s, spec = dense_state(0), dense_spec()
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    for seed in range(3):
        perm = random_permutation(spec, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(dense_forward(apply_permutation(s, spec, perm), x), dense_forward(s, x))
    # negative control: reading the concatenation as if x1 came first breaks it
    wrong = PermutationSpec(spec.groups, {**spec.axes, "c2.weight": ("g2", ((None, 3), ("g1", 8), ("g0", 16)),
                                                                         None, None)})
    perm = random_permutation(spec, torch.Generator().manual_seed(0))
    assert not torch.allclose(dense_forward(apply_permutation(s, wrong, perm), x), dense_forward(s, x), atol=1e-3)


def test_weight_matching_recovers_planted_concatenation():
    _assert_recovered(dense_state(1), dense_spec(), seed=2)


# --------------------------------------------------------------------------- the structured solver


def test_solve_structured_is_the_exact_maximum():
    """Brute force over every structured permutation of a head set (one rigid member), plus a plain group."""
    spec = PermutationSpec({"a": 4, "b": 6, "c": 3}, {"w": ("a", "b", "c")},
                           heads={"h": HeadSet(2, ("a", "b"), rigid=("b",))})
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        gains = {k: torch.randn(n, n, generator=g, dtype=torch.float64) for k, n in spec.groups.items()}
        found = solve_structured(spec, gains)
        check_permutation(spec, found)

        def value(p, gains=gains):
            return sum(float(gains[k][torch.arange(len(p[k])), p[k]].sum()) for k in p)

        best = -math.inf
        for pi in itertools.permutations(range(2)):
            for sa in itertools.product(itertools.permutations(range(2)), repeat=2):
                cand = {"a": structured_permutation(torch.tensor(pi), torch.tensor(sa)),
                        "b": structured_permutation(torch.tensor(pi), torch.arange(3).expand(2, 3))}
                best = max(best, value(cand))
        assert value({k: found[k] for k in ("a", "b")}) == pytest.approx(best, abs=1e-12)
        plain = max(float(gains["c"][torch.arange(3), torch.tensor(p)].sum()) for p in itertools.permutations(range(3)))
        assert value({"c": found["c"]}) == pytest.approx(plain, abs=1e-12)


def test_activation_matching_answers_respect_head_sets(monkeypatch):
    """Correlations favouring units that cross heads: the per-group optimum is refused, the answer stays valid."""
    from modelmerge.methods import activation

    spec = attn_spec()
    plain = random_permutation(attn_spec(heads=False), torch.Generator().manual_seed(1))
    corr = {g: torch.eye(n)[plain[g]] for g, n in spec.groups.items() if g != "mlp"}  # mlp: no producer seen
    monkeypatch.setattr(activation, "correlations", lambda *args: corr)
    monkeypatch.setattr(activation, "_unavailable", lambda ctx: None)
    ctx = SimpleNamespace(network=SimpleNamespace(spec=spec), seed=0, a=None, b=None,
                          task=lambda: SimpleNamespace(x_train=torch.zeros(4, IN)))
    answer = activation._run(ctx, None)
    check_permutation(spec, answer.perm)
    assert torch.equal(answer.perm["res"], plain["res"])  # plain groups: the plain assignment
    assert torch.equal(answer.perm["mlp"], torch.arange(FF)) and "mlp" in answer.notes[0]


# --------------------------------------------------------------------------- JSON and refusals


def test_json_round_trip(tmp_path):
    spec = attn_spec()
    data = json.loads(spec.to_json())
    assert data["params"]["attn.in_proj_weight"][0] == [["qk", E], ["qk", E], ["vo", E]]
    assert data["heads"] == {"attn": {"count": H, "groups": ["qk", "vo"], "rigid": []}}
    assert PermutationSpec.from_dict(data) == spec
    spec.save(tmp_path / "s.json")
    assert PermutationSpec.load(tmp_path / "s.json") == spec
    assert "heads" not in dense_spec().to_dict()
    assert PermutationSpec.from_dict(json.loads(dense_spec().to_json())) == dense_spec()
    assert attn_spec() != attn_spec(heads=False)
    assert gconv_spec() != gconv_spec(rigid=())


@pytest.mark.parametrize(
    "args, match",
    [
        (({"g": 4}, {"w": ((("g", 6),),)}), "'w'.*not a multiple of group 'g'"),
        (({"g": 4}, {"w": ((("h", 4),),)}), "'w' names unknown group 'h'"),
        (({"g": 4}, {"w": ((("g", 4, 1),),)}), "'w' has axis entry"),
        (({"g": 4}, {}, {"h": HeadSet(3, ("g",))}), "not divisible by 3"),
        (({"g": 4}, {}, {"h": HeadSet(2, ("g", "z"))}), "unknown group 'z'"),
        (({"g": 4, "f": 4}, {}, {"h": HeadSet(2, ("g",)), "i": HeadSet(2, ("f", "g"))}),
         "group 'g' is in head sets 'h' and 'i'"),
        (({"g": 4}, {}, {"h": HeadSet(2, ("g",), rigid=("f",))}), "not among its groups"),
        (({"g": 4}, {}, {"h": HeadSet(0, ("g",))}), "count 0"),
    ],
)
def test_bad_structures_are_refused(args, match):
    with pytest.raises(SpecError, match=match):
        PermutationSpec(*args)


@pytest.mark.parametrize(
    "heads, match",
    [
        ({"h": {"count": 2}}, "head set 'h' must be"),
        ({"h": {"count": 2, "groups": "g"}}, "member groups"),
        ({"h": {"count": "2", "groups": ["g"]}}, "integer"),
        ([1], "'heads' must be a JSON object"),
    ],
)
def test_bad_head_json_is_refused(heads, match):
    with pytest.raises(SpecError, match=match):
        PermutationSpec.from_dict({"groups": {"g": 4}, "params": {}, "heads": heads})


def test_segments_must_sum_to_the_axis():
    s, spec = attn_state(0), attn_spec()
    bad = {**s, "attn.in_proj_weight": torch.zeros(3 * E + 1, E)}
    with pytest.raises(SpecError, match=r"segments of axis 0 of 'attn.in_proj_weight' sum to 96.*length 97"):
        spec.check(bad)
    with pytest.raises(SpecError, match="sum to 96"):
        spec.segments("attn.in_proj_weight", 0, length=97)


def test_unstructured_permutations_are_refused():
    spec = attn_spec()
    perm = identity_permutation(spec)
    perm["qk"] = torch.roll(perm["qk"], 1)  # one unit crosses into the next head
    with pytest.raises(SpecError, match="group 'qk' breaks head set 'attn'"):
        check_permutation(spec, perm)
    perm = identity_permutation(spec)  # heads moved differently by qk and vo
    perm["qk"] = structured_permutation(torch.tensor([1, 0, 2, 3]), torch.arange(D).expand(H, D))
    with pytest.raises(SpecError, match="'qk' and 'vo' break head set 'attn'"):
        check_permutation(spec, perm)
    with pytest.raises(SpecError, match="head set 'attn'"):
        apply_permutation(attn_state(0), spec, perm)
