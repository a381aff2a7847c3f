"""`modelmerge merge`: many models into one frame and one soup."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import mlp
from typer.testing import CliRunner

from modelmerge.checkpoint import load_checkpoint
from modelmerge.cli.app import app
from modelmerge.network import resolve_network
from modelmerge.permutation import apply_permutation, random_permutation
from modelmerge.soup import average, check_weights, merge_many

runner = CliRunner()
WIDTHS = [64, 24, 16, 10]


def _outputs(state, x):
    model = mlp(WIDTHS)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def test_copies_of_one_permuted_model_give_back_its_function():
    a = mlp(WIDTHS, seed=1).state_dict()
    net = resolve_network(a)
    copies = [a] + [apply_permutation(a, net.spec, random_permutation(net.spec, torch.Generator().manual_seed(s)))
                    for s in (1, 2, 3)]
    x = torch.randn(32, 64)
    assert not torch.allclose(average(copies, [0.25] * 4)["0.weight"], a["0.weight"])  # naive averaging breaks it
    calls = []
    result = merge_many(copies, net, seed=0, on_progress=lambda done, total: calls.append((done, total)))
    assert result.converged
    torch.testing.assert_close(_outputs(result.soup, x), _outputs(a, x), rtol=1e-5, atol=1e-5)
    # the progress ends at the visits made, not at max_iter's estimate (it read "60/60" after 9)
    assert calls[-1] == (calls[-2][0],) * 2 and calls[-1][0] <= result.sweeps * len(copies) < calls[0][1]


def test_weights_pick_shares_and_a_model_at_weight_one_is_returned():
    models = [mlp(WIDTHS, seed=s).state_dict() for s in (1, 2, 3)]
    net = resolve_network(models[0])
    result = merge_many(models, net, weights=[0.0, 1.0, 0.0])
    x = torch.randn(16, 64)
    torch.testing.assert_close(_outputs(result.soup, x), _outputs(models[1], x), rtol=1e-5, atol=1e-5)
    # every aligned model computes its original's function
    for original, aligned in zip(models, result.aligned):
        torch.testing.assert_close(_outputs(aligned, x), _outputs(original, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights, needle", [([0.5, 0.5, 0.5], "sum to 1.5"), ([1.2, -0.2], "non-negative"),
                                             ([1.0], "1 value(s) for 2 models"), ([float("nan"), 1.0], "finite")])
def test_bad_weights(weights, needle):
    from modelmerge.errors import ModelMergeError

    with pytest.raises(ModelMergeError, match=re.escape(needle)):
        check_weights(weights, 2 if needle != "sum to 1.5" else 3)


def test_cli_soup_report_and_scores(tmp_path, save_sd):
    paths = [str(save_sd(mlp(WIDTHS, seed=s).state_dict(), f"m{s}.safetensors")) for s in range(3)]
    out, report = tmp_path / "soup.safetensors", tmp_path / "r.json"
    r = runner.invoke(app, ["merge", *paths, "-o", str(out), "--data", "digits", "--report", str(report)])
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert set(data["scores"]) == {"model 1", "model 2", "model 3", "soup", "naive average"}
    assert [data["scores"][f"model {i}"]["source"] for i in (1, 2, 3)] == paths
    assert data["weights"] == pytest.approx([1 / 3] * 3)
    assert data["reset_bn"] is False and data["repair"] is False and "recomputed" not in r.output
    soup = load_checkpoint(out)
    expected = merge_many([load_checkpoint(p).state for p in paths], resolve_network(soup.state)).soup
    for k, v in expected.items():
        torch.testing.assert_close(soup.state[k], v)
    assert json.loads(soup.metadata["modelmerge.inputs"])[2]["source"] == paths[2]


@pytest.mark.parametrize("case", ["one model", "mismatched", "bad weights", "weights count", "reset-bn without data"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, save_sd):
    a = str(save_sd(mlp(WIDTHS, seed=0).state_dict(), "a.safetensors"))
    b = str(save_sd(mlp(WIDTHS, seed=1).state_dict(), "b.safetensors"))
    other = str(save_sd(mlp([64, 8, 10], seed=2).state_dict(), "c.safetensors"))
    out = tmp_path / "soup.safetensors"
    args, needle = {
        "one model": ([a], "at least two checkpoints"),
        "mismatched": ([a, b, other], "model 1 and model 3"),
        "bad weights": ([a, b, "--weights", "0.7,0.7"], "sum to 1.4"),
        "weights count": ([a, b, "--weights", "1"], "1 value(s) for 2 models"),
        "reset-bn without data": ([a, b, "--reset-bn"], "--reset-bn needs --data"),
    }[case]
    r = runner.invoke(app, ["merge", *args, "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_a_soup_refuses_integer_tensors_that_differ_between_models():
    """A soup averages floating-point tensors and copies the rest from model 1: integer tensors of several
    values that differ (int8 weights) would be mixed with averaged floats (black-box sweep)."""
    from modelmerge.errors import MismatchError
    from modelmerge.spec import PermutationSpec, infer_spec

    states = [mlp((6, 8, 3), seed=s).state_dict() for s in range(3)]
    spec = infer_spec(states[0])
    spec = PermutationSpec(spec.groups, {**spec.axes, "codes": (None,)})
    for i, s in enumerate(states):
        s["codes"] = torch.tensor([i, 1, 2], dtype=torch.int8)
    network = resolve_network(states[0], spec=spec)
    with pytest.raises(MismatchError, match="codes is a torch.int8 tensor that differs between model 1 and model 2"):
        merge_many(states, network)
    for s in states:
        s["codes"] = torch.tensor([0, 1, 2], dtype=torch.int8)  # equal in every model: copied
    assert torch.equal(merge_many(states, network).soup["codes"], states[0]["codes"])
