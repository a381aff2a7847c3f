"""Soundness corpus for the tracer: models where a careless rule would permute what must stay put.

Every model below once broke (or could break) the contract: any permutation the traced spec allows
leaves every output unchanged. Each is traced, permuted three ways and run again; the positive cases
also check that the units that *can* move still do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelmerge.network import output_tensors
from modelmerge.permutation import apply_permutation, random_permutation
from modelmerge.trace import trace_spec


class MaxOverTime(nn.Module):  # text-CNN: values of a max over a free axis keep the channels' group
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv1d(4, 8, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.max(torch.relu(self.c(x)), dim=2)[0])


class ArgmaxOverUnits(nn.Module):  # indices of a maximum over permuted units depend on their order
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)

    def forward(self, x):
        return self.a(x[:, :, 0]).max(-1)


class PoolIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        v, i = F.max_pool2d(self.a(x[:, :, :, None].expand(-1, -1, -1, 2)), 2, return_indices=True)
        return v.sum(1), i


class Tril(nn.Module):  # triangular mask over (units, units): order matters
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tril(self.a(x)).sum(1))


class ClampByParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.lo = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        return self.b(torch.clamp(self.a(x[:, :, 0]), min=self.lo))


class NonPersistentBuffer(nn.Module):  # not in the state dict, so never permuted: its units must stay
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.register_buffer("scale", torch.randn(6), persistent=False)

    def forward(self, x):
        return self.b(self.a(x[:, :, 0]) * self.scale)


class SliceOfFlattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(12, 3)

    def forward(self, x):
        return self.b(self.a(x.transpose(1, 2)).reshape(x.shape[0], -1)[:, :12])


class PixelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.c(x[:, :, :, None].expand(-1, -1, -1, 2)[:, :, :4, :]), 2).mean(1)


def _heads(m, x, h=2):
    b, t, e = x.shape
    return [layer(x).view(b, t, h, e // h).transpose(1, 2) for layer in (m.q, m.k, m.v)]


class QKV(nn.Module):
    def __init__(self, e=8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(e, e), nn.Linear(e, e), nn.Linear(e, e)


class OneHeadUsed(QKV):  # heads move as a set: selecting one breaks the set
    def __init__(self):
        super().__init__()
        self.o = nn.Linear(4, 3)

    def forward(self, x):
        q, k, v = _heads(self, x.transpose(1, 2).repeat(1, 1, 2))
        return self.o((torch.softmax(q @ k.transpose(-2, -1), -1) @ v)[:, 0])


class FlatHeadGate(QKV):  # a per-head gate stored flat: tied to no layer, so the heads must stay
    def __init__(self):
        super().__init__()
        self.o, self.g = nn.Linear(8, 3), nn.Parameter(torch.randn(8))

    def forward(self, x):
        x = x.transpose(1, 2).repeat(1, 1, 2)
        q, k, v = _heads(self, x)
        o = F.scaled_dot_product_attention(q, k, v) * self.g.view(2, 4).sum(-1)[:, None, None]
        return self.o(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8))


class MeanOverHeads(QKV):  # a mean over heads leaves units that each head orders its own way
    def forward(self, x):
        q, k, v = _heads(self, x.transpose(1, 2).repeat(1, 1, 2))
        return F.scaled_dot_product_attention(q, k, v).mean(1).amax(-1)


class ChunkThenPairs(nn.Module):  # pieces [0:3], [3:6] vs pairs (0, 1), (2, 3), (4, 5) elsewhere
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(4, 6), nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x[:, :, 0])
        u, w = h.chunk(2, -1)
        return self.b(u) + self.c(w) + self.d(h.view(-1, 3, 2).softmax(-1).reshape(-1, 6))


class ConvOverUnits(nn.Module):  # a conv sliding along the permuted axis
    def __init__(self):
        super().__init__()
        self.a, self.t, self.b = nn.Linear(5, 6), nn.Conv1d(4, 4, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.t(self.a(x)))


class AttentionOverChannels(nn.Module):  # XCiT-style: SDPA over channels; keys and values share positions
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 6)

    def forward(self, x):
        x = x.transpose(1, 2)
        q, k, v = (m(x).transpose(1, 2) for m in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v).sum(1)


class NormsAndSlopes(nn.Module):  # RMSNorm, InstanceNorm and a per-channel PReLU follow their channels
    def __init__(self):
        super().__init__()
        self.a, self.n, self.p, self.b = nn.Linear(4, 6), nn.RMSNorm(6), nn.PReLU(6), nn.Linear(6, 3)
        self.c, self.i, self.d = nn.Conv1d(4, 6, 1), nn.InstanceNorm1d(6, affine=True), nn.Conv1d(6, 3, 1)

    def forward(self, x):
        return self.b(self.p(self.n(self.a(x[:, :, 0])))) + self.d(self.i(self.c(x))).mean(2)


class DepthwiseMultiplier(nn.Module):  # groups == in channels, 2 outputs per channel: blocks move with them
    def __init__(self):
        super().__init__()
        self.a, self.dw, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.b(torch.relu(self.dw(torch.relu(self.a(x[:, :, :, None]))))).mean((2, 3))


class RepeatedThenRead(nn.Module):  # grouped-query attention's repeat: a layer reads (copy, unit) pairs
    def __init__(self):
        super().__init__()
        self.v, self.o = nn.Linear(4, 6), nn.Linear(12, 3)  # v resolved before o finds it cannot follow

    def forward(self, x):
        h = self.v(x[:, :, 0])
        return self.o(h[:, None, :].expand(-1, 2, -1).reshape(x.shape[0], 12))


class GhostSlice(nn.Module):  # GhostNet: primary and cheap features concatenated, then the first channels
    def __init__(self):
        super().__init__()
        self.p, self.c, self.b = nn.Conv1d(4, 4, 1), nn.Conv1d(4, 4, 3, padding=1, groups=4), nn.Conv1d(6, 2, 1)

    def forward(self, x):
        y = torch.relu(self.p(x))
        return self.b(torch.cat([y, self.c(y)], 1)[:, :6]).mean(2)


class PartialConv(nn.Module):  # FasterNet: convolve the first channels, pass the rest (an unequal split)
    def __init__(self):
        super().__init__()
        self.a, self.pc, self.b = nn.Conv1d(4, 8, 1), nn.Conv1d(3, 3, 3, padding=1), nn.Conv1d(8, 2, 1)

    def forward(self, x):
        x1, x2 = torch.split(self.a(x), [3, 5], 1)
        return self.b(torch.cat([self.pc(x1), x2], 1)).mean(2)


class SlicedTwoWays(nn.Module):  # one group sliced at different bounds by two readers
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(2, 2), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x[:, :, 0])
        return self.b(h[:, :2]) + self.c(h[:, 3:])


class TransposedWeights(nn.Module):  # linear layers written as addmm/matmul of W.t() (older export IRs)
    def __init__(self):
        super().__init__()
        self.w1, self.b1, self.w2 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6)), nn.Parameter(
            torch.randn(3, 6))

    def forward(self, x):
        return torch.relu(torch.addmm(self.b1, x[:, :, 0], self.w1.t())) @ self.w2.t()


class GLUNet(nn.Module):  # F.glu: the two halves of a layer's outputs multiply, so they move together
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(F.glu(self.a(x), -1)).mean(1)


class TokenMixer(nn.Module):  # MLP-Mixer: a hidden layer over the token axis, and a residual over tokens
    def __init__(self):
        super().__init__()
        self.e, self.t1, self.t2 = nn.Linear(5, 8), nn.Linear(4, 6), nn.Linear(6, 4)
        self.c1, self.c2, self.h = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = self.e(x)
        x = x + self.t2(F.gelu(self.t1(x.transpose(1, 2)))).transpose(1, 2)
        return self.h((x + self.c2(F.gelu(self.c1(x)))).mean(1))


MODELS = [GLUNet, TokenMixer, TransposedWeights, GhostSlice, PartialConv, SlicedTwoWays, RepeatedThenRead, DepthwiseMultiplier, MaxOverTime, ArgmaxOverUnits, PoolIndices, Tril, ClampByParameter, NonPersistentBuffer,
          SliceOfFlattened, PixelShuffle, OneHeadUsed, FlatHeadGate, MeanOverHeads, ChunkThenPairs, ConvOverUnits,
          AttentionOverChannels, NormsAndSlopes]
#: models whose units the tracer should still be able to move (the others may hold everything fixed)
MOVABLE = {GLUNet, TokenMixer, TransposedWeights, GhostSlice, PartialConv, DepthwiseMultiplier, MaxOverTime, ClampByParameter, AttentionOverChannels, NormsAndSlopes}


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_every_permutation_the_spec_allows_keeps_the_outputs(cls):
    torch.manual_seed(0)
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
        for buf in model.buffers():
            if buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g))
    x = torch.randn(3, 4, 5, generator=g)
    result = trace_spec(model, (x,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = output_tensors(model(x))
    for seed in range(3):
        perm = random_permutation(result.spec, torch.Generator().manual_seed(seed))
        model.load_state_dict(apply_permutation(state, result.spec, perm))
        with torch.no_grad():
            for a, b in zip(before, output_tensors(model(x))):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    if cls in MOVABLE:
        assert result.permutable > 0 and result.spec.groups


def test_depthwise_multiplier_blocks_are_recovered_by_weight_matching():
    from conftest import assert_recovers_planted

    torch.manual_seed(0)
    model = DepthwiseMultiplier()
    spec = trace_spec(model, (torch.randn(2, 4, 5),)).spec
    (heads,) = spec.heads.values()
    assert heads.count == 4 and len(heads.groups) == 2 and len(heads.rigid) == 1
    assert_recovers_planted(model.state_dict(), spec, 3)
