"""Permutations of hidden units: apply, invert, compose, random.

A permutation is ``dict[group, LongTensor]`` with one index vector per group
of a :class:`~modelmerge.spec.PermutationSpec`. Convention: unit ``i`` of the
permuted model is unit ``perm[group][i]`` of the original, so applying it is
``index_select(axis, perm)`` on every axis the group acts on.

Groups of a head set (:class:`~modelmerge.spec.HeadSet`) only take *structured*
permutations: ``perm[g][h*c + i] = pi[h]*c + sigma_{g,h}[i]`` with one chunk
permutation ``pi`` for the whole set (:func:`check_permutation` refuses others).
Inverses and compositions of structured permutations are structured.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from modelmerge.errors import SpecError
from modelmerge.spec import Axes, AxisEntry, PermutationSpec

Permutation = dict[str, torch.Tensor]

#: elements per slice when a large tensor is permuted along several axes
_SLICE = 1 << 22


def axis_index(perm: torch.Tensor, length: int) -> torch.Tensor:
    """Gather indices for an axis of ``length`` permuted by ``perm`` in equal blocks.

    An axis ``k`` times longer than the permutation (a flattened ``[C, H*W]``
    feature map read by a linear layer) moves whole blocks of ``k``.

    Shapes: perm ``[n]`` -> ``[length]`` with ``length = n * k``.
    """
    n = perm.numel()
    k = length // n
    if k == 1:
        return perm
    return (perm[:, None] * k + torch.arange(k)).reshape(-1)  # (n, k) -> (n*k,)


def entry_index(entry: AxisEntry, perm: Mapping[str, torch.Tensor], length: int) -> torch.Tensor | None:
    """Gather indices for one axis of ``length`` with spec entry ``entry`` (None for a fixed axis).

    A segmented entry ``((group_or_None, n), ...)`` gives the concatenation of each
    segment's block index (:func:`axis_index` of its group's permutation over ``n``)
    plus the segment's offset; a fixed segment keeps its positions.
    """
    if entry is None:
        return None
    if isinstance(entry, str):
        return axis_index(perm[entry], length)
    parts, start = [], 0
    for g, n in entry:
        parts.append(torch.arange(start, start + n) if g is None else axis_index(perm[g], n) + start)
        start += n
    if start != length:
        raise SpecError(f"segments of total length {start} do not fit an axis of length {length}")
    return torch.cat(parts)


def permute_param(
    tensor: torch.Tensor, axes: Axes, perm: Mapping[str, torch.Tensor],
    except_axis: int | None = None,
) -> torch.Tensor:
    """Permute one tensor along every axis its spec entry names (skipping ``except_axis``).

    An entry is a group name, or segments ``((group_or_None, length), ...)`` (see
    :func:`entry_index`). A large tensor permuted along two or more axes is filled a
    slice at a time, so no full-size intermediate copy is made (peak memory: one output).
    """
    todo = [(i, entry_index(g, perm, tensor.shape[i])) for i, g in enumerate(axes)
            if g is not None and i != except_axis]
    if len(todo) > 1 and tensor.numel() > _SLICE:
        (first, index), rest = todo[0], todo[1:]
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        step = max(1, _SLICE * tensor.shape[first] // tensor.numel())
        for s in range(0, tensor.shape[first], step):
            part = tensor.index_select(first, index[s:s + step])
            for i, ix in rest:
                part = part.index_select(i, ix)
            out.narrow(first, s, part.shape[first]).copy_(part)
        return out
    out = tensor
    for i, ix in todo:
        out = out.index_select(i, ix)
    return out


def check_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> None:
    """Raise SpecError unless ``perm`` has a valid index vector for every group of ``spec``.

    Groups of a head set must also keep its structure: every chunk lands on one
    chunk, the same one for every member, and a rigid member's chunks move whole.
    """
    for g, n in spec.groups.items():
        if g not in perm:
            raise SpecError(f"permutation has no entry for group {g!r}")
        p = perm[g]
        if p.shape != (n,) or not torch.equal(torch.sort(p).values, torch.arange(n)):
            raise SpecError(f"permutation for group {g!r} is not a permutation of {n} units")
    for name, hs in spec.heads.items():
        pi = None
        for g in hs.groups:
            c = hs.chunk(spec.groups[g])
            p = perm[g].reshape(hs.count, c)
            chunks = torch.div(p, c, rounding_mode="floor")
            if not bool((chunks == chunks[:, :1]).all()):
                raise SpecError(
                    f"permutation for group {g!r} breaks head set {name!r}: units of one head "
                    f"(chunk of {c}) must move to one head together"
                )
            if pi is None:
                pi, first = chunks[:, 0], g
            elif not torch.equal(chunks[:, 0], pi):
                raise SpecError(
                    f"permutations for groups {first!r} and {g!r} break head set {name!r}: "
                    "its groups must move their heads the same way"
                )
            if g in hs.rigid and not torch.equal(p - chunks * c, torch.arange(c).expand(hs.count, c)):
                raise SpecError(
                    f"permutation for group {g!r} breaks head set {name!r}: the group is rigid, "
                    "its units may not move within a head"
                )


def apply_permutation(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perm: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every grouped axis permuted; ``state`` is untouched.

    Args:
        state: name -> tensor, covered by ``spec``.
        spec: which group acts on which axis.
        perm: group -> LongTensor ``[size]``.

    Returns:
        name -> permuted tensor (same keys and order; unpermuted tensors are shared).

    Raises:
        SpecError: ``spec`` does not fit ``state`` or ``perm`` is not valid.
    """
    spec.check(state)
    check_permutation(spec, perm)
    return {k: permute_param(v, spec.axes[k], perm) for k, v in state.items()}


def identity_permutation(spec: PermutationSpec) -> Permutation:
    """The permutation that changes nothing."""
    return {g: torch.arange(n) for g, n in spec.groups.items()}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None) -> Permutation:
    """A uniformly random valid permutation of every group (seed it with ``generator``).

    Groups of a head set get a uniformly random structured permutation: one random
    chunk permutation per set, and a random permutation within every chunk of every
    non-rigid member.
    """
    out: Permutation = {}
    pis: dict[str, torch.Tensor] = {}
    for g, n in spec.groups.items():
        name = spec.head_of(g)
        if name is None:
            out[g] = torch.randperm(n, generator=generator)
            continue
        hs = spec.heads[name]
        if name not in pis:
            pis[name] = torch.randperm(hs.count, generator=generator)
        c = hs.chunk(n)
        if g in hs.rigid:
            within = torch.arange(c).expand(hs.count, c)
        else:
            within = torch.stack([torch.randperm(c, generator=generator) for _ in range(hs.count)])
        out[g] = structured_permutation(pis[name], within)
    return out


def structured_permutation(pi: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """``perm[h*c + i] = pi[h]*c + within[h, i]``: chunk ``h`` takes chunk ``pi[h]``, reordered by ``within[h]``.

    Shapes: pi ``[H]``, within ``[H, c]`` -> ``[H*c]``.
    """
    c = within.shape[1]
    return (pi[:, None] * c + within).reshape(-1).long()


def invert_permutation(perm: Mapping[str, torch.Tensor]) -> Permutation:
    """The inverse: applying ``perm`` then ``invert_permutation(perm)`` changes nothing."""
    return {g: torch.argsort(p) for g, p in perm.items()}


def compose_permutations(
    outer: Mapping[str, torch.Tensor], inner: Mapping[str, torch.Tensor]
) -> Permutation:
    """Applying ``inner`` then ``outer`` equals applying ``compose_permutations(outer, inner)``.

    Unit ``i`` after both is unit ``outer[i]`` of the intermediate, which is unit
    ``inner[outer[i]]`` of the original.
    """
    return {g: inner[g][outer[g]] for g in outer}


def permutation_to_lists(perm: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """JSON-ready form of a permutation."""
    return {g: [int(i) for i in p.tolist()] for g, p in perm.items()}
