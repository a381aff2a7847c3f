"""Architecture records: small JSON descriptions that turn into ``nn.Module`` s.

A record is stored in a checkpoint's safetensors metadata under
``modelmerge.arch``; with it every command knows the real forward, so
verification and evaluation need no other input. Two families:

* ``{"family": "mlp", "widths": [64, 128, 128, 128, 10], "activation": "relu"}``:
  Linear layers ``widths[i] -> widths[i+1]`` with the activation between them.
* ``{"family": "cnn", "input_shape": [1, 8, 8], "channels": [16, 32], "kernel": 3,
  "batchnorm": false, "hidden": [64], "num_classes": 10, "activation": "relu"}``:
  each conv (padding ``kernel // 2``) is followed by optional BatchNorm, the
  activation and, unless ``"pool": false``, 2x max pooling (while the map is
  larger than 1), then
  flatten, Linear layers of widths ``hidden`` and a Linear head.

Builders return ``nn.Sequential`` so the state-dict keys (``0.weight``, ...)
are the same whether a model was built here or inferred from a bare file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch
from torch import nn

from modelmerge.data import Dataset
from modelmerge.errors import ModelMergeError, one_line, preview

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}
FAMILIES = ("mlp", "cnn")


class ArchError(ModelMergeError):
    """An architecture record is malformed."""


def _ints(record: Mapping, key: str, min_len: int = 0) -> list[int]:
    value = record.get(key)
    if not isinstance(value, list) or len(value) < min_len or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ArchError(f"architecture record: {key!r} must be a list of at least {min_len} positive integers")
    return value


def validate_record(record: Mapping) -> dict:
    """Check a record and return it with defaults filled in.

    Raises:
        ArchError: unknown family or activation, or malformed fields.
    """
    if not isinstance(record, Mapping):
        raise ArchError("architecture record must be a JSON object")
    family = record.get("family")
    if family not in FAMILIES:
        raise ArchError(f"unknown architecture family {family!r}; known: {', '.join(FAMILIES)}")
    act = record.get("activation", "relu")
    if act not in ACTIVATIONS:
        raise ArchError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    out = dict(record, activation=act)
    if family == "mlp":
        _ints(record, "widths", 2)
    else:
        shape = _ints(record, "input_shape", 2)
        if len(shape) not in (2, 3):
            raise ArchError("architecture record: cnn 'input_shape' must be [C, L] or [C, H, W]")
        _ints(record, "channels", 1)
        out.setdefault("kernel", 3)
        out.setdefault("batchnorm", False)
        out.setdefault("pool", True)
        if not isinstance(out["batchnorm"], bool) or not isinstance(out["pool"], bool):
            raise ArchError("architecture record: cnn 'batchnorm' and 'pool' must be true or false")
        out["hidden"] = _ints(record, "hidden") if "hidden" in record else []
        if not isinstance(record.get("num_classes"), int) or record["num_classes"] < 1:
            raise ArchError("architecture record: cnn needs a positive integer 'num_classes'")
    return out


def build(record: Mapping, seed: int | None = None) -> nn.Sequential:
    """Build the module a record describes (initialised from ``seed`` if given).

    Raises:
        ArchError: the record is malformed.
    """
    r = validate_record(record)
    if seed is not None:
        torch.manual_seed(seed)
    act = ACTIVATIONS[r["activation"]]
    layers: list[nn.Module] = []
    if r["family"] == "mlp":
        widths = r["widths"]
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(widths) - 2:
                layers.append(act())
        return nn.Sequential(*layers)
    c, *spatial = r["input_shape"]
    conv, bn, pool = (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d) if len(spatial) == 1 else (
        nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
    for ch in r["channels"]:
        layers.append(conv(c, ch, r["kernel"], padding=r["kernel"] // 2))
        if r["batchnorm"]:
            layers.append(bn(ch))
        layers.append(act())
        if r["pool"] and min(spatial) > 1:
            layers.append(pool(2))
            spatial = [s // 2 for s in spatial]
        c = ch
    layers.append(nn.Flatten())
    n = c * math.prod(spatial)
    for h in r["hidden"]:
        layers += [nn.Linear(n, h), act()]
        n = h
    layers.append(nn.Linear(n, r["num_classes"]))
    return nn.Sequential(*layers)


def input_shape(record: Mapping) -> tuple[int, ...]:
    """Shape of one input sample for the record's model."""
    r = validate_record(record)
    return (r["widths"][0],) if r["family"] == "mlp" else tuple(r["input_shape"])


def record_to_json(record: Mapping) -> str:
    return json.dumps(validate_record(record), sort_keys=True)


def record_from_json(text: str) -> dict:
    from modelmerge.errors import parse_json

    return validate_record(parse_json(text, "architecture record", ArchError))


def num_outputs(record: Mapping) -> int:
    """How many outputs (classes) the record's model has."""
    r = validate_record(record)
    return r["widths"][-1] if r["family"] == "mlp" else r["num_classes"]


def fit_inputs(record: Mapping, data: Dataset) -> Dataset:
    """The dataset shaped for the record's model (flattened for MLPs).

    Raises:
        DataError: the data's input size or class count does not fit the record.
    """
    return data.shaped(input_shape(record), num_outputs(record))


def build_for(record: Mapping, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The record's module holding ``state`` (eval mode), checked against it before any allocation.

    The record is first built on the meta device (no memory), so a record claiming
    absurd widths fails on the key comparison instead of allocating them.

    Raises:
        ArchError: the record is malformed or the state dict does not fit it.
    """
    check_fits(record, state)
    return load_strict(build(record), state, "its architecture record")


def check_fits(record: Mapping, state: Mapping[str, torch.Tensor]) -> None:
    """Check that ``state`` has exactly the record's keys and shapes, building it on the meta device only.

    Raises:
        ArchError: the record is malformed, cannot be built, or the state dict does not fit it.
    """
    try:
        with torch.device("meta"):
            shapes = build(record)
    except (RuntimeError, ValueError, OverflowError) as e:  # e.g. widths whose sizes overflow torch's storage
        raise ArchError(f"the architecture record describes a model that cannot be built ({one_line(e)})") from None
    _compare(shapes.state_dict(), state, "its architecture record")


def _compare(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {preview(keys, 4)}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise ArchError(f"the checkpoint does not fit {what} ({detail})")


def tied_keys(module: nn.Module) -> dict[str, str]:
    """Keys of ``module``'s state dict that name a tensor an earlier key already names (tied weights,
    e.g. GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``): alias -> first name."""
    first: dict[int, str] = {}
    out = {}
    for k, t in module.state_dict(keep_vars=True).items():
        owner = first.setdefault(id(t), k)
        if owner != k:
            out[k] = owner
    return out


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Load ``state`` into ``module`` strictly (eval mode), or say which keys do not fit.

    A tied weight may be saved once (``save_pretrained`` drops ``lm_head.weight``): a key
    missing from ``state`` whose tensor is another key's is filled from that key.

    Args:
        module: the model to fill.
        state: the checkpoint's state dict.
        what: how the error names the model, e.g. ``"its architecture record"``.

    Raises:
        ArchError: missing, unexpected or wrongly shaped keys (named, sorted).
    """
    state = dict(state)
    tied = tied_keys(module)
    for alias, owner in tied.items():
        if alias not in state and owner in state:
            state[alias] = state[owner]
        elif owner not in state and alias in state:
            state[owner] = state[alias]
    ref = module.state_dict()
    _compare(ref, state, what)
    if tied or any(v.is_inference() for v in state.values()):
        module.load_state_dict(state)  # assigning would untie the shared tensor / cannot take inference tensors
    else:
        # the module takes the checkpoint's own tensors (converted only where the dtype differs): no second
        # copy of the weights in memory; nothing modelmerge runs changes a module's tensors in place
        # detached: the caller's own Parameters (a keep_vars state dict) keep their requires_grad
        module.load_state_dict({k: (v if v.dtype == ref[k].dtype else v.to(ref[k].dtype)).detach()
                                for k, v in state.items()}, assign=True)
    return module.eval()
