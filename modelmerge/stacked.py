"""Forward passes of N models of one architecture at once.

Parameters are stacked state dicts (``name -> [N, *shape]``) and inputs are
``[N, B, *input_shape]``, one batch per model. Linear layers are batched
matrix products; convolutions run as one grouped convolution with the N
models as groups. This is how zoos are trained and how a learned aligner's
LMC loss evaluates many interpolated models in one pass: plain autograd, no
``vmap``, so gradients of ``sum_n loss_n`` are exactly the per-model gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from modelmerge.archs import validate_record

_ACT = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "leaky_relu": F.leaky_relu}


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    # x (N, B, in), w (N, out, in) or (N, in, out) if transposed, b (N, out) -> (N, B, out)
    return torch.baddbmm(b[:, None, :], x, w if transposed else w.transpose(1, 2))


def stacked_forward(
    record: Mapping, params: Mapping[str, torch.Tensor], x: torch.Tensor, train: bool = False,
    transposed: bool = False,
) -> torch.Tensor:
    """Run N models of the record's architecture, each on its own batch.

    Args:
        record: architecture record (the layer names match :func:`modelmerge.archs.build`).
        params: stacked state dict, ``name -> [N, *shape]``.
        x: ``[N, B, *input_shape]``.
        train: BatchNorm uses batch statistics (True) or running statistics (False).
        transposed: Linear weights are given as ``[N, in, out]`` (training keeps them
            so: the batched product then needs no copy, about 1.6x faster here).

    Returns:
        Logits ``[N, B, classes]``.
    """
    r = validate_record(record)
    act = _ACT[r["activation"]]
    n, batch = x.shape[:2]
    if r["family"] == "mlp":
        depth = len(r["widths"]) - 1
        for i in range(depth):
            k = 2 * i  # nn.Sequential index: Linear, activation, Linear, ...
            x = _linear(x, params[f"{k}.weight"], params[f"{k}.bias"], transposed)
            if i < depth - 1:
                x = act(x)
        return x
    c, *spatial = r["input_shape"]
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    pool = F.max_pool1d if len(spatial) == 1 else F.max_pool2d
    h = x.transpose(0, 1).reshape(batch, n * c, *spatial)  # models as channel groups: (B, N*C, *s)
    k = 0
    for ch in r["channels"]:
        w = params[f"{k}.weight"]  # (N, ch, c, *kernel)
        h = conv(h, w.reshape(n * ch, *w.shape[2:]), params[f"{k}.bias"].reshape(-1),
                 padding=r["kernel"] // 2, groups=n)
        k += 1
        if r["batchnorm"]:
            w, b = params[f"{k}.weight"].reshape(-1), params[f"{k}.bias"].reshape(-1)
            if train:
                h = F.batch_norm(h, None, None, w, b, training=True, eps=1e-5)
            else:  # written out: running statistics may carry gradients (the aligner's LMC loss)
                shape = (1, -1) + (1,) * (h.ndim - 2)
                rm, rv = params[f"{k}.running_mean"].reshape(shape), params[f"{k}.running_var"].reshape(shape)
                h = (h - rm) * torch.rsqrt(rv + 1e-5) * w.view(shape) + b.view(shape)
            k += 1
        h = act(h)
        k += 1
        if r["pool"] and min(spatial) > 1:
            h = pool(h, 2)
            spatial = [s // 2 for s in spatial]
            k += 1
        c = ch
    k += 1  # Flatten
    # (B, N*C, *s) -> (N, B, C*prod(s)), channel-major like nn.Flatten
    h = h.reshape(batch, n, -1).transpose(0, 1)
    for _ in r["hidden"]:
        h = act(_linear(h, params[f"{k}.weight"], params[f"{k}.bias"], transposed))
        k += 2
    return _linear(h, params[f"{k}.weight"], params[f"{k}.bias"], transposed)
