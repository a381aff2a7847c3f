"""BatchNorm reset: recompute running statistics of a merged model (REPAIR's "BN reset").

Interpolating two aligned networks leaves each BatchNorm with averaged
statistics that no longer match the merged network's activations. Running
training data through the merged model in train mode (cumulative average, no
gradient) restores them. :meth:`modelmerge.network.Network.reset_bn` applies
it to a state dict.
"""

from __future__ import annotations

import torch
from torch import nn


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@torch.no_grad()
def reset_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Recompute every BatchNorm's running statistics of ``model`` on ``x``; eval mode after.

    The model runs in training mode over ``x`` in batches of ``batch_size``, and each BatchNorm keeps
    the plain average of the batches' statistics (``momentum=None``; every batch weighs the same, the
    last smaller one too, and the variance is the mean of within-batch variances). That is the usual
    reset (REPAIR's reference code does it); one whole-split batch differs by up to 0.25 % in variance on digits CNNs.
    """
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
