"""Refining an alignment with data: a short straight-through LMC optimisation.

The straight-through estimator of Git Re-Basin (Ainsworth et al., 2023): free
weights ``θ`` start at A's; each step projects ``θ`` onto B's permutation
orbit by weight matching (warm-started from the previous answer, the first
time from the answer being refined), runs the α = 0.5 merge of A and the
projected B with ``θ``'s gradient passed straight through the projection, and
takes an Adam step on ``θ``. The permutation is thus re-chosen globally at
every step by a fast matcher, which measured far better here than optimising
per-layer Sinkhorn logits (held-out digits MLPs: 0.44x vs 0.62x weight matching's
barrier, docs/benchmarks.md). The best hard answer seen, the starting one
included, is returned, scored by the merge's loss on :func:`selection_batch`,
so refinement never makes that loss worse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelmerge.errors import DataError, ModelMergeError
from modelmerge.matching import weight_matching
from modelmerge.permutation import apply_permutation
from modelmerge.spec import Chain, PermutationSpec
from modelmerge.zoo.archs import build
from modelmerge.zoo.data import Dataset
from modelmerge.zoo.stacked import stacked_forward
from modelmerge.zoo.train import fit_inputs

#: examples of the training split that score candidate answers (a seeded subset beyond this)
SELECTION_LIMIT = 4096


@dataclass(frozen=True)
class RefineInfo:
    steps: int
    loss_before: float
    loss_after: float


def builder_layout(chain: Chain, state: Mapping[str, torch.Tensor], record: Mapping | None):
    """The record and a key map to the builder's names (``0.weight``...) for stacked forwards.

    Returns:
        ``(record, key_map)`` with ``key_map[builder_key] = state_key``.

    Raises:
        ModelMergeError: no record and not a plain Linear chain.
    """
    if record is not None:
        return record, {k: k for k in state}
    if chain is None or any(layer.kind != "linear" or layer.norms for layer in chain.layers):
        raise ModelMergeError("running this model on data needs --model, an architecture record, or a plain "
                              "Linear MLP checkpoint")
    widths = [state[chain.layers[0].weight].shape[1]] + [state[layer.weight].shape[0] for layer in chain.layers]
    key_map = {}
    for i, layer in enumerate(chain.layers):
        key_map[f"{2 * i}.weight"] = layer.weight
        if layer.bias is None:
            raise ModelMergeError("running a bare Linear checkpoint on data needs biases on every layer; "
                                  "pass --model")
        key_map[f"{2 * i}.bias"] = layer.bias
    return {"family": "mlp", "widths": widths, "activation": "relu"}, key_map


@dataclass(frozen=True)
class TaskForward:
    """A differentiable forward of the pair's architecture, for any state dict of it.

    Attributes:
        run: ``run(state, x) -> logits [B, classes]`` with ``state`` keyed like the
            checkpoints and ``x [B, *input_shape]``; gradients reach ``state``.
        source: ``"model"`` (``--model``'s real module), ``"record"`` (the
            checkpoint's architecture record) or ``"mlp"`` (a bare Linear chain run
            as a ReLU MLP).
        params: the checkpoint keys that are parameters (not buffers such as
            BatchNorm statistics, which take no gradient).
        record: the architecture record the data is shaped for (None for ``"model"``).
        input_shape: one example's shape for ``"model"``.
    """

    run: Callable[[Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
    source: str
    params: frozenset[str]
    record: Mapping | None = None
    input_shape: tuple[int, ...] | None = None


def task_forward(chain: Chain | None, state: Mapping[str, torch.Tensor], record: Mapping | None = None,
                 model=None) -> TaskForward:
    """The forward that refinement and ``auto --data`` run: ``--model``'s, else the record's, else a ReLU MLP.

    Args:
        chain: the inferred chain (None for traced, non-chain specs).
        state: one checkpoint of the pair (its keys and shapes).
        record: its architecture record, if any.
        model: a :class:`~modelmerge.trace.ModelSpec` from ``--model``, if any.

    Raises:
        ModelMergeError: none of the three applies.
    """
    if model is not None:
        module = model.model.eval()
        # named_* drop tied duplicates, which functional_call refuses to receive twice
        params = frozenset(name for name, _ in module.named_parameters())
        keys = params | {name for name, _ in module.named_buffers()}

        def run_module(st, x):
            try:
                out = torch.func.functional_call(module, {k: st[k] for k in keys if k in st}, (x,))
            except Exception as e:  # noqa: BLE001 - user code: any failure is the model's
                raise ModelMergeError(f"running --model on data failed ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200]})") from None
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                raise ModelMergeError("--data needs a model whose forward returns logits [batch, classes]")
            return out

        return TaskForward(run_module, "model", params, None, tuple(model.input_shape))
    rec, key_map = builder_layout(chain, state, record)

    def run_record(st, x):
        return stacked_forward(rec, {bk: st[k][None] for bk, k in key_map.items()}, x[None])[0]

    params = frozenset(key_map[name] for name, _ in build(rec).named_parameters() if name in key_map)
    return TaskForward(run_record, "record" if record is not None else "mlp", params, rec)


def task_data(data: Dataset, forward: TaskForward, state: Mapping[str, torch.Tensor]) -> Dataset:
    """``data`` shaped for ``forward``'s inputs, checked against its outputs.

    Raises:
        DataError: the inputs do not fit the model, or there are more classes than outputs.
        ModelMergeError: the model fails on the data, or does not return logits.
    """
    if forward.record is not None:
        return fit_inputs(forward.record, data)
    shape = forward.input_shape
    if math.prod(data.input_shape) != math.prod(shape):
        raise DataError(f"{data.name} inputs have shape {list(data.input_shape)} but the model expects "
                        f"{list(shape)}; pass --input-shape or other data")
    x_tr, x_te = data.x_train.reshape(-1, *shape), data.x_test.reshape(-1, *shape)
    as_float = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # half checkpoints too
    with torch.no_grad():
        n_out = forward.run(as_float, x_tr[:1]).shape[-1]
    if data.num_classes > n_out:
        raise DataError(f"{data.name} has {data.num_classes} classes but the model outputs {n_out}")
    return Dataset(data.name, x_tr, data.y_train, x_te, data.y_test)


def merged_loss(forward: TaskForward, a: Mapping[str, torch.Tensor], b_aligned: Mapping[str, torch.Tensor],
                x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the α = 0.5 merge of ``a`` and ``b_aligned`` on ``(x, y)`` (differentiable in both)."""
    merged = {k: (0.5 * (v.float() + b_aligned[k].float()) if v.is_floating_point() else v) for k, v in a.items()}
    return F.cross_entropy(forward.run(merged, x), y)


def selection_batch(data: Dataset, limit: int = SELECTION_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples that score candidate answers: the training split, or a seeded subset of ``limit``.

    The whole split rather than a small held-back batch: differences between good
    answers are a few hundredths of a nat, below a 256-example batch's noise
    (measured: the held-back batch picked worse answers on held-out pairs). The
    test split stays for evaluation.
    """
    x, y = data.x_train, data.y_train
    if len(x) == 0:
        raise ModelMergeError("the dataset has no training examples to score alignments with")
    if len(x) > limit:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:limit]
        x, y = x[idx], y[idx]
    return x, y


def refine_lmc(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    forward: TaskForward,
    data: Dataset,
    init: Mapping[str, torch.Tensor],
    *,
    steps: int = 100,
    lr: float = 1e-2,
    batch: int = 512,
    seed: int = 0,
    max_iter: int = 20,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], RefineInfo]:
    """Improve a permutation of B's units by minimising the α = 0.5 merge's loss (see the module doc).

    Args:
        a, b: state dicts.
        spec: the permutation spec (any: weight matching does the projections).
        forward: the architecture's differentiable forward (:func:`task_forward`).
        data: task data shaped for it (:func:`task_data`).
        init: starting permutation (group -> LongTensor), e.g. the learned answer.
        steps: optimisation steps (one weight-matching projection each).
        lr: Adam learning rate on the free weights.
        batch: training examples per step.
        seed: seeds the batches and the matcher's group order.
        max_iter: weight-matching sweeps per projection at most.
        on_step: called after each step with (steps done, steps, best loss so far).

    Returns:
        ``(perm, info)``.

    Raises:
        ModelMergeError: no training data.
    """
    x_sel, y_sel = selection_batch(data)
    gen = torch.Generator().manual_seed(seed)

    def score(perm) -> float:
        with torch.no_grad():
            return float(merged_loss(forward, a, apply_permutation(b, spec, perm), x_sel, y_sel))

    # free weights θ, started at A: the matcher reads them all, the forward trains those it uses
    theta = {k: v.detach().float().clone().requires_grad_(k in forward.params) if v.is_floating_point() else v
             for k, v in a.items()}
    opt = torch.optim.Adam([v for v in theta.values() if v.requires_grad], lr=lr)
    perm = {g: p.clone() for g, p in init.items()}
    best, best_loss = perm, score(perm)
    start, last = best_loss, None
    for step in range(steps):
        frozen = {k: v.detach() for k, v in theta.items()}
        perm, _ = weight_matching(frozen, b, spec, seed=seed + step, max_iter=max_iter, init=perm)
        projected = apply_permutation(b, spec, perm)
        # straight through: the forward sees the projection, the gradient reaches θ
        st = {k: (v + (projected[k].float() - v).detach() if v.requires_grad else projected[k])
              for k, v in theta.items()}
        idx = torch.randint(len(data.x_train), (min(batch, len(data.x_train)),), generator=gen)
        loss = merged_loss(forward, a, st, data.x_train[idx], data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        key = tuple(tuple(p.tolist()) for p in perm.values())
        if key != last:  # the projection often repeats: score only new answers
            last = key
            cand = score(perm)
            if cand < best_loss:
                best, best_loss = {g: p.clone() for g, p in perm.items()}, cand
        if on_step is not None:
            on_step(step + 1, steps, best_loss)
    return dict(best), RefineInfo(steps, start, best_loss)
