"""Aligning B to A: resolve the network, produce candidates, refine, choose, verify.

This is the library entry point behind ``modelmerge align``; it reads no files.
The methods themselves live in :mod:`modelmerge.methods` (one registration
each); this module only decides which of them run for the options given, and
refuses combinations that would do nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from modelmerge import methods
from modelmerge.checkpoint import Checkpoint
from modelmerge.data import Dataset
from modelmerge.errors import ModelMergeError, check_count, check_seed
from modelmerge.matching import alignment_objective
from modelmerge.merge import as_state_dict, check_same_architecture
from modelmerge.network import Network, resolve_network
from modelmerge.permutation import Permutation, apply_permutation, permutation_to_lists
from modelmerge.spec import PermutationSpec
from modelmerge.verify import Verification, verify_permuted

#: ``--method`` values: ``auto`` plus the registered alignment methods
METHODS = ("auto", *methods.names("align"))
#: ``--refine`` values: ``none`` plus the registered refinements
REFINES = ("none", *methods.names("refine"))


@dataclass(frozen=True)
class AlignResult:
    """Everything ``align`` produced; ``report()`` is the JSON report.

    Attributes:
        method: the winning recipe, e.g. ``"deep-align+lmc"``.
        perm: its permutation; ``aligned`` is B permuted by it (verified).
        network: the resolved network (spec, forward).
        objective: weight matching's objective ``sum <A, P(B)>`` before and after.
        iterations, converged: what the winning method did (None for a one-pass answer).
        verification: how the answer was checked.
        seconds: per stage (``weight_matching``, ``learned``, ``activation_matching``, ``refine``, ``align``, ``verify``, ``total``: those that ran).
        notes: what the user should know (fallbacks, tracer warnings, assumptions).
        aligner: the learned aligner's name, if one answered.
        candidates: each candidate's α = 0.5 merged loss, when ``auto --data`` ranked them.
        warnings: what may be wrong with the output (an assumed forward, no verification at all).
    """

    method: str
    perm: Permutation
    aligned: dict[str, torch.Tensor]
    network: Network
    objective: tuple[float, float]
    iterations: int | None
    converged: bool | None
    verification: Verification
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    aligner: str | None = None
    candidates: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)

    def report(self) -> dict:
        out = {
            "method": self.method,
            "aligner": self.aligner,
            "spec": {"source": self.network.spec_source, "groups": dict(self.network.spec.groups)},
            "permutations": permutation_to_lists(self.perm),
            "objective": {"before": self.objective[0], "after": self.objective[1]},
            "iterations": self.iterations,
            "converged": self.converged,
            "seconds": dict(self.seconds),
            "verified": self.verification.to_dict(),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }
        if self.candidates is not None:
            out["candidates"] = dict(self.candidates)
        return out


REFINE_FROM_BEST = True


def uses_data(method: str, refine: str | None) -> bool:
    """Whether ``align`` reads ``data`` with these options (``auto`` ranks candidates; some refinements train)."""
    return method == "auto" or (method in METHODS[1:] and methods.get("align", method).needs_data) or (
        refine in REFINES[1:] and methods.get("refine", refine).needs_data)


def align(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    spec: PermutationSpec | None = None,
    record: Mapping | None = None,
    module: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    network: Network | None = None,
    method: str = "auto",
    aligner: str | None = None,
    refine: str | None = None,
    data: str | Dataset | None = None,
    seed: int = 0,
    max_iter: int = 100,
    refine_steps: int = 100,
    on_refine: Callable[[int, int, float], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> AlignResult:
    """Find and apply the permutation of B's hidden units that best matches A.

    Args:
        a, b: state dicts of one architecture (name -> tensor; or loaded
            :class:`~modelmerge.checkpoint.Checkpoint` objects). Never modified.
        spec, record, module, input_shape: what describes the network, resolved by
            :func:`~modelmerge.network.resolve_network` from A (ignored when
            ``network`` is given): a spec (else traced from ``module`` or inferred),
            the architecture record, a model instance holding A's weights (its real
            forward verifies the answer) and that model's input shape.
        network: an already resolved network.
        method: ``"auto"`` (the learned aligner when the network is in a bundled
            aligner's family, or ``aligner``'s, else weight matching, saying why),
            ``"weight-matching"``, ``"deep-align"`` or ``"activation-matching"`` (needs ``data``).
        aligner: bundled aligner name or trained folder/file (default: the family's bundled one).
        refine: ``"none"``, ``"wm"`` (weight matching from the answer) or ``"lmc"``
            (a short LMC optimisation from it; needs ``data``). Default: ``"lmc"``
            for ``auto`` with ``data``, else ``"none"``.
        data: dataset name or file (or a loaded ``Dataset``). With ``auto``, the answer, weight matching's and
            the refined one are all candidates and the merge with the lowest loss
            at α = 0.5 (training split) wins.
        seed: seeds the methods' randomness and the verification inputs.
        max_iter: weight-matching sweeps at most.
        refine_steps: LMC refinement steps (each one weight-matching projection).
        on_refine: progress of the LMC refinement: (steps done, steps, best loss so far).
        on_progress: progress of weight matching: (group visits done, estimated total).

    Returns:
        An :class:`AlignResult`; ``result.aligned`` is B permuted onto A and verified.

    Raises:
        ModelMergeError: an unknown option, or a combination that would do nothing
            (``data`` nothing reads, ``--refine wm`` of weight matching's own answer); a state
            dict that is not one of tensors.
        CheckpointError: complex, sparse, meta or non-finite tensors in A or B.
        MismatchError: A and B differ in keys or shapes.
        SpecError: no spec can be inferred or the given one does not fit.
        OutOfFamilyError: ``deep-align`` on a network its aligner cannot read (a ModelMergeError,
            defined in :mod:`modelmerge.deepalign.model`).
        VerificationError: the permuted B does not compute B's function.
    """
    t0 = time.perf_counter()
    check_seed(seed)
    check_count(max_iter, "max_iter")
    refine = _check_options(method, refine, data, aligner)
    ordered = getattr(a, "ordered", False)  # a Checkpoint read from a .pt keeps module order
    if record is None and isinstance(a, Checkpoint):
        record = a.arch  # as the command line does
    a, b = as_state_dict(a, "A"), as_state_dict(b, "B")
    check_same_architecture(a, b)
    net = network or resolve_network(a, spec=spec, record=record, module=module, input_shape=input_shape,
                                     ordered=ordered)
    ctx = methods.Context(a, b, net, seed, max_iter, refine_steps, aligner, data, on_refine, on_progress)
    notes = [f"traced: {w}" for w in net.warnings]
    first = _first_method(method, refine, ctx, notes)
    if refine == "wm" and first == "weight-matching":
        if method == "weight-matching":
            raise ModelMergeError("--refine wm would restart weight matching from its own answer; use --refine lmc "
                                  "or --method auto/deep-align")
        notes.append("--refine wm: auto fell back to weight matching, whose answer it would not change")
        refine = "none"
    if refine != "none" and (why := methods.get("refine", refine).unavailable(ctx)) is not None:
        raise ModelMergeError(f"--refine {refine}: {why}")
    ranked = method == "auto" and data is not None
    if data is not None:
        task = ctx.task()  # the data must fit before any work is done
        notes += [n for n in (net.data_note, task.note) if n]
    t1 = time.perf_counter()
    extra = []
    if ranked:  # auto --data also ranks weight matching's and activation matching's answers
        extra = [name for name in ("weight-matching", "activation-matching")
                 if name != first and methods.get("align", name).unavailable(ctx) is None]
    answers = [methods.get("align", name).run(ctx, None) for name in extra + [first]]
    ran = list(answers)
    candidates = None
    if ranked:
        from modelmerge.methods.lmc import score

        candidates = {ans.name: score(net, a, b, ans.perm, ctx.task()) for ans in answers}
    if refine != "none":
        start = answers[-1]
        if ranked and REFINE_FROM_BEST:  # refine the best merge so far, not always the first method's
            # (weight matching started from weight matching's own answer would change nothing)
            starts = [ans for ans in answers if not (refine == "wm" and ans.name == "weight-matching")]
            start = min(starts or answers[-1:], key=lambda ans: candidates[ans.name])
        ran.append(methods.get("refine", refine).run(ctx, start))
        answers = ran if ranked else ran[-1:]
    if ranked:
        candidates.update({ans.name: score(net, a, b, ans.perm, ctx.task()) for ans in answers
                           if ans.name not in candidates})
        best = min(candidates, key=candidates.get)  # ties: the earlier (simpler) answer
        chosen = next(ans for ans in answers if ans.name == best)
    else:
        chosen = answers[-1]
    notes += [note for ans in ran for note in ans.notes]
    t2 = time.perf_counter()
    aligned = apply_permutation(b, net.spec, chosen.perm)
    verification = verify_permuted(b, aligned, net, seed=seed)
    t3 = time.perf_counter()
    seconds = {}
    for ans in ran:
        seconds[ans.stage] = seconds.get(ans.stage, 0.0) + ans.seconds
    seconds.update({"align": t2 - t1, "verify": t3 - t2, "total": t3 - t0})
    objective = chosen.objective or (alignment_objective(a, b, net.spec),
                                     alignment_objective(a, b, net.spec, chosen.perm))
    warnings = ([net.assumption] if net.assumption else []) + list(net.risks)
    if verification.forward is None:
        warnings.append("the output was NOT verified: no forward is known for this spec; pass --model "
                        "pkg.module:Class so the permuted model's outputs can be compared")
    return AlignResult(chosen.name, chosen.perm, aligned, net, objective, chosen.iterations, chosen.converged,
                       verification, seconds, notes, chosen.aligner, candidates, warnings)


def _check_options(method: str, refine: str | None, data: str | None, aligner: str | None) -> str:
    """The refinement to run (the default resolved), after refusing options that cannot work."""
    if method not in METHODS:
        raise ModelMergeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if refine is None:
        refine = "lmc" if method == "auto" and data is not None else "none"
    if refine not in REFINES:
        raise ModelMergeError(f"unknown refinement {refine!r}; choose one of {', '.join(REFINES)}")
    if refine != "none" and methods.get("refine", refine).needs_data and data is None:
        raise ModelMergeError(f"--refine {refine} needs --data (a dataset name or file)")
    if method != "auto" and methods.get("align", method).needs_data and data is None:
        raise ModelMergeError(f"--method {method} needs --data (a dataset name or file)")
    if data is not None and not uses_data(method, refine):
        raise ModelMergeError(f"--data does nothing with --method {method} and --refine {refine}: it is read by "
                              "--method auto (to rank candidates), --method activation-matching and --refine lmc; "
                              "drop it or add one of those")
    if aligner is not None and method == "weight-matching":
        raise ModelMergeError("--aligner is read by --method auto and deep-align; drop it with --method weight-matching")
    return refine


def _first_method(method: str, refine: str, ctx, notes: list[str]) -> str:
    """The alignment method whose answer is refined: ``auto`` falls back to weight matching, saying why."""
    if method != "auto":
        return method
    why = methods.get("align", "deep-align").unavailable(ctx)
    if why is None:
        return "deep-align"
    then = (" and, on --data, activation matching, the LMC refinement of the better of the two, and the lowest "
            "merge loss of the three" if ctx.data is not None and refine == "lmc" else "")
    notes.append(f"auto: {why}; using weight matching{then}")
    return "weight-matching"
