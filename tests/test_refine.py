"""LMC refinement (straight-through weight matching) and `auto --data` outside every family."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from modelmerge.checkpoint import load_checkpoint
from modelmerge.cli.app import app
from modelmerge.deepalign.refine import refine_lmc, selection_batch, task_data, task_forward
from modelmerge.permutation import apply_permutation, check_permutation, identity_permutation
from modelmerge.spec import infer_chain
from modelmerge.zoo.data import load_dataset
from modelmerge.zoo.stacked import stacked_forward

runner = CliRunner()


def _merged_loss(a, b, spec, perm, record, data):
    x, y = selection_batch(data)
    aligned = apply_permutation(b, spec, perm)
    merged = {k: (0.5 * (a[k] + aligned[k]))[None] for k in a}
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(stacked_forward(record, merged, x[None])[0], y))


def test_refinement_lowers_the_merged_loss_from_an_unaligned_start(tiny_zoo):
    a = load_checkpoint(tiny_zoo / "model_00000.safetensors").state
    b = load_checkpoint(tiny_zoo / "model_00001.safetensors").state
    record = {"family": "mlp", "widths": [64, 16, 16, 10], "activation": "relu"}
    chain = infer_chain(a)
    spec = chain.spec(a)
    forward = task_forward(chain, a, record)
    data = task_data(load_dataset("digits"), forward, a)
    assert data.x_train.shape[1:] == (64,)
    start = identity_permutation(spec)
    perm, info = refine_lmc(a, b, spec, forward, data, start, steps=30, seed=0)
    check_permutation(spec, perm)
    # the reported losses are those of the start and of the answer, on the selection batch
    assert abs(info.loss_before - _merged_loss(a, b, spec, start, record, data)) < 1e-4
    assert abs(info.loss_after - _merged_loss(a, b, spec, perm, record, data)) < 1e-4
    assert info.loss_after < info.loss_before - 0.05
    # started from its own answer, it never gets worse
    again, info2 = refine_lmc(a, b, spec, forward, data, perm, steps=10, seed=1)
    assert info2.loss_after <= info2.loss_before + 1e-6


def test_auto_with_data_outside_every_family_refines_weight_matching(tmp_path, save_sd):
    from conftest import mlp

    # five Linear layers: no bundled aligner covers that depth
    a = save_sd(mlp([64, 24, 24, 24, 24, 10], seed=0).state_dict(), "a.safetensors")
    b = save_sd(mlp([64, 24, 24, 24, 24, 10], seed=1).state_dict(), "b.safetensors")
    out = tmp_path / "o.safetensors"
    r = runner.invoke(app, ["align", str(a), str(b), "-o", str(out), "--data", "digits", "--refine-steps", "7",
                            "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(report["candidates"]) == {"weight-matching", "weight-matching+lmc"}
    assert report["method"] == min(report["candidates"], key=report["candidates"].get)
    assert any("no bundled aligner" in n for n in report["notes"]) and out.is_file()
    assert "LMC refinement: 7/7" in r.stderr  # progress (plain lines when not a terminal)


def test_class_count_of_a_dataset_with_an_empty_split():
    from modelmerge.zoo.data import Dataset

    d = Dataset("tiny", torch.zeros(2, 3), torch.tensor([0, 4]), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert d.num_classes == 5
