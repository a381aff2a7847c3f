"""BatchNorm reset: recompute running statistics of a merged model (REPAIR's "BN reset").

Interpolating two aligned networks leaves each BatchNorm with averaged
statistics that no longer match the merged network's activations. Running
training data through the merged model in train mode (cumulative average, no
gradient) restores them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from modelmerge.errors import DataError, ModelMergeError
from modelmerge.zoo.data import Dataset
from modelmerge.zoo.train import reset_batchnorm


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def inputs_for(data: Dataset, input_shape: tuple[int, ...], split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The split's inputs reshaped to ``input_shape`` (e.g. flattened for an MLP), and labels.

    Raises:
        DataError: the sizes do not match.
    """
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    if tuple(x.shape[1:]) != tuple(input_shape):
        if x[0].numel() != int(torch.tensor(input_shape).prod()):
            raise DataError(f"{data.name} inputs have shape {list(x.shape[1:])} but the model expects "
                            f"{list(input_shape)}")
        x = x.reshape(len(x), *input_shape)
    return x, y


def reset_bn_state(state: Mapping[str, torch.Tensor], module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``state`` with every BatchNorm's running statistics recomputed on ``x`` through ``module``.

    Raises:
        ModelMergeError: the model has no BatchNorm (nothing to reset).
    """
    if not has_batchnorm(module):
        raise ModelMergeError("--reset-bn: the model has no BatchNorm layer, so there is nothing to reset")
    module.load_state_dict(dict(state))
    reset_batchnorm(module, x)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
