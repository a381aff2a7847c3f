"""What runs a checkpoint, decided once: the :class:`Network`.

Every command and library function that needs a spec, a forward pass, data
shaped for the model, a BatchNorm reset or the learned aligners' weight-space
view takes a :class:`Network` built by :func:`resolve_network`. The rules live
here and nowhere else:

* **spec**: the given one (checked against the state dict), else the one traced
  from ``module``, else the chain inferred from the state dict;
* **forward**: ``module``'s real one (``--model``), else the architecture
  record's, else the *generic* forward of the inferred chain when the spec is
  that chain's (an assumption: skip connections are invisible in a state dict),
  else none;
* **data**: the real forwards run on data; a bare checkpoint only when it is a
  plain Linear chain, run as a ReLU MLP (an assumption the notes say).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from modelmerge.data import Dataset
from modelmerge.errors import ModelMergeError, SpecError, one_line, preview
from modelmerge.spec import Chain, PermutationSpec, infer_chain

#: spatial side of the random inputs that verify a bare conv chain (its real input size is not in the weights)
CHAIN_SPATIAL = 8
#: below this fraction of permutable hidden units, a traced network warns that alignment can do little
LOW_COVERAGE = 0.1
NO_DATA = ("running this checkpoint on data needs its real forward: pass --model pkg.module:Class, or use a "
            "checkpoint with an architecture record (bare checkpoints run only as plain Linear MLPs)")


@dataclass(frozen=True, eq=False)
class Network:
    """One resolved architecture: its spec, its forward, and how data and aligners see it.

    Built by :func:`resolve_network` from one checkpoint of the architecture; the
    weights themselves are always passed in (``forward(state, x)``), so one
    ``Network`` serves A, B, their merges and the refinement's free weights.

    Attributes:
        spec: the permutation spec.
        spec_source: ``"inferred"``, ``"file"`` (given), ``"traced"`` (from ``module``) or ``"untraced"``
            (``module`` not traced: a network that only runs).
        forward_kind: ``"model"`` (``module``'s real forward), ``"record"`` (the
            architecture record's model), ``"chain"`` (the generic forward of the
            inferred chain: assumed) or None (no forward known).
        input_shape: one example's shape (None without a forward).
        num_outputs: outputs per example, when the forward returns ``[batch, outputs]``.
        chain: the Linear/Conv chain when the spec is that chain's (what learned aligners read).
        record: the architecture record, if any.
        module: the module holding the architecture: ``--model``'s, or the one the
            record builds (weights loaded from the resolving checkpoint); None otherwise.
        warnings: what the tracer could not follow.
        assumption: what a bare checkpoint's forward assumes (a plain chain), with the ways it could
            be wrong that the weights suggest (widths that would allow a skip connection nobody can
            see in a state dict, a flattening order, a layer order); commands print it as a warning.
            None when nothing is assumed (a record, ``--model``, or ``--assume-chain``).
        forward_chain: the chain the generic forward runs (``forward_kind == "chain"``): the
            inferred one, whatever the spec (a user's spec is checked against it too).
        vocab: the vocabulary size when the module reads token ids (inputs are integers), else None.
        risks: what a permuted model may break that its verification cannot see (parameters the
            traced forward never reads: an auxiliary head, a training-only branch); commands that
            permute print them as warnings.
    """

    spec: PermutationSpec
    spec_source: str
    forward_kind: str | None
    input_shape: tuple[int, ...] | None = None
    num_outputs: int | None = None
    chain: Chain | None = None
    record: dict | None = None
    module: nn.Module | None = None
    warnings: tuple[str, ...] = field(default=())
    assumption: str | None = None
    forward_chain: Chain | None = None
    vocab: int | None = None
    risks: tuple[str, ...] = ()

    # ------------------------------------------------------------ what it is
    @property
    def family(self) -> str | None:
        """``"mlp"`` (a Linear chain), ``"cnn"`` (Conv layers, then Linear) or None (not a chain)."""
        return None if self.chain is None else self.chain.family

    @property
    def depth(self) -> int | None:
        """Number of Linear/Conv layers of the chain (None: not a chain)."""
        return None if self.chain is None else len(self.chain.layers)

    @property
    def runs_on_data(self) -> bool:
        """Its forward may be trusted on data: a real one, or a bare plain Linear chain (a ReLU MLP)."""
        if self.forward_kind in ("model", "record"):
            return True
        return self.forward_kind == "chain" and all(
            layer.kind == "linear" and not layer.norms for layer in self.forward_chain.layers)

    @property
    def data_note(self) -> str | None:
        """What running it on data assumes (None when the forward is real)."""
        if self.forward_kind == "chain":
            return "no architecture record: run on data as a Linear+ReLU MLP (pass --model if it is not one)"
        return None

    @cached_property
    def trainable(self) -> frozenset[str]:
        """The state-dict keys that are parameters (take gradients), not buffers."""
        if self.module is not None:
            # named_parameters drops tied duplicates, which functional_call refuses twice; a tied
            # parameter saved only under its alias (the checkpoint's keys are the spec's) trains under that name
            names = {name for name, _ in self.module.named_parameters()}
            return frozenset(names | {alias for alias, owner in self._twins.items()
                                      if owner in names and owner not in self.spec.axes})
        chain = self.forward_chain
        if chain is None:
            return frozenset()
        keys = [k for layer in chain.layers for k in (layer.weight, layer.bias) if k is not None]
        return frozenset(keys + [key for layer in chain.layers for norm in layer.norms
                                 for role, key in norm.params.items() if role in ("weight", "bias")])

    # ------------------------------------------------------------ running it
    def forward(self, state: Mapping[str, torch.Tensor], x: torch.Tensor, grad: bool = False,
                batch_stats: bool = False, precise: bool = False) -> torch.Tensor:
        """Outputs of the network with weights ``state`` on inputs ``x [B, *input_shape]``.

        Floating-point weights run in float32 (half-precision checkpoints too), as
        a strict ``load_state_dict`` into the float32 module would.

        Args:
            state: a state dict of this architecture (any of A, B, a merge...).
            x: a batch of inputs.
            grad: keep the autograd graph (gradients reach ``state``).
            batch_stats: BatchNorm layers normalise with ``x``'s statistics instead of the
                running ones (as after a BatchNorm reset on ``x``); nothing else changes
                mode (dropout stays off) and ``state`` is not modified.
            precise: run in float64 (weights and floating inputs) instead of float32: a
                reference for float32's round-off (a model whose forward makes float32
                tensors of its own may fail this way).

        Raises:
            ModelMergeError: no forward is known, or the user's model failed.
        """
        if self.forward_kind is None:
            raise ModelMergeError("no forward is known for this network: pass --model pkg.module:Class")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if precise:
                x = x.double() if x.is_floating_point() else x
            return self._run(state, x, batch_stats, torch.float64 if precise else None)

    def _run(self, state, x, batch_stats: bool = False, dtype: torch.dtype | None = None):
        if self.forward_kind == "model":
            if not batch_stats:
                return self._run_module_eval(state, x, dtype)
            return self._run_module_batch_stats(state, x)
        floats = {k: v.to(dtype or torch.float32) if v.is_floating_point() else v for k, v in state.items()}
        if self.forward_kind == "record":
            from modelmerge.stacked import stacked_forward

            return stacked_forward(self.record, {k: v[None] for k, v in floats.items()}, x[None],
                                   train=batch_stats)[0]
        from modelmerge.forward import chain_forward

        return chain_forward(self.forward_chain, floats, x)

    @cached_property
    def _module_keys(self) -> dict[str, torch.dtype]:
        ref = {name: t for name, t in self.module.named_parameters()}
        ref.update(self.module.named_buffers())
        return {k: t.dtype for k, t in ref.items()}

    def module_forward(self, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``module``'s own forward with weights ``state`` (no gradients), for a record's network too
        (whose :meth:`forward` runs the faster stacked form): hooks on its submodules fire.

        Raises:
            ModelMergeError: there is no module, or the user's model failed.
        """
        if self.module is None:
            raise ModelMergeError("no model instance holds this architecture: pass --model pkg.module:Class")
        with torch.no_grad():
            return self._run_module_eval(state, x)

    @cached_property
    def _twins(self) -> dict[str, str]:
        from modelmerge.archs import tied_keys

        return tied_keys(self.module)

    def _run_module(self, state, x, dtype: torch.dtype | None = None):
        dtypes = self._module_keys
        if dtype is not None:  # every floating-point parameter and buffer in ``dtype``
            dtypes = {k: dtype if t.is_floating_point else t for k, t in dtypes.items()}
        params = {k: state[k].to(dtypes[k]) for k in dtypes if k in state}
        for alias, owner in self._twins.items():  # a tied weight saved only under its alias
            if owner not in params and alias in state and owner in dtypes:
                params[owner] = state[alias].to(dtypes[owner])
        try:
            return torch.func.functional_call(self.module, params, (x,))
        except Exception as e:  # noqa: BLE001 - user code: any failure is the model's
            raise ModelMergeError(f"running --model failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None

    def _run_module_eval(self, state, x, dtype: torch.dtype | None = None):
        with eval_mode(self.module):
            return self._run_module(state, x, dtype)

    def _run_module_batch_stats(self, state, x):
        # only the BatchNorm layers switch to training mode, on copies of their running statistics
        # (training mode updates them in place); the module is left as it was
        bns = [(name, m) for name, m in self.module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        state = dict(state)
        for name, _ in bns:
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                key = f"{name}.{buf}" if name else buf
                if key in state:
                    state[key] = state[key].detach().clone()
        with eval_mode(self.module):  # every mode as it was afterwards
            for _, m in bns:
                m.train()
            return self._run_module(state, x)

    def random_inputs(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, *input_shape]`` Gaussian inputs (independent of any model), for verification; random token
        ids for a model that reads tokens."""
        if self.vocab is not None:
            return torch.randint(0, self.vocab, (n, *self.input_shape), generator=generator)
        return torch.randn((n, *self.input_shape), generator=generator, dtype=torch.float32)

    # ------------------------------------------------------------ data
    def shape_data(self, data: Dataset) -> Dataset:
        """``data`` with inputs shaped for this network, its classes checked against the outputs.

        Raises:
            ModelMergeError: the forward cannot be trusted on data (see :attr:`runs_on_data`).
            DataError: the inputs do not fit, or there are more classes than outputs.
        """
        if not self.runs_on_data:
            raise ModelMergeError(NO_DATA)
        if self.num_outputs is None:
            raise ModelMergeError("running on data needs a model whose forward returns logits [batch, classes]")
        return data.shaped(self.input_shape, self.num_outputs)

    def metric(self, data: Dataset, split: str = "test", reset_bn: bool = False
               ) -> Callable[[Mapping[str, torch.Tensor]], tuple[float, float]]:
        """A function state dict -> (mean cross-entropy, accuracy) on one split of ``data``.

        Args:
            data: the dataset (shaped here).
            split: ``"test"`` or ``"train"``.
            reset_bn: recompute BatchNorm statistics on the train split before measuring.

        Raises:
            as :meth:`shape_data`, and :meth:`reset_bn`'s errors.
        """
        from modelmerge.errors import DataError
        from modelmerge.evaluate import evaluate_model

        x_reset = self.bn_inputs(data) if reset_bn else None  # fail now, not at the first α
        d = self.shape_data(data)
        x, y = (d.x_test, d.y_test) if split == "test" else (d.x_train, d.y_train)
        if len(x) == 0:
            raise DataError(f"{data.name}: the {split} split is empty; pass more data")

        def metric(state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
            if x_reset is not None:
                state = self.reset_bn(state, x_reset)
            return evaluate_model(lambda xb: self.forward(state, xb), x, y)

        return metric

    def bn_inputs(self, data: Dataset) -> torch.Tensor:
        """The training inputs a BatchNorm reset runs on, shaped for this network.

        Checks, in this order, that there is a module with BatchNorm, that the data
        fits, and that its train split is not empty.

        Raises:
            ModelMergeError: no module (a bare checkpoint), or no BatchNorm in it.
            DataError: the data does not fit, or has no training examples.
        """
        from modelmerge.errors import DataError

        self.bn_module()
        x = self.shape_data(data).x_train
        if len(x) == 0:
            raise DataError(f"{data.name}: the train split is empty, so there is nothing to reset BatchNorm "
                            "statistics on; pass more data")
        return x

    def reset_bn(self, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``state`` with every BatchNorm's running statistics recomputed on inputs ``x``.

        Raises:
            ModelMergeError: no module to run (a bare checkpoint), or no BatchNorm in it.
        """
        from modelmerge.bnreset import reset_batchnorm
        from modelmerge.errors import DataError

        if len(x) == 0:  # library callers; the commands get their inputs from bn_inputs
            raise DataError("--reset-bn: no training examples to recompute BatchNorm statistics on; pass more data")
        module = self._bn_copy
        module.load_state_dict(dict(state))
        reset_batchnorm(module, x)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    @cached_property
    def _bn_copy(self) -> nn.Module:
        # a copy: resetting must not change the module that holds the resolving checkpoint
        import copy

        return copy.deepcopy(self.bn_module())

    def bn_module(self) -> nn.Module:
        """The module a BatchNorm reset runs (``--model``'s or the record's).

        Raises:
            ModelMergeError: a bare checkpoint (no module), or no BatchNorm in the module.
        """
        from modelmerge.bnreset import has_batchnorm

        module = self.module
        if module is None:
            raise ModelMergeError("--reset-bn needs the model's forward: pass --model (or use a checkpoint with an "
                                  "architecture record)")
        if not has_batchnorm(module):
            raise ModelMergeError("--reset-bn: the model has no BatchNorm layer, so there is nothing to reset")
        return module

    # ------------------------------------------------------------ aligners
    def weight_space(self, state: Mapping[str, torch.Tensor]):
        """The canonical weight space of ``state`` (one network) for the learned aligners.

        Raises:
            ModelMergeError: the network is not a Linear/Conv chain.
        """
        from modelmerge.weightspace import to_weight_space

        if self.chain is None:
            raise ModelMergeError("the learned aligners read Linear/Conv chains, and this network is not one")
        return to_weight_space(self.chain, state)

    def check(self, state: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
        """Raise SpecError unless ``state`` fits this network's spec (keys and sizes)."""
        self.spec.check(state, what)


def output_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a forward's output: a tensor, or tuples, lists and dicts of them (a
    Hugging Face ``ModelOutput`` is a dict), in a fixed order; anything else is skipped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for key in out for t in output_tensors(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    return []


def _try_chain(state: Mapping[str, torch.Tensor], ordered: bool) -> Chain | None:
    try:
        return infer_chain(state, ordered)
    except SpecError:
        return None


def resolve_network(
    state: Mapping[str, torch.Tensor],
    *,
    spec: PermutationSpec | None = None,
    record: Mapping | None = None,
    module: nn.Module | None = None,
    input_shape: tuple[int, ...] | None = None,
    assume_chain: bool = False,
    trace: bool = True,
    ordered: bool = False,
) -> Network:
    """Decide, once, what runs the checkpoint ``state``: spec, forward, input shape, chain.

    A bare checkpoint (no record, no module) runs as a plain chain, which is only an
    assumption: a skip connection without parameters is invisible in a state dict. The
    network says so in :attr:`Network.assumption` (naming the risks the weights suggest,
    such as widths that would allow a skip connection), unless ``assume_chain``;
    where the names also read like residual blocks (``layer1.0.conv1``, ``shortcut``),
    it refuses unless ``assume_chain``.

    Args:
        state: one checkpoint of the architecture (A's).
        spec: a user's spec (``--spec``); checked against ``state``.
        record: the checkpoint's architecture record, if any.
        module: a model instance holding ``state`` (``--model``): its traced spec
            (unless ``spec`` is given) and its real forward.
        input_shape: one example's shape for ``module`` (found by trying common sizes if None).
        assume_chain: the user states that a bare checkpoint is a plain chain (``--assume-chain``).
        trace: trace ``module``'s spec; False gives a network that only runs (spec source
            ``"untraced"``: no group, every axis fixed), for commands that never permute, where
            tracing would only cost time and memory.
        ordered: ``state``'s names are in module order (:attr:`Checkpoint.ordered
            <modelmerge.checkpoint.Checkpoint.ordered>`), for chain inference.

    Returns:
        The :class:`Network`.

    Raises:
        SpecError: no spec can be inferred or traced, or the given one does not fit, or a bare
            checkpoint reads like residual blocks (and not ``assume_chain``).
        ArchError: the record does not fit the state dict.
        ModelMergeError: no input shape works for ``module``.
    """
    inferred = chain = _try_chain(state, ordered)
    warnings: tuple[str, ...] = ()
    risks: tuple[str, ...] = ()
    if spec is not None:
        spec.check(state)
        chosen, source = spec, "file"
    elif module is not None and not trace:
        chosen, source = PermutationSpec({}, {k: (None,) * t.ndim for k, t in state.items()}), "untraced"
    elif module is not None:
        from modelmerge.trace import trace_spec

        traced = trace_spec(module, input_shape=input_shape)
        chosen, source, warnings = _saved_keys(traced.spec, state, module), "traced", tuple(traced.warnings)
        risks = tuple(traced.risks)
        if traced.units and traced.fraction < LOW_COVERAGE:
            low = (f"only {traced.permutable} of {traced.units} hidden units ({traced.fraction:.0%}) can be permuted: "
                   "alignment can do little for this model (see the notes above, or pass --spec)")
            warnings += (low,)
        elif not traced.units and not traced.spec.groups:
            warnings += (("nothing can be permuted: the traced forward has no hidden layer whose weight it reads "
                          "directly (a single layer, recurrent layers, or weights computed from other parameters such "
                          "as weight_norm); pass --spec to say which axes move"),)
        chosen.check(state)
    else:
        if chain is None:
            infer_chain(state, ordered)  # raises the inference error, which says why
        chosen, source = chain.spec(state), "inferred"
    if chain is not None and chain.spec(state) != chosen:
        chain = None  # the learned aligners and the generic forward describe the chain's spec only
    if module is not None:
        shape, n_out = find_input_shape(module, input_shape)
        return Network(chosen, source, "model", shape, n_out, chain, None, module, warnings,
                       vocab=input_vocab(module, shape), risks=risks)
    if record is not None:
        from modelmerge.archs import build_for, num_outputs, validate_record
        from modelmerge.archs import input_shape as record_input

        rec = validate_record(record)
        held = build_for(rec, state)  # names the keys that do not fit, before allocating anything
        return Network(chosen, source, "record", record_input(rec), num_outputs(rec), chain, rec, held, warnings)
    if inferred is not None:  # a bare checkpoint: the inferred chain's generic forward checks any spec
        first, last = state[inferred.layers[0].weight], state[inferred.layers[-1].weight]
        # the generic forward keeps a conv map's size: verify it on CHAIN_SPATIAL per spatial side
        shape = (first.shape[1],) + (CHAIN_SPATIAL,) * (first.ndim - 2)
        n_out = int(last.shape[0]) if inferred.layers[-1].kind == "linear" else None
        if not assume_chain:
            _check_layout(inferred)
        risks = [] if assume_chain else [r for r in (_hidden_skip_risk(inferred, state), _flatten_risk(inferred),
                                                     _order_risk(inferred)) if r]
        if risks:
            risk = (f"assumed a plain chain (no record, no --model): {'; '.join(risks)}; if the model does "
                    "otherwise, what is written or measured from this reading is wrong. Pass --model "
                    "pkg.module:Class to verify the real forward, or --assume-chain to state it")
        elif not assume_chain:  # even then: a forward may also return hidden features, or reorder units itself
            risk = ("assumed a plain chain (no record, no --model): right only if the model runs these layers in "
                    "this order with elementwise activations between them and returns the last layer's output "
                    "alone, which a state dict cannot show; pass --model pkg.module:Class to verify the real "
                    "forward, or --assume-chain to state it")
        else:
            risk = None
        return Network(chosen, source, "chain", shape, n_out, chain, None, None, warnings, risk, inferred)
    return Network(chosen, source, None, None, None, None, None, None, warnings)


def _saved_keys(spec: PermutationSpec, state: Mapping[str, torch.Tensor], module: nn.Module) -> PermutationSpec:
    """The traced spec restricted to the keys the checkpoint has: a tied weight saved once keeps one entry."""
    from modelmerge.archs import tied_keys

    twins = tied_keys(module)
    drop = {k for k in spec.axes if k not in state and (twins.get(k) in state or k in twins.values())}
    if not drop:
        return spec
    return PermutationSpec(spec.groups, {k: v for k, v in spec.axes.items() if k not in drop}, spec.heads)


_BLOCK_WORDS = ("shortcut", "downsample", "residual", "skip", "res_")


def _hidden_skip_risk(chain: Chain, state: Mapping[str, torch.Tensor]) -> str | None:
    """Why the plain-chain reading of a bare checkpoint may be wrong (a clause of the assumption), or None.

    Raises:
        SpecError: the layer names read like residual blocks as well.
    """
    widths = [state[chain.layers[0].weight].shape[1]] + [state[layer.weight].shape[0] for layer in chain.layers]
    equal = [(k, j) for j in range(1, len(widths)) for k in range(j) if widths[k] == widths[j]]
    if not equal:
        return None  # no two points of the chain have the same width: no residual add fits
    shown = str(widths) if len(widths) <= 12 else f"[{preview([str(w) for w in widths], 10)}]"  # one readable line
    names = [layer.module for layer in chain.layers]
    nested = [m for m in names if any(part.isdigit() for part in m.split(".")[:-1])]
    worded = [m for m in names if any(w in m.lower() for w in _BLOCK_WORDS)]
    if nested or worded:
        example = (worded or nested)[0]
        raise SpecError(
            f"this bare checkpoint reads like residual blocks ({example!r}, widths {shown}): a skip connection "
            "without parameters cannot be seen in a state dict, so treating it as a plain chain could write a "
            "broken model; pass --model pkg.module:Class (its real forward is verified), or --assume-chain if it "
            "really is a plain chain")
    k, j = equal[0]
    return (f"widths {shown} would allow a skip connection (e.g. around "
            f"{f'layer {j}' if k + 1 == j else f'layers {k + 1}..{j}'}) that a state dict cannot show")


#: GPT-2's ``Conv1D`` layers (transformers): weights stored ``[in, out]``, transposed from ``nn.Linear``
_TRANSPOSED_NAMES = ("c_fc", "c_proj", "c_attn", "q_attn")


def _check_layout(chain: Chain) -> None:
    """Refuse a bare chain whose layer names are GPT-2's ``Conv1D`` ones: a square one reads as an
    ``nn.Linear`` chain and the output would be broken (the transposed layout cannot be seen).

    Raises:
        SpecError: naming the layer and the fix.
    """
    named = [layer.module for layer in chain.layers if layer.module.rsplit(".", 1)[-1] in _TRANSPOSED_NAMES]
    if named:
        raise SpecError(
            f"this bare checkpoint's layer {named[0]!r} is named like GPT-2's Conv1D, which stores its weight as "
            "[in, out], transposed from nn.Linear; a state dict cannot show which, and reading it the wrong way "
            "writes a broken model: pass --model (modelmerge.hf:build for transformers models), or --assume-chain "
            "if these are nn.Linear layers")


def _order_risk(chain: Chain) -> str | None:
    """The plain-chain reading's guess of the order, when the file's module order was trusted but
    another order of its blocks fits the shapes as well (a model may declare its modules in one
    order and run them in another)."""
    if chain.rival is None:
        return None
    found, other = chain.rival
    return f"the layers run in the file's order ({' -> '.join(found)}), though {' -> '.join(other)} fits their shapes too"


def _flatten_risk(chain: Chain) -> str | None:
    """The plain-chain reading's other guess: a linear layer reading a conv map with several positions
    per channel reads it flattened channel by channel (``x.flatten(1)`` on ``[N, C, H, W]``); a model
    that flattens channels-last orders those inputs otherwise. None when no layer reads such a map."""
    for layer, prev, blocks in zip(chain.layers[1:], chain.layers, chain.blocks[1:]):
        if prev.kind == "conv" and layer.kind == "linear" and blocks > 1:
            return (f"{layer.module!r} reads the conv map flattened channel by channel ({blocks} positions each, as "
                    "x.flatten(1) on [N, C, H, W]), not channels-last")
    return None


def token_vocab(module: nn.Module) -> int | None:
    """The vocabulary size when ``module``'s first weight layer is an ``nn.Embedding`` (it may read token
    ids; :func:`input_vocab` checks that it does)."""
    first = next((m for m in module.modules()
                  if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))), None)
    return first.num_embeddings if isinstance(first, nn.Embedding) else None


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """``module`` in eval mode inside the block, and every submodule's own mode restored after
    (a user's model may be mid-training, or hold a frozen BatchNorm in eval on purpose)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def _runs(module: nn.Module, x: torch.Tensor, errors: list[str] | None = None):
    """``module(x)`` in eval mode without gradients, or None when it fails (the error appended to ``errors``)."""
    try:
        with torch.no_grad(), eval_mode(module):
            return module(x)
    except Exception as e:  # noqa: BLE001 - any failure means "not this input"
        if errors is not None:
            errors.append(f"{type(e).__name__}: {one_line(e, 200)}")
        return None


def input_vocab(module: nn.Module, shape: tuple[int, ...]) -> int | None:
    """The vocabulary when ``module`` reads token ids of ``shape`` (an embedding first, and integer inputs
    run), else None: inputs are then floats (a learned position table registered first is not a vocabulary)."""
    vocab = token_vocab(module)
    if vocab is None or _runs(module, torch.zeros(2, *shape, dtype=torch.long)) is None:
        return None
    return vocab


def _is_conv1d_hf(m: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored ``[in, out]``."""
    return type(m).__name__ == "Conv1D" and getattr(getattr(m, "weight", None), "ndim", 0) == 2


def find_input_shape(module: nn.Module, given: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], int | None]:
    """A per-example input shape ``module`` accepts, and its output count if it returns ``[B, outputs]``.

    Tries ``given``, else the first Linear's (or GPT-2 Conv1D's) width, alone or as a sequence of
    8, the first Conv's channels at common image sizes, or token sequences of common lengths when
    the first layer is an embedding (inputs are then token ids; see :func:`token_vocab`).

    Raises:
        ModelMergeError: no candidate works; pass --input-shape (the model's own error is in
            the message: with ``given``, the error on that shape, else the first candidate's).
    """
    candidates = [tuple(given)] if given else []
    first = next((m for m in module.modules()
                  if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)) or _is_conv1d_hf(m)),
                 None)
    if first is not None and not given:
        if isinstance(first, nn.Linear) or _is_conv1d_hf(first):
            width = first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]
            candidates += [(width,), (8, width)]  # one vector, or a sequence of them (a transformer's)
        elif isinstance(first, nn.Embedding):
            candidates += [(s,) for s in (8, 16, 4, 32)]
        else:
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
            candidates += [(first.in_channels, *([s] * dims)) for s in (8, 16, 28, 32, 40, 64, 224)]
    dtypes = (torch.long, torch.float32) if token_vocab(module) is not None else (torch.float32,)
    errors: list[str] = []
    for shape in candidates:
        for dtype in dtypes:  # token ids first when an embedding comes first, else (or then) floats
            out = _runs(module, torch.zeros(2, *shape, dtype=dtype), errors)
            if out is not None:
                n_out = out.shape[1] if isinstance(out, torch.Tensor) and out.ndim == 2 else None
                return tuple(shape), n_out
    if given:  # the user's shape: the model's own error says what is wrong
        raise ModelMergeError(
            f"the model's forward fails on inputs of shape [batch, {', '.join(map(str, given))}] ({errors[0]}); "
            "check --input-shape (one example, without the batch) and --model-kwargs"
        )
    tried = f" (on {list(candidates[0])}: {errors[0]})" if errors else ""
    raise ModelMergeError(f"cannot find an input shape the model accepts{tried}; pass --input-shape, e.g. 1,28,28")
