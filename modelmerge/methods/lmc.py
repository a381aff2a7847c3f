"""The LMC refinement: a short straight-through optimisation of the merge's loss (needs data).

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

It needs only a spec (for the projections) and a differentiable forward: any
:class:`~modelmerge.network.Network` that runs on data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from modelmerge.data import Dataset
from modelmerge.errors import ModelMergeError
from modelmerge.matching import weight_matching
from modelmerge.merge import mix
from modelmerge.methods.base import Answer, Context, Method, register
from modelmerge.network import Network
from modelmerge.permutation import Permutation, apply_permutation

#: examples of the training split that score candidate answers (a seeded subset beyond this)
SELECTION_LIMIT = 4096


def merged_loss(network: Network, a: Mapping[str, torch.Tensor], b_aligned: Mapping[str, torch.Tensor],
                x: torch.Tensor, y: torch.Tensor, batch_stats: bool = False) -> torch.Tensor:
    """Cross-entropy of the α = 0.5 merge of ``a`` and ``b_aligned`` on ``(x, y)`` (differentiable in both);
    ``batch_stats``: BatchNorm on ``x``'s statistics (see :meth:`Network.forward`)."""
    merged = {k: mix(v, b_aligned[k], 0.5) if v.is_floating_point() else v for k, v in a.items()}
    return F.cross_entropy(network.forward(merged, x, grad=True, batch_stats=batch_stats), y)


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


def score(network: Network, a, b, perm: Permutation, data: Dataset) -> float:
    """The α = 0.5 merge's loss on the selection batch for ``perm``: how candidates are ranked.

    A network with BatchNorm (and a module to run) is scored with the merge's
    BatchNorm statistics recomputed on the same examples, as ``--reset-bn`` would
    use it: interpolated running statistics misjudge every merge (variance
    collapse), and would rank candidates by that rather than by their alignment.
    """
    x, y = selection_batch(data)
    with torch.no_grad():
        aligned = apply_permutation(b, network.spec, perm)
        if not _has_batchnorm(network):
            return float(merged_loss(network, a, aligned, x, y))
        merged = {k: mix(v, aligned[k], 0.5).to(v.dtype) if v.is_floating_point() else v for k, v in a.items()}
        merged = network.reset_bn(merged, x)
        return float(F.cross_entropy(network.forward(merged, x), y))


def _has_batchnorm(network: Network) -> bool:
    from modelmerge.bnreset import has_batchnorm

    return network.module is not None and has_batchnorm(network.module)


def refine_lmc(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    network: Network,
    data: Dataset,
    init: Permutation,
    *,
    steps: int = 100,
    lr: float = 1e-2,
    batch: int = 512,
    seed: int = 0,
    max_iter: int = 20,
    patience: int | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[Permutation, float]:
    """Improve a permutation of B's units by minimising the α = 0.5 merge's loss (see the module doc).

    Args:
        a, b: state dicts.
        network: their resolved network (spec for the projections, forward for the loss).
        data: task data shaped for it (:meth:`Network.shape_data`).
        init: starting permutation (group -> LongTensor), e.g. the learned answer.
        steps: optimisation steps (one weight-matching projection each).
        lr: Adam learning rate on the free weights.
        batch: training examples per step, drawn at random from the training split. (Steps on the
            whole selection batch measured no better, for 1.2-2.5x the time: on pairs outside the
            benchmark's seeds, digits MLPs 0.31x/0.53x weight matching's barrier against 0.38x/0.50x,
            unseen widths 0.50x/0.58x against 0.42x/0.49x, digits CNNs 0.60x against 0.61x.)
        seed: seeds the batches and the matcher's group order.
        max_iter: weight-matching sweeps per projection at most.
        patience: stop once this many steps in a row found no better answer (default: half of
            ``steps``, at least 10; 0 never stops early). The best answer seldom changes after a long plateau
            (measured: last improvements at steps 1-79 of 100), and each step costs a projection.
        on_step: called after each step with (steps done, steps, best loss so far).

    Returns:
        ``(perm, loss)``: the best answer seen and its selection-batch loss.

    Raises:
        ModelMergeError: no training data.
    """
    spec = network.spec
    gen = torch.Generator().manual_seed(seed)
    # a BatchNorm merge is scored after a reset (see score), so its steps use batch statistics too
    bn = _has_batchnorm(network)

    def loss_of(perm) -> float:
        return score(network, a, b, perm, data)

    # free weights θ, started at A: the matcher reads them all, the forward trains those it uses
    trainable = network.trainable
    theta = {k: v.detach().float().clone().requires_grad_(k in trainable) if v.is_floating_point() else v
             for k, v in a.items()}
    opt = torch.optim.Adam([v for v in theta.values() if v.requires_grad], lr=lr)
    perm = {g: p.clone() for g, p in init.items()}
    best, best_loss = perm, loss_of(perm)
    last = None
    patience = max(10, steps // 2) if patience is None else patience
    if patience < 0:
        raise ModelMergeError(f"patience must be 0 (never stop early) or more, got {patience}")
    improved_at = 0
    for step in range(steps):
        if patience and step - improved_at >= patience:
            break
        frozen = {k: v.detach() for k, v in theta.items()}
        perm, _ = weight_matching(frozen, b, spec, seed=seed + step, max_iter=max_iter, init=perm, objective=False)
        projected = apply_permutation(b, spec, perm)
        # straight through: the forward sees the projection, the gradient reaches θ
        st = {k: (v + (projected[k].float() - v).detach() if v.requires_grad else projected[k])
              for k, v in theta.items()}
        idx = torch.randint(len(data.x_train), (min(batch, len(data.x_train)),), generator=gen)
        loss = merged_loss(network, a, st, data.x_train[idx], data.y_train[idx], batch_stats=bn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        key = tuple(tuple(p.tolist()) for p in perm.values())
        if key != last:  # the projection often repeats: score only new answers
            last = key
            cand = loss_of(perm)
            if cand < best_loss:
                best, best_loss = {g: p.clone() for g, p in perm.items()}, cand
                improved_at = step + 1
        if on_step is not None:
            on_step(step + 1, steps, best_loss)
    return dict(best), best_loss


def _run(ctx: Context, start: Answer | None) -> Answer:
    t = time.perf_counter()
    done = [0]

    def on_step(step: int, steps: int, best: float) -> None:
        done[0] = step
        if ctx.on_refine is not None:
            ctx.on_refine(step, steps, best)

    perm, _ = refine_lmc(ctx.a, ctx.b, ctx.network, ctx.task(), start.perm, seed=ctx.seed,
                         steps=ctx.refine_steps, on_step=on_step)
    return Answer(f"{start.name}+lmc", perm, "refine", time.perf_counter() - t, done[0], None, start.aligner)


def _unavailable(ctx: Context) -> str | None:
    from modelmerge.network import NO_DATA

    return None if ctx.network.runs_on_data else NO_DATA


register(Method("lmc", "refine", True, _run, _unavailable))  # straight-through LMC optimisation
