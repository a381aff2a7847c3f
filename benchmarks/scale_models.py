"""Real-size image models in plain ``torch.nn`` (no torchvision), for ``benchmarks/scale.py``.

The shapes (and parameter names) of torchvision's ``resnet50``,
``resnext50_32x4d``, ``vit_b_16`` (for 32x32 images) and ``vgg11_bn``, each
with a 10-class head, importable as ``--model``:

    modelmerge align A B -o OUT --model benchmarks.scale_models:ResNet50 --method weight-matching

(run from the repository root: the CLI imports ``--model`` from the current folder).
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (optionally grouped) -> 1x1, with BatchNorm and a residual add."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with Bottleneck blocks (layers 3-4-6-3 for ResNet-50)."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 10, groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(self.inplanes, planes, 2 if (i > 0 and j == 0) else 1, groups,
                                        width_per_group))
                self.inplanes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet50(ResNet):
    """ResNet-50 (25.5 M parameters with a 10-class head: 23.5 M)."""

    def __init__(self, num_classes: int = 10):
        super().__init__((3, 4, 6, 3), num_classes)


class ResNeXt50(ResNet):
    """ResNeXt-50 32x4d: ResNet-50 with 32-group 3x3 convolutions, twice as wide inside each block."""

    def __init__(self, num_classes: int = 10):
        super().__init__((3, 4, 6, 3), num_classes, groups=32, width_per_group=4)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: LN -> multi-head self-attention -> add; LN -> MLP (GELU) -> add."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViTB16(nn.Module):
    """ViT-B/16 (12 layers, width 768, 12 heads, MLP 3072) for 32x32 images: 4 patches and a class token."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, patch_size: int = 16, layers: int = 12,
                 dim: int = 768, heads: int = 12, mlp_dim: int = 3072):
        super().__init__()
        self.patch_size = patch_size
        self.conv_proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        n_tokens = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, n_tokens, dim).normal_(std=0.02))
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [B, tokens, dim]
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.ln(self.layers(x))
        return self.head(x[:, 0])


class VGG11BN(nn.Module):
    """VGG-11 with BatchNorm: 8 conv layers, 7x7 adaptive pooling, 25088-4096-4096-10 classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


#: name -> (class path for --model, input shape hint)
MODELS = {
    "resnet50": ("benchmarks.scale_models:ResNet50", "3,32,32"),
    "resnext50_32x4d": ("benchmarks.scale_models:ResNeXt50", "3,32,32"),
    "vit_b_16": ("benchmarks.scale_models:ViTB16", "3,32,32"),
    "vgg11_bn": ("benchmarks.scale_models:VGG11BN", "3,32,32"),
}
