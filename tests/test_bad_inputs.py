"""A corpus of bad inputs and faults, run against every command.

Each case must end with exit code 1 and exactly one ``modelmerge: error:`` line
naming the problem (no traceback), leave nothing at any output path, and leave
every file that existed before byte-for-byte unchanged. Cases are built per
test in ``tmp_path`` by small functions, so each stands alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import VGGish, mlp
from safetensors.torch import save_file
from typer.testing import CliRunner

from modelmerge.cli.app import app

runner = CliRunner()
WIDTHS = (12, 16, 16, 5)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder):
    return {p: _digest(p) for p in folder.rglob("*") if p.is_file()}


class Case:
    """Everything one case needs: its folder, a good pair, and helpers to make bad things."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.a = self.save(mlp(WIDTHS, seed=0).state_dict(), "a.safetensors")
        self.b = self.save(mlp(WIDTHS, seed=1).state_dict(), "b.safetensors")
        self.out = tmp_path / "out.safetensors"

    def save(self, state, name, metadata=None):
        path = self.dir / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
        return path

    def torch_save(self, obj, name):
        path = self.dir / name
        torch.save(obj, path)
        return path

    def write(self, name, data):
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
        return path

    def folder(self, name):
        path = self.dir / name
        path.mkdir()
        return path

    def npz(self, name, **arrays):
        path = self.dir / name
        np.savez(path, **arrays)
        return path

    def module(self, name, source):
        """A user module importable by ``--model`` (the tests run from ``self.dir``)."""
        self.write(f"{name}.py", textwrap.dedent(source))
        return name

    def align(self, *extra, a=None, b=None):
        return ["align", a or self.a, b or self.b, "-o", self.out, *extra]


def _jit(path):
    import warnings

    with warnings.catch_warnings():  # TorchScript is deprecated in recent torch; users still have such files
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(mlp(WIDTHS)), str(path))
    return path


def _pickled(path):
    import pickle

    with open(path, "wb") as f:
        pickle.dump(mlp(WIDTHS).state_dict(), f, protocol=4)
    return path


def _state(**changes):
    state = mlp(WIDTHS, seed=2).state_dict()
    state.update(changes)
    return state


def _digits_like(n=40, features=12, classes=5, **over):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(n, features)).astype(np.float32), "y": rng.integers(0, classes, n)}
    arrays.update(over)
    return arrays


def _fifo(path):
    os.mkfifo(path)
    return path


def _dangling(path):
    os.symlink(path.parent / "nowhere", path)
    return path


def _half(sign):
    """float16 weights near its range (|w| ~ 2.5e4): at alpha -1 the merge 2A - B = 3A overflows when B = -A."""
    return {k: (sign * (2.5e4 * v.sign() + v)).half() for k, v in mlp(WIDTHS, seed=0).state_dict().items()}


# Each builder returns (command line, text the error line must contain).
CASES = {
    # ---------------------------------------------------------------- checkpoint files
    "missing file": lambda c: (c.align(b=c.dir / "nope.safetensors"), "no such file"),
    "truncated safetensors": lambda c: (c.align(b=c.write("t.safetensors", c.b.read_bytes()[:100])),
                                        "truncated or corrupt"),
    "truncated pt": lambda c: (c.align(b=c.write("t.pt", c.torch_save(mlp(WIDTHS).state_dict(), "full.pt")
                                                 .read_bytes()[:300])), "corrupt"),
    "garbage safetensors": lambda c: (c.align(b=c.write("g.safetensors", os.urandom(4096))), "corrupt"),
    "garbage pt": lambda c: (c.align(b=c.write("g.pt", os.urandom(4096))), "not a PyTorch checkpoint"),
    "empty pt": lambda c: (c.align(b=c.write("e.pt", b"")), "is empty"),
    "TorchScript archive": lambda c: (c.align(b=_jit(c.dir / "j.pt")), "is a TorchScript archive"),
    "pickle.dump of tensors": lambda c: (c.align(b=_pickled(c.dir / "p.pt")), "weights-only loading cannot read"),
    "empty file": lambda c: (c.align(b=c.write("e.safetensors", b"")), "corrupt"),
    "pickle with code": lambda c: (c.align(b=c.torch_save({"w": torch.ones(2), "f": os.system}, "code.pt")),
                                   "never unpickles"),
    "pt holding a list": lambda c: (c.align(b=c.torch_save([1, 2, 3], "list.pt")), "not a state dict"),
    "pt holding no tensors": lambda c: (c.align(b=c.torch_save({}, "none.pt")), "not a state dict"),
    # (the next seven come from a black-box sweep: some were written out broken or read forever before)
    "pt with a tensor named __metadata__": lambda c: (c.align(b=c.torch_save(
        {**mlp(WIDTHS).state_dict(), "__metadata__": torch.ones(3)}, "meta.pt")), "'__metadata__'"),
    "pt keys that collide as text": lambda c: (c.align(b=c.torch_save(
        {1: torch.ones(2), "1": torch.ones(3)}, "ik.pt")), "same name as text"),
    "a pipe as checkpoint": lambda c: (c.align(b=_fifo(c.dir / "pipe.safetensors")), "not a regular file"),
    "torch file named safetensors": lambda c: (c.align(b=c.torch_save(mlp(WIDTHS, seed=1).state_dict(),
                                                                      "zip.safetensors")), "rename it to .pt"),
    "safetensors file named pt": lambda c: (c.align(b=c.write("st.pt", c.b.read_bytes())), "rename it to .safetensors"),
    "output a broken symlink": lambda c: (["interpolate", c.a, c.b, "-o", _dangling(c.dir / "link.safetensors")],
                                          "broken symbolic link"),
    "interpolate int8-quantized weights": lambda c: (
        ["interpolate", c.torch_save(_int8(0), "q0.pt"), c.torch_save(_int8(1), "q1.pt"), "-o", c.out],
        "dequantize both"),
    "merge int8 weights with float ones": lambda c: (
        ["interpolate", c.torch_save(_int8(0), "q0.pt"), c.torch_save(
            {k: v.float() for k, v in _int8(1).items()}, "f1.pt"), "-o", c.out], "cannot mix integer"),
    "interpolate overflowing float16": lambda c: (
        ["interpolate", c.save(_half(1), "h1.safetensors"), c.save(_half(-1), "h2.safetensors"), "-o", c.out,
         "--alpha", "-1"], "NaN or infinite"),
    "nan weights": lambda c: (c.align(b=c.save(_state(**{"2.bias": torch.full((16,), float("nan"))}),
                                               "nan.safetensors")), "NaN"),
    "inf weights": lambda c: (c.align(b=c.save(_state(**{"0.weight": torch.full((16, 12), float("inf"))}),
                                               "inf.safetensors")), "infinite"),
    "complex weights": lambda c: (c.align(b=c.torch_save(_state(**{"0.weight": torch.ones(16, 12,
                                                                                        dtype=torch.cfloat)}),
                                                         "complex.pt")), "complex tensor"),
    "sparse weights": lambda c: (c.align(b=c.torch_save(_state(**{"0.weight": torch.eye(16, 12).to_sparse()}),
                                                        "sparse.pt")), "sparse"),
    "all tensors empty": lambda c: (c.align(b=c.save({"w": torch.zeros(0, 3), "b": torch.zeros(0)},
                                                     "empty.safetensors")), "empty"),
    "mismatched shapes": lambda c: (c.align(b=c.save(mlp((12, 20, 16, 5)).state_dict(), "o.safetensors")),
                                    "differ in shape"),
    "mismatched keys": lambda c: (c.align(b=c.save(mlp((12, 16, 16, 16, 5)).state_dict(), "k.safetensors")),
                                  "different parameters"),
    "folder as checkpoint": lambda c: (c.align(b=c.folder("sub")), "folder"),
    "text file as checkpoint": lambda c: (c.align(b=c.write("notes.txt", "hello")), "unknown checkpoint format"),
    "record not json": lambda c: (c.align(a=c.save(mlp(WIDTHS).state_dict(), "r.safetensors",
                                                   {"modelmerge.arch": "{not json"})), "metadata is unusable"),
    "record of b not json": lambda c: (c.align(b=c.save(mlp(WIDTHS, seed=1).state_dict(), "rb.safetensors",
                                                        {"modelmerge.arch": "[1, 2"})), "metadata is unusable"),
    "record with absurd widths": lambda c: (
        c.align(a=c.save(mlp(WIDTHS).state_dict(), "big.safetensors", {"modelmerge.arch": json.dumps(
            {"family": "mlp", "widths": [12, 10**9, 10**9, 5]})})), "does not fit its architecture record"),
    "record of another family": lambda c: (
        c.align(a=c.save(mlp(WIDTHS).state_dict(), "fam.safetensors",
                         {"modelmerge.arch": json.dumps({"family": "transformer"})})), "unknown architecture family"),
    "residual blocks without --model": lambda c: (
        ["align", c.save(_blocks(0), "r0.safetensors"), c.save(_blocks(1), "r1.safetensors"), "-o", c.out],
        "reads like residual blocks"),
    "resnet-20 option A as .pt": lambda c: (
        ["align", c.torch_save(_resnet20(0), "n0.pt"), c.torch_save(_resnet20(1), "n1.pt"), "-o", c.out],
        "reads like residual blocks"),
    "GPT-2 Conv1D names as a bare chain": lambda c: (
        ["align", c.torch_save(_gpt2_mlp(0), "g0.pt"), c.torch_save(_gpt2_mlp(1), "g1.pt"), "-o", c.out],
        "named like GPT-2's Conv1D"),
    "depthwise conv as a bare .pt": lambda c: (
        ["align", c.torch_save(_depthwise(0), "dw0.pt"), c.torch_save(_depthwise(1), "dw1.pt"), "-o", c.out],
        "a depthwise conv (groups=8)"),
    "depthwise conv as a bare .safetensors (sorted names)": lambda c: (
        ["align", c.save(_depthwise(0), "dw0.safetensors"), c.save(_depthwise(1), "dw1.safetensors"), "-o", c.out],
        "a depthwise conv (groups=8)"),
    # ---------------------------------------------------------------- outputs
    "output is an input": lambda c: (["align", c.a, c.b, "-o", c.b, "--force"], "also an input"),
    "existing output": lambda c: (c.align(b=c.b, a=c.a) if c.write("out.safetensors", b"keep me") else [],
                                  "--force"),
    "output folder missing": lambda c: (["align", c.a, c.b, "-o", c.dir / "no" / "o.safetensors"],
                                        "does not exist"),
    "output is a folder": lambda c: (["align", c.a, c.b, "-o", c.dir] , "is a folder"),
    "output not safetensors": lambda c: (["align", c.a, c.b, "-o", c.dir / "o.pt"], "must end in .safetensors"),
    "output folder is a file": lambda c: (["align", c.a, c.b, "-o", c.write("f", "x") / "o.safetensors"],
                                          "is a file, not a folder"),
    "-o equals --merged": lambda c: (c.align("--merged", c.out), "must be different files"),
    "report exists": lambda c: (c.align("--report", c.write("r.json", "{}")), "--force"),
    "report not json": lambda c: (c.align("--report", c.dir / "r.txt"), "must end in .json"),
    "interpolate over an input": lambda c: (["interpolate", c.a, c.b, "-o", c.a, "--force"], "also an input"),
    # --force never replaces what the command reads besides the checkpoints: data, spec, aligner card
    "--force over the --data file": lambda c: (
        ["align", c.a, c.b, "-o", c.write("d.safetensors", b"x"), "--data", c.dir / "d.safetensors", "--force"],
        "also an input"),
    "--force over the --spec file": lambda c: (
        c.align("--spec", c.write("s.json", "{}"), "--report", c.dir / "s.json", "--force"), "also an input"),
    "--force over the aligner's card": lambda c: (
        c.align("--aligner", c.write("al/aligner.json", "{}").parent, "--report", c.dir / "al" / "aligner.json",
                "--force"), "also an input"),
    "spec -o existing": lambda c: (["spec", c.a, "-o", c.write("s.json", "{}")], "--force"),
    "demo over a user's file": lambda c: (["demo", "--output-dir", c.write("d/merged.safetensors", b"mine").parent],
                                          "--force"),
    "zoo over a stranger's file": lambda c: (
        ["zoo", "--widths", "64,8,10", "-n", "2", "--epochs", "1", "-o", c.write("z/model_00001.safetensors",
                                                                               b"mine").parent],
        "does not list"),
    # ---------------------------------------------------------------- options
    "unknown method": lambda c: (c.align("--method", "magic"), "unknown --method"),
    "unknown refine": lambda c: (c.align("--refine", "magic"), "unknown --refine"),
    "refine lmc without data": lambda c: (c.align("--refine", "lmc"), "needs --data"),
    "data nothing reads": lambda c: (c.align("--method", "weight-matching", "--data", "digits"), "does nothing"),
    "aligner with weight matching": lambda c: (c.align("--method", "weight-matching", "--aligner", "x"),
                                               "--aligner is read by"),
    "refine wm of weight matching": lambda c: (c.align("--method", "weight-matching", "--refine", "wm"),
                                               "its own answer"),
    "alpha nan with merged": lambda c: (c.align("--merged", c.dir / "m.safetensors", "--alpha", "nan"),
                                        "finite"),
    "alpha inf interpolate": lambda c: (["interpolate", c.a, c.b, "-o", c.out, "--alpha", "inf"], "finite"),
    # a traceback (float32 overflow) before (found by a black-box sweep)
    "alpha beyond float32": lambda c: (["interpolate", c.a, c.b, "-o", c.out, "--alpha", "1e40"], "-1000 to 1000"),
    "alpha without merged": lambda c: (c.align("--alpha", "0.3"), "add --merged"),
    "evaluate force without plot": lambda c: (["evaluate", c.a, c.b, "--dataset", "digits", "--force"], "add --plot"),
    "negative seed": lambda c: (c.align("--seed", "-1"), "--seed"),
    "seed beyond 2^32": lambda c: (c.align("--seed", str(2**32)), "--seed"),
    "zoo seeds beyond 2^32": lambda c: (["zoo", "--seed", str(2**32 - 1), "-n", "3", "-o", c.dir / "z"], "--seed"),
    "reset-bn without merged": lambda c: (c.align("--reset-bn", "--data", "digits"), "--reset-bn needs"),
    "reset-bn on a bare checkpoint": lambda c: (
        ["interpolate", c.save(VGGish(seed=0).state_dict(), "v0.safetensors"),
         c.save(VGGish(seed=1).state_dict(), "v1.safetensors"), "-o", c.out, "--reset-bn", "--dataset", "digits"],
        "--reset-bn needs the model's forward"),
    "interpolate dataset without reset-bn": lambda c: (["interpolate", c.a, c.b, "-o", c.out, "--dataset", "digits"],
                                                       "used by --reset-bn and --repair only"),
    "model-kwargs without model": lambda c: (c.align("--model-kwargs", "{}"), "need --model"),
    "bad input shape": lambda c: (c.align("--model", "m:X", "--input-shape", "a,b"), "--input-shape"),
    "model without colon": lambda c: (c.align("--model", "nocolon"), "package.module:ClassName"),
    "model not importable": lambda c: (c.align("--model", "no_such_module_xyz:Net"), "cannot import"),
    "model import raises": lambda c: (c.align("--model", c.module("boom", "raise RuntimeError('at import')\n")
                                              + ":Net"), "importing 'boom'"),
    "model syntax error": lambda c: (c.align("--model", c.module("broken", "def f(:\n") + ":Net"), "SyntaxError"),
    "model exits at import": lambda c: (c.align("--model", c.module("leaves", "import sys\nsys.exit(3)\n")
                                                + ":Net"), "SystemExit"),
    "model init raises": lambda c: (c.align("--model", c.module("badinit", """
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                raise ValueError("no")
        """) + ":Net"), "cannot build"),
    "model attribute not callable": lambda c: (c.align("--model", c.module("consts", "Net = 3\n") + ":Net"),
                                               "not a class"),
    "model builds a non-module": lambda c: (c.align("--model", c.module("notmod", "def Net():\n    return 3\n")
                                                    + ":Net"), "not a torch.nn.Module"),
    "spec not json": lambda c: (c.align("--spec", c.write("s.json", "{oops")), "not valid JSON"),
    "spec of the wrong format": lambda c: (c.align("--spec", c.write("s.json", '{"a": 1}')), "spec"),
    "spec missing parameters": lambda c: (c.align("--spec", c.write("s.json", json.dumps(
        {"format": "modelmerge.spec/1", "groups": {}, "params": {"0.weight": [None, None]}}))), "does not cover"),
    "spec that breaks the function": lambda c: (c.align("--method", "weight-matching", "--spec", c.write(
        "s.json", json.dumps(_breaking_spec()))), "outputs differ"),
    # ---------------------------------------------------------------- data
    "data file missing": lambda c: (c.align("--data", c.dir / "nope.npz"), "not found"),
    "unknown dataset": lambda c: (c.align("--data", "imagenet"), "unknown dataset"),
    "data with nan": lambda c: (c.align("--data", c.npz("d.npz", **_digits_like(
        x=np.full((40, 12), np.nan, dtype=np.float32)))), "NaN"),
    "data with zero rows": lambda c: (c.align("--data", c.npz("d.npz", x=np.zeros((0, 12), np.float32),
                                                               y=np.zeros(0, np.int64))), "example"),
    "data with one row": lambda c: (c.align("--data", c.npz("d.npz", **_digits_like(n=1))), "at least 2"),
    "data of strings": lambda c: (c.align("--data", c.npz("d.npz", **_digits_like(
        x=np.array([["a"] * 12] * 40)))), "must be numbers"),
    "labels out of range": lambda c: (c.align("--data", c.npz("d.npz", **_digits_like(classes=9))),
                                      "classes but the model outputs"),
    "negative labels": lambda c: (c.align("--data", c.npz("d.npz", **_digits_like(y=-np.ones(40, np.int64)))),
                                  "non-negative"),
    "data of the wrong size": lambda c: (c.align("--data", c.npz("d.npz", **_digits_like(features=7))),
                                         "inputs have shape"),
    "data beyond float32's range": lambda c: (c.align("--data", c.npz("d.npz", **_digits_like(
        x=np.full((40, 12), 1e300)))), "float32's range"),
    "labels beyond int64": lambda c: (c.align("--data", c.npz("d.npz", **_digits_like(
        y=np.full(40, 2**63 + 5, dtype=np.uint64)))), "class indices"),
    "x_test without y_test": lambda c: (["evaluate", c.a, c.b, "--dataset", c.npz("d.npz", **_digits_like(
        x_test=np.zeros((5, 12), np.float32)))], "no y_test"),
    "x_test of another shape": lambda c: (["evaluate", c.a, c.b, "--dataset", c.npz("d.npz", **_digits_like(
        x_test=np.zeros((5, 10), np.float32), y_test=np.zeros(5, np.int64)))], "must match"),
    "data file a folder": lambda c: (c.align("--data", c.folder("d.npz")), "is a folder"),
    "spec nested too deeply": lambda c: (c.align("--spec", c.write("s.json", "[" * 100000 + "]" * 100000)),
                                         "nested too deeply"),
    "spec with a 5000-digit number": lambda c: (c.align("--spec", c.write(
        "s.json", '{"groups": {"h": ' + "1" * 5000 + '}, "params": {}}')), "not valid JSON for modelmerge"),
    "model-kwargs nested too deeply": lambda c: (c.align("--model", c.module("mk", "import torch\nNet = torch.nn.Linear\n")
                                                         + ":Net", "--model-kwargs",
                                                         '{"d":' + "[" * 3000 + "]" * 3000 + "}"), "--model-kwargs"),
    "spec an endless device": lambda c: (c.align("--spec", "/dev/zero"), "too large"),
    "pt key not utf-8": lambda c: (c.align(b=c.torch_save({"w\udcff": torch.ones(2)}, "k.pt")), "not valid UTF-8"),
    "edge cost without unrolled iterations": lambda c: (
        ["train-aligner", "--zoo", _zoo(c), "-o", c.dir / "al", "--edge-cost", "4", "--unroll", "0"], "--unroll 0"),
    "aligner card not utf-8": lambda c: (c.align("--aligner", _aligner_folder(c, b"\xff\xfe{")), "not UTF-8"),
    "evaluate unknown split": lambda c: (["evaluate", c.a, c.b, "--dataset", "digits", "--split", "dev"],
                                         "--split"),
    "evaluate a bare conv chain": lambda c: (
        ["evaluate", c.save(VGGish(seed=0).state_dict(), "v0.safetensors"),
         c.save(VGGish(seed=1).state_dict(), "v1.safetensors"), "--dataset", "digits"], "--model"),
    "evaluate plot exists": lambda c: (["evaluate", c.a, c.b, "--dataset", c.npz("d.npz", **_digits_like()),
                                        "--plot", c.write("p.png", b"png")], "--force"),
    # ---------------------------------------------------------------- aligners and zoos
    "aligner file of garbage": lambda c: (c.align("--aligner", c.write("al.safetensors", os.urandom(512))),
                                          "not a modelmerge aligner"),
    "aligner without metadata": lambda c: (c.align("--aligner", c.save({"w": torch.ones(2)}, "al.safetensors")),
                                           "not a modelmerge aligner"),
    "aligner metadata not json": lambda c: (c.align("--aligner", c.save({"w": torch.ones(2)}, "al.safetensors",
                                                                        {"modelmerge.aligner": "{nope"})),
                                            "not valid JSON"),
    "aligner card without config": lambda c: (c.align("--aligner", c.save({"w": torch.ones(2)}, "al.safetensors",
                                                                          {"modelmerge.aligner": "{}"})),
                                              "no 'config'"),
    "aligner folder with corrupt card": lambda c: (
        c.align("--aligner", _aligner_folder(c, "{broken")), "not valid JSON"),
    "train-aligner init garbage": lambda c: (
        ["train-aligner", "--zoo", _zoo(c), "-o", c.dir / "al", "--data", "digits", "--init",
         c.write("init.safetensors", os.urandom(256))], "not a modelmerge aligner"),
    "zoo index without models": lambda c: (
        ["train-aligner", "--zoo", _zoo(c, {"format": "modelmerge.zoo/1"}), "-o", c.dir / "al"], "'models'"),
    "not a zoo": lambda c: (["train-aligner", "--zoo", c.dir, "-o", c.dir / "al"], "not a zoo"),
    "inspect a missing file": lambda c: (["inspect", c.dir / "nope.pt"], "no such file"),
    # ---------------------------------------------------------------- a hostile-file sweep (twelfth session)
    # A and B with different records were all run as A's model (wrong metrics, one record written)
    "records disagree": lambda c: (["interpolate", c.save(mlp(WIDTHS, seed=0).state_dict(), "ra.safetensors",
                                                          _record("relu")),
                                    c.save(mlp(WIDTHS, seed=1).state_dict(), "rb.safetensors", _record("tanh")),
                                    "-o", c.out], "different architecture records (activation"),
    # interpolate copied A's record into its output unchecked: a file modelmerge then refused
    "record that does not fit, interpolated": lambda c: (
        ["interpolate", c.save(mlp(WIDTHS, seed=0).state_dict(), "ra.safetensors", _record("relu", [12, 8, 16, 5])),
         c.b, "-o", c.out], "does not fit its architecture record"),
    "record too large to build": lambda c: (
        ["inspect", c.save(mlp(WIDTHS).state_dict(), "r.safetensors", {"modelmerge.arch": json.dumps(
            {"family": "cnn", "input_shape": [10**6] * 3, "channels": [10**6], "num_classes": 10})})],
        "cannot be built"),
    # torch saturates float8 e4m3 (no infinity) at 448: a far extrapolation was written clamped
    "float8 e4m3 overflow": lambda c: (
        ["interpolate", c.save(_e4m3(1), "fa.safetensors"), c.save(_e4m3(-1), "fb.safetensors"), "-o", c.out,
         "--alpha", "2"], "would hold NaN or infinite values"),
    "symlink loop as input": lambda c: (c.align(b=_loop(c.dir)), "loop of links"),
    "symlink loop as output": lambda c: (["interpolate", c.a, c.b, "-o", _loop(c.dir), "--force"],
                                         "loop of symbolic links"),
    # finite but huge weights: the learned aligner's float32 overflowed into scipy's traceback
    "weights too large for the learned aligner": lambda c: (
        c.align("--method", "deep-align", a=c.save(_huge(0), "ha.safetensors"), b=c.save(_huge(1), "hb.safetensors")),
        "affinities are not finite"),
    # the reader kept the last of two entries of one name: tensors swapped silently
    "data of object arrays": lambda c: (
        c.align("--data", c.npz("obj.npz", x=np.array([np.zeros(12)] * 40, dtype=object), y=np.arange(40) % 5)),
        "object arrays"),
    "an output named only by its suffix": lambda c: (["interpolate", c.a, c.b, "-o", c.dir / ".safetensors"],
                                                     "no name before .safetensors"),
    # outputs overflowing float32 were blamed on the spec ("pass a correct --spec")
    "outputs that overflow float32": lambda c: (
        c.align("--method", "weight-matching", a=c.save(_scaled(0, 1e15), "ha.safetensors"),
                b=c.save(_scaled(1, 1e15), "hb.safetensors")), "original's outputs are not finite"),
    "a tensor named twice in the header": lambda c: (c.align(b=_named_twice(c.dir / "twice.safetensors")),
                                                     "names '0.bias' twice"),
}


def _record(activation, widths=WIDTHS):
    return {"modelmerge.arch": json.dumps({"family": "mlp", "widths": list(widths), "activation": activation})}


def _e4m3(sign):
    state = {k: v.clone() for k, v in mlp(WIDTHS, seed=0).state_dict().items()}
    state["4.bias"][0] = 384.0 * sign  # 2 * (-384) - 384 = -1152, beyond e4m3's 448
    return {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}


def _loop(folder):
    (folder / "loop1.safetensors").symlink_to(folder / "loop2.safetensors")
    (folder / "loop2.safetensors").symlink_to(folder / "loop1.safetensors")
    return folder / "loop1.safetensors"


def _huge(seed):
    state = {k: v.clone() for k, v in mlp(WIDTHS, seed=seed).state_dict().items()}
    state["0.bias"][0] = 1e38
    return state


def _scaled(seed, factor):
    return {k: v * factor for k, v in mlp(WIDTHS, seed=seed).state_dict().items()}


def _named_twice(path):
    """A valid 12-16-16-5 file whose header then names 0.bias and 2.bias again with each other's data:
    the reader keeps the last entries, so the two 16-value biases come out swapped."""
    import struct

    state = mlp(WIDTHS, seed=1).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    entries = ", ".join(f'"{k}": {json.dumps(v)}' for k, v in header.items())
    swapped = (f'"0.bias": {json.dumps(header["2.bias"])}, "2.bias": {json.dumps(header["0.bias"])}')
    text = ("{" + entries + ", " + swapped + "}").encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return path


def _int8(seed):
    """Weight-only int8 quantization as other code saves it: int8 matrices beside float scales; a merge
    copied A's integers beside averaged scales (black-box sweep)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in (("fc1", (16, 12)), ("fc2", (5, 16))):
        out[f"{name}.weight"] = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        out[f"{name}.scale"] = torch.rand(shape[0], generator=g) / 100
        out[f"{name}.bias"] = torch.randn(shape[0], generator=g)
    return out


def _depthwise(seed):
    """A MobileNet-like stem, depthwise and pointwise conv, then a classifier (module order); its
    refusal blamed the wrong layer ('... follows classifier') before naming the depthwise conv."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"stem.weight": (8, 3, 3, 3), "stem.bias": (8,), "block.dw.weight": (8, 1, 3, 3),
              "block.pw.weight": (16, 8, 1, 1), "block.pw.bias": (16,), "classifier.weight": (5, 16),
              "classifier.bias": (5,)}
    return {k: torch.randn(v, generator=g) for k, v in shapes.items()}


def _gpt2_mlp(seed):
    """A GPT-2 MLP block's state dict: Conv1D layers store weights [in, out]; square, so it also reads as a
    Linear chain (which would be wrong)."""
    g = torch.Generator().manual_seed(seed)
    return {"mlp.c_fc.weight": torch.randn(16, 16, generator=g), "mlp.c_fc.bias": torch.randn(16, generator=g),
            "mlp.c_proj.weight": torch.randn(16, 16, generator=g), "mlp.c_proj.bias": torch.randn(16, generator=g)}


def _blocks(seed):
    """Residual MLP blocks (``x + fc2(relu(fc1(x)))``) as a bare state dict: names like blocks.0.fc1."""
    torch.manual_seed(seed)
    state = {"inp.weight": torch.randn(16, 12), "inp.bias": torch.randn(16)}
    for i in range(2):
        for j in (1, 2):
            state[f"blocks.{i}.fc{j}.weight"] = torch.randn(16, 16)
            state[f"blocks.{i}.fc{j}.bias"] = torch.randn(16)
    state.update({"head.weight": torch.randn(5, 16), "head.bias": torch.randn(5)})
    return state


def _resnet20(seed):
    """A CIFAR ResNet-20's keys with option-A (parameter-free) shortcuts: conv/bn pairs in blocks."""
    torch.manual_seed(seed)
    state = {"conv1.weight": torch.randn(16, 3, 3, 3)}
    for name in ("bn1",):
        state.update({f"{name}.weight": torch.rand(16) + 0.5, f"{name}.bias": torch.randn(16),
                      f"{name}.running_mean": torch.randn(16), f"{name}.running_var": torch.rand(16) + 0.5,
                      f"{name}.num_batches_tracked": torch.tensor(1)})
    for block in range(3):
        for conv in (1, 2):
            p = f"layer1.{block}"
            state[f"{p}.conv{conv}.weight"] = torch.randn(16, 16, 3, 3)
            state.update({f"{p}.bn{conv}.weight": torch.rand(16) + 0.5, f"{p}.bn{conv}.bias": torch.randn(16),
                          f"{p}.bn{conv}.running_mean": torch.randn(16),
                          f"{p}.bn{conv}.running_var": torch.rand(16) + 0.5,
                          f"{p}.bn{conv}.num_batches_tracked": torch.tensor(1)})
    state.update({"linear.weight": torch.randn(10, 16), "linear.bias": torch.randn(10)})
    return state


def _breaking_spec():
    """A spec for the 12-16-16-5 MLP that fits every shape but lets the second layer ignore the first's order."""
    return {"format": "modelmerge.spec/1", "groups": {"h1": 16, "h2": 16},
            "params": {"0.weight": ["h1", None], "0.bias": ["h1"], "2.weight": ["h2", None], "2.bias": ["h2"],
                       "4.weight": [None, "h2"], "4.bias": [None]}}


def _aligner_folder(c, card_text):
    folder = c.dir / "al"
    c.write("al/aligner.json", card_text)
    c.save({"w": torch.ones(2)}, "al/aligner.safetensors")
    return folder


def _zoo(c, index=None):
    folder = c.dir / "zoo"
    c.write("zoo/zoo.json", json.dumps(index if index is not None else {
        "format": "modelmerge.zoo/1", "arch": {"family": "mlp", "widths": [64, 8, 10]},
        "models": [{"file": f"model_{i:05d}.safetensors", "seed": i} for i in range(4)]}))
    return folder


def test_corpus_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_1_nothing_written(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --model imports user modules from the current folder
    sys.modules.pop("boom", None)
    case = Case(tmp_path)
    args, needle = CASES[name](case)
    outputs = [case.out, tmp_path / "m.safetensors", tmp_path / "al" / "aligner.safetensors"]
    before = _files(tmp_path)
    r = runner.invoke(app, [str(x) for x in args])
    assert r.exit_code == 1, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelmerge: error:"), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert _files(tmp_path) == before  # nothing new, nothing changed (inputs' sha256 included)
    assert not any(p.exists() and p not in before for p in outputs)


# ---------------------------------------------------------------- concurrency and signals


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "modelmerge", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_two_writers_one_new_path_exactly_one_wins(tmp_path):
    case = Case(tmp_path)
    big_a = case.save(mlp((256, 1024, 1024, 10), seed=0).state_dict(), "ba.safetensors")
    big_b = case.save(mlp((256, 1024, 1024, 10), seed=1).state_dict(), "bb.safetensors")
    out = tmp_path / "same.safetensors"
    procs = [_cli("interpolate", big_a, big_b, "-o", out, "--alpha", str(alpha)) for alpha in (0.25, 0.75)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    codes = sorted(rc for _, _, rc in results)
    if codes == [0, 0]:  # the second started after the first had finished: it must have refused, not replaced
        pytest.fail("both writers reported success for one new path without --force")
    assert codes == [0, 1], results
    loser = next(err for _, err, rc in results if rc == 1)
    assert loser.strip().startswith("modelmerge: error:") and "--force" in loser
    assert out.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".same")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_signal_during_a_large_write_leaves_no_partial_file(tmp_path, sig):
    case = Case(tmp_path)
    big_a = case.save(mlp((512, 4096, 4096, 10), seed=0).state_dict(), "ba.safetensors")
    big_b = case.save(mlp((512, 4096, 4096, 10), seed=1).state_dict(), "bb.safetensors")
    before = _files(tmp_path)
    out = tmp_path / "merged.safetensors"
    proc = _cli("interpolate", big_a, big_b, "-o", out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.name.startswith(".merged") for p in tmp_path.iterdir()):
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        assert out.is_file()  # it finished before the signal: a complete file is fine
    else:
        assert not out.exists()
        if sig == signal.SIGINT:
            assert err.strip().splitlines()[-1].startswith("modelmerge: error: interrupted; no output was written")
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    if sig == signal.SIGINT:
        assert leftovers == []  # the temporary file is removed on the way out
    assert {p: d for p, d in _files(tmp_path).items() if p in before} == before


def test_a_wrapper_prefix_on_one_side_is_named(tmp_path):
    """A and a DataParallel-saved B ('module.fc1.weight') got 'different parameters' and two key lists
    (black-box sweep)."""
    from modelmerge.errors import MismatchError
    from modelmerge.merge import check_same_architecture

    a = mlp(WIDTHS).state_dict()
    b = {f"module.{k}": v for k, v in a.items()}
    for x, y, named in ((a, b, "B's names are A's with the prefix 'module.'"),
                        (b, a, "A's names are B's with the prefix 'module.'")):
        with pytest.raises(MismatchError, match=re.escape(named)):
            check_same_architecture(x, y)
