"""Training many small models at once (vectorised over models).

All models of a zoo share an architecture, so their parameters are stacked
into ``[N, ...]`` tensors and one batched forward/backward
(:func:`modelmerge.stacked.stacked_forward`) trains all N on their own
mini-batches (each model has its own initialisation seed and its own data
order). The loss is the sum of the models' losses, so each model's gradient is
its own; Adam is element-wise, so one optimiser over the stacked tensors is
exactly N independent optimisers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelmerge.archs import build, fit_inputs
from modelmerge.bnreset import reset_batchnorm
from modelmerge.data import Dataset
from modelmerge.evaluate import evaluate_model
from modelmerge.stacked import stacked_forward


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every model of a zoo."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0


def _adam(tensors: list[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, fused where this torch supports it on CPU (about 1.5x faster steps here)."""
    try:
        return torch.optim.Adam(tensors, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(tensors, lr=config.lr, weight_decay=config.weight_decay)


@dataclass(frozen=True)
class TrainedModel:
    """One trained model of a zoo, with its numbers."""

    seed: int
    state: dict[str, torch.Tensor]
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float


def train_models(
    record: Mapping,
    data: Dataset,
    seeds: list[int],
    config: TrainConfig = TrainConfig(),
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[TrainedModel]:
    """Train one model per seed, all at once.

    Args:
        record: architecture record (see :mod:`modelmerge.archs`).
        data: dataset (reshaped for the record by :func:`fit_inputs`).
        seeds: one per model; each seeds the model's initialisation and data order.
        config: epochs, batch size, learning rate, weight decay.
        on_step: called after every step with (step, total steps, mean loss over models).

    Returns:
        The trained models, in the order of ``seeds``.
    """
    data = fit_inputs(record, data)
    models = [build(record, seed=s) for s in seeds]
    names = [k for k, v in models[0].state_dict().items() if v.is_floating_point()]
    trainable = {k for k, _ in models[0].named_parameters()}
    states = [m.state_dict() for m in models]

    def stack(k):  # Linear weights kept as [N, in, out] while training (see stacked_forward)
        t = torch.stack([st[k] for st in states])
        return t.transpose(1, 2).contiguous() if t.ndim == 3 else t

    params = {k: stack(k).requires_grad_(k in trainable) for k in names}
    opt = _adam([params[k] for k in trainable], config)
    n, bs = len(data.x_train), min(config.batch_size, len(data.x_train))
    steps_per_epoch = n // bs
    total = steps_per_epoch * config.epochs
    gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
    step = 0
    for _ in range(config.epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # [N, n]
        for s in range(steps_per_epoch):
            idx = order[:, s * bs:(s + 1) * bs]  # [N, B]
            logits = stacked_forward(record, params, data.x_train[idx], train=True, transposed=True)  # [N, B, classes]
            losses = F.cross_entropy(logits.flatten(0, 1), data.y_train[idx].flatten(), reduction="none")
            losses = losses.view(len(seeds), bs).mean(1)  # [N]
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()  # sum over models: each model gets exactly its own gradient
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step, total, float(losses.detach().mean()))
    out = []
    for i, (seed, model) in enumerate(zip(seeds, models)):
        model.load_state_dict({k: (v[i].T if v.ndim == 3 else v[i]).detach() for k, v in params.items()},
                              strict=False)
        reset_batchnorm(model, data.x_train)
        tr = evaluate_model(model, data.x_train, data.y_train)
        te = evaluate_model(model, data.x_test, data.y_test)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out.append(TrainedModel(seed, state, tr[0], tr[1], te[0], te[1]))
    return out
