"""The generic forward of a chain inferred from a bare state dict (see :mod:`modelmerge.network`).

For a chain inferred from a bare state dict (:func:`modelmerge.spec.infer_chain`)
the true activation, strides and pooling are unknown, so
:func:`chain_forward` runs a *generic* forward with the same wiring: every
layer, then its BatchNorm/LayerNorm, then ReLU; convolutions keep the spatial
size, and an adaptive average pool gives the linear head the feature-map size
it expects. Any such forward is exactly as permutation-equivariant as the real
network, which is what verification needs. For a Linear+ReLU MLP it *is* the
real network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from modelmerge.spec import Chain, Norm


def spatial_shape(k: int, dims: int) -> tuple[int, ...]:
    """A feature-map shape with ``prod == k`` for ``dims`` spatial dimensions."""
    if dims == 1:
        return (k,)
    h = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    return (h, k // h) + (1,) * (dims - 2)


def _norm(x: torch.Tensor, norm: Norm, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    get = {role: state[key] for role, key in norm.params.items()}
    w, b = get.get("weight"), get.get("bias")
    if norm.is_batchnorm:
        return F.batch_norm(x, get["running_mean"], get.get("running_var"), w, b, False, 0.0, 1e-5)
    if x.ndim == 2 and w is not None and w.numel() == x.shape[1]:
        return F.layer_norm(x, (x.shape[1],), w, b)
    shape = (1, -1) + (1,) * (x.ndim - 2)  # per-channel affine on (N, C, *spatial)
    x = x * w.reshape(shape) if w is not None and w.numel() > 1 else x * (w if w is not None else 1)
    return x + b.reshape(shape) if b is not None else x


def chain_forward(chain: Chain, state: Mapping[str, torch.Tensor], x: torch.Tensor,
                  on_layer: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
    """Run the generic forward of ``chain`` with the weights in ``state``.

    Args:
        chain: layer order and wiring.
        state: the weights.
        x: ``[N, in]`` for an MLP or ``[N, C_in, *spatial]`` for a conv chain.
        on_layer: called with (layer index, its output after its norms, before the ReLU); a
            tensor it returns replaces that output.

    Returns:
        ``[N, out]`` (or ``[N, C_out, *spatial]`` if the chain ends in a conv).
    """
    last = len(chain.layers) - 1
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64: a round-off reference
    for i, layer in enumerate(chain.layers):
        w = state[layer.weight].to(work)
        b = state[layer.bias].to(work) if layer.bias is not None else None
        if layer.kind == "linear":
            if x.ndim > 2:
                dims = x.ndim - 2
                x = F.adaptive_avg_pool3d(x, spatial_shape(chain.blocks[i], 3)) if dims == 3 else (
                    F.adaptive_avg_pool2d(x, spatial_shape(chain.blocks[i], 2)) if dims == 2
                    else F.adaptive_avg_pool1d(x, chain.blocks[i]))
                x = x.flatten(1)  # (N, C, *s) -> (N, C * prod(s)), channel-major like nn.Flatten
            x = F.linear(x, w, b)
        else:
            conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.ndim]
            x = conv(x, w, b, padding="same")
        for norm in layer.norms:
            x = _norm(x, norm, {k: v.to(work) if v.is_floating_point() else v
                                for k, v in state.items() if k in norm.params.values()})
        if on_layer is not None and (replaced := on_layer(i, x)) is not None:
            x = replaced
        if i < last:
            x = F.relu(x)
    return x
