"""Small model classes with the building blocks the tracer has to follow, sized for digits.

Transformers (a residual stream, attention heads split by ``view``/``reshape``, token
concatenation, learned positions) and convolutional blocks (depthwise and grouped
convolutions, dense concatenation). Every class runs on a small default input and
uses all of its parameters:

* :class:`TinyViT`, :class:`FusedViT`, :class:`MobileNetish`, :class:`ResNeXtish`,
  :class:`DenseNetish`: images ``[B, 1, 8, 8]`` (``load_digits`` size);
* :class:`EncoderClassifier`: per-position scalars ``[B, seq]`` (mnist1d: ``seq=40``;
  digits flattened: ``seq=64``), or token ids ``[B, seq]`` when ``vocab`` is given.

    modelmerge align a.safetensors b.safetensors -o out.safetensors --model modelmerge.examples.blocks:TinyViT
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseNetish", "EncoderClassifier", "FusedViT", "MobileNetish", "ResNeXtish", "TinyViT"]


# --------------------------------------------------------------------------- vision transformers
class SplitAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections, heads split BERT-style
    (``view(B, N, H, D // H).transpose(1, 2)``), ``scaled_dot_product_attention``, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, n, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, n, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class FusedAttention(nn.Module):
    """Multi-head self-attention with one packed ``qkv`` projection split timm-style
    (``reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)``, ``unbind(0)``) and explicit
    ``softmax(q @ k^T * scale) @ v``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp: int, fused: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (FusedAttention if fused else SplitAttention)(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A small vision transformer on ``[B, channels, image, image]``.

    Conv2d patch embedding (``patch`` x ``patch``, stride ``patch``), a learned ``cls_token``
    ``[1, 1, dim]`` prepended with ``torch.cat``, a learned ``pos_embedding``
    ``[1, patches + 1, dim]`` added, ``depth`` pre-norm blocks (separate q/k/v projections,
    BERT-style head split, ``scaled_dot_product_attention``; GELU MLP of width ``mlp``), a
    final LayerNorm, and a linear head on the cls token. Returns logits ``[B, classes]``.
    """

    fused = False

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, patch: int = 2, classes: int = 10,
                 mlp: int = 64, image: int = 8, channels: int = 1):
        super().__init__()
        if image % patch:
            raise ValueError(f"image size {image} is not a multiple of the patch size {patch}")
        n = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp, fused=self.fused) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class FusedViT(TinyViT):
    """:class:`TinyViT` with one packed ``qkv = nn.Linear(dim, 3 * dim)`` per block, split
    timm-style, and explicit attention (``softmax(q @ k^T * scale) @ v``). Same arguments."""

    fused = True


# --------------------------------------------------------------------------- sequence encoder
class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` classifier over a sequence of length ``seq``.

    Inputs ``[B, seq]``: per-position scalars embedded by ``nn.Linear(1, dim)`` (``vocab=None``;
    mnist1d with ``seq=40``, digits flattened with ``seq=64``), or token ids embedded by
    ``nn.Embedding(vocab, dim)``. A learned positional parameter ``[1, seq, dim]`` is added,
    then ``layers`` post-norm ``nn.TransformerEncoderLayer(dim, heads, 2 * dim,
    batch_first=True, dropout=0.0)``, a mean over positions and a linear head.
    """

    def __init__(self, vocab: int | None = None, dim: int = 32, heads: int = 4, layers: int = 2,
                 classes: int = 10, seq: int = 64):
        super().__init__()
        self.embed = nn.Linear(1, dim) if vocab is None else nn.Embedding(vocab, dim)
        self.scalar = vocab is None
        self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x.unsqueeze(-1)) if self.scalar else self.embed(x)
        h = self.encoder(h + self.pos)
        return self.head(h.mean(1))


# --------------------------------------------------------------------------- convolutional blocks
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + BN + ReLU6, 3x3 depthwise (``groups=hidden``) + BN + ReLU6,
    1x1 project + BN; the input is added when the shapes match (stride 1, same channels)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.expand = nn.Conv2d(c_in, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.depthwise(out)))
        out = self.bn3(self.project(out))
        return x + out if self.residual else out


class MobileNetish(nn.Module):
    """A small MobileNetV2 on ``[B, 1, 8, 8]``: stem conv, three inverted-residual blocks
    (``width`` -> ``width`` with a residual add, -> ``2 * width`` at stride 2, -> ``2 * width``
    with a residual add), global average pool, linear head."""

    def __init__(self, width: int = 8, expand: int = 2, classes: int = 10, channels: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, 1, expand),
            InvertedResidual(width, 2 * width, 2, expand),
            InvertedResidual(2 * width, 2 * width, 1, expand),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Bottleneck(nn.Module):
    """ResNeXt bottleneck: 1x1 conv, 3x3 grouped conv (``groups``), 1x1 conv, each with BN;
    identity or 1x1-projection shortcut; ReLU after the add."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNeXtish(nn.Module):
    """A small ResNeXt on ``[B, 1, 8, 8]``: stem conv, a bottleneck with an identity shortcut and
    one with a stride-2 projection shortcut, grouped 3x3 convs (``groups``), pool, linear head."""

    def __init__(self, width: int = 16, groups: int = 4, classes: int = 10, channels: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = Bottleneck(width, width, width, 1, groups)
        self.layer2 = Bottleneck(width, width, 2 * width, 2, groups)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    """BN + ReLU + 3x3 conv producing ``growth`` new channels."""

    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(x)))


class DenseNetish(nn.Module):
    """A small DenseNet on ``[B, 1, 8, 8]``: stem conv to ``init`` channels; two dense blocks of
    ``layers`` layers, each layer's ``growth`` channels ``torch.cat``-ed onto its input along the
    channels; between them a transition (BN, ReLU, 1x1 conv halving the channels, 2x2 average
    pool); final BN + ReLU, global average pool, linear head."""

    def __init__(self, init: int = 8, growth: int = 4, layers: int = 2, classes: int = 10, channels: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(channels, init, 3, padding=1, bias=False)
        c = init
        self.block1 = nn.ModuleList()
        for _ in range(layers):
            self.block1.append(DenseLayer(c, growth))
            c += growth
        self.trans_bn = nn.BatchNorm2d(c)
        self.trans_conv = nn.Conv2d(c, c // 2, 1, bias=False)
        c //= 2
        self.block2 = nn.ModuleList()
        for _ in range(layers):
            self.block2.append(DenseLayer(c, growth))
            c += growth
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.block1:
            x = torch.cat([x, layer(x)], 1)
        x = F.avg_pool2d(self.trans_conv(torch.relu(self.trans_bn(x))), 2)
        for layer in self.block2:
            x = torch.cat([x, layer(x)], 1)
        x = torch.relu(self.bn(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
