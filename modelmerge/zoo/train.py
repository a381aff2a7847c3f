"""Training many small models at once (vectorised over models).

All models of a zoo share an architecture, so their parameters are stacked
into ``[N, ...]`` tensors and one batched forward/backward
(:func:`modelmerge.zoo.stacked.stacked_forward`) trains all N on their own
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
from torch import nn

from modelmerge.zoo.archs import build, validate_record
from modelmerge.zoo.data import Dataset
from modelmerge.zoo.stacked import stacked_forward


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every model of a zoo."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0


def fit_inputs(record: Mapping, data: Dataset) -> Dataset:
    """The dataset shaped for the record's model (flattened for MLPs).

    Raises:
        DataError: the data's input size does not match the record.
    """
    from modelmerge.errors import DataError

    r = validate_record(record)
    if r["family"] == "mlp":
        data = data.flat()
        want = (r["widths"][0],)
    else:
        want = tuple(r["input_shape"])
    if data.input_shape != want:
        raise DataError(
            f"{data.name} inputs have shape {list(data.input_shape)} but the model expects {list(want)}"
        )
    n_out = r["widths"][-1] if r["family"] == "mlp" else r["num_classes"]
    if data.num_classes > n_out:
        raise DataError(f"{data.name} has {data.num_classes} classes but the model outputs {n_out}")
    return data


@torch.no_grad()
def reset_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running statistics as the average over ``x`` (REPAIR's "BN reset")."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    return model.eval()


@torch.no_grad()
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``(x, y)``."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        loss += float(F.cross_entropy(out, y[i:i + batch_size], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return loss / len(x), correct / len(x)


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
        record: architecture record (see :mod:`modelmerge.zoo.archs`).
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


def state_metric(
    record: Mapping, data: Dataset, split: str = "test"
) -> Callable[[Mapping[str, torch.Tensor]], tuple[float, float]]:
    """A function state dict -> (mean loss, accuracy) on one split, for interpolation curves."""
    data = fit_inputs(record, data)
    x, y = (data.x_test, data.y_test) if split == "test" else (data.x_train, data.y_train)
    model = build(record)

    def metric(state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        model.load_state_dict(dict(state))
        return evaluate_model(model, x, y)

    return metric


def metric_for(
    state: Mapping[str, torch.Tensor], record: Mapping | None, data: Dataset, split: str = "test"
) -> tuple[Callable[[Mapping[str, torch.Tensor]], tuple[float, float]], str | None]:
    """A (loss, accuracy) metric for checkpoints shaped like ``state``.

    With an architecture record the real model is used. Without one, a bare
    Linear chain is run as a ReLU MLP (the returned note says so); anything
    else needs a record.

    Returns:
        ``(metric, note)``; ``note`` is None when the forward is the record's.

    Raises:
        ModelMergeError: no forward is known for this checkpoint.
    """
    from modelmerge.errors import DataError, ModelMergeError
    from modelmerge.forward import chain_forward
    from modelmerge.spec import infer_chain

    if record is not None:
        return state_metric(record, data, split), None
    chain = infer_chain(state)
    if any(layer.kind != "linear" or layer.norms for layer in chain.layers):
        raise ModelMergeError(
            "this checkpoint has no architecture record, so its forward is unknown; evaluation runs "
            "bare checkpoints only when they are plain Linear MLPs (save a record, see docs/usage.md)"
        )
    flat = data.flat()
    x, y = (flat.x_test, flat.y_test) if split == "test" else (flat.x_train, flat.y_train)
    n_in = state[chain.layers[0].weight].shape[1]
    if x.shape[1] != n_in:
        raise DataError(f"{data.name} inputs have {x.shape[1]} features but the model expects {n_in}")

    @torch.no_grad()
    def metric(st):
        out = chain_forward(chain, st, x)
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())

    return metric, "no architecture record: evaluated as a Linear+ReLU MLP"
