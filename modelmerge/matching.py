"""Weight matching (Ainsworth et al., Git Re-Basin): coordinate descent over groups.

Maximises ``sum_p <A_p, P(B)_p>`` over the permutations of a spec's groups.
Each step fixes every group but one and solves that group exactly as a linear
assignment problem on the cost ``C[i, j] = sum over the axes the group touches
of <A's slice i, B's slice j (other axes already permuted)>``.

Stopping rule: a group changes only if its assignment gains more than 1e-12
relative to the group's current score (the gain measured in float64), so the
objective never drops; a sweep in which no group changes ends the search, as
does ``max_iter`` sweeps. A group acting on two axes of one tensor (a square
weight inside a residual stream) is a quadratic problem, not a linear one: its
answer is adopted only if the exact objective of the tensors it touches rises.

Structured specs. A parameter with a segmented axis (a concatenation, e.g. a
packed attention projection) is split into per-segment views with plain axes
(a cartesian product when several axes are segmented), so everything below runs
on them unchanged. The groups of a head set are solved jointly in one step
(:func:`solve_structured`: a within-chunk assignment per chunk pair and member,
then one assignment of chunks), and the answer is adopted only if its exact
float64 gain over the parameters they touch is positive. Specs with neither
take the plain path.

How it is made fast (ResNet-50, 11,456 units: 36 s -> about 5 s, the same
answer; docs/benchmarks.md). Only float32 round-off can change an answer, by
changing the solver's choice between assignments whose costs differ by less
than it; every test and benchmark network gives the float64 answer exactly.

* cost matrices are float32 matrix products (float64 before), assembled from
  column blocks of bounded size, so no full copy of a large tensor is made;
* the solver's proposal is accepted or refused on the float32 gain only when a
  bound on its round-off decides the test; otherwise the gain is recomputed in
  float64 over the rows that move;
* a group none of whose neighbours (the groups on the other axes of its
  tensors) changed since its last visit is skipped: its cost matrix, hence its
  answer, would be the same;
* each tensor's part of a cost matrix is kept (within a memory budget) and,
  when few of a neighbour's units moved, updated by a low-rank product instead
  of recomputed; the solver gets the row- and column-reduced matrix (about
  twice as fast) and is skipped when the current assignment takes every row's
  maximum.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from modelmerge.errors import ModelMergeError, SpecError, check_count
from modelmerge.permutation import (
    Permutation,
    axis_index,
    check_permutation,
    entry_index,
    identity_permutation,
    permute_param,
    structured_permutation,
)
from modelmerge.spec import Axes, PermutationSpec


@dataclass(frozen=True)
class MatchInfo:
    """What a weight-matching run did.

    Attributes:
        objective_before: ``sum_p <A_p, P0(B)_p>`` at the initial permutation.
        objective_after: the same at the answer.
        iterations: sweeps over all groups that were run.
        converged: True if the last sweep improved no group.
    """

    objective_before: float
    objective_after: float
    iterations: int
    converged: bool


_STATISTICS = ("running_mean", "running_var")


def _counts(name: str, t: torch.Tensor) -> bool:
    """Whether a tensor enters the objective: floating-point weights, not BatchNorm statistics.

    Statistics are still permuted; leaving them out of the objective was measured to
    give better merges of BatchNorm ResNets (docs/benchmarks.md), and matches Git
    Re-Basin, whose Flax models keep them apart from the parameters.
    """
    return t.is_floating_point() and not name.endswith(_STATISTICS)


#: most elements in one transient block of a tensor (cost assembly and updates; 8 MiB of float32)
_BLOCK = 1 << 21
#: the same for the float64 check of a proposed change and the objective
_CHECK_BLOCK = 1 << 20
#: float64 solver inputs of groups at least this large are not kept between visits (128 MiB at 4096)
_KEEP_BELOW = 2048
#: a tensor's contribution to a cost matrix is cached only if it has at least this many columns
#: per unit (cheaper ones, biases and norms, are recomputed: as cheap as adding a cached matrix)
_CACHE_MIN_COLUMNS = 32
#: a cached contribution is updated in place (instead of recomputed) when at most this fraction of
#: its neighbour's units moved, and at most this many times in a row (float32 round-off stays bounded)
_UPDATE_FRACTION = 0.5
_MAX_UPDATES = 8
#: unit round-off of float32
_U32 = 2.0 ** -24


@dataclass(frozen=True)
class _Member:
    """One axis a group acts on: ``param``'s axis ``axis``, and that tensor's other permuted axes."""

    param: str
    axis: int
    others: tuple[tuple[int, str], ...]  # (axis, group)
    columns: int  # elements per unit: numel / group size


@dataclass
class _Cached:
    """A member's float32 contribution, the neighbours' permutations it was computed with, and its updates."""

    perms: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    matrix: torch.Tensor
    updates: int = 0


def _units(units: torch.Tensor, k: int) -> torch.Tensor:
    """Indices along an axis of ``k``-element blocks for the given units (``[r] -> [r * k]``)."""
    return units if k == 1 else (units[:, None] * k + torch.arange(k)).reshape(-1)


def _rows(t: torch.Tensor, axis: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    # (..., r*k, ...) -> (r, k * rest): rows are the group's units, blocks kept together
    return t.movedim(axis, 0).reshape(t.shape[axis] // k, -1).to(dtype)


def _is_identity(p: torch.Tensor) -> bool:
    return bool((p == torch.arange(p.numel())).all())


def _blocks(m: _Member, ta: torch.Tensor, tb: torch.Tensor, perm: Mapping[str, torch.Tensor], k: int,
            dtype: torch.dtype, block: int):
    """Yield column blocks ``(A rows, P(B) rows)`` in ``dtype`` of one member's matrices.

    ``ta`` and ``tb`` may hold different units (rows) along ``m.axis`` (``k``
    elements each); ``P(B)`` is B permuted along every other axis by ``perm``.
    The blocks slice the tensor's first axis other than ``m.axis``, so at most
    about ``block`` elements are copied at a time; ``sum(A_blk @ B_blk.T)`` is
    the member's cost contribution.
    """
    rest = [d for d in range(ta.ndim) if d != m.axis]
    if not rest:
        yield _rows(ta, m.axis, k, dtype), _rows(tb, m.axis, k, dtype)
        return
    # axes whose permutation is still the identity need no gather (most of them in the first sweep)
    idx = {d: axis_index(perm[g], ta.shape[d]) for d, g in m.others if not _is_identity(perm[g])}
    r0 = rest[0]
    per_slice = max(ta.numel(), tb.numel()) // max(1, ta.shape[r0])
    step = max(1, block // max(1, per_slice))
    for s in range(0, ta.shape[r0], step):
        e = min(ta.shape[r0], s + step)
        sa = ta.narrow(r0, s, e - s)
        sb = tb.index_select(r0, idx[r0][s:e]) if r0 in idx else tb.narrow(r0, s, e - s)
        for d, ix in idx.items():
            if d != r0:
                sb = sb.index_select(d, ix)
        yield _rows(sa, m.axis, k, dtype), _rows(sb, m.axis, k, dtype)


def _update(hit: _Cached, m: _Member, a, b, perm, n: int, versions: tuple[int, ...]) -> _Cached | None:
    """``hit`` brought up to date by a low-rank update, or None when a recomputation is due.

    Only the columns whose neighbour unit moved change: ``C += A_D @ (P'(B)_D - P(B)_D).T``.
    """
    changed = [j for j, (v0, v1) in enumerate(zip(hit.versions, versions)) if v0 != v1]
    if len(changed) != 1 or hit.updates >= _MAX_UPDATES:
        return None
    j = changed[0]
    d, h = m.others[j]
    if sum(1 for _, g in m.others if g == h) > 1:
        return None
    old, new = hit.perms[j], perm[h]
    moved = (old != new).nonzero().squeeze(1)
    if moved.numel() > _UPDATE_FRACTION * old.numel():
        return None
    ta, tb = a[m.param], b[m.param]
    kd = ta.shape[d] // old.numel()
    k = ta.shape[m.axis] // n
    others = [(d2, axis_index(perm[h2], ta.shape[d2])) for d2, h2 in m.others if d2 != d]
    step = max(1, _BLOCK // max(1, kd * (ta.numel() // ta.shape[d])))  # moved units at a time
    for s in range(0, moved.numel(), step):
        units = moved[s:s + step]
        sa = ta.index_select(d, _units(units, kd))
        sb_new, sb_old = tb.index_select(d, _units(new[units], kd)), tb.index_select(d, _units(old[units], kd))
        for d2, ix in others:
            sb_new, sb_old = sb_new.index_select(d2, ix), sb_old.index_select(d2, ix)
        diff = _rows(sb_new, m.axis, k, torch.float32) - _rows(sb_old, m.axis, k, torch.float32)
        hit.matrix.addmm_(_rows(sa, m.axis, k, torch.float32), diff.T)
    return _Cached(tuple(perm[g] for _, g in m.others), versions, hit.matrix, hit.updates + 1)


def _row_norms(m: _Member, t: torch.Tensor, n: int) -> torch.Tensor:
    """Euclidean norms of the member's rows (float64 ``[n]``; other axes' order does not matter)."""
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    other = [d for d in range(t.ndim) if d != m.axis]
    per_index = torch.linalg.vector_norm(t, dim=other) if other else t.abs()  # [n * k]
    return per_index.double().pow(2).reshape(n, -1).sum(1).sqrt()


def _exact_gain(members: list[_Member], a, b, perm, n: int, old: torch.Tensor, new: torch.Tensor) -> float:
    """``sum_i C[i, new_i] - C[i, old_i]`` in float64, over the rows that move."""
    moved = (old != new).nonzero().squeeze(1)
    if moved.numel() == 0:
        return 0.0
    total = 0.0
    for m in members:
        ta, tb = a[m.param], b[m.param]
        k = ta.shape[m.axis] // n
        # blocks in float32 (exact for half types) or float64; products and sums in float64
        dtype = torch.float64 if ta.dtype == torch.float64 else torch.float32
        step = max(1, _CHECK_BLOCK // max(1, m.columns))  # rows at a time: copies stay small
        for s in range(0, moved.numel(), step):
            rows = moved[s:s + step]
            r = rows.numel()
            sa = ta.index_select(m.axis, _units(rows, k))
            sb = tb.index_select(m.axis, _units(torch.cat([new[rows], old[rows]]), k))
            for xa, xb in _blocks(m, sa, sb, perm, k, dtype, _CHECK_BLOCK):
                xb = xb.to(torch.float64)
                total += float((xa.to(torch.float64) * (xb[:r] - xb[r:])).sum())
    return total


def alignment_objective(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: PermutationSpec,
    perm: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """``sum_p <A_p, P(B)_p>`` over floating-point parameters, BatchNorm statistics excluded."""
    perm = perm if perm is not None else identity_permutation(spec)
    total = 0.0
    for p, ax in spec.axes.items():
        if _counts(p, a[p]):
            total += _dot(a[p], b[p], ax, perm)
    return total


def _dot(ta: torch.Tensor, tb: torch.Tensor, axes: Axes, perm) -> float:
    """``<A, P(B)>`` in float64 (exact products), permuting B a slice of its first axis at a time."""
    if ta.ndim == 0 or ta.numel() <= _CHECK_BLOCK:
        pb = permute_param(tb, axes, perm)
        return float(torch.dot(ta.reshape(-1).to(torch.float64), pb.reshape(-1).to(torch.float64)))
    first = entry_index(axes[0], perm, ta.shape[0]) if axes[0] is not None else torch.arange(ta.shape[0])
    step = max(1, _CHECK_BLOCK // (ta.numel() // ta.shape[0]))
    total = 0.0
    for s in range(0, ta.shape[0], step):
        sb = permute_param(tb.index_select(0, first[s:s + step]), (None, *axes[1:]), perm)
        total += float(torch.dot(ta[s:s + step].reshape(-1).to(torch.float64), sb.reshape(-1).to(torch.float64)))
    return total


def _computable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` detached, with float8 tensors as float32 (CPU kernels such as norms lack float8)."""
    out = {}
    for k, t in state.items():
        t = t.detach() if t.requires_grad else t
        out[k] = t.float() if t.is_floating_point() and t.element_size() == 1 else t
    return out


def weight_matching(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    seed: int = 0,
    max_iter: int = 100,
    init: Mapping[str, torch.Tensor] | None = None,
    on_sweep: Callable[[int, float], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    cache_bytes: int | None = None,
    objective: bool = True,
) -> tuple[Permutation, MatchInfo]:
    """Find permutations of B's units that match A's, by coordinate descent.

    Args:
        a, b: state dicts covered by ``spec`` (same keys and shapes).
        spec: the permutation spec.
        seed: seeds the random order in which groups are visited.
        max_iter: maximum number of sweeps over all groups.
        init: starting permutation (default: identity), e.g. a learned aligner's answer.
        on_sweep: called after each sweep with (sweep index, objective so far).
        on_progress: called after each group visit (skipped ones too) with
            ``(visits done, estimated total)``; the estimate assumes the search ends
            after the next sweep (``groups * min(sweep + 1, max_iter)``), so it grows
            by one sweep per sweep started.
        cache_bytes: memory for cached per-tensor cost contributions (default: the
            larger of 256 MiB and half the size of A's tensors); 0 turns the cache off.
        objective: compute ``info.objective_before``/``_after`` (two passes over every
            tensor; callers that only want the permutation, like the LMC refinement's
            projections, skip them and get NaN).

    Returns:
        ``(perm, info)``: unit ``i`` of aligned B is unit ``perm[g][i]`` of B.

    Raises:
        SpecError: ``spec`` does not fit the state dicts, or ``init`` is invalid.
        MismatchError: A and B differ in keys or shapes.
        ModelMergeError: ``max_iter`` below 1.
    """
    from modelmerge.merge import check_same_architecture

    check_count(max_iter, "max_iter")
    check_same_architecture(a, b)
    # read detached (the matcher writes into buffers); no pass over the values here, since the LMC
    # refinement calls this at every step: a NaN shows up below, where the assignment solver meets it
    a, b = _computable(a), _computable(b)
    spec.check(a, "first checkpoint")
    spec.check(b, "second checkpoint")
    perm = {g: p.clone() for g, p in (init or identity_permutation(spec)).items()}
    check_permutation(spec, perm)
    if spec.segmented:  # per-segment views with plain axes: the same objective, the same groups
        a, b, spec = _segment_views(a, b, spec)
    groups = list(spec.groups)
    members: dict[str, list[_Member]] = {}
    for g in groups:
        members[g] = [
            _Member(p, ax, tuple((d, h) for d, h in enumerate(spec.axes[p]) if h is not None and d != ax),
                    a[p].numel() // spec.groups[g])
            for p, ax in spec.members(g) if _counts(p, a[p])
        ]
    if cache_bytes is None:
        cache_bytes = max(256 << 20, sum(t.numel() * t.element_size() for t in a.values()) // 2)
    cacheable = _cacheable(members, spec, cache_bytes)
    norms: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    before = alignment_objective(a, b, spec, perm) if objective else math.nan
    rng = np.random.default_rng(seed)
    version = dict.fromkeys(groups, 0)  # bumped whenever a group's permutation changes
    seen: dict = {}  # group (or head set) -> its neighbours' versions when it was last solved
    cache: dict[tuple[str, int | None], _Cached] = {}
    work: dict = {}  # reused buffers per matrix size: float32 costs (n) and float64 solver input (-n)
    # what one step solves: a group, or (plain specs have none) a head set's groups together
    units: list = groups if not spec.heads else _step_units(spec)
    touched = {} if not spec.heads else _head_params(spec, a)
    visits, sweeps, converged = 0, 0, not units
    # a group on two axes of one tensor (a square weight inside a residual stream): its cost holds
    # the other axis where it was, but adopting the answer moves both, so the change is checked on
    # the exact objective of the tensors it touches, which keeps the objective from ever dropping
    coupled = {g: sorted({m.param for m in members[g]}) for g in groups
               if any(h == g for m in members[g] for _, h in m.others)}

    def touched_objective(g: str) -> float:
        return sum(_dot(a[p], b[p], spec.axes[p], perm) for p in coupled[g])

    while units and sweeps < max_iter:
        sweeps += 1
        improved = False
        for gi in rng.permutation(len(units)):
            g = units[gi]
            if not isinstance(g, str):  # a head set: its groups in one step
                key = tuple(version[h] for m_g in spec.heads[g[1]].groups for m in members[m_g] for _, h in m.others)
                if seen.get(g) != key:
                    seen[g] = key
                    for h in _improve_heads(g[1], spec, members, a, b, perm, version, cache, cacheable, work,
                                            touched[g[1]]):
                        version[h] += 1
                        improved = True
                visits += 1
                if on_progress is not None:
                    on_progress(visits, len(units) * min(sweeps + 1, max_iter))
                continue
            n = spec.groups[g]
            key = tuple(version[h] for m in members[g] for _, h in m.others)
            if seen.get(g) != key:  # else its cost matrix, hence its answer, is unchanged
                seen[g] = key
                cost, updates = _cost(g, n, members[g], a, b, perm, version, cache, cacheable, work)
                old, base = perm[g], touched_objective(g) if g in coupled else 0.0
                if _improve(g, n, cost, updates, members[g], a, b, perm, norms, work):
                    if g in coupled and touched_objective(g) - base <= 1e-12 * max(1.0, abs(base)):
                        perm[g] = old  # the exact objective did not rise: keep the old answer
                    else:
                        version[g] += 1
                        improved = True
            visits += 1
            if on_progress is not None:
                on_progress(visits, len(units) * min(sweeps + 1, max_iter))
        if on_sweep is not None:
            on_sweep(sweeps, alignment_objective(a, b, spec, perm))
        if not improved:
            converged = True
            break
    after = alignment_objective(a, b, spec, perm) if objective else math.nan
    del cache, work, norms
    if sum(t.numel() for t in a.values()) > 1 << 24:
        _release_freed_memory()  # a large run leaves hundreds of MiB of freed blocks in the heap
    return perm, MatchInfo(before, after, sweeps, converged)


def _release_freed_memory() -> None:
    """Return freed heap memory to the system (glibc keeps freed blocks of up to 32 MiB; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _cost(g: str, n: int, members: list[_Member], a, b, perm, version, cache, cacheable,
          work: dict) -> tuple[torch.Tensor, list]:
    """Group ``g``'s float32 cost matrix, and per member the in-place updates its part has had.

    Tensors with no other permuted axis add a constant part (kept as one matrix);
    tensors with few columns per unit (biases, norms) go through one matrix product
    together; the others are kept per tensor and updated when a neighbour moves.
    The matrix returned is a work buffer, valid until the next call with the same size.
    """
    if n not in work:
        work[n] = torch.empty(n, n)
    cost = work[n]
    static = cache.get((g, None))
    if static is not None:
        cost.copy_(static.matrix)
    else:
        _product([m for m in members if not m.others], a, b, perm, n, cost.zero_())
        if (g, None) in cacheable:
            cache[(g, None)] = _Cached((), (), cost.clone())
    _product([m for m in members if m.others and m.columns < _CACHE_MIN_COLUMNS], a, b, perm, n, cost)
    updates = [0] * len(members)
    for i, m in enumerate(members):
        if not m.others or m.columns < _CACHE_MIN_COLUMNS:
            continue
        versions = tuple(version[h] for _, h in m.others)
        hit = cache.get((g, i))
        if hit is not None and hit.versions != versions:
            hit = _update(hit, m, a, b, perm, n, versions)
        if hit is None and (g, i) not in cacheable:
            _product([m], a, b, perm, n, cost)  # straight into the sum
            continue
        if hit is None:
            hit = _Cached(tuple(perm[h] for _, h in m.others), versions, _product([m], a, b, perm, n))
        cache[(g, i)] = hit
        cost += hit.matrix
        updates[i] = hit.updates
    return cost, updates


def _product(members: list[_Member], a, b, perm, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out += sum of A_rows @ P(B)_rows.T`` over ``members`` (float32 ``[n, n]``; a new one if None).

    Thin tensors (biases, norms) go through one product together.
    """
    out = torch.zeros(n, n) if out is None else out
    thin: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in members:
        k = a[m.param].shape[m.axis] // n
        for xa, xb in _blocks(m, a[m.param], b[m.param], perm, k, torch.float32, _BLOCK):
            if m.columns < _CACHE_MIN_COLUMNS:
                thin.append((xa, xb))
            else:
                out.addmm_(xa, xb.T)
    if thin:
        out.addmm_(torch.cat([x for x, _ in thin], 1), torch.cat([y for _, y in thin], 1).T)
    return out


def _cacheable(members: Mapping[str, list[_Member]], spec: PermutationSpec, budget: int) -> set:
    """Which parts of cost matrices to keep between visits, within ``budget`` bytes.

    Only groups with a neighbour are ever solved twice (the others are skipped
    after their first visit), so only their parts are worth keeping: each one's
    constant part (key ``(group, None)``) and per-tensor parts (``(group,
    index)``), those costliest to recompute (most columns) first.
    """
    revisited = [g for g, ms in members.items() if any(m.others for m in ms)]
    ranked = [(sum(m.columns for m in members[g] if not m.others), g, None) for g in revisited]
    ranked += [(m.columns, g, i) for g in revisited for i, m in enumerate(members[g]) if m.others]
    # a part costs n * n * columns to compute and n * n to keep: the most columns first
    ranked = sorted((r for r in ranked if r[0] >= _CACHE_MIN_COLUMNS), key=lambda r: r[0], reverse=True)
    chosen, used = set(), 0
    for _, g, i in ranked:
        size = 4 * spec.groups[g] ** 2
        if used + size <= budget:
            chosen.add((g, i))
            used += size
    return chosen


def _reduced(cost: torch.Tensor, work: dict) -> np.ndarray:
    """The minimisation problem with the same answers as maximising ``cost``, row and column reduced.

    ``max over each row - cost``, minus each column's minimum: non-negative, a zero
    in every row and column. Same optimal assignments; scipy's solver runs about
    twice as fast on it (measured on ResNet-50's 2048-unit group).
    """
    n = cost.shape[0]
    c = work.get(-n)
    if c is None:
        c = torch.empty(n, n, dtype=torch.float64)
        if n < _KEEP_BELOW:
            work[-n] = c
    c.copy_(cost)
    torch.sub(c.amax(1, keepdim=True), c, out=c)
    c -= c.amin(0, keepdim=True)
    return c.numpy()


def _improve(g: str, n: int, cost: torch.Tensor, updates: list[int], members: list[_Member], a, b, perm,
             norms: dict, work: dict) -> bool:
    """Solve group ``g``'s assignment on the float32 ``cost``; adopt it if it gains more than 1e-12 relative.

    The gain read from ``cost`` is trusted when a bound on its float32 round-off
    (``|error of C[i, j]| <= sum over tensors of c * u * |A_i| * |B_j|``, with
    ``u = 2**-24`` and ``c`` from the inner length and the updates) decides the
    test either way; otherwise the gain is recomputed in float64 over the rows that move.
    """
    current = perm[g]
    if torch.equal(cost.max(1).indices, current):
        return False  # every row already takes its maximum: nothing can gain
    try:
        _, cols = linear_sum_assignment(_reduced(cost, work))
    except ValueError:  # scipy's "matrix contains invalid numeric entries"
        raise ModelMergeError(f"group {g}'s matching costs are not finite: products of A's and B's weights "
                              "overflow float32 (weights near 1e19 or larger; NaN and infinite values are "
                              "refused on loading); rescale the checkpoints or use ones from before training "
                              "diverged") from None
    cols = torch.as_tensor(cols, dtype=torch.long)
    if torch.equal(cols, current):
        return False
    rows = torch.arange(n)
    old = float(cost[rows, current].double().sum())
    moved = (cols != current).nonzero().squeeze(1)
    to, frm = cols[moved], current[moved]
    gain = float((cost[moved, to].double() - cost[moved, frm].double()).sum())
    thin = sum(m.columns for m in members if m.columns < _CACHE_MIN_COLUMNS)  # summed in one product
    err = 0.0
    for i, (m, u) in enumerate(zip(members, updates)):
        if (g, i) not in norms:
            norms[(g, i)] = (_row_norms(m, a[m.param], n), _row_norms(m, b[m.param], n))
        na, nb = norms[(g, i)]
        factor = 2 * _U32 * (m.columns + thin + len(members) + 3) * (1 + 2 * u)
        err += factor * float((na[moved] * (nb[to] + nb[frm])).sum())
    tol = 1e-12 * max(1.0, abs(old))
    if gain + err <= tol:
        return False
    if gain - err <= tol:
        gain = _exact_gain(members, a, b, perm, n, current, cols)
    if gain > tol:
        perm[g] = cols
        return True
    return False


# --------------------------------------------------------------------------- structured specs


def _segment_views(a, b, spec: PermutationSpec) -> tuple[dict, dict, PermutationSpec]:
    """Split every parameter with a segmented axis into views with plain axes.

    A view is the part of the tensor where each segmented axis is narrowed to one
    of its segments (every combination, when several axes are segmented); its entry
    on that axis is the segment's group (or None). The views cover the tensor
    exactly, so objectives and cost matrices are unchanged. View names end with the
    parameter's name (BatchNorm statistics stay recognisable to :func:`_counts`).
    """
    av, bv, axes = {}, {}, {}
    for p, ax in spec.axes.items():
        if all(e is None or isinstance(e, str) for e in ax):
            av[p], bv[p], axes[p] = a[p], b[p], ax
            continue
        choices = [[(None, e, 0, 0)] if e is None or isinstance(e, str)
                   else [(j, g, start, n) for j, (g, start, n) in enumerate(spec.segments(p, d, a[p].shape[d]))]
                   for d, e in enumerate(ax)]
        for combo in itertools.product(*choices):
            ta, tb = a[p], b[p]
            for d, (j, _, start, n) in enumerate(combo):
                if j is not None:
                    ta, tb = ta.narrow(d, start, n), tb.narrow(d, start, n)
            name = "\0" + ",".join("" if j is None else str(j) for j, *_ in combo) + "\0" + p
            av[name], bv[name], axes[name] = ta, tb, tuple(g for _, g, _, _ in combo)
    return av, bv, PermutationSpec(spec.groups, axes, spec.heads)


def _step_units(spec: PermutationSpec) -> list:
    """Groups outside head sets, and ``("heads", name)`` for each head set, in spec order."""
    units: list = []
    done: set[str] = set()
    for g in spec.groups:
        name = spec.head_of(g)
        if name is None:
            units.append(g)
        elif name not in done:
            done.add(name)
            units.append(("heads", name))
    return units


def _head_params(spec: PermutationSpec, a) -> dict[str, list[str]]:
    """Per head set, the counted parameters some member group acts on (those its gain is measured on)."""
    out = {}
    for name, hs in spec.heads.items():
        found = dict.fromkeys(p for g in hs.groups for p, _ in spec.members(g) if _counts(p, a[p]))
        out[name] = list(found)
    return out


def _improve_heads(name: str, spec: PermutationSpec, members, a, b, perm, version, cache, cacheable, work,
                   params: list[str]) -> list[str]:
    """Solve head set ``name``'s groups jointly; adopt the answer if its exact float64 gain is positive.

    Returns the groups whose permutation changed (none if the answer was refused).
    """
    hs = spec.heads[name]
    costs = {}
    for g in hs.groups:
        cost, _ = _cost(g, spec.groups[g], members[g], a, b, perm, version, cache, cacheable, work)
        costs[g] = cost.double()  # a copy: the work buffer is shared by equal sizes
    new = solve_structured(spec, costs)
    changed = [g for g in hs.groups if not torch.equal(new[g], perm[g])]
    if not changed:
        return []
    trial = {**perm, **{g: new[g] for g in changed}}
    old = gain = 0.0
    for p in params:
        before = _dot(a[p], b[p], spec.axes[p], perm)
        old += before
        gain += _dot(a[p], b[p], spec.axes[p], trial) - before
    if gain > 1e-12 * max(1.0, abs(old)):
        perm.update({g: new[g] for g in changed})
        return changed
    return []


def solve_structured(spec: PermutationSpec, gains: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Permutations maximising the total gain ``sum_g sum_i gains[g][i, perm[g][i]]``, valid for ``spec``.

    Groups outside head sets are solved one by one (a linear assignment each). The
    groups of a head set are solved together, exactly: for every chunk pair ``(x, y)``
    each non-rigid member's ``c x c`` block ``gains[g][x*c:(x+1)*c, y*c:(y+1)*c]`` is
    solved as an assignment (a rigid member scores the block's trace), the members'
    scores are summed into an ``H x H`` matrix, whose assignment is the shared chunk
    permutation. A member missing from ``gains`` counts zero, keeps its chunks' order,
    and is still moved with its head set (it is in the answer).

    Args:
        spec: the spec (group sizes, head sets).
        gains: group -> ``[n, n]`` gain of matching unit ``i`` (of A) with unit ``j`` (of B).

    Returns:
        group -> LongTensor ``[n]``: unit ``i`` takes B's unit ``perm[i]``; for every
        group of ``gains`` and every member of a head set one of them belongs to.

    Raises:
        SpecError: a gain matrix is not ``[n, n]`` for its group's size ``n``.
    """
    for g, gain in gains.items():
        n = spec.groups.get(g)
        if n is None or tuple(gain.shape) != (n, n):
            raise SpecError(f"gain matrix for group {g!r} has shape {list(gain.shape)}; expected [{n}, {n}]")
    out: dict[str, torch.Tensor] = {}
    for g, gain in gains.items():
        name = spec.head_of(g)
        if not torch.isfinite(gain).all():
            raise ModelMergeError(f"group {g}'s matching gains are not finite: the activations or weights overflow "
                                  "float32 (inputs or weights too large); rescale the data or the checkpoints")
        if name is None:
            _, cols = linear_sum_assignment(gain.detach().to(torch.float64).cpu().numpy(), maximize=True)
            out[g] = torch.as_tensor(cols, dtype=torch.long)
        elif g not in out:
            out.update(_solve_head_set(spec, name, gains))
    return out


def _solve_head_set(spec: PermutationSpec, name: str, gains: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The exact maximiser of a head set's summed gains over its structured permutations."""
    hs = spec.heads[name]
    heads = hs.count
    score = np.zeros((heads, heads))
    within: dict[str, np.ndarray] = {}  # group -> [x, y, c]: best within-chunk answer, chunk x taking chunk y
    for g in hs.groups:
        if g not in gains:
            continue
        c = hs.chunk(spec.groups[g])
        # [x, i, y, j] -> [x, y, i, j]: the block of chunk x of A against chunk y of B
        blocks = gains[g].detach().to(torch.float64).cpu().reshape(heads, c, heads, c).permute(0, 2, 1, 3).numpy()
        if g in hs.rigid or c == 1:
            score += np.trace(blocks, axis1=2, axis2=3)
            continue
        best = np.empty((heads, heads, c), dtype=np.int64)
        rows = np.arange(c)
        for x in range(heads):
            for y in range(heads):
                _, cols = linear_sum_assignment(blocks[x, y], maximize=True)
                best[x, y] = cols
                score[x, y] += blocks[x, y, rows, cols].sum()
        within[g] = best
    _, pi = linear_sum_assignment(score, maximize=True)
    out = {}
    for g in hs.groups:
        c = hs.chunk(spec.groups[g])
        w = within[g][np.arange(heads), pi] if g in within else np.broadcast_to(np.arange(c), (heads, c))
        out[g] = structured_permutation(torch.as_tensor(pi, dtype=torch.long),
                                        torch.as_tensor(np.array(w), dtype=torch.long))  # a copy: broadcast views are read-only
    return out
