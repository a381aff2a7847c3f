"""LMC refinement (straight-through weight matching) and `auto --data` outside every family."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from modelmerge.checkpoint import load_checkpoint
from modelmerge.cli.app import app
from modelmerge.data import load_dataset
from modelmerge.methods.lmc import refine_lmc, selection_batch
from modelmerge.network import resolve_network
from modelmerge.permutation import apply_permutation, check_permutation, identity_permutation

runner = CliRunner()


def _independent_merged_loss(a, b, spec, perm, x, y):
    """The α = 0.5 merge's loss through a hand-built nn.Sequential (not the code under test)."""
    aligned = apply_permutation(b, spec, perm)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10))
    model.load_state_dict({k: 0.5 * a[k] + 0.5 * aligned[k] for k in a})
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x.flatten(1)), y))


def test_refinement_lowers_the_merged_loss_from_an_unaligned_start(tiny_zoo):
    a = load_checkpoint(tiny_zoo / "model_00000.safetensors").state
    b = load_checkpoint(tiny_zoo / "model_00001.safetensors").state
    record = {"family": "mlp", "widths": [64, 16, 16, 10], "activation": "relu"}
    network = resolve_network(a, record=record)
    data = network.shape_data(load_dataset("digits"))
    assert data.x_train.shape[1:] == (64,)
    spec = network.spec
    start = identity_permutation(spec)
    perm, loss = refine_lmc(a, b, network, data, start, steps=30, seed=0)
    check_permutation(spec, perm)
    x, y = selection_batch(data)
    before = _independent_merged_loss(a, b, spec, start, x, y)
    # the reported loss is the answer's, as an independent forward computes it
    assert abs(loss - _independent_merged_loss(a, b, spec, perm, x, y)) < 1e-4
    assert loss < before - 0.05
    # started from its own answer, it never gets worse
    _, again = refine_lmc(a, b, network, data, perm, steps=10, seed=1)
    assert again <= loss + 1e-6


def test_bare_bias_free_mlp_runs_on_data_like_its_module():
    """A bare Linear chain without biases is run as a ReLU MLP, exactly as nn.Sequential would."""
    from conftest import mlp

    module = mlp([64, 12, 10], seed=3)
    module[0].bias = None
    module[2].bias = None
    state = module.state_dict()
    network = resolve_network(state)
    assert network.forward_kind == "chain" and network.runs_on_data
    x = torch.randn(7, 64)
    torch.testing.assert_close(network.forward(state, x), module(x))


def test_auto_with_data_outside_every_family_refines_weight_matching(tmp_path, save_sd):
    from conftest import mlp

    # seven Linear layers: no bundled aligner covers that depth
    widths = [64, 24, 24, 24, 24, 24, 24, 10]
    a = save_sd(mlp(widths, seed=0).state_dict(), "a.safetensors")
    b = save_sd(mlp(widths, seed=1).state_dict(), "b.safetensors")
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(out), "--data", "digits", "--refine-steps", "7",
                            "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(report["candidates"]) == {"weight-matching", "activation-matching", "weight-matching+lmc"}
    assert report["method"] == min(report["candidates"], key=report["candidates"].get)
    assert any("no bundled aligner" in n for n in report["notes"]) and out.is_file()
    assert "LMC refinement: 7/7" in r.stderr  # progress (plain lines when not a terminal)


def test_class_count_of_a_dataset_with_an_empty_split():
    from modelmerge.data import Dataset

    d = Dataset("tiny", torch.zeros(2, 3), torch.tensor([0, 4]), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert d.num_classes == 5


def test_batchnorm_candidates_are_scored_after_a_reset(tmp_path):
    """auto --data ranks BN merges as --reset-bn would use them: statistics recomputed on the scoring examples."""
    import copy

    import numpy as np
    from conftest import VGGish

    from modelmerge.data import from_file
    from modelmerge.methods.lmc import score

    a, b = VGGish(seed=0).state_dict(), VGGish(seed=1).state_dict()
    network = resolve_network(a, module=VGGish(seed=0), input_shape=(1, 8, 8))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype("float32"),
             y=np.arange(40) % 4)
    data = network.shape_data(from_file(tmp_path / "d.npz"))
    perm = identity_permutation(network.spec)
    by_hand = copy.deepcopy(VGGish(seed=0))
    by_hand.load_state_dict({k: 0.5 * a[k] + 0.5 * b[k] if a[k].is_floating_point() else a[k] for k in a})
    for m in by_hand.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    x, y = selection_batch(data)
    with torch.no_grad():
        by_hand.train()(x)  # one batch: the statistics of exactly these examples
        expected = float(torch.nn.functional.cross_entropy(by_hand.eval()(x), y))
    assert abs(score(network, a, b, perm, data) - expected) < 1e-5


def _bn_network():
    """A VGG-style BatchNorm model run through its own module (as with --model)."""
    from conftest import VGGish

    module = VGGish(seed=4).eval()
    return module, resolve_network(module.state_dict(), module=module)


def test_batch_statistics_forward_matches_a_batchnorm_reset_and_leaves_the_module_alone():
    module, network = _bn_network()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = network.forward(state, x, batch_stats=True)
    reset = network.reset_bn(state, x)  # running statistics recomputed on x, then eval mode
    expected = network.forward(reset, x)
    # equal up to the unbiased variance the reset stores (n / (n - 1) with n = 64 x positions)
    assert torch.allclose(out, expected, atol=2e-3, rtol=1e-3)
    assert not torch.allclose(out, network.forward(state, x), atol=1e-2)  # the running statistics differ
    assert not any(m.training for m in module.modules())  # modes restored
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())  # nothing updated in place


def test_batch_statistics_forward_of_a_record_network_matches_its_module():
    from modelmerge.archs import build

    record = {"family": "cnn", "input_shape": [1, 8, 8], "channels": [6, 8], "hidden": [12], "batchnorm": True,
              "kernel": 3, "num_classes": 4, "activation": "relu"}
    module = build(record, seed=2)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    state = module.state_dict()
    network = resolve_network(state, record=record)
    assert network.forward_kind == "record"
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = module.train()(x)  # the record's own module on batch statistics
    module.eval()
    assert torch.allclose(network.forward(state, x, batch_stats=True), expected, atol=1e-5)
