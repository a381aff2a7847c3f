"""Edge cases of running a user's module: tied weights saved under either name, float models whose first
weight layer is an embedding, state dicts made under inference mode or holding the user's Parameters."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp
from torch import nn

from modelmerge.network import output_tensors, resolve_network


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.tok.weight  # tied: tok.weight is the owner (registered first)

    def forward(self, x):
        h = self.tok(x)
        return self.head(h + self.fc2(torch.relu(self.fc1(h)))).mean(1)


class PositionsFirst(nn.Module):
    """Float inputs [B, 8, 4]; a learned position table (an nn.Embedding) registered before the input layer."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(8, 16)
        self.proj, self.fc, self.out = nn.Linear(4, 16), nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.proj(x) + self.pos(torch.arange(x.shape[1]))
        return self.out(torch.relu(self.fc(h))).mean(1)


def test_a_tied_weight_saved_only_under_its_alias_runs_as_that_checkpoint():
    torch.manual_seed(0)
    a, b = TiedLM().eval(), TiedLM().eval()
    # save_model-style: the alias (head.weight) kept, the owner (tok.weight) dropped
    state_a = {k: v for k, v in a.state_dict().items() if k != "tok.weight"}
    state_b = {k: v for k, v in b.state_dict().items() if k != "tok.weight"}
    holder = TiedLM()
    holder.load_state_dict(a.state_dict())
    net = resolve_network(state_a, module=holder, input_shape=(6,))
    x = net.random_inputs(4, torch.Generator().manual_seed(1))
    assert x.dtype == torch.long
    with torch.no_grad():
        torch.testing.assert_close(net.forward(state_b, x), b(x))  # B's tied weight, not the holder's (A's)
    assert "head.weight" in net.trainable and set(net.spec.axes) == set(state_a)


def test_an_embedding_first_model_with_float_inputs_runs_on_floats():
    model = PositionsFirst().eval()
    net = resolve_network(model.state_dict(), module=model, input_shape=(8, 4))
    assert net.vocab is None and net.num_outputs == 3
    x = net.random_inputs(2, torch.Generator().manual_seed(0))
    assert x.is_floating_point() and output_tensors(net.forward(model.state_dict(), x))[0].shape == (2, 3)
    assert net.spec.groups  # traced with float example inputs too


def test_inference_mode_state_and_the_users_parameters_are_left_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.inference_mode():
        frozen = {k: v.clone() for k, v in model.state_dict().items()}
    net = resolve_network(frozen, module=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    assert net.forward(frozen, torch.randn(2, 4)).shape == (2, 3)
    for p in model.parameters():
        p.requires_grad_(False)
    params = model.state_dict(keep_vars=True)
    from modelmerge.archs import load_strict

    load_strict(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), params, "a test model")
    assert not any(p.requires_grad for p in model.parameters())  # the user's frozen Parameters stay frozen


def test_a_bare_cnn_says_it_assumes_channel_major_flattening():
    """A model that flattens channels-last was written out broken with no warning from the library
    (found by a black-box sweep of the Python API): the plain-chain reading guesses the order in
    which a linear layer reads a conv map, and now says so."""
    from torch import nn

    from modelmerge.network import resolve_network

    flat = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).state_dict()
    net = resolve_network(flat)
    assert net.assumption is not None and "flattened channel by channel (64 positions each" in net.assumption
    assert resolve_network(flat, assume_chain=True).assumption is None
    pooled = {"0.weight": torch.randn(4, 1, 3, 3), "0.bias": torch.zeros(4), "2.weight": torch.randn(3, 4)}
    # one position per channel: nothing to order, so only the plain-chain reading itself is stated
    assert "flattened" not in resolve_network(pooled).assumption


def test_a_bare_chain_always_states_its_assumption():
    """Distinct widths rule out a hidden skip, not a forward that returns hidden features or reorders
    units itself: such models were written out changed with an empty warnings list (black-box sweep)."""
    from modelmerge.alignment import align
    from modelmerge.network import resolve_network

    a, b = mlp((16, 32, 24, 10), seed=0).state_dict(), mlp((16, 32, 24, 10), seed=1).state_dict()
    net = resolve_network(a)
    assert net.assumption is not None and "--model" in net.assumption and "skip" not in net.assumption
    assert resolve_network(a, assume_chain=True).assumption is None
    result = align(a, b, method="weight-matching")
    assert result.verification.assumed and result.warnings == [net.assumption]


def test_a_trusted_file_order_that_another_order_also_fits_is_stated():
    """A .pt keeps the order modules were declared in, which a model may not run them in: with two
    interchangeable square layers and unnumbered names the written B computed something else under
    a bare 'ASSUMED' (found by a black-box sweep). The assumption now names both orders."""
    from modelmerge.network import resolve_network

    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (n_out, n_in) in [("encoder", (32, 20)), ("bottleneck", (32, 32)), ("hidden", (32, 32)),
                                ("decoder", (10, 32))]:
        state[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g)
        state[f"{name}.bias"] = torch.randn(n_out, generator=g)
    net = resolve_network(state, ordered=True)
    assert "file's order (encoder -> bottleneck -> hidden -> decoder), though encoder -> hidden" in net.assumption
    assert resolve_network(state, ordered=True, assume_chain=True).assumption is None
    numbered = {k.replace("bottleneck", "fc1").replace("hidden", "fc2"): v for k, v in state.items()}
    assert "file's order" not in (resolve_network(numbered, ordered=True).assumption or "")


class _SequenceFirst(torch.nn.Module):
    """A Linear first, but the forward needs a sequence ``[B, T, features]`` (pools over T)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        if x.ndim != 3:
            raise ValueError("expected [batch, time, features]")
        return self.out(torch.relu(self.fc(x)).mean(1))


def test_input_shape_is_found_for_sequence_models_and_gpt2_conv1d_layers():
    """Only one vector per example was tried after a Linear, and a GPT-2 Conv1D first layer was not
    recognised at all: both asked for --input-shape (black-box sweep)."""
    from modelmerge.network import find_input_shape

    assert find_input_shape(_SequenceFirst()) == ((8, 6), 3)
    transformers = pytest.importorskip("transformers")
    mlp = transformers.models.gpt2.modeling_gpt2.GPT2MLP(32, transformers.GPT2Config(n_embd=16))
    assert find_input_shape(mlp)[0] == (16,)
