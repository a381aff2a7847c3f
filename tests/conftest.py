"""Tiny seeded models shared by the tests (no network, no files outside tmp_path)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


def mlp(widths=(12, 16, 16, 5), seed=0, layernorm=False):
    torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            if layernorm:
                layers.append(nn.LayerNorm(n_out))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class NamedMLP(nn.Module):
    """fc1..fc3 naming, as hand-written models do."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 24), nn.Linear(24, 20), nn.Linear(20, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class VGGish(nn.Module):
    """conv+BN blocks, pooling, flatten into a linear head (features.* / classifier.*)."""

    def __init__(self, seed=0, conv1d=False):
        super().__init__()
        torch.manual_seed(seed)
        Conv, BN, Pool = (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d) if conv1d else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
        self.features = nn.Sequential(
            Conv(1, 6, 3, padding=1), BN(6), nn.ReLU(), Pool(2),
            Conv(6, 8, 3, padding=1), BN(8), nn.ReLU(), Pool(2),
        )
        spatial = 2 if conv1d else 4  # 8 -> 2 (1d) ; 8x8 -> 2x2 (2d)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * spatial, 12), nn.ReLU(), nn.Linear(12, 4))
        # non-trivial running statistics, so that permuting them matters
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.normal_()
                    m.bias.normal_()
        self.eval()

    def forward(self, x):
        return self.classifier(self.features(x))


def vgg_input(conv1d=False, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 1, 8) if conv1d else (n, 1, 8, 8), generator=g)


@pytest.fixture
def save_sd(tmp_path):
    """Save a state dict as safetensors (or .pt) in tmp_path and return the path."""
    from safetensors.torch import save_file

    def _save(state, name="m.safetensors", metadata=None):
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
        else:
            torch.save(state, path)
        return path

    return _save


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """Eight small digits MLPs (64-16-16-10), trained briefly: a zoo for aligner tests."""
    from modelmerge.zoo.store import make_zoo
    from modelmerge.zoo.train import TrainConfig

    folder = tmp_path_factory.mktemp("zoo")
    make_zoo({"family": "mlp", "widths": [64, 16, 16, 10]}, "digits", 8, folder,
             config=TrainConfig(epochs=3, lr=3e-3))
    return folder


def aligner_answer(aligner, a_state, b_state):
    """The aligner's Hungarian answer for two state dicts of one chain."""
    from modelmerge.spec import infer_chain
    from modelmerge.weightspace import to_weight_space

    chain = infer_chain(a_state)
    return aligner.align(to_weight_space(chain, a_state), to_weight_space(chain, b_state))


def check_equivariance(aligner, a, b, seed):
    """True if permuting A by g and B by g' turns the answer k into g k g'^T (exactly)."""
    from modelmerge.permutation import apply_permutation, random_permutation
    from modelmerge.spec import infer_chain

    chain = infer_chain(a)
    spec = chain.spec(a)
    gen = torch.Generator().manual_seed(seed)
    g, g2 = random_permutation(spec, gen), random_permutation(spec, gen)
    k = aligner_answer(aligner, a, b)
    k2 = aligner_answer(aligner, apply_permutation(a, spec, g), apply_permutation(b, spec, g2))
    for l in range(len(k)):
        group = chain.group(l)
        # A' unit i = A unit g[i] <-> B unit k[g[i]] = B' unit g2^-1[k[g[i]]]
        if not torch.equal(k2[l], torch.argsort(g2[group])[k[l][g[group]]]):
            return False
    return True


def assert_recovers_planted(state, spec, seed):
    """Weight matching of ``state`` against itself permuted by a random (structured) permutation of
    ``spec`` returns a valid permutation that undoes it exactly."""
    from modelmerge.matching import weight_matching
    from modelmerge.permutation import (
        apply_permutation,
        check_permutation,
        invert_permutation,
        random_permutation,
    )

    perm = random_permutation(spec, torch.Generator().manual_seed(seed))
    found, _ = weight_matching(state, apply_permutation(state, spec, perm), spec)
    check_permutation(spec, found)
    expected = invert_permutation(perm)
    assert all(torch.equal(found[g], expected[g]) for g in spec.groups)
