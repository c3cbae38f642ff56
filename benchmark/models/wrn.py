"""Wide ResNet (Zagoruyko & Komodakis 2016), WRN-28-10 by default."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.registry import MODELS


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = F.relu(self.bn2(y))
        if self.dropout > 0:
            y = F.dropout(y, p=self.dropout, training=self.training)
        y = self.conv2(y)
        return y + (x if self.equal else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10,
                 in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, in_planes = [], widths[0]
        for stage, stride in zip(range(3), (1, 2, 2)):
            layers = []
            for i in range(n):
                layers.append(WideBlock(in_planes, widths[stage + 1], stride if i == 0 else 1, dropout))
                in_planes = widths[stage + 1]
            blocks.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_layer = "block2"  # mid-level features for feature-space losses and attacks

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return F.relu(self.bn(out)).mean(dim=(2, 3))  # deterministic backward on CUDA (see resnet.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@MODELS.register("wrn-28-10", params="36.5M", description="Wide ResNet 28-10")
def wrn_28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(28, 10, num_classes, in_channels, dropout)


@MODELS.register("wrn-16-4", params="2.7M", description="Wide ResNet 16-4 (small, for quick tests)")
def wrn_16_4(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> WideResNet:
    return WideResNet(16, 4, num_classes, in_channels, dropout)
