"""--model on the commands: traced spec, real-forward verification, spec files, BN reset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from archs import ResNetish
from typer.testing import CliRunner

from modelmerge.checkpoint import load_checkpoint
from modelmerge.cli.app import app

runner = CliRunner()
TESTS = Path(__file__).parent


@pytest.fixture
def resnets(tmp_path, save_sd, monkeypatch):
    monkeypatch.chdir(TESTS)  # --model archs:ResNetish imports from the current folder
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_sd(ResNetish().state_dict(), f"r{seed}.safetensors"))
    return paths


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_align_with_model_verifies_with_the_real_forward(resnets, tmp_path):
    a, b = resnets
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", "--model", "archs:ResNetish", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["spec"]["source"] == "traced" and report["verified"]["forward"] == "model"
    assert report["method"] == "weight-matching"
    assert any("learned aligner reads Linear/Conv chains" in n for n in report["notes"])


def test_auto_with_data_refines_any_model_through_its_real_forward(resnets, tmp_path):
    a, b = resnets
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", "--model", "archs:ResNetish", "--data", "digits",
            "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(report["candidates"]) == {"weight-matching", "activation-matching", "weight-matching+lmc"}
    # refinement keeps the best answer seen, weight matching's included
    assert report["candidates"]["weight-matching+lmc"] <= report["candidates"]["weight-matching"] + 1e-6
    assert report["verified"]["forward"] == "model"


def test_half_precision_checkpoints_refine_through_the_real_forward(tmp_path, save_sd, monkeypatch):
    monkeypatch.chdir(TESTS)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = {k: v.half() if v.is_floating_point() else v for k, v in ResNetish().state_dict().items()}
        paths.append(save_sd(state, f"h{seed}.safetensors"))
    out = tmp_path / "o.safetensors"
    r = run("align", *paths, "-o", out, "--model", "archs:ResNetish", "--data", "digits", "--refine-steps", "3",
            "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["candidates"]) == {"weight-matching", "activation-matching", "weight-matching+lmc"}
    assert all(v.dtype == torch.float16 for k, v in load_checkpoint(out).state.items() if v.is_floating_point())


def test_tied_weights_run_through_functional_call():
    from modelmerge.network import resolve_network

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.again = self.fc  # tied: two state-dict keys, one parameter
            self.out = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.relu(self.again(torch.relu(self.fc(x)))))

    module = Tied()
    network = resolve_network(module.state_dict(), module=module, input_shape=(4,))
    x = torch.randn(5, 4)
    assert torch.allclose(network.forward(module.state_dict(), x), module(x))
    assert network.trainable == {"fc.weight", "fc.bias", "out.weight", "out.bias"}


def test_data_that_does_not_fit_the_model_is_one_line(resnets, tmp_path):
    a, b = resnets
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", "--model", "archs:ResNetish", "--data", "mnist1d")
    assert r.exit_code == 1 and "inputs have shape" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_spec_command_round_trip(resnets, tmp_path):
    a, b = resnets
    out = tmp_path / "resnet.spec.json"
    r = run("spec", a, "--model", "archs:ResNetish", "-o", out)
    assert r.exit_code == 0, r.output
    spec = json.loads(out.read_text())
    assert spec["format"] == "modelmerge.spec/1" and len(spec["groups"]) >= 3
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", "--spec", out, "--model", "archs:ResNetish", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["spec"]["source"] == "file"


def test_inspect_with_model(resnets):
    r = run("inspect", resnets[0], "--model", "archs:ResNetish")
    assert r.exit_code == 0 and "layer2.0.shortcut.0.weight" in r.output


def test_reset_bn_changes_only_statistics(resnets, tmp_path):
    a, b = resnets
    out = tmp_path / "m.safetensors"
    r = run("interpolate", a, b, "-o", out, "--reset-bn", "--dataset", "digits", "--model", "archs:ResNetish")
    assert r.exit_code == 0, r.output
    merged, sa, sb = load_checkpoint(out).state, load_checkpoint(a).state, load_checkpoint(b).state
    torch.testing.assert_close(merged["stem.weight"], 0.5 * sa["stem.weight"] + 0.5 * sb["stem.weight"])
    assert not torch.allclose(merged["bn.running_var"], 0.5 * sa["bn.running_var"] + 0.5 * sb["bn.running_var"])


def _independent_curve_point(state_a, state_b, alpha, reset, data):
    """Loss of the α-merge through a fresh ResNetish, BatchNorm statistics reset by hand (not the code under test)."""
    model = ResNetish()
    model.load_state_dict({k: (1 - alpha) * v + alpha * state_b[k] if v.is_floating_point() else v
                           for k, v in state_a.items()})
    x_train = data.x_train
    if reset:
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for i in range(0, len(x_train), 256):
                model(x_train[i:i + 256])
    model.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(data.x_test), data.y_test))


def test_evaluate_with_model_and_reset_bn_matches_an_independent_reset(resnets):
    from modelmerge.data import load_dataset

    a, b = resnets
    sa, sb = load_checkpoint(a).state, load_checkpoint(b).state
    data = load_dataset("digits")
    curves = {}
    for reset in (False, True):
        r = run("evaluate", a, b, "--dataset", "digits", "--model", "archs:ResNetish", "--alphas", "3", "--json",
                *(["--reset-bn"] if reset else []))
        assert r.exit_code == 0, r.output
        curves[reset] = json.loads(r.stdout)["losses"]
        expected = [_independent_curve_point(sa, sb, al, reset, data) for al in (0.0, 0.5, 1.0)]
        assert curves[reset] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # the reset matters: the merge's statistics were wrong before it
    assert abs(curves[True][1] - curves[False][1]) > 1e-3


def test_commands_that_only_run_the_model_do_not_trace_it(resnets, tmp_path, monkeypatch):
    import modelmerge.trace

    def refuse(*_a, **_k):
        raise AssertionError("traced")

    monkeypatch.setattr(modelmerge.trace, "trace_spec", refuse)
    a, b = resnets
    r = run("evaluate", a, b, "--dataset", "digits", "--model", "archs:ResNetish", "--alphas", "3", "--json")
    assert r.exit_code == 0, r.output
    r = run("interpolate", a, b, "-o", tmp_path / "m.safetensors", "--dataset", "digits", "--model",
            "archs:ResNetish", "--reset-bn")
    assert r.exit_code == 0, r.output
    r = run("evaluate", a, b, "--dataset", "digits", "--model", "archs:ResNetish", "--alphas", "3", "--repair")
    assert isinstance(r.exception, AssertionError)  # REPAIR reads the groups: it does trace


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model", "nosuchmodule:X"], "cannot import"),
        (["--model", "archs:Nope"], "has no 'Nope'"),
        (["--model", "archs:ResNetish", "--model-kwargs", '{"width": 4}'], "wrong shape"),
        (["--model", "archs:ResNetish", "--model-kwargs", "{bad"], "not valid JSON"),
        (["--model", "archs"], "package.module:ClassName"),
        (["--model-kwargs", "{}"], "need --model"),
    ],
)
def test_model_option_errors_are_one_line(resnets, tmp_path, extra, needle):
    a, b = resnets
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", *extra)
    assert r.exit_code == 1 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_untraceable_model_is_one_line(tmp_path, save_sd, monkeypatch):
    from archs import Untraceable

    monkeypatch.chdir(TESTS)
    a = save_sd(Untraceable().state_dict(), "u.safetensors")
    r = run("inspect", a, "--model", "archs:Untraceable")
    assert r.exit_code == 1 and "cannot trace" in r.stderr and "--spec" in r.stderr


def test_wrong_spec_is_caught_by_the_real_forward(resnets, tmp_path):
    """A spec that fits every shape but breaks the function: an error, and no file written."""
    a, b = resnets
    good = tmp_path / "good.json"
    assert run("spec", a, "--model", "archs:ResNetish", "-o", good).exit_code == 0
    spec = json.loads(good.read_text())
    stem = spec["params"]["stem.weight"][0]
    spec["params"]["layer1.0.conv1.weight"][1] = None  # the block no longer follows the stem's permutation
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec))
    assert stem is not None
    out = tmp_path / "o.safetensors"
    r = run("align", a, b, "-o", out, "--spec", bad, "--model", "archs:ResNetish", "--method", "weight-matching")
    assert r.exit_code == 1 and "outputs differ" in r.stderr and not out.exists()


class _TwoHeads(torch.nn.Module):
    """A forward that returns a tuple and a dict, as Hugging Face-style models do."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.as_dict = as_dict
        self.fc1, self.fc2, self.out = torch.nn.Linear(6, 9), torch.nn.Linear(9, 7), torch.nn.Linear(7, 3)

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return {"logits": self.out(h), "hidden": (h,)} if self.as_dict else (self.out(h), h)


@pytest.mark.parametrize("as_dict", [False, True])
def test_tuple_and_dict_outputs_are_verified_tensor_by_tensor(as_dict):
    from modelmerge.alignment import align
    from modelmerge.errors import VerificationError
    from modelmerge.spec import PermutationSpec

    torch.manual_seed(0)
    a, b = _TwoHeads(as_dict), _TwoHeads(as_dict)
    result = align(a.state_dict(), b.state_dict(), module=a, method="weight-matching")
    assert result.verification.forward == "model" and result.verification.max_abs_diff < 1e-5
    assert "fc2.out" not in result.network.spec.groups  # h is an output: its units are never permuted
    # a spec that permutes fc2's units consistently keeps the logits but not the returned hidden state
    spec = result.network.spec.to_dict()
    spec["groups"]["g2"] = 7
    spec["params"].update({"fc2.weight": ["g2", spec["params"]["fc2.weight"][1]], "fc2.bias": ["g2"],
                           "out.weight": [None, "g2"]})
    bad = PermutationSpec.from_dict(spec)
    with pytest.raises(VerificationError):
        align(a.state_dict(), b.state_dict(), module=a, spec=bad, method="weight-matching")


class _LoudAndQuiet(torch.nn.Module):
    """Returns a large auxiliary output beside small logits."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = torch.nn.Linear(6, 9), torch.nn.Linear(9, 7), torch.nn.Linear(7, 3)

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        return h.sum(-1) * 1e4, self.out(h)


def _refused_when_held_fixed(a, b, key, match):
    """Weight matching's verified answer for modules ``a`` and ``b``, after checking that a spec holding
    ``key``'s axes fixed (its units' moves not followed there) is refused with ``match``."""
    from modelmerge.alignment import align
    from modelmerge.errors import VerificationError
    from modelmerge.spec import PermutationSpec

    good = align(a.state_dict(), b.state_dict(), module=a, method="weight-matching")
    spec = good.network.spec.to_dict()
    spec["params"][key] = [None, None]
    with pytest.raises(VerificationError, match=match):
        align(a.state_dict(), b.state_dict(), module=a, spec=PermutationSpec.from_dict(spec),
              method="weight-matching")
    return good


def test_a_large_output_does_not_lend_its_tolerance_to_a_small_one():
    """A spec that breaks the logits (fc2's units move, out's inputs do not) must be refused even though
    the summed output, 1e4 times larger, is unchanged (one shared tolerance once passed it: black-box sweep)."""
    torch.manual_seed(0)
    good = _refused_when_held_fixed(_LoudAndQuiet(), _LoudAndQuiet(), "out.weight", "output 2 of 2 differs")
    assert good.verification.forward == "model"


class _Tiny(torch.nn.Module):
    """A regressor whose outputs are ~1e-6 (small targets)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(10, 32), torch.nn.Linear(32, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * 1e-5


def test_small_outputs_are_checked_on_their_own_scale():
    """A spec that leaves fc2's inputs in place while fc1's units move changes every output completely, yet
    passed as 'verified' when outputs were ~1e-6: the tolerance had an absolute floor of 1e-4 (black-box
    sweep). The right answer still verifies."""
    torch.manual_seed(0)
    good = _refused_when_held_fixed(_Tiny(), _Tiny(), "fc2.weight", "outputs differ")
    assert good.verification.forward == "model" and good.verification.max_abs_diff < 1e-10


def test_a_correct_answer_verifies_when_outputs_are_small_differences_of_large_terms(monkeypatch):
    """Outputs ~2e-3 left after an output bias cancels units of size 1000 round off by ~5e-7 in float32, past
    1e-4 of their size: a correct permutation was refused (a review). The tolerance now also covers float32's
    measured round-off of the same forward (against float64), for chains, records and models alike."""
    from modelmerge.network import resolve_network
    from modelmerge.permutation import apply_permutation, random_permutation
    from modelmerge.verify import _round_off, verify_permuted

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 4))
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    sd["4.weight"] *= 0.01
    sd["2.weight"][:8], sd["2.bias"][:8] = 0.0, 1000.0
    record = {"family": "mlp", "widths": [64, 512, 512, 4], "activation": "relu"}
    for net in (resolve_network(sd, assume_chain=True), resolve_network(sd, record=record),
                resolve_network(sd, module=m, input_shape=(64,))):
        x = net.random_inputs(32, torch.Generator().manual_seed(0))
        state = {**sd, "4.bias": sd["4.bias"] - net.forward(sd, x).mean(0)}  # the output bias cancels them
        assert _round_off(net, state, x, [net.forward(state, x)])[0] > 0  # the float64 reference ran
        permuted = apply_permutation(state, net.spec, random_permutation(net.spec, torch.Generator().manual_seed(1)))
        assert verify_permuted(state, permuted, net).max_abs_diff > 1e-4 * float(net.forward(state, x).abs().max())
    monkeypatch.setattr("modelmerge.verify._PRECISE_BYTES", 0)  # too large for a float64 copy: no reference
    assert _round_off(net, state, x, [net.forward(state, x)]) == [0.0]


class _Masked(torch.nn.Module):
    """Returns masked scores (-inf where masked, as attention scores or log-probabilities are) and logits."""

    def __init__(self, scores_first: bool):
        super().__init__()
        self.scores_first = scores_first
        self.fc1, self.fc2 = torch.nn.Linear(6, 9), torch.nn.Linear(9, 7)
        self.out, self.score = torch.nn.Linear(7, 3), torch.nn.Linear(7, 4)

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.fc1(x))))
        s = self.score(h).masked_fill(torch.tensor([True, False, True, False]), float("-inf"))
        return (s, self.out(h)) if self.scores_first else (self.out(h), s)


@pytest.mark.parametrize("scores_first", [True, False])
def test_equal_infinities_agree_and_a_broken_masked_head_is_refused(scores_first):
    """-inf - -inf is NaN: it once let a broken head pass when its output came first, and refused a
    correct spec when it came last (review of the per-output check)."""
    torch.manual_seed(0)
    good = _refused_when_held_fixed(_Masked(scores_first), _Masked(scores_first), "score.weight", "differs")
    assert good.verification.forward == "model" and good.verification.max_abs_diff < 1e-5


def test_reset_bn_leaves_the_resolved_module_alone(resnets):
    from modelmerge.data import load_dataset
    from modelmerge.network import resolve_network

    sa, sb = load_checkpoint(resnets[0]).state, load_checkpoint(resnets[1]).state
    module = ResNetish()
    module.load_state_dict(sa)
    network = resolve_network(sa, module=module)
    x = network.shape_data(load_dataset("digits")).x_train
    merged = {k: 0.5 * (v + sb[k]) if v.is_floating_point() else v for k, v in sa.items()}
    reset = network.reset_bn(merged, x)
    assert not torch.allclose(reset["bn.running_mean"], merged["bn.running_mean"])
    for k, v in module.state_dict().items():
        assert torch.equal(v, sa[k]), k


class _FailingForward(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(10, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        raise ValueError("boom in forward")


@pytest.mark.parametrize("shape", [None, "10"])
def test_the_models_own_error_is_in_the_message(tmp_path, save_sd, monkeypatch, shape):
    """Given --input-shape, the message said "cannot find an input shape ...; pass --input-shape"
    and hid the model's exception (found by a black-box sweep)."""
    import sys

    monkeypatch.setitem(sys.modules, "failing_models", type(sys)("failing_models"))
    sys.modules["failing_models"].Failing = _FailingForward
    a = save_sd(_FailingForward().state_dict(), "f.safetensors")
    r = run("inspect", a, "--model", "failing_models:Failing", *(["--input-shape", shape] if shape else []))
    assert r.exit_code == 1 and "ValueError: boom in forward" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    if shape:
        assert "fails on inputs of shape [batch, 10]" in r.stderr


def test_a_data_parallel_prefix_is_named_in_the_error(tmp_path, save_sd, monkeypatch):
    """Names saved from a DistributedDataParallel wrapper ('module.conv1.weight') got a generic
    missing/unexpected keys error ending 'check --model-kwargs' (found by a black-box sweep)."""
    monkeypatch.chdir(TESTS)
    a = save_sd({f"module.{k}": v for k, v in ResNetish().state_dict().items()}, "ddp.safetensors")
    r = run("inspect", a, "--model", "archs:ResNetish")
    assert r.exit_code == 1 and "start with 'module.'" in r.stderr and "model.module.state_dict()" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_model_whose_weights_are_computed_says_nothing_can_move():
    """weight_norm computes each weight from two parameters: the tracer sees no weight layer, and
    the run moved nothing while saying '0 hidden units' and no why (found by a black-box sweep)."""
    from modelmerge.network import resolve_network

    wn = torch.nn.utils.parametrizations.weight_norm
    model = torch.nn.Sequential(wn(torch.nn.Linear(10, 16)), torch.nn.ReLU(), wn(torch.nn.Linear(16, 3)))
    network = resolve_network(model.state_dict(), module=model, input_shape=(10,))
    assert not network.spec.groups
    assert any("nothing can be permuted" in w for w in network.warnings)
    plain = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    assert not resolve_network(plain.state_dict(), module=plain, input_shape=(10,)).warnings


def test_a_users_model_keeps_its_modes():
    """align(module=...) left the user's model in eval mode (a training loop would go on without
    dropout; found by a black-box sweep of the Python API). It runs in eval mode, so dropout does
    not disturb the verification, and every submodule's own mode is restored after."""
    from modelmerge.alignment import align

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    model.train()
    model[4].eval()  # a frozen BatchNorm, on purpose
    b = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    b = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in b.items()}
    result = align(model.state_dict(), b, module=model, method="weight-matching", input_shape=(10,))
    assert result.verification.max_abs_diff < 1e-4 and not result.verification.assumed
    assert [m.training for m in model.modules()] == [True, True, True, True, True, False, True, True]
