"""Activation matching: planted permutations recovered through every kind of forward, function kept."""

from __future__ import annotations

import pytest
import torch
from archs import ResidualMLP
from conftest import VGGish, mlp
from typer.testing import CliRunner

from modelmerge.alignment import align
from modelmerge.cli.app import app
from modelmerge.network import resolve_network
from modelmerge.permutation import apply_permutation, random_permutation

runner = CliRunner()


def _planted(state, network, seed=0):
    """B = A with every group shuffled; the answer must undo exactly that."""
    perm = random_permutation(network.spec, torch.Generator().manual_seed(seed))
    return apply_permutation(state, network.spec, perm)


@pytest.mark.parametrize("kind", ["record-mlp", "record-cnn-bn", "bare-chain", "model-residual", "model-vgg"])
def test_recovers_a_planted_permutation(kind, tmp_path):
    if kind == "record-mlp":
        from modelmerge.archs import build

        record = {"family": "mlp", "widths": [64, 24, 16, 10], "activation": "relu"}
        a, kw = build(record, seed=1).state_dict(), {"record": record}
    elif kind == "record-cnn-bn":
        from modelmerge.archs import build

        record = {"family": "cnn", "input_shape": [1, 8, 8], "channels": [6, 8], "hidden": [12], "batchnorm": True,
                  "num_classes": 10}
        model = build(record, seed=2)
        with torch.no_grad():  # BatchNorm with real statistics, so that its outputs differ from the conv's
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
        a, kw = model.state_dict(), {"record": record}
    elif kind == "bare-chain":
        a, kw = mlp([64, 20, 12, 10], seed=3).state_dict(), {}
    elif kind == "model-residual":
        module = ResidualMLP()
        a, kw = module.state_dict(), {"module": module}
    else:
        module = VGGish(seed=4)
        a, kw = module.state_dict(), {"module": module, "input_shape": (1, 8, 8)}
    network = resolve_network(a, **kw)
    b = _planted(a, network)
    data = tmp_path / "d.npz"
    import numpy as np

    shape = network.input_shape
    np.savez(data, x=np.random.default_rng(0).standard_normal((300, *shape)).astype("float32"),
             y=np.arange(300) % 4)
    r = align(a, b, method="activation-matching", data=str(data), **kw)
    assert r.method == "activation-matching" and r.verification.forward is not None  # B's function kept
    for k in a:
        torch.testing.assert_close(r.aligned[k], a[k], msg=k)  # exactly A again: every group recovered


def test_needs_data_and_says_so_in_one_line(tmp_path, save_sd):
    a = save_sd(mlp([64, 8, 10], seed=0).state_dict(), "a.safetensors")
    b = save_sd(mlp([64, 8, 10], seed=1).state_dict(), "b.safetensors")
    out = tmp_path / "out.safetensors"
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(out), "--method", "activation-matching"])
    assert r.exit_code == 1 and "--method activation-matching needs --data" in r.stderr and not out.exists()
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(out), "--method", "activation-matching",
                            "--data", "digits", "--json"])
    assert r.exit_code == 0, r.output
    assert out.exists()


def test_a_loaded_dataset_serves_like_its_name():
    """merge hands align() the Dataset it loaded once; the answer is the same as from the name."""
    from modelmerge.data import load_dataset

    a, b = mlp([64, 12, 10], seed=0).state_dict(), mlp([64, 12, 10], seed=1).state_dict()
    by_name = align(a, b, method="activation-matching", data="digits")
    by_object = align(a, b, method="activation-matching", data=load_dataset("digits"))
    assert all(torch.equal(by_name.perm[g], by_object.perm[g]) for g in by_name.perm)
