"""Permutation specs: which permutation group acts on which axis of which parameter.

A :class:`PermutationSpec` is plain data. It names, for every parameter, the
group acting on each axis (``None`` for a fixed axis), and each group's size.
An axis whose length is ``k`` times its group's size is permuted in contiguous
blocks of ``k`` (a linear layer reading a flattened ``[C, H, W]`` feature map:
``k = H * W``). An axis may also be a concatenation of *segments*
``((group_or_None, length), ...)`` (a packed attention projection, a conv reading
``cat(x0, x1)``), each permuted by its own group (in blocks, as above) or fixed.
*Head sets* (:class:`HeadSet`) tie groups into chunks that move together
(attention heads, the channel groups of a grouped convolution). Everything else
(the gather indices, the weight-matching cost terms) is derived from it.

Specs come from (a) a JSON file (:meth:`PermutationSpec.load`), (b) inference
over a bare state dict for chains of Linear/Conv layers (:func:`infer_chain`,
:func:`infer_spec`), and later from an architecture record or a traced model.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import torch

from modelmerge.errors import SpecError, parse_json, preview

SPEC_FORMAT = "modelmerge.spec/1"
#: one part of a segmented axis: (group or None for fixed, length along the axis)
Segment = tuple[str | None, int]
#: one axis of a parameter: None (fixed), a group name, or a concatenation of segments
AxisEntry = str | tuple[Segment, ...] | None
Axes = tuple[AxisEntry, ...]
_SPEC_HINT = ("pass the model class with --model pkg.module:Class (traced spec and real forward), or write a spec "
              "file (docs/spec-format.md) and pass --spec FILE.json")


@dataclass(frozen=True)
class HeadSet:
    """Groups split into ``count`` equal chunks (heads) that move together.

    A valid permutation of member group ``g`` (size ``n``, chunk size ``c = n // count``)
    is ``perm[g][h*c + i] = pi[h]*c + sigma_{g,h}[i]``: one chunk permutation ``pi`` shared
    by every member, and within each chunk any permutation ``sigma_{g,h}`` of its ``c``
    units, free per member and per chunk; the identity for ``rigid`` members.

    Attributes:
        count: number of chunks (heads, or a grouped convolution's ``groups``).
        groups: member groups; all share one chunk permutation.
        rigid: members whose units never move within their chunk.
    """

    count: int
    groups: tuple[str, ...]
    rigid: tuple[str, ...] = ()

    def chunk(self, size: int) -> int:
        """Units per chunk of a member group of ``size`` units."""
        return size // self.count


def _axis_entry(p: str, a) -> AxisEntry:
    """Normalise one axis entry: None, a group name, or a tuple of ``(group or None, length)``."""
    if a is None or isinstance(a, str):
        return a
    if isinstance(a, (list, tuple)) and a and all(isinstance(s, (list, tuple)) and len(s) == 2 for s in a):
        segs = []
        for g, n in a:
            if not (g is None or isinstance(g, str)) or isinstance(n, bool) or not isinstance(n, int):
                break
            segs.append((g, int(n)))
        else:
            return tuple(segs)
    raise SpecError(
        f"spec parameter {p!r} has axis entry {a!r}; an axis is null, a group name, or a list of "
        "[group or null, length] segments"
    )


def _is_segmented(a: AxisEntry) -> bool:
    return a is not None and not isinstance(a, str)


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """Parameter -> permutation group per axis, plus each group's size.

    Args:
        groups: group name -> number of units it permutes.
        axes: parameter name -> one entry per tensor axis: a group name, None (fixed),
            or a tuple of segments ``((group_or_None, length), ...)`` whose lengths sum
            to the axis length (a concatenation; a segment's length is a multiple of
            its group's size, and it moves in blocks of ``length // size``).
        heads: head-set name -> :class:`HeadSet` (default none): groups whose units
            move in chunks, with one chunk permutation shared by the set.

    Raises:
        SpecError: an axis names an unknown group, a group has size < 1, a segment is
            malformed, or a head set is inconsistent (unknown or shared member, size
            not divisible by its count, rigid member not in the set).
    """

    groups: Mapping[str, int]
    axes: Mapping[str, Axes]
    heads: Mapping[str, HeadSet] = field(default_factory=dict)

    def __post_init__(self) -> None:
        groups = {str(g): int(n) for g, n in self.groups.items()}
        axes = {str(p): tuple(_axis_entry(str(p), a) for a in ax) for p, ax in self.axes.items()}
        for g, n in groups.items():
            if n < 1:
                raise SpecError(f"spec group {g!r} has size {n}; sizes must be at least 1")
        for p, ax in axes.items():
            for i, a in enumerate(ax):
                if a is None:
                    continue
                if isinstance(a, str):
                    if a not in groups:
                        raise SpecError(f"spec parameter {p!r} names unknown group {a!r}; declare it in 'groups'")
                    continue
                for g, n in a:
                    if g is not None and g not in groups:
                        raise SpecError(f"spec parameter {p!r} names unknown group {g!r}; declare it in 'groups'")
                    if n < 1:
                        raise SpecError(f"a segment of axis {i} of {p!r} has length {n}; lengths must be at least 1")
                    if g is not None and n % groups[g] != 0:
                        raise SpecError(
                            f"a segment of axis {i} of {p!r} has length {n}, not a multiple of group "
                            f"{g!r}'s size {groups[g]}"
                        )
        heads = {str(h): _head_set(str(h), hs, groups) for h, hs in self.heads.items()}
        owner: dict[str, str] = {}
        for h, hs in heads.items():
            for g in hs.groups:
                if g in owner:
                    raise SpecError(f"group {g!r} is in head sets {owner[g]!r} and {h!r}; a group belongs to at most one")
                owner[g] = h
        object.__setattr__(self, "groups", MappingProxyType(groups))
        object.__setattr__(self, "axes", MappingProxyType(axes))
        object.__setattr__(self, "heads", MappingProxyType(heads))
        object.__setattr__(self, "_head_of", owner)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return (dict(self.groups) == dict(other.groups) and dict(self.axes) == dict(other.axes)
                and dict(self.heads) == dict(other.heads))

    __hash__ = None  # type: ignore[assignment]

    @property
    def segmented(self) -> bool:
        """Whether any axis is a concatenation of segments."""
        return any(_is_segmented(a) for ax in self.axes.values() for a in ax)

    def head_of(self, group: str) -> str | None:
        """The name of the head set ``group`` belongs to, or None."""
        return self._head_of.get(group)  # type: ignore[attr-defined]

    def members(self, group: str) -> list[tuple[str, int]]:
        """The (parameter, axis) pairs a group acts on (in any segment of the axis), in spec order."""
        return [(p, i) for p, ax in self.axes.items() for i, a in enumerate(ax)
                if a == group or (type(a) is tuple and any(g == group for g, _ in a))]

    def segments(self, param: str, axis: int, length: int | None = None) -> list[tuple[str | None, int, int]]:
        """The segments of one axis as ``(group or None, start, length)``, in order.

        A fixed axis gives ``[]``; a plain group entry is one segment of the whole
        axis, whose length is ``length`` (the tensor's axis length; pass it for block
        axes) or else the group's size. A segmented entry gives its segments (checked
        against ``length`` when given).

        Raises:
            SpecError: ``length`` disagrees with the segments' total.
        """
        a = self.axes[param][axis]
        if a is None:
            return []
        if isinstance(a, str):
            return [(a, 0, self.groups[a] if length is None else int(length))]
        out, start = [], 0
        for g, n in a:
            out.append((g, start, n))
            start += n
        if length is not None and start != length:
            raise SpecError(f"the segments of axis {axis} of {param!r} sum to {start}, but the axis has length {length}")
        return out

    @property
    def fixed(self) -> list[str]:
        """Parameters no group touches (input/output layers' outer axes aside)."""
        return [p for p, ax in self.axes.items()
                if all(a is None or (_is_segmented(a) and all(g is None for g, _ in a)) for a in ax)]

    def check(self, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
        """Check that the spec covers ``state`` exactly, with consistent sizes.

        Raises:
            SpecError: keys missing on either side, wrong number of axes, an axis
                length that is not a multiple of its group's size, or segments whose
                lengths do not sum to their axis's length.
        """
        missing = sorted(set(state) - set(self.axes))
        extra = sorted(set(self.axes) - set(state))
        if missing:
            raise SpecError(
                f"the spec does not cover {len(missing)} parameter(s) of the {what}: "
                f"{preview(missing)}; add them (null axes hold them fixed)"
            )
        if extra:
            raise SpecError(
                f"the spec names {len(extra)} parameter(s) the {what} lacks: {preview(extra)}; "
                "is it the spec of another architecture?"
            )
        for p, ax in self.axes.items():
            shape = tuple(state[p].shape)
            if len(shape) != len(ax):
                raise SpecError(f"spec gives {len(ax)} axes for {p!r}, which has shape {list(shape)}")
            for i, g in enumerate(ax):
                if g is None:
                    continue
                if isinstance(g, str):
                    if shape[i] % self.groups[g] != 0:
                        raise SpecError(
                            f"axis {i} of {p!r} has length {shape[i]}, not a multiple of group "
                            f"{g!r}'s size {self.groups[g]}"
                        )
                    continue
                total = sum(n for _, n in g)
                if total != shape[i]:
                    raise SpecError(
                        f"the segments of axis {i} of {p!r} sum to {total}, but the {what}'s tensor "
                        f"has length {shape[i]} there (shape {list(shape)})"
                    )

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"format", "groups", "params"}`` (and ``"heads"`` when there are any)."""
        out = {
            "format": SPEC_FORMAT,
            "groups": dict(self.groups),
            "params": {p: [a if a is None or isinstance(a, str) else [[g, n] for g, n in a] for a in ax]
                       for p, ax in self.axes.items()},
        }
        if self.heads:
            out["heads"] = {h: {"count": hs.count, "groups": list(hs.groups), "rigid": list(hs.rigid)}
                            for h, hs in self.heads.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> PermutationSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            SpecError: the mapping is not a spec of this format.
        """
        if not isinstance(data, Mapping) or "groups" not in data or "params" not in data:
            raise SpecError(f"not a modelmerge spec: expected keys 'groups' and 'params' ({_SPEC_HINT})")
        fmt = data.get("format", SPEC_FORMAT)
        if fmt != SPEC_FORMAT:
            raise SpecError(f"unsupported spec format {fmt!r}; this version reads {SPEC_FORMAT!r}")
        groups, params = data["groups"], data["params"]
        if not isinstance(groups, Mapping) or not isinstance(params, Mapping):
            raise SpecError("spec 'groups' and 'params' must be JSON objects")
        for p, ax in params.items():
            if not isinstance(ax, list) or not all(a is None or isinstance(a, (str, list)) for a in ax):
                raise SpecError(
                    f"spec entry for {p!r} must be a list of group names, null, or lists of "
                    "[group or null, length] segments"
                )
        for g, n in groups.items():
            if isinstance(n, bool) or not isinstance(n, int):
                raise SpecError(f"spec group {g!r} must have an integer size, got {n!r}")
        heads = data.get("heads", {})
        if not isinstance(heads, Mapping):
            raise SpecError("spec 'heads' must be a JSON object: name -> {count, groups, rigid}")
        spec = cls(groups=groups, axes={p: tuple(ax) for p, ax in params.items()},
                   heads={h: _head_set(str(h), hs, None) for h, hs in heads.items()})

        def named(entry) -> set:
            if isinstance(entry, str):
                return {entry}
            if isinstance(entry, (list, tuple)):
                return set().union(*(named(e) for e in entry)) if entry else set()
            return set()

        unused = sorted(set(groups) - named(list(spec.axes.values())), key=str)
        if unused:  # a typo or a leftover: it would be counted as hidden units that nothing holds
            raise SpecError(f"spec group(s) {preview([repr(g) for g in unused], 3)} act on no parameter axis; "
                            "remove them or name them in 'params'")
        return spec

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PermutationSpec:
        """Read a spec JSON file.

        Raises:
            SpecError: missing file, invalid JSON, or not a spec.
        """
        from modelmerge.errors import read_text

        p = Path(path)
        text = read_text(p, "spec file", SpecError)
        return cls.from_dict(parse_json(text, f"spec file {p}", SpecError))


def _head_set(name: str, hs, groups: Mapping[str, int] | None) -> HeadSet:
    """A validated :class:`HeadSet` from a HeadSet or its JSON mapping (sizes checked when ``groups`` is given)."""
    if isinstance(hs, Mapping):
        unknown = sorted(set(hs) - {"count", "groups", "rigid"})
        if unknown or "count" not in hs or "groups" not in hs:
            raise SpecError(f"head set {name!r} must be {{\"count\": H, \"groups\": [...], \"rigid\": [...]}}")
        count, members, rigid = hs["count"], hs["groups"], hs.get("rigid", [])
    elif isinstance(hs, HeadSet):
        count, members, rigid = hs.count, hs.groups, hs.rigid
    else:
        raise SpecError(f"head set {name!r} must be a HeadSet or a mapping, got {type(hs).__name__}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SpecError(f"head set {name!r} has count {count!r}; it must be an integer of at least 1")
    if isinstance(members, str) or not isinstance(members, (list, tuple)) or not members \
            or not all(isinstance(g, str) for g in members):
        raise SpecError(f"head set {name!r} must list its member groups (a non-empty list of names)")
    if isinstance(rigid, str) or not isinstance(rigid, (list, tuple)) or not all(isinstance(g, str) for g in rigid):
        raise SpecError(f"head set {name!r}: 'rigid' must be a list of group names")
    if len(set(members)) != len(members):
        raise SpecError(f"head set {name!r} lists a group twice: {list(members)}")
    stray = [g for g in rigid if g not in members]
    if stray:
        raise SpecError(f"head set {name!r} marks {stray} rigid, but they are not among its groups {list(members)}")
    if groups is not None:
        for g in members:
            if g not in groups:
                raise SpecError(f"head set {name!r} names unknown group {g!r}; declare it in 'groups'")
            if groups[g] % count != 0:
                raise SpecError(
                    f"head set {name!r} splits group {g!r} into {count} chunks, but its size {groups[g]} "
                    f"is not divisible by {count}"
                )
    return HeadSet(int(count), tuple(members), tuple(dict.fromkeys(rigid)))


# --------------------------------------------------------------------------- chains

_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Norm:
    """A per-channel module (BatchNorm, LayerNorm, affine) after a layer.

    Attributes:
        module: module path, e.g. ``"features.1"``.
        params: role (weight, bias, running_mean, running_var, num_batches_tracked) -> key.
    """

    module: str
    params: Mapping[str, str]

    @property
    def is_batchnorm(self) -> bool:
        return "running_mean" in self.params


@dataclass(frozen=True)
class Layer:
    """A Linear or Conv layer of a chain, with the per-channel modules after it."""

    module: str
    kind: str  # "linear" | "conv"
    weight: str
    bias: str | None
    norms: tuple[Norm, ...] = ()


@dataclass(frozen=True)
class Chain:
    """A feed-forward chain of layers inferred from a state dict.

    ``blocks[i]`` is how many input features of layer ``i`` belong to each
    output channel of layer ``i-1`` (1 between like layers; ``H*W`` where a
    linear layer reads a flattened conv feature map).
    """

    layers: tuple[Layer, ...]
    blocks: tuple[int, ...]
    #: top-level blocks in the order read and in another order that fits the shapes too, when the
    #: order was taken from a module-ordered file on trust (a model may run its modules in another
    #: order than it declares them): the caller says so
    rival: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    @property
    def family(self) -> str:
        """``"mlp"`` (Linear layers only) or ``"cnn"`` (Conv layers, then Linear)."""
        return "mlp" if all(layer.kind == "linear" for layer in self.layers) else "cnn"

    def group(self, i: int) -> str:
        """Name of the group permuting the outputs of hidden layer ``i``."""
        return f"{self.layers[i].module or 'layer'}.out"

    def spec(self, state: Mapping[str, torch.Tensor]) -> PermutationSpec:
        """The permutation spec of this chain: every hidden layer's outputs are a group."""
        groups: dict[str, int] = {}
        axes: dict[str, Axes] = {}
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            w = state[layer.weight]
            out_g = self.group(i) if i < last else None
            in_g = self.group(i - 1) if i > 0 else None
            if out_g is not None:
                groups[out_g] = int(w.shape[0])
            axes[layer.weight] = (out_g, in_g) + (None,) * (w.ndim - 2)
            if layer.bias is not None:
                axes[layer.bias] = (out_g,)
            for norm in layer.norms:
                for role, key in norm.params.items():
                    t = state[key]
                    per_channel = role != "num_batches_tracked" and t.ndim == 1 and t.numel() == w.shape[0]
                    axes[key] = (out_g,) if per_channel else (None,) * t.ndim
        # keep the state dict's key order, which readers of `inspect` expect
        ordered = {k: axes[k] for k in state if k in axes}
        return PermutationSpec(groups=groups, axes=ordered)


def _split(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _natural_key(module: str) -> tuple:
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"[.]", module))


def _modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, str]]:
    modules: dict[str, dict[str, str]] = {}
    for key in state:
        module, leaf = _split(key)
        modules.setdefault(module, {})[leaf] = key
    return modules


def _classify(module: str, params: Mapping[str, str], state: Mapping[str, torch.Tensor]) -> str:
    unknown = sorted(set(params) - set(_LEAVES))
    if unknown:
        raise SpecError(
            f"cannot infer a spec: module {module or '<root>'!r} has parameter(s) "
            f"{', '.join(unknown)} of a kind inference does not know; {_SPEC_HINT}"
        )
    w = state[params["weight"]] if "weight" in params else None
    if w is not None and w.ndim == 2:
        return "linear"
    if w is not None and w.ndim in (3, 4, 5):
        return "conv"
    if "running_mean" in params or (w is not None and w.ndim == 1):
        return "norm"
    if w is None and "bias" in params and len(params) == 1:
        return "norm"  # a bias-only affine module
    raise SpecError(
        f"cannot infer a spec: module {module or '<root>'!r} is neither a Linear, Conv nor "
        f"normalisation layer; {_SPEC_HINT}"
    )


def _link(order: list[str], kinds: Mapping[str, str], modules, state) -> tuple[Chain | None, str]:
    """Try to read ``order`` as a chain; return (chain, "") or (None, why not).

    A "why not" starts with how many layers linked before it (``"3:..."``), so the
    caller can report the order that got furthest rather than an artefact of key order.
    """
    layers: list[Layer] = []
    blocks: list[int] = []
    pending_norms: list[Norm] = []
    for m in order:
        params = modules[m]
        kind = kinds[m]
        if kind == "norm":
            if not layers:
                return None, f"{len(layers)}:normalisation module {m!r} comes before any layer"
            channels = state[layers[-1].weight].shape[0]
            w = state[params["weight"]] if "weight" in params else None
            if layers[-1].kind == "conv" and "running_mean" not in params and w is not None and w.shape == (channels,):
                # a scale without running statistics after a conv is most often a GroupNorm, whose
                # channels must stay within their groups; the state dict holds no group count
                # (InstanceNorm and statistics-free BatchNorm look the same). "!" marks the reason as one
                # no other order may override (see infer_chain)
                return None, (
                    f"{len(layers)}!:{m!r} after conv {layers[-1].module!r} scales its channels but keeps no running "
                    "statistics: a GroupNorm (its channels cannot move between groups) or an InstanceNorm, which a "
                    "state dict cannot tell apart"
                )
            for role, key in params.items():
                t = state[key]
                if role == "num_batches_tracked" or t.numel() == 1:
                    continue
                if t.ndim != 1 or t.shape[0] != channels:
                    return None, (
                        f"{len(layers)}:{key} has shape {list(t.shape)} but follows {layers[-1].module!r} "
                        f"with {channels} outputs"
                    )
            pending_norms.append(Norm(module=m, params=dict(params)))
            continue
        w = state[params["weight"]]
        bias = params.get("bias")
        if bias is not None and (state[bias].ndim != 1 or state[bias].shape[0] != w.shape[0]):
            return None, f"{len(layers)}:{bias} has shape {list(state[bias].shape)}, not [{w.shape[0]}]"
        if layers:
            prev = layers[-1]
            layers[-1] = Layer(prev.module, prev.kind, prev.weight, prev.bias, tuple(pending_norms))
            c = state[prev.weight].shape[0]
            fan_in = w.shape[1]
            if prev.kind == kind and fan_in == c:
                blocks.append(1)
            elif prev.kind == "conv" and kind == "linear" and fan_in % c == 0:
                blocks.append(fan_in // c)
            elif prev.kind == kind == "conv" and c % fan_in == 0 and fan_in < min(
                    state[p["weight"]].shape[0] for q, p in modules.items() if kinds[q] == "conv"):
                # [C, C/g, k, k] reading fewer channels than any conv of the file gives: a grouped (depthwise
                # when 1) conv, whose channels cannot move across groups. "?": said in preference to other
                # orders' reasons once none links (see infer_chain), but another order may still link
                return None, (
                    f"{len(layers)}?:{params['weight']} reads {fan_in} of the {c} channels {prev.module!r} gives: a "
                    f"{'depthwise' if fan_in == 1 else 'grouped'} conv (groups={c // fan_in}), which a chain reading "
                    "of a state dict cannot hold"
                )
            elif fan_in == c:  # the sizes fit: the order of kinds does not
                return None, (
                    f"{len(layers)}:{params['weight']} is a {kind} layer after the {prev.kind} layer {prev.module!r}, "
                    "and a chain runs its convs before its linear layers (e.g. squeeze-and-excitation mixes them)"
                )
            else:
                return None, (
                    f"{len(layers)}:{params['weight']} takes {fan_in} inputs but {prev.module!r} gives {c} "
                    f"({prev.kind} -> {kind})"
                )
        else:
            blocks.append(1)
        pending_norms = []
        layers.append(Layer(m, kind, params["weight"], bias))
    if not layers:
        return None, "0:no Linear or Conv layer found"
    last = layers[-1]
    layers[-1] = Layer(last.module, last.kind, last.weight, last.bias, tuple(pending_norms))
    return Chain(tuple(layers), tuple(blocks)), ""


def _candidate_orders(modules: list[str]) -> Iterable[list[str]]:
    yield list(modules)
    natural = sorted(modules, key=_natural_key)
    yield natural
    # VGG-style names ("features.*" then "classifier.*") sort the wrong way round:
    # try the top-level blocks in every order, each block in natural order.
    tops = list(dict.fromkeys(m.split(".")[0] for m in natural))
    if 1 < len(tops) <= 6:
        for perm in itertools.permutations(tops):
            yield [m for t in perm for m in natural if m.split(".")[0] == t]


def _keeps_numbering(tops: list[str]) -> bool:
    """Whether names that differ only in their numbers (``fc1``, ``fc2``; ``block2``, ``block10``)
    come in their numbers' order: the order such names promise, whoever sorted the file."""
    last: dict[str, int] = {}
    for t in tops:
        m = re.fullmatch(r"(\D+)(\d+)", t)  # one number, at the end: an ordinal (not conv3x3, fc2x)
        if m is None:
            continue
        stem, number = m.group(1), int(m.group(2))
        if stem in last and last[stem] > number:
            return False
        last[stem] = number
    return True


def _rival_order(tops: list[str], rest: list[list[str]], kinds, modules, state) -> list[str] | None:
    """Another order of the top-level blocks that links as well, or None. ``tops``: the found
    order's top-level blocks. Orders that put numbered names out of their numbers' order
    (``fc3`` before ``fc2``) are not counted as rivals."""
    for order in rest:
        other = list(dict.fromkeys(m.split(".")[0] for m in order))
        if other != tops and _keeps_numbering(other) and _link(order, kinds, modules, state)[0] is not None:
            return other
    return None


def _check_unique_order(tops: list[str], rest: list[list[str]], kinds, modules, state) -> None:
    """Raise SpecError if another order of the top-level blocks links as well: neither the names
    nor the file (safetensors sorts its names) say which one the model runs, and a wrong one
    gives a permuted model that computes something else."""
    other = _rival_order(tops, rest, kinds, modules, state)
    if other is not None:
        raise SpecError(
            f"cannot tell the order of the layers: {' -> '.join(tops)} and {' -> '.join(other)} both fit "
            "their shapes, and neither the names nor the file say which the model runs (a safetensors file, or "
            "any file whose names are sorted, keeps no module order); pass --model pkg.module:Class, a --spec file, or "
            "a .pt state dict saved by torch.save(model.state_dict())"
        )


def infer_chain(state: Mapping[str, torch.Tensor], ordered: bool = False) -> Chain:
    """Infer a Linear/Conv chain (with BatchNorm/LayerNorm after layers) from a state dict.

    Layer order is taken from the file's order, the modules' natural name order
    (``fc2`` < ``fc10``; ``0`` < ``2``), or an order of top-level blocks, the first
    in which every layer's inputs match the previous layer's outputs (and then the
    only one: two orders of the blocks that both fit are refused).

    Args:
        state: the state dict.
        ordered: its names are in module order (a ``torch.save``d ``state_dict()``), so an
            order that happens to be alphabetical is not taken for a sorted file's.

    Raises:
        SpecError: the state dict is not such a chain, or its order is ambiguous; the
            message points to ``--spec``/``--model``.
    """
    modules = _modules(state)
    kinds = {m: _classify(m, p, state) for m, p in modules.items()}
    reasons: list[str] = []
    seen: set[tuple[str, ...]] = set()
    orders = list(_candidate_orders(list(modules)))
    for i, order in enumerate(orders):
        if tuple(order) in seen:
            continue
        seen.add(tuple(order))
        chain, why = _link(order, kinds, modules, state)
        if chain is None and i < 2 and why.split(":", 1)[0].endswith("!"):
            # the file's or the names' own order puts such a norm after a conv: another order that
            # links (the norm after a Linear of the same width, say) would be a guess against them
            raise SpecError(f"cannot infer a spec: {why.split(':', 1)[1]}; {_SPEC_HINT}")
        if chain is not None:
            # an order that neither numbered names nor a module-ordered file gave (one found by trying
            # the top-level blocks in every order, or a sorted file's, as every safetensors file is)
            # must be the only one that fits
            tops = list(dict.fromkeys(m.split(".")[0] for m in order))
            numbered = all(any(ch.isdigit() for ch in t) for t in tops)
            if not numbered and (i >= 2 or (not ordered and list(modules) == sorted(modules))):
                _check_unique_order(tops, orders[2:], kinds, modules, state)
            elif not numbered and (other := _rival_order(tops, orders[2:], kinds, modules, state)) is not None:
                chain = replace(chain, rival=(tuple(tops), tuple(other)))  # trusted, but said
            return chain
        if i < 2 or not all(any(ch.isdigit() for ch in m.split(".")[0]) for m in modules):
            reasons.append(why)  # numbered top-level names (a Sequential's) fix the order: no shuffled one speaks
    # a reason that names the cause ("!": a GroupNorm; "?": a grouped conv) says best why it is no chain;
    # else the order that linked the most layers (the file's order is often just alphabetical:
    # safetensors sorts keys)
    best = max(reasons, key=lambda r: (r.split(":", 1)[0][-1:] in "!?", int(r.split(":", 1)[0].rstrip("!?"))))
    raise SpecError(f"cannot infer a spec: the layers do not form a chain ({best.split(':', 1)[1]}); {_SPEC_HINT}")


def infer_spec(state: Mapping[str, torch.Tensor], ordered: bool = False) -> PermutationSpec:
    """Infer the permutation spec of a chain-shaped state dict (see :func:`infer_chain`).

    Raises:
        SpecError: inference is impossible; pass a spec file instead.
    """
    return infer_chain(state, ordered).spec(state)
