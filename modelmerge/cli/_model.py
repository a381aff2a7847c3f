"""``--model pkg.module:Class``: importing and building the user's model class (user code).

The only place that edits ``sys.path`` (the current folder is importable, as
for ``python -m``) and parses ``--model-kwargs`` / ``--input-shape``; what the
built module means for alignment is decided by
:func:`modelmerge.network.resolve_network`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from modelmerge.errors import ModelMergeError, one_line, parse_json
from modelmerge.merge import wrapper_prefix


def import_model_class(target: str):
    """Import ``pkg.module:Class`` (the current folder on the import path).

    Raises:
        ModelMergeError: bad form, missing module or attribute.
    """
    if ":" not in target:
        raise ModelMergeError(f"--model must look like package.module:ClassName, got {target!r}")
    module_name, _, attr = target.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelMergeError(f"cannot import {module_name!r} for --model ({one_line(e, 160)}); run from the folder that "
                              "holds it or install it") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - user code: SyntaxError, RuntimeError, even SystemExit
        raise ModelMergeError(f"importing {module_name!r} for --model failed ({type(e).__name__}: "
                              f"{one_line(e, 160)}); fix that module") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelMergeError(f"{module_name} has no {attr!r} (from --model {target})")
        obj = getattr(obj, part)
    return obj


def build_model(target: str, kwargs_json: str | None, state):
    """Build ``--model`` with ``--model-kwargs`` and load ``state`` strictly, in eval mode.

    Raises:
        ModelMergeError: the class cannot be built or the checkpoint does not fit it (keys named).
    """
    from modelmerge.archs import load_strict

    cls = import_model_class(target)
    kwargs = parse_json(kwargs_json, "--model-kwargs") if kwargs_json else {}
    if not isinstance(kwargs, dict):
        raise ModelMergeError("--model-kwargs must be a JSON object, e.g. '{\"width\": 64}'")
    if not callable(cls):
        raise ModelMergeError(f"--model {target} is not a class or function that builds a model")
    try:
        model = cls(**kwargs)
    except ModelMergeError as e:  # a builder of ours (modelmerge.hf:build) saying what is wrong
        raise ModelMergeError(f"--model {target}: {e}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - user code, SystemExit included
        raise ModelMergeError(f"cannot build {target}({kwargs}): {type(e).__name__}: {one_line(e, 160)}") from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelMergeError(f"--model {target} built a {type(model).__name__}, not a torch.nn.Module")
    try:
        return load_strict(model, state, target)
    except ModelMergeError as e:
        prefix = wrapper_prefix(list(state), set(model.state_dict()))
        if prefix is not None:
            # saved from a wrapper: DataParallel ('module.'), Lightning ('model.'), torch.compile ('_orig_mod.')
            raise ModelMergeError(
                f"the checkpoint's names start with {prefix!r} (saved from a wrapper: DataParallel adds 'module.', "
                f"a Lightning module its attribute, torch.compile '_orig_mod.') but {target}'s do not; re-save the "
                "state dict with the prefix removed (e.g. model.module.state_dict())"
            ) from None
        if type(model).__module__.startswith("transformers."):
            # transformers renames some saved layouts as from_pretrained loads them (a class's names change
            # between versions), which a strict load of the raw file does not do
            raise ModelMergeError(
                f"{e}; check --model-kwargs, or, for a folder written by save_pretrained with another transformers "
                "version, re-save each model's state_dict() after from_pretrained (which renames old names) and "
                "align those files") from None
        raise ModelMergeError(f"{e}; check --model-kwargs") from None


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 1,28,28`` as a tuple (None when not given)."""
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ModelMergeError(f"--input-shape must be comma-separated integers like 1,28,28; got {text!r}") from None
