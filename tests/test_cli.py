"""The command line: real app, real files, every bad input gives one line and exit 1."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from conftest import VGGish, mlp
from typer.testing import CliRunner

from modelmerge.checkpoint import load_checkpoint
from modelmerge.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pair(save_sd):
    a = save_sd(mlp((12, 16, 16, 5), seed=0).state_dict(), "a.safetensors")
    b = save_sd(mlp((12, 16, 16, 5), seed=1).state_dict(), "b.pt")
    return a, b


def test_align_writes_verified_permuted_b_and_report(pair, tmp_path):
    a, b = pair
    out, merged, report = tmp_path / "out.safetensors", tmp_path / "m.safetensors", tmp_path / "r.json"
    r = run("align", a, b, "-o", out, "--merged", merged, "--report", report, "--seed", 3,
            "--method", "weight-matching")
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert {"method", "permutations", "objective", "iterations", "seconds", "verified"} <= set(data)
    assert data["objective"]["after"] >= data["objective"]["before"]
    assert data["verified"]["forward"] == "chain" and data["verified"]["coverage"]
    assert set(data["seconds"]) >= {"align", "total"}
    b_state, out_ck = load_checkpoint(b).state, load_checkpoint(out)
    # unit i of OUT is unit perm[i] of B
    perm = torch.tensor(data["permutations"]["0.out"])
    assert torch.equal(out_ck.state["0.weight"], b_state["0.weight"][perm])
    assert out_ck.metadata["modelmerge.input_b_sha256"] == _digest(b)
    assert out_ck.metadata["modelmerge.method"] == "weight-matching"
    m = load_checkpoint(merged).state
    a_state = load_checkpoint(a).state
    torch.testing.assert_close(m["0.weight"], 0.5 * a_state["0.weight"] + 0.5 * out_ck.state["0.weight"])


def test_outputs_keep_the_inputs_own_metadata_and_say_format_pt(save_sd, tmp_path):
    # Hugging Face's from_pretrained refuses a safetensors file whose metadata lacks "format"
    a = save_sd(mlp((12, 16, 5), seed=0).state_dict(), "a.safetensors", {"format": "pt", "shared": "1", "who": "a"})
    b = save_sd(mlp((12, 16, 5), seed=1).state_dict(), "b.safetensors", {"shared": "1", "who": "b"})
    out, merged, mix = tmp_path / "o.safetensors", tmp_path / "m.safetensors", tmp_path / "i.safetensors"
    assert run("align", a, b, "-o", out, "--merged", merged, "--method", "weight-matching").exit_code == 0
    assert run("interpolate", a, b, "-o", mix).exit_code == 0
    own = {name: {k: v for k, v in load_checkpoint(p).metadata.items() if not k.startswith("modelmerge.")}
           for name, p in (("aligned", out), ("merged", merged), ("interpolated", mix))}
    assert own["aligned"] == {"format": "pt", "shared": "1", "who": "b"}  # B permuted: B's own entries
    assert own["merged"] == own["interpolated"] == {"format": "pt", "shared": "1"}  # what A and B agree on


def test_align_json_goes_to_stdout(pair, tmp_path):
    a, b = pair
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", "--json", "--method", "weight-matching")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["method"] == "weight-matching"


def test_auto_uses_the_bundled_aligner_in_its_family(pair, tmp_path):
    a, b = pair  # a 3-layer MLP: the bundled MLP aligner covers depths 2 to 6
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", "--json")
    report = json.loads(r.stdout)
    assert report["method"] == "deep-align" and report["aligner"] == "deepalign-mlp-v4"
    assert "learned" in report["seconds"] and report["verified"]["forward"] == "chain"


def test_auto_falls_back_to_weight_matching_and_says_why(save_sd, tmp_path):
    widths = (12, 16, 16, 16, 16, 16, 16, 5)  # 7 layers: no bundled aligner was trained that deep
    a = save_sd(mlp(widths, seed=0).state_dict(), "a7.safetensors")
    b = save_sd(mlp(widths, seed=1).state_dict(), "b7.safetensors")
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", "--json")
    report = json.loads(r.stdout)
    assert report["method"] == "weight-matching"
    assert any("no bundled aligner covers a 7-layer MLP" in n for n in report["notes"])


def test_align_cnn_with_spec_file(save_sd, tmp_path):
    a = save_sd(VGGish(seed=0).state_dict(), "a.safetensors")
    b = save_sd(VGGish(seed=1).state_dict(), "b.safetensors")
    spec = tmp_path / "spec.json"
    r = run("inspect", a, "--json")
    assert r.exit_code == 0
    spec.write_text(r.stdout)
    r = run("align", a, b, "-o", tmp_path / "o.safetensors", "--spec", spec, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["spec"]["source"] == "file" and data["verified"]["forward"] == "chain"


@pytest.mark.parametrize("alpha, end", [(0.0, "a"), (1.0, "b")])
def test_interpolate_ends_are_exact(pair, tmp_path, alpha, end):
    a, b = pair
    out = tmp_path / "i.safetensors"
    r = run("interpolate", a, b, "-o", out, "--alpha", alpha)
    assert r.exit_code == 0, r.output
    got, want = load_checkpoint(out).state, load_checkpoint(a if end == "a" else b).state
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_interpolate_copies_integer_buffers_from_a(save_sd, tmp_path):
    sa, sb = VGGish(seed=0).state_dict(), VGGish(seed=1).state_dict()
    sa["features.1.num_batches_tracked"].fill_(7)
    sb["features.1.num_batches_tracked"].fill_(100)
    out = tmp_path / "i.safetensors"
    r = run("interpolate", save_sd(sa, "a.safetensors"), save_sd(sb, "b.safetensors"), "-o", out)
    assert r.exit_code == 0
    assert int(load_checkpoint(out).state["features.1.num_batches_tracked"]) == 7


def test_inspect_table_lists_groups_and_fixed(save_sd):
    r = run("inspect", save_sd(VGGish().state_dict(), "v.safetensors"))
    assert r.exit_code == 0
    assert "features.0.out" in r.output and "x4" in r.output and "num_batches_tracked" in r.output
    # results go to stdout (`modelmerge inspect A > f` captured nothing before: found by a black-box
    # sweep); warnings stay on stderr
    assert "features.0.out" in r.stdout and "features.0.out" not in r.stderr
    # redirected output keeps each group's parameter list on one line (wrapped at 80 columns, its
    # continuation began at column 0 and broke greps), and plain groups do not say "units; units"
    members = [line for line in r.stdout.splitlines() if "features.0.weight:0" in line]
    assert len(members) == 1 and "features.1.running_var:0" in members[0] and len(members[0]) > 80
    assert "units; units" not in r.stdout


# ---------------------------------------------------------------- bad input


def _bad_cases(tmp_path, save_sd):
    a = save_sd(mlp((12, 16, 16, 5), seed=0).state_dict(), "a.safetensors")
    b = save_sd(mlp((12, 16, 16, 5), seed=1).state_dict(), "b.safetensors")
    other = save_sd(mlp((12, 20, 16, 5), seed=1).state_dict(), "other.safetensors")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(b.read_bytes()[:100])
    nan_state = mlp((12, 16, 16, 5), seed=2).state_dict()
    nan_state["2.bias"][3] = float("nan")
    nan = save_sd(nan_state, "nan.safetensors")
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"keep me")
    out = tmp_path / "out.safetensors"
    return a, {
        "missing file": (["align", a, tmp_path / "nope.safetensors", "-o", out], "no such file"),
        "truncated file": (["align", a, trunc, "-o", out], "truncated or corrupt"),
        "nan weights": (["align", a, nan, "-o", out], "NaN"),
        "mismatched architectures": (["align", a, other, "-o", out], "differ in shape"),
        "output is an input": (["align", a, b, "-o", b, "--force"], "also an input"),
        "existing output": (["align", a, b, "-o", exists], "--force"),
        "missing folder": (["align", a, b, "-o", tmp_path / "no" / "o.safetensors"], "does not exist"),
        "interpolate mismatch": (["interpolate", a, other, "-o", out], "differ in shape"),
        "bad spec file": (["align", a, b, "-o", out, "--spec", trunc], "not valid JSON"),
        "unknown method": (["align", a, b, "-o", out, "--method", "magic"], "unknown --method"),
        "non-safetensors output": (["align", a, b, "-o", tmp_path / "o.pt"], "must end in .safetensors"),
    }


CASES = [
    "missing file", "truncated file", "nan weights", "mismatched architectures", "output is an input",
    "existing output", "missing folder", "interpolate mismatch", "bad spec file", "unknown method",
    "non-safetensors output",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_exit_1(case, tmp_path, save_sd):
    _, cases = _bad_cases(tmp_path, save_sd)
    args, needle = cases[case]
    before = {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()}
    r = run(*args)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelmerge: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.output
    after = {p.name: _digest(p) for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # no partial file, inputs untouched


def test_unwritable_folder(tmp_path, save_sd, monkeypatch):
    a, _ = _bad_cases(tmp_path, save_sd)
    locked = tmp_path / "locked"
    locked.mkdir()
    import modelmerge.checkpoint as ckpt

    real = ckpt.tempfile.mkstemp

    def deny(*args, dir=None, **kwargs):  # root ignores chmod, so deny like a read-only mount
        if dir is not None and str(dir) == str(locked):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", deny)
    r = run("align", a, a, "-o", locked / "o.safetensors")
    assert r.exit_code == 1 and "not writable" in r.stderr and list(locked.iterdir()) == []


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELMERGE_DEBUG", "1")
    r = run("inspect", tmp_path / "nope.safetensors")
    assert r.exit_code != 0 and r.exception is not None


def test_help_does_not_import_torch():
    code = "import sys, modelmerge.cli.app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("command", ["align", "interpolate", "merge", "evaluate", "inspect", "spec", "zoo",
                                     "train-aligner", "aligners", "demo"])
def test_every_command_prints_help_with_examples(command):
    """docs/usage.md promises examples in every command's --help (four had none: black-box sweep)."""
    r = run(command, "--help")
    assert r.exit_code == 0 and "Examples:" in r.output and f"modelmerge {command}" in r.output


def test_console_script_main_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "modelmerge", "inspect", str(tmp_path / "x.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such file" in r.stderr


def test_a_pt_file_keeps_its_module_order_and_a_safetensors_file_does_not(tmp_path):
    """Square layers with unnumbered names in alphabetical module order: a .pt file (torch.save
    of a state_dict) is read in its order; the same names from a safetensors file (which sorts
    them) could be in any order and are refused (the .pt was refused too before)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (n_out, n_in) in [("a_in", (16, 10)), ("b_mid", (16, 16)), ("c_mid", (16, 16)), ("d_out", (3, 16))]:
        state[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g)
        state[f"{name}.bias"] = torch.randn(n_out, generator=g)
    torch.save(state, tmp_path / "m.pt")
    res = runner.invoke(app, ["inspect", str(tmp_path / "m.pt")])
    assert res.exit_code == 0, res.output
    assert "a_in.out" in res.output and "c_mid.out" in res.output
    from safetensors.torch import save_file

    save_file(state, tmp_path / "m.safetensors")
    res = runner.invoke(app, ["inspect", str(tmp_path / "m.safetensors")])
    assert res.exit_code == 1 and "cannot tell the order" in res.output


def test_interpolating_different_dtypes_says_the_merge_takes_as(tmp_path, save_sd):
    """fp16 A with bf16 B was written in fp16 without a word (found by a black-box sweep)."""
    a = save_sd({k: v.half() for k, v in mlp(seed=0).state_dict().items()}, "a.safetensors")
    b = save_sd({k: v.bfloat16() for k, v in mlp(seed=1).state_dict().items()}, "b.safetensors")
    r = run("interpolate", a, b, "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 0 and "differ in dtype" in r.stderr and "torch.float16 vs torch.bfloat16" in r.stderr
    assert all(t.dtype == torch.float16 for t in load_checkpoint(tmp_path / "m.safetensors").state.values())


def test_align_two_sharded_folders(tmp_path):
    """save_pretrained's sharded layout (an index and its shards) aligns as one model, into one file."""
    from test_checkpoint import _shard

    folders = [_shard(mlp((12, 16, 16, 5), seed=s).state_dict(), tmp_path / f"m{s}") for s in (0, 1)]
    out = tmp_path / "o.safetensors"
    r = run("align", *folders, "-o", out, "--method", "weight-matching", "--assume-chain")
    assert r.exit_code == 0, r.output
    whole = load_checkpoint(folders[1]).state
    assert set(load_checkpoint(out).state) == set(whole) and "verified" in r.output


def test_eight_bit_image_data_is_said_to_be_read_as_0_to_255(pair, tmp_path):
    """8-bit images (MNIST as saved by most loaders) were read as 0..255 without a word, while most models
    are trained on x / 255: every metric, statistic and refinement step then read inputs 255x too large."""
    import numpy as np

    a, b = pair
    g = np.random.default_rng(0)
    x8, y = g.integers(0, 256, (40, 12), dtype=np.uint8), g.integers(0, 5, 40)
    np.savez(tmp_path / "u8.npz", x=x8, y=y)
    np.savez(tmp_path / "f.npz", x=(x8 / 255).astype(np.float32), y=y)
    said = runner.invoke(app, ["evaluate", str(a), str(b), "--dataset", str(tmp_path / "u8.npz"), "--assume-chain"])
    assert said.exit_code == 0, said.output
    assert "8-bit integers up to" in " ".join(said.output.split()) and "x / 255" in said.output
    quiet = runner.invoke(app, ["evaluate", str(a), str(b), "--dataset", str(tmp_path / "f.npz"), "--assume-chain"])
    assert quiet.exit_code == 0 and "8-bit" not in quiet.output
    from modelmerge.data import load_dataset

    assert "8-bit" in load_dataset(str(tmp_path / "u8.npz")).flat().shaped((12,)).note  # kept when reshaped


def test_interpolate_takes_assume_chain_as_its_refusal_says_and_prints_what_it_assumed(save_sd, tmp_path):
    """interpolate --repair refused residual-looking bare checkpoints by naming --assume-chain, which it did
    not accept; and it printed neither the plain-chain assumption nor the data's notes (docs sweep)."""
    import numpy as np

    def blocks(seed):
        g = torch.Generator().manual_seed(seed)
        return {"blocks.0.fc.weight": torch.randn(16, 12, generator=g), "blocks.0.fc.bias": torch.randn(16, generator=g),
                "blocks.1.fc.weight": torch.randn(16, 16, generator=g), "blocks.1.fc.bias": torch.randn(16, generator=g),
                "head.weight": torch.randn(5, 16, generator=g), "head.bias": torch.randn(5, generator=g)}

    a, b = save_sd(blocks(0), "a.safetensors"), save_sd(blocks(1), "b.safetensors")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=g.integers(0, 256, (40, 12), dtype=np.uint8), y=g.integers(0, 5, 40))
    base = ["interpolate", str(a), str(b), "--repair", "--dataset", str(tmp_path / "d.npz")]
    refused = runner.invoke(app, [*base, "-o", str(tmp_path / "m.safetensors")])
    assert refused.exit_code == 1 and "--assume-chain" in refused.output
    ok = runner.invoke(app, [*base, "-o", str(tmp_path / "m.safetensors"), "--assume-chain"])
    assert ok.exit_code == 0, ok.output
    assert "REPAIRed" in ok.output and "8-bit" in " ".join(ok.output.split())
    at_a = runner.invoke(app, [*base, "-o", str(tmp_path / "m0.safetensors"), "--assume-chain", "--alpha", "0"])
    assert at_a.exit_code == 0 and "REPAIRed" not in at_a.output and "the merge has A's weights" in at_a.output
    # without --repair/--reset-bn nothing reads the network: --assume-chain is refused like --model
    plain = runner.invoke(app, ["interpolate", str(a), str(b), "-o", str(tmp_path / "p.safetensors"), "--assume-chain"])
    assert plain.exit_code == 1 and "--assume-chain" in plain.output


def test_options_that_would_do_nothing_are_refused_or_said(pair, tmp_path):
    """--refine-steps without a refinement and --max-iter when no weight matching ran were dropped
    silently, though the design says no option is (docs sweep)."""
    a, b = pair
    out = str(tmp_path / "o.safetensors")
    steps = runner.invoke(app, ["align", str(a), str(b), "-o", out, "--refine-steps", "5", "--assume-chain"])
    assert steps.exit_code == 1 and "--refine-steps" in steps.output and not (tmp_path / "o.safetensors").exists()
    sweeps = runner.invoke(app, ["align", str(a), str(b), "-o", out, "--max-iter", "5", "--assume-chain",
                                 "--method", "deep-align", "--json"])
    assert sweeps.exit_code == 0, sweeps.output
    assert any("--max-iter 5 had no effect" in n for n in json.loads(sweeps.stdout)["notes"])
    used = runner.invoke(app, ["align", str(a), str(b), "-o", out, "--max-iter", "5", "--assume-chain", "--force",
                               "--method", "weight-matching", "--json"])
    assert used.exit_code == 0 and not any("--max-iter" in n for n in json.loads(used.stdout)["notes"])


def test_merge_says_how_it_read_its_data(pair, tmp_path):
    """merge --data scored soups on 8-bit data read as 0..255 without the note align and evaluate give (review)."""
    import numpy as np

    a, b = pair
    g = np.random.default_rng(0)
    np.savez(tmp_path / "u8.npz", x=g.integers(0, 256, (40, 12), dtype=np.uint8), y=g.integers(0, 5, 40))
    r = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "s.safetensors"), "--data",
                            str(tmp_path / "u8.npz"), "--method", "weight-matching", "--assume-chain", "--json"])
    assert r.exit_code == 0, r.output
    assert any("8-bit integers" in n for n in json.loads(r.stdout)["notes"])


def test_an_overflowing_curve_is_said_and_its_json_stays_strict(save_sd, tmp_path):
    """Weights near float32's limit gave infinite losses, a NaN barrier and `Infinity` in --json output
    (invalid JSON), exit 0 and no word (hostile-file sweep)."""
    states = [mlp((12, 16, 16, 5), seed=s).state_dict() for s in (0, 1)]
    for st in states:
        st["0.bias"][0] = 1e38
        st["2.weight"] *= 1e10  # the next layer's products overflow
    a, b = save_sd(states[0], "a.safetensors"), save_sd(states[1], "b.safetensors")
    g = torch.Generator().manual_seed(0)
    import numpy as np

    np.savez(tmp_path / "d.npz", x=torch.rand(40, 12, generator=g).numpy(), y=np.arange(40) % 5)
    r = runner.invoke(app, ["evaluate", str(a), str(b), "--dataset", str(tmp_path / "d.npz"), "--assume-chain",
                            "--alphas", "3", "--json"])
    assert r.exit_code == 0, r.output
    curve = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert curve["barrier"] is None and None in curve["losses"]
    assert "loss is not finite at alpha" in " ".join(r.stderr.split())


def test_merge_says_when_it_narrows_a_models_dtype(save_sd, tmp_path):
    """merge wrote every tensor in model 1's dtype without a word (bfloat16 first: the float32 models lost
    precision), while interpolate warned (hostile-file sweep)."""
    paths = [save_sd({k: v.to(torch.bfloat16) if i == 0 else v for k, v in mlp((12, 16, 16, 5), seed=i)
                      .state_dict().items()}, f"m{i}.safetensors") for i in range(3)]
    r = runner.invoke(app, ["merge", *map(str, paths), "-o", str(tmp_path / "s.safetensors"), "--method",
                            "weight-matching", "--assume-chain"])
    assert r.exit_code == 0, r.output
    assert "differ in dtype" in " ".join(r.stderr.split()) and "model 1 torch.bfloat16" in r.stderr
