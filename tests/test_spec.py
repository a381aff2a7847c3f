"""Spec inference over bare state dicts, JSON round trip, and clear failures."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NamedMLP, VGGish, mlp
from torch import nn

from modelmerge.errors import SpecError
from modelmerge.spec import PermutationSpec, infer_chain, infer_spec


def test_sequential_mlp_spec():
    spec = infer_spec(mlp((12, 16, 8, 5)).state_dict())
    assert dict(spec.groups) == {"0.out": 16, "2.out": 8}
    assert spec.axes["0.weight"] == ("0.out", None)  # input units fixed
    assert spec.axes["2.weight"] == ("2.out", "0.out")
    assert spec.axes["4.weight"] == (None, "2.out")  # output units fixed
    assert spec.fixed == ["4.bias"]


def test_batchnorm_follows_its_layer_and_counter_stays_fixed():
    state = VGGish().state_dict()
    spec = infer_spec(state)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
        assert spec.axes[f"features.1.{leaf}"] == ("features.0.out",)
    assert spec.axes["features.1.num_batches_tracked"] == ()
    assert "features.1.num_batches_tracked" in spec.fixed


def test_conv_flatten_linear_permutes_in_blocks():
    state = VGGish().state_dict()
    spec = infer_spec(state)
    # classifier.1 reads 8 channels x (2x2) positions
    assert spec.axes["classifier.1.weight"] == ("classifier.1.out", "features.4.out")
    assert state["classifier.1.weight"].shape[1] // spec.groups["features.4.out"] == 4


def test_named_layers_sort_naturally():
    state = NamedMLP().state_dict()
    reordered = {k: state[k] for k in sorted(state, reverse=True)}  # safetensors-like reordering
    chain = infer_chain(reordered)
    assert [layer.module for layer in chain.layers] == ["fc1", "fc2", "fc3"]


def test_ten_layers_sort_numerically():
    widths = (4,) + (6,) * 10 + (2,)
    state = mlp(widths).state_dict()
    alphabetical = {k: state[k] for k in sorted(state)}  # "10.weight" < "2.weight"
    assert infer_spec(alphabetical) == infer_spec(state)


def test_block_order_found_when_names_sort_wrong():
    state = VGGish().state_dict()
    alphabetical = {k: state[k] for k in sorted(state)}  # classifier.* before features.*
    assert infer_spec(alphabetical) == infer_spec(state)


def test_json_round_trip(tmp_path):
    spec = infer_spec(VGGish().state_dict())
    path = tmp_path / "spec.json"
    spec.save(path)
    assert PermutationSpec.load(path) == spec
    assert json.loads(path.read_text())["format"] == "modelmerge.spec/1"


@pytest.mark.parametrize(
    "state, match",
    [
        ({"attn.in_proj_weight": torch.zeros(6, 2)}, "in_proj_weight"),
        ({"0.weight": torch.zeros(4, 3), "1.weight": torch.zeros(2, 5)}, "takes 5 inputs"),
        ({"norm.weight": torch.ones(3)}, "comes before any layer"),
        # sizes that fit, kinds that do not (said "takes 4 inputs but ... gives 4" before)
        ({"0.weight": torch.zeros(16, 3, 3, 3), "1.weight": torch.zeros(4, 16), "2.weight": torch.zeros(8, 4, 3, 3)},
         "a chain runs its convs before its linear layers"),
    ],
)
def test_uninferable_state_points_to_spec(state, match):
    with pytest.raises(SpecError, match=match) as e:
        infer_spec(state)
    assert "--spec" in str(e.value)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"groups": {"g": 0}, "params": {}}, "at least 1"),
        ({"groups": {}, "params": {"w": ["g"]}}, "unknown group"),
        ({"params": {}}, "not a modelmerge spec"),
        ({"format": "other/9", "groups": {}, "params": {}}, "unsupported spec format"),
        ({"groups": {"g": "4"}, "params": {}}, "integer size"),
        ({"groups": {"g": 4, "unused": 5}, "params": {"w": ["g", None]}}, "'unused' act on no parameter axis"),
    ],
)
def test_bad_spec_dicts(data, match):
    with pytest.raises(SpecError, match=match):
        PermutationSpec.from_dict(data)


def test_check_names_missing_and_misfit_parameters():
    state = mlp((12, 16, 5)).state_dict()
    spec = infer_spec(state)
    with pytest.raises(SpecError, match="does not cover 1 parameter"):
        spec.check({**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(SpecError, match="not a multiple"):
        spec.check({**state, "0.weight": torch.zeros(15, 12), "0.bias": torch.zeros(15)})


def test_spec_is_frozen():
    spec = infer_spec(mlp().state_dict())
    with pytest.raises((TypeError, AttributeError)):
        spec.groups["0.out"] = 3  # type: ignore[index]


def test_missing_and_invalid_spec_files(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        PermutationSpec.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        PermutationSpec.load(bad)
    with pytest.raises(SpecError, match="too large"):  # read at most the limit: it never ends
        PermutationSpec.load("/dev/zero")
    with pytest.raises(SpecError, match="is a folder"):
        PermutationSpec.load(tmp_path)


def test_a_spec_naming_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"groups": {"h": 3, "h": 4}, "params": {"0.weight": ["h", null]}}')
    with pytest.raises(SpecError, match="names 'h' twice"):
        PermutationSpec.load(path)


def test_a_spec_saved_with_a_byte_order_mark_reads(tmp_path):
    """Windows editors write one; it was refused as invalid JSON."""
    spec = PermutationSpec(groups={"h": 3}, axes={"0.weight": ("h", None), "1.weight": (None, "h")})
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + spec.to_json().encode())
    assert PermutationSpec.load(path) == spec


def test_a_spec_read_from_a_pipe():
    """``--spec <(make_spec)`` is a pipe: it reads as a file does."""
    import os

    spec = PermutationSpec(groups={"h": 3}, axes={"0.weight": ("h", None), "1.weight": (None, "h")})
    r, w = os.pipe()
    os.write(w, spec.to_json().encode())
    os.close(w)
    try:
        assert PermutationSpec.load(f"/dev/fd/{r}") == spec
    finally:
        os.close(r)


def test_layernorm_mlp_spec_and_conv_without_bias():
    m = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.ReLU(), nn.Conv2d(5, 4, 1))
    spec = infer_spec(m.state_dict())
    assert spec.axes["0.weight"] == ("0.out", None, None, None)
    assert spec.axes["2.weight"] == (None, "0.out", None, None)


def _named(names_shapes):
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (n_out, n_in) in names_shapes:
        state[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g)
        state[f"{name}.bias"] = torch.randn(n_out, generator=g)
    return state


def test_a_layer_order_that_names_and_file_do_not_give_is_refused_when_ambiguous():
    """safetensors files sort their names: with interchangeable square layers and unnumbered names,
    no order can be trusted, and a wrong one computes something else (found by a black-box sweep)."""
    module_order = [("stem", (16, 10)), ("pre", (16, 16)), ("post", (16, 16)), ("head", (3, 16))]
    with pytest.raises(SpecError, match="cannot tell the order"):
        infer_chain(dict(sorted(_named(module_order).items())))  # as read back from safetensors
    all_square = [("z_in", (8, 8)), ("m_hidden", (8, 8)), ("a_out", (8, 8))]
    with pytest.raises(SpecError, match="cannot tell the order"):
        infer_chain(dict(sorted(_named(all_square).items())))
    # a file in module order (torch.save) is trusted, and so are numbered names, sorted or not
    assert [layer.module for layer in infer_chain(_named(all_square)).layers] == ["z_in", "m_hidden", "a_out"]
    numbered = [("0", (16, 10)), ("2", (16, 16)), ("4", (16, 16)), ("6", (3, 16))]
    assert [layer.module for layer in infer_chain(dict(sorted(_named(numbered).items()))).layers] == ["0", "2", "4", "6"]
    # distinct shapes fix the order even from a sorted file
    distinct = [("stem", (16, 10)), ("body", (12, 16)), ("head", (3, 12))]
    assert [layer.module for layer in infer_chain(dict(sorted(_named(distinct).items()))).layers] == ["stem", "body", "head"]


def test_an_alphabetical_module_order_is_trusted_in_a_module_ordered_file():
    """``fc1, fc2, fc3, out`` is alphabetical, so a sorted file cannot be told from it; a .pt file
    (``ordered``) keeps module order, and names numbered within one stem keep their numbers' order
    even when sorted (both refused before: found by a black-box sweep)."""
    unnumbered = [("a_in", (32, 10)), ("b_mid", (32, 32)), ("c_mid", (32, 32)), ("d_out", (4, 32))]
    assert [layer.module for layer in infer_chain(_named(unnumbered), ordered=True).layers] == [
        "a_in", "b_mid", "c_mid", "d_out"]
    with pytest.raises(SpecError, match="cannot tell the order"):
        infer_chain(_named(unnumbered))  # the same order, from a file that may have sorted it
    shapes = [("fc1", (32, 10)), ("fc2", (32, 32)), ("fc3", (32, 32)), ("out", (4, 32))]
    expected = ["fc1", "fc2", "fc3", "out"]
    assert [layer.module for layer in infer_chain(dict(sorted(_named(shapes).items()))).layers] == expected
    # unnumbered square layers stay ambiguous in a sorted file, numbered neighbours or not, and
    # digits that are not an ordinal at the end of a name (conv3x3, fc2x) promise no order
    for shapes in ([("fc1", (16, 10)), ("pre", (16, 16)), ("post", (16, 16)), ("out", (3, 16))],
                   [("fc_in", (16, 10)), ("fc2x", (16, 16)), ("fc1x", (16, 16)), ("out", (3, 16))]):
        with pytest.raises(SpecError, match="cannot tell the order"):
            infer_chain(dict(sorted(_named(shapes).items())))


@pytest.mark.parametrize("make", [lambda c: nn.GroupNorm(2, c), lambda c: nn.InstanceNorm2d(c, affine=True),
                                  lambda c: nn.BatchNorm2d(c, track_running_stats=False)])
def test_a_conv_followed_by_a_scale_without_statistics_is_refused(make):
    """A GroupNorm's channels cannot move between its groups, and a state dict shows neither the
    groups nor the kind of norm: inference read it as per-channel and wrote a broken model
    (relative error 0.59 on a GroupNorm CNN, found by a black-box sweep). BatchNorm with
    statistics, and LayerNorm after a Linear, are still read."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), make(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(SpecError, match=r"'1' after conv '0' scales its channels.*GroupNorm"):
        infer_chain(m.state_dict(), ordered=True)
    # not even when another order would attach it to a Linear head of the same width
    head = nn.Sequential(nn.Conv2d(1, 10, 3), make(10), nn.ReLU(), nn.Flatten(), nn.Linear(360, 10))
    for ordered in (True, False):
        with pytest.raises(SpecError, match="GroupNorm"):
            infer_chain(head.state_dict(), ordered=ordered)
    # a LayerNorm after a Linear, which a sorted file lists after a conv of another width, is read
    g = torch.Generator().manual_seed(0)
    state = {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "fc.weight": torch.randn(16, 32, generator=g),
             "ln.weight": torch.ones(16), "ln.bias": torch.zeros(16), "fc2.weight": torch.randn(4, 16, generator=g)}
    assert [layer.module for layer in infer_chain(state).layers] == ["conv", "fc", "fc2"]
    bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    assert infer_chain(bn.state_dict()).layers[0].norms[0].module == "1"
    ln = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 4))
    assert infer_chain(ln.state_dict()).layers[0].norms[0].module == "1"


def test_a_sorted_plain_cnn_is_not_taken_for_a_grouped_conv():
    """safetensors sorts '10.weight' right after '0': a conv reading 32 channels after one giving 64 looked
    grouped in that order and the refusal came before the numbered order was tried (a review)."""
    from modelmerge.spec import infer_chain

    widths = [3, 64, 64, 64, 64, 32, 128]
    net = torch.nn.Sequential(*[m for i in range(6) for m in (torch.nn.Conv2d(widths[i], widths[i + 1], 3),
                                                              torch.nn.ReLU())],
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10))
    state = dict(sorted(net.state_dict().items()))
    assert [layer.module for layer in infer_chain(state).layers] == ["0", "2", "4", "6", "8", "10", "14"]
