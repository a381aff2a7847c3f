"""Loading from every format, refusing unsafe or broken files, and safe atomic writes."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import mlp

from modelmerge import checkpoint as ckpt
from modelmerge.checkpoint import check_output_path, load_checkpoint, save_checkpoint
from modelmerge.errors import CheckpointError, OutputError


@pytest.fixture
def state():
    return mlp((6, 8, 3)).state_dict()


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "m.pth", "m.bin"])
def test_round_trip_formats(save_sd, state, name):
    ck = load_checkpoint(save_sd(state, name))
    assert _equal(ck.state, state)
    assert len(ck.sha256) == 64


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model"])
def test_training_checkpoint_wrappers(save_sd, state, wrapper):
    path = save_sd({wrapper: state, "epoch": 3, "optimizer": {"lr": 0.1}}, "ckpt.pt")
    assert _equal(load_checkpoint(path).state, state)


def test_pickled_code_is_never_loaded(tmp_path):
    path = tmp_path / "full_model.pt"
    torch.save(mlp(), path)  # a whole nn.Module: loading it would run pickled code
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt"])
def test_truncated_files(save_sd, state, name):
    path = save_sd(state, name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_nan_weights_are_refused(save_sd, state):
    state = dict(state)
    state["0.weight"] = state["0.weight"].clone()
    state["0.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="'0.weight' contains NaN"):
        load_checkpoint(save_sd(state))


def test_missing_local_file_never_reaches_the_hub(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the hub must not be contacted for a local path")

    monkeypatch.setattr(ckpt, "_hub_download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo").mkdir()
    for missing in ["nope.safetensors", "zoo/a.safetensors", "runs/a.safetensors", "./x/y/z.pt"]:
        with pytest.raises(CheckpointError, match="no such file"):
            load_checkpoint(missing)


def test_hub_ids_go_through_the_patched_download(save_sd, state, monkeypatch):
    local = save_sd(state, "model.safetensors")
    calls = []

    def fake_download(repo_id, filename, revision):
        calls.append((repo_id, filename, revision))
        if filename != "model.safetensors":
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError("no such file")
        return str(local)

    monkeypatch.setattr(ckpt, "_hub_download", fake_download)
    ck = load_checkpoint("someone/mlp-zoo", revision="v1")
    assert _equal(ck.state, state) and calls == [("someone/mlp-zoo", "model.safetensors", "v1")]
    load_checkpoint("someone/mlp-zoo/model.safetensors")
    assert calls[-1] == ("someone/mlp-zoo", "model.safetensors", None)


def test_hub_offline_cache_miss_is_one_clear_error(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, revision):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(ckpt, "_hub_download", offline)
    with pytest.raises(CheckpointError, match="neither in the local hub cache nor reachable"):
        load_checkpoint("someone/repo/weights.safetensors")
    # a bare repository id tries every standard file, and a revision may be what is missing: both said
    with pytest.raises(CheckpointError, match=r"the hub files someone/repo/\{model.safetensors,"
                                              r"pytorch_model.bin,model.pt,model.safetensors.index.json,"
                                              r"pytorch_model.bin.index.json\} at revision 'v1' are neither.*--revision"):
        load_checkpoint("someone/repo", revision="v1")


def test_atomic_save_keeps_metadata_and_leaves_no_temp(tmp_path, state):
    out = save_checkpoint(state, tmp_path / "o.safetensors", {"modelmerge.method": "x"})
    ck = load_checkpoint(out)
    assert _equal(ck.state, state) and ck.metadata["modelmerge.method"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


def test_failed_write_leaves_nothing(tmp_path, state, monkeypatch):
    import modelmerge.checkpoint

    def boom(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modelmerge.checkpoint, "_write_safetensors", boom)
    with pytest.raises(OutputError, match="No space left"):
        save_checkpoint(state, tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_written_file_reads_back_in_every_dtype_with_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = {"w": torch.randn(3, 4), "h": torch.randn(5).half(), "bf": torch.randn(2, 3).bfloat16(),
             "n": torch.tensor(7), "i": torch.arange(6, dtype=torch.int32).reshape(2, 3), "empty": torch.zeros(0, 3),
             "mask": torch.tensor([True, False]), "d": torch.tensor(1.5, dtype=torch.float64),
             "u": torch.arange(4, dtype=torch.uint8), "t": torch.randn(4, 3).t()}  # a non-contiguous view
    out = save_checkpoint(state, tmp_path / "o.safetensors", metadata={"k": "v"})
    back = load_file(str(out))
    assert set(back) == set(state)
    assert all(back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]) for k in state)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}  # transformers' loaders need "format"


def test_output_rules(tmp_path, save_sd, state):
    a = save_sd(state, "a.safetensors")
    with pytest.raises(OutputError, match="also an input"):
        check_output_path(a, [a], force=True)
    with pytest.raises(OutputError, match="already exists"):
        check_output_path(a, [])
    assert check_output_path(a, [], force=True) == a
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "no" / "o.safetensors", [])
    with pytest.raises(OutputError, match="must end in .safetensors"):
        check_output_path(tmp_path / "o.pt", [])


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_checkpoints_align_and_merge_in_their_dtype(dtype, tmp_path, save_sd):
    """float8 has no isfinite of its own and no type promotion: both used to crash with a traceback."""
    from typer.testing import CliRunner

    from modelmerge.cli.app import app
    from modelmerge.merge import mix

    a, b = ({k: v.to(dtype) for k, v in mlp(seed=s).state_dict().items()} for s in (0, 1))
    pa, pb = save_sd(a, "a.safetensors"), save_sd(b, "b.safetensors")
    nan = dict(b, **{"0.bias": torch.full_like(b["0.bias"].float(), float("nan")).to(dtype)})
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(save_sd(nan, "nan.safetensors"))
    out, merged = tmp_path / "o.safetensors", tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["align", str(pa), str(pb), "-o", str(out), "--merged", str(merged), "--assume-chain"])
    assert r.exit_code == 0, r.output
    aligned, mixed = load_checkpoint(out).state, load_checkpoint(merged).state
    assert all(t.dtype == dtype for t in (*aligned.values(), *mixed.values()))
    # the permutation moves whole units: B's bias values, reordered, exactly
    assert torch.equal(aligned["0.bias"].float().sort().values, b["0.bias"].float().sort().values)
    expected = mix(a["0.weight"], aligned["0.weight"], 0.5).to(dtype)
    assert torch.equal(mixed["0.weight"].float(), expected.float())


def test_float8_checkpoints_weight_match_and_make_soups(tmp_path, save_sd):
    """Weight matching's norms and the soup's average have no float8 kernels: both crashed before."""
    from typer.testing import CliRunner

    from modelmerge.cli.app import app

    dtype = torch.float8_e4m3fn
    paths = [save_sd({k: v.to(dtype) for k, v in mlp(seed=s).state_dict().items()}, f"{s}.safetensors")
             for s in (0, 1)]
    for args in (["align", *paths, "-o", tmp_path / "w.safetensors", "--method", "weight-matching"],
                 ["merge", *paths, "-o", tmp_path / "s.safetensors"]):
        r = CliRunner().invoke(app, [str(x) for x in [*args, "--assume-chain"]])
        assert r.exit_code == 0, r.output
        assert all(t.dtype == dtype for t in load_checkpoint(args[args.index("-o") + 1]).state.values())


def test_file_names_that_are_not_utf8_read_and_write(tmp_path, state):
    """safetensors refuses such paths, and their undecodable bytes once made a header no reader accepts."""
    import subprocess
    import sys

    a = tmp_path / os.fsdecode(b"a_\xff.safetensors")
    save_checkpoint(state, a)
    assert _equal(load_checkpoint(a).state, state)
    out = tmp_path / os.fsdecode(b"o_\xfe.safetensors")
    # a real process: the test runner's captured output is stricter about such names than a terminal
    r = subprocess.run([sys.executable, "-m", "modelmerge", "interpolate", a, a, "-o", out], capture_output=True, check=False)
    assert r.returncode == 0, r.stderr
    back = load_checkpoint(out)
    assert _equal(back.state, state)
    assert back.metadata["modelmerge.input_a"].endswith("a_\\udcff.safetensors")  # the byte, escaped


def test_values_are_checked_before_writing_a_slice_at_a_time(tmp_path, state, monkeypatch):
    """NaN or inf is refused wherever it sits (slices bound the check's memory); a zoo opts out, since its
    next run retrains a diverged model, and nothing is left at the output path."""
    monkeypatch.setattr(ckpt, "_CHECK_CHUNK", 7)
    bad = dict(state)
    w = bad["0.weight"].clone()
    w.view(-1)[-1] = float("inf")  # in the last slice
    bad["0.weight"] = w
    with pytest.raises(OutputError, match="'0.weight' would hold NaN or infinite"):
        save_checkpoint(bad, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    save_checkpoint(bad, tmp_path / "z.safetensors", check_values=False)
    with pytest.raises(OutputError, match="__metadata__"):
        save_checkpoint({**state, "__metadata__": torch.ones(1)}, tmp_path / "m.safetensors")


def test_a_truncated_safetensors_file_is_called_truncated_whatever_its_first_byte(tmp_path, state):
    """A header length whose first byte is 0x80 (a pickle's first byte too) was called a torch file."""
    for pad in range(256):
        path = tmp_path / f"p{pad}.safetensors"
        save_checkpoint(state, path, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.skip("no padding gave a header length starting with 0x80")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_side_files_with_names_that_are_not_utf8(tmp_path):
    """Data and aligner files are opened through the same link as checkpoints (safetensors refuses such paths)."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file as save_np

    from modelmerge.data import load_dataset
    from modelmerge.deepalign.pretrained import get_aligner, load_aligner

    data = tmp_path / os.fsdecode(b"d_\xff.safetensors")
    save_np({"x": np.zeros((10, 4), np.float32), "y": np.arange(10) % 2}, str(tmp_path / "plain.safetensors"))
    shutil.copy(tmp_path / "plain.safetensors", data)
    assert load_dataset(str(data)).x_train.shape[1:] == (4,)
    al = tmp_path / os.fsdecode(b"al_\xfe.safetensors")
    shutil.copy(get_aligner("deepalign-mlp-v1").path, al)
    assert load_aligner(al)[0].config.family == "mlp"


def test_a_container_of_several_state_dicts_says_which_one_it_used(tmp_path):
    """timm-style {"state_dict", "state_dict_ema"} or {"model", "ema"}: the standard key is used, and said so."""
    from typer.testing import CliRunner

    from modelmerge.cli.app import app

    raw, ema = mlp(seed=0).state_dict(), mlp(seed=1).state_dict()
    path = tmp_path / "c.pt"
    torch.save({"state_dict": raw, "state_dict_ema": ema, "epoch": 3}, path)
    ck = load_checkpoint(path)
    assert all(torch.equal(ck.state[k], raw[k]) for k in raw)
    (note,) = ck.notes
    assert "several state dicts" in note and "'state_dict'" in note and "state_dict_ema" in note
    flat = tmp_path / "f.pt"
    torch.save({**raw, "_version": 2}, flat)
    assert load_checkpoint(flat).notes == (f"{flat}: ignored its entry '_version', which is not a tensor",)
    # several plain values were refused as "a dict, not a state dict" (found by a black-box sweep)
    torch.save({**raw, "epoch": 3, "arch": "mlp"}, flat)
    assert load_checkpoint(flat).notes == (f"{flat}: ignored its entries 'epoch', 'arch', which are not tensors",)
    torch.save({**raw, "optimizer": {"lr": 0.1}, "sched": [1]}, flat)  # not plain: which weights are meant is unclear
    with pytest.raises(CheckpointError, match="beside entries that are not \\('optimizer', 'sched'\\)"):
        load_checkpoint(flat)
    import argparse

    torch.save({"state_dict": raw, "hparams": argparse.Namespace(lr=0.1)}, flat)  # a Lightning habit
    with pytest.raises(CheckpointError, match="pickled Python objects \\(argparse.Namespace"):
        load_checkpoint(flat)
    r = CliRunner().invoke(app, ["inspect", str(path), "--assume-chain"])
    assert r.exit_code == 0 and "warning:" in r.stderr and "several state dicts" in r.stderr
    # the JSON report says it too (it left it out: found by a black-box sweep)
    torch.save({"state_dict": ema, "state_dict_ema": raw}, tmp_path / "d.pt")
    r = CliRunner().invoke(app, ["align", str(path), str(tmp_path / "d.pt"), "-o", str(tmp_path / "o.safetensors"),
                                 "--assume-chain", "--method", "weight-matching", "--json"])
    assert r.exit_code == 0, r.output
    import json

    assert sum("several state dicts" in w for w in json.loads(r.stdout)["warnings"]) == 2


def test_a_save_pretrained_folder_opens_its_one_weights_file(tmp_path, state):
    """A folder holding pytorch_model.bin (a Hugging Face save_pretrained layout) was refused with
    "pass the file inside it" (found by a black-box sweep); a folder with one standard file is read,
    one with two or none is still a one-line error naming them."""
    folder = tmp_path / "run1"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    assert load_checkpoint(folder).path == folder / "pytorch_model.bin"
    save_checkpoint(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="both model.safetensors and pytorch_model.bin"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="holding none of"):
        load_checkpoint(tmp_path)


def _shard(state, folder, fmt="safetensors"):
    """``state`` split in two shards with an index, as save_pretrained writes a large model."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(exist_ok=True)
    keys = list(state)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    suffix, index = ("safetensors", "model.safetensors.index.json") if fmt == "safetensors" else \
        ("bin", "pytorch_model.bin.index.json")
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"model-{i:05d}-of-00002.{suffix}"
        tensors = {k: state[k].contiguous() for k in part}
        if fmt == "safetensors":
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoints_load_whole_and_one_shard_is_refused(tmp_path, state, fmt):
    """One shard was read as the whole model (its last layer taken for the output layer) and aligned or
    evaluated without a word; the folder was refused with advice that led to one shard (black-box sweep)."""
    folder = _shard(state, tmp_path / "sharded", fmt)
    index = next(folder.glob("*.index.json"))
    for source in (folder, index):
        ck = load_checkpoint(source)
        assert _equal(dict(sorted(ck.state.items())), dict(sorted(state.items())))
        assert len(ck.parts) == 2 and len(ck.sha256) == 64
    with pytest.raises(CheckpointError, match="shard 1 of 2 of a sharded checkpoint"):
        load_checkpoint(next(folder.glob("model-00001-of-00002.*")))
    next(folder.glob("model-00002-of-00002.*")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(folder)


def test_a_shard_that_disagrees_with_its_index_is_refused(tmp_path, state):
    import json

    folder = _shard(state, tmp_path / "s")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "model-00002-of-00002.safetensors"  # the tensor is in shard 1
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not hold what the index says"):
        load_checkpoint(folder)
    index.write_text(json.dumps({"weight_map": {key: "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside its folder"):
        load_checkpoint(folder)


def test_a_sharded_hub_checkpoint_fetches_its_index_then_its_shards(tmp_path, state, monkeypatch):
    """A hub id naming a sharded repository: the index, then each shard not yet in the cache."""
    cache = _shard(state, tmp_path / "cache")
    (cache / "model-00002-of-00002.safetensors").rename(tmp_path / "remote.safetensors")  # not cached yet
    calls = []

    def fake_download(repo_id, filename, revision):
        from huggingface_hub.errors import EntryNotFoundError

        calls.append(filename)
        if filename == "model-00002-of-00002.safetensors":  # the download lands beside the index
            (tmp_path / "remote.safetensors").rename(cache / filename)
        if not (cache / filename).is_file():
            raise EntryNotFoundError("no such file")
        return str(cache / filename)

    monkeypatch.setattr(ckpt, "_hub_download", fake_download)
    ck = load_checkpoint("someone/big-model")
    assert _equal(dict(sorted(ck.state.items())), dict(sorted(state.items())))
    assert calls[-2:] == ["model.safetensors.index.json", "model-00002-of-00002.safetensors"]


class _Runs:
    """Pickles as a call to os.system: what a malicious checkpoint holds (the file is written, never loaded)."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_refused_containers_say_what_they_hold_and_a_safe_fix(tmp_path, state):
    """Found by a black-box sweep: a pickled os.system call was told to re-load with weights_only=False; NumPy
    arrays got advice that would keep them arrays; a state dict under 'ema' was 'not a state dict'; an .npz of
    weights was called corrupt."""
    import numpy as np

    cases = {
        "evil.pt": (_Runs(), "a function that runs commands or code"),
        "arrays.pt": ({k: v.numpy() for k, v in state.items()}, "holds NumPy arrays"),
        "ema.pth": ({"ema": state}, "holds state dicts under 'ema'"),
    }
    for name, (obj, needle) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=needle) as e:
            load_checkpoint(tmp_path / name)
        assert "weights_only=False" not in str(e.value)
    np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in state.items()})
    with pytest.raises(CheckpointError, match="is a NumPy .npz archive, not a checkpoint"):
        load_checkpoint(tmp_path / "w.npz")


def test_shards_of_an_index_input_are_never_overwritten_and_shard_like_names_load(tmp_path, state):
    """From a review: an index passed as input did not protect its shards from -o ... --force; 'fold-1-of-5.pt'
    (k-fold) was refused as a shard; a folder with both indexes (as hub snapshots hold) was refused."""
    import shutil

    folder = _shard(state, tmp_path / "s")
    index = folder / "model.safetensors.index.json"
    with pytest.raises(OutputError, match="also an input"):
        check_output_path(folder / "model-00001-of-00002.safetensors", [index], force=True)
    torch.save(state, tmp_path / "fold-1-of-5.pt")
    assert _equal(load_checkpoint(tmp_path / "fold-1-of-5.pt").state, state)
    bins = _shard(state, tmp_path / "b", "bin")
    for f in bins.iterdir():
        shutil.copy(f, folder / f.name)  # now both indexes and both shard sets
    assert load_checkpoint(folder).path.name == "model.safetensors.index.json"


def test_an_unresolvable_hub_reads_only_the_cache(monkeypatch, save_sd, state):
    """With no network, a hub id (or a mistyped path that looks like one) took 2 minutes of huggingface_hub
    retries and ~30 printed lines before its error; now an unresolvable hub host means cache only."""
    import socket

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    cached = save_sd(state, "model.safetensors")
    seen = []

    def download(repo_id, filename, revision=None, local_files_only=False):
        seen.append((filename, local_files_only))
        if filename == "model.safetensors" and repo_id == "someone/cached":
            return str(cached)
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise AssertionError("the network must not be tried")

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for var in ckpt._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    ckpt._hub_resolvable.cache_clear()
    try:
        with pytest.raises(CheckpointError, match="neither in the local hub cache nor reachable"):
            load_checkpoint("someone/repo")
        assert seen and all(local for _, local in seen)
        assert _equal(load_checkpoint("someone/cached").state, state)  # the cache still serves
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy the name is the proxy's to resolve
        ckpt._hub_resolvable.cache_clear()
        assert ckpt._hub_resolvable()
    finally:
        ckpt._hub_resolvable.cache_clear()
