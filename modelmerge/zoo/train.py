"""Training many small models at once (vectorised over models with ``torch.func``).

All models of a zoo share an architecture, so their parameters are stacked
into ``[N, ...]`` tensors and one ``vmap``-ed gradient step trains all N on
their own mini-batches (each model has its own initialisation seed and its own
data order). Adam is element-wise, so one optimiser over the stacked tensors
is exactly N independent optimisers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from modelmerge.zoo.archs import build, validate_record
from modelmerge.zoo.data import Dataset


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


def _training_copy(model: nn.Module) -> nn.Module:
    """A stateless copy whose BatchNorm layers use batch statistics only (vmap cannot
    update running buffers in place); running statistics are recomputed after training."""
    base = copy.deepcopy(model)
    for m in base.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return base.train()


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
    params, _ = stack_module_state(models)  # name -> [N, ...]
    base = _training_copy(models[0])
    params = {k: v.detach().clone() for k, v in params.items()}

    def loss_fn(p, x, y):
        return F.cross_entropy(functional_call(base, p, (x,)), y)

    step_fn = vmap(grad_and_value(loss_fn))
    opt = torch.optim.Adam(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    n, bs = len(data.x_train), min(config.batch_size, len(data.x_train))
    steps_per_epoch = n // bs
    total = steps_per_epoch * config.epochs
    gens = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
    step = 0
    for _ in range(config.epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens])  # [N, n]
        for s in range(steps_per_epoch):
            idx = order[:, s * bs:(s + 1) * bs]  # [N, B]
            grads, losses = step_fn(params, data.x_train[idx], data.y_train[idx])
            for k, p in params.items():
                p.grad = grads[k]
            opt.step()
            step += 1
            if on_step is not None:
                on_step(step, total, float(losses.mean()))
    out = []
    for i, (seed, model) in enumerate(zip(seeds, models)):
        model.load_state_dict({k: v[i] for k, v in params.items()}, strict=False)
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
