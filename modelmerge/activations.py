"""Reading (and rewriting) the outputs of the layers that produce each permutation group's units.

A *producer* is a layer whose output units are a permutation group: a Linear,
Conv, BatchNorm or LayerNorm whose weight has that group on its first axis
(for a bare chain: each hidden layer, read after its norms). Activation
matching correlates their outputs across two networks; REPAIR rescales them.
Both run the network's real forward (``--model``'s or the record's module,
with forward hooks) or a bare chain's generic forward.

Outputs are read *before* any activation function that follows a layer: that
function is not a module with parameters, so the spec does not see it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from modelmerge.errors import ModelMergeError
from modelmerge.network import Network

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
_FEATURES_LAST = (nn.Linear, nn.LayerNorm)

NO_FORWARD = ("needs the network's forward: pass --model pkg.module:Class (or a checkpoint with an architecture "
              "record)")


@dataclass(frozen=True)
class Producer:
    """A layer whose output units are one permutation group.

    Attributes:
        name: its module name (or, for a bare chain, its parameters' prefix).
        group: the group its output units belong to.
        axis: the units' axis in its output (1 for channel-first maps, -1 for features last).
        weight: the state key scaled per output unit to rescale the output.
        bias: the state key shifted per output unit (None: the layer has no bias).
    """

    name: str
    group: str
    axis: int
    weight: str
    bias: str | None


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def producers(network: Network) -> list[Producer]:
    """The producers of ``network``, in module (or chain) order.

    Raises:
        ModelMergeError: the network has neither a module nor a chain forward.
    """
    spec = network.spec
    out = []
    if network.module is not None:
        for name, mod in network.module.named_modules():
            # a transposed conv's weight starts with its *input* channels: not a producer by that rule
            if not isinstance(mod, _CHANNEL_FIRST + _FEATURES_LAST) or isinstance(
                    mod, nn.modules.conv._ConvTransposeNd):
                continue
            axes = spec.axes.get(_key(name, "weight"))
            if axes and isinstance(axes[0], str):  # a packed (segmented) output is several groups: not one producer
                bias = _key(name, "bias") if getattr(mod, "bias", None) is not None else None
                out.append(Producer(name, axes[0], 1 if isinstance(mod, _CHANNEL_FIRST) else -1,
                                    _key(name, "weight"), bias))
        return out
    if network.forward_kind == "chain" and network.chain is not None:
        chain = network.chain
        for i, layer in enumerate(chain.layers[:-1]):
            weight, bias = layer.weight, layer.bias
            affine = [n for n in layer.norms if "weight" in n.params]
            if layer.norms:  # the output is read after the norms: the last norm's affine rescales it
                if not affine or affine[-1] is not layer.norms[-1]:
                    continue
                weight, bias = affine[-1].params["weight"], affine[-1].params.get("bias")
            out.append(Producer(weight.rsplit(".", 1)[0], chain.group(i), 1, weight, bias))
        return out
    if network.forward_kind == "chain":
        raise ModelMergeError("reading layer outputs needs the real forward when --spec differs from the inferred "
                              "chain: pass --model pkg.module:Class")
    raise ModelMergeError(f"reading layer outputs {NO_FORWARD}")


def units_last(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``[samples, units]``: every other axis (examples, positions, tokens) becomes samples."""
    return torch.movedim(t, axis, -1).reshape(-1, t.shape[axis])


Tap = Callable[[Producer, torch.Tensor], torch.Tensor | None]


def run_with_taps(network: Network, state: Mapping[str, torch.Tensor], x: torch.Tensor, tap: Tap) -> None:
    """Run ``state`` on ``x`` (no gradients), calling ``tap(producer, output)`` at every producer;
    a tensor ``tap`` returns replaces that output downstream.

    Raises:
        ModelMergeError: no forward to run.
    """
    found = producers(network)
    if network.module is not None:
        modules = dict(network.module.named_modules())
        hooks = []

        def hook(p: Producer):
            return lambda _m, _i, out: tap(p, out)

        try:
            for p in found:
                hooks.append(modules[p.name].register_forward_hook(hook(p)))
            network.module_forward(state, x)
        finally:
            for h in hooks:
                h.remove()
        return
    from modelmerge.forward import chain_forward

    chain = network.chain
    by_group = {p.group: p for p in found}  # a chain's hidden layer i produces group chain.group(i) alone
    floats = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def on_layer(i: int, out: torch.Tensor) -> torch.Tensor | None:
        p = by_group.get(chain.group(i)) if i < len(chain.layers) - 1 else None
        return tap(p, out) if p is not None else None

    with torch.no_grad():
        chain_forward(chain, floats, x, on_layer=on_layer)
