"""Reading and writing checkpoints.

Reads state dicts (parameter name -> tensor) from ``.safetensors`` (memory
mapped), ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)`` only:
modelmerge never unpickles code) and Hugging Face hub ids. Writes safetensors
only, atomically (a temporary file in the target folder, then a rename), never
over an input and never over an existing file unless asked to.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import re
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from modelmerge.errors import CheckpointError, OutputError, one_line, preview

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Tried in order when a hub id names a repository but no file.
HUB_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
# A checkpoint sharded by save_pretrained: an index naming each tensor's shard file (tried after the above).
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.(safetensors|bin)$")  # save_pretrained's shard names
# Wrappers seen in training checkpoints saved by other code: {"state_dict": {...}, "epoch": 3}.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^\s]+)?$")

META_PREFIX = "modelmerge."


@dataclass(frozen=True)
class Checkpoint:
    """A loaded state dict and where it came from.

    Attributes:
        state: parameter name -> tensor, in the file's order.
        metadata: the file's string metadata (safetensors header), possibly empty.
        path: the local file read (for hub ids, the cached file).
        source: what the user passed (a path or a hub id).
        notes: choices made in reading it that the user should hear of (which of several
            state dicts in a container was used, entries that were not tensors).
        ordered: the names are in the model's module order (a ``torch.save``d ``state_dict()``
            keeps it; a safetensors file sorts them), so chain inference may trust that order.
        parts: the shard files of a sharded checkpoint (``path`` is then its index).
    """

    state: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    source: str = ""
    notes: tuple[str, ...] = ()
    ordered: bool = False
    parts: tuple[Path, ...] = ()

    @cached_property
    def sha256(self) -> str:
        """sha256 of the file that was read (hex; computed once); of a sharded checkpoint, the sha256 of
        its shards' sha256 hex digests in the index's order, one per line."""
        if self.parts:
            return hashlib.sha256("".join(file_sha256(p) + "\n" for p in self.parts).encode()).hexdigest()
        return file_sha256(self.path) if self.path is not None else ""

    @cached_property
    def arch(self) -> dict | None:
        """The architecture record stored in the metadata (validated once), if any.

        Raises:
            CheckpointError: the stored record is malformed.
        """
        raw = self.metadata.get(META_PREFIX + "arch")
        if not raw:
            return None
        from modelmerge.archs import ArchError, record_from_json

        try:
            return record_from_json(raw)
        except ArchError as e:
            raise CheckpointError(
                f"{self.source}: its 'modelmerge.arch' metadata is unusable ({e}); re-save it without that entry"
            ) from None


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _looks_like_hub_id(source: str) -> bool:
    """A hub id is ``user/repo`` or ``user/repo/path/in/repo``.

    A string that names something on disk, starts like a path, or whose first
    component is an existing folder is a local path, so that a typo in a local
    path gives "file not found" instead of a network request.
    """
    if source.startswith("hf://"):
        return True
    if source.startswith((".", "/", "~")) or "\\" in source or not _HUB_ID.match(source):
        return False
    parts = source.split("/")
    if Path(parts[0]).exists():
        return False
    # "dir/file.safetensors" with two parts is far more likely a missing local file.
    return not (len(parts) == 2 and parts[1].endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES))


def _hub_download(repo_id: str, filename: str, revision: str | None) -> str:
    """Fetch one file through huggingface_hub (cache, token, HF_HUB_OFFLINE apply).

    When the hub's host cannot even be resolved (no network and no proxy), only the local cache
    is read: huggingface_hub would otherwise retry every candidate file for ~25 s, printing each
    retry (measured: 2 minutes and 30 lines for a bare repository id). Its retry messages are
    kept off the terminal either way; a failure ends in one error naming the cause.
    """
    import logging

    from huggingface_hub import hf_hub_download

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, revision=revision,
                               local_files_only=not _hub_resolvable())
    finally:
        hub_logger.setLevel(level)


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=1)
def _hub_resolvable() -> bool:
    """Whether the hub endpoint's host name resolves (True behind a proxy, which resolves it itself)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return True
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def resolve_source(source: str, revision: str | None = None) -> Path:
    """Turn a path or hub id into a local file path.

    Args:
        source: a local path, ``user/repo``, ``user/repo/file`` or ``hf://user/repo[/file]``.
        revision: hub revision (branch, tag or commit); only for hub ids.

    Returns:
        The local file (for hub ids, the file in the huggingface_hub cache).

    Raises:
        CheckpointError: the file does not exist or the hub cannot provide it.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        # a save_pretrained-style folder: its one standard weights file, as for a hub repository
        found = [path / name for name in HUB_DEFAULT_FILES if (path / name).is_file()]
        if not found:  # sharded: the index names the shards (the safetensors one first, as on the hub)
            found = [path / name for name in INDEX_FILES if (path / name).is_file()][:1]
        if len(found) == 1:
            return found[0]
        what = (f"both {found[0].name} and {found[1].name}" if found else
                f"none of {', '.join(HUB_DEFAULT_FILES + INDEX_FILES)}")
        raise CheckpointError(f"{source} is a folder holding {what}; pass the checkpoint file inside it")
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{source}: is a symbolic link to nothing (a broken link or a loop of links); "
                              "point it at the checkpoint, or pass the file itself")
    if path.exists():  # a FIFO, a device, a socket: reading one could block or never end
        raise CheckpointError(f"{source}: is not a regular file (a pipe or device); pass a checkpoint file")
    if not _looks_like_hub_id(source):
        raise CheckpointError(f"{source}: no such file; check the path")
    from huggingface_hub import errors as hub_errors

    parts = source.removeprefix("hf://").split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    candidates = (filename,) if filename else HUB_DEFAULT_FILES + INDEX_FILES
    offline_misses = []
    for name in candidates:
        try:
            return Path(_hub_download(repo_id, name, revision))
        # LocalEntryNotFoundError subclasses EntryNotFoundError in recent hub versions
        except hub_errors.LocalEntryNotFoundError:
            offline_misses.append(name)
            continue
        except hub_errors.EntryNotFoundError:
            continue
        except hub_errors.RepositoryNotFoundError:
            raise CheckpointError(
                f"{source}: not a local file and no hub repository {repo_id!r} "
                "(check the spelling, or log in with `hf auth login` for a private repo)"
            ) from None
        except hub_errors.RevisionNotFoundError:
            raise CheckpointError(
                f"{source}: hub repository {repo_id!r} has no revision {revision!r}"
            ) from None
        except (OSError, hub_errors.HfHubHTTPError) as e:
            raise CheckpointError(f"{source}: hub download failed ({one_line(e)})") from None
    if offline_misses:
        at = f" at revision {revision!r}" if revision else ""
        what = (f"the hub file {repo_id}/{offline_misses[0]}{at} is" if len(offline_misses) == 1 else
                f"the hub files {repo_id}/{{{','.join(offline_misses)}}}{at} are")
        raise CheckpointError(
            f"{source}: no such local file, and {what} neither in the local hub cache nor reachable (no network, "
            f"or HF_HUB_OFFLINE=1); check the path{' and --revision' if revision else ''}, or download it first"
        )
    raise CheckpointError(
        f"{source}: hub repository {repo_id!r} has none of {', '.join(candidates)}; "
        f"name the file, e.g. {repo_id}/weights.safetensors"
    )


def _read_safetensors(path: Path, source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with utf8_name(path) as name, safe_open(name, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if _torch_magic(path):
            raise CheckpointError(f"{source}: is a PyTorch (torch.save) file, not safetensors; rename it to .pt "
                                  "(or re-save it as safetensors)") from None
        raise CheckpointError(
            f"{source}: cannot read as safetensors, the file is truncated or corrupt "
            f"({one_line(e)}); re-download or re-save it"
        ) from None
    _check_header_names(path, source)
    return state, metadata


def _check_header_names(path: Path, source: str) -> None:
    """Refuse a safetensors header that names a tensor twice: the reader keeps the last entry silently,
    so a hand-built or tampered file could swap tensors with no error (a review built one whose two
    biases came out swapped)."""
    from modelmerge.errors import parse_json

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = f.read(size).decode("utf-8", errors="replace")  # the reader above accepted its size
    parse_json(header, f"{source}: its safetensors header", CheckpointError,
               fix="the file is corrupt or hand-edited; re-save it from the model")


@contextmanager
def utf8_name(path: Path) -> Iterator[str]:
    """A name for ``path`` that safetensors can open: its own, or, when that is not valid UTF-8 (which
    safetensors refuses), a symbolic link with a plain name in a temporary folder (removed after)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="modelmerge-") as tmp:
        link = os.path.join(tmp, "checkpoint.safetensors")
        try:
            os.symlink(os.path.abspath(path), link)
        except OSError:
            raise CheckpointError(f"{_utf8(str(path))}: its name is not valid UTF-8, which safetensors cannot "
                                  "open (and no link could be made to it); rename the file") from None
        yield link  # the tensors are memory-mapped: they stay valid after the link is removed


def _format_of(head: bytes) -> str | None:
    """``"safetensors"``, ``"torch"`` or None from a file's first 9 bytes. The safetensors test comes
    first: its 8-byte header length may start with 0x80, a pickle's first byte."""
    if len(head) >= 9 and head[8:9] == b"{":  # a header length, then the JSON header
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save writes a zip archive (or, before 1.6, a pickle)
        return "torch"
    return None


def _torch_magic(path: Path) -> bool:
    """Whether ``path`` starts as torch.save's files do."""
    try:
        with open(path, "rb") as f:
            return _format_of(f.read(9)) == "torch"
    except OSError:
        return False


def _string_keys(obj: Mapping, source: str) -> dict:
    """``obj`` with its keys as strings; refuses keys that become equal (``1`` and ``"1"``), which would
    silently drop a tensor, and the name safetensors reserves for its metadata."""
    out = {str(k): v for k, v in obj.items()}
    for k in out:
        if _utf8(k) != k:
            raise CheckpointError(f"{source}: the key {_utf8(k)!r} is not valid UTF-8 text, which safetensors "
                                  "outputs cannot hold; rename it and re-save")
    if len(out) != len(obj):
        seen: dict[str, object] = {}
        for k in obj:
            if str(k) in seen:
                raise CheckpointError(f"{source}: keys {seen[str(k)]!r} and {k!r} have the same name as text, so "
                                      "one tensor would be lost; save it with distinct string keys")
            seen[str(k)] = k
    if "__metadata__" in out:
        raise CheckpointError(f"{source}: has a tensor named '__metadata__', a name safetensors reserves for its "
                              "header; rename that entry and re-save")
    return out


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_state_dict(obj: object, source: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """The state dict in ``obj`` (itself, or under a standard key of a training checkpoint);
    choices the user should hear of are appended to ``notes``."""
    if isinstance(obj, Mapping):
        if _is_state_dict(obj):
            return _string_keys(obj, source)
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                others = [str(k) for k, v in obj.items() if k != key and _is_state_dict(v)]
                if others:  # e.g. "state_dict" beside "state_dict_ema": say which one is merged
                    notes.append(f"{source} holds several state dicts ({', '.join([str(key), *others])}); using "
                                 f"{key!r}; to use another, save it alone (torch.save(ckpt[NAME], ...))")
                return _unwrap_state_dict(inner, source, notes)
        tensors = _string_keys({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, source)
        others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if tensors and (len(others) <= 1 or all(isinstance(obj[k], (int, float, str, bool, type(None))) for k in others)):
            # a state dict carrying one extra entry of any kind (a "_metadata" table) or a few plain
            # values ("epoch": 3, "arch": "mlp") beside it
            if others:
                one = len(others) == 1
                notes.append(f"{source}: ignored {'its entry' if one else 'its entries'} "
                             f"{preview([repr(str(k)) for k in others], 3)}, which "
                             f"{'is not a tensor' if one else 'are not tensors'}")
            return tensors
        if tensors:
            raise CheckpointError(
                f"{source}: holds tensors beside entries that are not ({preview([repr(str(k)) for k in others], 3)}) "
                "and no 'state_dict' or 'model' entry; save `model.state_dict()` alone"
            )
    kind = type(obj).__name__
    if isinstance(obj, Mapping):
        inner = [str(k) for k, v in obj.items() if _is_state_dict(v)]
        if inner:  # e.g. only {"state_dict_ema": {...}}: a name modelmerge does not pick on its own
            raise CheckpointError(
                f"{source}: holds state dicts under {preview([repr(k) for k in inner], 3)}, not under a name modelmerge "
                f"takes on its own ({', '.join(_WRAPPER_KEYS)}); save the one you mean alone, e.g. "
                f"torch.save(ckpt[{inner[0]!r}], 'weights.pt')")
    raise CheckpointError(
        f"{source}: holds a {kind}, not a state dict of tensors; save `model.state_dict()` "
        "(or a dict with a 'state_dict' entry)"
    )


def _is_npz(path: Path) -> bool:
    """Whether a zip archive is NumPy's (every member a ``.npy``) rather than torch.save's."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _read_torch(path: Path, source: str, notes: list[str]) -> dict[str, torch.Tensor]:
    import warnings

    resave = "re-save it as `torch.save(model.state_dict(), ...)` or as safetensors"
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{source}: cannot read it ({e.strerror})") from None
    if not head:
        raise CheckpointError(f"{source}: is empty (0 bytes); re-download or re-save it")
    fmt = _format_of(head)
    if fmt == "safetensors":
        raise CheckpointError(f"{source}: is a safetensors file with a PyTorch name; rename it to .safetensors")
    if fmt is None:
        raise CheckpointError(f"{source}: is not a PyTorch checkpoint (neither a zip archive nor a pickle); "
                              "pass a .pt/.pth/.bin file written by torch.save, or a .safetensors file")
    if head[:2] == b"PK" and _is_npz(path):
        raise CheckpointError(f"{source}: is a NumPy .npz archive, not a checkpoint (modelmerge reads .npz files as "
                              "data, --data); save the weights as tensors: torch.save(state_dict, 'weights.pt') or "
                              "safetensors")
    try:
        with warnings.catch_warnings():  # torch's warnings (TorchScript, pickle protocol) are restated below
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg:  # a class or function to import: code
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            raise CheckpointError(_pickled_objects_message(source, found.group(1) if found else None)) from None
        if "Weights only load failed" in msg:  # e.g. pickle.dump or an old protocol: not a weights-only pickle
            raise CheckpointError(
                f"{source}: holds a pickle that weights-only loading cannot read (written by pickle.dump or "
                f"with another pickle protocol), and modelmerge never unpickles anything else; {resave}"
            ) from None
        raise CheckpointError(
            f"{source}: cannot read as a PyTorch checkpoint, the file is truncated or corrupt "
            f"({one_line(e)}); re-download or re-save it"
        ) from None
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises anything (IndexError, KeyError, ...)
        if "TorchScript" in str(e):
            raise CheckpointError(
                f"{source}: is a TorchScript archive (torch.jit.save), whose code modelmerge never runs; {resave}"
            ) from None
        raise CheckpointError(
            f"{source}: cannot read as a PyTorch checkpoint, the file is truncated or corrupt "
            f"({one_line(e)}); re-download or re-save it"
        ) from None
    return _unwrap_state_dict(obj, source, notes)


#: pickled functions that run commands or code when a pickle is loaded
_CODE_CALLS = ("posix.system", "nt.system", "os.system", "builtins.eval", "builtins.exec", "subprocess.",
               "os.popen", "posix.popen", "builtins.__import__", "runpy.")


def _pickled_objects_message(source: str, name: str | None) -> str:
    """Why a pickle with a global in it is refused, and what to do, by what the global is."""
    if name is not None and name.startswith(_CODE_CALLS):
        return (f"{source}: holds a pickled reference to {name}, a function that runs commands or code (loading "
                "the file could call it), which modelmerge never unpickles: it is not a plain checkpoint; do not "
                "load it, and get the weights from a source you trust")
    if name is not None and name.split(".")[0] == "numpy":
        return (f"{source}: holds NumPy arrays ({name}), which modelmerge never unpickles; save tensors instead, e.g. "
                "torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, 'weights.pt'), or as safetensors")
    what = f" ({name})" if name else ""
    return (f"{source}: contains pickled Python objects{what}: a whole model saved with torch.save(model), or objects "
            "in hyperparameters or callback state. modelmerge never unpickles them (loading them runs code from the "
            "file); if you trust the file, re-save its weights in Python: torch.save(model.state_dict(), "
            "'weights.pt') for a model, torch.save(ckpt['state_dict'], 'weights.pt') for a training checkpoint")


def _sniff_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    with open(path, "rb") as f:
        head = f.read(9)
    fmt = _format_of(head)
    if fmt is not None:
        return fmt
    raise CheckpointError(
        f"{path}: unknown checkpoint format (expected .safetensors, .pt, .pth or .bin)"
    )


def check_kinds(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse tensors modelmerge cannot align or merge, naming the first one.

    Real floating-point tensors are weights; integer and boolean tensors are
    buffers (``num_batches_tracked``, masks, index tables): permuted where the spec
    says so, copied from A in merges. Complex, sparse, quantized and meta tensors,
    and a state dict whose tensors are all empty, are refused.

    Raises:
        CheckpointError: naming the tensor and its kind.
    """
    for name, t in state.items():
        if t.is_sparse or t.layout != torch.strided:
            kind = f"a sparse ({t.layout}) tensor"
        elif t.is_meta:
            kind = "a meta tensor (no values were saved)"
        elif t.is_quantized:
            kind = "a quantized tensor"
        elif t.is_complex():
            kind = f"a complex tensor ({t.dtype})"
        else:
            continue
        raise CheckpointError(f"{source}: {name!r} is {kind}, which modelmerge cannot align or merge; save dense "
                              "real-valued weights (e.g. model.float().state_dict())")
    if all(t.numel() == 0 for t in state.values()):
        raise CheckpointError(f"{source}: every tensor in it is empty; pass a trained model's checkpoint")


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first tensor with NaN or infinite values."""
    for name, t in state.items():
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            raise CheckpointError(
                f"{source}: tensor {name!r} contains NaN or infinite values; "
                "use a checkpoint from before training diverged"
            )


def load_checkpoint(source: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """Load a state dict from a file or a hub id.

    Args:
        source: ``.safetensors``, ``.pt``/``.pth``/``.bin`` path, or a hub id
            (``user/repo``, ``user/repo/file.safetensors``, ``hf://...``).
        revision: hub revision; ignored for local files.

    Returns:
        A :class:`Checkpoint` whose ``state`` maps names to CPU tensors.

    Raises:
        CheckpointError: missing, unreadable, corrupt or non-finite checkpoint,
            or a file that would need unpickling code.
    """
    source = str(source)
    path = resolve_source(source, revision)
    notes: list[str] = []
    parts: tuple[Path, ...] = ()
    if path.name.lower().endswith(".index.json"):
        state, metadata, parts = _read_sharded(path, source, revision, notes)
        fmt = "sharded"
    else:
        shard = _SHARD_NAME.search(path.name)
        if shard is not None and int(shard.group(2)) > 1:
            raise CheckpointError(
                f"{source}: is shard {int(shard.group(1))} of {int(shard.group(2))} of a sharded checkpoint, a part "
                f"of the model; pass the folder that holds all shards and its index ({' or '.join(INDEX_FILES)}), "
                "or the index itself")
        fmt = _sniff_format(path)
        state, metadata = _read_one(path, fmt, source, notes)
    if not state:
        raise CheckpointError(f"{source}: holds no tensors; pass a model checkpoint")
    check_kinds(state, source)
    check_finite(state, source)
    return Checkpoint(state=state, metadata=metadata, path=path, source=source, notes=tuple(notes),
                      ordered=fmt == "torch", parts=parts)


def _read_one(path: Path, fmt: str, source: str, notes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if fmt == "safetensors":
        return _read_safetensors(path, source)
    return _read_torch(path, source, notes), {}


def _read_sharded(index: Path, source: str, revision: str | None, notes: list[str]):
    """The state dict of a sharded checkpoint: every shard its index (``weight_map``: tensor name ->
    shard file, beside the index) names, each holding exactly the tensors the index gives it.

    Returns:
        ``(state, metadata, shard paths)``; the metadata is the first shard's.

    Raises:
        CheckpointError: an unreadable index, a missing shard, or shards that disagree with the index.
    """
    from modelmerge.errors import ModelMergeError, parse_json, read_text

    try:
        data = parse_json(read_text(index, f"the index {source}"), f"the index {source}",
                          fix="re-download the checkpoint")
    except ModelMergeError as e:
        raise CheckpointError(str(e)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{source}: is not a sharded checkpoint's index (no 'weight_map' of tensor names to "
                              "shard files); pass a checkpoint file")
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{source}: names the shard {name!r} outside its folder; re-download the checkpoint")
    state: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    paths = []
    for i, name in enumerate(files):
        shard = _shard_path(index, name, source, revision)
        fmt = _sniff_format(shard)
        part, meta = _read_one(shard, fmt, f"{source} (shard {name})", notes)
        expected = {k for k, v in weight_map.items() if v == name}
        if set(part) != expected or set(part) & set(state):
            wrong = sorted((set(part) ^ expected) | (set(part) & set(state)))
            raise CheckpointError(f"{source}: the shard {name} does not hold what the index says "
                                  f"(e.g. {wrong[0]!r}); re-download the checkpoint")
        state.update(part)
        metadata = metadata if i else meta
        paths.append(shard)
    return state, metadata, tuple(paths)


def _shard_path(index: Path, name: str, source: str, revision: str | None) -> Path:
    """A shard beside its index; for a hub id, fetched beside it (the hub's cache) if not there yet."""
    local = index.parent / name
    if local.is_file():
        return local
    if _looks_like_hub_id(source) and not Path(source).expanduser().exists():
        parts = source.removeprefix("hf://").split("/")
        sub = "/".join(parts[2:-1]) if parts[-1].endswith(".json") else "/".join(parts[2:])
        try:
            return Path(_hub_download("/".join(parts[:2]), f"{sub}/{name}" if sub else name, revision))
        except Exception as e:  # noqa: BLE001 - the hub's many error types: one line either way
            raise CheckpointError(f"{source}: cannot fetch the shard {name} ({one_line(e)})") from None
    raise CheckpointError(f"{source}: the shard {name} its index names is missing from {index.parent}; "
                          "download every shard")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except (OSError, RuntimeError):  # RuntimeError: a loop of symbolic links (Python < 3.13)
        return False


def resolved(path: str | os.PathLike) -> Path:
    """``path`` made absolute with its links followed, or just absolute where they loop."""
    p = Path(path).expanduser()
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


def _loops(path: Path) -> bool:
    try:
        path.resolve(strict=False)
    except RuntimeError:
        return True
    except OSError as e:
        return e.errno == 40  # ELOOP (Python >= 3.13 raises it as OSError)
    return False


def check_output_path(
    output: str | os.PathLike,
    inputs: Sequence[str | os.PathLike | None] = (),
    force: bool = False,
    suffix: str = ".safetensors",
) -> Path:
    """Check, before any work, that ``output`` can be written safely.

    Args:
        output: the file to write.
        inputs: every path the command reads (checkpoints, data files, spec files, aligner
            folders or files; None and names that are not paths are ignored); a folder
            counts as the files directly in it.
        force: allow replacing an existing file that is not an input.
        suffix: the extension ``output`` must have.

    Raises:
        OutputError: ``output`` is an input, exists without ``force``, is a folder,
            or its folder does not exist or is not writable.
    """
    out = Path(output).expanduser()
    for inp in inputs:
        if inp is None:
            continue
        where = Path(inp).expanduser()
        if where.name.lower().endswith(".index.json"):  # a sharded checkpoint: its shards lie beside its index
            where = where.parent
        if _same_file(out, where) or (where.is_dir() and _same_file(out.parent, where) and out.exists()):
            raise OutputError(
                f"output {out} is also an input; write to a new file (inputs are never overwritten)"
            )
    if out.is_dir():
        raise OutputError(f"output {out} is a folder; give a file name such as {out}/out.safetensors")
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists; pass --force to overwrite it")
    if out.is_symlink() and not out.exists() and not force:
        raise OutputError(f"output {out} already exists as a broken symbolic link (to {os.readlink(out)}); "
                          "pass --force to replace the link, or choose another name")
    if out.is_symlink() and not out.exists() and _loops(out):  # --force cannot write through a loop
        raise OutputError(f"output {out} is a loop of symbolic links; remove it or choose another name")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a folder; choose another path")
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: folder {parent} does not exist; create it first")
    try:  # a real probe: os.access says yes to root even on read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".modelmerge-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"cannot write {out}: folder {parent} is not writable ({e.strerror}); choose another folder"
        ) from None
    if out.name.lower() == suffix:  # a bare ".safetensors" is a hidden file without a suffix to Python
        raise OutputError(f"output {out} has no name before {suffix}; give one, e.g. out{suffix}")
    if out.suffix.lower() != suffix:
        what = {".safetensors": "modelmerge writes checkpoints as safetensors only", ".json": "a JSON file",
                ".png": "a PNG image"}.get(suffix, f"a {suffix} file")
        raise OutputError(f"output {out} must end in {suffix} ({what})")
    return out


def save_checkpoint(
    state: Mapping[str, torch.Tensor],
    output: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    inputs: Sequence[str | os.PathLike | None] = (),
    force: bool = False,
    check_values: bool = True,
) -> Path:
    """Write a state dict as safetensors, atomically.

    The tensors go to a temporary file in the output's folder which is renamed
    over the output only once complete, so a failure never leaves a partial file.

    Args:
        state: name -> tensor (written as is where possible: only a non-contiguous
            tensor, or one sharing storage with another, is copied).
        output: target ``.safetensors`` path.
        metadata: string metadata for the header (e.g. provenance); ``format: pt`` is added
            when it has entries but no ``format`` (Hugging Face's loaders need it then).
        inputs: paths that must never be overwritten.
        force: allow replacing an existing (non-input) file.
        check_values: refuse NaN or infinite values (:func:`check_writable_values`); a zoo,
            which retrains a diverged model on its next run, writes them.

    Returns:
        The written path.

    Raises:
        OutputError: the path is unsafe or the write fails.
    """
    out = check_output_path(output, inputs, force)
    if "__metadata__" in state:
        raise OutputError(f"cannot write {out}: a tensor is named '__metadata__', which safetensors reserves "
                          "for its header; rename it")
    for name in state:
        if _utf8(name) != name:
            raise OutputError(f"cannot write {out}: the tensor name {_utf8(name)!r} is not valid UTF-8 text; rename it")
    if check_values:
        check_writable_values(state, out)
    tensors = _unshared(state)
    # text that is not valid UTF-8 (a file name's undecodable bytes arrive as lone surrogates) would make
    # a header no reader accepts: such characters are written as escapes
    meta = {_utf8(str(k)): _utf8(str(v)) for k, v in (metadata or {}).items()}
    if meta and "format" not in meta:  # transformers' from_pretrained (4.x) refuses metadata without it
        meta = {"format": "pt", **meta}
    with atomic_path(out, replace=force) as tmp:
        if sys.byteorder == "little" and all(t.dtype in _SAFETENSORS_DTYPES for t in tensors.values()):
            _write_safetensors(tmp, tensors, meta)
        else:  # a dtype this writer does not name: the library's writer (which holds a copy of every tensor)
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=meta)
    return out


def check_writable_values(state: Mapping[str, torch.Tensor], out: str | os.PathLike) -> None:
    """Refuse to write NaN or infinite values (a checkpoint modelmerge itself would refuse to read),
    e.g. a float16 merge at a far extrapolation that overflowed.

    Raises:
        OutputError: naming the first such tensor.
    """
    for name, t in state.items():
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            why = (f"{t.dtype} overflowed; use an --alpha nearer [0, 1] or float32 checkpoints"
                   if t.dtype in (torch.float16, torch.bfloat16) or t.element_size() == 1 else
                   "the computation diverged: an --alpha far outside [0, 1], or a zoo's training (lower --lr)")
            raise OutputError(f"{out} not written: its tensor {name!r} would hold NaN or infinite values ({why})")


#: elements checked at once by :func:`_all_finite`: bounds its temporaries (float8 is widened to float32)
_CHECK_CHUNK = 1 << 22


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, checked a slice at a time (a whole-tensor check of a
    1 GiB float8 tensor took ~5 GiB of temporaries)."""
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHECK_CHUNK):
        part = flat[start:start + _CHECK_CHUNK]
        if not bool(torch.isfinite(part if part.element_size() > 1 else part.float()).all()):
            return False
    return True


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write the safetensors format tensor by tensor (``safetensors.torch.save_file`` first copies
    every tensor to bytes: one more whole checkpoint in memory).

    Layout as the library writes it: an 8-byte little-endian header length, the JSON header
    (``__metadata__`` and per tensor dtype, shape and data offsets, padded with spaces to a
    multiple of 8), then the tensors' bytes back to back, largest element size first, then by name.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for k in order:
            t = tensors[k]
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the tensor's own bytes, no copy


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage (safetensors refuses shared ones), copying only those.

    A copy of every tensor would double the memory a large save needs.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().to("cpu")
        if not t.is_contiguous():
            t = t.contiguous()  # a fresh copy
        elif t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()  # e.g. tied weights: one storage, two names
            else:
                seen.add(ptr)
        out[k] = t
    return out


@contextmanager
def atomic_path(out: str | os.PathLike, replace: bool = True) -> Iterator[str]:
    """Yield a temporary path in ``out``'s folder; rename it to ``out`` if the block succeeds.

    On any failure the temporary file is removed and ``out`` is untouched. With
    ``replace=False`` the final name is created exclusively (a hard link, which
    fails if the name exists): of two writers racing to one new path, exactly one
    succeeds and the other gets an error, instead of silently replacing it.

    Raises:
        OutputError: the file cannot be created, written or renamed, or (``replace=False``)
            ``out`` appeared meanwhile.
    """
    out = Path(out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}; check the folder and permissions") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        if replace:
            os.replace(tmp, out)
        else:
            _link_exclusive(tmp, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}; check free space and permissions") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _link_exclusive(tmp: str, out: Path) -> None:
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OutputError(f"output {out} appeared while it was being written (another process?); pass --force "
                          "to overwrite it") from None
    except OSError:  # a file system without hard links: the exists check and the rename are all there is
        if out.exists():
            raise OutputError(f"output {out} already exists; pass --force to overwrite it") from None
        os.replace(tmp, out)


def write_json_atomic(path: str | os.PathLike, data: object, replace: bool = True) -> None:
    """Write ``data`` as indented JSON through :func:`atomic_path` (no partial file on failure)."""
    with atomic_path(path, replace) as tmp:
        Path(tmp).write_text(json.dumps(clean_json(data), indent=2) + "\n")


def clean_json(obj: object) -> object:
    """``obj`` with every string valid UTF-8 (a file name's undecodable bytes escaped, as in metadata)
    and every non-finite float null: strict JSON parsers refuse lone surrogates, ``NaN`` and ``Infinity``."""
    if isinstance(obj, str):
        return _utf8(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {clean_json(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def provenance(method: str, *checkpoints: Checkpoint, arch_of: Checkpoint | None = None,
               own_of: Sequence[Checkpoint] = (), **extra: object) -> dict[str, str]:
    """Metadata recording how an output was made: version, method, input hashes; and the inputs' own.

    The inputs' own entries (those not starting with ``modelmerge.``) that every checkpoint in
    ``own_of`` holds with one value are kept (:func:`save_checkpoint` adds ``format``).

    Args:
        method: what made the output.
        checkpoints: the inputs (A, B), hashed into the metadata.
        arch_of: the input whose architecture record the output carries on (the
            output then runs with the same forward), if any.
        own_of: the inputs whose own metadata the output keeps (B's for aligned B;
            all of them for a merge).
        extra: more ``modelmerge.KEY`` entries (non-strings as JSON).
    """
    from modelmerge import __version__

    meta = {}
    if own_of:
        first, *rest = own_of
        meta.update({k: v for k, v in first.metadata.items() if not k.startswith(META_PREFIX)
                     and all(ck.metadata.get(k) == v for ck in rest)})
    meta.update({META_PREFIX + "version": __version__, META_PREFIX + "method": method})
    if arch_of is not None and arch_of.arch is not None:  # .arch validates: a bad record is an error
        meta[META_PREFIX + "arch"] = arch_of.metadata[META_PREFIX + "arch"]
    for label, ck in zip("ab", checkpoints):
        meta[f"{META_PREFIX}input_{label}"] = ck.source
        meta[f"{META_PREFIX}input_{label}_sha256"] = ck.sha256
    for key, value in extra.items():
        meta[META_PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
    return meta
