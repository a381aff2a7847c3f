"""Traced specs: function preserved under random permutations, planted recovery, and the limits."""

from __future__ import annotations

import pytest
import torch
from archs import ResidualMLP, ResNetish, Untraceable, VGGish, WithConcat

import modelmerge as mm
from modelmerge.errors import SpecError
from modelmerge.matching import weight_matching
from modelmerge.permutation import apply_permutation, invert_permutation, random_permutation
from modelmerge.trace import trace_spec

MODELS = {
    "vgg": (VGGish, (1, 8, 8)),
    "resnet": (ResNetish, (1, 8, 8)),
    "residual-mlp": (ResidualMLP, (64,)),
}


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_traced_spec_preserves_function(name, seed):
    cls, shape = MODELS[name]
    torch.manual_seed(seed)
    model = _randomise_bn(cls())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = trace_spec(model).spec
    spec.check(state)
    assert spec.groups  # something is permutable
    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    x = torch.randn(5, *shape)
    with torch.no_grad():
        y = model(x)
        model.load_state_dict(apply_permutation(state, spec, perm))
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_residual_add_ties_the_stream():
    spec = trace_spec(ResidualMLP()).spec
    stream = spec.axes["embed.weight"][0]
    assert spec.axes["blocks.0.3.weight"][0] == stream and spec.axes["blocks.1.3.weight"][0] == stream
    assert spec.axes["blocks.0.0.weight"] == (stream,) and spec.axes["out.weight"] == (None, stream)
    hidden = spec.axes["blocks.0.1.weight"][0]
    assert hidden != stream and spec.axes["blocks.0.3.weight"][1] == hidden


def test_projection_shortcut_joins_the_second_stage():
    spec = trace_spec(ResNetish()).spec
    stage2 = spec.axes["layer2.0.shortcut.0.weight"][0]
    assert spec.axes["layer2.0.bn2.weight"] == (stage2,) and spec.axes["layer2.1.conv2.weight"][0] == stage2
    assert spec.axes["layer2.0.shortcut.0.weight"][1] == spec.axes["stem.weight"][0]


@pytest.mark.parametrize("name", MODELS)
def test_weight_matching_recovers_planted_permutation(name):
    cls, _ = MODELS[name]
    torch.manual_seed(3)
    state = _randomise_bn(cls()).state_dict()
    spec = trace_spec(cls()).spec
    perm = random_permutation(spec, torch.Generator().manual_seed(4))
    found, _ = weight_matching(state, apply_permutation(state, spec, perm), spec)
    expected = invert_permutation(perm)
    assert all(torch.equal(found[g], expected[g]) for g in spec.groups)


def test_untraceable_model_points_to_spec():
    with pytest.raises(SpecError, match="cannot trace Untraceable.*--spec"):
        trace_spec(Untraceable())


def test_concatenation_gives_the_reader_segments():
    result = trace_spec(WithConcat())
    spec = result.spec
    assert spec.axes["out.weight"] == (None, (("a.out", 5), ("b.out", 5)))
    assert spec.axes["a.weight"][0] == "a.out" and spec.axes["c.weight"][0] == "c.out"
    assert not result.warnings


class WithCumsum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(6, 5), torch.nn.Linear(5, 2), torch.nn.Linear(6, 4)
        self.d = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.b(self.a(x).cumsum(1)) + self.d(torch.relu(self.c(x)))  # cumsum over units: order matters


def test_unknown_op_holds_its_groups_fixed_and_warns():
    result = trace_spec(WithCumsum())
    assert result.spec.axes["a.weight"][0] is None and result.spec.axes["b.weight"] == (None, None)
    assert result.spec.axes["c.weight"][0] == "c.out"  # untouched by the unknown op
    assert len(result.warnings) == 1 and "cumsum" in result.warnings[0] and "a" in result.warnings[0]


def test_untraceable_model_is_one_line_from_the_cli(tmp_path):
    """export prints the partial graph when it fails; the user sees one line."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from modelmerge.cli.app import app

    ck = tmp_path / "u.safetensors"
    save_file(Untraceable().state_dict(), str(ck))
    r = CliRunner().invoke(app, ["inspect", str(ck), "--model", "archs:Untraceable"])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("modelmerge: error: cannot trace"), r.output


class TiedAutoencoder(torch.nn.Module):
    """A decoder that reuses both encoder weights transposed: the hidden units are defined
    through themselves (the tracer recursed without end on it: found by a black-box sweep)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = torch.nn.Linear(10, 32), torch.nn.Linear(32, 16)
        self.dec_b2, self.dec_b1 = torch.nn.Parameter(torch.randn(32)), torch.nn.Parameter(torch.randn(10))

    def forward(self, x):
        z = torch.tanh(self.enc2(torch.relu(self.enc1(x))))
        h = torch.relu(torch.nn.functional.linear(z, self.enc2.weight.t(), self.dec_b2))
        return torch.nn.functional.linear(h, self.enc1.weight.t(), self.dec_b1)


def test_units_defined_through_reused_weights_are_held_fixed_and_the_rest_still_moves():
    torch.manual_seed(0)
    model = TiedAutoencoder().eval()
    result = trace_spec(model, input_shape=(10,))
    spec, state = result.spec, {k: v.clone() for k, v in model.state_dict().items()}
    assert spec.axes["enc1.weight"] == (None, None)  # reused transposed twice over: in place
    assert any("define through themselves" in w for w in result.warnings)
    assert spec.groups, "the code units (enc2's outputs) may still move"
    perm = random_permutation(spec, torch.Generator().manual_seed(1))
    x = torch.randn(5, 10)
    with torch.no_grad():
        y = model(x)
        model.load_state_dict(apply_permutation(state, spec, perm))
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


class WithAuxHead(torch.nn.Module):
    """An auxiliary head that reads the hidden units but that forward() never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.out, self.aux = torch.nn.Linear(10, 32), torch.nn.Linear(32, 4), torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc1(x)))


def test_parameters_the_forward_never_reads_are_named_as_a_risk():
    """They keep their order while the units they read move, so the head's path breaks; this
    passed without a word (found by a black-box sweep), then only as a note (a later sweep): it is a
    risk, which align prints as a warning. Models that read every parameter get no such line."""
    result = trace_spec(WithAuxHead(), input_shape=(10,))
    assert result.spec.axes["aux.weight"] == (None, None) and result.spec.axes["fc1.weight"][0] is not None
    assert any("never reads (aux.weight, aux.bias)" in w for w in result.risks)
    assert not any("never reads" in w for w in result.warnings)
    assert not trace_spec(ResNetish()).risks
    a, b = WithAuxHead().state_dict(), WithAuxHead().state_dict()
    res = mm.align(a, b, module=WithAuxHead(), input_shape=(10,), method="weight-matching")
    assert any("never reads" in w for w in res.warnings) and not any("never reads" in n for n in res.notes)


class TiedHead(torch.nn.Module):
    """A language-model head tied to the embedding: one tensor under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = torch.nn.Embedding(11, 8), torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.embed(tokens))))


def test_a_tied_tensor_read_under_its_other_name_is_not_called_unread():
    """The export reads it under one name; the other was named as never read (false; black-box sweep)."""
    result = trace_spec(TiedHead(), example=(torch.randint(0, 11, (2, 5)),))
    assert not any("never reads" in w for w in result.warnings + result.risks), result.risks
    assert result.spec.axes["head.weight"] == result.spec.axes["embed.weight"]
