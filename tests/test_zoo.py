"""Architecture records, datasets, vectorised zoo training and the zoo folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelmerge.archs import ArchError, build, load_strict, record_from_json, record_to_json
from modelmerge.checkpoint import load_checkpoint
from modelmerge.cli.app import app
from modelmerge.data import digits, from_file, load_dataset
from modelmerge.errors import DataError, ModelMergeError
from modelmerge.network import resolve_network
from modelmerge.spec import infer_spec
from modelmerge.zoo.train import TrainConfig, train_models

MLP = {"family": "mlp", "widths": [64, 16, 16, 10], "activation": "relu"}
CNN = {"family": "cnn", "input_shape": [1, 8, 8], "channels": [4, 6], "hidden": [12], "batchnorm": True,
       "num_classes": 10}
runner = CliRunner()


@pytest.mark.parametrize("record", [MLP, CNN, {**CNN, "input_shape": [1, 40], "activation": "gelu"},
                                    {**CNN, "pool": False, "batchnorm": False}])
def test_record_round_trip_and_builder_matches_checkpoint(record, tmp_path, save_sd):
    again = record_from_json(record_to_json(record))
    assert record_from_json(record_to_json(again)) == again
    model = build(again, seed=3).eval()
    path = save_sd(model.state_dict(), "m.safetensors", {"modelmerge.arch": record_to_json(record)})
    ck = load_checkpoint(path)
    network = resolve_network(ck.state, record=ck.arch)  # the record checked on the meta device, then built
    assert network.forward_kind == "record"
    x = torch.randn(4, *([64] if record["family"] == "mlp" else record["input_shape"]))
    with torch.no_grad():
        torch.testing.assert_close(network.forward(ck.state, x), model(x))
        torch.testing.assert_close(network.module(x), model(x))
    infer_spec(ck.state)  # every built-in architecture is an inferable chain


@pytest.mark.parametrize(
    "record, match",
    [({"family": "rnn"}, "unknown architecture family"), ({**MLP, "widths": [3]}, "widths"),
     ({**MLP, "activation": "swishy"}, "unknown activation"), ({**CNN, "num_classes": 0}, "num_classes"),
     ({**CNN, "pool": "no"}, "true or false")],
)
def test_bad_records(record, match):
    with pytest.raises(ArchError, match=match):
        build(record)


def test_record_that_does_not_fit_names_keys():
    with pytest.raises(ArchError, match="wrong shape: 0.weight"):
        load_strict(build(MLP), build({**MLP, "widths": [64, 17, 16, 10]}).state_dict(), "its record")


def test_bundled_digits_are_scikit_learns():
    sklearn = pytest.importorskip("sklearn.datasets")
    ref = sklearn.load_digits()
    d = digits()
    x = torch.cat([d.x_train, d.x_test])
    assert len(x) == len(ref.images) and d.x_train.shape[1:] == (1, 8, 8)
    # same images and labels, as a set of (image, label) rows (the split shuffles them)
    ours = sorted(zip((x * 16).round().long().reshape(len(x), -1).tolist(), torch.cat([d.y_train, d.y_test]).tolist()))
    theirs = sorted(zip(ref.images.astype(int).reshape(len(x), -1).tolist(), ref.target.tolist()))
    assert ours == theirs


def test_digits_split_is_fixed():
    d1, d2 = digits(), digits()
    assert d1.x_train.shape == (1438, 1, 8, 8) and d1.x_test.shape == (359, 1, 8, 8)
    assert torch.equal(d1.y_test, d2.y_test) and float(d1.x_train.max()) <= 1.0


def test_stacked_forward_matches_the_built_cnn_without_pooling():
    from modelmerge.stacked import stacked_forward

    record = {**CNN, "pool": False}
    models = [build(record, seed=s).eval() for s in (1, 2)]
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in models[0])
    params = {k: torch.stack([m.state_dict()[k] for m in models]) for k in models[0].state_dict()}
    x = torch.randn(2, 5, 1, 8, 8)
    with torch.no_grad():
        out = stacked_forward(record, params, x)
        torch.testing.assert_close(out, torch.stack([m(xi) for m, xi in zip(models, x)]))


def test_teacher_task_is_synthetic_fixed_and_learnable():
    d1, d2 = load_dataset("teacher"), load_dataset("teacher")
    assert d1.x_train.shape == (4000, 32) and d1.num_classes == 10 and torch.equal(d1.y_test, d2.y_test)
    assert torch.bincount(d1.y_train).min() > 100  # every class present in quantity
    # a linear probe beats chance by far: the labels are a function of the inputs
    w = torch.linalg.lstsq(d1.x_train, torch.nn.functional.one_hot(d1.y_train).float()).solution
    assert (d1.x_test @ w).argmax(1).eq(d1.y_test).float().mean() > 0.3


def test_mnist1d_is_generated_locally():
    d = load_dataset("mnist1d")
    assert d.x_train.shape == (4000, 1, 40) and d.num_classes == 10


def test_user_data_files(tmp_path):
    x, y = np.random.rand(50, 3).astype("float32"), np.arange(50) % 4
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    d = from_file(tmp_path / "ok.npz")
    assert len(d.x_train) + len(d.x_test) == 50 and d.num_classes == 4
    np.savez(tmp_path / "nolabels.npz", x=x)
    with pytest.raises(DataError, match="lacks array"):
        from_file(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "shape.npz", x=x, y=y[:10])
    with pytest.raises(DataError, match="must be"):
        from_file(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read"):
        from_file(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def test_vectorised_training_equals_one_model_at_a_time():
    """Batching over models must not couple them: model k trains the same alone or in a batch."""
    d = digits()
    cfg = TrainConfig(epochs=1, batch_size=128)
    together = train_models(MLP, d, [5, 6, 7], cfg)
    alone = train_models(MLP, d, [6], cfg)[0]
    for k in alone.state:
        torch.testing.assert_close(together[1].state[k], alone.state[k], rtol=1e-4, atol=1e-5)


def test_training_learns_and_resets_batchnorm():
    d = digits()
    (m,) = train_models(CNN, d, [0], TrainConfig(epochs=3, lr=1e-2))
    assert m.test_acc > 0.7
    assert float(m.state["1.running_var"].sub(1).abs().max()) > 1e-3  # statistics were recomputed


def test_zoo_command_writes_index_resumes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "zoo"
    args = ["zoo", "--widths", "64,8,10", "-n", "3", "-o", str(out), "--epochs", "1", "--chunk", "2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    index = json.loads((out / "zoo.json").read_text())
    assert [m["seed"] for m in index["models"]] == [0, 1, 2]
    ck = load_checkpoint(out / index["models"][0]["file"])
    assert ck.arch["widths"] == [64, 8, 10] and ck.metadata["modelmerge.seed"] == "0"
    assert 0.0 <= float(ck.metadata["modelmerge.test_acc"]) <= 1.0
    stamp = (out / "model_00001.safetensors").stat().st_mtime_ns
    (out / "model_00002.safetensors").unlink()
    r = runner.invoke(app, args[:4] + ["4"] + args[5:])  # one missing, one new
    assert r.exit_code == 0, r.output
    assert (out / "model_00001.safetensors").stat().st_mtime_ns == stamp  # skipped, not retrained
    assert len(json.loads((out / "zoo.json").read_text())["models"]) == 4
    r = runner.invoke(app, ["zoo", "--widths", "64,9,10", "-n", "1", "-o", str(out), "--epochs", "1"])
    assert r.exit_code == 1 and "other settings" in r.stderr
    # a listed model cut short since is trained again, with a warning (a rerun reported the zoo
    # complete over it before; found by a black-box sweep)
    (out / "model_00001.safetensors").write_bytes((out / "model_00001.safetensors").read_bytes()[:100])
    r = runner.invoke(app, args[:4] + ["4"] + args[5:])
    assert r.exit_code == 0 and "training it again (seed 1)" in r.stderr, r.output
    assert load_checkpoint(out / "model_00001.safetensors").arch["widths"] == [64, 8, 10]
    r = runner.invoke(app, args)  # fewer than the zoo holds: said, not silently
    assert r.exit_code == 0 and "holds 4 models, more than -n 3" in r.stderr
    # a damaged model beyond this run's -n is left listed (and said nothing of); the next full run retrains it
    (out / "model_00003.safetensors").write_bytes(b"cut")
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "again" not in r.stderr
    r = runner.invoke(app, args[:4] + ["4"] + args[5:])
    assert r.exit_code == 0 and "training it again (seed 3)" in r.stderr, r.output


def test_an_interrupted_zoo_says_how_many_models_it_wrote(tmp_path, monkeypatch):
    from modelmerge.zoo import store

    real, calls = store.train_models, []

    def stop_at_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "train_models", stop_at_the_second_chunk)
    out = tmp_path / "zoo"
    r = runner.invoke(app, ["zoo", "--widths", "64,8,10", "-n", "4", "--chunk", "2", "--epochs", "1", "-o", str(out)])
    assert r.exit_code == 130 and "interrupted; 2 of 4 models are in" in r.stderr and "rerun" in r.stderr
    calls.clear()
    monkeypatch.setattr(store, "train_models", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    r = runner.invoke(app, ["zoo", "--widths", "64,8,10", "-n", "4", "-o", str(tmp_path / "new")])
    assert r.exit_code == 130 and "0 of 4" in r.stderr and not (tmp_path / "new").exists()  # no empty folder


@pytest.mark.parametrize(
    "args, match",
    [(["--widths", "64,x,10"], "comma-separated"), (["--widths", "32,8,10"], "expects"),
     (["--arch", "rnn"], "unknown --arch"), (["--dataset", "nope"], "unknown dataset"),
     (["--widths", "64,8,10", "--channels", "4", "--no-pool"], "--channels, --no-pool describe CNNs"),
     (["--arch", "cnn", "--widths", "64,8,10"], "--widths describes MLPs"),
     (["--seed", "4294967295", "-n", "2"], "use a --seed of at most 4294967294")],
)
def test_zoo_command_bad_options(tmp_path, args, match):
    r = runner.invoke(app, ["zoo", "-n", "1", "-o", str(tmp_path / "z"), "--epochs", "1", *args])
    assert r.exit_code == 1 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "z").exists()  # a failed first run leaves no empty folder


def test_load_zoo_errors(tmp_path):
    from modelmerge.zoo.store import read_index

    with pytest.raises(ModelMergeError, match="not a zoo"):
        read_index(tmp_path)
