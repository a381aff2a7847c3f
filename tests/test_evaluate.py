"""Barrier definitions, the evaluate command, and the demo on the bundled examples."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from modelmerge.cli.app import app
from modelmerge.evaluate import barrier_auc, loss_barrier
from modelmerge.examples import example_paths

runner = CliRunner()


def test_barrier_and_auc_definitions():
    alphas = [0.0, 0.5, 1.0]
    assert loss_barrier(alphas, [1.0, 2.0, 3.0]) == 0.0  # on the line
    assert loss_barrier(alphas, [1.0, 3.0, 1.0]) == pytest.approx(2.0)
    assert barrier_auc(alphas, [1.0, 3.0, 1.0]) == pytest.approx(1.0)  # triangle of height 2


def test_evaluate_model_with_itself_has_zero_barrier():
    a, _ = example_paths()
    r = runner.invoke(app, ["evaluate", str(a), str(a), "--dataset", "digits", "--alphas", "5", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["barrier"] == pytest.approx(0.0, abs=1e-6)
    assert max(data["losses"]) - min(data["losses"]) < 1e-6


def test_aligned_pair_has_lower_barrier_than_naive(tmp_path):
    a, b = example_paths()
    out = tmp_path / "b_aligned.safetensors"
    assert runner.invoke(app, ["align", str(a), str(b), "-o", str(out)]).exit_code == 0
    barrier = {}
    for name, other in (("naive", b), ("aligned", out)):
        r = runner.invoke(app, ["evaluate", str(a), str(other), "--dataset", "digits", "--json"])
        assert r.exit_code == 0, r.output
        barrier[name] = json.loads(r.stdout)["barrier"]
    assert barrier["aligned"] * 10 < barrier["naive"]


def test_evaluate_plot(tmp_path):
    a, b = example_paths()
    png = tmp_path / "curve.png"
    r = runner.invoke(app, ["evaluate", str(a), str(b), "--dataset", "digits", "--alphas", "3", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_wrong_dataset_shape_is_one_line():
    a, b = example_paths()
    r = runner.invoke(app, ["evaluate", str(a), str(b), "--dataset", "mnist1d"])
    assert r.exit_code == 1 and "expects" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_demo_shows_barrier_falling(tmp_path):
    r = runner.invoke(app, ["demo", "--output-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "cut the loss barrier" in r.output
    factor = float(r.output.split("cut the loss barrier ")[1].split("x")[0])
    assert factor >= 10
    # the refined row (bundled digits): a barrier far below the naive one
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in r.output.splitlines()
            if line.count("│") > 3}
    assert float(rows["auto --data digits"]) < float(rows["naive"]) / 10
    assert (tmp_path / "b_aligned.safetensors").is_file() and (tmp_path / "merged.safetensors").is_file()


def test_the_curve_reports_each_point_and_the_endpoints_are_the_models():
    """evaluate --alphas 100000 ran minutes without a sign of life (found by a black-box sweep):
    the curve now calls back after every point, which the command's progress bar shows."""
    from modelmerge.evaluate import interpolation_curve

    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    calls = []
    curve = interpolation_curve(a, b, lambda s: (float(s["w"].sum()), 1.0), 5,
                                on_point=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]
    assert curve.losses[0] == 3.0 and curve.losses[-1] == 9.0 and curve.barrier == pytest.approx(0.0)


def test_data_shaping_says_what_it_guesses_and_labels_from_one_get_a_hint():
    """Flat inputs of a multi-channel image were reshaped channels first without a word (channels-last data
    then scored 0.10 instead of 0.76); labels 1..10 for 10 outputs got no hint (black-box sweep)."""
    from modelmerge.data import Dataset
    from modelmerge.errors import DataError

    x, y = torch.rand(20, 3 * 4 * 4), torch.arange(20) % 3
    data = Dataset("d", x, y, x, y)
    assert "read as [3, 4, 4] in that axis order" in data.shaped((3, 4, 4)).note
    assert Dataset("g", x[:, :16], y, x[:, :16], y).shaped((1, 4, 4)).note is None  # one channel: one order
    assert data.shaped((48,)).note is None
    with pytest.raises(DataError, match="labels run 1..3.*subtract 1"):
        Dataset("l", x, y + 1, x, y + 1).shaped((48,), num_outputs=3)


def test_keras_style_data_files_are_read(tmp_path):
    """x_train/y_train/x_test/y_test (Keras' load_data names) were refused as lacking x and y (black-box sweep)."""
    import numpy as np

    from modelmerge.data import load_dataset

    rng = np.random.default_rng(0)
    x, y = rng.random((30, 5)).astype(np.float32), rng.integers(0, 3, 30)
    np.savez(tmp_path / "k.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    data = load_dataset(str(tmp_path / "k.npz"))
    assert torch.equal(data.x_train, torch.as_tensor(x[:20])) and torch.equal(data.y_test, torch.as_tensor(y[20:]))


def test_keras_column_labels_are_read_and_channels_last_images_get_a_hint(tmp_path):
    """Keras' CIFAR layout: labels [N, 1] were refused; [N, 32, 32, 3] images for a [3, 32, 32] model got a bare
    shape error (a review)."""
    import numpy as np

    from modelmerge.data import load_dataset
    from modelmerge.errors import DataError

    rng = np.random.default_rng(0)
    x, y = rng.random((12, 4, 4, 3)).astype(np.float32), rng.integers(0, 3, (12, 1))
    np.savez(tmp_path / "c.npz", x_train=x[:8], y_train=y[:8], x_test=x[8:], y_test=y[8:])
    data = load_dataset(str(tmp_path / "c.npz"))
    assert data.y_train.shape == (8,)
    with pytest.raises(DataError, match=r"channels-last: transpose it to channels first, x.transpose\(0, 3, 1, 2\)"):
        data.shaped((3, 4, 4))
