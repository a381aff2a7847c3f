"""The canonical weight space the learned aligner reads.

A chain of ``L`` layers becomes, per layer, a weight ``[n_out, n_in, T]`` and a
bias ``[n_out]``, where ``T`` counts the taps of one connection: 1 for a Linear
layer, ``k*k`` (or ``k``) for a Conv, and ``H*W`` for the linear layer that
reads a flattened conv map (each of its input channels owns ``H*W`` inputs).
BatchNorm in eval form is folded into the layer before it (an equivalent
function, so the same permutation aligns both); LayerNorm parameters are not
part of the view (they are still permuted through the spec).

Networks come stacked: every tensor has a leading batch axis ``N`` (``N = 1``
for one network), which is how the aligner reads them and how training
batches pairs.

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
    """Per-layer canonical tensors of ``N`` stacked networks of one shape.

    Attributes:
        weights: ``weights[l]`` is ``[N, n_{l+1}, n_l, T_l]``.
        biases: ``biases[l]`` is ``[N, n_{l+1}]`` (zeros where the layer has none).
        kinds: ``"linear"``, ``"conv"`` or ``"flatten"`` (a linear layer reading a conv map).
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]
    kinds: tuple[str, ...]

    @property
    def n(self) -> int:
        """How many networks are stacked."""
        return self.weights[0].shape[0]

    @property
    def widths(self) -> tuple[int, ...]:
        """``(n_0, n_1, ..., n_L)``: inputs, hidden widths, outputs."""
        return (self.weights[0].shape[2],) + tuple(w.shape[1] for w in self.weights)

    @property
    def family(self) -> str:
        """``"mlp"`` (all linear) or ``"cnn"`` (convs, then linear layers)."""
        return "mlp" if all(k == "linear" for k in self.kinds) else "cnn"

    def signature(self) -> tuple:
        """Everything but the batch size that must match for two weight spaces to be batched together."""
        return tuple((tuple(w.shape[1:]), k) for w, k in zip(self.weights, self.kinds))

    def to(self, dtype: torch.dtype) -> WeightSpace:
        return WeightSpace(tuple(w.to(dtype) for w in self.weights), tuple(b.to(dtype) for b in self.biases),
                           self.kinds)

    def cat(self, other: WeightSpace) -> WeightSpace:
        """``self`` then ``other`` along the batch axis (same signature)."""
        return WeightSpace(tuple(torch.cat(p) for p in zip(self.weights, other.weights)),
                           tuple(torch.cat(p) for p in zip(self.biases, other.biases)), self.kinds)

    def split(self, n: int) -> tuple[WeightSpace, WeightSpace]:
        """The first ``n`` networks and the rest."""
        return (WeightSpace(tuple(w[:n] for w in self.weights), tuple(b[:n] for b in self.biases), self.kinds),
                WeightSpace(tuple(w[n:] for w in self.weights), tuple(b[n:] for b in self.biases), self.kinds))


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


def stacked_weight_space(chain: Chain, state: Mapping[str, torch.Tensor]) -> WeightSpace:
    """Canonical tensors of ``N`` stacked networks (``state``: name -> ``[N, *shape]``).

    Differentiable in ``state``. Shapes per layer: Linear ``[N, out, in]`` ->
    ``[N, out, in, 1]``; Conv ``[N, out, in, *k]`` -> ``[N, out, in, prod(k)]``;
    flatten-Linear ``[N, out, C*s]`` -> ``[N, out, C, s]``; biases ``[N, out]``.
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
    return WeightSpace(tuple(weights), tuple(biases), tuple(kinds))


def to_weight_space(chain: Chain, state: Mapping[str, torch.Tensor]) -> WeightSpace:
    """The weight space of one network (a batch of one)."""
    return stacked_weight_space(chain, {k: v[None] for k, v in state.items()})
