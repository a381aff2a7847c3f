"""Merging aligned checkpoints by linear interpolation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from modelmerge.errors import MismatchError, ModelMergeError, preview


def as_state_dict(state, name: str = "A", finite: bool = True) -> dict[str, torch.Tensor]:
    """A library caller's state dict, checked as a loaded checkpoint is, without touching it.

    Accepts a mapping of names to tensors (``model.state_dict()``, ``torch.load``'s or
    ``safetensors.torch.load_file``'s result) or a :class:`~modelmerge.checkpoint.Checkpoint`.
    Tensors that require gradients come back detached (same storage; nothing is copied).
    ``finite=False`` skips the pass over every value (for merges, which a NaN cannot break).

    Raises:
        ModelMergeError: not a mapping, or a value that is not a tensor.
        CheckpointError: complex, sparse, quantized or meta tensors, or NaN/infinite values.
    """
    from modelmerge.checkpoint import Checkpoint, check_finite, check_kinds

    if isinstance(state, Checkpoint):
        state = state.state
    if not isinstance(state, Mapping):
        raise ModelMergeError(f"{name} must be a state dict (parameter name -> tensor), not a {type(state).__name__}; "
                              "pass model.state_dict() or a loaded Checkpoint's .state")
    for key, t in state.items():
        if not isinstance(key, str):
            raise ModelMergeError(f"{name} has a key {key!r} that is not a parameter name (str); pass model.state_dict()")
        if not isinstance(t, torch.Tensor):
            raise ModelMergeError(f"{name}[{key!r}] is a {type(t).__name__}, not a tensor; pass model.state_dict() or "
                                  "a loaded Checkpoint's .state")
    check_kinds(state, name)
    if finite:
        check_finite(state, name)
    return {k: t.detach() if t.requires_grad else t for k, t in state.items()}


def wrapper_prefix(keys: Sequence[str], names: set[str]) -> str | None:
    """The prefix (``module.``, ``model.``, ``_orig_mod.``, or several) that every key in ``keys`` has and
    whose removal gives ``names`` (or a superset), if there is one: a state dict saved from a wrapper."""
    if not keys or not names:
        return None
    parts = keys[0].split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i]) + "."
        if all(k.startswith(prefix) for k in keys) and names <= {k[len(prefix):] for k in keys}:
            return prefix
    return None


def check_same_architecture(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: tuple[str, str] = ("A", "B")
) -> None:
    """Raise MismatchError, naming the offending keys, unless a and b have equal keys and shapes."""
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"only in {names[0]}: {preview(only_a)}")
        if only_b:
            parts.append(f"only in {names[1]}: {preview(only_b)}")
        for (x, nx), (y, ny) in (((a, names[0]), (b, names[1])), ((b, names[1]), (a, names[0]))):
            prefix = wrapper_prefix(list(x), set(y))
            if prefix is not None and len(x) == len(y):  # e.g. one saved from DataParallel ('module.')
                raise MismatchError(
                    f"{nx}'s names are {ny}'s with the prefix {prefix!r} (saved from a wrapper: DataParallel adds "
                    f"'module.', torch.compile '_orig_mod.', a Lightning module its attribute); re-save {nx} with "
                    "the prefix removed (e.g. model.module.state_dict())")
        raise MismatchError(
            f"{names[0]} and {names[1]} have different parameters ({'; '.join(parts)}); "
            "pass checkpoints of one architecture"
        )
    bad = [f"{k} {list(a[k].shape)} vs {list(b[k].shape)}" for k in a if a[k].shape != b[k].shape]
    if bad:
        raise MismatchError(
            f"{names[0]} and {names[1]} differ in shape at {preview(bad, 3)}; "
            "pass checkpoints of one architecture and one set of widths"
        )


def check_mergeable(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                    names: tuple[str, str] = ("A", "B")) -> None:
    """Refuse what a merge, which averages floating-point tensors and copies the others from the first
    model, would get wrong: a key that is floating-point in one model and not in the other, and integer
    tensors of several values that differ between them (weights quantized to int8: A's integers would be
    kept beside averaged scales). Counters (one value, e.g. ``num_batches_tracked``) may differ.

    Raises:
        MismatchError: naming the first such key and the fix.
    """
    for k, ta in a.items():
        tb = b[k]
        if ta.is_floating_point() != tb.is_floating_point():
            raise MismatchError(f"{names[0]}'s {k} is {ta.dtype} but {names[1]}'s is {tb.dtype}: a merge cannot mix "
                                "integer (quantized) and floating-point weights; dequantize to float first")
        if not ta.is_floating_point() and ta.numel() > 1 and not torch.equal(ta, tb):
            raise MismatchError(f"{k} is a {ta.dtype} tensor that differs between {names[0]} and {names[1]} "
                                "(int8-quantized weights?): a merge averages only floating-point tensors and would "
                                "keep one model's integers; dequantize both checkpoints to float first")


#: the largest |alpha| accepted: far past any useful extrapolation, and float32 overflows past ~3e38
ALPHA_LIMIT = 1000.0


def interpolate(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * A + alpha * B`` per tensor.

    Integer and boolean buffers (e.g. BatchNorm's ``num_batches_tracked``) are
    copied from A (those of several values must be equal in B: :func:`check_mergeable`). ``alpha = 0`` returns A's values and ``alpha = 1`` B's, exactly.

    Args:
        a, b: state dicts with equal keys and shapes (B already aligned to A), or loaded
            Checkpoints; read detached, so the result carries no gradient (:func:`mix` does).
        alpha: weight of B, usually in [0, 1] (values outside extrapolate).

    Returns:
        A new state dict in A's key order and dtypes.

    Raises:
        MismatchError: keys or shapes differ, or integer tensors do (:func:`check_mergeable`).
        ModelMergeError: alpha is not a finite number within ±:data:`ALPHA_LIMIT`, or a state dict
            is not one of tensors (see :func:`as_state_dict`).
    """
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ModelMergeError(f"alpha must be a number (0 = A, 1 = B), got {alpha!r}") from None
    # no pass over the values: loaded checkpoints were checked, and a NaN cannot break a merge
    a, b = as_state_dict(a, "A", finite=False), as_state_dict(b, "B", finite=False)
    if not -ALPHA_LIMIT <= alpha <= ALPHA_LIMIT:  # NaN fails this too
        raise ModelMergeError(f"alpha must be a finite number from -{ALPHA_LIMIT:g} to {ALPHA_LIMIT:g} (0 = A, 1 = B; values "
                              f"outside [0, 1] extrapolate), got {alpha}")
    check_same_architecture(a, b)
    check_mergeable(a, b)
    return {k: narrow(mix(ta, b[k], alpha), ta.dtype) if ta.is_floating_point() else ta.clone() for k, ta in a.items()}


def narrow(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast to ``dtype``, with values beyond a float8's range made NaN: torch saturates them to
    its largest value (float8 e4m3 has no infinity), which would write a wrong merge silently, while
    NaN is refused by the output check (:func:`~modelmerge.checkpoint.check_writable_values`)."""
    if t.dtype != dtype and torch.finfo(dtype).bits == 8 and t.numel():
        beyond = t.abs() > torch.finfo(dtype).max
        if bool(beyond.any()):
            t = t.masked_fill(beyond, float("nan"))
    return t.to(dtype)


def mix(a: torch.Tensor, b: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``(1 - alpha) * a + alpha * b`` in at least float32; differentiable in all three.

    The one interpolation formula of the package (merges, the LMC refinement's
    α = 0.5 merge, the aligner's stacked LMC loss). Not ``lerp``: α = 0 and α = 1
    give the ends bit-for-bit. ``alpha`` may be a tensor broadcasting against
    ``a`` (one α per stacked pair).
    """
    # half precision and float8 mix in float32 (float8 has no type promotion at all)
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    if isinstance(alpha, torch.Tensor):
        return (1.0 - alpha) * a.to(work) + alpha * b.to(work)
    # one new tensor, not three: a VGG classifier weight is 400 MB, and each temporary would count
    return (a.to(work) * (1.0 - alpha)).add_(b.to(work), alpha=alpha)
