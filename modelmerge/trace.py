"""Permutation specs traced from a model class with ``torch.fx``.

Walks the traced graph and tracks, for every tensor, the permutation group of
its channel axis (axis 1: features of a Linear output, channels of a conv map):

* Linear and Conv (``groups=1``) start a new group on their outputs and put
  their input's group on the weight's input axis;
* BatchNorm, LayerNorm over the channels, GroupNorm with 1 or C groups,
  element-wise activations, dropout and pooling keep the group and permute
  their per-channel parameters with it;
* a residual ``add`` (also ``sub``, element-wise ``mul``) *ties* the groups of
  its operands (union-find): every layer writing into the residual stream
  shares one permutation;
* ``flatten(x, 1)`` keeps the group; the linear layer reading it permutes its
  inputs in blocks (the spec's block axes);
* concatenation, reshapes, indexing and anything else not understood hold the
  groups they touch fixed, and are listed in :attr:`TraceResult.warnings`.

The model's inputs and outputs are never permuted.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn

from modelmerge.errors import SpecError, one_line
from modelmerge.spec import PermutationSpec

FIXED = "<fixed>"

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.PReLU,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu, torch.tanh,
    torch.sigmoid, torch.nn.functional.leaky_relu, torch.nn.functional.dropout, torch.nn.functional.elu,
    torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d, torch.nn.functional.relu6,
    torch.nn.functional.hardswish, torch.nn.functional.softplus,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float"}
_TIE_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}
_TIE_METHODS = {"add", "add_", "sub", "mul"}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {FIXED: FIXED}

    def add(self, x: str) -> str:
        self.parent.setdefault(x, x)
        return x

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> str:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb == FIXED or (ra != FIXED and rb < ra):  # FIXED absorbs; otherwise a stable name
            ra, rb = rb, ra
        self.parent[rb] = ra
        return ra


@dataclass
class TraceResult:
    """A traced spec and what the tracer could not follow."""

    spec: PermutationSpec
    warnings: list[str] = field(default_factory=list)


def trace_spec(model: nn.Module) -> TraceResult:
    """Derive the permutation spec of ``model`` from its ``torch.fx`` graph.

    Raises:
        SpecError: the model cannot be traced (data-dependent control flow, ...);
            the message points to ``--spec``.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # fx raises many types for untraceable code
        raise SpecError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {one_line(e, 160)}); "
            "write a spec file (docs/spec-format.md) and pass --spec FILE.json"
        ) from None
    uf = _UnionFind()
    modules = dict(model.named_modules())
    state = model.state_dict()
    value: dict[str, str] = {}  # node name -> group of its channel axis
    entries: dict[tuple[str, int], str] = {}  # (param, axis) -> group
    sizes: dict[str, int] = {}
    warnings: list[str] = []

    def group_of(arg) -> str:
        return value.get(arg.name, FIXED) if isinstance(arg, torch.fx.Node) else FIXED

    def fix(g: str, why: str) -> None:
        if uf.find(g) != FIXED:
            warnings.append(why)
        uf.union(g, FIXED)

    def per_channel(prefix: str, g: str, roles=("weight", "bias", "running_mean", "running_var")) -> None:
        for role in roles:
            if f"{prefix}.{role}" in state:
                entries[(f"{prefix}.{role}", 0)] = g

    for node in graph.nodes:
        if node.op == "placeholder":
            value[node.name] = FIXED
        elif node.op == "get_attr":
            value[node.name] = FIXED
            warnings.append(f"{node.target}: a parameter used outside its module is held fixed")
        elif node.op == "output":
            for arg in _flat_nodes(node.args):
                fix(group_of(arg), f"output: {arg.name} feeds the model's output, which is never permuted")
        elif node.op == "call_module":
            mod = modules[node.target]
            src = group_of(node.args[0]) if node.args else FIXED
            value[node.name] = _module_rule(node.target, mod, src, uf, entries, sizes, per_channel, fix)
        elif node.op == "call_function":
            value[node.name] = _function_rule(node, node.target, group_of, uf, fix)
        elif node.op == "call_method":
            value[node.name] = _method_rule(node, group_of, uf, fix)
    # output units of the last layers are fixed by the output rule; build the spec
    axes: dict[str, list[str | None]] = {k: [None] * v.ndim for k, v in state.items()}
    groups: dict[str, int] = {}
    for (param, axis), g in entries.items():
        root = uf.find(g)
        if root == FIXED:
            continue
        axes[param][axis] = root
        groups[root] = sizes[root]
    return TraceResult(PermutationSpec(groups, {k: tuple(v) for k, v in axes.items()}), _dedupe(warnings))


def _flat_nodes(args) -> list:
    out = []
    for a in args if isinstance(args, (tuple, list)) else [args]:
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            out.extend(_flat_nodes(a))
        elif isinstance(a, dict):
            out.extend(_flat_nodes(list(a.values())))
    return out


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _module_rule(name, mod, src, uf, entries, sizes, per_channel, fix) -> str:
    if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d) and mod.groups != 1:
            fix(src, f"{name}: grouped convolution (groups={mod.groups}) holds its channels fixed")
            entries[(f"{name}.weight", 0)] = FIXED
            return FIXED
        out = uf.add(f"{name}.out")
        sizes[out] = mod.weight.shape[0]
        entries[(f"{name}.weight", 0)] = out
        entries[(f"{name}.weight", 1)] = src
        if mod.bias is not None:
            entries[(f"{name}.bias", 0)] = out
        return out
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        per_channel(name, src)
        return src
    if isinstance(mod, nn.LayerNorm):
        if len(mod.normalized_shape) == 1:
            per_channel(name, src, ("weight", "bias"))
            return src
        fix(src, f"{name}: LayerNorm over {tuple(mod.normalized_shape)} holds its channels fixed")
        return FIXED
    if isinstance(mod, nn.GroupNorm):
        if mod.num_groups in (1, mod.num_channels):
            per_channel(name, src, ("weight", "bias"))
            return src
        fix(src, f"{name}: GroupNorm with {mod.num_groups} groups holds its channels fixed")
        return FIXED
    if isinstance(mod, nn.PReLU) and mod.weight.numel() > 1:
        per_channel(name, src, ("weight",))
        return src
    if isinstance(mod, _ELEMENTWISE_MODULES):
        return src
    if isinstance(mod, nn.Flatten):
        if mod.start_dim == 1:
            return src
        fix(src, f"{name}: Flatten(start_dim={mod.start_dim}) holds its channels fixed")
        return FIXED
    fix(src, f"{name}: {type(mod).__name__} is not understood; its input channels are held fixed")
    return FIXED


def _function_rule(node, fn, group_of, uf, fix) -> str:
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if fn in _TIE_FUNCTIONS:
        if len(tensors) == 1:
            return group_of(tensors[0])  # x + scalar
        g = group_of(tensors[0])
        for other in tensors[1:]:
            g = uf.union(g, group_of(other))
        return g
    if fn in _ELEMENTWISE_FUNCTIONS:
        return group_of(tensors[0]) if tensors else FIXED
    if fn is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if start == 1:
            return group_of(tensors[0])
    if fn is getattr or (fn is operator.getitem and _is_shape(node.args[0])):
        return FIXED  # x.shape, x.size()[0]: not tensors
    name = getattr(fn, "__name__", str(fn))
    for t in _flat_nodes(list(node.args) + list(node.kwargs.values())):
        fix(group_of(t), f"{node.name}: {name} is not understood; the channels it touches are held fixed")
    return FIXED


def _is_shape(n) -> bool:
    return isinstance(n, torch.fx.Node) and (
        (n.op == "call_function" and n.target is getattr) or (n.op == "call_method" and n.target == "size"))


def _method_rule(node, group_of, uf, fix) -> str:
    method = node.target
    this = node.args[0]
    if method in ("size", "dim"):
        return FIXED
    if method in _ELEMENTWISE_METHODS:
        return group_of(this)
    if method in _TIE_METHODS:
        others = [a for a in node.args[1:] if isinstance(a, torch.fx.Node)]
        g = group_of(this)
        for o in others:
            g = uf.union(g, group_of(o))
        return g
    if method == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if start == 1:
            return group_of(this)
    if method in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
        return group_of(this)  # x.view(x.size(0), -1): a flatten
    if method == "mean" and _dims(node) and 1 not in _dims(node):
        return group_of(this)  # spatial mean
    fix(group_of(this), f"{node.name}: .{method}() is not understood; the channels it touches are held fixed")
    return FIXED


def _dims(node) -> tuple:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        return (dims,)
    return tuple(dims) if isinstance(dims, (tuple, list)) else ()
