"""The canonical weight space the learned aligner reads.

A chain of ``L`` layers becomes, per layer, a weight ``[n_out, n_in, T]`` and a
bias ``[n_out]``, where ``T`` counts the taps of one connection: 1 for a Linear
layer, ``k*k`` (or ``k``) for a Conv, and ``H*W`` for the linear layer that
reads a flattened conv map (each of its input channels owns ``H*W`` inputs).
BatchNorm in eval form is folded into the layer before it (an equivalent
function, so the same permutation aligns both); LayerNorm parameters are not
part of the view (they are still permuted through the spec).

Node sets: layer 0 are the inputs, layer ``L`` the outputs (both fixed),
layers ``1..L-1`` the hidden units, whose permutation groups are
``chain.group(0) .. chain.group(L-2)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from modelmerge.spec import Chain


@dataclass(frozen=True)
class WeightSpace:
    """Per-layer canonical tensors of one network.

    Attributes:
        weights: ``weights[l]`` is ``[n_{l+1}, n_l, T_l]`` (float32).
        biases: ``biases[l]`` is ``[n_{l+1}]`` (zeros where the layer has none).
        kinds: ``"linear"``, ``"conv"`` or ``"flatten"`` (a linear layer reading a conv map).
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]
    kinds: tuple[str, ...]

    @property
    def widths(self) -> tuple[int, ...]:
        """``(n_0, n_1, ..., n_L)``: inputs, hidden widths, outputs."""
        return (self.weights[0].shape[1],) + tuple(w.shape[0] for w in self.weights)

    @property
    def family(self) -> str:
        """``"mlp"`` (all linear) or ``"cnn"`` (convs, then linear layers)."""
        return "mlp" if all(k == "linear" for k in self.kinds) else "cnn"

    def signature(self) -> tuple:
        """Everything that must match for two networks to be batched together."""
        return tuple((tuple(w.shape), k) for w, k in zip(self.weights, self.kinds))


def _float(t: torch.Tensor) -> torch.Tensor:
    """float32 unless already float64 (tests check symmetries exactly in float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def _fold_batchnorm(w: torch.Tensor, b: torch.Tensor, norm, state) -> tuple[torch.Tensor, torch.Tensor]:
    # w (N, out, ...), b (N, out); BN statistics (N, out)
    p = {role: _float(state[key]) for role, key in norm.params.items() if role != "num_batches_tracked"}
    if "running_mean" not in p:
        return w, b  # LayerNorm/affine: not foldable per unit, left out of the view
    scale = p.get("weight", torch.ones_like(p["running_var"])) / torch.sqrt(p["running_var"] + 1e-5)
    shift = p.get("bias", torch.zeros_like(scale)) - p["running_mean"] * scale
    return w * scale.view(*scale.shape, *([1] * (w.ndim - 2))), b * scale + shift


def stacked_weight_space(
    chain: Chain, state: Mapping[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[str, ...]]:
    """Canonical tensors of ``N`` stacked networks (``state``: name -> ``[N, *shape]``).

    Differentiable in ``state``. Returns weights ``[N, n_out, n_in, T]`` and
    biases ``[N, n_out]`` per layer, and the layer kinds.
    """
    weights, biases, kinds = [], [], []
    for i, layer in enumerate(chain.layers):
        w = _float(state[layer.weight])
        n = w.shape[0]
        b = _float(state[layer.bias]) if layer.bias is not None else w.new_zeros(n, w.shape[1])
        for norm in layer.norms:
            w, b = _fold_batchnorm(w, b, norm, state)
        if layer.kind == "conv":
            kinds.append("conv")
            w = w.reshape(n, w.shape[1], w.shape[2], -1)
        elif i > 0 and chain.layers[i - 1].kind == "conv":
            kinds.append("flatten")
            c = state[chain.layers[i - 1].weight].shape[1]
            w = w.reshape(n, w.shape[1], c, -1)  # (N, out, C*s) -> (N, out, C, s), channel-major
        else:
            kinds.append("linear")
            w = w[..., None]
        weights.append(w)
        biases.append(b)
    return weights, biases, tuple(kinds)


def to_weight_space(chain: Chain, state: Mapping[str, torch.Tensor]) -> WeightSpace:
    """Canonical per-layer tensors of the network ``chain`` describes.

    Shapes: Linear ``[out, in]`` -> ``[out, in, 1]``; Conv ``[out, in, *k]`` ->
    ``[out, in, prod(k)]``; flatten-Linear ``[out, C*s]`` -> ``[out, C, s]``.
    """
    weights, biases, kinds = stacked_weight_space(chain, {k: v[None] for k, v in state.items()})
    return WeightSpace(tuple(w[0] for w in weights), tuple(b[0] for b in biases), kinds)


def stack(spaces: list[WeightSpace]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Stack networks of one signature: weights ``[N, n_out, n_in, T]``, biases ``[N, n_out]`` per layer."""
    sig = spaces[0].signature()
    if any(s.signature() != sig for s in spaces):
        raise ValueError("cannot stack weight spaces of different shapes")
    weights = [torch.stack([s.weights[i] for s in spaces]) for i in range(len(sig))]
    biases = [torch.stack([s.biases[i] for s in spaces]) for i in range(len(sig))]
    return weights, biases
