"""Model classes for the traced-spec tests (importable as ``archs:Name`` from tests/)."""

from __future__ import annotations

import torch
from torch import nn

from modelmerge.examples.blocks import (  # noqa: F401  (re-exported)
    DenseNetish,
    EncoderClassifier,
    FusedViT,
    MobileNetish,
    ResNeXtish,
    TinyViT,
)
from modelmerge.examples.models import Block, ResidualMLP, ResNetish, VGGish  # noqa: F401  (re-exported)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x)
        return x


class WithConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 5)
        self.c = nn.Linear(6, 7)
        self.d = nn.Linear(7, 3)
        self.out = nn.Linear(10, 2)

    def forward(self, x):
        h = torch.cat([self.a(x), self.b(x)], dim=1)  # concatenation: held fixed
        return self.out(torch.relu(h)) + self.d(torch.relu(self.c(x))).sum(1, keepdim=True)
