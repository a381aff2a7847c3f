"""The method registry: every way of producing or improving a permutation, registered once.

A :class:`Method` says what it needs (data? a Linear/Conv chain?) and runs on a
:class:`Context` (the pair, their :class:`~modelmerge.network.Network` and the
options). ``kind="align"`` methods produce an answer from nothing;
``kind="refine"`` methods start from another answer. :func:`modelmerge.alignment.align`
picks methods by name and never branches on what a method does inside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from modelmerge.errors import ModelMergeError
from modelmerge.network import Network
from modelmerge.permutation import Permutation


@dataclass(frozen=True)
class Answer:
    """A candidate permutation and what really produced it.

    Attributes:
        name: the recipe, e.g. ``"deep-align"`` or ``"deep-align+lmc"``.
        perm: group -> LongTensor (unit ``i`` of aligned B is unit ``perm[i]`` of B).
        stage: the report's timing key (``"weight_matching"``, ``"learned"``, ``"refine"``).
        seconds: how long it took.
        iterations: weight-matching sweeps or refinement steps; None for a one-pass answer.
        converged: whether an iterative method stopped on its own; None for a one-pass answer.
        aligner: the learned aligner's name, if one answered.
        objective: weight matching's own objective (before, after), when it reported one.
        notes: what the user should know about this answer (e.g. an aligner used outside its depths).
    """

    name: str
    perm: Permutation
    stage: str
    seconds: float
    iterations: int | None = None
    converged: bool | None = None
    aligner: str | None = None
    objective: tuple[float, float] | None = None
    notes: tuple[str, ...] = ()


@dataclass
class Context:
    """What methods read: the pair, their network, the options, and values computed once.

    Attributes:
        a, b: the two state dicts (B is permuted onto A).
        network: A's resolved network (B has the same keys and shapes).
        seed, max_iter, refine_steps: the options of ``align``.
        aligner: ``--aligner`` (a bundled name or trained folder/file), or None for the default.
        data: ``--data`` (a dataset name or file, or a loaded ``Dataset``), or None.
        on_refine: progress of long refinements: (steps done, steps, best loss so far).
        on_progress: progress of weight matching: (group visits done, estimated total).
        cache: values shared by methods (the loaded aligner, the shaped dataset).
    """

    a: Mapping[str, torch.Tensor]
    b: Mapping[str, torch.Tensor]
    network: Network
    seed: int = 0
    max_iter: int = 100
    refine_steps: int = 100
    aligner: str | None = None
    data: str | None = None
    on_refine: Callable[[int, int, float], None] | None = None
    on_progress: Callable[[int, int], None] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, computed the first time ``key`` is asked for."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def task(self):
        """The ``--data`` dataset shaped for the network (loaded once).

        Raises:
            ModelMergeError: no ``--data``, or the network cannot run on data.
            DataError: the data does not fit the network.
        """
        from modelmerge.data import Dataset, load_dataset

        if self.data is None:
            raise ModelMergeError("this method needs --data (a dataset name or file)")
        # a Dataset already in memory (e.g. one merge aligning many models) is not loaded again
        raw = (lambda: self.data) if isinstance(self.data, Dataset) else (lambda: load_dataset(self.data))
        return self.once("task", lambda: self.network.shape_data(raw()))


@dataclass(frozen=True)
class Method:
    """A registered alignment method or refinement.

    Attributes:
        name: its name (``--method`` / ``--refine`` value).
        kind: ``"align"`` (answers from nothing) or ``"refine"`` (improves ``start``).
        needs_data: it reads ``--data``.
        run: ``run(ctx, start) -> Answer`` (``start`` is None for ``"align"`` methods).
        unavailable: ``unavailable(ctx) -> why not`` (None when it can run on this pair).
    """

    name: str
    kind: str
    needs_data: bool
    run: Callable[[Context, Answer | None], Answer]
    unavailable: Callable[[Context], str | None] = lambda ctx: None


_REGISTRY: dict[tuple[str, str], Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (refusing a second one of the same kind and name)."""
    key = (method.kind, method.name)
    if key in _REGISTRY:
        raise RuntimeError(f"duplicate {method.kind} method {method.name!r}")
    _REGISTRY[key] = method
    return method


def get(kind: str, name: str) -> Method:
    """A registered method.

    Raises:
        ModelMergeError: no such method (the message lists the known ones).
    """
    if (kind, name) not in _REGISTRY:
        raise ModelMergeError(f"unknown {'method' if kind == 'align' else 'refinement'} {name!r}; choose one of "
                              f"{', '.join(names(kind))}")
    return _REGISTRY[(kind, name)]


def names(kind: str) -> list[str]:
    """Registered names of one kind, in registration order."""
    return [name for k, name in _REGISTRY if k == kind]
