"""train-aligner end to end (tiny), resume, refusal of bad zoos, distributed, and align --method deep-align."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from modelmerge.checkpoint import load_checkpoint
from modelmerge.cli.app import app
from modelmerge.deepalign.pretrained import load_aligner

runner = CliRunner()
TINY = ["--epochs", "1", "--batch-size", "2", "--val-pairs", "2", "--channels", "4", "--layers", "1",
        "--probes", "8", "--unroll", "1", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def trained(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("aligner") / "al"
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY])
    assert r.exit_code == 0, r.output
    return out


def test_train_aligner_writes_weights_and_card(trained, tiny_zoo):
    card = json.loads((trained / "aligner.json").read_text())
    assert card["family"] == "mlp" and card["supported_depths"] == [3]
    (zoo,) = card["zoos"]
    assert zoo["size"] == 8 and zoo["val_networks"] == 2 and zoo["dataset"] == "digits" and card["data"] == "digits"
    assert card["validation"]["metric"] == "barrier" and card["validation"]["barrier"] is not None
    assert card["steps"] >= 1 and (trained / "last.pt").is_file()
    model, _ = load_aligner(trained)
    assert model.num_parameters() == card["parameters"]
    # the .safetensors alone carries its card too
    model2, card2 = load_aligner(trained / "aligner.safetensors")
    assert card2["name"] == card["name"]


@pytest.mark.parametrize("seed", [0, 1])
def test_trained_aligner_keeps_both_symmetries(trained, seed):
    from conftest import aligner_answer, check_equivariance, mlp

    model, _ = load_aligner(trained)
    model = model.double()
    a, b = mlp([30, 20, 12, 4], seed=seed).double().state_dict(), mlp([30, 20, 12, 4], seed=seed + 9).double().state_dict()
    assert check_equivariance(model, a, b, seed)
    k_ab, k_ba = aligner_answer(model, a, b), aligner_answer(model, b, a)
    assert all(torch.equal(torch.argsort(p), q) for p, q in zip(k_ab, k_ba))


def test_resume_continues_the_step_count(trained, tmp_path, tiny_zoo):
    out = tmp_path / "al"
    shutil.copytree(trained, out)
    steps = json.loads((out / "aligner.json").read_text())["steps"]
    args = ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY]
    args[args.index("--epochs") + 1] = "2"
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "--resume" in r.stderr  # refuses to overwrite silently
    saved_seconds = torch.load(out / "last.pt", weights_only=True)["seconds"]
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "aligner.json").read_text())
    assert card["history"][-1]["step"] == 2 * steps
    assert card["seconds"] > saved_seconds > 0  # the whole run's time, not only the resumed part
    # nothing left to train, or other data than the saved best was measured on: one-line errors
    # (the first trained nothing and said 'wrote', the second mixed the runs; found by a black-box sweep)
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 1 and "already trained" in r.stderr and "--epochs" in r.stderr
    args[args.index("--epochs") + 1] = "3"
    r = runner.invoke(app, [*args[:args.index("--data")], "--data", "zoo", *args[args.index("--data") + 2:], "--resume"])
    assert r.exit_code == 1 and "other --data" in r.stderr, r.output


def test_refusals_that_protect_inputs_and_options_that_would_not_apply(trained, tiny_zoo, tmp_path, monkeypatch):
    base = ["train-aligner", "--zoo", str(tiny_zoo), "--data", "digits", *TINY]
    r = runner.invoke(app, [*base, "-o", str(tiny_zoo), "--force"])
    assert r.exit_code == 1 and "is a --zoo folder" in r.stderr and not (tiny_zoo / "aligner.json").exists()
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "a"), "--init", str(trained), "--channels", "5"])
    assert r.exit_code == 1 and "--channels 5 (it has 4)" in r.stderr
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "w"), "--init", str(trained), "--weighted-costs"])
    assert r.exit_code == 0, r.output  # switches a feature on over --init, as documented
    assert json.loads((tmp_path / "w" / "aligner.json").read_text())["config"]["weighted_costs"] is True
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "e"), "--init", str(trained), "--edge-cost", "3"])
    assert r.exit_code == 0, r.output  # so does --edge-cost
    assert json.loads((tmp_path / "e" / "aligner.json").read_text())["config"]["edge_cost"] == 3
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "f"), "--init", str(tmp_path / "e"), "--edge-cost", "5"])
    assert r.exit_code == 1 and "--edge-cost 5" in r.stderr  # it has 3 channels already
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "g"), "--init", str(tmp_path / "e"), "--edge-cost", "0"])
    assert r.exit_code == 1 and "--edge-cost 0 (it has 3)" in r.stderr  # not silently kept on
    # an error is the only line: the no-data note waits for training to start
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(tmp_path / "b"), *TINY, "--resume"])
    assert r.exit_code == 1 and "nothing to resume" in r.stderr and "note" not in r.output
    from modelmerge.deepalign import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_prepare", interrupted)
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "c")])
    assert r.exit_code == 130 and "nothing to resume" in r.stderr and "last checkpoint" not in r.stderr


def test_init_starts_from_an_existing_aligner(trained, tiny_zoo, tmp_path):
    out = tmp_path / "fine"
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits",
                            "--init", str(trained), *TINY])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "aligner.json").read_text())
    assert card["init"] == json.loads((trained / "aligner.json").read_text())["name"]


def test_add_layers_grows_init_close_to_its_answers(trained):
    from types import SimpleNamespace

    from conftest import check_equivariance, mlp

    from modelmerge.deepalign.train import _make_model
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import to_weight_space

    start, card = load_aligner(trained)
    a, b = mlp([30, 20, 12, 4], seed=3).state_dict(), mlp([30, 20, 12, 4], seed=4).state_dict()
    chain = infer_chain(a)
    part = SimpleNamespace(zoo=SimpleNamespace(chain=chain))
    grown, name = _make_model([part], None, trained, seed=0, add_layers=2)
    assert grown.config.layers == start.config.layers + 2 and name == f"{card['name']} + 2 encoder layers"
    assert grown.num_parameters() > start.num_parameters()
    wa, wb = to_weight_space(chain, a), to_weight_space(chain, b)
    old, new = start(wa, wb), grown(wa, wb)
    # the new layers start near the identity: the scores move by well under a percent of their range...
    for s, t in zip(old, new):
        assert (s - t).abs().max() < 0.01 * s.abs().max()
        assert not torch.equal(s, t)
    # ...yet every weight of them is trained from the first step
    sum(t.pow(2).sum() for t in new).backward()
    for layer in grown.layers[start.config.layers:]:
        for p in layer.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    assert check_equivariance(grown.double(), {k: v.double() for k, v in a.items()},
                              {k: v.double() for k, v in b.items()}, 0)


@pytest.mark.parametrize("init", ["trained", "deepalign-mlp-v4", "deepalign-cnn-v2"])
def test_edge_cost_over_init_starts_from_its_answers(init, trained):
    """--edge-cost on top of --init starts switched off (the same logits), yet its weight is trained."""
    from types import SimpleNamespace

    from conftest import VGGish, mlp

    from modelmerge.deepalign.model import AlignerConfig
    from modelmerge.deepalign.train import _make_model
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import to_weight_space

    start = load_aligner(trained if init == "trained" else init)[0]
    if start.config.family == "cnn":
        a, b = VGGish(seed=5).state_dict(), VGGish(seed=6).state_dict()
    else:
        a, b = mlp([30, 20, 12, 4], seed=5).state_dict(), mlp([30, 20, 12, 4], seed=6).state_dict()
    chain = infer_chain(a)
    part = SimpleNamespace(zoo=SimpleNamespace(chain=chain))
    grown, _ = _make_model([part], AlignerConfig(edge_cost=3), trained if init == "trained" else init, seed=0)
    assert grown.config.edge_cost == 3 and grown.config.layers == start.config.layers
    wa, wb = to_weight_space(chain, a), to_weight_space(chain, b)
    old, new = start(wa, wb), grown(wa, wb)
    for s, t in zip(old, new):
        assert torch.equal(s, t)
    sum(t.pow(2).sum() for t in new).backward()
    assert grown.unroll_edge.grad.abs().sum() > 0  # the switch gets a gradient from the first step


@pytest.mark.parametrize("init", ["trained", "deepalign-mlp-v1", "deepalign-mlp-v4", "deepalign-cnn-v2"])
def test_widen_keeps_the_answers_then_breaks_the_copies(init, trained):
    from conftest import VGGish, check_equivariance, mlp

    from modelmerge.deepalign.model import widen
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import to_weight_space

    model = load_aligner(trained if init == "trained" else init)[0].double()
    if model.config.family == "cnn":
        a, b = VGGish(seed=5).state_dict(), VGGish(seed=6).state_dict()
    else:
        a, b = mlp([30, 20, 12, 4], seed=5).state_dict(), mlp([30, 20, 12, 4], seed=6).state_dict()
    a, b = ({k: v.double() for k, v in s.items()} for s in (a, b))
    chain = infer_chain(a)
    wa, wb = to_weight_space(chain, a), to_weight_space(chain, b)
    old = model(wa, wb)
    exact = widen(model, 3, noise=0.0)
    assert exact.config.channels == 3 * model.config.channels
    assert exact.config.readout_hidden == 3 * model.config.readout_hidden
    for s, t in zip(old, exact(wa, wb)):  # duplication computes the same function, LayerNorms included
        torch.testing.assert_close(t, s, rtol=1e-9, atol=1e-9)
    noisy = widen(model, 2, seed=1)
    new = noisy(wa, wb)
    for s, t in zip(old, new):  # the noise that separates the copies moves the answers only slightly
        assert 0 < (s - t).abs().max() < 0.05 * s.abs().max()
    c = model.config.channels
    w = noisy.layers[0].lin["e"].weight
    assert not torch.equal(w[:c, :c], w[c:, c:])  # the copies differ, so their gradients will
    assert check_equivariance(noisy, a, b, 0)
    assert noisy.config == replace(model.config, channels=2 * c, readout_hidden=2 * model.config.readout_hidden)


def test_widen_refuses_what_it_cannot_copy():
    from modelmerge.deepalign.model import AlignerConfig, DeepAlign, widen
    from modelmerge.errors import ModelMergeError

    with pytest.raises(ModelMergeError, match="odd"):
        widen(DeepAlign(AlignerConfig(channels=4, readout_hidden=5)), 2)
    with pytest.raises(ModelMergeError, match="1 or more"):
        widen(DeepAlign(AlignerConfig(channels=4)), 0)


@pytest.mark.parametrize(("option", "value", "key", "factor", "named"),
                         [("--add-layers", "1", "layers", None, "+ 1 encoder layer"),
                          ("--widen", "2", "channels", 2, ", widened 2x")])
def test_growing_options_from_the_command_line(option, value, key, factor, named, trained, tiny_zoo, tmp_path):
    out = tmp_path / "grown"
    args = ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY, option, value]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "--init" in r.stderr and not out.exists()  # it grows an --init aligner
    r = runner.invoke(app, [*args, "--init", str(trained)])
    assert r.exit_code == 0, r.output
    card, start = (json.loads((f / "aligner.json").read_text()) for f in (out, trained))
    expected = start["config"][key] * factor if factor else start["config"][key] + int(value)
    assert card["config"][key] == expected and getattr(load_aligner(out)[0].config, key) == expected
    assert card["init"] == start["name"] + (" " if named.startswith("+") else "") + named
    # resuming it without the option that grew it: a one-line error, not a traceback
    r = runner.invoke(app, [*args[:-2], "--init", str(trained), "--resume"])
    assert r.exit_code == 1 and "another shape" in r.stderr and option in r.stderr


def test_resuming_an_edge_cost_run_needs_the_option_again(trained, tiny_zoo, tmp_path):
    out = tmp_path / "edge"
    args = ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY, "--init", str(trained)]
    r = runner.invoke(app, [*args, "--edge-cost", "3"])
    assert r.exit_code == 0, r.output
    assert load_aligner(out)[0].config.edge_cost == 3
    r = runner.invoke(app, [*args, "--resume"])  # without the option that grew it: its shape differs
    assert r.exit_code == 1 and "another shape" in r.stderr and "--edge-cost" in r.stderr


def test_without_data_trains_on_l2_and_says_so(tiny_zoo, tmp_path):
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(tmp_path / "al"), *TINY])
    assert r.exit_code == 0, r.output
    assert "no LMC loss" in r.output
    assert json.loads((tmp_path / "al" / "aligner.json").read_text())["validation"]["metric"] == "l2"


def test_mixed_zoo_is_refused(tiny_zoo, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_zoo, mixed)
    ck = load_checkpoint(mixed / "model_00000.safetensors")
    from modelmerge.checkpoint import save_checkpoint

    state = dict(ck.state)
    state["0.weight"], state["0.bias"] = torch.zeros(17, 64), torch.zeros(17)
    state["2.weight"] = torch.zeros(16, 17)
    save_checkpoint(state, mixed / "model_00000.safetensors", ck.metadata, force=True)
    r = runner.invoke(app, ["train-aligner", "--zoo", str(mixed), "-o", str(tmp_path / "al"), *TINY])
    assert r.exit_code == 1 and "mixes architectures" in r.stderr


def test_output_that_is_a_file(tiny_zoo, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(f), "--data", "digits", *TINY])
    assert r.exit_code == 1 and "is a file" in r.stderr and f.read_text() == "x"


def test_not_a_zoo(tmp_path):
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tmp_path), "-o", str(tmp_path / "al")])
    assert r.exit_code == 1 and "not a zoo" in r.stderr


@pytest.mark.parametrize("refine", ["none", "wm", "lmc"])
def test_align_with_a_trained_aligner(trained, tiny_zoo, tmp_path, refine):
    a, b = tiny_zoo / "model_00000.safetensors", tiny_zoo / "model_00001.safetensors"
    args = ["align", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "--method", "deep-align",
            "--aligner", str(trained), "--refine", refine, "--json"]
    if refine == "lmc":
        args += ["--data", "digits"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["method"] == {"none": "deep-align", "wm": "deep-align+wm", "lmc": "deep-align+lmc"}[refine]
    assert "learned" in report["seconds"] and report["verified"]["forward"] == "record"
    if refine != "none":
        assert "refine" in report["seconds"]


def test_auto_with_data_reports_candidates(trained, tiny_zoo, tmp_path):
    a, b = tiny_zoo / "model_00002.safetensors", tiny_zoo / "model_00003.safetensors"
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "--aligner",
                            str(trained), "--data", "digits", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    scores = report["candidates"]
    unrefined = {"deep-align", "weight-matching", "activation-matching"}
    refined = set(scores) - unrefined
    assert unrefined < set(scores) and len(refined) == 1
    # the refinement starts from the best unrefined merge
    assert refined == {min(unrefined, key=scores.get) + "+lmc"}
    assert report["method"] == min(scores, key=scores.get)


def test_deep_align_refuses_out_of_family(trained, tmp_path, save_sd):
    from conftest import VGGish

    a = save_sd(VGGish(seed=0).state_dict(), "a.safetensors")
    b = save_sd(VGGish(seed=1).state_dict(), "b.safetensors")
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "--method",
                            "deep-align", "--aligner", str(trained)])
    assert r.exit_code == 1 and "MLP" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_auto_with_an_aligner_path_falls_back_out_of_family(trained, tmp_path, save_sd):
    from conftest import VGGish

    a = save_sd(VGGish(seed=0).state_dict(), "a.safetensors")
    b = save_sd(VGGish(seed=1).state_dict(), "b.safetensors")
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "--aligner",
                            str(trained), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["method"] == "weight-matching" and any("reads MLP" in n for n in report["notes"])


def test_auto_with_data_honours_refine(trained, tiny_zoo, tmp_path):
    """--refine under auto --data changes the candidates instead of being dropped."""
    a, b = tiny_zoo / "model_00002.safetensors", tiny_zoo / "model_00003.safetensors"
    expect = {"wm": {"deep-align", "weight-matching", "activation-matching", "deep-align+wm"},
              "none": {"deep-align", "weight-matching", "activation-matching"}}
    for refine, names in expect.items():
        r = runner.invoke(app, ["align", str(a), str(b), "-o", str(tmp_path / f"{refine}.safetensors"), "--aligner",
                                str(trained), "--data", "digits", "--refine", refine, "--json"])
        assert r.exit_code == 0, r.output
        assert set(json.loads(r.stdout)["candidates"]) == names


def test_learned_answer_reports_no_iterations(trained, tiny_zoo, tmp_path):
    a, b = tiny_zoo / "model_00000.safetensors", tiny_zoo / "model_00001.safetensors"
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "--aligner",
                            str(trained), "--json"])
    report = json.loads(r.stdout)
    assert report["method"] == "deep-align" and report["iterations"] is None and report["converged"] is None


@pytest.mark.parametrize("extra, needle", [
    (["--method", "weight-matching", "--data", "digits"], "--data does nothing"),
    (["--method", "deep-align", "--aligner", "TRAINED", "--data", "digits"], "--data does nothing"),
    (["--method", "weight-matching", "--refine", "wm"], "its own answer"),
    (["--method", "weight-matching", "--aligner", "TRAINED"], "--aligner is read by"),
    (["--aligner", "TRAINED", "--refine", "lmc"], "needs --data"),
])
def test_option_combinations_that_would_do_nothing_are_refused(trained, tiny_zoo, tmp_path, extra, needle):
    a, b = tiny_zoo / "model_00000.safetensors", tiny_zoo / "model_00001.safetensors"
    out = tmp_path / "o.safetensors"
    extra = [str(trained) if x == "TRAINED" else x for x in extra]
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(out), *extra])
    assert r.exit_code == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_weight_matching_with_lmc_refinement(tiny_zoo, tmp_path):
    a, b = tiny_zoo / "model_00000.safetensors", tiny_zoo / "model_00001.safetensors"
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "--method",
                            "weight-matching", "--refine", "lmc", "--data", "digits", "--refine-steps", "3",
                            "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["method"] == "weight-matching+lmc" and report["iterations"] == 3
    assert {"weight_matching", "refine"} <= set(report["seconds"])


def test_torchrun_two_processes(tiny_zoo, tmp_path):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "modelmerge", "train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((out / "aligner.json").read_text())
    assert card["family"] == "mlp" and (out / "aligner.safetensors").is_file()


def test_aligner_outside_its_trained_depths_says_so(trained, tmp_path, save_sd):
    from conftest import mlp

    a = save_sd(mlp([64, 16, 16, 16, 10], seed=0).state_dict(), "a.safetensors")
    b = save_sd(mlp([64, 16, 16, 16, 10], seed=1).state_dict(), "b.safetensors")
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "--method", "deep-align",
                            "--aligner", str(trained), "--json"])
    assert r.exit_code == 0, r.output
    notes = json.loads(r.stdout)["notes"]
    assert any("trained on 3-layer networks, not 4" in n for n in notes), notes


def test_v2_shape_onecycle_and_validation_every_step(tiny_zoo, tmp_path):
    out = tmp_path / "v2"
    args = ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY,
            "--readout-hidden", "16", "--output-dims", "4", "--schedule", "onecycle", "--val-every", "1",
            "--random-probes"]
    args[args.index("--epochs") + 1] = "2"
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    card = json.loads((out / "aligner.json").read_text())
    assert card["config"]["readout_hidden"] == 16 and card["config"]["output_dims"] == 4
    assert card["settings"]["schedule"] == "onecycle" and card["settings"]["random_probes"] is True
    assert [h["step"] for h in card["history"]] == list(range(1, card["steps_run"] + 1))
    assert card["steps"] == card["validation"]["step"] <= card["steps_run"]  # the best step's weights
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["scheduler"]["last_epoch"] == card["steps_run"]  # the schedule advanced once per step
    model, _ = load_aligner(out)
    assert model.output_scale is not None and model.num_parameters() == card["parameters"]


def test_max_minutes_stops_early_and_keeps_a_validated_aligner(tiny_zoo, tmp_path):
    out = tmp_path / "short"
    args = ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY,
            "--max-minutes", "0.000001"]
    args[args.index("--epochs") + 1] = "5"
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    card = json.loads((out / "aligner.json").read_text())
    assert card["steps_run"] == 1 and card["history"][-1]["step"] == 1 and card["validation"]["barrier"] is not None


def test_unknown_schedule_is_one_line(tiny_zoo, tmp_path):
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(tmp_path / "x"), "--data", "digits",
                            *TINY, "--schedule", "cosine"])
    assert r.exit_code == 1 and "unknown --schedule 'cosine'" in r.stderr and not (tmp_path / "x").exists()


def test_batchnorm_zoos_train_and_evaluate_with_gradients_everywhere():
    """Eval-mode BatchNorm takes running statistics that carry gradients (softly permuted ones); the LMC
    loss of a BN merge runs BatchNorm on the batch's statistics, as after a reset."""
    from modelmerge.archs import build
    from modelmerge.deepalign.losses import lmc_loss
    from modelmerge.stacked import stacked_forward

    rec = {"family": "cnn", "input_shape": [1, 8, 8], "channels": [4, 6], "hidden": [], "batchnorm": True,
           "num_classes": 10}
    states = [build(rec, seed=s).state_dict() for s in (1, 2)]
    a = {k: torch.stack([states[0][k]]) for k in states[0]}
    b = {k: torch.stack([states[1][k]]).float().requires_grad_(True) if states[1][k].is_floating_point()
         else torch.stack([states[1][k]]) for k in states[1]}
    x, y = torch.randn(1, 5, 1, 8, 8), torch.randint(10, (1, 5))
    stacked_forward(rec, b, x).sum().backward()
    assert b["1.running_var"].grad is not None and torch.isfinite(b["1.running_var"].grad).all()
    loss = lmc_loss(rec, a, b, x, y, torch.tensor([0.5]))
    merged = {k: 0.5 * a[k] + 0.5 * b[k] if a[k].is_floating_point() else a[k] for k in a}
    reset = torch.nn.functional.cross_entropy(stacked_forward(rec, merged, x, train=True)[0], y[0])
    torch.testing.assert_close(loss, reset)
    loss.backward()
    assert torch.isfinite(b["1.weight"].grad).all()


def test_relative_loss_selects_by_ratio_to_weight_matching(tiny_zoo, tmp_path):
    out = tmp_path / "rel"
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY,
                            "--relative-loss"])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "aligner.json").read_text())
    val = card["validation"]
    assert val["metric"] == "barrier_ratio" and card["settings"]["relative"] is True
    assert val["barrier_ratio"] == pytest.approx(val["barrier"] / val["weight_matching_barrier"])  # one zoo


def test_refined_targets_are_training_pairs_no_worse_than_weight_matching(tiny_zoo):
    """Distillation targets: pairs of training networks only, valid permutations, and a merge
    loss (the selection loss) no worse than weight matching's, since the refinement keeps its start."""
    from modelmerge.deepalign.distill import refined_targets
    from modelmerge.deepalign.train import TrainSettings, _prepare
    from modelmerge.matching import weight_matching
    from modelmerge.methods.lmc import score
    from modelmerge.network import resolve_network

    part = _prepare([tiny_zoo], "digits", TrainSettings(val_fraction=0.25), rank=1)[0]
    t = refined_targets(part.zoo, part.train_idx, part.dataset, pairs=3, seed=0)
    assert t.pairs.shape == (3, 2) and all(int(i) in part.train_idx for i in t.pairs.flatten())
    assert all((p.sort(dim=1).values == torch.arange(16)).all() for p in t.perms)  # permutations of 16 units
    groups = [part.zoo.chain.group(l) for l in range(2)]
    for n, (i, j) in enumerate(t.pairs.tolist()):
        a, b = part.zoo.take(torch.tensor(i)), part.zoo.take(torch.tensor(j))
        net = resolve_network(a, record=part.zoo.record)
        data = net.shape_data(part.dataset)
        wm = weight_matching(a, b, part.zoo.spec, seed=n)[0]
        refined = {g: t.perms[l][n] for l, g in enumerate(groups)}
        assert score(net, a, b, refined, data) <= score(net, a, b, wm, data) + 1e-6


def test_distill_trains_with_the_targets_and_reuses_them_on_resume(tiny_zoo, tmp_path):
    out = tmp_path / "dist"
    args = ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY, "--batch-size", "4",
            "--distill", "1", "--distill-pairs", "2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "distill" in r.output and (out / "distill.pt").is_file()
    assert json.loads((out / "aligner.json").read_text())["settings"]["distill"] == 1.0
    stamp = (out / "distill.pt").stat().st_mtime_ns
    r = runner.invoke(app, [*args, "--resume", "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert (out / "distill.pt").stat().st_mtime_ns == stamp  # read back, not recomputed
    (out / "distill.pt").write_bytes(b"truncated")  # a damaged cache is recomputed, not a traceback
    r = runner.invoke(app, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert "unreadable" in r.stderr and (out / "distill.pt").stat().st_size > 100
    r = runner.invoke(app, ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(tmp_path / "nodata"), *TINY,
                            "--distill", "1"])
    assert r.exit_code == 1 and "--data" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_interrupted_run_leaves_an_aligner_whose_card_says_how_far_it_got(tiny_zoo, tmp_path, monkeypatch):
    from modelmerge.deepalign import train

    real, calls = train._Run._one_step, []

    def stop_at_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train._Run, "_one_step", stop_at_the_third)
    out = tmp_path / "al"
    args = ["train-aligner", "--zoo", str(tiny_zoo), "-o", str(out), "--data", "digits", *TINY]
    args[args.index("--epochs") + 1] = "3"
    r = runner.invoke(app, args)
    assert r.exit_code == 130 and "resume with --resume" in r.stderr
    card = json.loads((out / "aligner.json").read_text())
    assert card["steps_run"] == 2 and (out / "last.pt").is_file()  # steps_run was missing before
