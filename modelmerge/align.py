"""Aligning B to A: choose a spec and a method, permute, verify.

This is the library entry point behind ``modelmerge align``; it reads no files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from modelmerge.errors import ModelMergeError, SpecError
from modelmerge.forward import Forward, chain_forward_of, record_forward_of
from modelmerge.matching import MatchInfo, alignment_objective, weight_matching
from modelmerge.merge import check_same_architecture
from modelmerge.permutation import Permutation, apply_permutation, permutation_to_lists
from modelmerge.spec import Chain, PermutationSpec, infer_chain
from modelmerge.verify import Verification, verify_permuted

METHODS = ("auto", "weight-matching", "deep-align")
REFINES = ("none", "wm", "lmc")


@dataclass(frozen=True)
class SpecChoice:
    """A spec, where it came from, and the forward it can be verified with (if known)."""

    spec: PermutationSpec
    source: str  # "inferred" | "file"
    chain: Chain | None = None
    forward: Forward | None = None


def choose_spec(
    state: Mapping[str, torch.Tensor],
    spec: PermutationSpec | None = None,
    record: Mapping | None = None,
    model=None,
) -> SpecChoice:
    """The given spec (checked against ``state``), the traced one, or one inferred from the state dict.

    The forward used for verification is ``--model``'s real forward when a
    model is given (a :class:`~modelmerge.trace.ModelSpec`; its traced spec is
    used unless a spec is given), else the record's real model, else the
    inferred chain's generic forward; a given spec that differs from the
    inferred chain's gets no generic forward.

    Raises:
        SpecError: inference fails (and no spec was given), or the spec does not fit.
        ArchError: the record does not fit the state dict.
    """
    if model is not None:
        from modelmerge.trace import model_forward

        forward = model_forward(model.model, model.input_shape)
        chosen = spec if spec is not None else model.spec
        chosen.check(state)
        try:
            chain = infer_chain(state)
            chain = chain if chain.spec(state) == chosen else None
        except SpecError:
            chain = None
        return SpecChoice(chosen, "file" if spec is not None else "traced", chain, forward)
    forward = None
    if record is not None:
        from modelmerge.zoo.archs import module_from_state

        module_from_state(record, state)  # fails early, naming keys, if the record does not fit
        forward = record_forward_of(record)
    if spec is None:
        chain = infer_chain(state)
        return SpecChoice(chain.spec(state), "inferred", chain, forward or chain_forward_of(chain, state))
    spec.check(state)
    try:
        chain = infer_chain(state)
    except SpecError:
        return SpecChoice(spec, "file", None, forward)
    if chain.spec(state) != spec:
        return SpecChoice(spec, "file", None, forward)
    return SpecChoice(spec, "file", chain, forward or chain_forward_of(chain, state))


@dataclass(frozen=True)
class AlignResult:
    """Everything ``align`` produced; ``report()`` is the JSON report."""

    method: str
    perm: Permutation
    aligned: dict[str, torch.Tensor]
    spec: SpecChoice
    match: MatchInfo
    verification: Verification
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    aligner: str | None = None
    candidates: dict[str, float] | None = None

    def report(self) -> dict:
        out = {
            "method": self.method,
            "aligner": self.aligner,
            "spec": {
                "source": self.spec.source,
                "groups": dict(self.spec.spec.groups),
            },
            "permutations": permutation_to_lists(self.perm),
            "objective": {"before": self.match.objective_before, "after": self.match.objective_after},
            "iterations": self.match.iterations,
            "converged": self.match.converged,
            "seconds": dict(self.seconds),
            "verified": self.verification.to_dict(),
            "notes": list(self.notes),
        }
        if self.candidates is not None:
            out["candidates"] = dict(self.candidates)
        return out


def _learned(model, chain: Chain, a, b):
    """The learned answer, keyed by group."""
    from modelmerge.weightspace import to_weight_space

    perms = model.align(to_weight_space(chain, a), to_weight_space(chain, b))
    return {chain.group(l): p for l, p in enumerate(perms)}


def _merged_loss(a, b, spec, perm, task) -> float:
    """Loss of the α = 0.5 merge on the selection batch (how `auto --data` ranks answers)."""
    from modelmerge.deepalign.refine import merged_loss, selection_batch

    forward, dataset = task
    with torch.no_grad():
        return float(merged_loss(forward, a, apply_permutation(b, spec, perm), *selection_batch(dataset)))


def align(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    spec: PermutationSpec | None = None,
    record: Mapping | None = None,
    model=None,
    method: str = "auto",
    aligner: str | None = None,
    refine: str = "none",
    data: str | None = None,
    seed: int = 0,
    max_iter: int = 100,
    refine_steps: int = 100,
    on_refine: Callable[[int, int, float], None] | None = None,
) -> AlignResult:
    """Find and apply the permutation of B's hidden units that best matches A.

    Args:
        a, b: state dicts of one architecture.
        spec: the permutation spec; inferred from A when None.
        record: A's architecture record, if known: verification then runs the real model.
        model: a :class:`~modelmerge.trace.ModelSpec` from ``--model``: its traced spec
            (unless ``spec`` is given) and its real forward for verification.
        method: ``"auto"`` (the bundled learned aligner when the network is in its
            family and depth, else weight matching), ``"weight-matching"`` or
            ``"deep-align"``.
        aligner: bundled aligner name or trained folder/file (default: the family's bundled one).
        refine: ``"none"``, ``"wm"`` (weight matching from the learned answer) or
            ``"lmc"`` (short LMC optimisation from it; needs ``data``).
        data: dataset name or file. With ``auto`` it also tries weight matching and
            the LMC-refined answer and keeps the merge with the lowest loss at α = 0.5.
        seed: seeds the method's randomness.
        max_iter: weight-matching sweeps at most.
        refine_steps: LMC refinement steps (each one weight-matching projection).
        on_refine: progress of the LMC refinement: (steps done, steps, best loss so far).

    Returns:
        An :class:`AlignResult`; ``result.aligned`` is B permuted onto A and verified.

    Raises:
        MismatchError: A and B differ in keys or shapes.
        SpecError: no spec can be inferred or the given one does not fit.
        OutOfFamilyError: ``deep-align`` on a network its aligner cannot read.
        VerificationError: the permuted B does not compute B's function.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ModelMergeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if refine not in REFINES:
        raise ModelMergeError(f"unknown refinement {refine!r}; choose one of {', '.join(REFINES)}")
    if refine == "lmc" and data is None:
        raise ModelMergeError("--refine lmc needs --data (a dataset name or file)")
    check_same_architecture(a, b)
    choice = choose_spec(a, spec, record, model)
    notes: list[str] = [f"traced: {w}" for w in (model.warnings if model is not None else [])]
    seconds: dict[str, float] = {}
    model_spec, model, card = model, None, None
    if method in ("auto", "deep-align"):
        model, card, why = _pick_aligner(choice, a, method, aligner)
        if model is None:
            refined = " (and its LMC refinement on --data; the best is kept)" if data is not None and method == "auto" else ""
            notes.append(f"auto: {why}; using weight matching{refined}")
    task = _task_for(data, choice, a, record, model_spec) if data is not None else None
    candidates = info = None
    t1 = time.perf_counter()
    if model is None and method == "auto" and task is not None:
        perm, used, candidates = _auto_with_data(a, b, choice, task, None, seed, max_iter, seconds,
                                                 dict(steps=refine_steps, on_step=on_refine))
    elif model is None:
        if refine != "none" or task is not None:
            notes.append("--refine/--data apply to a learned answer; weight matching used them for nothing")
        perm, info = weight_matching(a, b, choice.spec, seed=seed, max_iter=max_iter)
        used = "weight-matching"
        seconds["weight_matching"] = time.perf_counter() - t1
    else:
        perm = _learned(model, choice.chain, a, b)
        seconds["learned"] = time.perf_counter() - t1
        used = "deep-align"
        if method == "auto" and task is not None:
            perm, used, candidates = _auto_with_data(a, b, choice, task, perm, seed, max_iter, seconds,
                                                     dict(steps=refine_steps, on_step=on_refine))
        elif refine == "wm":
            t = time.perf_counter()
            perm, _ = weight_matching(a, b, choice.spec, seed=seed, max_iter=max_iter, init=perm)
            seconds["refine"] = time.perf_counter() - t
            used = "deep-align+wm"
        elif refine == "lmc":
            from modelmerge.deepalign.refine import refine_lmc

            t = time.perf_counter()
            perm, _ = refine_lmc(a, b, choice.spec, *task, perm, seed=seed, steps=refine_steps, on_step=on_refine)
            seconds["refine"] = time.perf_counter() - t
            used = "deep-align+lmc"
    if info is None:  # the weight-matching objective of whatever answer won, for the report
        info = MatchInfo(alignment_objective(a, b, choice.spec), alignment_objective(a, b, choice.spec, perm), 0,
                         True)
    t2 = time.perf_counter()
    seconds["align"] = t2 - t1
    aligned = apply_permutation(b, choice.spec, perm)
    verification = verify_permuted(b, aligned, choice.spec, choice.forward, seed=seed)
    t3 = time.perf_counter()
    seconds.update({"verify": t3 - t2, "total": t3 - t0})
    name = card.get("name") if card else None
    return AlignResult(used, perm, aligned, choice, info, verification, seconds, notes, name, candidates)


def _pick_aligner(choice: SpecChoice, a, method: str, aligner: str | None):
    """(model, card, why-not) for the learned methods."""
    from modelmerge.deepalign.pretrained import default_aligner, load_aligner
    from modelmerge.deepalign.train import family_of

    if choice.chain is None:
        why = "the learned aligner reads Linear/Conv chains, and this spec is not one"
        if method == "deep-align":
            raise ModelMergeError(f"deep-align: {why}; use --method weight-matching")
        return None, None, why
    family, depth = family_of(choice.chain), len(choice.chain.layers)
    if aligner is not None:
        model, card = load_aligner(aligner)
        return model, card, ""
    weights = default_aligner(family, depth)
    if weights is None:
        why = f"no bundled aligner covers a {depth}-layer {family.upper()}"
        if method == "deep-align":
            raise ModelMergeError(f"deep-align: {why}; pass --aligner PATH or use --method weight-matching")
        return None, None, why
    if method == "auto":
        from modelmerge.deepalign.model import OutOfFamilyError
        from modelmerge.weightspace import to_weight_space

        model, card = load_aligner(weights.name)
        try:
            model.check_supports(to_weight_space(choice.chain, a))
        except OutOfFamilyError as e:
            return None, None, str(e).split(";")[0]
        return model, card, ""
    model, card = load_aligner(weights.name)
    return model, card, ""


def _task_for(data: str, choice: SpecChoice, a, record, model_spec):
    """``(forward, dataset)``: the differentiable forward and the data shaped for it."""
    from modelmerge.deepalign.refine import task_data, task_forward
    from modelmerge.zoo.data import load_dataset

    forward = task_forward(choice.chain, a, record, model_spec)
    return forward, task_data(load_dataset(data), forward, a)


def _auto_with_data(a, b, choice, task, learned, seed, max_iter, seconds, refine_kw):
    """Candidates scored by the α = 0.5 merge's loss on the selection batch; the lowest wins.

    With a learned answer: it, weight matching, and its LMC refinement. Without one
    (outside every aligner's family): weight matching and its LMC refinement.
    """
    from modelmerge.deepalign.refine import refine_lmc

    t = time.perf_counter()
    wm, _ = weight_matching(a, b, choice.spec, seed=seed, max_iter=max_iter)
    seconds["weight_matching"] = time.perf_counter() - t
    options = {"weight-matching": wm}
    if learned is not None:
        options["deep-align"] = learned
    base = "deep-align" if learned is not None else "weight-matching"
    t = time.perf_counter()
    options[f"{base}+lmc"], _ = refine_lmc(a, b, choice.spec, *task, options[base], seed=seed, **refine_kw)
    seconds["refine"] = time.perf_counter() - t
    scores = {k: _merged_loss(a, b, choice.spec, p, task) for k, p in options.items()}
    best = min(scores, key=scores.get)
    return options[best], best, scores
