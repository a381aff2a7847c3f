"""Thread control: torch and the BLAS pools under NumPy/SciPy, for commands and library users."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy  # noqa: F401  (load the BLAS pools before threadpoolctl looks)
import pytest
import scipy.linalg  # noqa: F401
import torch
from threadpoolctl import threadpool_info, threadpool_limits
from typer.testing import CliRunner

import modelmerge as mm
from modelmerge.cli._common import set_threads as cli_set_threads
from modelmerge.errors import ModelMergeError
from modelmerge.threads import limit_threads, resolve_threads, set_threads


def blas_threads() -> list[int]:
    pools = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    assert pools, "NumPy/SciPy should have loaded a BLAS library"
    return pools


@pytest.fixture
def two_threads(monkeypatch):
    """Start from 2 threads everywhere (so that 1 is a change) and put the process back afterwards."""
    monkeypatch.delenv("MODELMERGE_THREADS", raising=False)
    before = torch.get_num_threads()
    original = threadpool_limits(limits=2)  # remembers the limits from before the call
    torch.set_num_threads(2)
    yield
    original.restore_original_limits()
    torch.set_num_threads(before)


def test_context_manager_limits_torch_and_blas_then_restores(two_threads):
    with limit_threads(1) as n:
        assert n == 1
        assert torch.get_num_threads() == 1
        assert blas_threads() == [1] * len(blas_threads())
    assert torch.get_num_threads() == 2
    assert set(blas_threads()) == {2}


def test_context_manager_restores_after_an_exception(two_threads):
    with pytest.raises(RuntimeError), limit_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    assert set(blas_threads()) == {2}


def test_package_attribute_works_before_and_after_the_submodule_import():
    # fresh interpreter: the first `mm.limit_threads` goes through the lazy export, which imports the
    # submodule and binds it as the package attribute; the second call must still work.
    code = (
        "import modelmerge as mm, threadpoolctl, torch\n"
        "import sys; assert 'modelmerge.threads' not in sys.modules\n"
        "out = []\n"
        "for _ in range(2):\n"
        "    with mm.limit_threads(1):\n"
        "        out.append([torch.get_num_threads()] + [p['num_threads'] for p in "
        "threadpoolctl.threadpool_info() if p['user_api'] == 'blas'])\n"
        "print(__import__('json').dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out) == 2 and all(len(row) >= 2 and set(row) == {1} for row in out)


def test_mm_threads_in_process(two_threads):
    with mm.limit_threads(1):
        assert torch.get_num_threads() == 1
        assert set(blas_threads()) == {1}
    assert torch.get_num_threads() == 2


def test_set_threads_honours_env_and_explicit_option(two_threads, monkeypatch):
    monkeypatch.setenv("MODELMERGE_THREADS", "1")
    assert cli_set_threads(None) == 1
    assert torch.get_num_threads() == 1 and set(blas_threads()) == {1}
    assert cli_set_threads(2) == 2  # the option wins over the environment
    assert torch.get_num_threads() == 2 and set(blas_threads()) == {2}
    monkeypatch.setenv("MODELMERGE_THREADS", "2")
    assert set_threads(None, default=1) == 2


def test_resolution_rule(monkeypatch):
    import os

    monkeypatch.delenv("MODELMERGE_THREADS", raising=False)
    assert resolve_threads(None) == 1  # alignment default
    assert resolve_threads(None, default=None) == (os.cpu_count() or 1)  # zoo: all cores
    assert resolve_threads(3) == 3
    monkeypatch.setenv("MODELMERGE_THREADS", "")
    assert resolve_threads(None, default=1) == 1  # empty: unset
    # were ignored silently, so a typo passed for the default (docs sweep); "³" and a huge count gave tracebacks
    for bad_env in ("0", "-2", "many", "³", "99999999999999999999"):
        monkeypatch.setenv("MODELMERGE_THREADS", bad_env)
        with pytest.raises(ModelMergeError, match="MODELMERGE_THREADS=.*not a thread count"):
            resolve_threads(None, default=1)
        assert resolve_threads(2) == 2  # the option wins without reading it
    with pytest.raises(ModelMergeError):
        resolve_threads(0)
    with pytest.raises(ModelMergeError, match="from 1 to"):
        resolve_threads(2**32)  # torch's setter overflows on it
    with pytest.raises(ModelMergeError), limit_threads(0):
        pass


def test_align_command_limits_blas(two_threads, monkeypatch, tmp_path):
    from modelmerge.cli.app import app
    from modelmerge.examples import example_paths

    a, b = example_paths()
    args = ["align", str(a), str(b), "-o", str(tmp_path / "out.safetensors"), "--method", "weight-matching"]
    monkeypatch.setenv("MODELMERGE_THREADS", "1")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1 and set(blas_threads()) == {1}
    result = CliRunner().invoke(app, [*args, "--force", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 2 and set(blas_threads()) == {2}
