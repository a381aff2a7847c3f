"""Aligning B to A: choose a spec and a method, permute, verify.

This is the library entry point behind ``modelmerge align``; it reads no files.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from modelmerge.errors import ModelMergeError, SpecError
from modelmerge.forward import Forward, chain_forward_of, record_forward_of
from modelmerge.matching import MatchInfo, weight_matching
from modelmerge.merge import check_same_architecture
from modelmerge.permutation import Permutation, apply_permutation, permutation_to_lists
from modelmerge.spec import Chain, PermutationSpec, infer_chain
from modelmerge.verify import Verification, verify_permuted

METHODS = ("auto", "weight-matching")


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
) -> SpecChoice:
    """The given spec (checked against ``state``) or one inferred from the state dict.

    The forward used for verification is the record's real model when an
    architecture record is given, else the inferred chain's generic forward; a
    given spec that differs from the inferred chain's gets no generic forward.

    Raises:
        SpecError: inference fails (and no spec was given), or the spec does not fit.
        ArchError: the record does not fit the state dict.
    """
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

    def report(self) -> dict:
        return {
            "method": self.method,
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


def align(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    spec: PermutationSpec | None = None,
    record: Mapping | None = None,
    method: str = "auto",
    seed: int = 0,
    max_iter: int = 100,
) -> AlignResult:
    """Find and apply the permutation of B's hidden units that best matches A.

    Args:
        a, b: state dicts of one architecture.
        spec: the permutation spec; inferred from A when None.
        record: A's architecture record, if known: verification then runs the real model.
        method: ``"auto"`` or ``"weight-matching"``.
        seed: seeds the method's randomness.
        max_iter: weight-matching sweeps at most.

    Returns:
        An :class:`AlignResult`; ``result.aligned`` is B permuted onto A and verified.

    Raises:
        MismatchError: A and B differ in keys or shapes.
        SpecError: no spec can be inferred or the given one does not fit.
        VerificationError: the permuted B does not compute B's function.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ModelMergeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_same_architecture(a, b)
    choice = choose_spec(a, spec, record)
    notes = []
    if method == "auto":
        notes.append("auto: no learned aligner is bundled for this network, using weight matching")
    t1 = time.perf_counter()
    perm, info = weight_matching(a, b, choice.spec, seed=seed, max_iter=max_iter)
    t2 = time.perf_counter()
    aligned = apply_permutation(b, choice.spec, perm)
    verification = verify_permuted(b, aligned, choice.spec, choice.forward, seed=seed)
    t3 = time.perf_counter()
    seconds = {"align": t2 - t1, "verify": t3 - t2, "total": t3 - t0}
    return AlignResult("weight-matching", perm, aligned, choice, info, verification, seconds, notes)
