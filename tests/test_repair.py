"""REPAIR: endpoints untouched, the merge's unit statistics set to their targets, folded exactly."""

from __future__ import annotations

import pytest
import torch
from archs import ResidualMLP
from conftest import VGGish, mlp
from typer.testing import CliRunner

from modelmerge.activations import producers
from modelmerge.cli.app import app
from modelmerge.merge import interpolate
from modelmerge.network import resolve_network
from modelmerge.repair import Repair, merge_pair, unit_statistics

runner = CliRunner()


def _pair(kind):
    if kind == "bare-mlp":
        return mlp([64, 24, 16, 10], seed=1).state_dict(), mlp([64, 24, 16, 10], seed=2).state_dict(), {}
    if kind == "vgg-bn":
        return VGGish(seed=1).state_dict(), VGGish(seed=2).state_dict(), {"module": VGGish(seed=1),
                                                                          "input_shape": (1, 8, 8)}
    if kind == "cnn-record":
        from modelmerge.archs import build

        rec = {"family": "cnn", "input_shape": [1, 8, 8], "channels": [6, 8], "hidden": [12], "batchnorm": False,
               "num_classes": 10}
        return build(rec, seed=1).state_dict(), build(rec, seed=2).state_dict(), {"record": rec}
    module = ResidualMLP()
    torch.manual_seed(5)
    other = ResidualMLP()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.state_dict(), other.state_dict(), {"module": module}


@pytest.mark.parametrize("kind", ["bare-mlp", "vgg-bn", "cnn-record", "residual-module"])
@pytest.mark.parametrize("alpha", [0.3, 0.5])
def test_merged_statistics_hit_their_targets(kind, alpha):
    a, b, kw = _pair(kind)
    net = resolve_network(a, **kw)
    x = torch.randn(200, *net.input_shape, generator=torch.Generator().manual_seed(0))
    merged = interpolate(a, b, alpha)
    fixed = Repair(net, [a, b], x)(merged, [1 - alpha, alpha])
    sa, sb, before, after = (unit_statistics(net, s, x) for s in (a, b, merged, fixed))
    assert set(after) == {p.name for p in producers(net)} and after
    moved = 0.0
    for name, (mu, sd) in after.items():
        mu_t = (1 - alpha) * sa[name][0] + alpha * sb[name][0]
        sd_t = (1 - alpha) * sa[name][1] + alpha * sb[name][1]
        # measured through the *folded* weights: the correction is exact, not just applied in the hooks
        torch.testing.assert_close(sd, sd_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mu, mu_t, rtol=1e-4, atol=1e-5)
        moved = max(moved, float((before[name][1] - sd_t).abs().max()))
    assert moved > 1e-3  # the merge really was off its targets before
    assert fixed.keys() == merged.keys() and all(fixed[k].dtype == merged[k].dtype for k in merged)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_endpoints_are_unchanged_exactly(alpha):
    a, b, kw = _pair("vgg-bn")
    net = resolve_network(a, **kw)
    x = torch.randn(64, 1, 8, 8)
    out = merge_pair(a, b, alpha, network=net, repairer=Repair(net, [a, b], x))
    for k, v in (a if alpha == 0 else b).items():
        assert torch.equal(out[k], v), k


def test_cli_interpolate_and_evaluate_with_repair(tmp_path, save_sd):
    a, b, _ = _pair("bare-mlp")
    pa, pb = save_sd(a, "a.safetensors"), save_sd(b, "b.safetensors")
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["interpolate", str(pa), str(pb), "-o", str(out), "--repair", "--dataset", "digits"])
    assert r.exit_code == 0, r.output
    assert "REPAIRed on digits" in r.output
    from modelmerge.checkpoint import load_checkpoint

    written = load_checkpoint(out)
    assert written.metadata["modelmerge.repair"] == "true"
    assert not torch.equal(written.state["0.weight"], interpolate(a, b, 0.5)["0.weight"])
    r = runner.invoke(app, ["evaluate", str(pa), str(pb), "--dataset", "digits", "--repair", "--alphas", "3",
                            "--json"])
    assert r.exit_code == 0, r.output
    import json

    curve = json.loads(r.stdout)
    assert curve["repair"] is True and len(curve["losses"]) == 3
    # the table says what it shows (it did not: a REPAIRed curve read as the plain one)
    r = runner.invoke(app, ["evaluate", str(pa), str(pb), "--dataset", "digits", "--repair", "--alphas", "3"])
    assert r.exit_code == 0 and "each merge REPAIRed" in " ".join(r.output.split())


@pytest.mark.parametrize("args, needle", [
    (["interpolate", "{a}", "{b}", "-o", "{out}", "--repair"], "--repair needs --dataset"),
    (["align", "{a}", "{b}", "-o", "{out}", "--repair", "--data", "digits"], "--repair needs --merged"),
    (["merge", "{a}", "{b}", "-o", "{out}", "--repair"], "--repair needs --data"),
])
def test_repair_without_its_inputs_is_one_line(args, needle, tmp_path, save_sd):
    a, b, _ = _pair("bare-mlp")
    paths = {"a": str(save_sd(a, "a.safetensors")), "b": str(save_sd(b, "b.safetensors")),
             "out": str(tmp_path / "o.safetensors")}
    r = runner.invoke(app, [x.format(**paths) for x in args])
    assert r.exit_code == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()
