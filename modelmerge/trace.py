"""Permutation specs traced from a model's real forward (``torch.export``, aten-level graph).

The model runs once on an example input under ``torch.export`` (non-strict),
which records every tensor operation with its shapes. The tracer then follows
the *label* of every axis of every tensor: which permutation group (if any)
orders it. An axis label is a product of factors, row-major: a free factor
(batch, positions, pixels: never permuted) or a group factor ``(group, count,
stride)``, the unit index's component ``(unit // stride) % count``. A whole
group is ``(group, n, 1)``; splitting its axis into heads gives ``(group, H,
n/H)`` (the head) and ``(group, n/H, 1)`` (the unit within the head).

* Linear/Conv/Embedding layers (also GPT-2's ``addmm`` Conv1D and matmuls with a
  weight) start a group on their output axis; their weight's input axis takes
  the input's label;
* element-wise functions, softmax, reductions and normalisations keep labels
  (norms' parameters take the channel axis's label);
* binary element-wise ops (a residual ``add``, ``x + pos_embedding``, a
  layer-scale ``mul``) tie the labels of their operands' aligned axes: every
  layer writing into a residual stream shares one group, and a parameter added
  to it (positional embedding, class token) is permuted with it;
* views, reshapes, transposes and permutes move factors; a split of a group's
  axis into ``(H, d)`` gives the group head structure, which attention keeps
  (``q @ k^T`` and ``scaled_dot_product_attention`` tie q's and k's units, the
  batch-of-heads axes tie the head order of q, k and v);
  when the heads cannot move (q/k held fixed by rotary embeddings, one head
  selected), each member keeps its head order and is cut into one group per head;
* selecting, unbinding, splitting or slicing along a group's axis (packed qkv
  projections: ``nn.MultiheadAttention``, timm's fused ``qkv``, GPT-2's
  ``c_attn``; channel splits and slices) cuts the group into segments, each its
  own group;
* concatenation gives its output the segments of its operands' groups
  (DenseNet); a depthwise conv carries its input's group through; a grouped conv
  permutes its groups as whole blocks (rigid on the input side, free within each
  block on the output side);
* anything else that touches a permuted axis holds its groups fixed, and says so
  in :attr:`TraceResult.warnings` (one line per cause).

The model's inputs and outputs are never permuted. A group is permutable only if
some layer produces it (a parameter alone, tied to nothing, stays fixed).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
import operator
import re
import warnings as _warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from modelmerge.errors import SpecError, one_line, preview
from modelmerge.spec import HeadSet, PermutationSpec

FIXED = "<fixed>"

# ----------------------------------------------------------------------------- labels
# A factor is ("free", size) or ("g", var, count, stride); a label is a tuple of factors
# (row-major product) or a one-element tuple (("cat", (label, label, ...)),) for a concatenation.

_UNARY = {
    "relu", "relu_", "gelu", "silu", "silu_", "tanh", "sigmoid", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "softplus", "mish", "dropout", "native_dropout", "feature_dropout", "alpha_dropout", "alias",
    "clone", "contiguous", "detach", "to", "_to_copy", "type_as", "neg", "abs", "exp", "log", "sqrt", "rsqrt",
    "erf", "clamp", "clamp_min", "clamp_max", "softmax", "log_softmax", "_softmax", "_log_softmax", "sin", "cos",
    "square", "reciprocal", "logical_not", "bitwise_not", "sign", "prelu_scalar", "relu6", "lift_fresh_copy",
    "dropout_", "hardswish_", "gelu_", "sigmoid_", "tanh_", "_assert_tensor_metadata", "celu", "selu", "logsigmoid",
}
_BINARY = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow", "eq", "ne", "lt", "le",
    "gt", "ge", "where", "masked_fill", "masked_fill_", "__and__", "__or__", "logical_and", "logical_or",
    "bitwise_and", "bitwise_or", "copy_", "floor_divide", "remainder", "fmod", "rsub", "atan2", "addcmul",
}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp", "norm", "linalg_vector_norm", "prod", "any",
           "all", "max", "min"}
_POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
         "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
         "adaptive_max_pool2d", "max_pool2d_with_indices", "max_pool1d_with_indices", "max_pool3d_with_indices",
         "adaptive_max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d", "_adaptive_avg_pool2d",
         "upsample_nearest1d", "upsample_linear1d"}
_CREATE = {"arange", "zeros", "ones", "full", "empty", "new_ones", "new_zeros", "new_full", "new_empty", "scalar_tensor",
           "zeros_like", "ones_like", "full_like", "empty_like", "rand", "randn", "tensor", "_local_scalar_dense",
           "sym_size", "sym_numel", "sym_stride", "rand_like", "randn_like", "eye"}
_VIEWS = {"view", "reshape", "_unsafe_view", "unflatten", "flatten"}
_LAYERS = {"linear", "addmm", "mm", "matmul", "bmm", "conv1d", "conv2d", "conv3d", "convolution", "embedding"}


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _free(size: int):
    return ("free", int(size))


def _fsize(f) -> int:
    if f[0] == "free":
        return f[1]
    if f[0] == "g":
        return f[2]
    if f[0] == "prod":
        return math.prod(_fsize(x) for x in f[1])
    return sum(_lsize(p) for p in f[1])


def _lsize(label) -> int:
    return math.prod(_fsize(f) for f in label)


class _State:
    """Union-find over group variables, plus what is known about each class."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {FIXED: FIXED}
        self.size: dict[str, int] = {}
        self.producer: set[str] = set()
        self.structure: dict[str, set[tuple[int, int]]] = {}  # var -> (count, stride) factors seen
        self.rigid: dict[str, int] = {}  # var -> chunk count whose units never move within a chunk
        self.head_ties: list[tuple[str, str]] = []
        self.alias: dict[str, tuple] = {}  # root of a passive class -> the label it stands for
        self.pieces: dict[str, list[str]] = {}  # root -> its segments (sub-variables), when cut
        self.why: dict[str, list[str]] = {}  # cause -> places
        self.counter = 0
        self.order: list[str] = []  # producers, first seen first (names the groups)
        self.fixes = 0  # classes held fixed so far (build repeats its checks until none is added)

    # ------------------------------------------------------------------ classes
    def new(self, hint: str, size: int, producer: bool = False) -> str:
        name = hint
        while name in self.parent:
            self.counter += 1
            name = f"{hint}~{self.counter}"
        self.parent[name] = name
        self.size[name] = int(size)
        if producer:
            self.mark(name)
        return name

    def mark(self, var: str) -> None:
        """``var`` is the output axis of a layer: its class is a group a layer produces."""
        if var not in self.producer:
            self.producer.add(var)
            self.order.append(var)

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str, cause: str = "", place: str = "") -> str:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if FIXED in (ra, rb):
            other = rb if ra == FIXED else ra
            self.fix_var(other, cause, place)
            return FIXED
        if self.size[ra] != self.size[rb]:
            self.fix_var(ra, cause or "units of different sizes meet", place)
            self.fix_var(rb, cause or "units of different sizes meet", place)
            return FIXED
        # a stable name: a produced group's smallest name, else the smallest
        keep, drop = sorted((ra, rb), key=lambda r: (r not in self.producer and not self._has_producer(r), r))
        self.parent[drop] = keep
        alias_keep, alias_drop = self.alias.pop(keep, None), self.alias.pop(drop, None)
        pieces_keep, pieces_drop = self.pieces.pop(keep, None), self.pieces.pop(drop, None)
        if alias_keep is not None or alias_drop is not None:
            self.alias[keep] = alias_keep if alias_keep is not None else alias_drop
            if alias_keep is not None and alias_drop is not None:
                self.tie(alias_keep, alias_drop, cause, place)
        if pieces_keep is not None or pieces_drop is not None:
            self.pieces[keep] = pieces_keep if pieces_keep is not None else pieces_drop
            if pieces_keep is not None and pieces_drop is not None:
                if [self.size[p] for p in pieces_keep] == [self.size[p] for p in pieces_drop]:
                    for p, q in zip(pieces_keep, pieces_drop):
                        self.union(p, q, cause, place)
                else:
                    self.fix_var(keep, "a packed projection cut two ways", place)
        return self.find(keep)

    def _has_producer(self, root: str) -> bool:
        return any(self.find(p) == root for p in self.producer)

    def fix_var(self, var: str, cause: str, place: str) -> None:
        root = self.find(var)
        if root == FIXED:
            return
        pieces = self.pieces.pop(root, None)
        alias = self.alias.pop(root, None)
        if self._has_producer(root) and cause:
            self.why.setdefault(cause, []).append(place)
        self.fixes += 1
        self.parent[root] = FIXED
        for p in pieces or ():
            self.fix_var(p, cause, place)
        if alias is not None:
            self.fix_label(alias, cause, place)

    def fix_label(self, label, cause: str, place: str) -> None:
        for f in label:
            if f[0] == "g":
                self.fix_var(f[1], cause, place)
            elif f[0] == "prod":
                self.fix_label(f[1], cause, place)
            elif f[0] == "cat":
                for p in f[1]:
                    self.fix_label(p, cause, place)

    def note(self, var: str, count: int, stride: int) -> None:
        if count > 1 and (count, stride) != (self.size[var], 1):
            self.structure.setdefault(var, set()).add((count, stride))

    # ------------------------------------------------------------------ ties
    def tie(self, a, b, cause: str, place: str) -> None:
        """Make two labels of aligned axes (equal length) equal under every permutation."""
        a, b = _normal(a), _normal(b)
        if a == b:
            return
        pa, pb = self._passive(a), self._passive(b)
        if pa is not None and pb is None:
            return self._alias(pa, b, cause, place)
        if pb is not None and pa is None:
            return self._alias(pb, a, cause, place)
        if len(a) != len(b) or any(_fsize(x) != _fsize(y) or x[0] != y[0] for x, y in zip(a, b)):
            self.fix_label(a, cause, place)
            self.fix_label(b, cause, place)
            return
        for x, y in zip(a, b):
            if x[0] == "free":
                continue
            if x[0] == "cat":
                if [_lsize(p) for p in x[1]] == [_lsize(q) for q in y[1]]:
                    for p, q in zip(x[1], y[1]):
                        self.tie(p, q, cause, place)
                else:
                    self.fix_label((x, y), cause, place)
                continue
            self._tie_factor(x, y, cause, place)

    def _tie_factor(self, x, y, cause, place) -> None:
        _, g, cg, sg = x
        _, h, ch, sh = y
        ng, nh = self.size[g], self.size[h]
        outer_g, outer_h = cg * sg == ng and sg > 1, ch * sh == nh and sh > 1
        if outer_g and outer_h:
            self.head_ties.append((g, h))  # the same head order, units within heads free
            return
        if (cg, sg) == (ch, sh) and ng == nh:
            self.union(g, h, cause, place)
            return
        self.fix_var(g, cause, place)
        self.fix_var(h, cause, place)

    def _passive(self, label) -> str | None:
        """The variable of a one-factor label of a whole class no layer produces (a parameter's axis)."""
        if len(label) != 1 or label[0][0] != "g":
            return None
        _, v, c, s = label[0]
        root = self.find(v)
        if root == FIXED or (c, s) != (self.size[v], 1) or self._has_producer(root) or root in self.pieces:
            return None
        return root

    def _alias(self, root: str, label, cause, place) -> None:
        if any(f[0] != "free" for f in label) or len(label) != 1:
            if root in self.alias:
                self.tie(self.alias[root], label, cause, place)
            else:
                self.alias[root] = label
            return
        self.fix_var(root, cause, place)  # a parameter axis meeting a free axis


def _normal(label) -> tuple:
    """Drop size-1 factors, merge neighbouring free factors and split-then-joined group factors."""
    out: list = []
    for f in _expand_atoms(label):
        if _fsize(f) == 1:
            continue
        if f[0] == "cat" and len(f[1]) == 1:
            out.extend(_normal(f[1][0]))
            continue
        if out and f[0] == "free" and out[-1][0] == "free":
            out[-1] = _free(out[-1][1] * f[1])
        elif out and f[0] == "g" and out[-1][0] == "g" and out[-1][1] == f[1] and out[-1][3] == f[2] * f[3]:
            out[-1] = ("g", f[1], out[-1][2] * f[2], f[3])
        else:
            out.append(f)
    return tuple(out)


# ----------------------------------------------------------------------------- the tracer


@dataclass
class TraceResult:
    """A traced spec and what the tracer could not follow.

    Attributes:
        spec: the permutation spec.
        warnings: one line per cause of held-fixed units, with how many places and examples.
        risks: what a permuted model may break where its verification cannot look (parameters the
            traced forward never reads, which keep their order while the units they read move).
        units: hidden units of the model (outputs of its weight layers but the last).
        permutable: how many of those a permutation may move.
    """

    spec: PermutationSpec
    warnings: list[str] = field(default_factory=list)
    risks: list[str] = field(default_factory=list)
    units: int = 0
    permutable: int = 0

    @property
    def fraction(self) -> float:
        return self.permutable / self.units if self.units else 0.0


def example_inputs(model: nn.Module, input_shape: Sequence[int] | None = None) -> tuple:
    """One example batch (``(x,)``) for tracing ``model``: integer token ids for embedding models.

    Raises:
        ModelMergeError: no input shape works (see :func:`modelmerge.network.find_input_shape`).
    """
    from modelmerge.network import find_input_shape, input_vocab

    shape, _ = find_input_shape(model, tuple(input_shape) if input_shape else None)
    vocab = input_vocab(model, shape)
    if vocab is not None:
        return (torch.arange(2 * math.prod(shape)).reshape(2, *shape) % vocab,)
    return (torch.zeros(2, *shape),)


def _export(model: nn.Module, args: tuple):
    kwargs = {}
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        kwargs["use_cache"] = False  # Hugging Face: no key/value cache objects in the graph
    from modelmerge.network import eval_mode

    quiet = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # export logs whole tracebacks when it fails; the one-line error says it
    if "strict" not in inspect.signature(torch.export.export).parameters:
        raise SpecError(f"tracing --model needs torch >= 2.3 (this is {torch.__version__}); upgrade torch, or write a "
                        "spec file (docs/spec-format.md) and pass --spec FILE.json together with --model")
    try:
        # export prints the partial graph when it fails: the one-line error below says what matters
        with _warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), eval_mode(model):
            _warnings.simplefilter("ignore")
            return torch.export.export(model, args, kwargs=kwargs, strict=False)
    except Exception as e:  # noqa: BLE001 - export raises many types for untraceable code
        raise SpecError(
            f"cannot trace {type(model).__name__} with torch.export ({type(e).__name__}: {one_line(e, 160)}); "
            "write a spec file (docs/spec-format.md) and pass --spec FILE.json together with --model (the spec is "
            "then verified against the real forward)"
        ) from None
    finally:
        logging.disable(quiet)


def trace_spec(model: nn.Module, example: tuple | None = None, input_shape: Sequence[int] | None = None
               ) -> TraceResult:
    """Derive the permutation spec of ``model`` from one run of its real forward.

    Args:
        model: the module (its weights do not matter; it is not changed).
        example: positional inputs for one forward (default: :func:`example_inputs`).
        input_shape: one example's shape, to build ``example`` when it is not given.

    Returns:
        A :class:`TraceResult`.

    Raises:
        SpecError: the model cannot be exported (data-dependent control flow, ...);
            the message points to ``--spec``.
        ModelMergeError: no example input can be found for it.
    """
    if example is None:
        example = example_inputs(model, input_shape)
    ep = _export(model, tuple(example))
    return _Tracer(model, ep).run()


class _Tracer:
    def __init__(self, model: nn.Module, ep) -> None:
        self.model = model
        self.ep = ep
        self.s = _State()
        self.value: dict[str, object] = {}  # node name -> label, or list of labels (tuple outputs)
        self.param_axes: dict[str, list[str]] = {}  # state-dict key -> one variable per axis
        self.layer_outputs: list[tuple[str, int]] = []  # (key, axis) of every weight layer's output units
        self.weight_vars: dict[str, str] = {}  # axis variable of a 2-D parameter -> its key
        self.unread: list[str] = []  # parameters the traced (eval-mode) forward never reads
        sig = ep.graph_signature
        self.inputs = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.state = model.state_dict(keep_vars=True)
        first: dict[int, str] = {}
        self.canonical = {k: first.setdefault(id(t), k) for k, t in self.state.items()}  # tied names: the first

    # ------------------------------------------------------------------ helpers
    def place(self, node) -> str:
        stack = node.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        return f"{path}:{node.name}" if path else node.name  # the op itself: one module may hold several

    def label(self, arg):
        if isinstance(arg, torch.fx.Node):
            v = self.value.get(arg.name)
            if isinstance(v, tuple):
                return v
        return None

    def shape(self, node) -> tuple[int, ...] | None:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            try:
                return tuple(int(s) for s in val.shape)
            except TypeError:
                return None
        return None

    def free(self, node):
        shape = self.shape(node)
        return None if shape is None else tuple(_free(s) for s in shape)

    def fix_args(self, node, cause: str) -> None:
        for a in _flat(node.args) + _flat(list(node.kwargs.values())):
            lab = self.label(a)
            if lab is not None:
                for f in lab:
                    self.s.fix_label((f,), cause, self.place(node))

    def param(self, arg) -> str | None:
        """The state-dict key of a parameter/buffer placeholder."""
        return self.inputs.get(arg.name) if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" else None

    # ------------------------------------------------------------------ run
    def run(self) -> TraceResult:
        twins: dict[int, str] = {}
        read: set[int] = set()  # tensors some placeholder of theirs feeds (a tied tensor is read under one name)
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                key = self.inputs.get(node.name)
                if key in self.state and node.users:
                    read.add(id(self.state[key]))
                if key in self.state and not node.users and node.meta["val"].is_floating_point():  # saved ones
                    self.unread.append(key)
                shape = self.shape(node)
                if key is not None and key in self.state and shape is not None and node.meta["val"].is_floating_point():
                    vars_ = [self.s.new(f"{key}#{i}", n) for i, n in enumerate(shape)]
                    self.param_axes[key] = vars_
                    if len(shape) == 2:
                        self.weight_vars.update({v: key for v in vars_})
                    twin = twins.setdefault(id(self.state[key]), key) if key in self.state else key
                    if twin != key:  # one tensor under two names (tied embeddings): one set of groups
                        for u, v in zip(self.param_axes[twin], vars_):
                            self.s.union(u, v)
                    self.value[node.name] = tuple(("g", v, n, 1) for v, n in zip(vars_, shape))
                else:
                    self.value[node.name] = self.free(node)
            elif node.op == "output":
                for a in _flat(node.args):
                    lab = self.label(a)
                    if lab is not None:
                        for f in lab:
                            self.s.fix_label((f,), "", "output")
            elif node.op == "call_function":
                self.value[node.name] = self.call(node)
        self.unread = [k for k in self.unread if id(self.state[k]) not in read]
        return self.build()

    def call(self, node):
        name = _op_name(node.target)
        out_free = self.free(node)
        if node.target is operator.getitem:
            src = self.value.get(node.args[0].name) if isinstance(node.args[0], torch.fx.Node) else None
            if isinstance(src, list) and isinstance(node.args[1], int) and node.args[1] < len(src):
                return src[node.args[1]]
            if isinstance(src, tuple):  # an output the rules did not expect to be indexed
                self.s.fix_label(tuple(f for f in src), "an op's outputs indexed in a way not followed",
                                 self.place(node))
            return out_free
        args = node.args
        labels = [self.label(a) for a in _flat(args) + _flat(list(node.kwargs.values()))]
        if all(lab is None or all(f[0] == "free" for f in _normal(lab)) for lab in labels) \
                and name not in _LAYERS and name not in ("layer_norm", "batch_norm", "group_norm") \
                and not name.startswith(("_native_batch_norm", "native_batch_norm", "native_layer_norm")):
            return self._free_output(node)  # nothing permuted flows in: nothing to follow
        try:
            rule = getattr(self, f"op_{name}", None)
            if rule is not None:
                return rule(node)
            if name in _UNARY:
                if any(isinstance(a, torch.fx.Node) for a in _flat(list(args[1:]) + list(node.kwargs.values()))):
                    return self.binary(node)  # clamp(x, min=tensor), ...: the other tensor is tied too
                return self.label(args[0])
            if name in _BINARY:
                return self.binary(node)
            if name in _REDUCE:
                return self.reduce(node)
            if name in _POOL:
                return self.pool(node)
            if name in _CREATE:
                return out_free
        except _Unsupported as e:
            self.fix_args(node, str(e) or f"{name} is not understood")
            return self._free_output(node)
        except Exception:  # noqa: BLE001 - a form of the op no rule expects: hold it fixed (sound), say so
            self.fix_args(node, f"{name} in a form the tracer does not follow")
            return self._free_output(node)
        self.fix_args(node, f"{name} is not understood")
        return self._free_output(node)

    def _free_output(self, node):
        val = node.meta.get("val")
        if isinstance(val, (tuple, list)):
            return [tuple(_free(s) for s in v.shape) if isinstance(v, torch.Tensor) else None for v in val]
        return self.free(node)

    # ------------------------------------------------------------------ element-wise
    def binary(self, node):
        out = self.shape(node)
        if out is None:
            raise _Unsupported()
        operands = [a for a in node.args if isinstance(a, torch.fx.Node) and self.label(a) is not None]
        result = [_free(s) for s in out]
        for i in range(1, len(out) + 1):
            axis_labels = []
            for a in operands:
                lab, shape = self.label(a), self.shape(a)
                if len(shape) >= i and shape[-i] == out[-i] and out[-i] != 1:
                    axis_labels.append(lab[-i])
            for other in axis_labels[1:]:
                self.s.tie((axis_labels[0],), (other,), "an element-wise operation mixes permuted and fixed units",
                           self.place(node))
            if axis_labels:
                result[-i] = axis_labels[0]
        return tuple(result)

    def reduce(self, node):
        lab, shape = self.label(node.args[0]), self.shape(node.args[0])
        first = 2 if _op_name(node.target) in ("linalg_vector_norm", "norm") else 1  # (x, ord, dim, keepdim)
        dims = node.args[first] if len(node.args) > first else node.kwargs.get("dim")
        keep = node.args[first + 1] if len(node.args) > first + 1 else node.kwargs.get("keepdim", False)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = range(len(shape))  # a full reduction
        dims = {d % len(shape) for d in ([dims] if isinstance(dims, int) else dims)}
        if not isinstance(keep, bool):
            raise _Unsupported()
        reduced = {f[1] for i in dims for f in _normal((lab[i],)) if f[0] == "g"}
        kept = {f[1] for i, x in enumerate(lab) if i not in dims for f in _normal((x,)) if f[0] == "g"}
        if reduced & kept:  # e.g. a sum over heads: the units within a head no longer line up
            raise _Unsupported("a reduction over part of a group's units")
        out = tuple(f for f in ((_free(1) if keep else None) if i in dims else f for i, f in enumerate(lab))
                    if f is not None)
        if isinstance(node.meta.get("val"), (tuple, list)):  # max/min over a dim: (values, indices)
            if reduced:
                raise _Unsupported("indices of a maximum over permuted units")
            return [out, out]
        return out

    def pool(self, node):
        lab = self.label(node.args[0])
        out = self.free(node)
        spatial = len(out) - 2 if not isinstance(node.meta.get("val"), (tuple, list)) else None
        if spatial is None:  # max_pool ..._with_indices: (values, indices)
            vals = node.meta["val"]
            first = tuple(_free(s) for s in vals[0].shape)
            lab2 = self._keep_leading(lab, first, node)
            return [lab2, lab2]  # the indices have the values' (batch, channel) axes
        return self._keep_leading(lab, out, node)

    def _keep_leading(self, lab, out, node):
        """Pooling: the leading (batch, channel) axes keep their labels; the pooled ones must be free."""
        n_spatial = len(lab) - 2 if len(lab) > 2 else len(lab) - 1
        for f in lab[len(lab) - n_spatial:]:
            if f[0] != "free":
                raise _Unsupported("pooling over permuted units")
        if len(out) != len(lab) or any(_fsize(f) != _fsize(o) for f, o in zip(lab[:len(lab) - n_spatial], out)):
            raise _Unsupported("a spatial op that changes the channel axis")
        return tuple(lab[:len(lab) - n_spatial]) + tuple(out[len(lab) - n_spatial:])

    # ------------------------------------------------------------------ layers
    def _weight(self, node, arg, what: str) -> tuple:
        lab = self.label(arg)
        if lab is None:
            raise _Unsupported(f"{what} with a weight that is not a tensor")
        return lab

    def _producer(self, lab, axis: int, key: str | None) -> tuple:
        """Mark the weight's output axis as a layer output (a group a layer produces)."""
        f = lab[axis]
        if f[0] == "g" and self.s.find(f[1]) != FIXED:
            self.s.mark(f[1])
        if key is not None:
            self.layer_outputs.append((key, axis))
        return f

    def op_linear(self, node):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        lx, lw = self.label(x), self._weight(node, w, "linear")
        if len(lw) != 2:
            raise _Unsupported("linear with a weight that is not 2-D")
        self.s.tie((lx[-1],), (lw[1],), "a layer reads fixed units", self.place(node))
        out = self._producer(lw, 0, self.param(w))
        if isinstance(b, torch.fx.Node) and self.label(b) is not None:
            self.s.tie((self.label(b)[-1],), (out,), "", self.place(node))
        return tuple(lx[:-1]) + (out,)

    def op_addmm(self, node):  # GPT-2's Conv1D: bias + x @ W, W [in, out]
        b, x, w = node.args[:3]
        lx, lw = self.label(x), self.label(w)
        if self.param(w) is None or len(lw) != 2:
            return self._matmul(node, x, w, extra=b)
        self.s.tie((lx[-1],), (lw[0],), "a layer reads fixed units", self.place(node))
        out = self._producer(lw, 1, self.param(w))
        if self.label(b) is not None:
            self.s.tie((self.label(b)[-1],), (out,), "", self.place(node))
        return tuple(lx[:-1]) + (out,)

    def op_mm(self, node):
        return self._matmul(node, node.args[0], node.args[1])

    op_matmul = op_bmm = op_mm

    def _matmul(self, node, x, y, extra=None):
        lx, ly = self.label(x), self.label(y)
        sx, sy = self.shape(x), self.shape(y)
        if lx is None or ly is None or len(sx) < 2 or len(sy) < 2:
            raise _Unsupported("a matrix product of vectors")
        place = self.place(node)
        for lab, axis in ((lx, len(lx) - 1), (ly, len(ly) - 2)):
            if self._head_contracted(lab, axis):
                raise _Unsupported("a product summing over heads")
        if self.param(y) is not None and len(sy) == 2:
            self._producer(ly, 1, self.param(y))  # x @ W with a weight: W's columns are a layer's outputs
        elif len(sy) == 2 and ly[-1][0] == "g" and ly[-1][1] in self.weight_vars:
            # x @ W.t() (older export IRs write linear layers as addmm/mm of a transposed weight)
            key = self.weight_vars[ly[-1][1]]
            self._producer(ly, 1, None)
            self.layer_outputs.append((key, self.param_axes[key].index(ly[-1][1])))
        self.s.tie((lx[-1],), (ly[-2],), "a matrix product reads fixed units", place)
        batch_x, batch_y = lx[:-2], ly[:-2]
        out_shape = self.shape(node)
        nb = len(out_shape) - 2
        batch: list = [_free(s) for s in out_shape[:nb]]
        for i in range(1, nb + 1):
            fx_ = batch_x[-i] if len(batch_x) >= i and sx[-2 - i] == out_shape[-2 - i] else None
            fy_ = batch_y[-i] if len(batch_y) >= i and sy[-2 - i] == out_shape[-2 - i] else None
            if fx_ is not None and fy_ is not None:
                self.s.tie((fx_,), (fy_,), "a batched product mixes permuted and fixed units", place)
            pick = fy_ if fy_ is not None and fy_[0] != "free" else fx_
            if pick is not None:
                batch[-i] = pick
        out = tuple(batch) + (lx[-2], ly[-1])
        if extra is not None and self.label(extra) is not None:
            self.s.tie((self.label(extra)[-1],), (out[-1],), "", place)
        return out

    def _head_contracted(self, lab, axis: int) -> bool:
        """Whether summing over ``lab[axis]`` sums over a group's heads while its units within a head stay
        (each head may order them differently)."""
        heads = {f[1] for f in _normal((lab[axis],)) if f[0] == "g" and f[2] * f[3] == self.s.size[f[1]] and f[3] > 1}
        others = {f[1] for i, x in enumerate(lab) if i != axis for f in _normal((x,)) if f[0] == "g"}
        return bool(heads & others)

    def op_scaled_dot_product_attention(self, node):
        q, k, v = node.args[:3]
        lq, lk, lv = self.label(q), self.label(k), self.label(v)
        place = self.place(node)
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        scores = tuple(lq[:-2]) + (lq[-2], lk[-2])
        if isinstance(mask, torch.fx.Node) and self.label(mask) is not None:
            lm = self.label(mask)
            for i in range(1, min(len(lm), len(scores)) + 1):  # broadcast from the right, as the op does
                if _fsize(lm[-i]) == _fsize(scores[-i]) and _fsize(lm[-i]) != 1:
                    self.s.tie((lm[-i],), (scores[-i],), "an attention mask mixes permuted and fixed units", place)
        self.s.tie((lq[-1],), (lk[-1],), "attention reads fixed units", place)
        self.s.tie((lk[-2],), (lv[-2],), "attention's keys and values are not aligned", place)
        for a, b in ((lq, lk), (lq, lv)):
            for fa, fb in zip(a[:-2], b[:-2]):
                self.s.tie((fa,), (fb,), "attention mixes permuted and fixed heads", place)
        return tuple(lv[:-2]) + (lq[-2], lv[-1])

    def op_conv(self, node, x, w, b, groups: int):
        lx, lw = self.label(x), self._weight(node, w, "convolution")
        place = self.place(node)
        if any(f[0] != "free" for a in lx[2:] for f in _normal((a,))):
            raise _Unsupported("a convolution sliding over permuted units")
        c_in, c_out = self.shape(x)[1], self.shape(w)[0]
        key = self.param(w)
        if groups == 1:
            self.s.tie((lx[1],), (lw[1],), "a layer reads fixed units", place)
            out = self._producer(lw, 0, key)
        elif groups == c_in and c_out == c_in:  # depthwise: the channels pass through
            self.s.tie((lx[1],), (lw[0],), "a depthwise convolution reads fixed units", place)
            out = lx[1]
            if key is not None:
                self.layer_outputs.append((key, 0))
        else:  # grouped: whole groups move as blocks (rigid on the input side)
            fi, fo = lx[1], self._producer(lw, 0, key)
            if fi[0] != "g" or fo[0] != "g" or (fi[2], fi[3]) != (self.s.size[fi[1]], 1):
                raise _Unsupported("a grouped convolution reads fixed or reshaped units")
            self.s.note(fi[1], groups, c_in // groups)
            self.s.note(fi[1], c_in // groups, 1)
            self.s.rigid[fi[1]] = groups
            self.s.note(fo[1], groups, c_out // groups)
            self.s.note(fo[1], c_out // groups, 1)
            self.s.head_ties.append((fi[1], fo[1]))
            self.s.fix_label((lw[1],), "", place)  # the input axis inside one group is not permuted
            out = fo
        if isinstance(b, torch.fx.Node) and self.label(b) is not None:
            self.s.tie((self.label(b)[0],), (out,), "", place)
        shape = self.shape(node)
        return (lx[0], out) + tuple(_free(s) for s in shape[2:])

    def op_conv2d(self, node):
        a = list(node.args) + [None] * 7
        groups = a[6] if a[6] is not None else node.kwargs.get("groups", 1)
        return self.op_conv(node, a[0], a[1], a[2], groups)

    op_conv1d = op_conv3d = op_conv2d

    def op_convolution(self, node):
        a = node.args
        if a[6]:
            raise _Unsupported("a transposed convolution")
        return self.op_conv(node, a[0], a[1], a[2], a[8])

    def op_embedding(self, node):
        w, idx = node.args[0], node.args[1]
        lw = self._weight(node, w, "embedding")
        self.s.fix_label((lw[0],), "", self.place(node))  # token ids index the rows
        out = self._producer(lw, 1, self.param(w))
        return tuple(_free(s) for s in self.shape(idx)) + (out,)

    # ------------------------------------------------------------------ normalisation
    def _affine(self, node, x_axis_label, params) -> None:
        for p in params:
            if isinstance(p, torch.fx.Node) and self.label(p) is not None:
                self.s.tie((self.label(p)[0],), (x_axis_label,), "a normalisation's parameters", self.place(node))

    def op_batch_norm(self, node):
        lx = self.label(node.args[0])
        self._affine(node, lx[1], node.args[1:5])
        return lx

    op_instance_norm = op_batch_norm  # (x, weight, bias, running_mean, running_var, ...): per channel too

    def op__native_batch_norm_legit_no_training(self, node):
        lx = self.op_batch_norm(node)
        vals = node.meta["val"]
        return [lx] + [tuple(_free(s) for s in v.shape) for v in vals[1:]]

    op__native_batch_norm_legit_functional = op_native_batch_norm = op__native_batch_norm_legit_no_training

    def op_layer_norm(self, node):
        lx = self.label(node.args[0])
        shape = node.args[1]
        k = len(shape)
        for p in node.args[2:4]:
            if isinstance(p, torch.fx.Node) and self.label(p) is not None:
                lp = self.label(p)
                for i in range(k):
                    self.s.tie((lp[i],), (lx[len(lx) - k + i],), "a normalisation's parameters", self.place(node))
        return lx

    op_rms_norm = op_layer_norm  # (x, normalized_shape, weight, eps)

    def op_prelu(self, node):
        lx, w = self.label(node.args[0]), node.args[1]
        lw = self.label(w)
        if lw is not None and self.shape(w) and self.shape(w)[0] > 1:
            self.s.tie((lw[0],), (lx[1] if len(lx) > 1 else lx[0],), "a PReLU's slopes", self.place(node))
        return lx

    def op_native_layer_norm(self, node):
        lx = self.op_layer_norm(node)
        vals = node.meta["val"]
        return [lx] + [tuple(_free(s) for s in v.shape) for v in vals[1:]]

    def op_group_norm(self, node):
        x, groups = node.args[0], node.args[1]
        lx = self.label(x)
        c = self.shape(x)[1]
        f = lx[1]
        if groups not in (1, c):
            if f[0] != "g" or (f[2], f[3]) != (self.s.size[f[1]], 1):
                raise _Unsupported("a group norm over reshaped units")
            self.s.note(f[1], groups, c // groups)  # channels stay inside their norm group
            self.s.note(f[1], c // groups, 1)
        self._affine(node, f, node.args[2:4])
        return lx

    # ------------------------------------------------------------------ shapes
    def op_permute(self, node):
        lab = self.label(node.args[0])
        dims = [d % len(lab) for d in node.args[1]]
        return tuple(lab[d] for d in dims)

    def op_transpose(self, node):
        lab = list(self.label(node.args[0]))
        i, j = node.args[1] % len(lab), node.args[2] % len(lab)
        lab[i], lab[j] = lab[j], lab[i]
        return tuple(lab)

    def op_t(self, node):
        lab = self.label(node.args[0])
        return tuple(reversed(lab))

    def op_unsqueeze(self, node):
        lab = list(self.label(node.args[0]))
        d = node.args[1] % (len(lab) + 1)
        lab.insert(d, _free(1))
        return tuple(lab)

    def op_squeeze(self, node):
        lab, shape = self.label(node.args[0]), self.shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else None
        if dims is None:
            dims = [i for i, s in enumerate(shape) if s == 1]
        dims = {d % len(lab) for d in ([dims] if isinstance(dims, int) else dims)}
        return tuple(f for i, f in enumerate(lab) if not (i in dims and shape[i] == 1))

    def op_expand(self, node):
        lab, out = self.label(node.args[0]), self.shape(node)
        lead = len(out) - len(lab)
        res = [_free(s) for s in out[:lead]]
        for i, f in enumerate(lab):
            res.append(f if _fsize(f) == out[lead + i] else _free(out[lead + i]))
        return tuple(res)

    def op_view(self, node):
        lab, out = self.label(node.args[0]), self.shape(node)
        return self._reshape(node, lab, out)

    op_reshape = op__unsafe_view = op_unflatten = op_flatten = op_view

    def _reshape(self, node, lab, out):
        atoms = [f for f in _expand_atoms(lab)]
        res = []
        i = 0
        for size in out:
            take: list = []
            need = size
            while need > 1 or (need == 1 and i < len(atoms) and _fsize(atoms[i]) == 1):
                if i >= len(atoms):
                    raise _Unsupported("a reshape that is not understood")
                f = atoms[i]
                fs = _fsize(f)
                if fs == 1:
                    i += 1
                    continue
                if need % fs == 0:
                    take.append(f)
                    need //= fs
                    i += 1
                elif fs % need == 0:
                    first, rest = self._split(f, need)
                    take.append(first)
                    atoms[i] = rest
                    need = 1
                else:
                    raise _Unsupported("a reshape that is not understood")
            res.append(_normal(tuple(take)) or (_free(1),))
        while i < len(atoms):
            if _fsize(atoms[i]) != 1:
                raise _Unsupported("a reshape that is not understood")
            i += 1
        # one axis of the result may carry a product of factors
        return tuple(_pack(r) for r in res)

    def _split(self, f, outer: int):
        if f[0] == "free":
            return _free(outer), _free(f[1] // outer)
        if f[0] == "cat":
            raise _Unsupported("a reshape across concatenated units")
        _, g, c, s = f
        inner = c // outer
        self.s.note(g, outer, s * inner)
        self.s.note(g, inner, s)
        return ("g", g, outer, s * inner), ("g", g, inner, s)

    def op_select(self, node):
        lab = self.label(node.args[0])
        d, idx = node.args[1] % len(lab), node.args[2]
        f = lab[d]
        rest = lab[:d] + lab[d + 1:]
        if f[0] == "free":
            return rest
        if f[0] != "g":
            raise _Unsupported("selecting along permuted units")
        subs = self._cut(f)
        return tuple(self._retarget(x, f, subs[idx % len(subs)]) for x in rest)

    def op_unbind(self, node):
        lab = self.label(node.args[0])
        d = (node.args[1] if len(node.args) > 1 else 0) % len(lab)
        f = lab[d]
        rest = lab[:d] + lab[d + 1:]
        n = self.shape(node.args[0])[d]
        if f[0] == "free":
            return [rest] * n
        if f[0] != "g":
            raise _Unsupported("unbinding along permuted units")
        subs = self._cut(f)
        return [tuple(self._retarget(x, f, s) for x in rest) for s in subs]

    def _cut(self, f) -> list[str]:
        """Cut a group along its outermost factor ``f`` (count c, stride s, c*s = n) into c segments."""
        _, g, c, s = f
        root = self.s.find(g)
        if root == FIXED:
            raise _Unsupported()
        if c * s != self.s.size[g]:
            raise _Unsupported("selecting inside a head")
        if root in self.s.pieces:
            subs = self.s.pieces[root]
            if len(subs) != c or any(self.s.size[p] != s for p in subs):
                raise _Unsupported("a packed projection cut two ways")
            return subs
        producer = self.s._has_producer(root)
        subs = [self.s.new(f"{root}[{i}]", s, producer=producer) for i in range(c)]
        self.s.pieces[root] = subs
        return subs

    def _cut_sizes(self, g: str, sizes: list[int]) -> list[str]:
        """Cut a whole group into consecutive segments of ``sizes`` (a channel split or slice), each its own
        group; a group already cut must have been cut the same way."""
        root = self.s.find(g)
        if root == FIXED or sum(sizes) != self.s.size[g]:
            raise _Unsupported()
        if root in self.s.pieces:
            subs = self.s.pieces[root]
            if [self.s.size[p] for p in subs] != sizes:
                raise _Unsupported("units split in two different ways")
            return subs
        producer = self.s._has_producer(root)
        subs = [self.s.new(f"{root}[{i}]", n, producer=producer) for i, n in enumerate(sizes)]
        self.s.pieces[root] = subs
        return subs

    def _retarget(self, x, f, sub: str):
        """A factor of the same group inside one segment now orders that segment's group."""
        if x[0] == "prod":
            return _pack(tuple(self._retarget(y, f, sub) for y in x[1]))
        if x[0] == "g" and x[1] == f[1]:
            _, _, c, s = x
            if c * s > f[3]:
                raise _Unsupported()
            self.s.note(sub, c, s)
            return ("g", sub, c, s)
        return x

    def op_split(self, node):
        lab = self.label(node.args[0])
        size = node.args[1]
        d = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(lab)
        total = self.shape(node.args[0])[d]
        sizes = [size] * (total // size) + ([total % size] if total % size else []) if isinstance(size, int) \
            else list(size)
        return self._split_axis(node, lab, d, sizes)

    def op_split_with_sizes(self, node):
        lab = self.label(node.args[0])
        d = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(lab)
        return self._split_axis(node, lab, d, list(node.args[1]))

    def op_chunk(self, node):
        lab = self.label(node.args[0])
        d = (node.args[2] if len(node.args) > 2 else 0) % len(lab)
        total = self.shape(node.args[0])[d]
        step = -(-total // node.args[1])
        return self._split_axis(node, lab, d, [min(step, total - i) for i in range(0, total, step)])

    def _split_axis(self, node, lab, d, sizes):
        f = _normal((lab[d],))
        out = []
        if all(x[0] == "free" for x in f):
            for s in sizes:
                out.append(lab[:d] + (_free(s),) + lab[d + 1:])
            return out
        if len(f) != 1:
            raise _Unsupported("splitting permuted units")
        f = f[0]
        if f[0] == "cat" and [_lsize(p) for p in f[1]] == sizes:
            return [lab[:d] + (_pack(p),) + lab[d + 1:] for p in f[1]]
        if f[0] != "g" or (f[2], f[3]) != (self.s.size[f[1]], 1):
            raise _Unsupported("splitting permuted units")
        subs = self._cut(("g", f[1], len(sizes), sizes[0])) if len(set(sizes)) == 1 else self._cut_sizes(f[1], sizes)
        return [lab[:d] + (("g", sub, n, 1),) + lab[d + 1:] for sub, n in zip(subs, sizes)]

    def op_slice(self, node):
        lab = self.label(node.args[0])
        d = (node.args[1] if len(node.args) > 1 else 0) % len(lab)
        factors = _normal((lab[d],))
        if any(f[0] != "free" for f in factors):
            if self.shape(node) == self.shape(node.args[0]):
                return lab
            n = self.shape(node.args[0])[d]
            start, end = (list(node.args[2:4]) + [None, None])[:2]
            step = node.args[4] if len(node.args) > 4 else 1
            start = 0 if start is None else max(0, min(n, start + n if start < 0 else start))
            end = n if end is None else max(start, min(n, end + n if end < 0 else end))
            if len(factors) != 1 or step != 1:
                raise _Unsupported("slicing permuted units")
            return lab[:d] + (self._slice_units(factors[0], start, end),) + lab[d + 1:]
        return lab[:d] + (_free(self.shape(node)[d]),) + lab[d + 1:]

    def _slice_units(self, f, start: int, end: int):
        """The label of units ``[start:end)`` of an axis labelled ``f``: a whole group, or a concatenation of
        them; a group the bounds fall inside is cut there into segment groups."""
        if f[0] == "cat":
            out, offset = [], 0
            for piece in f[1]:
                n = _lsize(piece)
                lo, hi = max(start, offset), min(end, offset + n)
                if lo < hi:
                    inner = _normal(piece)
                    if (lo, hi) == (offset, offset + n):
                        out.append(piece)
                    elif len(inner) == 1:
                        out.append((self._slice_units(inner[0], lo - offset, hi - offset),))
                    else:
                        raise _Unsupported("slicing permuted units")
                offset += n
            return _pack((("cat", tuple(out)),)) if len(out) > 1 else _pack(out[0])
        if f[0] != "g" or (f[2], f[3]) != (self.s.size[f[1]], 1):
            raise _Unsupported("slicing permuted units")
        n = f[2]
        if (start, end) == (0, n):
            return f
        subs = self._cut_sizes(f[1], [x for x in (start, end - start, n - end) if x])
        return ("g", subs[1 if start else 0], end - start, 1)  # the middle segment (the first from 0)

    def op_cat(self, node):
        tensors = [t for t in node.args[0]]
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        labs = [self.label(t) for t in tensors]
        nd = len(self.shape(node))
        d %= nd
        pieces = []
        for t, lab in zip(tensors, labs):
            if lab is None:
                lab = self.free(t)
            pieces.append(lab)
        place = self.place(node)
        out = []
        for i in range(nd):
            if i == d:
                out.append(("cat", tuple(_normal((p[i],)) or (_free(1),) for p in pieces)))
                continue
            for p in pieces[1:]:
                self.s.tie((pieces[0][i],), (p[i],), "a concatenation mixes permuted and fixed units", place)
            out.append(pieces[0][i])
        cat = out[d]
        if all(all(f[0] == "free" for f in p) for p in cat[1]):
            out[d] = _free(sum(_lsize(p) for p in cat[1]))
        return tuple(out)

    def op_glu(self, node):
        """``glu(x, dim)``: ``a * sigmoid(b)`` for the two halves of a group: the halves are cut and tied."""
        lab = self.label(node.args[0])
        d = (node.args[1] if len(node.args) > 1 else -1) % len(lab)
        f = _normal((lab[d],))
        if len(f) != 1 or f[0][0] != "g" or (f[0][2], f[0][3]) != (self.s.size[f[0][1]], 1) or f[0][2] % 2:
            raise _Unsupported("glu over units it cannot halve")
        first, second = self._cut(("g", f[0][1], 2, f[0][2] // 2))
        self.s.union(first, second, "glu halves", self.place(node))
        return lab[:d] + (("g", first, f[0][2] // 2, 1),) + lab[d + 1:]

    def op_stack(self, node):
        raise _Unsupported("stacking permuted units")

    def op_constant_pad_nd(self, node):
        lab = self.label(node.args[0])
        k = len(node.args[1]) // 2
        if any(f[0] != "free" for f in lab[len(lab) - k:]):
            raise _Unsupported("padding permuted units")
        return lab[:len(lab) - k] + tuple(_free(s) for s in self.shape(node)[len(lab) - k:])

    op_pad = op_constant_pad_nd

    # ------------------------------------------------------------------ the spec
    def _heads(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Head counts per class and the head sets (tied classes); classes that fail the checks are fixed."""
        s = self.s
        # head structure per class: every split seen must be the same (heads, units in a head)
        factors: dict[str, set[tuple[int, int]]] = {}
        for var, facs in s.structure.items():
            root = s.find(var)
            if root != FIXED:
                factors.setdefault(root, set()).update(facs)
        chunks: dict[str, int] = {}
        for root, facs in factors.items():
            if s.find(root) != root:
                continue  # fixed meanwhile
            n = s.size[root]
            if root in s.pieces:  # cut into segments: only the cut itself, or splits inside one segment
                sizes = [s.size[p] for p in s.pieces[root]]
                even = len(set(sizes)) == 1
                if not all((even and c * st == n and c == len(sizes)) or all(z % (c * st) == 0 for z in sizes)
                           for c, st in facs):
                    s.fix_var(root, "units reshaped across the segments of a packed projection", root)
                continue
            outer = {c for c, st in facs if c * st == n}
            h = next(iter(outer)) if len(outer) == 1 else None
            if h is not None and all((c, st) in ((h, n // h), (n // h, 1)) for c, st in facs):
                chunks[root] = h
            else:
                s.fix_var(root, "units reshaped in a way not understood", root)
        # head sets: classes whose head order is tied move their heads together; every member must be a
        # group of its own with the same head count, else the whole set is held fixed
        ties = _Union()
        for root in chunks:
            ties.find(root)
        pinned = set()  # classes whose heads are tied to fixed units: their head order must stay
        for a, b in s.head_ties:
            ra, rb = s.find(a), s.find(b)
            if ra == FIXED or rb == FIXED:
                if ra != rb:
                    r = ra if rb == FIXED else rb
                    if r in chunks or r in s.pieces:
                        pinned.add(r)
                        ties.find(r)
                    else:
                        s.fix_var(r, "attention heads tied to fixed units", "attention")
                continue
            ties.union(ra, rb)
        sets: dict[str, list[str]] = {}
        for members in ties.sets():
            live = [r for r in members if s.find(r) == r and r != FIXED]
            if pinned & set(live):
                members = members + [FIXED]  # counts as a fixed member below
            counts = {chunks[r] for r in live if r in chunks}
            for r in live:  # a plain group tied to heads of its size: chunks of one unit (a depthwise conv's input)
                if r not in chunks and r not in factors and len(counts) == 1 and s.size[r] == next(iter(counts)):
                    chunks[r] = s.size[r]
            ok = all(r in chunks and r not in s.pieces and r not in s.alias and s._has_producer(r) for r in live) \
                and len({chunks[r] for r in live}) <= 1 and len(live) == len(members)
            if not ok:
                # the heads cannot move (a member is fixed, selected per head, ...): every member keeps its head
                # order; a member whose units may still move within each head is cut into one group per head
                for r in live:
                    if r in s.pieces:
                        continue  # already cut: its heads stay in place
                    rigid = any(s.find(v) == r for v in s.rigid)
                    if r in chunks and not rigid and r not in s.alias and s._has_producer(r):
                        n, h = s.size[r], chunks[r]
                        s.pieces[r] = [s.new(f"{r}[{i}]", n // h, producer=True) for i in range(h)]
                        s.fixes += 1  # the classes changed: check them again
                    else:
                        s.fix_var(r, "attention heads that cannot move together", r)
                continue
            if live:
                sets[live[0]] = live
        return chunks, sets

    def _resolve_all(self) -> tuple[dict[str, tuple], dict[str, int]]:
        """Every parameter's axes as spec entries, and the groups they name (may hold more classes fixed)."""
        s = self.s
        groups: dict[str, int] = {}
        axes: dict[str, tuple] = {}
        visiting: set[str] = set()

        def resolve(var: str, length: int):
            root = s.find(var)
            if root == FIXED:
                return None
            if root in s.pieces:
                segs = [(resolve(p, s.size[p]), s.size[p]) for p in s.pieces[root]]
                k = length // s.size[root]
                return _segments([(g, n * k) for g, n in segs])
            if root in s.alias:
                if root in visiting:
                    # units defined through themselves (weights reused transposed, twice over, as in a
                    # tied autoencoder): no order to read them in, so they stay in place
                    s.fix_var(root, "units that reused weights define through themselves", root)
                    return None
                visiting.add(root)
                try:
                    return self._resolve_label(s.alias[root], length, resolve)
                finally:
                    visiting.discard(root)
            if not s._has_producer(root):
                return None
            groups[root] = s.size[root]
            return root

        for key, t in self.state.items():
            vars_ = self.param_axes.get(key) or self._alias_of(key)
            if vars_ is None:
                axes[key] = (None,) * t.ndim
                continue
            axes[key] = tuple(resolve(v, n) for v, n in zip(vars_, t.shape))
        return axes, groups

    def build(self) -> TraceResult:
        s = self.s
        # a class found not understood while resolving one parameter must not stay permuted in another
        # already resolved, nor in a head set: repeat the checks until they hold nothing more fixed
        while True:  # each repeat holds at least one more class fixed: it ends
            before = s.fixes
            chunks, sets = self._heads()
            axes, groups = self._resolve_all()
            if s.fixes == before:
                break
        heads = {}
        used = {g for ax in axes.values() for a in ax for g in _groups_in(a)}
        groups = {g: n for g, n in groups.items() if g in used}
        for members in sets.values():
            members = sorted(m for m in members if m in groups)
            if not members:
                continue
            count = chunks[members[0]]
            if any(chunks[m] != count for m in members):
                continue
            rigid = tuple(m for m in members if any(s.find(v) == m and c == count for v, c in s.rigid.items()))
            heads[f"heads:{members[0]}"] = HeadSet(count=count, groups=tuple(members), rigid=rigid)
        names = self._names(groups)
        groups = {names[g]: n for g, n in groups.items()}
        axes = {k: tuple(_rename(a, names) for a in ax) for k, ax in axes.items()}
        heads = {f"heads:{names[hs.groups[0]]}": HeadSet(hs.count, tuple(names[g] for g in hs.groups),
                                                         tuple(names[g] for g in hs.rigid)) for hs in heads.values()}
        spec = PermutationSpec(groups=groups, axes=axes, heads=heads)
        units, permutable = self._coverage(spec)
        warnings, risks = _summary(s.why), []
        if self.unread:
            # nothing ties them to the units they read (an auxiliary head, a training-only branch),
            # so they stay as they are while those units may move: say so rather than pass silently
            risks.append(
                f"{len(self.unread)} parameter(s) the traced eval-mode forward never reads ({preview(self.unread, 3)}) "
                "keep their order: any other path through them (an auxiliary head, training mode) is not "
                "preserved; write a --spec to permute them too"
            )
        return TraceResult(spec, warnings, risks, units, permutable)

    def _names(self, roots) -> dict[str, str]:
        """Readable group names: the first layer producing each group (``blocks.0.fc1.out``, ``attn.qkv.out[2]``)."""
        first: dict[str, str] = {}
        for var in self.s.order:
            first.setdefault(self.s.find(var), var)
        names, used = {}, set()
        for root in roots:
            var = first.get(root, root)
            m = re.match(r"(.*)#\d+((?:\[\d+\])*)", var)
            if m:
                key, pieces = self.canonical.get(m.group(1), m.group(1)), m.group(2)
                base = key[:-7] if key.endswith((".weight", "_weight")) else key
                name = f"{base}.out{pieces}"
            else:
                name = var
            unique, i = name, 1
            while unique in used:
                i += 1
                unique = f"{name}~{i}"
            used.add(unique)
            names[root] = unique
        return names

    def _resolve_label(self, label, length, resolve):
        label = _normal(label)
        if len(label) == 1 and label[0][0] == "cat":
            segs = []
            for p in label[0][1]:
                r = self._resolve_label(p, _lsize(p), resolve)
                segs.extend(r if isinstance(r, tuple) else [(r, _lsize(p))])
            return _segments(segs)
        # a group factor followed by free factors: blocks (a flattened [C, H, W] map)
        if label and label[0][0] == "g" and all(f[0] == "free" for f in label[1:]):
            _, g, c, st = label[0]
            if (c, st) == (self.s.size[g], 1):
                return resolve(g, length)
        self.s.fix_label(label, "a parameter reads units in an order not understood", "parameter")
        return None

    def _alias_of(self, key: str):
        """A tied parameter (GPT-2's ``lm_head.weight`` is ``wte.weight``): the traced twin's variables."""
        t = self.state[key]
        for other, vars_ in self.param_axes.items():
            if self.state[other] is t:
                return vars_
        return None

    def _coverage(self, spec: PermutationSpec) -> tuple[int, int]:
        last = {k for k, _ in self.layer_outputs[-1:]}
        units = permutable = 0
        for key, axis in dict.fromkeys(self.layer_outputs):
            if key in last or key not in spec.axes:
                continue
            n = self.state[key].shape[axis]
            units += n
            permutable += sum(length for g, _, length in spec.segments(key, axis, n) if g is not None)
        return units, permutable


class _Unsupported(Exception):
    pass


class _Union:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def sets(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return list(out.values())


def _flat(args) -> list:
    out = []
    for a in args if isinstance(args, (tuple, list)) else [args]:
        if isinstance(a, torch.fx.Node):
            out.append(a)
        elif isinstance(a, (tuple, list)):
            out.extend(_flat(a))
        elif isinstance(a, dict):
            out.extend(_flat(list(a.values())))
    return out


def _expand_atoms(label) -> list:
    """An axis label's factors, one per atom (a packed product is opened)."""
    out = []
    for f in label:
        if f[0] == "prod":
            out.extend(f[1])
        else:
            out.append(f)
    return out


def _pack(factors: tuple):
    """Several factors on one axis: a ``("prod", factors)`` pseudo-factor (one axis of the label)."""
    factors = _normal(factors)
    if not factors:
        return _free(1)
    if len(factors) == 1:
        return factors[0]
    return ("prod", factors)



def _segments(segs):
    """Spec entry for an axis made of segments; merge a single whole segment into a plain entry."""
    merged: list = []
    for g, n in segs:
        if isinstance(g, tuple):  # a nested segment list
            merged.extend(g)
        else:
            merged.append((g, n))
    if len(merged) == 1:
        return merged[0][0]
    if all(g is None for g, _ in merged):
        return None
    return tuple(merged)


def _rename(entry, names: Mapping[str, str]):
    if entry is None:
        return None
    if isinstance(entry, str):
        return names[entry]
    return tuple((None if g is None else names[g], n) for g, n in entry)


def _groups_in(entry) -> list[str]:
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    return [g for g, _ in entry if g is not None]


def _summary(why: Mapping[str, list[str]]) -> list[str]:
    """One line per cause: how many places, and the first few."""
    lines = []
    for cause, places in why.items():
        uniq = list(dict.fromkeys(places))
        shown = ", ".join(uniq[:3]) + (", ..." if len(uniq) > 3 else "")
        lines.append(f"{cause}: units held fixed at {len(uniq)} place(s) ({shown})")
    return lines
